// Package iptables observes this node's kube-proxy in iptables mode. It reads the nat table with
// iptables-save (KUBE-SERVICES / KUBE-NODEPORTS → KUBE-SVC-, SVL-, EXT- → KUBE-SEP- → DNAT) and
// works out which endpoints each Service's chains can still send new connections to. With the
// nf_tables backend (iptables-nft) it reads again on every change the nftables netlink monitor
// reports for the nat tables; the legacy backend has no events and is polled with jitter, the
// interval being the precision. An endpoint is removed (stage iptables) once no chain reachable
// from the entry chains sends to it.
package iptables

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os/exec"
	"sync"
	"time"

	"github.com/google/nftables"
	"k8s.io/utils/clock"

	"github.com/endpointlag/endpointlag/probes"
)

// Name is the probe's registry name and the source of its observations.
const Name = "iptables"

// Backend is how iptables keeps its rules.
type Backend string

// The backends.
const (
	BackendNFT    Backend = "nft"
	BackendLegacy Backend = "legacy"
)

// Options configure the probe.
type Options struct {
	// PollInterval is how often the legacy backend is read.
	PollInterval time.Duration
}

func init() {
	probes.Register(probes.Factory{
		Name:           Name,
		Help:           "this node's kube-proxy rules in iptables mode (nat table), nf_tables backend followed through the netlink monitor, legacy backend polled; inactive until KUBE-SERVICES exists",
		DefaultEnabled: true,
		Stages:         []probes.Stage{probes.StageIptables},
		New: func(env probes.Env) (probes.Probe, error) {
			return New(Options{PollInterval: env.PollInterval}, env.Clock, env.Logger), nil
		},
	})
}

// Probe follows kube-proxy's iptables rules in the network namespace it runs in.
type Probe struct {
	opts  Options
	clock clock.PassiveClock
	log   *slog.Logger
	// run executes a save command; tests replace it to run in another namespace.
	run func(ctx context.Context, name string, args ...string) ([]byte, error)
	// newConn opens a netlink connection for the monitor.
	newConn func() (*nftables.Conn, error)

	mu    sync.Mutex
	state map[string]*group
	reads int
}

// New returns the probe for the current network namespace.
func New(opts Options, clk clock.PassiveClock, log *slog.Logger) *Probe {
	if opts.PollInterval <= 0 {
		opts.PollInterval = time.Second
	}
	return &Probe{
		opts: opts, clock: clk, log: log.With("probe", Name),
		run: func(ctx context.Context, name string, args ...string) ([]byte, error) {
			return exec.CommandContext(ctx, name, args...).Output()
		},
		newConn: func() (*nftables.Conn, error) { return nftables.New() },
	}
}

// Name implements probes.Probe.
func (p *Probe) Name() string { return Name }

func saveCommands(b Backend) []string {
	return []string{"iptables-" + string(b) + "-save", "ip6tables-" + string(b) + "-save"}
}

// Detect tells which backend holds kube-proxy's rules (a KUBE-SERVICES chain in the nat table),
// or "" when neither does yet.
func (p *Probe) Detect(ctx context.Context) Backend {
	for _, b := range []Backend{BackendNFT, BackendLegacy} {
		out, err := p.run(ctx, saveCommands(b)[0], "-t", "nat")
		if err == nil && bytes.Contains(out, []byte("\n:KUBE-SERVICES ")) {
			return b
		}
	}
	return ""
}

// Snapshot reads the rules once and returns what each Service's chains send to.
func (p *Probe) Snapshot(ctx context.Context) ([]probes.ServiceEndpoints, error) {
	b := p.Detect(ctx)
	if b == "" {
		return []probes.ServiceEndpoints{}, nil
	}
	groups, err := p.readRules(ctx, b)
	out := make([]probes.ServiceEndpoints, 0, len(groups))
	for key, g := range groups {
		se := probes.ServiceEndpoints{Service: g.service, Endpoints: probes.EndpointList(g.endpoints)}
		if g.service.Name == "" {
			se.Chain = key
		}
		out = append(out, se)
	}
	probes.SortServiceEndpoints(out)
	return out, err
}

