// Package load sends HTTP requests at a fixed rate from inside a network namespace (the lab's
// client pod), along one or more paths to the same app (its ClusterIP, ingress proxies), and
// records every outcome: the path, when, which backend answered, or how it failed.
package load

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/endpointlag/endpointlag/lab/internal/ns"
)

// The paths the lab sends requests along.
const (
	// PathClusterIP: to the Service's ClusterIP, through the client node's kube-proxy rules.
	PathClusterIP = "clusterip"
	// PathTraefik and PathHAProxy: to the ingress proxy's pod IP, which forwards to a pod.
	PathTraefik = "traefik"
	PathHAProxy = "haproxy"
)

// Target is one path to the app.
type Target struct {
	// Path names it in results and reports (PathClusterIP, …).
	Path string
	// Addr is host:port: a Service's ClusterIP and port, a proxy's pod IP and port.
	Addr string
	// Host is the Host header; empty for Addr.
	Host string
}

// String is the form ParseTarget reads: path=addr or path=addr,host=name.
func (t Target) String() string {
	s := t.Path + "=" + t.Addr
	if t.Host != "" {
		s += ",host=" + t.Host
	}
	return s
}

// ParseTarget reads path=addr[,host=name]; a bare addr is the clusterip path.
func ParseTarget(s string) (Target, error) {
	path, rest, ok := strings.Cut(s, "=")
	if !ok {
		path, rest = PathClusterIP, s
	}
	addr, host, _ := strings.Cut(rest, ",")
	t := Target{Path: path, Addr: addr}
	if host != "" {
		var ok bool
		if t.Host, ok = strings.CutPrefix(host, "host="); !ok || t.Host == "" {
			return t, fmt.Errorf("target %q: %q is not host=NAME", s, host)
		}
	}
	if _, _, err := net.SplitHostPort(addr); err != nil || path == "" {
		return t, fmt.Errorf("target %q: want path=host:port[,host=NAME]", s)
	}
	return t, nil
}

// Config of one load run. Runs are bounded: Duration, and at most Rate × Duration requests per
// target.
type Config struct {
	// NS is the network namespace requests are sent from; empty for this process's own.
	NS string
	// Targets are the paths requests take, each at Rate; their Path names must differ.
	Targets []Target
	// Rate is requests per second on each target.
	Rate int
	// Duration bounds the run.
	Duration time.Duration
	// KeepAlive reuses connections; otherwise every request opens a new one.
	KeepAlive bool
	// Timeout bounds each request.
	Timeout time.Duration
	// FirstPort, when set, is where this run's source ports start (see Ports); otherwise they
	// continue this process's sequence.
	FirstPort int
	// ConntrackNS, when set, is the namespace whose conntrack table tells which backend a
	// failed connection was sent to (the client's node, where kube-proxy's DNAT happens).
	ConntrackNS string
}

// Failure kinds; an answer other than 200 is "http-" and its status code ("http-502").
const (
	Refused = "refused"
	Reset   = "reset"
	Timeout = "timeout"
	// Unreachable: an ICMP error came back, typically from a node routing to a pod that is gone.
	Unreachable = "unreachable"
	Other       = "other"
)

// Result is one request.
type Result struct {
	// Path is the target's.
	Path    string
	Start   time.Time
	Latency time.Duration
	// Backend is the pod that answered, empty on failure.
	Backend string
	// BackendIP is, for a failure on a path through a Service (the client's node translates the
	// address), the address the client's node sent the connection to, when its conntrack table
	// still showed it.
	BackendIP string
	// TCPState is the connection's conntrack state when the failure was traced.
	TCPState string
	// SrcPort is the client's port.
	SrcPort int
	// Failure is one of the kinds above, empty on success.
	Failure string
	Err     string
}

