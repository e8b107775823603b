// Package iptables observes this node's kube-proxy in iptables mode and works out, from the nat
// table (KUBE-SERVICES / KUBE-NODEPORTS → KUBE-SVC-, SVL-, EXT- → KUBE-SEP- → DNAT), which
// endpoints each Service's chains can still send new connections to. With the nf_tables backend
// (iptables-nft) it reads the nat tables over netlink once and then follows every rule the
// nftables netlink monitor reports added or deleted, re-walking only the Services a change
// touches. The legacy backend has no events: it is read with iptables-legacy-save, polled with
// jitter, the interval being the precision. An endpoint is removed (stage iptables) once no chain
// reachable from the entry chains sends to it.
package iptables

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os/exec"
	"sync"
	"time"

	"github.com/google/nftables"
	"k8s.io/utils/clock"

	"github.com/endpointlag/endpointlag/probes"
	"github.com/endpointlag/endpointlag/probes/internal/nfmon"
	"github.com/endpointlag/endpointlag/probes/internal/rulegraph"
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
		Help:           "this node's kube-proxy rules in iptables mode (nat table): nf_tables backend read over netlink and followed through the monitor, legacy backend polled with iptables-legacy-save; inactive until KUBE-SERVICES exists",
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
	// run executes a legacy save command; tests replace it to run in another namespace.
	run func(ctx context.Context, name string, args ...string) ([]byte, error)
	// netns names the network namespace (none: the current one), nsfd too (-1: the current one).
	netns []nftables.ConnOption
	nsfd  int

	mu sync.Mutex
	// state is what the rules do now, per Service (or service chain); read by Snapshot.
	state map[string]rulegraph.Reached
	reads int
}

// New returns the probe for the current network namespace.
func New(opts Options, clk clock.PassiveClock, log *slog.Logger) *Probe {
	if opts.PollInterval <= 0 {
		opts.PollInterval = time.Second
	}
	return &Probe{
		opts: opts, clock: clk, log: log.With("probe", Name), nsfd: -1,
		run: func(ctx context.Context, name string, args ...string) ([]byte, error) {
			return exec.CommandContext(ctx, name, args...).Output()
		},
	}
}

// conn opens a netlink connection for reading, kept open across requests.
func (p *Probe) conn() (*nftables.Conn, error) {
	return nftables.New(append([]nftables.ConnOption{nftables.AsLasting()}, p.netns...)...)
}

// Name implements probes.Probe.
func (p *Probe) Name() string { return Name }

var legacySave = []string{"iptables-legacy-save", "ip6tables-legacy-save"}

// Detect tells which backend holds kube-proxy's rules (a KUBE-SERVICES chain in the nat table),
// or "" when neither does yet.
func (p *Probe) Detect(ctx context.Context) Backend {
	if conn, err := p.conn(); err == nil {
		defer func() { _ = conn.CloseLasting() }()
		for _, fam := range families {
			chains, err := conn.ListChainsOfTableFamily(fam)
			if err != nil {
				continue
			}
			for _, c := range chains {
				if c.Table.Name == natTable && c.Name == rootChains[0] {
					return BackendNFT
				}
			}
		}
	}
	out, err := p.run(ctx, legacySave[0], "-t", "nat")
	if err == nil && bytes.Contains(out, []byte("\n:"+rootChains[0]+" ")) {
		return BackendLegacy
	}
	return ""
}

// Snapshot returns what the rules do now: per Service, the endpoints new connections can reach.
// Before Run has read the rules, it reads them once.
func (p *Probe) Snapshot(ctx context.Context) ([]probes.ServiceEndpoints, error) {
	p.mu.Lock()
	if p.state != nil {
		defer p.mu.Unlock()
		return rulegraph.Snapshot(p.state), nil
	}
	p.mu.Unlock()
	rd := newReader()
	var err error
	switch p.Detect(ctx) {
	case BackendNFT:
		var conn *nftables.Conn
		if conn, err = p.conn(); err != nil {
			return nil, err
		}
		defer func() { _ = conn.CloseLasting() }()
		err = rd.resync(conn)
	case BackendLegacy:
		err = rd.poll(ctx, p.run)
	}
	state := map[string]rulegraph.Reached{}
	rd.g.Publish(state)
	return rulegraph.Snapshot(state), err
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
	if backend == BackendLegacy {
		return p.runLegacy(ctx, sink)
	}
	return p.runNFT(ctx, sink)
}

