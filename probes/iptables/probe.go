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
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"os/exec"
	"slices"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/google/nftables"
	"k8s.io/utils/clock"

	"github.com/endpointlag/endpointlag/probes"
	"github.com/endpointlag/endpointlag/probes/internal/inns"
	"github.com/endpointlag/endpointlag/probes/internal/nfmon"
	"github.com/endpointlag/endpointlag/probes/internal/poll"
	"github.com/endpointlag/endpointlag/probes/internal/proxymode"
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
		Help:           "this node's kube-proxy rules in iptables mode (nat table): nf_tables backend read over netlink and followed through the monitor, legacy backend polled with iptables-legacy-save; inactive until KUBE-SERVICES jumps to a service chain (IPVS mode makes KUBE-SERVICES too, but no service chain) and while kube-proxy's /proxyMode names another mode",
		DefaultEnabled: true,
		Stages:         []probes.Stage{probes.StageIptables},
		New: func(env probes.Env) (probes.Probe, error) {
			p := New(Options{PollInterval: env.PollInterval}, env.Clock, env.Logger)
			p.KubeProxy = proxymode.Asker{URL: env.KubeProxyURL}
			return p, nil
		},
	})
}

// Probe follows kube-proxy's iptables rules in the network namespace it runs in.
type Probe struct {
	opts  Options
	clock clock.PassiveClock
	log   *slog.Logger
	// KubeProxy is asked for kube-proxy's mode when service chains appear.
	KubeProxy proxymode.Asker
	// run executes a legacy save command; tests replace it to run in another namespace.
	run func(ctx context.Context, name string, args ...string) ([]byte, error)
	// legacyNAT tells whether the legacy backend has a nat table; tests that fake run fake it too.
	legacyNAT func() (bool, error)
	// netns names the network namespace (none: the current one), nsfd too (-1: the current one).
	netns []nftables.ConnOption
	nsfd  int

	// store is what the rules do now, per Service (or service chain) and path; reads counts the
	// reads published (tests wait on it).
	store rulegraph.Store
	reads atomic.Int64
}

// New returns the probe for the current network namespace.
func New(opts Options, clk clock.PassiveClock, log *slog.Logger) *Probe {
	if opts.PollInterval <= 0 {
		opts.PollInterval = time.Second
	}
	p := &Probe{
		opts: opts, clock: clk, log: log.With("probe", Name), nsfd: -1,
		run: func(ctx context.Context, name string, args ...string) ([]byte, error) {
			return exec.CommandContext(ctx, name, args...).Output()
		},
	}
	p.legacyNAT = p.hasLegacyNAT
	return p
}

// hasLegacyNAT tells whether the legacy backend holds a nat table in the probe's namespace: the
// kernel lists a namespace's x_tables tables in /proc/net/ip_tables_names once they exist, and
// without a nat table iptables-legacy-save has nothing to show. Detect asks every poll interval
// on a node whose kube-proxy is in nftables mode: a read of that list where the save is a fork
// and an exec.
func (p *Probe) hasLegacyNAT() (bool, error) {
	var names []byte
	err := inns.Do(p.nsfd, func() error {
		var err error
		names, err = os.ReadFile("/proc/thread-self/net/ip_tables_names")
		return err
	})
	switch {
	case errors.Is(err, fs.ErrNotExist): // ip_tables is not loaded: no legacy table at all
		return false, nil
	case err != nil:
		return false, err
	}
	return slices.Contains(strings.Fields(string(names)), natTable), nil
}

// conn opens a netlink connection for reading, kept open across requests.
func (p *Probe) conn() (*nftables.Conn, error) {
	return nftables.New(append([]nftables.ConnOption{nftables.AsLasting()}, p.netns...)...)
}

// Name implements probes.Probe.
func (p *Probe) Name() string { return Name }

var legacySave = []string{"iptables-legacy-save", "ip6tables-legacy-save"}