// Run sends requests until cfg.Duration has passed or ctx is done, and returns every result in
// start order.
func Run(ctx context.Context, cfg Config) ([]Result, error) {
	if cfg.Rate <= 0 || cfg.Rate > 2000 {
		return nil, fmt.Errorf("rate %d/s is not between 1 and 2000", cfg.Rate)
	}
	if cfg.Duration <= 0 || cfg.Duration > 30*time.Minute {
		return nil, fmt.Errorf("duration %s is not between 0 and 30m", cfg.Duration)
	}
	if len(cfg.Targets) == 0 {
		return nil, errors.New("no target")
	}
	for i, t := range cfg.Targets {
		if slices.ContainsFunc(cfg.Targets[:i], func(o Target) bool { return o.Path == t.Path }) {
			return nil, fmt.Errorf("two targets named %q", t.Path)
		}
	}
	if cfg.Timeout == 0 {
		cfg.Timeout = time.Second
	}
	tr := &http.Transport{
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			d := &net.Dialer{Control: reuseAddr}
			if port, ok := ctx.Value(portKey{}).(int); ok {
				d.LocalAddr = &net.TCPAddr{Port: port}
			}
			if cfg.NS == "" {
				return d.DialContext(ctx, network, addr)
			}
			return ns.Dial(ctx, cfg.NS, d, network, addr)
		},
		DisableKeepAlives:   !cfg.KeepAlive,
		MaxIdleConnsPerHost: 64,
	}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr, Timeout: cfg.Timeout}

	ctx, cancel := context.WithTimeout(ctx, cfg.Duration)
	defer cancel()
	res := &resolver{ns: cfg.ConntrackNS}
	stopResolver := res.start()
	tick := time.NewTicker(time.Second / time.Duration(cfg.Rate))
	defer tick.Stop()
	var (
		mu      sync.Mutex
		results []*Result
		wg      sync.WaitGroup
	)
	ticks := int(cfg.Duration.Seconds()*float64(cfg.Rate)) + 1
	sent := 0
	for range ticks {
		select {
		case <-ctx.Done():
		case <-tick.C:
		}
		if ctx.Err() != nil {
			break
		}
		for _, t := range cfg.Targets {
			// Each request gets its own source port (when it opens a connection), so that a
			// failure can be traced in conntrack.
			port := Ports.next()
			if cfg.FirstPort != 0 {
				port = firstPort + (cfg.FirstPort-firstPort+sent)%portRange
			}
			sent++
			wg.Go(func() {
				r := do(client, t, port)
				if r.Failure != "" {
					res.add(r, t.Addr)
				}
				mu.Lock()
				results = append(results, r)
				mu.Unlock()
			})
		}
	}
	wg.Wait()
	stopResolver()
	out := make([]Result, len(results))
	for i, r := range results {
		out[i] = *r
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Start.Before(out[j].Start) })
	return out, nil
}

// Source ports cycle through the whole unprivileged range. A port must not come back while the
// client node's conntrack still holds an entry for it: a new SYN on an old tuple follows the old
// entry's DNAT to a backend that may be gone (SYN_SENT entries live 120 s). So every run in the
// lab continues one sequence: in-process runs share Ports, and a load generator started as
// another process gets FirstPort = Ports.Base() and is accounted for with Ports.Skip.
const (
	firstPort = 1024
	portRange = 65535 - firstPort
)

// PortSequence hands out source ports.
type PortSequence struct{ n atomic.Int64 }

// Ports is this process's sequence.
var Ports PortSequence

func (p *PortSequence) next() int { return firstPort + int((p.n.Add(1)-1)%portRange) }

// Base is the port the next run would start with.
func (p *PortSequence) Base() int { return firstPort + int(p.n.Load()%portRange) }

// Skip accounts for n ports another process used from Base on.
func (p *PortSequence) Skip(n int) { p.n.Add(int64(n)) }

type portKey struct{}

func reuseAddr(_, _ string, c syscall.RawConn) error {
	var serr error
	err := c.Control(func(fd uintptr) {
		serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_REUSEADDR, 1)
	})
	return errors.Join(err, serr)
}

// statusError is an answer other than 200 OK: a proxy's own error (502 when its backend refused
// or reset, 503 when it has none, 504 when it timed out).
type statusError struct {
	code   int
	status string
}

func (e *statusError) Error() string { return "status " + e.status }

