package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"runtime/debug"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"golang.org/x/sync/errgroup"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/klog/v2"
	"k8s.io/utils/clock"

	"github.com/endpointlag/endpointlag/cmd/endpointlag/internal/webserver"
	"github.com/endpointlag/endpointlag/collector"
	"github.com/endpointlag/endpointlag/collector/aggregate"
	"github.com/endpointlag/endpointlag/collector/tracing"
	"github.com/endpointlag/endpointlag/probes"
	"github.com/endpointlag/endpointlag/probes/ingress"
)

// restConfig loads the kubeconfig, or the in-cluster config when the path is empty. Like
// kube-proxy's, the clients speak protobuf: fewer bytes on the wire and less to decode for every
// EndpointSlice every node watches (docs/benchmarks.md).
func restConfig(kubeconfig string) (*rest.Config, error) {
	var cfg *rest.Config
	var err error
	if kubeconfig == "" {
		if cfg, err = rest.InClusterConfig(); err != nil {
			return nil, fmt.Errorf("no --kubeconfig given and not running in a cluster: %w", err)
		}
	} else if cfg, err = clientcmd.BuildConfigFromFlags("", kubeconfig); err != nil {
		return nil, fmt.Errorf("--kubeconfig %s: %w", kubeconfig, err)
	}
	cfg.ContentType = runtime.ContentTypeProtobuf
	cfg.AcceptContentTypes = runtime.ContentTypeProtobuf + "," + runtime.ContentTypeJSON
	return cfg, nil
}

// delegationClient is a client of cfg's API server for the TokenReviews and SubjectAccessReviews
// of --web.auth=kubernetes: apart from the probes' client, so that a burst of requests to check
// neither waits for nor slows the watches, and with the high rate limits Kubernetes components
// give theirs (their answers are cached, see internal/webserver).
func delegationClient(cfg *rest.Config) (kubernetes.Interface, error) {
	cfg = rest.CopyConfig(cfg)
	cfg.QPS, cfg.Burst = 200, 400
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("kubernetes client for --web.auth=kubernetes: %w", err)
	}
	return client, nil
}

// daemon is the wired program: probes feeding the collector, and the HTTP server publishing it.
type daemon struct {
	opts   Options
	log    *slog.Logger
	coll   *collector.Collector
	probes []probes.Probe
	srv    *http.Server
	ln     net.Listener
	web    *webserver.Server
	// pusher pushes settled records to the aggregator; nil without --aggregator.urls.
	pusher *aggregate.Pusher
	// tracer emits OpenTelemetry spans of settled records; nil unless OTEL_EXPORTER_OTLP_* names
	// an endpoint.
	tracer *tracing.Tracer
}

