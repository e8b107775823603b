// Command endpointlag measures how long a terminating pod's endpoint keeps receiving traffic after
// its deletion: it timestamps when the endpoint leaves each stage (EndpointSlices, this node's
// kube-proxy rules), counts with eBPF the new connections that still reach it, and exports the
// lags.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"runtime"
	"syscall"

	"github.com/spf13/pflag"

	// Probes, and the proxy kinds the ingress probe reads, register themselves.
	_ "github.com/endpointlag/endpointlag/probes/ingress"
	_ "github.com/endpointlag/endpointlag/probes/ingress/envoy"
	_ "github.com/endpointlag/endpointlag/probes/ingress/haproxy"
	_ "github.com/endpointlag/endpointlag/probes/ingress/nginx"
	_ "github.com/endpointlag/endpointlag/probes/ingress/traefik"
	_ "github.com/endpointlag/endpointlag/probes/iptables"
	_ "github.com/endpointlag/endpointlag/probes/ipvs"
	_ "github.com/endpointlag/endpointlag/probes/kube"
	_ "github.com/endpointlag/endpointlag/probes/nftables"
	_ "github.com/endpointlag/endpointlag/probes/packets"
)

// Set with -ldflags "-X main.version=... -X main.revision=...".
var (
	version  = "dev"
	revision = "unknown"
)

const usageHeader = `endpointlag measures how long each stage of Kubernetes (EndpointSlices, this node's kube-proxy
rules) keeps a terminating pod's endpoint after the pod's deletion, and counts with eBPF the new
connections that still reach it, so that preStop and terminationGracePeriodSeconds can be sized from
data.

Usage:
  endpointlag [flags]           run the daemon (one per node, as a DaemonSet)
  endpointlag inspect [flags]   print the terminating endpoints a daemon or the API knows
  endpointlag aggregate [flags] join every daemon's records into each pod's cluster-wide convergence
  endpointlag advise [flags]    print each workload's recommended preStop from the aggregator
  endpointlag version           print the version

Daemon flags:
`

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

// run returns the exit code: 0 on success, 2 for bad usage, 1 for a failure.
func run(args []string, stdout, stderr io.Writer) int {
	if len(args) > 0 {
		switch args[0] {
		case "inspect":
			return runInspect(args[1:], stdout, stderr)
		case "advise":
			return runAdvise(args[1:], stdout, stderr)
		case "aggregate":
			ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
			defer stop()
			return runAggregate(ctx, args[1:], stdout, stderr)
		case "version":
			fmt.Fprintf(stdout, "endpointlag %s (revision %s, %s)\n", version, revision, runtime.Version())
			return 0
		}
	}
	fs := pflag.NewFlagSet("endpointlag", pflag.ContinueOnError)
	fs.SetOutput(stderr)
	var opts Options
	bindFlags(fs, &opts)
	fs.Usage = func() {
		fmt.Fprint(stderr, usageHeader)
		fs.PrintDefaults()
	}
	if code, ok := parseFlags(fs, args, stderr); !ok {
		return code
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "endpointlag: unknown command %q; see --help\n", fs.Arg(0))
		return 2
	}
	if err := opts.Validate(); err != nil {
		fmt.Fprintf(stderr, "endpointlag: invalid flags:\n%v\n", err)
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	context.AfterFunc(ctx, stop) // a second signal ends the process at once
	if err := runDaemon(ctx, opts, stderr); err != nil {
		fmt.Fprintf(stderr, "endpointlag: %v\n", err)
		return 1
	}
	return 0
}

// parseFlags parses args; when it fails it returns the exit code: 0 for --help, 2 for a bad flag,
// which it reports.
func parseFlags(fs *pflag.FlagSet, args []string, stderr io.Writer) (int, bool) {
	err := fs.Parse(args)
	switch {
	case err == nil:
		return 0, true
	case errors.Is(err, pflag.ErrHelp):
		return 0, false
	}
	fmt.Fprintf(stderr, "%s: %v; see --help\n", fs.Name(), err)
	return 2, false
}
