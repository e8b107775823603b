package ingress

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/endpointlag/endpointlag/probes/internal/probetest"
)

// listenerEnv makes the test binary an admin interface inside a pod instead of running tests:
// it serves its token over HTTP on the TCP address and on the socket path given, until its
// stdin closes.
const listenerEnv = "ENDPOINTLAG_TEST_POD_ADMIN"

func TestMain(m *testing.M) {
	if spec := os.Getenv(listenerEnv); spec != "" {
		os.Exit(serveAdmin(spec))
	}
	os.Exit(m.Run())
}

func serveAdmin(spec string) int {
	parts := strings.SplitN(spec, ",", 3)
	if len(parts) != 3 {
		fmt.Fprintf(os.Stderr, "%s=%q is not addr,socket,token\n", listenerEnv, spec)
		return 2
	}
	tcpAddr, sock, token := parts[0], parts[1], parts[2]
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { fmt.Fprint(w, token) }), ReadHeaderTimeout: 5 * time.Second}
	for _, l := range []struct{ network, addr string }{{"tcp", tcpAddr}, {"unix", sock}} {
		ln, err := net.Listen(l.network, l.addr)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		go func() { _ = srv.Serve(ln) }()
	}
	fmt.Println("ready")
	_, _ = io.Copy(io.Discard, os.Stdin)
	return 0
}

// An admin interface on the loopback of a pod's network namespace, and on a unix socket of that
// pod, is reached by the pod's IP alone; the daemon's own loopback is not asked.
func TestPodDialerEntersThePod(t *testing.T) {
	ns, _ := probetest.Netns(t, "elingress", "ip")
	podIP := netip.MustParseAddr("10.99.7.7")
	for _, args := range [][]string{
		{"link", "set", "lo", "up"},
		{"link", "add", "eth0", "type", "veth", "peer", "name", "eth1"},
		{"addr", "add", podIP.String() + "/32", "dev", "eth0"},
		{"link", "set", "eth0", "up"},
	} {
		if out, err := exec.Command("ip", append([]string{"-n", ns}, args...)...).CombinedOutput(); err != nil {
			t.Fatalf("ip %v: %v: %s", args, err, out)
		}
	}
	// A port nothing in this test's own namespace listens on: the pod's loopback is another.
	probe, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := probe.Addr().String()
	probe.Close()
	sock := filepath.Join(t.TempDir(), "admin.sock")
	token := fmt.Sprintf("inside-%d", os.Getpid())
	cmd := exec.Command("ip", "netns", "exec", ns, os.Args[0])
	cmd.Env = append(os.Environ(), listenerEnv+"="+addr+","+sock+","+token)
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		stdin.Close()
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
	})
	if line, err := bufio.NewReader(stdout).ReadString('\n'); err != nil || line != "ready\n" {
		t.Fatalf("the pod's admin did not start: %q %v", line, err)
	}

	if _, err := http.Get("http://" + addr + "/"); err == nil {
		t.Fatalf("%s answers in the test's own namespace: the test proves nothing", addr)
	}
	d := newPodDialer("/proc", podIP)
	client := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DialContext: d.DialContext}}
	get := func(url string) string {
		t.Helper()
		resp, err := client.Get(url)
		if err != nil {
			t.Fatalf("GET %s inside the pod: %v", url, err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return string(b)
	}
	if got := get("http://" + addr + "/"); got != token {
		t.Errorf("TCP on the pod's loopback answered %q, want %q", got, token)
	}
	unix := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return d.DialContext(ctx, "unix", sock)
	}}}
	resp, err := unix.Get("http://pod/")
	if err != nil {
		t.Fatalf("the pod's unix socket: %v", err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if string(b) != token {
		t.Errorf("the pod's unix socket answered %q, want %q", b, token)
	}

	nobody := newPodDialer("/proc", netip.MustParseAddr("10.99.7.8"))
	if _, err := nobody.DialContext(context.Background(), "tcp", addr); err == nil || !strings.Contains(err.Error(), "no network namespace holds the pod IP 10.99.7.8") {
		t.Errorf("a pod IP no namespace holds: %v", err)
	}
}
