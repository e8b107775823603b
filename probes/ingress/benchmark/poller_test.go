package benchmark

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"os/signal"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"k8s.io/utils/clock"

	"github.com/endpointlag/endpointlag/probes"
	"github.com/endpointlag/endpointlag/probes/ingress"
	// The kinds the pollers read.
	_ "github.com/endpointlag/endpointlag/probes/ingress/haproxy"
	_ "github.com/endpointlag/endpointlag/probes/ingress/traefik"
)

// A poller is the ingress probe reading one proxy instance in a process of its own (this test
// binary, run with pollerEnv set), so that its CPU time is its own. It learns what it owes from
// its stdin ("owe 127.0.0.1:20001"), prints each removal it observes as a JSON line, and at EOF
// prints how many reads it made and exits.
const pollerEnv = "ENDPOINTLAG_BENCH_POLLER"

type pollerConfig struct {
	Kind    string        `json:"kind"`
	Address string        `json:"address"`
	Slow    time.Duration `json:"slow"`
	Fast    time.Duration `json:"fast"`
}

// pollerEvent is one line a poller prints.
type pollerEvent struct {
	Synced    bool          `json:"synced,omitempty"`
	Endpoint  string        `json:"endpoint,omitempty"`
	Time      time.Time     `json:"time"`
	Precision time.Duration `json:"precision,omitempty"`
	Full      int64         `json:"full,omitempty"`
	Targeted  int64         `json:"targeted,omitempty"`
	Errors    int64         `json:"errors,omitempty"`
}

// countingKind registers, for a kind, one whose readers count their reads.
func countingKind(name string, full, targeted *atomic.Int64) string {
	k, err := ingress.Lookup(name)
	if err != nil {
		panic(err)
	}
	counted := "counted-" + name
	ingress.Register(ingress.Kind{Name: counted, DefaultPort: k.DefaultPort, Scheme: k.Scheme, MinInterval: k.MinInterval,
		New: func(t ingress.Target) (ingress.Reader, error) {
			r, err := k.New(t)
			if err != nil {
				return nil, err
			}
			return &countingReader{r: r, full: full, targeted: targeted}, nil
		}})
	return counted
}

type countingReader struct {
	r              ingress.Reader
	full, targeted *atomic.Int64
}

func (c *countingReader) Read(ctx context.Context) ([]ingress.Backend, error) {
	c.full.Add(1)
	return c.r.Read(ctx)
}

func (c *countingReader) ReadBackends(ctx context.Context, names []string) ([]ingress.Backend, bool, error) {
	c.targeted.Add(1)
	return c.r.ReadBackends(ctx, names)
}

// owed is the pollers' stand-in for the collector: the endpoints announced on stdin and not yet
// observed removed.
type owed struct {
	instance string
	mu       sync.Mutex
	eps      map[probes.Endpoint]bool
	notify   []chan<- struct{}
}

func (o *owed) Pending(probes.Stage) map[string][]probes.Endpoint {
	o.mu.Lock()
	defer o.mu.Unlock()
	return map[string][]probes.Endpoint{o.instance: probes.EndpointList(o.eps)}
}

func (o *owed) NotifyPending(ch chan<- struct{}) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.notify = append(o.notify, ch)
}

func (o *owed) set(ep probes.Endpoint, on bool) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if on {
		o.eps[ep] = true
	} else {
		delete(o.eps, ep)
	}
	for _, ch := range o.notify {
		select {
		case ch <- struct{}{}:
		default:
		}
	}
}

// printer is the pollers' sink: observations go to stdout as JSON lines.
type printer struct {
	mu     sync.Mutex
	enc    *json.Encoder
	owed   *owed
	errors atomic.Int64
}

func (p *printer) emit(e pollerEvent) {
	p.mu.Lock()
	defer p.mu.Unlock()
	_ = p.enc.Encode(e)
}

func (p *printer) Observe(o probes.Observation) {
	p.owed.set(o.Endpoint, false)
	p.emit(pollerEvent{Endpoint: netip.AddrPortFrom(o.Endpoint.Addr, o.Endpoint.Port).String(), Time: o.Time, Precision: o.Precision})
}

func (p *printer) SetStatus(_ string, s probes.Status) {
	if s.Synced {
		p.emit(pollerEvent{Synced: true, Time: time.Now()})
	}
}

func (p *printer) Error(_ string, err error) {
	p.errors.Add(1)
	fmt.Fprintln(os.Stderr, "poller:", err)
}

func runPoller(spec string) int {
	var cfg pollerConfig
	if err := json.Unmarshal([]byte(spec), &cfg); err != nil {
		fmt.Fprintf(os.Stderr, "%s: %v\n", pollerEnv, err)
		return 2
	}
	signal.Ignore(syscall.SIGINT)
	var full, targeted atomic.Int64
	kind := countingKind(cfg.Kind, &full, &targeted)
	instance := kind + "=" + cfg.Address
	o := &owed{instance: instance, eps: map[probes.Endpoint]bool{}}
	out := &printer{enc: json.NewEncoder(os.Stdout), owed: o}
	opts := ingress.DefaultOptions()
	opts.Instances = []string{instance}
	opts.Slow, opts.Fast = cfg.Slow, cfg.Fast
	opts.Timeout = 5 * time.Second
	p := ingress.New(opts, nil, "bench", o, clock.RealClock{}, slog.New(slog.NewTextHandler(io.Discard, nil)))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx, out) }()

	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		var verb, addr string
		if _, err := fmt.Sscan(in.Text(), &verb, &addr); err != nil || verb != "owe" {
			fmt.Fprintf(os.Stderr, "poller: %q is not \"owe ip:port\"\n", in.Text())
			continue
		}
		ap, err := netip.ParseAddrPort(addr)
		if err != nil {
			fmt.Fprintf(os.Stderr, "poller: %v\n", err)
			continue
		}
		o.set(probes.Endpoint{Addr: ap.Addr(), Port: ap.Port(), Protocol: "TCP"}, true)
	}
	cancel()
	if err := <-done; err != nil {
		fmt.Fprintln(os.Stderr, "poller:", err)
	}
	out.emit(pollerEvent{Time: time.Now(), Full: full.Load(), Targeted: targeted.Load(), Errors: out.errors.Load()})
	return 0
}
