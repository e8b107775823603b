package iptables

import (
	"bytes"
	"cmp"
	"context"
	"errors"
	"fmt"
	"slices"

	"github.com/google/nftables"
	"golang.org/x/sys/unix"

	"github.com/endpointlag/endpointlag/probes"
	"github.com/endpointlag/endpointlag/probes/internal/nfmon"
	"github.com/endpointlag/endpointlag/probes/internal/rulegraph"
)

// reader is the probe's copy of the nat tables, per family: each chain's rules (by rule handle
// for the nf_tables backend), the roots the entry chains point at and the graph built from them.
//
// kube-proxy rewrites KUBE-SERVICES whole on every sync: at 10,000 Services, 10,000 rules deleted
// and 10,000 added, mostly the same. The entry chains are therefore not rebuilt: each service
// chain counts the entry rules that jump to it, and reaches the graph only when its first rule
// arrives or its last leaves. An entry rule is decoded once and shared by every handle whose
// expressions are the same bytes, so a rule written again costs a map lookup.
type reader struct {
	g *rulegraph.Graph
	// chains holds the rules of every chain but the entry chains, entries those of the entry
	// chains.
	chains  map[uint8]map[string]chainRules
	entries map[uint8]map[string]map[uint64]*entryRule
	// targets are the service chains entry rules jump to; cache the entry rules read from the
	// monitor, by raw expressions.
	targets map[uint8]map[string]*target
	cache   map[uint8]map[string]*entryRule
	// Since the last flush: chains whose rules changed, targets whose counts moved, cached rules
	// that may have lost their last handle.
	changed map[rulegraph.Key]bool
	touched []*target
	unused  []*entryRule
	// err is set by apply when the changes could not be followed.
	err error
}

// entryRule is what an entry chain's rule points at: a service chain and the root it makes of
// it (ok false: neither).
type entryRule struct {
	family uint8
	target string
	root   rulegraph.Root
	ok     bool
	// cached is set for a rule read from the monitor: exprs is its cache key (empty for a rule
	// of no expressions) and refs counts its handles.
	cached bool
	exprs  string
	refs   int
	// t is the target's counter, looked up again once it is gone.
	t *target
}

// target counts the entry rules jumping to one service chain, per root they make of it.
type target struct {
	key   rulegraph.Key
	roots []rootCount
	// root is what the graph was last given (isRoot false: none).
	root    rulegraph.Root
	isRoot  bool
	touched bool
	gone    bool
}

type rootCount struct {
	root rulegraph.Root
	n    int
}

func newReader() *reader {
	return &reader{
		g: rulegraph.New(policy), chains: map[uint8]map[string]chainRules{}, entries: map[uint8]map[string]map[uint64]*entryRule{},
		targets: map[uint8]map[string]*target{}, cache: map[uint8]map[string]*entryRule{}, changed: map[rulegraph.Key]bool{},
	}
}

func isEntry(chain string) bool { return slices.Contains(rootChains, chain) }

// newEntryRule reads what an entry rule points at: a service chain, as a root grouped by the
// Service its comment names (or, without a comment, by the chain itself) and the path its traffic
// takes.
func newEntryRule(fam uint8, r rule) *entryRule {
	er := &entryRule{family: fam}
	path, ok := servicePath(r.target)
	if !r.jump || !ok {
		return er
	}
	svc, _ := serviceFromComment(r.comment)
	er.target, er.ok = r.target, true
	er.root = rulegraph.Root{Group: rulegraph.GroupKey(svc, r.target, path), Service: svc, Path: path}
	return er
}

// roots counts the service chains the entry chains jump to: kube-proxy's iptables mode writes
// one for every Service port with endpoints (the API server's own Service always has one); its
// IPVS mode, which also makes KUBE-SERVICES, writes none.
func (rd *reader) roots() int {
	n := 0
	for _, ts := range rd.targets {
		for _, t := range ts {
			if t.isRoot {
				n++
			}
		}
	}
	return n
}

