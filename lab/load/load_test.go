package load

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

func TestClassify(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want string
	}{
		{&net.OpError{Op: "dial", Err: os.NewSyscallError("connect", syscall.ECONNREFUSED)}, Refused},
		{&net.OpError{Op: "read", Err: os.NewSyscallError("read", syscall.ECONNRESET)}, Reset},
		{fmt.Errorf("get: %w", io.EOF), Reset},
		{&net.OpError{Op: "dial", Err: os.NewSyscallError("connect", syscall.ENETUNREACH)}, Unreachable},
		{&net.OpError{Op: "dial", Err: os.NewSyscallError("connect", syscall.EHOSTUNREACH)}, Unreachable},
		{fmt.Errorf("wrapped: %w", os.ErrDeadlineExceeded), Timeout},
		{errors.New("something else"), Other},
	} {
		if got := classify(tc.err); got != tc.want {
			t.Errorf("classify(%v) = %s, want %s", tc.err, got, tc.want)
		}
	}
}

// Against a local server: every request is counted (as many as the server answered), successes
// name the backend, and a server that stops answering shows up as failures of the right kind. How
// many requests the ticker sends in the time is not asserted: CI's loaded machine once sent 4 of
// the 30 in 300 ms, and with the lab running beside it none at all, so it runs for a second.
func TestRunAgainstLoopback(t *testing.T) {
	var served atomic.Int64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		served.Add(1)
		fmt.Fprintln(w, "pod-a")
	}))
	addr := srv.Listener.Addr().String()
	rs, err := Run(context.Background(), Config{Targets: []Target{{Path: "direct", Addr: addr}}, Rate: 100, Duration: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	s := Summarize(rs)
	if s.Requests == 0 || int64(s.Requests) != served.Load() || s.Failed != 0 || s.Backends != 1 || rs[0].Backend != "pod-a" {
		t.Fatalf("summary %+v (the server answered %d), results %+v", s, served.Load(), rs)
	}
	srv.Close()
	rs, err = Run(context.Background(), Config{Targets: []Target{{Path: "direct", Addr: addr}}, Rate: 100, Duration: 100 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	if s := Summarize(rs); s.Failed != s.Requests || s.ByKind[Refused] != s.Requests {
		t.Errorf("against a closed port: %+v", s)
	}
}

func TestRunBounds(t *testing.T) {
	for _, c := range []Config{{Targets: []Target{{Path: "a", Addr: "x:1"}}, Rate: 0, Duration: time.Second}, {Targets: []Target{{Path: "a", Addr: "x:1"}}, Rate: 10, Duration: time.Hour},
		{Rate: 10, Duration: time.Second}, {Targets: []Target{{Path: "a", Addr: "x:1"}, {Path: "a", Addr: "y:1"}}, Rate: 10, Duration: time.Second}} {
		if _, err := Run(context.Background(), c); err == nil {
			t.Errorf("%+v: no error", c)
		}
	}
}

func TestParseTarget(t *testing.T) {
	for in, want := range map[string]Target{
		"10.96.0.10:80":                         {Path: PathClusterIP, Addr: "10.96.0.10:80"},
		"haproxy=10.244.1.7:80":                 {Path: PathHAProxy, Addr: "10.244.1.7:80"},
		"traefik=10.244.2.3:8000,host=web.demo": {Path: PathTraefik, Addr: "10.244.2.3:8000", Host: "web.demo"},
	} {
		got, err := ParseTarget(in)
		if err != nil || got != want {
			t.Errorf("ParseTarget(%q) = %+v, %v; want %+v", in, got, err, want)
		}
		if back, err := ParseTarget(got.String()); err != nil || back != got {
			t.Errorf("ParseTarget(%q) = %+v, %v: String does not round trip", got.String(), back, err)
		}
	}
	for _, bad := range []string{"traefik=10.244.2.3", "traefik=10.244.2.3:8000,web.demo", "=10.0.0.1:80", "traefik=1.2.3.4:80,host="} {
		if _, err := ParseTarget(bad); err == nil {
			t.Errorf("ParseTarget(%q): no error", bad)
		}
	}
}

// Two paths at once: each request carries its path, the Host header of its target, and a
// proxy's error answer is a failure of kind http-<status>.
func TestRunPaths(t *testing.T) {
	var served atomic.Int64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		served.Add(1)
		if r.Host != "web.demo" {
			http.Error(w, "no route", http.StatusBadGateway)
			return
		}
		fmt.Fprintln(w, "pod-a")
	}))
	defer srv.Close()
	addr := srv.Listener.Addr().String()
	rs, err := Run(context.Background(), Config{Targets: []Target{{Path: PathTraefik, Addr: addr, Host: "web.demo"}, {Path: PathHAProxy, Addr: addr}},
		Rate: 100, Duration: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	by := SummarizeByPath(rs)
	tr, hp := by[PathTraefik], by[PathHAProxy]
	if tr.Requests == 0 || tr.Failed != 0 || hp.Requests != tr.Requests || hp.Failed != hp.Requests || hp.ByKind["http-502"] != hp.Requests {
		t.Errorf("by path: %+v", by)
	}
	if s := Summarize(rs); s.Requests != tr.Requests+hp.Requests || int64(s.Requests) != served.Load() {
		t.Errorf("all paths: %+v (the server answered %d)", s, served.Load())
	}
}

func TestLastRouted(t *testing.T) {
	t0 := time.Date(2026, 11, 29, 12, 0, 0, 0, time.UTC)
	rs := []Result{
		{Path: PathTraefik, Start: t0, Backend: "web-1"},
		{Path: PathTraefik, Start: t0.Add(2 * time.Second), Backend: "web-1"},
		{Path: PathTraefik, Start: t0.Add(3 * time.Second), Failure: "http-502"},
		{Path: PathHAProxy, Start: t0.Add(4 * time.Second), Backend: "web-1"},
		{Path: PathTraefik, Start: t0.Add(5 * time.Second), Backend: "web-2"},
	}
	if r, ok := LastRouted(rs, PathTraefik, "web-1"); !ok || !r.Start.Equal(t0.Add(2*time.Second)) {
		t.Errorf("LastRouted(traefik, web-1) = %+v, %t", r, ok)
	}
	if r, ok := LastRouted(rs, PathHAProxy, "web-1"); !ok || !r.Start.Equal(t0.Add(4*time.Second)) {
		t.Errorf("LastRouted(haproxy, web-1) = %+v, %t", r, ok)
	}
	if _, ok := LastRouted(rs, PathClusterIP, "web-1"); ok {
		t.Error("LastRouted(clusterip, web-1) found a request on no such path")
	}
}

func TestRoutedGap(t *testing.T) {
	t0 := time.Date(2026, 11, 29, 12, 0, 0, 0, time.UTC)
	at := func(ms int) time.Time { return t0.Add(time.Duration(ms) * time.Millisecond) }
	rs := []Result{
		{Path: PathTraefik, Start: at(80), Backend: "web-1"},
		{Path: PathTraefik, Start: at(0), Backend: "web-1"},
		{Path: PathTraefik, Start: at(40), Backend: "web-1"},
		{Path: PathTraefik, Start: at(60), Backend: "web-2"},
		{Path: PathTraefik, Start: at(150), Failure: "http-502"},
		{Path: PathHAProxy, Start: at(100), Backend: "web-1"},
		{Path: PathTraefik, Start: at(135), Backend: "web-1"},
		{Path: PathTraefik, Start: at(400), Backend: "web-1"},
	}
	for _, c := range []struct {
		from, to int
		want     time.Duration
	}{
		{0, 200, 55 * time.Millisecond},  // 0, 40, 80, 135: out of order, other pods, paths and failures ignored
		{0, 100, 40 * time.Millisecond},  // the window bounds what counts
		{50, 100, 0},                     // a single request: no interval
		{0, 500, 265 * time.Millisecond}, // 135 → 400
	} {
		if got := RoutedGap(rs, PathTraefik, "web-1", at(c.from), at(c.to)); got != c.want {
			t.Errorf("RoutedGap(traefik, web-1, %d ms, %d ms) = %s, want %s", c.from, c.to, got, c.want)
		}
	}
}
