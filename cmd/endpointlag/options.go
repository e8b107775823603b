package main

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/spf13/pflag"

	"github.com/endpointlag/endpointlag/cmd/endpointlag/internal/webserver"
	"github.com/endpointlag/endpointlag/collector"
	"github.com/endpointlag/endpointlag/collector/aggregate"
	"github.com/endpointlag/endpointlag/probes"
)

// Options are the daemon's settings; flags are bound in one place, bindFlags.
type Options struct {
	Kubeconfig    string
	NodeName      string
	ListenAddress string
	// Web says how the HTTP endpoints are served: plainly, over TLS, behind Kubernetes
	// authentication and authorization, or per a web configuration file.
	Web webserver.Options
	// EnableProfiling serves Go's runtime profiles under /debug/pprof/.
	EnableProfiling bool
	LogLevel        string
	LogFormat       string
	Horizon         time.Duration
	MaxRecords      int
	SweepInterval   time.Duration
	ShutdownTimeout time.Duration
	PollInterval    time.Duration
	SyncTimeout     time.Duration
	KubeProxyURL    string
	// MaxUntrustedRecords and MaxRecordsPerNamespace are collector.Options'.
	MaxUntrustedRecords    int
	MaxRecordsPerNamespace int
	// Push configures the pushes of settled records to the aggregator (off without URLs).
	Push aggregate.PushOptions
	// PushAuth is how the pushes reach an aggregator run with --web.auth=kubernetes.
	PushAuth clientAuth
	// Probes maps every registered probe to whether it runs.
	Probes map[string]*bool
}

func bindFlags(fs *pflag.FlagSet, o *Options) {
	fs.StringVar(&o.Kubeconfig, "kubeconfig", os.Getenv("KUBECONFIG"),
		"path to a kubeconfig; empty means the in-cluster service account (default $KUBECONFIG)")
	fs.StringVar(&o.NodeName, "node-name", os.Getenv("NODE_NAME"),
		"name of the node this daemon runs on, from the downward API (default $NODE_NAME)")
	fs.StringVar(&o.ListenAddress, "web.listen-address", ":9860",
		"address for /metrics, /healthz, /readyz, /api/v1/records and /api/v1/ingress")
	o.Web.Bind(fs)
	fs.BoolVar(&o.EnableProfiling, "web.enable-profiling", false,
		"serve Go's runtime profiles (CPU, heap, goroutines) under /debug/pprof/, as kube-proxy's enableProfiling does; behind --web.auth like every path")
	fs.StringVar(&o.LogLevel, "log.level", "info", "log level: debug, info, warn or error")
	fs.StringVar(&o.LogFormat, "log.format", "text", "log format: text or json")
	fs.DurationVar(&o.Horizon, "record.horizon", 10*time.Minute,
		"how long a terminating endpoint's record is kept; stages seen later are not joined")
	fs.IntVar(&o.MaxRecords, "record.max", 50000,
		"most endpoint records (and, separately, deleting pods) held at once; more are dropped and counted. Records of untrusted slices (see --record.max-untrusted) do not count")
	fs.IntVar(&o.MaxUntrustedRecords, "record.max-untrusted", collector.DefaultMaxUntrustedRecords,
		"most endpoint records (and the deleting pods they name) held at once that were started by EndpointSlices no trusted controller manages (see --kube.trusted-managers: anyone allowed to write slices in a namespace can make them up, with made-up pods), in a budget of their own that never takes a place --record.max keeps for the others; more are dropped and counted. A trusted slice showing the same endpoint terminating moves its record to --record.max")
	fs.IntVar(&o.MaxRecordsPerNamespace, "record.max-per-namespace", 25000,
		"most endpoint records of one namespace held at once, trusted or not, so that one namespace's burst (a mass deletion, or made-up slices) cannot starve the others; a record counts in the namespace of the EndpointSlice that started it, the pod's own for the endpointslice controller's; more are dropped and counted (0: no cap)")
	fs.DurationVar(&o.SweepInterval, "record.sweep-interval", 10*time.Second, "how often expired records are removed")
	fs.DurationVar(&o.PollInterval, "dataplane.poll-interval", time.Second,
		"how often sources without change events are read (IPVS, iptables legacy backend); also their precision")
	fs.StringVar(&o.KubeProxyURL, "dataplane.kube-proxy-url", probes.DefaultKubeProxyURL,
		"kube-proxy's metrics address, whose /proxyMode confirms which dataplane probe is active (empty: never ask; the kernel's evidence decides alone)")
	fs.DurationVar(&o.SyncTimeout, "probes.sync-timeout", 2*time.Minute,
		"how long /readyz waits for a probe other than kube to read its source; after that it is reported failed (and retried) and no longer holds readiness back")
	fs.DurationVar(&o.ShutdownTimeout, "shutdown-timeout", 10*time.Second,
		"how long SIGTERM/SIGINT waits for probes and in-flight requests before exiting")
	o.Push = aggregate.DefaultPushOptions()
	fs.StringSliceVar(&o.Push.URLs, "aggregator.urls", nil,
		"the aggregator (endpointlag aggregate) replicas to push settled records to, comma-separated, e.g. http://endpointlag-aggregate:9870 (https:// for one run with --web.auth=kubernetes or TLS, see --aggregator.token-file); each pod goes to one replica, by its UID (empty: push nothing)")
	fs.DurationVar(&o.Push.Interval, "aggregator.interval", o.Push.Interval, "how often settled records are pushed")
	fs.DurationVar(&o.Push.Heartbeat, "aggregator.heartbeat", o.Push.Heartbeat,
		"how often an empty push tells each replica this daemon is live when there is nothing to push")
	fs.DurationVar(&o.Push.SettleAfter, "aggregator.settle-after", o.Push.SettleAfter,
		"how old a record with stages still pending gets before it is pushed as it is")
	o.PushAuth.bind(fs, "aggregator.", "the aggregator")
	o.Probes = map[string]*bool{}
	for _, f := range probes.Registered() {
		o.Probes[f.Name] = fs.Bool("probe."+f.Name, f.DefaultEnabled, "run the "+f.Name+" probe: "+f.Help)
		if f.Flags != nil {
			f.Flags(fs)
		}
	}
}

