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
// arrives: the test's own record of when kube-proxy rewrote a service chain.
type ruleMonitor struct {
	cmd  *exec.Cmd
	mu   sync.Mutex
	seen []ruleLine
	done chan struct{}
}

type ruleLine struct {
	at   time.Time
	line string
}

func startRuleMonitor(netns string) (*ruleMonitor, error) {
	cmd := ns.Command(netns, "nft", "monitor", "rules")
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("nft monitor in %s: %w", netns, err)
	}
	m := &ruleMonitor{cmd: cmd, done: make(chan struct{})}
	// What the chains hold already, in the form the monitor prints changes.
	listing, err := ns.Command(netns, "nft", "list", "table", "ip", "kube-proxy").Output()
	if err != nil {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
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
			m.seen = append(m.seen, ruleLine{now, "add rule ip kube-proxy " + chain + " " + line})
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

// removedAt returns when, after since, a rule of service's chains was first added that no
// longer sends to ip:port: kube-proxy rewrites a service chain whole in one transaction.
func (m *ruleMonitor) removedAt(service, ip string, port int, since time.Time) (time.Time, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	chain := "-" + service + "/"
	target := []string{fmt.Sprintf("%s . %d", ip, port), fmt.Sprintf("%s:%d", ip, port)}
	for _, l := range m.seen {
		if l.at.Before(since) || !strings.HasPrefix(l.line, "add rule ip kube-proxy service-") || !strings.Contains(l.line, chain) {
			continue
		}
		if !strings.Contains(l.line, target[0]) && !strings.Contains(l.line, target[1]) {
			return l.at, true
		}
	}
	return time.Time{}, false
}

// programmed reports whether the service chain's latest rule, as this monitor saw it, sends to
// ip:port.
func (m *ruleMonitor) programmed(service, ip string, port int) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	chain := "-" + service + "/"
	for i := len(m.seen) - 1; i >= 0; i-- {
		l := m.seen[i].line
		if strings.HasPrefix(l, "add rule ip kube-proxy service-") && strings.Contains(l, chain) {
			return strings.Contains(l, fmt.Sprintf("%s . %d", ip, port)) || strings.Contains(l, fmt.Sprintf("%s:%d", ip, port))
		}
	}
	return false
}
