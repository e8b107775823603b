package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"golang.org/x/sync/errgroup"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/klog/v2"
	"k8s.io/utils/clock"

	"github.com/endpointlag/endpointlag/collector"
	"github.com/endpointlag/endpointlag/probes"
)

// restConfig loads the kubeconfig, or the in-cluster config when the path is empty.
func restConfig(kubeconfig string) (*rest.Config, error) {
	if kubeconfig == "" {
		cfg, err := rest.InClusterConfig()
		if err != nil {
			return nil, fmt.Errorf("no --kubeconfig given and not running in a cluster: %w", err)
		}
		return cfg, nil
	}
	cfg, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		return nil, fmt.Errorf("--kubeconfig %s: %w", kubeconfig, err)
	}
	return cfg, nil
}

// daemon is the wired program: probes feeding the collector, and the HTTP server publishing it.
type daemon struct {
	opts   Options
	log    *slog.Logger
	coll   *collector.Collector
	probes []probes.Probe
	srv    *http.Server
	ln     net.Listener
}

func newDaemon(opts Options, log *slog.Logger, clk clock.WithTicker, client kubernetes.Interface) (*daemon, error) {
	enabled := opts.enabled()
	copts := collector.Options{Horizon: opts.Horizon, MaxRecords: opts.MaxRecords, SweepInterval: opts.SweepInterval, StageProbe: map[probes.Stage]string{}}
	for _, f := range enabled {
		copts.Probes = append(copts.Probes, f.Name)
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
	env := probes.Env{NodeName: opts.NodeName, PollInterval: opts.PollInterval, Client: client, Clock: clk, Logger: log, LocalPods: coll, Registerer: reg}
	for _, f := range enabled {
		p, err := f.New(env)
		if err != nil {
			return nil, fmt.Errorf("probe %s: %w", f.Name, err)
		}
		d.probes = append(d.probes, p)
	}
	d.ln, err = net.Listen("tcp", opts.ListenAddress)
	if err != nil {
		return nil, fmt.Errorf("--web.listen-address: %w", err)
	}
	d.srv = &http.Server{Handler: newMux(coll, reg, opts.NodeName, log), ReadHeaderTimeout: 10 * time.Second}
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
			if err := p.Run(runCtx, d.coll); err != nil {
				d.coll.Error(p.Name(), err)
				d.log.Error("probe stopped", "probe", p.Name(), "err", err)
			}
			return nil
		})
	}
	g.Go(func() error {
		if err := d.srv.Serve(d.ln); !errors.Is(err, http.ErrServerClosed) {
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

// runDaemon is the default command.
func runDaemon(ctx context.Context, opts Options, logOut io.Writer) error {
	log := newLogger(logOut, opts.LogLevel, opts.LogFormat)
	klog.SetSlogLogger(log.With("component", "client-go"))
	var client kubernetes.Interface
	for _, f := range opts.enabled() {
		if !f.NeedsAPI {
			continue
		}
		cfg, err := restConfig(opts.Kubeconfig)
		if err != nil {
			return err
		}
		cfg.UserAgent = "endpointlag/" + version
		if client, err = kubernetes.NewForConfig(cfg); err != nil {
			return fmt.Errorf("kubernetes client: %w", err)
		}
		break
	}
	d, err := newDaemon(opts, log, clock.RealClock{}, client)
	if err != nil {
		return err
	}
	return d.run(ctx)
}
