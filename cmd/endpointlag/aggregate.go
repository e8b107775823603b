package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/spf13/pflag"
	"k8s.io/client-go/kubernetes"
	"k8s.io/utils/clock"

	"github.com/endpointlag/endpointlag/cmd/endpointlag/internal/webserver"
	"github.com/endpointlag/endpointlag/collector"
	"github.com/endpointlag/endpointlag/collector/aggregate"
)

const aggregateUsage = `endpointlag aggregate receives the records every daemon pushes (--aggregator.urls), joins them
by pod UID and computes each terminating pod's convergence: from its deletion (T0) to the moment the
last node and the last proxy stopped sending it new connections, composed without comparing clocks
across nodes. It exports endpointlag_convergence_seconds{stage} and per-workload figures, and serves
/api/v1/pods, /api/v1/pods/{uid}, /api/v1/advice (endpointlag advise prints it) and /metrics.
Run it as one Deployment; with several replicas, list them all in the daemons' --aggregator.urls
(each pod goes to one replica, by its UID; see docs/aggregate.md).

Usage:
  endpointlag aggregate [flags]

Flags:
`

func runAggregate(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := pflag.NewFlagSet("endpointlag aggregate", pflag.ContinueOnError)
	fs.SetOutput(stderr)
	opts := aggregate.DefaultOptions()
	listen := fs.String("web.listen-address", ":9870", "address for the push API, /api/v1/*, /metrics, /healthz and the web page")
	var web webserver.Options
	web.Bind(fs)
	fs.IntVar(&opts.MaxPods, "max-pods", opts.MaxPods, "most terminating pods held; the oldest go first (made final), counted")
	fs.DurationVar(&opts.Settle, "settle", opts.Settle,
		"how long after a pod's first report its figure waits for the live daemons that have not reported it (it is final as soon as all did)")
	fs.DurationVar(&opts.DaemonTimeout, "daemon-timeout", opts.DaemonTimeout,
		"how long a daemon that pushed nothing, not even its heartbeat, still counts as live (more than its --aggregator.heartbeat)")
	fs.IntVar(&opts.MaxWorkloads, "max-workloads", opts.MaxWorkloads, "most workloads with figures (and metric labels) of their own; more are counted in endpointlag_workloads_dropped_total")
	fs.DurationVar(&opts.Window, "advisor.window", opts.Window, "how far back the advisor's p99 looks")
	fs.IntVar(&opts.MaxSamples, "advisor.samples", opts.MaxSamples, "most terminations per workload the advisor's p99 keeps")
	events := fs.Bool("events", true,
		"post a Warning Event (TerminationOutlastedPreStop) on a workload whose pod was still routed to, or reached by new connections, after its declared preStop; needs the API (--kubeconfig or in-cluster) and RBAC events: create")
	eventsInterval := fs.Duration("events.interval", 10*time.Minute, "at most one Event per workload this often")
	kubeconfig := fs.String("kubeconfig", os.Getenv("KUBECONFIG"),
		"path to a kubeconfig for the Events and --web.auth=kubernetes; empty means the in-cluster service account (default $KUBECONFIG)")
	logLevel := fs.String("log.level", "info", "log level: debug, info, warn or error")
	logFormat := fs.String("log.format", "text", "log format: text or json")
	fs.Usage = func() {
		fmt.Fprint(stderr, aggregateUsage)
		fs.PrintDefaults()
	}
	if code, ok := parseFlags(fs, args, stderr); !ok {
		return code
	}
	var errs []error
	if _, err := parseLevel(*logLevel); err != nil {
		errs = append(errs, err)
	}
	if *logFormat != "text" && *logFormat != "json" {
		errs = append(errs, fmt.Errorf("--log.format: %q is neither text nor json", *logFormat))
	}
	if err := opts.Validate(); err != nil {
		errs = append(errs, err)
	}
	if *eventsInterval <= 0 {
		errs = append(errs, fmt.Errorf("--events.interval must be positive, got %s", *eventsInterval))
	}
	if _, _, err := net.SplitHostPort(*listen); err != nil {
		errs = append(errs, fmt.Errorf("--web.listen-address: %w", err))
	}
	errs = append(errs, web.Validate())
	if err := errors.Join(errs...); err != nil {
		fmt.Fprintf(stderr, "endpointlag aggregate: %v\n", err)
		return 2
	}
	log := newLogger(stderr, *logLevel, *logFormat)
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	if err := collector.RegisterBuildInfo(reg, version, revision); err != nil {
		fmt.Fprintf(stderr, "endpointlag aggregate: %v\n", err)
		return 1
	}
	agg, err := aggregate.New(opts, reg, clock.RealClock{}, log)
	if err != nil {
		fmt.Fprintf(stderr, "endpointlag aggregate: %v\n", err)
		return 1
	}
	var authClient kubernetes.Interface
	if *events || web.Auth == webserver.AuthKubernetes {
		cfg, err := restConfig(*kubeconfig)
		if err != nil {
			fmt.Fprintf(stderr, "endpointlag aggregate: --events or --web.auth=kubernetes: %v (--events=false --web.auth=none runs without the API)\n", err)
			return 1
		}
		cfg.UserAgent = "endpointlag-aggregate/" + version
		if *events {
			client, err := kubernetes.NewForConfig(cfg)
			if err != nil {
				fmt.Fprintf(stderr, "endpointlag aggregate: kubernetes client: %v\n", err)
				return 1
			}
			ev := aggregate.NewEventer(client, *eventsInterval, clock.RealClock{}, log)
			agg.SetEventer(ev)
			go ev.Run(ctx)
		}
		if web.Auth == webserver.AuthKubernetes {
			if authClient, err = delegationClient(cfg); err != nil {
				fmt.Fprintf(stderr, "endpointlag aggregate: %v\n", err)
				return 1
			}
		}
	}
	host, _, _ := net.SplitHostPort(*listen)
	ws, err := webserver.New(web, host, authClient, clock.RealClock{}, log)
	if err != nil {
		fmt.Fprintf(stderr, "endpointlag aggregate: %v\n", err)
		return 1
	}
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		fmt.Fprintf(stderr, "endpointlag aggregate: --web.listen-address: %v\n", err)
		return 1
	}
	srv := &http.Server{Handler: aggregate.Handler(agg, reg), ReadHeaderTimeout: 10 * time.Second}
	log.Info("aggregating", "version", version, "listen", ln.Addr().String(), "settle", opts.Settle, "max_pods", opts.MaxPods)
	served := make(chan error, 1)
	go func() { served <- ws.Serve(ln, srv) }()
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			shutdown, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			_ = srv.Shutdown(shutdown)
			log.Info("stopped")
			return 0
		case err := <-served:
			fmt.Fprintf(stderr, "endpointlag aggregate: http server: %v\n", err)
			return 1
		case <-tick.C:
			agg.Tick()
		}
	}
}