func do(client *http.Client, t Target, port int) *Result {
	r := &Result{Path: t.Path, Start: time.Now(), SrcPort: port}
	req, err := http.NewRequestWithContext(context.WithValue(context.Background(), portKey{}, port), http.MethodGet, "http://"+t.Addr+"/", nil)
	if err != nil {
		r.Failure, r.Err = Other, err.Error()
		return r
	}
	req.Host = t.Host
	resp, err := client.Do(req)
	if err == nil {
		var body []byte
		body, err = io.ReadAll(io.LimitReader(resp.Body, 256))
		resp.Body.Close()
		if err == nil && resp.StatusCode != http.StatusOK {
			err = &statusError{code: resp.StatusCode, status: resp.Status}
		}
		r.Backend = strings.TrimSpace(string(body))
	}
	r.Latency = time.Since(r.Start)
	if err != nil {
		r.Backend = ""
		r.Failure, r.Err = classify(err), err.Error()
	}
	return r
}

func classify(err error) string {
	var ne net.Error
	var se *statusError
	switch {
	case errors.As(err, &se):
		return "http-" + strconv.Itoa(se.code)
	case errors.Is(err, syscall.ECONNREFUSED):
		return Refused
	case errors.Is(err, syscall.ECONNRESET), errors.Is(err, syscall.EPIPE), errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		return Reset
	case errors.Is(err, syscall.ENETUNREACH), errors.Is(err, syscall.EHOSTUNREACH):
		return Unreachable
	case errors.Is(err, os.ErrDeadlineExceeded), errors.As(err, &ne) && ne.Timeout():
		return Timeout
	}
	return Other
}

// Summary counts results.
type Summary struct {
	Requests int
	Failed   int
	ByKind   map[string]int
	Backends int
}

// Summarize counts the results, of every path.
func Summarize(rs []Result) Summary {
	s := Summary{Requests: len(rs), ByKind: map[string]int{}}
	backends := map[string]bool{}
	for _, r := range rs {
		if r.Failure != "" {
			s.Failed++
			s.ByKind[r.Failure]++
		} else {
			backends[r.Backend] = true
		}
	}
	s.Backends = len(backends)
	return s
}

// SummarizeByPath counts the results of each path.
func SummarizeByPath(rs []Result) map[string]Summary {
	byPath := map[string][]Result{}
	for _, r := range rs {
		byPath[r.Path] = append(byPath[r.Path], r)
	}
	out := map[string]Summary{}
	for p, prs := range byPath {
		out[p] = Summarize(prs)
	}
	return out
}

// LastRouted is the last request on path that backend (a pod's name) answered, by start time:
// the proxy of that path (or the client node's kube-proxy rules) routed it to the pod between
// its Start and Start+Latency. ok is false when the pod answered none.
func LastRouted(rs []Result, path, backend string) (last Result, ok bool) {
	for _, r := range rs {
		if r.Path == path && r.Failure == "" && r.Backend == backend && (!ok || r.Start.After(last.Start)) {
			last, ok = r, true
		}
	}
	return last, ok
}

// RoutedGap is the longest interval between consecutive requests that path routed to backend
// among those that started in [from, to]: how precisely the last of them (LastRouted) dates the
// moment the path stopped routing there, which lies between that request and the one the path
// would have sent next.
func RoutedGap(rs []Result, path, backend string, from, to time.Time) time.Duration {
	var starts []time.Time
	for _, r := range rs {
		if r.Path == path && r.Failure == "" && r.Backend == backend && !r.Start.Before(from) && !r.Start.After(to) {
			starts = append(starts, r.Start)
		}
	}
	slices.SortFunc(starts, func(a, b time.Time) int { return a.Compare(b) })
	var gap time.Duration
	for i := 1; i < len(starts); i++ {
		gap = max(gap, starts[i].Sub(starts[i-1]))
	}
	return gap
}

// WriteLog writes one line per failure: time, path, kind, the backend the connection was sent
// to (named by names, from IP to pod, where known) and the error.
func WriteLog(w io.Writer, rs []Result, names map[string]string) error {
	bw := bufio.NewWriter(w)
	for _, r := range rs {
		if r.Failure == "" {
			continue
		}
		backend := "?"
		if r.BackendIP != "" {
			backend = r.BackendIP
			if n, ok := names[r.BackendIP]; ok {
				backend += "(" + n + ")"
			}
		}
		fmt.Fprintf(bw, "%s %s %s backend=%s conntrack=%s %s\n", r.Start.Format(time.RFC3339Nano), r.Path, r.Failure, backend, r.TCPState, r.Err)
	}
	return bw.Flush()
}
