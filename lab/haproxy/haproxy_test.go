package haproxy

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"
	"k8s.io/utils/ptr"
)

func ap(s string) netip.AddrPort { return netip.MustParseAddrPort(s) }

func TestSlotsSync(t *testing.T) {
	s := newSlots("ns_svc_web_http", 3)
	steps := []struct {
		name    string
		ready   []string
		changes []change
		left    []string
		addrs   []string
	}{
		{"two endpoints take the first slots, in address order", []string{"10.244.2.3:8080", "10.244.1.9:8080"},
			[]change{{0, ap("10.244.1.9:8080")}, {1, ap("10.244.2.3:8080")}}, nil,
			[]string{"10.244.1.9:8080", "10.244.2.3:8080", ""}},
		{"nothing changed", []string{"10.244.1.9:8080", "10.244.2.3:8080"}, nil, nil,
			[]string{"10.244.1.9:8080", "10.244.2.3:8080", ""}},
		{"one no longer ready frees its slot", []string{"10.244.2.3:8080"},
			[]change{{0, netip.AddrPort{}}}, nil,
			[]string{"", "10.244.2.3:8080", ""}},
		{"a new one takes the first free slot; one too many is left out", []string{"10.244.2.3:8080", "10.244.1.4:8080", "10.244.1.5:8080", "10.244.1.6:8080"},
			[]change{{0, ap("10.244.1.4:8080")}, {2, ap("10.244.1.5:8080")}}, []string{"10.244.1.6:8080"},
			[]string{"10.244.1.4:8080", "10.244.2.3:8080", "10.244.1.5:8080"}},
		{"a freed slot is reused in the same sync", []string{"10.244.1.4:8080", "10.244.1.5:8080", "10.244.1.6:8080"},
			[]change{{1, ap("10.244.1.6:8080")}}, nil,
			[]string{"10.244.1.4:8080", "10.244.1.6:8080", "10.244.1.5:8080"}},
		{"all gone", nil,
			[]change{{0, netip.AddrPort{}}, {1, netip.AddrPort{}}, {2, netip.AddrPort{}}}, nil,
			[]string{"", "", ""}},
	}
	for _, st := range steps {
		var ready []netip.AddrPort
		for _, r := range st.ready {
			ready = append(ready, ap(r))
		}
		changes, left := s.sync(ready)
		var leftS, addrs []string
		for _, a := range left {
			leftS = append(leftS, a.String())
		}
		for _, a := range s.addrs {
			if a.IsValid() {
				addrs = append(addrs, a.String())
			} else {
				addrs = append(addrs, "")
			}
		}
		if !reflect.DeepEqual(changes, st.changes) || !slices.Equal(leftS, st.left) || !slices.Equal(addrs, st.addrs) {
			t.Errorf("%s: changes %v, left %v, slots %q; want %v, %v, %q", st.name, changes, leftS, addrs, st.changes, st.left, st.addrs)
		}
	}
}

