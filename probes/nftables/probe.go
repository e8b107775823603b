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
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/nftables"
	"k8s.io/utils/clock"

	"github.com/endpointlag/endpointlag/probes"
)

// Name is the probe's registry name and the source of its observations.
const Name = "nftables"

// tableName is the table kube-proxy's nftables mode owns, in families ip and ip6.
const tableName = "kube-proxy"

var families = []nftables.TableFamily{nftables.TableFamilyIPv4, nftables.TableFamilyIPv6}

func init() {
	probes.Register(probes.Factory{
		Name:           Name,
		Help:           "this node's kube-proxy rules in nftables mode (table kube-proxy), followed through the netlink monitor; inactive while the table is absent",
		DefaultEnabled: true,
		Stages:         []probes.Stage{probes.StageNftables},
		New: func(env probes.Env) (probes.Probe, error) {
			return New(env.Clock, env.Logger), nil
		},
	})
}

// Probe follows kube-proxy's nftables rules in the network namespace it runs in.
type Probe struct {
	clock clock.PassiveClock
	log   *slog.Logger
	// newConn opens a netlink connection; tests point it at a namespace.
	newConn func() (*nftables.Conn, error)

	mu sync.Mutex
	// state is what the rules do now; read by Snapshot.
	state map[probes.ServiceRef]map[probes.Endpoint]bool
	// generations counts the change batches handled.
	generations atomic.Int64
}

// New returns the probe for the current network namespace.
func New(clk clock.PassiveClock, log *slog.Logger) *Probe {
	return &Probe{clock: clk, log: log.With("probe", Name), newConn: func() (*nftables.Conn, error) { return nftables.New(nftables.AsLasting()) }}
}

// NewInNamespace returns the probe for the network namespace open as fd.
func NewInNamespace(fd int, clk clock.PassiveClock, log *slog.Logger) *Probe {
	p := New(clk, log)
	p.newConn = func() (*nftables.Conn, error) { return nftables.New(nftables.AsLasting(), nftables.WithNetNSFd(fd)) }
	return p
}

// Name implements probes.Probe.
func (p *Probe) Name() string { return Name }

// reader is the probe's view of the tables: every chain's parsed rules and the roots.
type reader struct {
	conn *nftables.Conn
	g    *graph
	// found is true while a kube-proxy table exists in some family.
	found bool
}

// Run implements probes.Probe.
func (p *Probe) Run(ctx context.Context, sink probes.Sink) error {
	sink.SetStatus(Name, probes.Status{})
	mon := nftables.NewMonitor(nftables.WithMonitorEventBuffer(4096))
	monConn, err := p.newConn()
	if err != nil {
		return fmt.Errorf("nftables: %w", err)
	}
	events, err := monConn.AddGenerationalMonitor(mon)
	if err != nil {
		return fmt.Errorf("nftables monitor: %w", err)
	}
	defer mon.Close()
	conn, err := p.newConn()
	if err != nil {
		return fmt.Errorf("nftables: %w", err)
	}
	rd := &reader{conn: conn}
	// The monitor runs before the first read, so no change falls between them.
	readErr := rd.resync()
	if readErr != nil {
		sink.Error(Name, readErr)
	}
	p.publish(rd, sink, time.Time{})
	active := rd.found
	// A failed first read (no CAP_NET_ADMIN, say) leaves the probe down; the next change retries.
	sink.SetStatus(Name, probes.Status{Up: readErr == nil, Synced: true, Inactive: !active})
	p.log.Info("synced", "services", len(p.state), "kube-proxy table", active)
	for {
		select {
		case <-ctx.Done():
			return nil
		case gen, ok := <-events:
			if !ok {
				return errors.New("nftables monitor closed")
			}
			now := p.clock.Now()
			if err := rd.apply(gen); err != nil {
				sink.Error(Name, err)
				if err := rd.resync(); err != nil {
					sink.Error(Name, err)
					continue
				}
			}
			if rd.found != active {
				active = rd.found
				p.log.Info("kube-proxy table", "present", active)
			}
			sink.SetStatus(Name, probes.Status{Up: true, Inactive: !active})
			p.publish(rd, sink, now)
			p.generations.Add(1)
		}
	}
}

// publish updates the endpoints of the Services the last changes touched and reports those no
// longer reachable; with a zero time it only records the state.
func (p *Probe) publish(rd *reader, sink probes.Sink, now time.Time) {
	changed := rd.g.update()
	p.mu.Lock()
	if p.state == nil {
		p.state = map[probes.ServiceRef]map[probes.Endpoint]bool{}
	}
	var removed []probes.Observation
	for svc := range changed {
		next := rd.g.service(svc)
		for ep := range p.state[svc] {
			if !next[ep] {
				removed = append(removed, probes.Observation{Stage: probes.StageNftables, Time: now, Source: Name, Service: svc, Endpoint: ep})
			}
		}
		if len(next) == 0 {
			delete(p.state, svc)
		} else {
			p.state[svc] = next
		}
	}
	p.mu.Unlock()
	if now.IsZero() {
		return
	}
	for _, o := range removed {
		sink.Observe(o)
	}
}