const adviseUsage = `endpointlag advise prints, per workload, the preStop it declares, the p99 of its pods'
convergence (from a pod's deletion to the last node or proxy stopping new connections to it), the
recommended preStop (that p99 + 1 s, rounded up to whole seconds: the rule the demo's report uses),
the shortfall, the terminations seen and the late and dead connections, from the aggregator
(endpointlag aggregate). With several aggregator replicas, list them all: their figures merge.

Usage:
  endpointlag advise [flags]

Flags:
`

func runAdvise(args []string, stdout, stderr io.Writer) int {
	fs := pflag.NewFlagSet("endpointlag advise", pflag.ContinueOnError)
	fs.SetOutput(stderr)
	urls := fs.StringSlice("aggregator", []string{"http://127.0.0.1:9870"}, "the aggregator replicas to ask, comma-separated")
	output := fs.StringP("output", "o", "table", "output format: table or json")
	namespace := fs.StringP("namespace", "n", "", "only this namespace (default all)")
	timeout := fs.Duration("timeout", 10*time.Second, "how long to wait for the answers")
	var auth clientAuth
	auth.bind(fs, "", "the aggregator")
	fs.Usage = func() {
		fmt.Fprint(stderr, adviseUsage)
		fs.PrintDefaults()
	}
	if code, ok := parseFlags(fs, args, stderr); !ok {
		return code
	}
	if *output != "table" && *output != "json" {
		fmt.Fprintf(stderr, "endpointlag advise: -o %q: use table or json\n", *output)
		return 2
	}
	if err := auth.validate(*urls...); err != nil {
		fmt.Fprintf(stderr, "endpointlag advise: %v\n", err)
		return 2
	}
	client, err := auth.client()
	if err != nil {
		fmt.Fprintf(stderr, "endpointlag advise: %v\n", err)
		return 1
	}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	var parts [][]aggregate.Advice
	for _, u := range *urls {
		ads, err := adviceFrom(ctx, client, u)
		if err != nil {
			fmt.Fprintf(stderr, "endpointlag advise: %v\n", err)
			return 1
		}
		parts = append(parts, ads)
	}
	ads := aggregate.Merge(parts...)
	if *namespace != "" {
		var kept []aggregate.Advice
		for _, ad := range ads {
			if ad.Namespace == *namespace {
				kept = append(kept, ad)
			}
		}
		ads = kept
	}
	if *output == "json" {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(ads); err != nil {
			fmt.Fprintf(stderr, "endpointlag advise: %v\n", err)
			return 1
		}
		return 0
	}
	writeAdvice(stdout, ads)
	return 0
}

func adviceFrom(ctx context.Context, client *http.Client, base string) ([]aggregate.Advice, error) {
	var ads []aggregate.Advice
	return ads, aggregatorServer.getJSON(ctx, client, base, "api/v1/advice", &ads)
}

func writeAdvice(w io.Writer, ads []aggregate.Advice) {
	if len(ads) == 0 {
		fmt.Fprintln(w, "no workload has a termination with a final figure yet")
		return
	}
	secs := func(v *float64) string {
		if v == nil {
			return "-"
		}
		return fmt.Sprintf("%.3gs", *v)
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "NAMESPACE\tWORKLOAD\tPRESTOP\tGRACE\tP99 CONVERGENCE\tRECOMMENDED\tSHORTFALL\tTERMINATIONS\tAFTER PRESTOP\tLATE\tDEAD")
	for _, ad := range ads {
		preStop, grace := "-", "-"
		if d := ad.Declared; d != nil {
			preStop, grace = "unknown", fmt.Sprintf("%gs", d.GraceSeconds)
			if d.PreStopKnown {
				preStop = fmt.Sprintf("%gs", d.PreStopSeconds)
			}
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%d\t%d\t%d\t%d\n", ad.Namespace, strings.ToLower(ad.Workload.Kind)+"/"+ad.Workload.Name,
			preStop, grace, secs(ad.P99), secs(ad.Recommended), secs(ad.Shortfall), ad.Terminations, ad.AfterPreStop, ad.Late, ad.Dead)
	}
	_ = tw.Flush()
}