// readRules runs the save commands of backend b and returns what the rules do.
func (p *Probe) readRules(ctx context.Context, b Backend) (map[string]*group, error) {
	out := map[string]*group{}
	var errs []error
	for _, cmd := range saveCommands(b) {
		text, err := p.run(ctx, cmd, "-t", "nat")
		if err != nil {
			errs = append(errs, fmt.Errorf("%s -t nat: %w", cmd, err))
			continue
		}
		rules, err := parseSave(bytes.NewReader(text))
		if err != nil {
			errs = append(errs, fmt.Errorf("%s output: %w", cmd, err))
			continue
		}
		for k, g := range endpoints(rules) {
			if have := out[k]; have != nil {
				for ep := range g.endpoints {
					have.endpoints[ep] = true
				}
				continue
			}
			out[k] = g
		}
	}
	return out, errors.Join(errs...)
}

// Run implements probes.Probe.
func (p *Probe) Run(ctx context.Context, sink probes.Sink) error {
	// Until kube-proxy's chains show up, the probe has nothing to read and nothing is awaited.
	sink.SetStatus(Name, probes.Status{Up: true, Synced: true, Inactive: true})
	var backend Backend
	for backend = p.Detect(ctx); backend == ""; backend = p.Detect(ctx) {
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(jitter(p.opts.PollInterval)):
		}
	}
	p.log.Info("kube-proxy's iptables rules found", "backend", backend)
	var (
		trigger   <-chan time.Time
		events    chan *nftables.MonitorEvents
		precision time.Duration
	)
	if backend == BackendNFT {
		mon := nftables.NewMonitor(nftables.WithMonitorEventBuffer(4096))
		conn, err := p.newConn()
		if err != nil {
			return fmt.Errorf("iptables: %w", err)
		}
		if events, err = conn.AddGenerationalMonitor(mon); err != nil {
			return fmt.Errorf("iptables: nftables monitor: %w", err)
		}
		defer mon.Close()
	} else {
		precision = p.opts.PollInterval
	}
	p.read(ctx, sink, backend, time.Time{}, 0)
	sink.SetStatus(Name, probes.Status{Up: true, Synced: true})
	for {
		if backend == BackendLegacy {
			trigger = time.After(jitter(p.opts.PollInterval))
		}
		select {
		case <-ctx.Done():
			return nil
		case <-trigger:
			p.read(ctx, sink, backend, p.clock.Now(), precision)
		case gen, ok := <-events:
			if !ok {
				return errors.New("iptables: nftables monitor closed")
			}
			if touchesNat(gen) {
				p.read(ctx, sink, backend, p.clock.Now(), 0)
			}
		}
	}
}

// touchesNat reports whether a batch of nftables changes concerns a nat table (iptables-nft
// keeps iptables' tables as nftables tables of the same name); errors and lost messages count.
func touchesNat(gen *nftables.MonitorEvents) bool {
	for _, ev := range gen.Changes {
		if ev.Error != nil || ev.Type == nftables.MonitorEventTypeOOB {
			return true
		}
		switch d := ev.Data.(type) {
		case *nftables.Rule:
			if d.Table != nil && d.Table.Name == "nat" {
				return true
			}
		case *nftables.Chain:
			if d.Table != nil && d.Table.Name == "nat" {
				return true
			}
		case *nftables.Table:
			if d.Name == "nat" {
				return true
			}
		}
	}
	return false
}

// jitter spreads polls of many nodes: ±10 %.
func jitter(d time.Duration) time.Duration {
	return d - d/10 + rand.N(d/5+1)
}

// read reads the rules and reports the endpoints no longer reachable; with a zero time it only
// records the state.
func (p *Probe) read(ctx context.Context, sink probes.Sink, b Backend, now time.Time, precision time.Duration) {
	next, err := p.readRules(ctx, b)
	if err != nil {
		sink.Error(Name, err)
		if len(next) == 0 {
			return // keep the last good state rather than report everything removed
		}
	}
	p.mu.Lock()
	prev := p.state
	p.state = next
	p.reads++
	p.mu.Unlock()
	if now.IsZero() {
		return
	}
	for key, g := range prev {
		for ep := range g.endpoints {
			if n := next[key]; n == nil || !n.endpoints[ep] {
				sink.Observe(probes.Observation{Stage: probes.StageIptables, Time: now, Precision: precision, Source: Name, Service: g.service, Endpoint: ep})
			}
		}
	}
}