func (p *Probe) runNFT(ctx context.Context, sink probes.Sink) error {
	mon, err := nfmon.OpenRaw(p.nsfd)
	if err != nil {
		return fmt.Errorf("iptables: %w", err)
	}
	defer func() { mon.Close() }()
	conn, err := p.conn()
	if err != nil {
		return fmt.Errorf("iptables: %w", err)
	}
	defer func() { _ = conn.CloseLasting() }()
	rd := newReader()
	// The monitor runs before the first read, so no change falls between them.
	if err := rd.resync(conn); err != nil {
		sink.Error(Name, err)
	}
	p.publish(rd, sink, time.Time{}, 0)
	sink.SetStatus(Name, probes.Status{Up: true, Synced: true})
	// touched tells whether the parts of the generation applied so far changed the nat tables.
	touched := false
	for {
		select {
		case <-ctx.Done():
			return nil
		case gen, ok := <-mon.Generations:
			switch {
			case !ok:
				// The monitor closed after an error (lost messages): open another and read the
				// tables whole.
				mon.Close()
				if mon = nfmon.ReopenRaw(ctx, func(err error) { sink.Error(Name, err) }, p.nsfd); mon == nil {
					return nil
				}
				if err := rd.resync(conn); err != nil {
					sink.Error(Name, err)
				}
				touched = false
				p.publish(rd, sink, p.clock.Now(), 0)
				continue
			case gen.Err != nil:
				sink.Error(Name, gen.Err) // the monitor closes next
				continue
			}
			// A large generation is applied part by part as the kernel sends it; what it changed
			// is handed on, and timestamped, when its last part arrives.
			touched = rd.apply(gen.Changes) || touched
			if gen.Partial {
				continue
			}
			now := p.clock.Now()
			if !touched {
				continue
			}
			touched = false
			if rd.err != nil {
				// A rule that did not decode: read the tables whole again.
				sink.Error(Name, rd.err)
				if err := rd.resync(conn); err != nil {
					sink.Error(Name, err)
				}
			}
			rd.flush()
			p.publish(rd, sink, now, 0)
		}
	}
}

func (p *Probe) runLegacy(ctx context.Context, sink probes.Sink) error {
	rd := newReader()
	if err := rd.poll(ctx, p.run); err != nil {
		sink.Error(Name, err)
	}
	p.publish(rd, sink, time.Time{}, 0)
	sink.SetStatus(Name, probes.Status{Up: true, Synced: true})
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(jitter(p.opts.PollInterval)):
			now := p.clock.Now()
			if err := rd.poll(ctx, p.run); err != nil {
				sink.Error(Name, err)
			}
			p.publish(rd, sink, now, p.opts.PollInterval)
		}
	}
}

// jitter spreads polls of many nodes: ±10 %.
func jitter(d time.Duration) time.Duration {
	return d - d/10 + rand.N(d/5+1)
}

// publish brings the state up to date and reports the endpoints no longer reachable; with a zero
// time it only records the state.
func (p *Probe) publish(rd *reader, sink probes.Sink, now time.Time, precision time.Duration) {
	p.mu.Lock()
	if p.state == nil {
		p.state = map[string]rulegraph.Reached{}
	}
	removed := rd.g.Publish(p.state)
	p.reads++
	p.mu.Unlock()
	if now.IsZero() {
		return
	}
	for _, r := range removed {
		sink.Observe(probes.Observation{Stage: probes.StageIptables, Time: now, Precision: precision, Source: Name, Service: r.Service, Endpoint: r.Endpoint})
	}
}

func familyName(f nftables.TableFamily) string {
	if f == nftables.TableFamilyIPv6 {
		return "ip6"
	}
	return "ip"
}
