package e2e

import (
	"bufio"
	"fmt"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/endpointlag/endpointlag/lab/internal/ns"
)

// ruleMonitor runs `nft monitor rules` in a node's namespace and timestamps every line as it
// arrives: the test's own record of when kube-proxy rewrote its rules. It starts with the
// table's current rules, written the way the monitor prints added rules.
type ruleMonitor struct {
	cmd   *exec.Cmd
	table string // "kube-proxy" (nftables mode) or "nat" (iptables mode, nf_tables backend)
	mu    sync.Mutex
	seen  []ruleLine
	done  chan struct{}
}

type ruleLine struct {
	at   time.Time
	line string
}

func startRuleMonitor(netns, mode string) (*ruleMonitor, error) {
	table := "kube-proxy"
	if mode == "iptables" {
		table = "nat"
	}
	// Line-buffered: piped, nft would hold lines in its stdio buffer and the times would come late.
	// Real-time scheduled (SCHED_FIFO, the lowest priority): on the busy 2-core lab machine a
	// normally scheduled nft printed a change over 20 ms after the daemon had seen it.
	cmd := ns.Command(netns, "chrt", "--fifo", "1", "stdbuf", "-oL", "nft", "monitor", "rules")
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("nft monitor in %s: %w", netns, err)
	}
	m := &ruleMonitor{cmd: cmd, table: table, done: make(chan struct{})}
	listing, err := ns.Command(netns, "nft", "list", "table", "ip", table).Output()
	if err != nil {
		m.stop()
		return nil, fmt.Errorf("nft list in %s: %w", netns, err)
	}
	now, chain := time.Now(), ""
	for _, line := range strings.Split(string(listing), "\n") {
		line = strings.TrimSpace(line)
		switch {
		case strings.HasPrefix(line, "chain "):
			chain = strings.TrimSuffix(strings.TrimPrefix(line, "chain "), " {")
		case line == "}":
			chain = ""
		case chain != "" && line != "":
			m.seen = append(m.seen, ruleLine{now, "add rule ip " + table + " " + chain + " " + line})
		}
	}
	go func() {
		defer close(m.done)
		sc := bufio.NewScanner(out)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		for sc.Scan() {
			now := time.Now()
			m.mu.Lock()
			m.seen = append(m.seen, ruleLine{now, sc.Text()})
			m.mu.Unlock()
		}
	}()
	return m, nil
}

func (m *ruleMonitor) stop() {
	_ = m.cmd.Process.Kill()
	<-m.done
	_ = m.cmd.Wait()
}

func sendsTo(line, ip string, port int) bool {
	return strings.Contains(line, fmt.Sprintf("%s . %d", ip, port)) || strings.Contains(line, fmt.Sprintf("%s:%d", ip, port))
}

// chainOf returns the chain an "add rule ip TABLE CHAIN ..." or "delete rule ..." line is about.
func (m *ruleMonitor) chainOf(line string) string {
	for _, p := range []string{"add rule ip " + m.table + " ", "delete rule ip " + m.table + " "} {
		if rest, ok := strings.CutPrefix(line, p); ok {
			chain, _, _ := strings.Cut(rest, " ")
			return chain
		}
	}
	return ""
}

// sepChains returns iptables mode's endpoint chains that DNAT to ip:port.
func (m *ruleMonitor) sepChains(ip string, port int) map[string]bool {
	out := map[string]bool{}
	for _, l := range m.seen {
		if c := m.chainOf(l.line); strings.HasPrefix(c, "KUBE-SEP-") && strings.HasPrefix(l.line, "add rule") && sendsTo(l.line, ip, port) {
			out[c] = true
		}
	}
	return out
}

// removedAt returns when, after since, the service's rules were first rewritten without ip:port:
// in nftables mode a service chain's new rule that no longer sends there; in iptables mode the
// start of the first rewrite of a service chain that jumped to the endpoint's KUBE-SEP chain and
// no longer does.
func (m *ruleMonitor) removedAt(service, ip string, port int, since time.Time) (time.Time, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.table == "kube-proxy" {
		for _, l := range m.seen {
			c := m.chainOf(l.line)
			if l.at.Before(since) || !strings.HasPrefix(l.line, "add rule") || !strings.HasPrefix(c, "service-") || !strings.Contains(c, "-"+service+"/") {
				continue
			}
			if !sendsTo(l.line, ip, port) {
				return l.at, true
			}
		}
		return time.Time{}, false
	}
	seps := m.sepChains(ip, port)
	svcChains := map[string]bool{}
	for _, l := range m.seen {
		c := m.chainOf(l.line)
		if !strings.HasPrefix(c, "KUBE-SVC-") && !strings.HasPrefix(c, "KUBE-SVL-") {
			continue
		}
		for sep := range seps {
			if strings.HasPrefix(l.line, "add rule") && strings.HasSuffix(l.line, "jump "+sep) {
				svcChains[c] = true
			}
		}
	}
	// A sync rewrites a service chain as its rules deleted, then its rules added. The endpoint is
	// removed by the first rewrite after since whose added rules no longer jump to its chain: a
	// rewrite that still does (say, for a new endpoint added first) removes nothing.
	type rewrite struct {
		start   time.Time
		jumps   bool
		adding  bool
		started bool
	}
	rewrites := map[string]*rewrite{}
	var first time.Time
	closeRewrite := func(rw *rewrite) {
		if rw.started && !rw.jumps && (first.IsZero() || rw.start.Before(first)) {
			first = rw.start
		}
	}
	for _, l := range m.seen {
		c := m.chainOf(l.line)
		if l.at.Before(since) || !svcChains[c] {
			continue
		}
		rw := rewrites[c]
		if rw == nil {
			rw = &rewrite{}
			rewrites[c] = rw
		}
		switch {
		case strings.HasPrefix(l.line, "delete rule"):
			if !rw.started || rw.adding {
				closeRewrite(rw)
				*rw = rewrite{start: l.at, started: true}
			}
		case strings.HasPrefix(l.line, "add rule") && rw.started:
			rw.adding = true
			for sep := range seps {
				if strings.HasSuffix(l.line, "jump "+sep) {
					rw.jumps = true
				}
			}
		}
	}
	for _, rw := range rewrites {
		closeRewrite(rw)
	}
	return first, !first.IsZero()
}

// programmed reports whether the node's rules send the service's traffic to ip:port now.
func (m *ruleMonitor) programmed(service, ip string, port int) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.table == "kube-proxy" {
		for i := len(m.seen) - 1; i >= 0; i-- {
			l := m.seen[i].line
			if c := m.chainOf(l); strings.HasPrefix(l, "add rule") && strings.HasPrefix(c, "service-") && strings.Contains(c, "-"+service+"/") {
				return sendsTo(l, ip, port)
			}
		}
		return false
	}
	seps := m.sepChains(ip, port)
	for i := len(m.seen) - 1; i >= 0; i-- {
		l := m.seen[i].line
		for sep := range seps {
			if strings.HasPrefix(l, "add rule") && strings.HasSuffix(l, "jump "+sep) && strings.HasPrefix(m.chainOf(l), "KUBE-SVC-") {
				return true
			}
		}
	}
	return false
}
