package e2e

import (
	"errors"
	"fmt"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/endpointlag/endpointlag/lab/internal/ns"
)

// ruleMonitor is the test's own record of a node's kube-proxy rules: it runs `nft -a monitor` in the
// node's namespace, timestamps every line as it arrives, and replays them on a text model of the
// table — chains' rules by handle, the service-ips map's elements — to tell, after each committed
// generation, whether the rules send a Service's ClusterIP traffic to an endpoint. It shares no
// code with the daemon: it reads what the nft command prints.
type ruleMonitor struct {
	lines *lineProcess
	table string // "kube-proxy" (nftables mode) or "nat" (iptables mode, nf_tables backend)
	// start is the table as listed when the monitor started.
	start *nftState
	mu    sync.Mutex
	seen  []ruleLine
}

type ruleLine struct {
	at   time.Time
	line string
}

func startRuleMonitor(tool, netns, mode string) (*ruleMonitor, error) {
	table := "kube-proxy"
	if mode == "iptables" {
		table = "nat"
	}
	// Line-buffered: piped, nft would hold lines in its stdio buffer and the times would come late.
	// Real-time scheduled (SCHED_FIFO, the lowest priority): on the busy 2-core lab machine a
	// normally scheduled nft printed a change over 20 ms after the daemon had seen it. Each line
	// is timed by `lab stamp`, real-time scheduled with it, as it reads it: timed here, in the
	// test process, lines came over 20 ms late on a loaded machine.
	cmd := ns.Command(netns, "chrt", "--fifo", "1", tool, "stamp", "--", "stdbuf", "-oL", "nft", "-a", "monitor")
	m := &ruleMonitor{table: table}
	lines, err := startLines(cmd, func(at time.Time, line string) {
		m.mu.Lock()
		m.seen = append(m.seen, ruleLine{at, line})
		m.mu.Unlock()
	})
	if err != nil {
		return nil, fmt.Errorf("nft monitor in %s: %w", netns, err)
	}
	m.lines = lines
	// Listed after the monitor started: a change in between is both in the listing and among the
	// lines, and replaying it again changes nothing.
	listing, err := ns.Command(netns, "nft", "-a", "list", "table", "ip", table).Output()
	if err != nil {
		return nil, errors.Join(fmt.Errorf("nft list in %s: %w", netns, err), m.lines.stop())
	}
	m.start = parseListing(table, string(listing))
	return m, nil
}

func (m *ruleMonitor) stop(t testing.TB) {
	if err := m.lines.stop(); err != nil {
		t.Error(err)
	}
}

// replay applies the monitor's lines to a copy of the starting state and calls f after each
// generation with the generation's time, until f returns false. A generation's time is when its
// first line arrived: the kernel sends a transaction's notifications at once when it commits,
// and nft prints the generation's end only after formatting every line of it (tens of
// milliseconds for a large iptables-restore).
func (m *ruleMonitor) replay(f func(at time.Time, st *nftState) bool) {
	m.mu.Lock()
	lines := append([]ruleLine(nil), m.seen...)
	m.mu.Unlock()
	st := m.start.clone()
	if !f(time.Time{}, st) {
		return
	}
	var first time.Time
	for _, l := range lines {
		if strings.HasPrefix(l.line, "# new generation") {
			if first.IsZero() {
				first = l.at
			}
			if !f(first, st) {
				return
			}
			first = time.Time{}
			continue
		}
		if first.IsZero() {
			first = l.at
		}
		st.apply(l.line)
	}
}

// target is a Service port as the rules know it (its ClusterIP and port) and one of its endpoints.
type target struct {
	vip      string
	vipPort  int
	endpoint string // ip:port
}

// reaches tells whether the rules send the Service port's ClusterIP traffic to the endpoint now.
func (m *ruleMonitor) reaches(t target) bool {
	var now bool
	m.replay(func(_ time.Time, st *nftState) bool {
		now = st.reaches(t)
		return true
	})
	return now
}

// removedAt returns the time of the first generation after since after which the rules no longer
// send the Service's ClusterIP traffic to the endpoint, and whether they did at since (if not,
// there was nothing to remove on this node).
func (m *ruleMonitor) removedAt(t target, since time.Time) (at time.Time, reachedAtSince, removed bool) {
	m.replay(func(gen time.Time, st *nftState) bool {
		r := st.reaches(t)
		if gen.IsZero() || gen.Before(since) {
			reachedAtSince = r
			return true
		}
		if reachedAtSince && !r {
			at, removed = gen, true
			return false
		}
		return true
	})
	return at, reachedAtSince, removed
}

// nftState is the text model of one table: rules per chain by handle, elements per map by key.
type nftState struct {
	table string
	rules map[string]map[string]string
	elems map[string]map[string]string
}

func newState(table string) *nftState {
	return &nftState{table: table, rules: map[string]map[string]string{}, elems: map[string]map[string]string{}}
}

func (st *nftState) clone() *nftState {
	c := newState(st.table)
	for ch, rs := range st.rules {
		c.rules[ch] = map[string]string{}
		for h, r := range rs {
			c.rules[ch][h] = r
		}
	}
	for mp, es := range st.elems {
		c.elems[mp] = map[string]string{}
		for k, v := range es {
			c.elems[mp][k] = v
		}
	}
	return c
}

var handleSuffix = regexp.MustCompile(`\s*# handle (\d+)$`)

