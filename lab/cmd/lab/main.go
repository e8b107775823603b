// Command lab runs endpointlag's one-machine Kubernetes lab: `lab demo` (the README's `make
// demo`), `lab up` / `lab down` for interactive use. It needs root.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"k8s.io/apimachinery/pkg/types"

	"github.com/endpointlag/endpointlag/lab/cluster"
	"github.com/endpointlag/endpointlag/lab/load"
	"github.com/endpointlag/endpointlag/lab/scenario"
)

const usage = `Usage: lab <command> [flags]

Commands:
  demo   start the lab, roll a Deployment twice under load, print the propagation report, stop
  up     start the lab and keep it running until SIGINT/SIGTERM (or lab down)
  down   stop a running lab and remove what any earlier lab left behind
  serve, load   what the lab runs inside pod namespaces (a pod's server, the load generator)
  watch-slices  print a namespace's EndpointSlice events as JSON lines (the e2e tests' ground truth)
  exec-mounted  bind-mount a pod's volumes and execute its process (the lab's kubelet runs it)
  stamp         run a command, printing each line of its output with the time it was read

The lab is a real control plane (etcd, kube-apiserver, kube-controller-manager) and per node
kube-proxy and endpointlag, each node a network namespace. It needs root.

Flags:
`

type options struct {
	cluster.Config
	rate      int
	keepAlive bool
	timeout   time.Duration
	ingress   bool
	logLevel  string
}

func main() {
	os.Exit(run(os.Args[1:]))
}

func run(args []string) int {
	if len(args) == 0 {
		fmt.Fprint(os.Stderr, usage)
		return 2
	}
	cmd := args[0]
	if cmd == "help" || cmd == "-h" || cmd == "--help" {
		// The flags are the same for up, down and demo.
		cmd, args = "demo", []string{"demo", "--help"}
	}
	switch cmd {
	case "serve":
		code, err := serve(args[1:])
		if err != nil {
			fmt.Fprintf(os.Stderr, "lab serve: %v\n", err)
		}
		return code
	case "load":
		if err := loadCmd(args[1:]); err != nil {
			fmt.Fprintf(os.Stderr, "lab load: %v\n", err)
			return 1
		}
		return 0
	case "stamp":
		if err := stamp(args[1:]); err != nil {
			fmt.Fprintf(os.Stderr, "lab stamp: %v\n", err)
			return 1
		}
		return 0
	case "exec-mounted":
		err := execMounted(args[1:])
		fmt.Fprintf(os.Stderr, "lab exec-mounted: %v\n", err)
		return 1
	case "watch-slices":
		if err := watchSlices(args[1:]); err != nil {
			fmt.Fprintf(os.Stderr, "lab watch-slices: %v\n", err)
			return 1
		}
		return 0
	}
	fs := flag.NewFlagSet("lab "+cmd, flag.ContinueOnError)
	var o options
	fs.IntVar(&o.Nodes, "nodes", 2, "number of nodes (1 to 9)")
	fs.StringVar(&o.ProxyMode, "proxy-mode", "nftables", "kube-proxy mode: nftables or iptables")
	zones := fs.String("zones", "", "comma-separated zone of each node, e.g. a,b,a (sets --nodes when that is not given)")
	fs.IntVar(&o.MaxEndpointsPerSlice, "max-endpoints-per-slice", 0, "kube-controller-manager's --max-endpoints-per-slice (0: its default, 100)")
	fs.StringVar(&o.BinDir, "bin-dir", os.Getenv("LAB_BIN_DIR"), "directory with etcd, kube-apiserver, kube-controller-manager, kube-proxy (default $LAB_BIN_DIR)")
	fs.StringVar(&o.Endpointlag, "endpointlag", "bin/endpointlag", "the endpointlag binary to run on every node")
	fs.StringVar(&o.StateDir, "state-dir", "/run/endpointlag-lab", "keys, kubeconfigs, logs and PID records of the lab")
	fs.StringVar(&o.Traefik, "traefik", os.Getenv("LAB_TRAEFIK"), "the traefik binary that pods of image "+cluster.ImageTraefik+" run (default $LAB_TRAEFIK; make lab-bins builds it)")
	fs.StringVar(&o.Otelcol, "otelcol", os.Getenv("LAB_OTELCOL"), "the OpenTelemetry Collector the daemons export their traces to (default $LAB_OTELCOL; make lab-bins builds it; empty: no traces)")
	fs.StringVar(&o.HAProxy, "haproxy", defaultHAProxy(), "the haproxy binary that pods of image "+cluster.ImageHAProxy+" run (Debian's package haproxy)")
	fs.BoolVar(&o.ingress, "ingress", true, "demo: put the app behind Traefik and HAProxy too, and send load through both")
	fs.IntVar(&o.rate, "rate", 200, "demo: load generator requests per second on each path")
	fs.DurationVar(&o.timeout, "timeout", 3*time.Second, "demo: per-request timeout of the load generator")
	fs.BoolVar(&o.keepAlive, "keep-alive", false, "demo: reuse connections instead of one new connection per request")
	fs.StringVar(&o.logLevel, "log-level", "info", "debug, info, warn or error")
	fs.Usage = func() {
		fmt.Fprint(os.Stderr, usage)
		fs.PrintDefaults()
	}
	if err := fs.Parse(args[1:]); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if *zones != "" {
		o.Zones = strings.Split(*zones, ",")
		nodesSet := false
		fs.Visit(func(f *flag.Flag) { nodesSet = nodesSet || f.Name == "nodes" })
		if !nodesSet {
			o.Nodes = len(o.Zones)
		}
	}
	var level slog.Level
	var err error
	if err = level.UnmarshalText([]byte(o.logLevel)); err != nil {
		fmt.Fprintf(os.Stderr, "lab: --log-level %q: %v\n", o.logLevel, err)
		return 2
	}
	o.Log = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	if abs, err := filepath.Abs(o.Endpointlag); err == nil {
		o.Endpointlag = abs
	}
	if o.Tool, err = os.Executable(); err != nil {
		fmt.Fprintf(os.Stderr, "lab: %v\n", err)
		return 1
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	switch cmd {
	case "up":
		err = up(ctx, o)
	case "down":
		err = down(o)
	case "demo":
		err = demo(ctx, o, os.Stdout)
	default:
		fmt.Fprintf(os.Stderr, "lab: unknown command %q\n\n%s", cmd, usage)
		return 2
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "lab %s: %v\n", cmd, err)
		return 1
	}
	return 0
}