func TestCommands(t *testing.T) {
	s := newSlots("demo_svc_web_http", 2)
	got := s.commands([]change{{0, ap("10.244.1.9:8080")}, {1, netip.AddrPort{}}})
	want := []string{
		"set server demo_svc_web_http/SRV_1 addr 10.244.1.9 port 8080",
		"set server demo_svc_web_http/SRV_1 state ready",
		"set server demo_svc_web_http/SRV_2 addr 127.0.0.1 port 1",
		"set server demo_svc_web_http/SRV_2 state maint",
	}
	if !slices.Equal(got, want) {
		t.Errorf("commands:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}

func TestBackendName(t *testing.T) {
	for _, tc := range []struct {
		port corev1.ServicePort
		want string
	}{
		{corev1.ServicePort{Name: "http", Port: 80}, "demo_svc_web_http"},
		{corev1.ServicePort{Port: 8080}, "demo_svc_web_8080"},
	} {
		if got := BackendName("demo", "web", tc.port); got != tc.want {
			t.Errorf("BackendName(%+v) = %s, want %s", tc.port, got, tc.want)
		}
	}
}

func TestParseServersState(t *testing.T) {
	b, err := os.ReadFile("testdata/show-servers-state.txt")
	if err != nil {
		t.Fatal(err)
	}
	got, err := ParseServersState(string(b))
	if err != nil {
		t.Fatal(err)
	}
	want := []ServerState{
		{Backend: "demo_svc_web_http", Server: "SRV_1", Addr: "10.0.0.5", Port: 8080, OpState: 2, AdminState: 4},
		{Backend: "demo_svc_web_http", Server: "SRV_2", Addr: "127.0.0.1", Port: 1, OpState: 0, AdminState: 5},
		{Backend: "demo_svc_web_http", Server: "SRV_3", Addr: "127.0.0.1", Port: 1, OpState: 0, AdminState: 5},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("ParseServersState = %+v, want %+v", got, want)
	}
	// A server set ready keeps the configuration's CMAINT mark (4) and is not in maintenance.
	if !got[0].Ready() || got[0].Maint() || got[1].Ready() || !got[1].Maint() {
		t.Errorf("Ready/Maint: %t/%t, %t/%t", got[0].Ready(), got[0].Maint(), got[1].Ready(), got[1].Maint())
	}
	for _, bad := range []string{"", "Permission denied\n", "1\n# be_name srv_name\nx y\n", "2\n# be_id\n"} {
		if _, err := ParseServersState(bad); err == nil {
			t.Errorf("ParseServersState(%q): no error", bad)
		}
	}
}

func TestSplitAnswers(t *testing.T) {
	out := "IP changed from '127.0.0.1' to '10.0.0.5', port changed from '1' to '8080' by 'stats socket command'\n\n\n"
	got := splitAnswers(out, 2)
	if len(got) != 2 || !setServerOK(got[0]) || got[1] != "" {
		t.Errorf("splitAnswers = %q", got)
	}
	if got := splitAnswers("No such server.\n\n\n", 2); setServerOK(got[0]) {
		t.Errorf("an error counted as success: %q", got)
	}
}

// freePorts returns n TCP ports free on loopback now.
func freePorts(t *testing.T, n int) []int {
	var ports []int
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports
}

// startHAProxy runs Debian's HAProxy on loopback with cfg (no root needed) until the test ends.
func startHAProxy(t *testing.T, cfg Config) {
	t.Helper()
	bin, err := exec.LookPath("haproxy")
	if err != nil {
		t.Skip("haproxy is not installed (Debian package haproxy; make deps installs it)")
	}
	path := filepath.Join(t.TempDir(), "haproxy.cfg")
	if err := os.WriteFile(path, []byte(cfg.Render()), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(bin, "-c", "-f", path).CombinedOutput(); err != nil {
		t.Fatalf("haproxy -c: %v\n%s\n%s", err, out, cfg.Render())
	}
	cmd := exec.Command(bin, "-db", "-f", path)
	cmd.Env = append(os.Environ(), "POD_IP=127.0.0.1")
	var log bytes.Buffer
	cmd.Stdout, cmd.Stderr = &log, &log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		if t.Failed() {
			t.Logf("haproxy's log:\n%s", log.String())
		}
	})
	deadline := time.Now().Add(5 * time.Second)
	for {
		c, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", cfg.AdminPort))
		if err == nil {
			c.Close()
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("haproxy's admin socket: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func runtimeAt(port int) *Runtime {
	return &Runtime{Dial: func(ctx context.Context) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "tcp", fmt.Sprintf("127.0.0.1:%d", port))
	}}
}

func slice(name, svc string, port int32, eps map[string]bool) *discoveryv1.EndpointSlice {
	s := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Namespace: "demo", Name: name, Labels: map[string]string{discoveryv1.LabelServiceName: svc}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: ptr.To("http"), Port: ptr.To(port)}},
	}
	for ip, ready := range eps {
		s.Endpoints = append(s.Endpoints, discoveryv1.Endpoint{Addresses: []string{ip}, Conditions: discoveryv1.EndpointConditions{
			Ready: ptr.To(ready), Serving: ptr.To(true), Terminating: ptr.To(!ready)}})
	}
	return s
}