// apply replays one monitor line of the state's table.
func (st *nftState) apply(line string) {
	prefix := func(verb string) (string, bool) { return strings.CutPrefix(line, verb+" ip "+st.table+" ") }
	if rest, ok := prefix("add rule"); ok {
		chain, text, _ := strings.Cut(rest, " ")
		// "add rule ip nat CHAIN handle N ..." inserts after rule N; the new rule's own handle
		// is the one at the end.
		if after, ok := strings.CutPrefix(text, "handle "); ok {
			_, text, _ = strings.Cut(after, " ")
		}
		m := handleSuffix.FindStringSubmatch(text)
		if m == nil {
			return
		}
		if st.rules[chain] == nil {
			st.rules[chain] = map[string]string{}
		}
		st.rules[chain][m[1]] = strings.TrimSpace(handleSuffix.ReplaceAllString(text, ""))
		return
	}
	if rest, ok := prefix("delete rule"); ok {
		chain, text, _ := strings.Cut(rest, " ")
		if h, ok := strings.CutPrefix(text, "handle "); ok {
			delete(st.rules[chain], strings.TrimSpace(h))
		}
		return
	}
	if rest, ok := prefix("delete chain"); ok {
		chain, _, _ := strings.Cut(rest, " ")
		delete(st.rules, chain)
		return
	}
	for _, verb := range []string{"add element", "delete element"} {
		if rest, ok := prefix(verb); ok {
			mp, body, _ := strings.Cut(rest, " ")
			for k, v := range parseElements(body) {
				if st.elems[mp] == nil {
					st.elems[mp] = map[string]string{}
				}
				if verb == "add element" {
					st.elems[mp][k] = v
				} else {
					delete(st.elems[mp], k)
				}
			}
			return
		}
	}
	if _, ok := prefix("delete table"); ok {
		*st = *newState(st.table)
	}
}

// parseElements reads "{ k1 : v1, k2 : v2 }" (a set's elements have no value).
func parseElements(body string) map[string]string {
	body = strings.TrimSpace(body)
	body = strings.TrimSuffix(strings.TrimPrefix(body, "{"), "}")
	out := map[string]string{}
	for _, e := range strings.Split(body, ",") {
		k, v, _ := strings.Cut(e, " : ")
		if k = strings.TrimSpace(k); k != "" {
			out[k] = strings.TrimSpace(v)
		}
	}
	return out
}

var (
	chainStart = regexp.MustCompile(`^chain (\S+) \{`)
	mapStart   = regexp.MustCompile(`^(?:map|set) (\S+) \{`)
)

// parseListing reads `nft -a list table ip TABLE`.
func parseListing(table, listing string) *nftState {
	st := newState(table)
	var chain, mp string
	var elems strings.Builder
	inElems := false
	for _, line := range strings.Split(listing, "\n") {
		line = strings.TrimSpace(line)
		if inElems {
			elems.WriteString(" " + line)
			if strings.HasSuffix(line, "}") {
				inElems = false
				st.elems[mp] = parseElements(elems.String())
			}
			continue
		}
		switch {
		case chainStart.MatchString(line):
			chain = chainStart.FindStringSubmatch(line)[1]
			st.rules[chain] = map[string]string{}
		case mapStart.MatchString(line):
			mp = mapStart.FindStringSubmatch(line)[1]
		case strings.HasPrefix(line, "elements = {"):
			elems.Reset()
			elems.WriteString(strings.TrimPrefix(line, "elements = "))
			if strings.HasSuffix(line, "}") {
				st.elems[mp] = parseElements(elems.String())
			} else {
				inElems = true
			}
		case line == "}":
			chain, mp = "", ""
		case chain != "" && handleSuffix.MatchString(line):
			h := handleSuffix.FindStringSubmatch(line)[1]
			st.rules[chain][h] = strings.TrimSpace(handleSuffix.ReplaceAllString(line, ""))
		}
	}
	return st
}

var jumpRE = regexp.MustCompile(`(?:goto|jump) ([^\s,}]+)`)

// reaches walks from the Service port's entry — nftables: its service-ips element; iptables: the
// KUBE-SERVICES rule matching its ClusterIP and port — along jumps and gotos to a rule that sends to
// the endpoint (a DNAT to "ip:port", or an entry "ip . port" of a DNAT map).
func (st *nftState) reaches(t target) bool {
	var roots []string
	if st.table == "kube-proxy" {
		if v, ok := st.elems["service-ips"][fmt.Sprintf("%s . tcp . %d", t.vip, t.vipPort)]; ok {
			for _, m := range jumpRE.FindAllStringSubmatch(v, -1) {
				roots = append(roots, m[1])
			}
		}
	} else {
		for _, r := range st.rules["KUBE-SERVICES"] {
			if strings.Contains(r, "ip daddr "+t.vip+" ") && strings.Contains(r, fmt.Sprintf("dport %d ", t.vipPort)) {
				for _, m := range jumpRE.FindAllStringSubmatch(r, -1) {
					roots = append(roots, m[1])
				}
			}
		}
	}
	ip, port, _ := strings.Cut(t.endpoint, ":")
	seen := map[string]bool{}
	for len(roots) > 0 {
		c := roots[len(roots)-1]
		roots = roots[:len(roots)-1]
		if seen[c] {
			continue
		}
		seen[c] = true
		for _, r := range st.rules[c] {
			if strings.Contains(r, t.endpoint+" ") || strings.HasSuffix(r, t.endpoint) || strings.Contains(r, ip+" . "+port) {
				return true
			}
			for _, m := range jumpRE.FindAllStringSubmatch(r, -1) {
				roots = append(roots, m[1])
			}
		}
	}
	return false
}