// count adds (delta 1) or removes (-1) one rule's jump to its service chain.
func (rd *reader) count(er *entryRule, delta int) {
	if !er.ok {
		return
	}
	t := er.t
	if t == nil || t.gone {
		if rd.targets[er.family] == nil {
			rd.targets[er.family] = map[string]*target{}
		}
		if t = rd.targets[er.family][er.target]; t == nil {
			t = &target{key: rulegraph.Key{Family: er.family, Chain: er.target}}
			rd.targets[er.family][er.target] = t
		}
		er.t = t
	}
	i := slices.IndexFunc(t.roots, func(rc rootCount) bool { return rc.root == er.root })
	if i < 0 {
		i = len(t.roots)
		t.roots = append(t.roots, rootCount{root: er.root})
	}
	t.roots[i].n += delta
	if !t.touched {
		t.touched = true
		rd.touched = append(rd.touched, t)
	}
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
// the root of each service chain whose counts moved (a named Service first), or none.
func (rd *reader) flush() {
	for k := range rd.changed {
		if rules, ok := rd.chains[k.Family][k.Chain]; ok {
			rd.g.SetChain(k, chainOf(rules))
		} else {
			rd.g.SetChain(k, nil)
		}
	}
	clear(rd.changed)
	for _, t := range rd.touched {
		t.touched = false
		t.roots = slices.DeleteFunc(t.roots, func(rc rootCount) bool { return rc.n <= 0 })
		var best rulegraph.Root
		for i, rc := range t.roots {
			if i == 0 || preferred(rc.root, best) {
				best = rc.root
			}
		}
		switch {
		case len(t.roots) == 0:
			if t.isRoot {
				rd.g.RemoveRoot(t.key)
			}
			delete(rd.targets[t.key.Family], t.key.Chain)
			t.gone = true
		case !t.isRoot || t.root != best:
			rd.g.SetRoot(t.key, best)
			t.root, t.isRoot = best, true
		}
	}
	rd.touched = rd.touched[:0]
	for _, er := range rd.unused {
		if er.refs <= 0 && rd.cache[er.family][er.exprs] == er {
			delete(rd.cache[er.family], er.exprs)
		}
	}
	rd.unused = rd.unused[:0]
}

// chainRules is a chain's rules in handle order, which is the order they were added. A slice,
// not a map by handle: most chains hold two or three rules (every KUBE-SEP- chain two), and a map
// of two takes 1,072 bytes of heap where the slice takes 224 (BenchmarkChainOfTwoRules); at
// 2,000 Services those maps were most of the daemon's heap.
type chainRules []handleRule

type handleRule struct {
	handle uint64
	rule   rule
}

func (c chainRules) find(h uint64) (int, bool) {
	return slices.BinarySearchFunc(c, h, func(r handleRule, h uint64) int { return cmp.Compare(r.handle, h) })
}

// with returns the chain with rule r at handle h, added or replacing the rule there.
func (c chainRules) with(h uint64, r rule) chainRules {
	i, ok := c.find(h)
	if ok {
		c[i].rule = r
		return c
	}
	return slices.Insert(c, i, handleRule{h, r})
}

// without returns the chain without the rule at handle h, and whether there was one.
func (c chainRules) without(h uint64) (chainRules, bool) {
	i, ok := c.find(h)
	if !ok {
		return c, false
	}
	return slices.Delete(c, i, i+1), true
}

// byHandle makes a chain of rules read with their handles, in any order.
func byHandle(rules []handleRule) chainRules {
	c := chainRules(rules)
	slices.SortFunc(c, func(a, b handleRule) int { return cmp.Compare(a.handle, b.handle) })
	return c
}

// numbered keys each chain's rules by their position, as handles do for the nf_tables backend.
func numbered(chains map[string][]rule) map[string]chainRules {
	out := make(map[string]chainRules, len(chains))
	for name, rules := range chains {
		c := make(chainRules, len(rules))
		for i, r := range rules {
			c[i] = handleRule{uint64(i), r}
		}
		out[name] = c
	}
	return out
}

// replace makes one family's tables what was read (entry chains' rules with their comments);
// only chains that differ reach the graph.
func (rd *reader) replace(fam uint8, next map[string]chainRules) {
	for name := range rd.chains[fam] {
		if _, ok := next[name]; !ok {
			rd.changed[rulegraph.Key{Family: fam, Chain: name}] = true
		}
	}
	for _, rules := range rd.entries[fam] {
		for _, er := range rules {
			rd.count(er, -1)
		}
	}
	chains := map[string]chainRules{}
	entries := map[string]map[uint64]*entryRule{}
	for name, rules := range next {
		if !isEntry(name) {
			chains[name] = rules
			rd.changed[rulegraph.Key{Family: fam, Chain: name}] = true
			continue
		}
		ers := make(map[uint64]*entryRule, len(rules))
		for _, hr := range rules {
			er := newEntryRule(fam, hr.rule)
			rd.count(er, 1)
			ers[hr.handle] = er
		}
		entries[name] = ers
	}
	rd.chains[fam], rd.entries[fam] = chains, entries
}

// resync reads both families' nat tables whole over netlink.
func (rd *reader) resync(conn *nftables.Conn) (err error) {
	defer probes.Recover(&err)
	rd.err = nil
	// Rules are read by handle again, decoded by google/nftables.
	rd.cache = map[uint8]map[string]*entryRule{}
	var errs []error
	for _, fam := range families {
		next := map[string]chainRules{}
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
			read := make([]handleRule, len(rules))
			for i, r := range rules {
				read[i] = handleRule{r.Handle, ruleFromExprs(c.Name, r.Exprs).stored()}
			}
			next[c.Name] = byHandle(read)
		}
		rd.replace(uint8(fam), next)
	}
	rd.flush()
	return errors.Join(errs...)
}

