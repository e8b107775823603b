// Package nftables observes this node's kube-proxy in nftables mode: it reads table kube-proxy
// (ip and ip6) over netlink, works out which endpoints each Service's chains can still DNAT new
// connections to, and follows kube-proxy's changes through the nftables netlink monitor. An
// endpoint is removed (stage nftables) once no live service chain reaches it; chains no longer
// reachable from kube-proxy's service maps are stale and reach nothing.
package nftables

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync/atomic"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
	"k8s.io/utils/clock"

	"github.com/endpointlag/endpointlag/probes"
	"github.com/endpointlag/endpointlag/probes/internal/nfmon"
	"github.com/endpointlag/endpointlag/probes/internal/proxymode"
	"github.com/endpointlag/endpointlag/probes/internal/rulegraph"
)

// Name is the probe's registry name and the source of its observations.
const Name = "nftables"

// tableName is the table kube-proxy's nftables mode owns, in families ip and ip6.
const tableName = "kube-proxy"

var families = []nftables.TableFamily{nftables.TableFamilyIPv4, nftables.TableFamilyIPv6}

func init() {
	probes.Register(probes.Factory{
		Name:           Name,
		Help:           "this node's kube-proxy rules in nftables mode (table kube-proxy), followed through the netlink monitor; inactive while the table is absent or kube-proxy's /proxyMode names another mode",
		DefaultEnabled: true,
		Stages:         []probes.Stage{probes.StageNftables},
		New: func(env probes.Env) (probes.Probe, error) {
			p := New(env.Clock, env.Logger)
			p.KubeProxy = proxymode.Asker{URL: env.KubeProxyURL}
			return p, nil
		},
	})
}

// Probe follows kube-proxy's nftables rules in the network namespace it runs in.
type Probe struct {
	clock clock.PassiveClock
	log   *slog.Logger
	// netns names the network namespace (none: the current one), nsfd too (-1: the current one).
	netns []nftables.ConnOption
	nsfd  int
	// KubeProxy is asked for kube-proxy's mode when the table appears.
	KubeProxy proxymode.Asker

	// store is what the rules do now, per Service and path.
	store rulegraph.Store
	// generations counts the change batches handled, setReads the sets read back over netlink.
	generations atomic.Int64
	setReads    atomic.Int64
	// beforeApply, when set (tests), runs as each generation starts being applied.
	beforeApply func(changes []nfmon.RawChange)
}

// New returns the probe for the current network namespace.
func New(clk clock.PassiveClock, log *slog.Logger) *Probe {
	return &Probe{clock: clk, log: log.With("probe", Name), nsfd: -1}
}

// NewInNamespace returns the probe for the network namespace open as fd.
func NewInNamespace(fd int, clk clock.PassiveClock, log *slog.Logger) *Probe {
	p := New(clk, log)
	p.netns = []nftables.ConnOption{nftables.WithNetNSFd(fd)}
	p.nsfd = fd
	return p
}

// conn opens a netlink connection for reading, kept open across requests.
func (p *Probe) conn() (*nftables.Conn, error) {
	return nftables.New(append([]nftables.ConnOption{nftables.AsLasting()}, p.netns...)...)
}

// Name implements probes.Probe.
func (p *Probe) Name() string { return Name }

// reader is the probe's view of the tables: every chain's parsed rules and the roots.
type reader struct {
	conn *nftables.Conn
	// setReads, when set, counts the sets read over netlink.
	setReads *atomic.Int64
	g        *rulegraph.Graph
	// found is true while a kube-proxy table exists in some family.
	found bool
	// beforeApply is the probe's test hook.
	beforeApply func(changes []nfmon.RawChange)
}