// defaultHAProxy is Debian's haproxy when installed.
func defaultHAProxy() string {
	const debian = "/usr/sbin/haproxy"
	if _, err := os.Stat(debian); err == nil {
		return debian
	}
	return ""
}

func up(ctx context.Context, o options) error {
	c, err := cluster.Up(ctx, o.Config)
	if err != nil {
		return err
	}
	defer c.Down()
	fmt.Printf("lab is up (pid %d). Stop it with Ctrl-C, or `make lab-down`.\n\n", os.Getpid())
	fmt.Printf("  export KUBECONFIG=%s\n  kubectl get nodes\n\n", c.Kubeconfig)
	for _, n := range c.Nodes {
		zone := ""
		if n.Zone != "" {
			zone = " (zone " + n.Zone + ")"
		}
		fmt.Printf("  %s%s: endpointlag at %s/metrics, inspect with: bin/endpointlag inspect --daemon %s\n", n.Name, zone, n.DaemonURL, n.DaemonURL)
	}
	fmt.Printf("  logs: %s/logs\n", o.StateDir)
	<-ctx.Done()
	fmt.Println("lab: stopping")
	return nil
}

func down(o options) error {
	if pid, alive := cluster.RunningPID(); alive {
		fmt.Printf("lab: stopping the lab (pid %d)\n", pid)
		if err := syscall.Kill(pid, syscall.SIGTERM); err != nil {
			return err
		}
		deadline := time.Now().Add(60 * time.Second)
		for syscall.Kill(pid, 0) == nil && time.Now().Before(deadline) {
			time.Sleep(100 * time.Millisecond)
		}
	}
	return cluster.Cleanup(o.StateDir, o.Log)
}