// poll reads both families with iptables-legacy-save.
func (rd *reader) poll(ctx context.Context, run func(ctx context.Context, name string, args ...string) ([]byte, error)) (err error) {
	defer probes.Recover(&err)
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

// apply follows nftables changes in the nat tables, up to the next flush: rules added and deleted
// by handle, chains and tables created and deleted. It reports whether they touched the nat
// tables; a rule that does not decode (or a decoder's panic) sets rd.err, after which changes are
// skipped until a resync.
func (rd *reader) apply(changes []nfmon.RawChange) bool {
	touched, err := rd.follow(changes)
	if err != nil {
		rd.err = err
		return true
	}
	return touched
}

func (rd *reader) follow(changes []nfmon.RawChange) (touched bool, err error) {
	defer probes.Recover(&err)
	for _, c := range changes {
		if c.Table != natTable || (c.Family != uint8(nftables.TableFamilyIPv4) && c.Family != uint8(nftables.TableFamilyIPv6)) {
			continue
		}
		touched = true
		if rd.err != nil {
			continue
		}
		if err := rd.applyOne(c); err != nil {
			return true, fmt.Errorf("%s nat chain %s, rule %d: %w", familyName(nftables.TableFamily(c.Family)), c.Chain, c.Handle, err)
		}
	}
	return touched, nil
}

func (rd *reader) applyOne(c nfmon.RawChange) error {
	fam := c.Family
	if rd.chains[fam] == nil {
		rd.chains[fam] = map[string]chainRules{}
		rd.entries[fam] = map[string]map[uint64]*entryRule{}
	}
	entry := isEntry(c.Chain)
	switch c.Type {
	case unix.NFT_MSG_NEWRULE:
		if entry {
			er, err := rd.entryRule(c)
			if err != nil {
				return err
			}
			rules := rd.entries[fam][c.Chain]
			if rules == nil {
				rules = map[uint64]*entryRule{}
				rd.entries[fam][c.Chain] = rules
			}
			if old := rules[c.Handle]; old != nil {
				rd.drop(old)
			}
			rules[c.Handle] = er
			rd.count(er, 1)
			return nil
		}
		exprs, err := nfmon.DecodeExprs(fam, c.Exprs)
		if err != nil {
			return err
		}
		rd.chains[fam][c.Chain] = rd.chains[fam][c.Chain].with(c.Handle, ruleFromExprs(c.Chain, exprs).stored())
		rd.changed[rulegraph.Key{Family: fam, Chain: c.Chain}] = true
	case unix.NFT_MSG_DELRULE:
		if entry {
			if er := rd.entries[fam][c.Chain][c.Handle]; er != nil {
				delete(rd.entries[fam][c.Chain], c.Handle)
				rd.drop(er)
			}
			return nil
		}
		if rules, ok := rd.chains[fam][c.Chain]; ok {
			if rules, ok = rules.without(c.Handle); ok {
				rd.chains[fam][c.Chain] = rules
				rd.changed[rulegraph.Key{Family: fam, Chain: c.Chain}] = true
			}
		}
	case unix.NFT_MSG_NEWCHAIN:
		if entry {
			if rd.entries[fam][c.Chain] == nil {
				rd.entries[fam][c.Chain] = map[uint64]*entryRule{}
			}
		} else if _, ok := rd.chains[fam][c.Chain]; !ok {
			rd.chains[fam][c.Chain] = nil
			rd.changed[rulegraph.Key{Family: fam, Chain: c.Chain}] = true
		}
	case unix.NFT_MSG_DELCHAIN:
		rd.dropChain(fam, c.Chain)
	case unix.NFT_MSG_DELTABLE:
		for name := range rd.chains[fam] {
			rd.dropChain(fam, name)
		}
		for name := range rd.entries[fam] {
			rd.dropChain(fam, name)
		}
	}
	return nil
}

// dropChain forgets a deleted chain and its rules.
func (rd *reader) dropChain(fam uint8, name string) {
	if isEntry(name) {
		for _, er := range rd.entries[fam][name] {
			rd.drop(er)
		}
		delete(rd.entries[fam], name)
		return
	}
	delete(rd.chains[fam], name)
	rd.changed[rulegraph.Key{Family: fam, Chain: name}] = true
}

// drop uncounts an entry rule that left its chain; cached expressions no handle has any more are
// forgotten at the flush.
func (rd *reader) drop(er *entryRule) {
	rd.count(er, -1)
	if !er.cached {
		return
	}
	if er.refs--; er.refs <= 0 {
		rd.unused = append(rd.unused, er)
	}
}

// entryRule reads a new entry rule, decoding its expressions only when no rule the tables have,
// or had earlier in this generation, has the very same bytes.
func (rd *reader) entryRule(c nfmon.RawChange) (*entryRule, error) {
	if er, ok := rd.cache[c.Family][string(c.Exprs)]; ok {
		er.refs++
		return er, nil
	}
	exprs, err := nfmon.DecodeExprs(c.Family, c.Exprs)
	if err != nil {
		return nil, err
	}
	er := newEntryRule(c.Family, ruleFromExprs(c.Chain, exprs))
	er.cached, er.exprs, er.refs = true, string(c.Exprs), 1
	if rd.cache[c.Family] == nil {
		rd.cache[c.Family] = map[string]*entryRule{}
	}
	rd.cache[c.Family][er.exprs] = er
	return er, nil
}
