package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/endpointlag/endpointlag/lab/load"
	"github.com/endpointlag/endpointlag/lab/pod"
)

// The lab starts these commands itself, inside pod namespaces.

// serve is what every lab pod runs.
func serve(args []string) error {
	fs := flag.NewFlagSet("lab serve", flag.ContinueOnError)
	name := fs.String("name", "", "the pod's name, the body of every answer")
	port := fs.Int("port", 8080, "port to listen on")
	onSIGTERM := fs.String("on-sigterm", "exit", "exit (at once) or drain=DURATION (keep serving that long, then exit)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	var drain time.Duration
	if v, ok := strings.CutPrefix(*onSIGTERM, "drain="); ok {
		d, err := time.ParseDuration(v)
		if err != nil {
			return fmt.Errorf("--on-sigterm %q: %w", *onSIGTERM, err)
		}
		drain = d
	} else if *onSIGTERM != "exit" && *onSIGTERM != "" {
		return fmt.Errorf("--on-sigterm %q: want exit or drain=DURATION", *onSIGTERM)
	}
	stop, cancel := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer cancel()
	return pod.Serve(stop, *name, *port, drain)
}

// loadCmd is the load generator, run in the client pod: it sends requests until SIGTERM or
// --duration, then writes every result as JSON to --out.
func loadCmd(args []string) error {
	fs := flag.NewFlagSet("lab load", flag.ContinueOnError)
	var cfg load.Config
	fs.StringVar(&cfg.Target, "target", "", "host:port to send requests to")
	fs.IntVar(&cfg.Rate, "rate", 200, "requests per second")
	fs.DurationVar(&cfg.Duration, "duration", time.Minute, "longest run")
	fs.BoolVar(&cfg.KeepAlive, "keep-alive", false, "reuse connections")
	fs.DurationVar(&cfg.Timeout, "timeout", time.Second, "per-request timeout")
	fs.IntVar(&cfg.FirstPort, "first-port", 0, "first source port (the lab continues one sequence over all runs)")
	fs.StringVar(&cfg.ConntrackNS, "conntrack-ns", "", "namespace whose conntrack table traces failed connections")
	out := fs.String("out", "", "file to write the results to (JSON)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if cfg.Target == "" || *out == "" {
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