// The controller against a real HAProxy: ready endpoints fill slots, a terminating one's slot is
// freed, a restarted HAProxy gets its slots again, and the read-only socket refuses changes.
func TestControllerDrivesHAProxy(t *testing.T) {
	ports := freePorts(t, 4)
	b := Backend{Namespace: "demo", Service: "web", Port: "http"}
	cfg := Config{HTTPPort: ports[0], HealthzPort: ports[1], AdminPort: ports[2], UserPort: ports[3], Slots: 4, Backends: []Backend{b}}
	startHAProxy(t, cfg)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "ingress", Name: "haproxy"}, Status: corev1.PodStatus{
		ContainerStatuses: []corev1.ContainerStatus{{Name: "haproxy", ContainerID: "lab://1", State: corev1.ContainerState{Running: &corev1.ContainerStateRunning{}}}}}}
	client := fake.NewClientset(pod, slice("web-a", "web", 8080, map[string]bool{"10.244.1.2": true, "10.244.2.2": true}), slice("other", "other", 8080, map[string]bool{"10.244.1.9": true}))
	ctl := &Controller{Client: client, Namespace: "ingress", Pod: "haproxy", Runtime: runtimeAt(cfg.AdminPort), Backends: cfg.Backends, Slots: cfg.Slots, SyncDelay: 10 * time.Millisecond}
	done := make(chan struct{})
	go func() { ctl.Run(ctx); close(done) }()
	defer func() { cancel(); <-done }()
	user := runtimeAt(cfg.UserPort)
	wait := func(what string, want map[string]string) {
		t.Helper()
		var got map[string]string
		deadline := time.Now().Add(5 * time.Second)
		for time.Now().Before(deadline) {
			states, err := user.ServersState(ctx, b.Name())
			if err != nil {
				t.Fatal(err)
			}
			got = map[string]string{}
			for _, s := range states {
				switch {
				case s.Ready():
					got[s.Server] = fmt.Sprintf("%s:%d", s.Addr, s.Port)
				case !s.Maint() || s.Addr != "127.0.0.1" || s.Port != 1:
					got[s.Server] = fmt.Sprintf("%s:%d op %d admin %d", s.Addr, s.Port, s.OpState, s.AdminState)
				}
			}
			if reflect.DeepEqual(got, want) {
				return
			}
			time.Sleep(20 * time.Millisecond)
		}
		t.Fatalf("%s: ready servers %v, want %v", what, got, want)
	}
	wait("two ready endpoints", map[string]string{"SRV_1": "10.244.1.2:8080", "SRV_2": "10.244.2.2:8080"})

	term := slice("web-a", "web", 8080, map[string]bool{"10.244.1.2": false, "10.244.2.2": true})
	if _, err := client.DiscoveryV1().EndpointSlices("demo").Update(ctx, term, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	wait("one terminating", map[string]string{"SRV_2": "10.244.2.2:8080"})

	more := slice("web-b", "web", 8080, map[string]bool{"10.244.1.3": true})
	if _, err := client.DiscoveryV1().EndpointSlices("demo").Create(ctx, more, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	wait("a new one in another slice takes the freed slot", map[string]string{"SRV_1": "10.244.1.3:8080", "SRV_2": "10.244.2.2:8080"})

	// The slots set ready so far, then freed, as the controller recorded them.
	var log []string
	for _, c := range ctl.Changes() {
		log = append(log, c.Server+"="+c.Addr.String())
	}
	if want := []string{"SRV_1=10.244.1.2:8080", "SRV_2=10.244.2.2:8080", "SRV_1=invalid AddrPort", "SRV_1=10.244.1.3:8080"}; !slices.Equal(log, want) {
		t.Errorf("changes %q, want %q", log, want)
	}

	// A new HAProxy process (another container ID) has only free slots: set them all again.
	if _, err := user.Exec(ctx, "show info"); err != nil {
		t.Fatal(err)
	}
	admin := runtimeAt(cfg.AdminPort)
	if err := admin.SetServers(ctx, []string{"set server demo_svc_web_http/SRV_1 state maint", "set server demo_svc_web_http/SRV_2 state maint"}); err != nil {
		t.Fatal(err)
	}
	pod.Status.ContainerStatuses[0].ContainerID = "lab://2"
	if _, err := client.CoreV1().Pods("ingress").UpdateStatus(ctx, pod, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	wait("after a restart", map[string]string{"SRV_1": "10.244.1.3:8080", "SRV_2": "10.244.2.2:8080"})

	err := user.SetServers(ctx, []string{"set server demo_svc_web_http/SRV_3 state ready"})
	if err == nil || !strings.Contains(err.Error(), "Permission denied") {
		t.Errorf("a change through the level-user socket: %v, want Permission denied", err)
	}
}