func demo(ctx context.Context, o options, out io.Writer) error {
	start := time.Now()
	if o.ingress && (o.Traefik == "" || o.HAProxy == "") {
		return fmt.Errorf("--ingress needs Traefik and HAProxy (--traefik=%q, --haproxy=%q): make demo builds and installs them; --ingress=false leaves them out", o.Traefik, o.HAProxy)
	}
	fmt.Fprintf(out, "lab: starting %d nodes, kube-proxy in %s mode\n", o.Nodes, o.ProxyMode)
	c, err := cluster.Up(ctx, o.Config)
	if err != nil {
		return err
	}
	defer func() {
		fmt.Fprintln(out, "lab: stopping")
		c.Down()
	}()
	app := &scenario.App{Client: c.Client, Namespace: "demo", Name: "web", Replicas: 4}
	first := scenario.Behaviour{}
	if err := app.Apply(ctx, first); err != nil {
		return err
	}
	if err := app.WaitSettled(ctx, 2*time.Minute); err != nil {
		return err
	}
	fmt.Fprintf(out, "lab: demo/web has 4 ready replicas behind its Service\n")
	if o.ingress {
		in, err := scenario.DeployIngress(ctx, c, app, scenario.IngressOptions{})
		if err != nil {
			return fmt.Errorf("ingress: %w", err)
		}
		fmt.Fprintf(out, "lab: Traefik (%s, API http://%s:%d/api/http/services) and HAProxy (%s, backend %s) route to demo/web\n",
			in.Traefik.Status.PodIP, in.Traefik.Status.PodIP, scenario.TraefikAdminPort, in.HAProxy.Status.PodIP, in.HAProxyBackend)
	}
	ls := scenario.LoadSettings{Rate: o.rate, KeepAlive: o.keepAlive, Timeout: o.timeout}
	r1, err := scenario.RunRollout(ctx, c, app, "rollout 1", first, ls, out)
	if err != nil {
		return err
	}
	rec := scenario.Recommend(r1.Lags)
	var uids []types.UID
	for uid := range r1.Deleted {
		uids = append(uids, uid)
	}
	fmt.Fprintf(out, "lab: waiting for the aggregator's figures of the %d replaced pods\n", len(uids))
	conv, err := scenario.Converged(ctx, c.AggregatorURL, uids, time.Minute)
	if err != nil {
		return err
	}
	advice, err := scenario.WorkloadAdvice(ctx, c.AggregatorURL, app.Namespace, "Deployment", app.Name)
	if err != nil {
		return err
	}
	if advice.PreStop() == 0 {
		return errors.New("rollout 1: endpointlag measured no convergence to size preStop from")
	}
	second := scenario.Behaviour{PreStop: advice.PreStop(), Drain: 2 * time.Second}
	fmt.Fprintf(out, "lab: setting preStop %s and drain %s (a rollout without load)\n", second.PreStop, second.Drain)
	if err := app.Apply(ctx, second); err != nil {
		return err
	}
	if err := app.WaitSettled(ctx, 3*time.Minute); err != nil {
		return err
	}
	r2, err := scenario.RunRollout(ctx, c, app, "rollout 2", second, ls, out)
	if err != nil {
		return err
	}
	if err := saveLoadLogs(o.StateDir, r1, r2); err != nil {
		return err
	}
	writeReport(out, o, c, []*scenario.Rollout{r1, r2}, demoAdvice{rec: rec, advice: advice, conv: conv})
	fmt.Fprintf(out, "\ndemo took %s\n", time.Since(start).Round(time.Second))
	return nil
}

func saveLoadLogs(dir string, rs ...*scenario.Rollout) error {
	for i, r := range rs {
		f, err := os.Create(filepath.Join(dir, fmt.Sprintf("failures-rollout%d.log", i+1)))
		if err != nil {
			return err
		}
		err = load.WriteLog(f, r.Load, r.Names)
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return err
		}
	}
	return nil
}
