package pod

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"
)

func TestParseOnSIGTERM(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want OnSIGTERM
		err  bool
	}{
		{"", OnSIGTERM{}, false},
		{"exit", OnSIGTERM{}, false},
		{"drain=5s", OnSIGTERM{Drain: 5 * time.Second}, false},
		{"drain-unready=1500ms", OnSIGTERM{Drain: 1500 * time.Millisecond, Unready: true}, false},
		{"drain", OnSIGTERM{}, true},
		{"drain=0s", OnSIGTERM{}, true},
		{"linger=5s", OnSIGTERM{}, true},
	} {
		got, err := ParseOnSIGTERM(tc.in)
		if (err != nil) != tc.err || got != tc.want {
			t.Errorf("%q: %+v, %v", tc.in, got, err)
			continue
		}
		if err == nil && tc.in != "" {
			if back, _ := ParseOnSIGTERM(got.String()); back != got {
				t.Errorf("%q: String() %q does not parse back", tc.in, got.String())
			}
		}
	}
}

func freePorts(t *testing.T, n int) []int {
	t.Helper()
	var ports []int
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
		l.Close()
	}
	return ports
}

func get(t *testing.T, port int, agent string) (int, string) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, fmt.Sprintf("http://127.0.0.1:%d/ready", port), nil)
	req.Header.Set("User-Agent", agent)
	req.Close = true
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, strings.TrimSpace(string(b))
}

// waitListening waits until port accepts connections.
func waitListening(t *testing.T, port int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		c, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", port))
		if err == nil {
			c.Close()
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("port %d: %v", port, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestServeDrainUnready(t *testing.T) {
	ports := freePorts(t, 2)
	stop, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	s := Server{Name: "web-1", Ports: ports, OnSIGTERM: OnSIGTERM{Drain: time.Second, Unready: true}}
	go func() { done <- s.Serve(stop) }()
	for _, p := range ports {
		waitListening(t, p)
		if code, body := get(t, p, "kube-probe/1.37"); code != 200 || body != "web-1" {
			t.Errorf("port %d before SIGTERM: %d %q", p, code, body)
		}
	}
	cancel()
	// The probe fails from the stop on; everyone else is still served until the drain ends.
	deadline := time.Now().Add(time.Second)
	for {
		code, _ := get(t, ports[0], "kube-probe/1.37")
		if code == http.StatusServiceUnavailable {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the probe still gets %d while draining", code)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if code, body := get(t, ports[1], "curl/8"); code != 200 || body != "web-1" {
		t.Errorf("traffic while draining: %d %q", code, body)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("Serve after the drain: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Serve did not return after its 1 s drain")
	}
}

func TestServeExitAfter(t *testing.T) {
	s := Server{Name: "job", Ports: freePorts(t, 1), ExitAfter: 100 * time.Millisecond}
	start := time.Now()
	if err := s.Serve(t.Context()); !errors.Is(err, ErrCompleted) {
		t.Fatalf("Serve = %v, want ErrCompleted", err)
	}
	if took := time.Since(start); took < 100*time.Millisecond {
		t.Errorf("completed after %s, before its 100 ms", took)
	}
}
