package benchmark

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// service is one of the benchmark's routed Services: a host name the proxies route on, and two
// servers (old and new), each a listener of this process that answers with its own address.
type service struct {
	host     string
	backend  string // HAProxy's backend name, as the HAProxy ingress controller names it
	old, new string // 127.0.0.1:port
}

// serveBackends starts the two servers of each of n services.
func serveBackends(tb testing.TB, n int) []service {
	tb.Helper()
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		addr, _ := r.Context().Value(http.LocalAddrContextKey).(net.Addr)
		if addr != nil {
			io.WriteString(w, addr.String())
		}
	})
	srv := &http.Server{Handler: handler, ReadHeaderTimeout: 5 * time.Second}
	tb.Cleanup(func() { srv.Close() })
	listen := func() string {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			tb.Fatal(err)
		}
		go func() { _ = srv.Serve(ln) }()
		return ln.Addr().String()
	}
	out := make([]service, n)
	for i := range out {
		name := fmt.Sprintf("web-%04d", i)
		out[i] = service{host: name, backend: "bench_svc_" + name + "_8080", old: listen(), new: listen()}
	}
	return out
}

// freePort returns a loopback port nothing listens on now.
func freePort(tb testing.TB) int {
	tb.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// proxy is one running proxy instance under test.
type proxy struct {
	kind     string // the reader's kind
	name     string // for the report
	admin    string // what the poller reads
	frontend string // 127.0.0.1:port that routes on the Host header
	cmd      *exec.Cmd
	// remove takes a service's old server out of this instance.
	remove func(svc service) error
}

// cpu is the process's CPU time so far.
func (p *proxy) cpu() time.Duration { return processCPU(p.cmd.Process.Pid) }

// startProcess runs a proxy, its output to a log file in dir; it is killed by PID when the
// benchmark ends.
func startProcess(tb testing.TB, dir, name string, bin string, args ...string) *exec.Cmd {
	tb.Helper()
	logs, err := os.Create(filepath.Join(dir, name+".log"))
	if err != nil {
		tb.Fatal(err)
	}
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = logs, logs
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		logs.Close()
	})
	return cmd
}

// startHAProxy runs one HAProxy routing every service by Host: a runtime API at level user for
// the poller, one at level admin for the benchmark's stand-in controller.
func startHAProxy(tb testing.TB, bin, dir, name string, svcs []service) *proxy {
	tb.Helper()
	user, admin, fe := freePort(tb), freePort(tb), freePort(tb)
	var cfg strings.Builder
	fmt.Fprintf(&cfg, `global
  stats socket ipv4@127.0.0.1:%d level user
  stats socket ipv4@127.0.0.1:%d level admin
  maxconn 4000
defaults
  mode http
  timeout connect 1s
  timeout client 5s
  timeout server 5s
frontend fe
  bind 127.0.0.1:%d
  use_backend bench_svc_%%[req.hdr(host),field(1,:)]_8080
`, user, admin, fe)
	for _, s := range svcs {
		fmt.Fprintf(&cfg, "backend %s\n  balance roundrobin\n  server old %s\n  server new %s\n", s.backend, s.old, s.new)
	}
	path := filepath.Join(dir, name+".cfg")
	if err := os.WriteFile(path, []byte(cfg.String()), 0o600); err != nil {
		tb.Fatal(err)
	}
	cmd := startProcess(tb, dir, name, bin, "-f", path, "-db")
	p := &proxy{kind: "haproxy", name: name, admin: fmt.Sprintf("tcp://127.0.0.1:%d", user),
		frontend: fmt.Sprintf("127.0.0.1:%d", fe), cmd: cmd}
	adminAddr := fmt.Sprintf("127.0.0.1:%d", admin)
	p.remove = func(s service) error {
		// As the HAProxy ingress controller frees a slot: maintenance first.
		return haproxyCommand(adminAddr, "set server "+s.backend+"/old state maint")
	}
	waitListening(tb, p.frontend, dir, name)
	return p
}

func haproxyCommand(addr, line string) error {
	conn, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		return err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(conn, line+"\n"); err != nil {
		return err
	}
	out, err := io.ReadAll(conn)
	if err != nil {
		return err
	}
	if s := strings.TrimSpace(string(out)); s != "" {
		return fmt.Errorf("haproxy: %s: %s", line, s)
	}
	return nil
}

// traefikConfig is the file provider's dynamic configuration: a router and a service per
// Service, without the old servers of those removed.
func traefikConfig(svcs []service, removed map[string]bool) []byte {
	var b bytes.Buffer
	b.WriteString("http:\n  routers:\n")
	for _, s := range svcs {
		fmt.Fprintf(&b, "    %s:\n      rule: Host(`%s`)\n      service: %s\n      entryPoints: [web]\n", s.host, s.host, s.host)
	}
	b.WriteString("  services:\n")
	for _, s := range svcs {
		fmt.Fprintf(&b, "    %s:\n      loadBalancer:\n        servers:\n", s.host)
		if !removed[s.host] {
			fmt.Fprintf(&b, "        - url: http://%s\n", s.old)
		}
		fmt.Fprintf(&b, "        - url: http://%s\n", s.new)
	}
	return b.Bytes()
}

// startTraefik runs one Traefik whose file provider watches dynamic (shared by the instances:
// one write reaches them all), with its API on a port of its own. Traefik applies a provider's
// change at most every providersThrottleDuration (2 s, its default), as it does for Kubernetes.
func startTraefik(tb testing.TB, bin, dir, name, dynamic string) *proxy {
	tb.Helper()
	api, fe := freePort(tb), freePort(tb)
	static := fmt.Sprintf(`entryPoints:
  web:
    address: "127.0.0.1:%d"
  traefik:
    address: "127.0.0.1:%d"
api:
  insecure: true
  dashboard: false
providers:
  file:
    filename: %s
    watch: true
log:
  level: ERROR
`, fe, api, dynamic)
	path := filepath.Join(dir, name+".yaml")
	if err := os.WriteFile(path, []byte(static), 0o600); err != nil {
		tb.Fatal(err)
	}
	cmd := startProcess(tb, dir, name, bin, "--configfile="+path)
	p := &proxy{kind: "traefik", name: name, admin: fmt.Sprintf("http://127.0.0.1:%d", api),
		frontend: fmt.Sprintf("127.0.0.1:%d", fe), cmd: cmd}
	waitListening(tb, p.frontend, dir, name)
	return p
}

func waitListening(tb testing.TB, addr, dir, name string) {
	tb.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		conn, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			conn.Close()
			return
		}
		if time.Now().After(deadline) {
			logs, _ := os.ReadFile(filepath.Join(dir, name+".log"))
			tb.Fatalf("%s does not listen on %s: %v\n%s", name, addr, err, logs)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// processCPU reads a process's user and system time from /proc (0 once it is gone).
func processCPU(pid int) time.Duration {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	// The fields after the command name, which is in parentheses and may hold spaces.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 13 {
		return 0
	}
	utime, _ := strconv.ParseInt(f[11], 10, 64)
	stime, _ := strconv.ParseInt(f[12], 10, 64)
	const ticks = 100 // USER_HZ
	return time.Duration(utime+stime) * time.Second / ticks
}