// Validate reports every setting that is wrong, naming the flag.
func (o *Options) Validate() error {
	var errs []error
	if _, err := parseLevel(o.LogLevel); err != nil {
		errs = append(errs, err)
	}
	if o.LogFormat != "text" && o.LogFormat != "json" {
		errs = append(errs, fmt.Errorf("--log.format: %q is neither text nor json", o.LogFormat))
	}
	if _, _, err := net.SplitHostPort(o.ListenAddress); err != nil {
		errs = append(errs, fmt.Errorf("--web.listen-address: %w", err))
	}
	errs = append(errs, o.Web.Validate())
	if o.KubeProxyURL != "" {
		if u, err := url.Parse(o.KubeProxyURL); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			errs = append(errs, fmt.Errorf("--dataplane.kube-proxy-url: %q is not a URL like %s", o.KubeProxyURL, probes.DefaultKubeProxyURL))
		}
	}
	for name, d := range map[string]time.Duration{
		"--record.horizon": o.Horizon, "--record.sweep-interval": o.SweepInterval, "--shutdown-timeout": o.ShutdownTimeout,
		"--dataplane.poll-interval": o.PollInterval, "--probes.sync-timeout": o.SyncTimeout,
	} {
		if d <= 0 {
			errs = append(errs, fmt.Errorf("%s must be positive, got %s", name, d))
		}
	}
	if o.MaxRecords <= 0 {
		errs = append(errs, fmt.Errorf("--record.max must be positive, got %d", o.MaxRecords))
	}
	if o.MaxUntrustedRecords <= 0 {
		errs = append(errs, fmt.Errorf("--record.max-untrusted must be positive, got %d", o.MaxUntrustedRecords))
	}
	if o.MaxRecordsPerNamespace < 0 {
		errs = append(errs, fmt.Errorf("--record.max-per-namespace must not be negative (0: no cap), got %d", o.MaxRecordsPerNamespace))
	}
	enabled := o.enabled()
	if len(enabled) == 0 {
		errs = append(errs, errors.New("no probe enabled: set at least one --probe.<name>"))
	}
	for _, f := range enabled {
		if f.NeedsAPI && o.NodeName == "" {
			errs = append(errs, fmt.Errorf("--node-name (or NODE_NAME) is required by --probe.%s", f.Name))
		}
		if f.Validate != nil {
			errs = append(errs, f.Validate())
		}
	}
	if len(o.Push.URLs) > 0 {
		if err := o.Push.Validate(); err != nil {
			errs = append(errs, err)
		}
		errs = append(errs, o.PushAuth.validate(o.Push.URLs...))
		if o.NodeName == "" {
			errs = append(errs, errors.New("--node-name (or NODE_NAME) is required by --aggregator.urls: the aggregator joins records by node"))
		}
	}
	return errors.Join(errs...)
}

func (o *Options) enabled() []probes.Factory {
	var out []probes.Factory
	for _, f := range probes.Registered() {
		if on := o.Probes[f.Name]; on != nil && *on {
			out = append(out, f)
		}
	}
	return out
}

func parseLevel(s string) (slog.Level, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(s)); err != nil {
		return 0, fmt.Errorf("--log.level: %q is not one of debug, info, warn, error", s)
	}
	return l, nil
}

func newLogger(w io.Writer, level, format string) *slog.Logger {
	l, _ := parseLevel(level)
	opts := &slog.HandlerOptions{Level: l}
	if strings.EqualFold(format, "json") {
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(slog.NewTextHandler(w, opts))
}
