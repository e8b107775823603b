package haproxy

import (
	"bytes"
	"context"
	"flag"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/endpointlag/endpointlag/probes/ingress"
	"github.com/endpointlag/endpointlag/probes/ingress/internal/readertest"
)

var update = flag.Bool("update", false, "rewrite the testdata captures from a real HAProxy")

// The captures in testdata come from TestRealHAProxy (go test -run TestRealHAProxy -update):
// Debian 12's HAProxy 2.6.12, the version of the lab, with haproxyConfig and the runtime changes
// the test makes, byte for byte but for the two ports the test picks at random (the 404 server's
// and the closed one), written as capturedNotFound and capturedClosed.
const (
	captureAll      = "show-servers-state.txt"
	captureBackends = "show-servers-state-backends.txt"
)

// captureNames are the backends of captureBackends, asked in this order in one line.
var captureNames = []string{"shop_svc_web_8080", "shop_gone_8080", "shop_api_http"}

// haproxyConfig has backends named as the HAProxy Kubernetes Ingress Controller names them, with
// server slots as it writes them (free slots at 127.0.0.1:1, disabled), and servers whose health
// checks fail or answer 404 (disable-on-404).
const haproxyConfig = `global
    stats socket {{dir}}/admin.sock mode 600 level admin
    stats socket ipv4@127.0.0.1:{{api}} level user
    stats timeout 10s

defaults
    mode http
    timeout connect 1s
    timeout client 5s
    timeout server 5s

backend shop_svc_web_8080
    server SRV_1 10.244.1.5:8080
    server SRV_2 10.244.1.6:8080
    server SRV_3 10.244.1.7:8080
    server SRV_4 10.244.1.8:8080
    server SRV_5 127.0.0.1:1 disabled

backend shop_api_http
    option httpchk GET /healthz
    http-check disable-on-404
    server SRV_1 127.0.0.1:{{notfound}} check inter 100ms rise 1 fall 1
    server SRV_2 127.0.0.1:{{closed}} check inter 100ms rise 1 fall 1
    server SRV_3 [fd00:10:244:1::9]:8080 weight 0
    server SRV_4 10.244.2.10:8080

backend static
    server s1 192.0.2.10:80
`

// runtimeChanges are what the controller does to slots when endpoints go and come.
var runtimeChanges = []string{
	// A terminating pod's slot freed: in maintenance, still with its address.
	"set server shop_svc_web_8080/SRV_2 state maint",
	// A slot re-used for another pod.
	"set server shop_svc_web_8080/SRV_3 addr 10.244.2.9 port 8080",
	"set server shop_svc_web_8080/SRV_4 state drain",
}

// TestRealHAProxy runs HAProxy on 127.0.0.1 with haproxyConfig, changes servers through its
// admin socket, and reads it through a level-user TCP socket and the Unix socket.
func TestRealHAProxy(t *testing.T) {
	bin, err := exec.LookPath("haproxy")
	if err != nil {
		t.Skip("haproxy is not installed (Debian: apt-get install haproxy)")
	}
	dir := t.TempDir()
	// 404 to health checks: NOLB with disable-on-404.
	notFound := httptest.NewServer(http.NotFoundHandler())
	defer notFound.Close()
	apiPort, notFoundPort, closedPort := freePort(t), strings.TrimPrefix(notFound.URL, "http://127.0.0.1:"), freePort(t)
	api := "127.0.0.1:" + apiPort
	cfg := strings.NewReplacer(
		"{{dir}}", dir,
		"{{api}}", apiPort,
		"{{notfound}}", notFoundPort,
		"{{closed}}", closedPort,
	).Replace(haproxyConfig)
	cfgPath := filepath.Join(dir, "haproxy.cfg")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	logs, err := os.Create(filepath.Join(dir, "haproxy.log"))
	if err != nil {
		t.Fatal(err)
	}
	defer logs.Close()
	cmd := exec.Command(bin, "-f", cfgPath)
	cmd.Stdout, cmd.Stderr = logs, logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})

	admin := newReader(t, "unix://"+filepath.Join(dir, "admin.sock"))
	user := newReader(t, "tcp://"+api)
	waitFor(t, logs.Name(), "the runtime API", func() bool {
		_, err := user.ask(context.Background(), "show servers state static")
		return err == nil
	})
	for _, c := range runtimeChanges {
		a, err := admin.ask(context.Background(), c)
		if err != nil || len(a) != 1 {
			t.Fatalf("%s: %q %v", c, a, err)
		}
		// What each did shows in the reads below.
		t.Logf("%s: %q", c, a[0])
	}
	// Until the checks have run: SRV_1 soft-stopping, SRV_2 down.
	waitFor(t, logs.Name(), "the health checks", func() bool {
		b, _, err := user.ReadBackends(context.Background(), []string{"shop_api_http"})
		return err == nil && len(b) == 1 && len(b[0].Servers) == 4 &&
			b[0].Servers[0].State == "NOLB" && b[0].Servers[1].State == "DOWN"
	})

	if *update {
		for file, line := range map[string]string{
			captureAll:      "show servers state",
			captureBackends: "show servers state " + strings.Join(captureNames, ";show servers state "),
		} {
			out, err := rawAnswer(api, line)
			if err != nil {
				t.Fatal(err)
			}
			out = bytes.ReplaceAll(out, []byte(" "+notFoundPort+" "), []byte(" "+capturedNotFound+" "))
			out = bytes.ReplaceAll(out, []byte(" "+closedPort+" "), []byte(" "+capturedClosed+" "))
			if err := os.WriteFile(filepath.Join("testdata", file), out, 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}

	// The reader as the daemon makes it, over TCP and over the Unix socket.
	for _, addr := range []string{"tcp://" + api, "unix://" + filepath.Join(dir, "admin.sock")} {
		r := readertest.Reader(t, Kind, addr, 2*time.Second)
		all, err := r.Read(context.Background())
		if err != nil {
			t.Fatalf("%s: %v", addr, err)
		}
		if got, want := readertest.Describe(all), wantAll(notFoundPort, closedPort); !slices.Equal(got, want) {
			t.Errorf("%s: Read:\n got %q\nwant %q", addr, got, want)
		}
		some, ok, err := r.ReadBackends(context.Background(), captureNames)
		if err != nil || !ok {
			t.Fatalf("%s: %v %v", addr, ok, err)
		}
		if got, want := readertest.Describe(some), wantBackends(notFoundPort, closedPort); !slices.Equal(got, want) {
			t.Errorf("%s: ReadBackends:\n got %q\nwant %q", addr, got, want)
		}
	}
}

func newReader(t *testing.T, address string) *Reader {
	t.Helper()
	r, err := New(ingress.Target{Address: address, Timeout: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	return r.(*Reader)
}

// rawAnswer is what HAProxy answers to line, byte for byte.
func rawAnswer(addr, line string) ([]byte, error) {
	conn, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := fmt.Fprintf(conn, "%s\n", line); err != nil {
		return nil, err
	}
	var out bytes.Buffer
	_, err = out.ReadFrom(conn)
	return out.Bytes(), err
}

// freePort is a TCP port of 127.0.0.1 nothing listens on (now).
func freePort(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return fmt.Sprint(l.Addr().(*net.TCPAddr).Port)
}

// waitFor polls cond until it holds, or fails the test after 10 s with HAProxy's log.
func waitFor(t *testing.T, logFile, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			logs, _ := os.ReadFile(logFile)
			t.Fatalf("waiting for %s: timed out; haproxy said:\n%s", what, logs)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