// Detect tells which backend holds a KUBE-SERVICES chain in the nat table, or "" when neither
// does yet. An error says a backend could not be read (no CAP_NET_ADMIN, say): that is not the
// same as kube-proxy being absent.
func (p *Probe) Detect(ctx context.Context) (Backend, error) {
	var errs []error
	conn, err := p.conn()
	if err != nil {
		errs = append(errs, fmt.Errorf("netlink: %w", err))
	} else {
		defer func() { _ = conn.CloseLasting() }()
		for _, fam := range families {
			found, err := hasChain(conn, fam, natTable, rootChains[0])
			if err != nil {
				errs = append(errs, fmt.Errorf("looking for %s's %s chain: %w", familyName(fam), rootChains[0], err))
				continue
			}
			if found {
				return BackendNFT, nil
			}
		}
	}
	// The list of tables is only a shortcut: when it cannot be read, the save tells.
	if nat, err := p.legacyNAT(); err == nil && !nat {
		return "", errors.Join(errs...)
	}
	out, err := p.run(ctx, legacySave[0], "-t", "nat")
	switch {
	case err == nil && bytes.Contains(out, []byte("\n:"+rootChains[0]+" ")):
		return BackendLegacy, nil
	case err != nil && !errors.Is(err, exec.ErrNotFound):
		errs = append(errs, fmt.Errorf("%s -t nat: %w", legacySave[0], err))
	}
	return "", errors.Join(errs...)
}

// hasChain tells whether family's table holds chain, asking for that chain alone: the probe
// asks every poll interval until kube-proxy's chains show up, and on a node whose kube-proxy
// runs in nftables mode a listing of every chain is a listing of its whole table (over 100,000
// chains at 10,000 Services; it cost 38 % of the daemon's CPU there, docs/benchmarks.md).
func hasChain(conn *nftables.Conn, family nftables.TableFamily, table, chain string) (bool, error) {
	tables, err := conn.ListTablesOfFamily(family)
	if err != nil {
		return false, err
	}
	if !slices.ContainsFunc(tables, func(t *nftables.Table) bool { return t.Name == table }) {
		return false, nil
	}
	_, err = conn.ListChain(&nftables.Table{Name: table, Family: family}, chain)
	switch {
	case err == nil:
		return true, nil
	// google/nftables wraps the kernel's answer with %v: its ENOENT is only in the text.
	case strings.Contains(err.Error(), syscall.ENOENT.Error()):
		return false, nil
	}
	return false, err
}