// Run implements probes.Probe.
func (p *Probe) Run(ctx context.Context, sink probes.Sink) error {
	sink.SetStatus(Name, probes.Status{})
	mon, err := nfmon.OpenRaw(p.nsfd)
	if err != nil {
		return fmt.Errorf("nftables: %w", err)
	}
	defer func() { mon.Close() }()
	conn, err := p.conn()
	if err != nil {
		return fmt.Errorf("nftables: %w", err)
	}
	defer func() { _ = conn.CloseLasting() }()
	rd := &reader{conn: conn, setReads: &p.setReads, beforeApply: p.beforeApply}
	// The monitor runs before the first read, so no change falls between them.
	readErr := rd.resync()
	if readErr != nil {
		sink.Error(Name, readErr)
	}
	p.publish(rd, sink, p.store.Start(rd.g, p.clock.Now()))
	found := rd.found
	active := p.active(ctx, found)
	// A failed first read (no CAP_NET_ADMIN, say) leaves the probe down; the next change retries.
	sink.SetStatus(Name, probes.Status{Up: readErr == nil, Synced: true, Inactive: !active})
	p.log.Info("synced", "services", p.services(), "kube-proxy table", found, "active", active)
	// last is when the last generation was read: messages lost after it make a gap that long.
	last := p.clock.Now()
	defer func() { p.store.Stop(last) }()
	// pending are the parts of a large generation received so far.
	var pending []nfmon.RawChange
	for {
		select {
		case <-ctx.Done():
			return nil
		case gen, ok := <-mon.Generations:
			if ok && gen.Err == nil && gen.Partial {
				pending = append(pending, gen.Changes...)
				continue
			}
			if pending != nil {
				gen.Changes, pending = append(pending, gen.Changes...), nil
			}
			var at rulegraph.When
			switch {
			case !ok:
				// The monitor closed after an error (lost messages), which was reported: open
				// another and read the tables whole. What changed meanwhile happened since the
				// last generation read.
				mon.Close()
				if mon = nfmon.ReopenRaw(ctx, func(err error) { sink.Error(Name, err) }, p.nsfd); mon == nil {
					return nil
				}
				if err := rd.resync(); err != nil {
					sink.Error(Name, err)
					continue
				}
				now := p.clock.Now()
				at = rulegraph.When{Time: now, Precision: now.Sub(last), Relist: true}
			case gen.Err != nil:
				sink.Error(Name, gen.Err) // the monitor closes next
				continue
			default:
				at = rulegraph.When{Time: gen.Time}
				if err := rd.apply(gen.Changes); err != nil {
					// The generation is known, its content not: read the tables whole.
					sink.Error(Name, err)
					if err := rd.resync(); err != nil {
						sink.Error(Name, err)
						continue
					}
					at.Precision = p.clock.Now().Sub(gen.Time)
				}
			}
			last = at.Time
			if rd.found != found {
				found = rd.found
				active = p.active(ctx, found)
				p.log.Info("kube-proxy table", "present", found, "active", active)
			}
			sink.SetStatus(Name, probes.Status{Up: true, Inactive: !active})
			p.publish(rd, sink, at)
			p.generations.Add(1)
		}
	}
}

// active decides whether the node runs kube-proxy in nftables mode: its table exists (no other mode
// makes one) and kube-proxy, where it can be asked, does not name another mode.
func (p *Probe) active(ctx context.Context, found bool) bool {
	if !found {
		return false
	}
	if other := p.KubeProxy.Disagrees(ctx, Name); other != "" {
		p.log.Info("a kube-proxy table exists, but kube-proxy runs in another mode: inactive", "mode", other)
		return false
	}
	return true
}

func (p *Probe) services() int { return p.store.Len() }

// publish updates the endpoints of the Services the last changes touched and reports those no
// longer reachable; with a zero time it only records the state.
func (p *Probe) publish(rd *reader, sink probes.Sink, at rulegraph.When) {
	for _, o := range rulegraph.Observations(probes.StageNftables, Name, at, p.store.Publish(rd.g)) {
		sink.Observe(o)
	}
}

// Reaches implements probes.Dataplane.
func (p *Probe) Reaches(svc probes.ServiceRef, ep probes.Endpoint) ([]probes.Reach, bool) {
	return p.store.Reaches(svc, ep)
}

// Snapshot returns what the rules do now: per Service and path, the endpoints new connections can
// reach. Before Run has read the rules, it reads them once.
func (p *Probe) Snapshot() ([]probes.ServiceEndpoints, error) {
	if snap, ok := p.store.Snapshot(); ok {
		return snap, nil
	}
	conn, err := p.conn()
	if err != nil {
		return nil, err
	}
	defer func() { _ = conn.CloseLasting() }()
	rd := &reader{conn: conn}
	err = rd.resync()
	state := rulegraph.NewState()
	rd.g.Publish(state)
	return state.Snapshot(), err
}