// Snapshot returns what the rules do now: per Service, the endpoints new connections can reach.
// Before Run has read the rules, it reads them once.
func (p *Probe) Snapshot() ([]probes.ServiceEndpoints, error) {
	p.mu.Lock()
	state := p.state
	p.mu.Unlock()
	var err error
	if state == nil {
		conn, cerr := p.newConn()
		if cerr != nil {
			return nil, cerr
		}
		rd := &reader{conn: conn}
		err = rd.resync()
		state = map[probes.ServiceRef]map[probes.Endpoint]bool{}
		for svc := range rd.g.update() {
			if eps := rd.g.service(svc); len(eps) > 0 {
				state[svc] = eps
			}
		}
	}
	out := make([]probes.ServiceEndpoints, 0, len(state))
	for svc, eps := range state {
		out = append(out, probes.ServiceEndpoints{Service: svc, Endpoints: probes.EndpointList(eps)})
	}
	probes.SortServiceEndpoints(out)
	return out, err
}

// resync reads both families' tables whole.
func (rd *reader) resync() error {
	// A new graph: every Service it holds is compared with the last state at the next publish,
	// and those the old graph had are marked changed too.
	old := rd.g
	rd.g = newGraph()
	if old != nil {
		for svc := range old.byService {
			rd.g.changed[svc] = true
		}
	}
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
			if err := rd.readChain(fam, c.Name); err != nil {
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

func table(fam nftables.TableFamily) *nftables.Table {
	return &nftables.Table{Name: tableName, Family: fam}
}

// readChain reads one chain's rules; a chain that is gone is dropped.
func (rd *reader) readChain(fam nftables.TableFamily, name string) error {
	t := table(fam)
	rules, err := rd.conn.GetRules(t, &nftables.Chain{Name: name, Table: t})
	if err != nil {
		if isNotFound(err) {
			rd.g.setChain(chainKey{fam, name}, nil)
			return nil
		}
		return fmt.Errorf("reading %s chain %s: %w", familyName(fam), name, err)
	}
	ci := &chainInfo{}
	sets := func(set string) ([]nftables.SetElement, error) { return rd.elements(t, set) }
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
	rd.g.setChain(chainKey{fam, name}, ci)
	return nil
}

func (rd *reader) elements(t *nftables.Table, name string) ([]nftables.SetElement, error) {
	s, err := rd.conn.GetSetByName(t, name)
	if err != nil {
		return nil, err
	}
	return rd.conn.GetSetElements(s)
}

// readRoots reads the service maps' targets.
func (rd *reader) readRoots(fam nftables.TableFamily) error {
	var roots []string
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
				roots = append(roots, chain)
			}
		}
	}
	rd.g.setRoots(fam, roots)
	return nil
}

// rootEvent is a service map element added or deleted.
type rootEvent struct {
	chain string
	add   bool
}

// apply re-reads what one generation of changes touched in the kube-proxy tables.
func (rd *reader) apply(gen *nftables.MonitorEvents) error {
	dirty := map[chainKey]bool{}
	var rootEvents []rootEvent
	rootsDirty := false
	for _, ev := range gen.Changes {
		if ev.Error != nil {
			return fmt.Errorf("nftables monitor: %w", ev.Error)
		}
		switch ev.Type {
		case nftables.MonitorEventTypeOOB:
			return errors.New("nftables monitor: out-of-band event (lost messages)")
		case nftables.MonitorEventTypeNewRule, nftables.MonitorEventTypeDelRule:
			if r, ok := ev.Data.(*nftables.Rule); ok && r.Table != nil && r.Table.Name == tableName && r.Chain != nil {
				dirty[chainKey{r.Table.Family, r.Chain.Name}] = true
			}
		case nftables.MonitorEventTypeNewChain, nftables.MonitorEventTypeDelChain:
			if c, ok := ev.Data.(*nftables.Chain); ok && c.Table != nil && c.Table.Name == tableName {
				if ev.Type == nftables.MonitorEventTypeDelChain {
					rd.g.setChain(chainKey{c.Table.Family, c.Name}, nil)
				} else {
					dirty[chainKey{c.Table.Family, c.Name}] = true
				}
			}
		case nftables.MonitorEventTypeNewSetElem, nftables.MonitorEventTypeDelSetElem:
			elems, _ := ev.Data.([]nftables.SetElement)
			for _, el := range elems {
				if len(el.Val) == 0 && el.VerdictData == nil {
					// No data to tell a map element from a set's: read the root maps.
					rootsDirty = true
					continue
				}
				chain, ok := elementTarget(el)
				if kind, _, svc := parseChainName(chain); ok && svc && kind != "endpoint" {
					rootEvents = append(rootEvents, rootEvent{chain, ev.Type == nftables.MonitorEventTypeNewSetElem})
				}
			}
		case nftables.MonitorEventTypeNewTable, nftables.MonitorEventTypeDelTable:
			if t, ok := ev.Data.(*nftables.Table); ok && t.Name == tableName {
				return rd.resync()
			}
		}
	}
	// Element messages do not say their table or family: an element pointing at a service or
	// external chain is a root of the family that has (or now gets) that chain. When both
	// families have it, the root maps are read again.
	for _, re := range rootEvents {
		var fams []nftables.TableFamily
		for _, fam := range families {
			k := chainKey{fam, re.chain}
			if _, ok := rd.g.chains[k]; ok || dirty[k] {
				fams = append(fams, fam)
			}
		}
		switch {
		case len(fams) != 1:
			rootsDirty = true
		case re.add:
			rd.g.addRoot(chainKey{fams[0], re.chain})
		default:
			rd.g.removeRoot(chainKey{fams[0], re.chain})
		}
	}
	var errs []error
	for k := range dirty {
		errs = append(errs, rd.readChain(k.family, k.name))
	}
	if rootsDirty {
		for _, fam := range families {
			errs = append(errs, rd.readRoots(fam))
		}
	}
	return errors.Join(errs...)
}