// Snapshot returns what the rules do now: per Service and path, the endpoints new connections can
// reach. Before Run has read the rules, it reads them once.
func (p *Probe) Snapshot(ctx context.Context) ([]probes.ServiceEndpoints, error) {
	if snap, ok := p.store.Snapshot(); ok {
		return snap, nil
	}
	rd := newReader()
	backend, err := p.Detect(ctx)
	switch backend {
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
	state := rulegraph.NewState()
	rd.g.Publish(state)
	return state.Snapshot(), err
}

// Reaches implements probes.Dataplane.
func (p *Probe) Reaches(svc probes.ServiceRef, ep probes.Endpoint) ([]probes.Reach, bool) {
	return p.store.Reaches(svc, ep)
}

// Run implements probes.Probe.
func (p *Probe) Run(ctx context.Context, sink probes.Sink) error {
	// Until kube-proxy's chains show up, the probe has nothing to read and nothing is awaited.
	sink.SetStatus(Name, probes.Status{Up: true, Synced: true, Inactive: true})
	var (
		backend  Backend
		reported string
		wait     = poll.Backoff{Interval: p.opts.PollInterval}
	)
	for {
		b, err := p.Detect(ctx)
		if b != "" {
			backend = b
			break
		}
		// A failure to read is reported when it starts or changes, not at every poll.
		if msg := fmt.Sprint(err); err != nil && msg != reported {
			sink.Error(Name, err)
			reported = msg
		} else if err == nil && reported != "" {
			sink.SetStatus(Name, probes.Status{Up: true, Synced: true, Inactive: true})
			reported = ""
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(poll.Jitter(wait.Next(true))):
		}
	}
	p.log.Info("kube-proxy's iptables rules found", "backend", backend)
	a := &activity{probe: p, sink: sink}
	if backend == BackendLegacy {
		return p.runLegacy(ctx, a)
	}
	return p.runNFT(ctx, a)
}

// activity decides whether the node runs kube-proxy in iptables mode, after every read: only
// that mode makes the entry chains jump to service chains, and kube-proxy, where it can be asked,
// must not name another mode. It reports the probe's status with the answer.
type activity struct {
	probe    *Probe
	sink     probes.Sink
	evidence bool
	active   bool
}

func (a *activity) report(ctx context.Context, rd *reader) {
	if evidence := rd.roots() > 0; evidence != a.evidence {
		a.evidence = evidence
		a.active = evidence
		if other := a.probe.KubeProxy.Disagrees(ctx, Name); evidence && other != "" {
			a.active = false
			a.probe.log.Info("kube-proxy's service chains exist, but kube-proxy runs in another mode: inactive", "mode", other)
		}
		a.probe.log.Info("kube-proxy's service chains", "present", evidence, "active", a.active)
	}
	a.sink.SetStatus(Name, probes.Status{Up: true, Synced: true, Inactive: !a.active})
}

func (p *Probe) runNFT(ctx context.Context, a *activity) error {
	sink := a.sink
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
	p.publish(rd, sink, p.store.Start(rd.g, p.clock.Now()))
	a.report(ctx, rd)
	// last is when the last generation was read: messages lost after it make a gap that long.
	last := p.clock.Now()
	defer func() { p.store.Stop(last) }()
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
				// tables whole. What changed meanwhile happened since the last generation read.
				mon.Close()
				if mon = nfmon.ReopenRaw(ctx, func(err error) { sink.Error(Name, err) }, p.nsfd); mon == nil {
					return nil
				}
				if err := rd.resync(conn); err != nil {
					sink.Error(Name, err)
					continue
				}
				touched = false
				now := p.clock.Now()
				p.publish(rd, sink, rulegraph.When{Time: now, Precision: now.Sub(last), Relist: true})
				last = now
				a.report(ctx, rd)
				continue
			case gen.Err != nil:
				sink.Error(Name, gen.Err) // the monitor closes next
				continue
			}
			// A large generation is applied part by part as the kernel sends it; what it changed
			// is handed on when its last part arrives, timestamped when that was read.
			touched = rd.apply(gen.Changes) || touched
			if gen.Partial {
				continue
			}
			last = gen.Time
			if !touched {
				continue
			}
			touched = false
			at := rulegraph.When{Time: gen.Time}
			if rd.err != nil {
				// A rule that did not decode: the generation is known, its content not. Read
				// the tables whole again.
				sink.Error(Name, rd.err)
				if err := rd.resync(conn); err != nil {
					sink.Error(Name, err)
				}
				at.Precision = p.clock.Now().Sub(gen.Time)
			}
			rd.flush()
			p.publish(rd, sink, at)
			a.report(ctx, rd)
		}
	}
}

func (p *Probe) runLegacy(ctx context.Context, a *activity) error {
	sink := a.sink
	rd := newReader()
	if err := rd.poll(ctx, p.run); err != nil {
		sink.Error(Name, err)
	}
	p.publish(rd, sink, p.store.Start(rd.g, p.clock.Now()))
	a.report(ctx, rd)
	defer func() { p.store.Stop(p.clock.Now()) }()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(poll.Jitter(p.opts.PollInterval)):
			now := p.clock.Now()
			if err := rd.poll(ctx, p.run); err != nil {
				sink.Error(Name, err)
				continue
			}
			p.publish(rd, sink, rulegraph.When{Time: now, Precision: p.opts.PollInterval})
			a.report(ctx, rd)
		}
	}
}

// publish brings the state up to date and reports the endpoints no longer reachable; with a zero
// time it only records the state.
func (p *Probe) publish(rd *reader, sink probes.Sink, at rulegraph.When) {
	removed := p.store.Publish(rd.g)
	p.reads.Add(1)
	for _, o := range rulegraph.Observations(probes.StageIptables, Name, at, removed) {
		sink.Observe(o)
	}
}

func familyName(f nftables.TableFamily) string {
	if f == nftables.TableFamilyIPv6 {
		return "ip6"
	}
	return "ip"
}