// newDaemon wires the daemon: client is the API the probes read, authClient the one asked the
// TokenReviews and SubjectAccessReviews of --web.auth=kubernetes (nil without it).
func newDaemon(opts Options, log *slog.Logger, clk clock.WithTicker, client, authClient kubernetes.Interface) (*daemon, error) {
	enabled := opts.enabled()
	copts := collector.Options{
		Horizon: opts.Horizon, MaxRecords: opts.MaxRecords, MaxUntrustedRecords: opts.MaxUntrustedRecords,
		MaxRecordsPerNamespace: opts.MaxRecordsPerNamespace, SweepInterval: opts.SweepInterval, StageProbe: map[probes.Stage]string{},
	}
	for _, f := range enabled {
		copts.Probes = append(copts.Probes, f.Name)
		if f.NeedsAPI {
			// Without the API nothing terminates: readiness waits for it, however long.
			copts.RequiredProbes = append(copts.RequiredProbes, f.Name)
		}
		for _, s := range f.Stages {
			copts.StageProbe[s] = f.Name
			if s.Awaited() {
				copts.Stages = append(copts.Stages, s)
			}
		}
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	if err := collector.RegisterBuildInfo(reg, version, revision); err != nil {
		return nil, err
	}
	coll, err := collector.New(copts, clk, log.With("component", "collector"), reg)
	if err != nil {
		return nil, err
	}
	d := &daemon{opts: opts, log: log, coll: coll}
	var ing ingressView
	env := probes.Env{NodeName: opts.NodeName, PollInterval: opts.PollInterval, Client: client, Clock: clk, Logger: log, LocalPods: coll,
		Pending: coll, Registerer: reg, KubeProxyURL: opts.KubeProxyURL}
	for _, f := range enabled {
		p, err := f.New(env)
		if err != nil {
			return nil, fmt.Errorf("probe %s: %w", f.Name, err)
		}
		d.probes = append(d.probes, p)
		if ip, ok := p.(*ingress.Probe); ok {
			ing = ip
		}
		if dp, ok := p.(probes.Dataplane); ok {
			for _, s := range f.Stages {
				if s.Routing() {
					coll.SetDataplane(s, dp)
				}
			}
		}
	}
	host, _, _ := net.SplitHostPort(opts.ListenAddress)
	if d.web, err = webserver.New(opts.Web, host, authClient, clk, log); err != nil {
		return nil, err
	}
	d.ln, err = net.Listen("tcp", opts.ListenAddress)
	if err != nil {
		return nil, fmt.Errorf("--web.listen-address: %w", err)
	}
	mux := newMux(coll, ing, reg, opts.NodeName, log)
	if opts.EnableProfiling {
		serveProfiles(mux)
	}
	d.srv = &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	if len(opts.Push.URLs) > 0 {
		if opts.Push.Transport, err = opts.PushAuth.transport(); err != nil {
			return nil, err
		}
		if d.pusher, err = aggregate.NewPusher(opts.Push, opts.NodeName, coll, reg, clk, log); err != nil {
			return nil, err
		}
	}
	if tracing.Enabled() {
		if d.tracer, err = tracing.New(context.Background(), opts.NodeName, coll, opts.Push.SettleAfter, clk, log); err != nil {
			return nil, err
		}
		log.Info("tracing terminations over OTLP", "protocol", tracing.Protocol())
	}
	return d, nil
}

// run serves until ctx is done, then shuts down within the shutdown timeout.
func (d *daemon) run(ctx context.Context) error {
	d.log.Info("starting", "version", version, "node", d.opts.NodeName, "listen", d.ln.Addr().String(), "probes", len(d.probes))
	g, gctx := errgroup.WithContext(context.WithoutCancel(ctx))
	runCtx, stopRun := context.WithCancel(gctx)
	defer stopRun()
	g.Go(func() error { return d.coll.Run(runCtx) })
	for _, p := range d.probes {
		g.Go(func() error {
			d.supervise(runCtx, p)
			return nil
		})
	}
	g.Go(func() error {
		d.settleUnsynced(runCtx)
		return nil
	})
	if d.pusher != nil {
		g.Go(func() error {
			d.pusher.Run(runCtx)
			return nil
		})
	}
	if d.tracer != nil {
		g.Go(func() error {
			d.tracer.Run(runCtx, d.opts.Push.Interval)
			return nil
		})
	}
	g.Go(func() error {
		if err := d.web.Serve(d.ln, d.srv); !errors.Is(err, http.ErrServerClosed) {
			return fmt.Errorf("http server: %w", err)
		}
		return nil
	})

	var cause error
	select {
	case <-ctx.Done():
		d.log.Info("shutting down", "signal", context.Cause(ctx))
	case <-gctx.Done():
		cause = context.Cause(gctx)
		d.log.Error("shutting down after a failure", "err", cause)
	}
	stopRun()
	shutdownCtx, cancel := context.WithTimeout(context.Background(), d.opts.ShutdownTimeout)
	defer cancel()
	if err := d.srv.Shutdown(shutdownCtx); err != nil {
		d.log.Warn("http server did not finish in-flight requests", "err", err)
	}
	done := make(chan error, 1)
	go func() { done <- g.Wait() }()
	select {
	case err := <-done:
		cause = errors.Join(cause, err)
	case <-shutdownCtx.Done():
		d.log.Warn("probes did not stop within the shutdown timeout", "timeout", d.opts.ShutdownTimeout)
	}
	s := d.coll.Summary()
	pending := make([]any, 0, 2*len(s.Pending))
	for stage, n := range s.Pending {
		pending = append(pending, string(stage), n)
	}
	d.log.Info("stopped", "records", s.Records, "pods", s.Pods, slog.Group("pending", pending...))
	return cause
}

// Backoff of a probe started again after a failure.
const (
	firstBackoff = time.Second
	maxBackoff   = 5 * time.Minute
)

// supervise runs a probe until ctx ends. A failure — an error, a panic, or a return before ctx
// ended — is reported (probe_up 0, counted, logged with the reason; the probe no longer holds
// readiness back) and the probe started again after a backoff that doubles from 1 s to 5 min,
// starting over after a run that lasted 5 min. A probe that cannot start on this node (no ring
// buffer, seccomp, a missing capability) is thus retried, never wedges the daemon, and counts as
// up again once it reads its source.
func (d *daemon) supervise(ctx context.Context, p probes.Probe) {
	delay := firstBackoff
	for {
		start := time.Now()
		err := runProbe(ctx, p, d.coll)
		if ctx.Err() != nil {
			return
		}
		if err == nil {
			err = errors.New("stopped before the daemon did")
		}
		if time.Since(start) >= maxBackoff {
			delay = firstBackoff
		}
		d.coll.Failed(p.Name(), err)
		d.log.Error("probe failed; starting it again", "probe", p.Name(), "err", err, "after", delay)
		select {
		case <-ctx.Done():
			return
		case <-time.After(delay):
		}
		delay = min(2*delay, maxBackoff)
	}
}

// runProbe runs p, turning a panic into an error.
func runProbe(ctx context.Context, p probes.Probe, sink probes.Sink) (err error) {
	defer func() {
		if v := recover(); v != nil {
			err = fmt.Errorf("panic: %v\n%s", v, debug.Stack())
		}
	}()
	return p.Run(ctx, sink)
}

// settleUnsynced reports, once the sync timeout has passed, every probe that has neither read its
// source nor failed: readiness stops waiting for it (the API probe excepted), and the reason is
// exported and logged.
func (d *daemon) settleUnsynced(ctx context.Context) {
	select {
	case <-ctx.Done():
		return
	case <-time.After(d.opts.SyncTimeout):
	}
	_, waiting := d.coll.Ready()
	for _, name := range waiting {
		d.coll.Failed(name, fmt.Errorf("not synced within --probes.sync-timeout (%s)", d.opts.SyncTimeout))
	}
}

// runDaemon is the default command.
func runDaemon(ctx context.Context, opts Options, logOut io.Writer) error {
	log := newLogger(logOut, opts.LogLevel, opts.LogFormat)
	klog.SetSlogLogger(log.With("component", "client-go"))
	log.Info("Go memory limit", "limit", setMemoryLimit("/sys/fs/cgroup", "/proc/self/cgroup"))
	needsAPI := opts.Web.Auth == webserver.AuthKubernetes
	for _, f := range opts.enabled() {
		needsAPI = needsAPI || f.NeedsAPI
	}
	var client, authClient kubernetes.Interface
	if needsAPI {
		cfg, err := restConfig(opts.Kubeconfig)
		if err != nil {
			return err
		}
		cfg.UserAgent = "endpointlag/" + version
		if client, err = kubernetes.NewForConfig(cfg); err != nil {
			return fmt.Errorf("kubernetes client: %w", err)
		}
		if opts.Web.Auth == webserver.AuthKubernetes {
			if authClient, err = delegationClient(cfg); err != nil {
				return err
			}
		}
	}
	d, err := newDaemon(opts, log, clock.RealClock{}, client, authClient)
	if err != nil {
		return err
	}
	return d.run(ctx)
}
