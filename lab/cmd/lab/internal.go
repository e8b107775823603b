package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/endpointlag/endpointlag/lab/load"
	"github.com/endpointlag/endpointlag/lab/pod"
)

// The lab starts these commands itself, inside pod namespaces.

// serve is what every lab pod runs. It returns the exit code: --exit-code once --exit-after
// has passed, 0 after a SIGTERM.
func serve(args []string) (int, error) {
	fs := flag.NewFlagSet("lab serve", flag.ContinueOnError)
	var s pod.Server
	fs.StringVar(&s.Name, "name", "", "the pod's name, the body of every answer")
	ports := fs.String("ports", "8080", "comma-separated TCP ports to listen on")
	onSIGTERM := fs.String("on-sigterm", "exit", "exit (at once), drain=DURATION (keep serving that long, then exit) or drain-unready=DURATION (the same, answering the kubelet's probes with 503)")
	fs.DurationVar(&s.ExitAfter, "exit-after", 0, "exit on its own this long after starting (0: never)")
	exitCode := fs.Int("exit-code", 0, "the exit code after --exit-after")
	if err := fs.Parse(args); err != nil {
		return 2, err
	}
	var err error
	if s.OnSIGTERM, err = pod.ParseOnSIGTERM(*onSIGTERM); err != nil {
		return 2, fmt.Errorf("--on-sigterm %w", err)
	}
	for _, p := range strings.Split(*ports, ",") {
		n, err := strconv.Atoi(p)
		if err != nil || n < 1 || n > 65535 {
			return 2, fmt.Errorf("--ports: %q is not a port", p)
		}
		s.Ports = append(s.Ports, n)
	}
	stop, cancel := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer cancel()
	switch err := s.Serve(stop); {
	case errors.Is(err, pod.ErrCompleted):
		return *exitCode, nil
	case err != nil:
		return 1, err
	}
	return 0, nil
}

// loadCmd is the load generator, run in the client pod: it sends requests along every --target
// until SIGTERM or --duration, then writes every result as JSON to --out.
func loadCmd(args []string) error {
	fs := flag.NewFlagSet("lab load", flag.ContinueOnError)
	var cfg load.Config
	fs.Func("target", "a path to send requests along: PATH=HOST:PORT[,host=NAME] (NAME: the Host header), repeated; a bare HOST:PORT is the clusterip path", func(s string) error {
		t, err := load.ParseTarget(s)
		cfg.Targets = append(cfg.Targets, t)
		return err
	})
	fs.IntVar(&cfg.Rate, "rate", 200, "requests per second on each target")
	fs.DurationVar(&cfg.Duration, "duration", time.Minute, "longest run")
	fs.BoolVar(&cfg.KeepAlive, "keep-alive", false, "reuse connections")
	fs.DurationVar(&cfg.Timeout, "timeout", time.Second, "per-request timeout")
	fs.IntVar(&cfg.FirstPort, "first-port", 0, "first source port (the lab continues one sequence over all runs)")
	fs.StringVar(&cfg.ConntrackNS, "conntrack-ns", "", "namespace whose conntrack table traces failed connections")
	out := fs.String("out", "", "file to write the results to (JSON)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if len(cfg.Targets) == 0 || *out == "" {
		return fmt.Errorf("--target and --out are required")
	}
	ctx, cancel := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer cancel()
	rs, err := load.Run(ctx, cfg)
	if err != nil {
		return err
	}
	b, err := json.Marshal(rs)
	if err != nil {
		return err
	}
	return os.WriteFile(*out, b, 0o644)
}