// resync reads both families' tables whole.
func (rd *reader) resync() (err error) {
	defer probes.Recover(&err)
	// Every Service the graph held and every Service it holds after the read is compared with
	// the last state at the next publish.
	if rd.g == nil {
		rd.g = rulegraph.New(policy)
	}
	rd.g.Reset()
	rd.found = false
	var errs []error
	for _, fam := range families {
		chains, err := rd.conn.ListChainsOfTableFamily(fam)
		if err != nil {
			errs = append(errs, fmt.Errorf("listing %s chains: %w", familyName(fam), err))
			continue
		}
		found := false
		for _, c := range chains {
			if c.Table.Name != tableName {
				continue
			}
			found = true
			if err := rd.readChain(fam, c.Name, nil); err != nil {
				errs = append(errs, err)
			}
		}
		if found {
			rd.found = true
			if err := rd.readRoots(fam); err != nil {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}

func key(fam nftables.TableFamily, chain string) rulegraph.Key {
	return rulegraph.Key{Family: uint8(fam), Chain: chain}
}

func table(fam nftables.TableFamily) *nftables.Table {
	return &nftables.Table{Name: tableName, Family: fam}
}

// freshSets are the sets a generation created, by family and name, with the elements it added:
// kube-proxy writes a service chain's DNAT map as an anonymous set in the same transaction as the
// rule, so the probe need not read it back.
type freshSets map[setKey][]nftables.SetElement

type setKey struct {
	family uint8
	name   string
}

// readChain reads one chain's rules (their sets from fresh when there, else over netlink); a chain
// that is gone is dropped.
func (rd *reader) readChain(fam nftables.TableFamily, name string, fresh freshSets) error {
	t := table(fam)
	rules, err := rd.conn.GetRules(t, &nftables.Chain{Name: name, Table: t})
	if err != nil {
		if isNotFound(err) {
			rd.g.SetChain(key(fam, name), nil)
			return nil
		}
		return fmt.Errorf("reading %s chain %s: %w", familyName(fam), name, err)
	}
	ci := &rulegraph.Chain{}
	sets := func(set string) ([]nftables.SetElement, error) {
		if elems, ok := fresh[setKey{uint8(fam), set}]; ok {
			return elems, nil
		}
		return rd.elements(t, set)
	}
	for _, r := range rules {
		if err := evalRule(r, sets, ci); err != nil {
			if isNotFound(err) {
				// The rule's anonymous map went with a newer rewrite of the chain; the next
				// generation event brings the chain again.
				continue
			}
			return fmt.Errorf("%s chain %s: %w", familyName(fam), name, err)
		}
	}
	rd.g.SetChain(key(fam, name), ci)
	return nil
}

func (rd *reader) elements(t *nftables.Table, name string) ([]nftables.SetElement, error) {
	if rd.setReads != nil {
		rd.setReads.Add(1)
	}
	s, err := rd.conn.GetSetByName(t, name)
	if err != nil {
		return nil, err
	}
	return rd.conn.GetSetElements(s)
}

// readRoots reads the service maps' targets.
func (rd *reader) readRoots(fam nftables.TableFamily) error {
	var names []string
	for _, m := range rootMaps {
		elems, err := rd.elements(table(fam), m)
		if err != nil {
			if isNotFound(err) {
				continue
			}
			return fmt.Errorf("reading %s map %s: %w", familyName(fam), m, err)
		}
		for _, el := range elems {
			if chain, ok := elementTarget(el); ok {
				names = append(names, chain)
			}
		}
	}
	rd.g.SetRoots(uint8(fam), roots(names))
	return nil
}

// setElement is an element as google/nftables reads it back.
func setElement(el nfmon.RawElement) nftables.SetElement {
	out := nftables.SetElement{Key: el.Key, Val: el.Value}
	if el.Verdict {
		out.VerdictData = &expr.Verdict{Kind: expr.VerdictAccept}
		if el.Jump {
			out.VerdictData = &expr.Verdict{Kind: expr.VerdictJump, Chain: el.Chain}
		}
	}
	return out
}

// apply re-reads what one generation of changes touched in the kube-proxy tables: the chains
// whose rules changed, and the service maps' elements as roots.
func (rd *reader) apply(changes []nfmon.RawChange) (err error) {
	defer probes.Recover(&err)
	if rd.beforeApply != nil {
		rd.beforeApply(changes)
	}
	dirty := map[rulegraph.Key]bool{}
	rootsDirty := map[uint8]bool{}
	fresh := freshSets{}
	for _, c := range changes {
		if c.Table != tableName {
			continue
		}
		k := rulegraph.Key{Family: c.Family, Chain: c.Chain}
		switch c.Type {
		case unix.NFT_MSG_NEWSET:
			fresh[setKey{c.Family, c.Set}] = []nftables.SetElement{}
		case unix.NFT_MSG_DELSET:
			delete(fresh, setKey{c.Family, c.Set})
		case unix.NFT_MSG_NEWRULE, unix.NFT_MSG_DELRULE, unix.NFT_MSG_NEWCHAIN:
			dirty[k] = true
		case unix.NFT_MSG_DELCHAIN:
			delete(dirty, k)
			rd.g.SetChain(k, nil)
		case unix.NFT_MSG_NEWSETELEM, unix.NFT_MSG_DELSETELEM:
			sk := setKey{c.Family, c.Set}
			if elems, ok := fresh[sk]; ok {
				if c.Type == unix.NFT_MSG_DELSETELEM {
					delete(fresh, sk) // not as created: read it back
					continue
				}
				for _, el := range c.Elements {
					elems = append(elems, setElement(el))
				}
				fresh[sk] = elems
				continue
			}
			if !slices.Contains(rootMaps, c.Set) {
				continue
			}
			for _, el := range c.Elements {
				if !el.Verdict {
					// No data to tell where the element pointed: read the root maps.
					rootsDirty[c.Family] = true
					continue
				}
				r, ok := root(el.Chain)
				if !el.Jump || !ok {
					continue
				}
				rk := rulegraph.Key{Family: c.Family, Chain: el.Chain}
				if c.Type == unix.NFT_MSG_DELSETELEM {
					rd.g.RemoveRoot(rk)
					continue
				}
				rd.g.SetRoot(rk, r)
			}
		case unix.NFT_MSG_NEWTABLE, unix.NFT_MSG_DELTABLE:
			return rd.resync()
		}
	}
	var errs []error
	for k := range dirty {
		errs = append(errs, rd.readChain(nftables.TableFamily(k.Family), k.Chain, fresh))
	}
	for fam := range rootsDirty {
		errs = append(errs, rd.readRoots(nftables.TableFamily(fam)))
	}
	return errors.Join(errs...)
}
