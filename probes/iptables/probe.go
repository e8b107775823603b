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
	"log/slog"
	"maps"
	"math/rand/v2"
	"os/exec"
	"slices"
	"sync"
	"time"

	"github.com/google/nftables"
	"golang.org/x/sys/unix"
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
	for {
		select {
		case <-ctx.Done():
			return nil
		case gen, ok := <-mon.Generations:
			now := p.clock.Now()
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
			case gen.Err != nil:
				sink.Error(Name, gen.Err) // the monitor closes next
				continue
			case !rd.apply(gen):
				continue
			case rd.err != nil:
				// A rule that did not decode: read the tables whole again.
				sink.Error(Name, rd.err)
				if err := rd.resync(conn); err != nil {
					sink.Error(Name, err)
				}
			}
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

// reader is the probe's copy of the nat tables, per family: each chain's rules (by rule handle
// for the nf_tables backend), the roots the entry chains point at and the graph built from them.
//
// kube-proxy rewrites KUBE-SERVICES whole on every sync: at 10,000 Services, 10,000 rules deleted
// and 10,000 added, mostly the same. The entry chains are therefore kept as counts, per service
// chain, of the rules that jump to it, and only service chains whose counts changed reach the
// graph; an entry rule written again with the same expressions is not decoded again.
type reader struct {
	g      *rulegraph.Graph
	chains map[uint8]map[string]map[uint64]rule
	// entry counts, per family and service chain, the entry rules jumping to it under each root.
	entry map[uint8]map[string]map[rulegraph.Root]int
	// cache holds, per family, the entry rules by raw expressions, and handles the key of each
	// entry rule read from the monitor.
	cache   map[uint8]map[string]*cachedRule
	handles map[uint8]map[uint64]string
	// Changed since the last flush: chains, service chains whose entry counts moved, and cache
	// entries that may have lost their last rule.
	changed map[rulegraph.Key]bool
	touched map[rulegraph.Key]bool
	unused  []cacheKey
	// err is set by apply when the changes could not be followed.
	err error
}

type cachedRule struct {
	rule rule
	key  string
	refs int
}

type cacheKey struct {
	family uint8
	exprs  string
}

func newReader() *reader {
	return &reader{
		g: rulegraph.New(), chains: map[uint8]map[string]map[uint64]rule{}, entry: map[uint8]map[string]map[rulegraph.Root]int{},
		cache: map[uint8]map[string]*cachedRule{}, handles: map[uint8]map[uint64]string{},
		changed: map[rulegraph.Key]bool{}, touched: map[rulegraph.Key]bool{},
	}
}

// rootOf is the root an entry rule points at, if it jumps to a service chain: grouped by the
// Service its comment names or, without comments, by the chain itself.
func rootOf(r rule) (string, rulegraph.Root, bool) {
	if !r.jump || !serviceChain(r.target) {
		return "", rulegraph.Root{}, false
	}
	if svc, named := serviceFromComment(r.comment); named {
		return r.target, rulegraph.Root{Group: svc.String(), Service: svc}, true
	}
	return r.target, rulegraph.Root{Group: r.target}, true
}

// count adds (delta 1) or removes (-1) a rule of chain in family fam.
func (rd *reader) count(fam uint8, chain string, r rule, delta int) {
	if !slices.Contains(rootChains, chain) {
		rd.changed[rulegraph.Key{Family: fam, Chain: chain}] = true
		return
	}
	target, root, ok := rootOf(r)
	if !ok {
		return
	}
	if rd.entry[fam] == nil {
		rd.entry[fam] = map[string]map[rulegraph.Root]int{}
	}
	counts := rd.entry[fam][target]
	if counts == nil {
		counts = map[rulegraph.Root]int{}
		rd.entry[fam][target] = counts
	}
	if counts[root] += delta; counts[root] <= 0 {
		delete(counts, root)
		if len(counts) == 0 {
			delete(rd.entry[fam], target)
		}
	}
	rd.touched[rulegraph.Key{Family: fam, Chain: target}] = true
}

// preferred tells whether root a names the service chain's Service better than b: a root the
// rules name a Service for over one they do not, then the first Service by name, so that the
// choice does not depend on rule order.
func preferred(a, b rulegraph.Root) bool {
	if an, bn := a.Service.Name != "", b.Service.Name != ""; an != bn {
		return an
	}
	return a.Group < b.Group
}

// flush hands what changed since the last flush to the graph: the rules of changed chains, and
// for each service chain whose entry counts moved, its root (a named Service first) or none.
func (rd *reader) flush() {
	for k := range rd.changed {
		if slices.Contains(rootChains, k.Chain) {
			continue // not walked: its jumps are the roots
		}
		if rules, ok := rd.chains[k.Family][k.Chain]; ok {
			rd.g.SetChain(k, chainOf(ordered(rules)))
		} else {
			rd.g.SetChain(k, nil)
		}
	}
	clear(rd.changed)
	for k := range rd.touched {
		var (
			best  rulegraph.Root
			found bool
		)
		for root := range rd.entry[k.Family][k.Chain] {
			if !found || preferred(root, best) {
				best, found = root, true
			}
		}
		if found {
			rd.g.SetRoot(k, best)
		} else {
			rd.g.RemoveRoot(k)
		}
	}
	clear(rd.touched)
	for _, u := range rd.unused {
		if c := rd.cache[u.family][u.exprs]; c != nil && c.refs <= 0 {
			delete(rd.cache[u.family], u.exprs)
		}
	}
	rd.unused = rd.unused[:0]
}

// ordered lists a chain's rules in handle order, which is the order they were added.
func ordered(rules map[uint64]rule) []rule {
	handles := slices.Sorted(maps.Keys(rules))
	out := make([]rule, len(handles))
	for i, h := range handles {
		out[i] = rules[h]
	}
	return out
}

// numbered keys each chain's rules by their position, as handles do for the nf_tables backend.
func numbered(chains map[string][]rule) map[string]map[uint64]rule {
	out := make(map[string]map[uint64]rule, len(chains))
	for name, rules := range chains {
		byIndex := make(map[uint64]rule, len(rules))
		for i, r := range rules {
			byIndex[uint64(i)] = r
		}
		out[name] = byIndex
	}
	return out
}

// replace makes one family's tables what was read; only chains that differ reach the graph.
func (rd *reader) replace(fam uint8, next map[string]map[uint64]rule) {
	for name, rules := range rd.chains[fam] {
		if _, ok := next[name]; !ok {
			rd.changed[rulegraph.Key{Family: fam, Chain: name}] = true
		}
		for _, r := range rules {
			rd.count(fam, name, r, -1)
		}
	}
	for name, rules := range next {
		rd.changed[rulegraph.Key{Family: fam, Chain: name}] = true
		for _, r := range rules {
			rd.count(fam, name, r, 1)
		}
	}
	if next == nil {
		delete(rd.chains, fam)
	} else {
		rd.chains[fam] = next
	}
}

// resync reads both families' nat tables whole over netlink.
func (rd *reader) resync(conn *nftables.Conn) error {
	rd.err = nil
	// Rules are read by handle again: cached expressions would be matched to no handle.
	rd.cache = map[uint8]map[string]*cachedRule{}
	rd.handles = map[uint8]map[uint64]string{}
	rd.unused = nil
	var errs []error
	for _, fam := range families {
		next := map[string]map[uint64]rule{}
		chains, err := conn.ListChainsOfTableFamily(fam)
		if err != nil {
			errs = append(errs, fmt.Errorf("listing %s chains: %w", familyName(fam), err))
			continue
		}
		for _, c := range chains {
			if c.Table.Name != natTable {
				continue
			}
			rules, err := conn.GetRules(c.Table, c)
			if err != nil {
				errs = append(errs, fmt.Errorf("reading %s nat chain %s: %w", familyName(fam), c.Name, err))
				continue
			}
			byHandle := make(map[uint64]rule, len(rules))
			for _, r := range rules {
				byHandle[r.Handle] = ruleFromExprs(c.Name, r.Exprs).stored()
			}
			next[c.Name] = byHandle
		}
		rd.replace(uint8(fam), next)
	}
	rd.flush()
	return errors.Join(errs...)
}

// poll reads both families with iptables-legacy-save.
func (rd *reader) poll(ctx context.Context, run func(ctx context.Context, name string, args ...string) ([]byte, error)) error {
	var errs []error
	for i, fam := range families {
		text, err := run(ctx, legacySave[i], "-t", "nat")
		if err != nil {
			errs = append(errs, fmt.Errorf("%s -t nat: %w", legacySave[i], err))
			continue // keep the last good state rather than report everything removed
		}
		chains, err := parseSave(bytes.NewReader(text))
		if err != nil {
			errs = append(errs, fmt.Errorf("%s output: %w", legacySave[i], err))
			continue
		}
		rd.replace(uint8(fam), numbered(chains))
	}
	rd.flush()
	return errors.Join(errs...)
}

// apply follows one generation of nftables changes in the nat tables: rules added and deleted by
// handle, chains and tables created and deleted. It reports whether the generation touched them;
// a rule that does not decode sets rd.err.
func (rd *reader) apply(gen nfmon.RawGeneration) bool {
	touched := false
	defer rd.flush()
	for _, c := range gen.Changes {
		if c.Table != natTable || (c.Family != uint8(nftables.TableFamilyIPv4) && c.Family != uint8(nftables.TableFamilyIPv6)) {
			continue
		}
		touched = true
		if rd.chains[c.Family] == nil {
			rd.chains[c.Family] = map[string]map[uint64]rule{}
		}
		tab := rd.chains[c.Family]
		switch c.Type {
		case unix.NFT_MSG_NEWRULE:
			ru, err := rd.decode(c)
			if err != nil {
				rd.err = fmt.Errorf("%s nat chain %s, rule %d: %w", familyName(nftables.TableFamily(c.Family)), c.Chain, c.Handle, err)
				return true
			}
			if tab[c.Chain] == nil {
				tab[c.Chain] = map[uint64]rule{}
			}
			if old, ok := tab[c.Chain][c.Handle]; ok {
				rd.count(c.Family, c.Chain, old, -1)
			}
			tab[c.Chain][c.Handle] = ru
			rd.count(c.Family, c.Chain, ru, 1)
		case unix.NFT_MSG_DELRULE:
			if old, ok := tab[c.Chain][c.Handle]; ok {
				delete(tab[c.Chain], c.Handle)
				rd.count(c.Family, c.Chain, old, -1)
				rd.release(c.Family, c.Handle)
			}
		case unix.NFT_MSG_NEWCHAIN:
			if tab[c.Chain] == nil {
				tab[c.Chain] = map[uint64]rule{}
				rd.changed[rulegraph.Key{Family: c.Family, Chain: c.Chain}] = true
			}
		case unix.NFT_MSG_DELCHAIN:
			rd.dropChain(c.Family, c.Chain)
		case unix.NFT_MSG_DELTABLE:
			for name := range tab {
				rd.dropChain(c.Family, name)
			}
		}
	}
	return touched
}

// dropChain forgets a deleted chain and its rules.
func (rd *reader) dropChain(fam uint8, name string) {
	for h, r := range rd.chains[fam][name] {
		rd.count(fam, name, r, -1)
		rd.release(fam, h)
	}
	delete(rd.chains[fam], name)
	rd.changed[rulegraph.Key{Family: fam, Chain: name}] = true
}

// release drops a deleted entry rule's hold on its cached expressions.
func (rd *reader) release(fam uint8, handle uint64) {
	key, ok := rd.handles[fam][handle]
	if !ok {
		return
	}
	delete(rd.handles[fam], handle)
	if c := rd.cache[fam][key]; c != nil {
		if c.refs--; c.refs <= 0 {
			rd.unused = append(rd.unused, cacheKey{fam, key})
		}
	}
}

// decode reads a new rule. kube-proxy rewrites the entry chains whole on every sync, mostly with
// the rules they had: an entry rule whose expressions are byte for byte those of one the tables
// have, or had earlier in this generation, is not decoded again.
func (rd *reader) decode(c nfmon.RawChange) (rule, error) {
	entry := slices.Contains(rootChains, c.Chain)
	if entry {
		if cached, ok := rd.cache[c.Family][string(c.Exprs)]; ok {
			rd.hold(c, cached)
			return cached.rule, nil
		}
	}
	exprs, err := nfmon.DecodeExprs(c.Family, c.Exprs)
	if err != nil {
		return rule{}, err
	}
	ru := ruleFromExprs(c.Chain, exprs).stored()
	if entry {
		if rd.cache[c.Family] == nil {
			rd.cache[c.Family] = map[string]*cachedRule{}
			rd.handles[c.Family] = map[uint64]string{}
		}
		cached := &cachedRule{rule: ru, key: string(c.Exprs)}
		rd.cache[c.Family][cached.key] = cached
		rd.hold(c, cached)
	}
	return ru, nil
}

// hold records that an entry rule's handle has cached expressions.
func (rd *reader) hold(c nfmon.RawChange, cached *cachedRule) {
	rd.release(c.Family, c.Handle)
	rd.handles[c.Family][c.Handle] = cached.key
	cached.refs++
}

func familyName(f nftables.TableFamily) string {
	if f == nftables.TableFamilyIPv6 {
		return "ip6"
	}
	return "ip"
}
