package packets

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/vishvananda/netlink"
	"k8s.io/utils/clock"

	"github.com/endpointlag/endpointlag/probes"
	"github.com/endpointlag/endpointlag/probes/internal/inns"
	"github.com/endpointlag/endpointlag/probes/internal/probetest"
)

// fakePods is the collector's list of deleting pods, set by the test.
type fakePods struct {
	mu   sync.Mutex
	pods []probes.LocalPod
	chs  []chan<- struct{}
	// listed counts the probe's calls: one per reconciliation.
	listed int
}

func (f *fakePods) LocalPods() []probes.LocalPod {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.listed++
	return append([]probes.LocalPod(nil), f.pods...)
}

func (f *fakePods) reconciliations() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.listed
}

func (f *fakePods) NotifyLocalPods(ch chan<- struct{}) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.chs = append(f.chs, ch)
}

func (f *fakePods) set(pods ...probes.LocalPod) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.pods = pods
	for _, ch := range f.chs {
		select {
		case ch <- struct{}{}:
		default:
		}
	}
}

// inNS runs f on a thread in the network namespace open as fd: sockets it opens stay there.
func inNS(t testing.TB, fd *os.File, f func() error) {
	t.Helper()
	if err := inns.Do(int(fd.Fd()), f); err != nil {
		t.Fatal(err)
	}
}

func run(t testing.TB, args ...string) {
	t.Helper()
	if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
		t.Fatalf("%s: %v: %s", strings.Join(args, " "), err, out)
	}
}

// lab is a node namespace with one pod namespace behind a veth: the node's side is "vpod", the
// node 10.77.0.1, the pod 10.77.0.2, serving TCP on 8080 (echo) and 9000 (discard) and UDP on 53.
// addClient adds a client: another pod of the node, 10.78.0.2 behind "vcli".
type lab struct {
	node, pod     string
	nodeFD, podFD *os.File
	podAddr       netip.Addr
	client        string
	clientFD      *os.File
	// ifaces are the node's pod veths.
	ifaces []string
}

func newLab(t testing.TB) *lab {
	l := &lab{podAddr: netip.MustParseAddr("10.77.0.2"), ifaces: []string{"vpod"}}
	l.node, l.nodeFD = probetest.Netns(t, "eltest-pkt-node-", "ip")
	l.pod, l.podFD = probetest.Netns(t, "eltest-pkt-pod-", "ip")
	run(t, "ip", "-n", l.node, "link", "add", "vpod", "type", "veth", "peer", "name", "eth0", "netns", l.pod)
	run(t, "ip", "-n", l.node, "addr", "add", "10.77.0.1/24", "dev", "vpod")
	run(t, "ip", "-n", l.pod, "addr", "add", "10.77.0.2/24", "dev", "eth0")
	run(t, "ip", "-n", l.node, "link", "set", "vpod", "up")
	run(t, "ip", "-n", l.pod, "link", "set", "eth0", "up")
	run(t, "ip", "-n", l.pod, "link", "set", "lo", "up")
	run(t, "ip", "-n", l.pod, "route", "add", "default", "via", "10.77.0.1")
	inNS(t, l.podFD, func() error {
		// An echo server, one connection at a time, and a sink that reads every connection.
		if err := serve(t, "10.77.0.2:8080", func(c net.Conn) { _, _ = io.Copy(c, c); c.Close() }); err != nil {
			return err
		}
		if err := serve(t, "10.77.0.2:9000", func(c net.Conn) {
			go func() { _, _ = io.Copy(io.Discard, c); c.Close() }()
		}); err != nil {
			return err
		}
		pc, err := net.ListenPacket("udp", "10.77.0.2:53")
		if err != nil {
			return err
		}
		t.Cleanup(func() { pc.Close() })
		return nil
	})
	return l
}

// addClient adds a client pod, 10.78.0.2, behind the node's veth "vcli"; the node forwards
// between the two pods.
func (l *lab) addClient(t testing.TB) {
	l.client, l.clientFD = probetest.Netns(t, "eltest-pkt-client-", "ip")
	l.ifaces = append(l.ifaces, "vcli")
	run(t, "ip", "-n", l.node, "link", "add", "vcli", "type", "veth", "peer", "name", "eth0", "netns", l.client)
	run(t, "ip", "-n", l.node, "addr", "add", "10.78.0.1/24", "dev", "vcli")
	run(t, "ip", "-n", l.client, "addr", "add", "10.78.0.2/24", "dev", "eth0")
	run(t, "ip", "-n", l.node, "link", "set", "vcli", "up")
	run(t, "ip", "-n", l.client, "link", "set", "eth0", "up")
	run(t, "ip", "-n", l.client, "route", "add", "default", "via", "10.78.0.1")
	run(t, "ip", "netns", "exec", l.node, "sysctl", "-qw", "net.ipv4.ip_forward=1")
}

// connect opens n TCP connections from the namespace open as from to the pod, each exchanging
// a byte.
func (l *lab) connect(t testing.TB, from *os.File, port, n int) (refused int) {
	t.Helper()
	inNS(t, from, func() error {
		for range n {
			c, err := net.DialTimeout("tcp", fmt.Sprintf("10.77.0.2:%d", port), 2*time.Second)
			if err != nil {
				refused++
				continue
			}
			if _, err := c.Write([]byte("x")); err != nil {
				return err
			}
			if port == 8080 {
				if _, err := c.Read(make([]byte, 1)); err != nil {
					return err
				}
			}
			c.Close()
		}
		return nil
	})
	return refused
}

// datagrams sends count UDP datagrams from each of flows sockets of the namespace open as from.
func (l *lab) datagrams(t testing.TB, from *os.File, flows, count int) {
	t.Helper()
	inNS(t, from, func() error {
		for range flows {
			c, err := net.Dial("udp", "10.77.0.2:53")
			if err != nil {
				return err
			}
			for range count {
				if _, err := c.Write([]byte("q")); err != nil {
					return err
				}
			}
			c.Close()
		}
		return nil
	})
}

func startProbe(t testing.TB, l *lab, opts Options, pods probes.LocalPods) (*Probe, *probetest.Recorder, func()) {
	t.Helper()
	p := NewInNamespace(int(l.nodeFD.Fd()), opts, pods, clock.RealClock{}, slog.New(slog.NewTextHandler(io.Discard, nil)))
	rec, stop := probetest.Run(t, p)
	rec.Wait(t, "the programs attached", func() bool { return len(p.attached()) == 2*len(l.ifaces) })
	return p, rec, stop
}

// tcxPrograms counts the TCX programs attached to an interface of the node namespace.
func tcxPrograms(t testing.TB, l *lab, dev string) int {
	n := 0
	inNS(t, l.nodeFD, func() error {
		ifc, err := net.InterfaceByName(dev)
		if err != nil {
			return err
		}
		for _, typ := range []ebpf.AttachType{ebpf.AttachTCXIngress, ebpf.AttachTCXEgress} {
			res, err := link.QueryPrograms(link.QueryOptions{Target: ifc.Index, Attach: typ})
			if err != nil {
				return err
			}
			n += len(res.Programs)
		}
		return nil
	})
	return n
}

// tcFilters counts endpointlag's classic TC filters on an interface of the node namespace.
func tcFilters(t testing.TB, l *lab, dev string) int {
	n := 0
	for _, dir := range []string{"ingress", "egress"} {
		out, _ := exec.Command("ip", "netns", "exec", l.node, "tc", "filter", "show", "dev", dev, dir).CombinedOutput()
		n += strings.Count(string(out), filterPrefix)
	}
	return n
}

func gather(t testing.TB, p *Probe) map[string]float64 {
	t.Helper()
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(p.Collector())
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]float64{}
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			key := mf.GetName()
			for _, lp := range m.GetLabel() {
				key += "," + lp.GetName() + "=" + lp.GetValue()
			}
			out[key] = m.GetCounter().GetValue() + m.GetGauge().GetValue()
		}
	}
	return out
}

// wantMetrics fails the test for each metric (name and labels as gather keys them) whose value
// is not the one wanted.
func wantMetrics(t testing.TB, p *Probe, want map[string]float64) {
	t.Helper()
	m := gather(t, p)
	for key, v := range want {
		if m[key] != v {
			t.Errorf("%s = %v, want %v", key, m[key], v)
		}
	}
}

// startWithClient starts the probe in a lab with a client, reconciling at the collector's
// notifications only.
func startWithClient(t testing.TB) (*lab, *fakePods, *Probe, *probetest.Recorder) {
	l := newLab(t)
	l.addClient(t)
	pods := &fakePods{}
	opts := DefaultOptions()
	opts.ReconcileInterval = time.Hour
	p, rec, _ := startProbe(t, l, opts, pods)
	return l, pods, p, rec
}

// Real veth, real TCP and UDP: connections made before the deletion do not count; after it every
// new connection and flow from a client (another pod) to a port the pod serves counts exactly
// once, with an event naming the client; the node's own connections count apart (origin=node,
// events FromNode); a connection to a port no endpoint lists does not count; the pod's reset for
// a served port it no longer listens on is a refused connection; after the pod is gone its counts
// stay in the totals; on exit nothing stays attached. Both attach modes.
func TestVethCountsExactly(t *testing.T) {
	for _, mode := range []string{AttachTCX, AttachTC} {
		t.Run(mode, func(t *testing.T) {
			l := newLab(t)
			l.addClient(t)
			pods := &fakePods{}
			opts := DefaultOptions()
			opts.Attach = mode
			opts.ReconcileInterval = time.Hour // only notifications
			p, rec, stop := startProbe(t, l, opts, pods)
			stopped := false
			defer func() {
				if !stopped {
					stop()
				}
			}()
			want := []string{"from_pod ingress on vcli", "from_pod ingress on vpod", "to_pod egress on vcli", "to_pod egress on vpod"}
			if got := p.attached(); fmt.Sprint(got) != fmt.Sprint(want) {
				t.Fatalf("attached %q, want %q", got, want)
			}
			tcx, tc := tcxPrograms(t, l, "vpod"), tcFilters(t, l, "vpod")
			if mode == AttachTCX && (tcx != 2 || tc != 0) || mode == AttachTC && (tcx != 0 || tc != 2) {
				t.Fatalf("mode %s: %d TCX programs, %d TC filters", mode, tcx, tc)
			}

			l.connect(t, l.clientFD, 8080, 2)
			l.datagrams(t, l.clientFD, 1, 2)
			pod := probes.PodRef{Namespace: "default", Name: "web-1", UID: "uid-1"}
			eps := []probes.Endpoint{{Addr: l.podAddr, Port: 8080, Protocol: "TCP"}, {Addr: l.podAddr, Port: 8081, Protocol: "TCP"},
				{Addr: l.podAddr, Port: 53, Protocol: "UDP"}}
			pods.set(probes.LocalPod{Pod: pod, Addrs: []netip.Addr{l.podAddr}, Endpoints: eps, T0: time.Now()})
			rec.Wait(t, "the pod's address in the map", func() bool {
				p.mu.Lock()
				defer p.mu.Unlock()
				_, ok := p.tracked[l.podAddr]
				return ok
			})
			if refused := l.connect(t, l.clientFD, 8080, 5); refused != 0 {
				t.Fatalf("%d connections refused", refused)
			}
			if refused := l.connect(t, l.clientFD, 8081, 1); refused != 1 {
				t.Fatalf("the closed port accepted a connection")
			}
			l.datagrams(t, l.clientFD, 2, 3)
			if refused := l.connect(t, l.clientFD, 9000, 1); refused != 0 { // served by no endpoint
				t.Fatal("the discard port refused")
			}
			if refused := l.connect(t, l.nodeFD, 8080, 3); refused != 0 { // the kubelet's probes
				t.Fatal("connections from the node refused")
			}

			rec.Wait(t, "11 connection events", func() bool { return len(rec.Observations()) >= 11 })
			fromNode := 0
			for _, o := range rec.Observations() {
				if o.Stage != probes.StageLateConnection || o.Pod != pod || o.Endpoint.Addr != l.podAddr || o.Endpoint.Port == 9000 {
					t.Errorf("observation %+v", o)
				}
				client := o.Peer.Addr() == netip.MustParseAddr("10.78.0.2")
				if o.FromNode {
					fromNode++
				}
				if client == o.FromNode || !client && o.Peer.Addr() != netip.MustParseAddr("10.77.0.1") {
					t.Errorf("observation from %s, FromNode %v", o.Peer, o.FromNode)
				}
				if d := time.Since(o.Time); d < 0 || d > time.Minute {
					t.Errorf("event time %s is %s away from now", o.Time, d)
				}
			}
			if fromNode != 3 {
				t.Errorf("%d events from the node, want 3", fromNode)
			}
			wantMetrics(t, p, map[string]float64{
				"endpointlag_late_connections_total,origin=client,protocol=tcp": 6, // 5 served + 1 refused
				"endpointlag_late_connections_total,origin=client,protocol=udp": 2,
				"endpointlag_late_connections_total,origin=node,protocol=tcp":   3,
				"endpointlag_late_connections_total,origin=node,protocol=udp":   0,
				"endpointlag_terminating_errors_total,kind=refused":             1,
				"endpointlag_terminating_errors_total,kind=reset":               0,
				"endpointlag_terminating_errors_total,kind=unreachable":         0,
				"endpointlag_packet_attachments,role=pod":                       2,
				"endpointlag_packet_blind_interfaces,reason=netkit":             0,
				"endpointlag_packet_blind_interfaces,reason=redirect_peer":      0,
			})
			if m := gather(t, p); m["endpointlag_terminating_packets_total"] < 6+2+6+1+3 {
				t.Errorf("terminating packets %v, want at least a SYN per connection plus data", m["endpointlag_terminating_packets_total"])
			}

			// Gone: the address moves to the deleted map; the totals keep what was counted.
			pods.set(probes.LocalPod{Pod: pod, Addrs: []netip.Addr{l.podAddr}, Endpoints: eps, T0: time.Now(), Gone: true})
			rec.Wait(t, "the address in the deleted map", func() bool {
				p.mu.Lock()
				defer p.mu.Unlock()
				return p.tracked[l.podAddr].deleted
			})
			if after := gather(t, p); after["endpointlag_late_connections_total,origin=client,protocol=tcp"] != 6 {
				t.Errorf("late TCP connections after the pod is gone: %v, want 6", after["endpointlag_late_connections_total,origin=client,protocol=tcp"])
			}

			stop()
			stopped = true
			if n := tcxPrograms(t, l, "vpod") + tcFilters(t, l, "vpod"); n != 0 {
				t.Errorf("%d programs still attached after exit", n)
			}
			if errs := rec.Errors(); len(errs) > 0 {
				t.Errorf("errors: %v", errs)
			}
		})
	}
}

// TestMain makes the test binary, run with ELTEST_PACKETS_CHILD naming a namespace, the probe
// process TestKilledInstanceLeavesNothing kills: it attaches, says so and waits.
func TestMain(m *testing.M) {
	ns, mode := os.Getenv("ELTEST_PACKETS_CHILD"), os.Getenv("ELTEST_PACKETS_MODE")
	if ns == "" {
		os.Exit(m.Run())
	}
	fd, err := os.Open("/run/netns/" + ns)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	opts := DefaultOptions()
	opts.Attach = mode
	p := NewInNamespace(int(fd.Fd()), opts, &fakePods{}, clock.RealClock{}, slog.New(slog.NewTextHandler(os.Stderr, nil)))
	go func() {
		if err := p.Run(context.Background(), &probetest.Recorder{}); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
	}()
	for len(p.attached()) < 2 {
		time.Sleep(10 * time.Millisecond)
	}
	fmt.Println("attached")
	time.Sleep(time.Minute) // until killed
	runtime.KeepAlive(fd)   // the namespace stays open as long as the probe uses it
	os.Exit(1)
}

// After kill -9 of a running instance, the next start removes what it left (classic TC filters;
// TCX links end with the process), and after that instance exits nothing of either remains.
func TestKilledInstanceLeavesNothing(t *testing.T) {
	for _, mode := range []string{AttachTCX, AttachTC} {
		t.Run(mode, func(t *testing.T) {
			l := newLab(t)
			cmd := exec.Command(os.Args[0])
			cmd.Env = append(os.Environ(), "ELTEST_PACKETS_CHILD="+l.node, "ELTEST_PACKETS_MODE="+mode)
			var stderr strings.Builder
			cmd.Stderr = &stderr
			out, err := cmd.StdoutPipe()
			if err != nil {
				t.Fatal(err)
			}
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			// A child that never attaches is killed, which ends the read below.
			timer := time.AfterFunc(30*time.Second, func() { _ = cmd.Process.Kill() })
			defer timer.Stop()
			buf := make([]byte, 4096)
			var seen strings.Builder
			for !strings.Contains(seen.String(), "attached\n") {
				n, err := out.Read(buf)
				if err != nil {
					_ = cmd.Wait()
					t.Fatalf("child: %v; output:\n%s%s", err, seen.String(), stderr.String())
				}
				seen.Write(buf[:n])
			}
			if err := cmd.Process.Kill(); err != nil { // SIGKILL: no cleanup runs
				t.Fatal(err)
			}
			_ = cmd.Wait()
			left := tcFilters(t, l, "vpod")
			if mode == AttachTC && left != 2 || mode == AttachTCX && left != 0 {
				t.Fatalf("after kill -9: %d TC filters left", left)
			}
			if n := tcxPrograms(t, l, "vpod"); n != 0 {
				t.Fatalf("after kill -9: %d TCX programs still attached", n)
			}
			_, _, stop := startProbe(t, l, DefaultOptions(), &fakePods{})
			if n := tcFilters(t, l, "vpod"); n != 0 {
				t.Errorf("the next instance (TCX) left %d TC filters of the killed one", n)
			}
			stop()
			if n := tcxPrograms(t, l, "vpod") + tcFilters(t, l, "vpod"); n != 0 {
				t.Errorf("%d programs attached after the second instance exited", n)
			}
		})
	}
}

// Pod veths that appear after the start are followed through link events: attached when created,
// forgotten when deleted; an uplink gets the uplink programs.
func TestFollowsLinks(t *testing.T) {
	l := newLab(t)
	opts := DefaultOptions()
	opts.Uplinks = []string{"vup"}
	p, rec, _ := startProbe(t, l, opts, &fakePods{})
	run(t, "ip", "-n", l.node, "link", "add", "vpod2", "type", "veth", "peer", "name", "eth1", "netns", l.pod)
	run(t, "ip", "-n", l.node, "link", "add", "vup", "type", "veth", "peer", "name", "vup-peer", "netns", l.pod)
	want := "[from_pod ingress on vpod from_pod ingress on vpod2 to_pod egress on vpod to_pod egress on vpod2 uplink_in ingress on vup uplink_out egress on vup]"
	rec.Wait(t, "the new links attached", func() bool { return fmt.Sprint(p.attached()) == want })
	run(t, "ip", "-n", l.node, "link", "del", "vpod2")
	rec.Wait(t, "the deleted link forgotten", func() bool { return len(p.attached()) == 4 })
	m := gather(t, p)
	if m["endpointlag_packet_attachments,role=pod"] != 1 || m["endpointlag_packet_attachments,role=uplink"] != 1 {
		t.Errorf("attachments: pod %v, uplink %v", m["endpointlag_packet_attachments,role=pod"], m["endpointlag_packet_attachments,role=uplink"])
	}
}

// When the link subscription ends with an error, the probe reports it and subscribes again,
// listing the links anew; what is attached stays attached, once.
func TestLinkEventsResubscribe(t *testing.T) {
	l := newLab(t)
	p := NewInNamespace(int(l.nodeFD.Fd()), DefaultOptions(), &fakePods{}, clock.RealClock{}, slog.New(slog.DiscardHandler))
	var (
		mu    sync.Mutex
		calls int
	)
	p.subscribe = func(ch chan<- netlink.LinkUpdate, done <-chan struct{}, opts netlink.LinkSubscribeOptions) error {
		mu.Lock()
		calls++
		first := calls == 1
		mu.Unlock()
		if !first {
			return netlink.LinkSubscribeWithOptions(ch, done, opts)
		}
		// The first subscription lists the links, then fails as a broken socket would.
		inner := make(chan netlink.LinkUpdate)
		innerDone := make(chan struct{})
		if err := netlink.LinkSubscribeWithOptions(inner, innerDone, opts); err != nil {
			return err
		}
		go func() {
			defer close(ch)
			defer close(innerDone)
			for u := range inner {
				ch <- u
				if u.Attrs().Name == "vpod" {
					opts.ErrorCallback(errors.New("receive: no buffer space available"))
					return
				}
			}
		}()
		return nil
	}
	rec, _ := probetest.Run(t, p)
	rec.Wait(t, "a second subscription", func() bool { mu.Lock(); defer mu.Unlock(); return calls >= 2 })
	rec.Wait(t, "the error reported", func() bool { return len(rec.Errors()) > 0 })
	run(t, "ip", "-n", l.node, "link", "add", "vpod2", "type", "veth", "peer", "name", "eth1", "netns", l.pod)
	want := "[from_pod ingress on vpod from_pod ingress on vpod2 to_pod egress on vpod to_pod egress on vpod2]"
	rec.Wait(t, "links attached through the new subscription", func() bool { return fmt.Sprint(p.attached()) == want })
}

// While the probe tracks no pod's address, its reconciliations grow apart (every interval they
// would be 50 in the half second); a pod that starts terminating is reconciled at once.
func TestIdleReconcilesLessOften(t *testing.T) {
	l := newLab(t)
	pods := &fakePods{}
	opts := DefaultOptions()
	opts.ReconcileInterval = 10 * time.Millisecond
	p, rec, _ := startProbe(t, l, opts, pods)
	start := pods.reconciliations()
	time.Sleep(500 * time.Millisecond)
	if n := pods.reconciliations() - start; n >= 20 {
		t.Errorf("%d reconciliations in 500 ms with nothing tracked, at a 10 ms interval: want them to grow apart (under 20)", n)
	}
	pods.set(probes.LocalPod{Pod: probes.PodRef{Namespace: "default", Name: "web-1", UID: "uid-1"}, Addrs: []netip.Addr{l.podAddr}, T0: time.Now()})
	rec.Wait(t, "the address tracked", func() bool { return !p.idle() })
}

// A terminating pod whose veth is deleted is, for the programs, gone: its address moves to the
// deleted map at once, before the API reports the pod gone, and stays there.
func TestDeletedVethMovesAddressToDeleted(t *testing.T) {
	l := newLab(t)
	pods := &fakePods{}
	opts := DefaultOptions()
	opts.ReconcileInterval = 50 * time.Millisecond
	p, rec, _ := startProbe(t, l, opts, pods)
	pod := probes.PodRef{Namespace: "default", Name: "web-1", UID: "uid-1"}
	pods.set(probes.LocalPod{Pod: pod, Addrs: []netip.Addr{l.podAddr}, T0: time.Now()})
	tracked := func() tracked { p.mu.Lock(); defer p.mu.Unlock(); return p.tracked[l.podAddr] }
	rec.Wait(t, "the address terminating, routed to vpod", func() bool { t := tracked(); return t.pod == pod && !t.deleted && t.ifindex != 0 })
	run(t, "ip", "-n", l.node, "link", "del", "vpod")
	rec.Wait(t, "the address in the deleted map", func() bool { return tracked().deleted })
	time.Sleep(3 * opts.ReconcileInterval) // reconciliations with the pod still terminating in the API
	if !tracked().deleted {
		t.Error("a reconciliation moved the address back to the terminating map")
	}
	if errs := rec.Errors(); len(errs) > 0 {
		t.Errorf("errors: %v", errs)
	}
}

// The exact time of the last new client connection, over all of a pod's addresses, is reported
// once per pod when its addresses leave the terminating map: the pod gone, or no longer listed.
// The node's own later connections do not move it; a pod nothing connected to reports zero.
func TestLastConnectionExact(t *testing.T) {
	l, pods, p, rec := startWithClient(t)
	ref := func(n string) probes.PodRef { return probes.PodRef{Namespace: "default", Name: n, UID: "uid-" + n} }
	t0 := time.Now()
	// web-1 has the lab pod's address and one nothing is sent to; quiet and idle have none.
	web := probes.LocalPod{Pod: ref("web-1"), Addrs: []netip.Addr{l.podAddr, netip.MustParseAddr("10.77.0.3")}, T0: t0}
	quiet := probes.LocalPod{Pod: ref("quiet"), Addrs: []netip.Addr{netip.MustParseAddr("10.77.0.4")}, T0: t0}
	idle := probes.LocalPod{Pod: ref("idle"), Addrs: []netip.Addr{netip.MustParseAddr("10.77.0.5")}, T0: t0}
	pods.set(web, quiet, idle)
	rec.Wait(t, "the addresses in the map", func() bool { p.mu.Lock(); defer p.mu.Unlock(); return len(p.tracked) == 4 })
	l.connect(t, l.clientFD, 8080, 2)
	before := time.Now()
	l.connect(t, l.clientFD, 8080, 1)
	after := time.Now()
	l.connect(t, l.nodeFD, 8080, 2)
	rec.Wait(t, "5 connection events", func() bool { return len(rec.Observations()) >= 5 })

	last := func(pod probes.PodRef) []probes.Observation {
		var out []probes.Observation
		for _, o := range rec.Observations() {
			if o.Stage == probes.StageLastConnection && o.Pod == pod {
				out = append(out, o)
			}
		}
		return out
	}
	// web-1 and quiet are gone, idle no longer listed.
	gone := web
	gone.Gone = true
	quietGone := quiet
	quietGone.Gone = true
	pods.set(gone, quietGone)
	rec.Wait(t, "the last connections", func() bool { return len(last(web.Pod)) > 0 && len(last(quiet.Pod)) > 0 && len(last(idle.Pod)) > 0 })
	o := last(web.Pod)[0]
	if o.Time.Before(before) || o.Time.After(after) || o.Source != Name || !o.Local {
		t.Errorf("web-1's last connection %+v, want between %s and %s (the last client connection)", o, before, after)
	}
	for _, pod := range []probes.PodRef{quiet.Pod, idle.Pod} {
		if o := last(pod)[0]; !o.Time.IsZero() {
			t.Errorf("%s's last connection at %s, want none", pod, o.Time)
		}
	}
	pods.set(gone) // more reconciliations report nothing again
	pods.set(gone, quietGone)
	rec.Wait(t, "the deleted map", func() bool { p.mu.Lock(); defer p.mu.Unlock(); return len(p.tracked) == 3 })
	for _, pod := range []probes.PodRef{web.Pod, quiet.Pod, idle.Pod} {
		if n := len(last(pod)); n != 1 {
			t.Errorf("%s: %d last connections, want 1", pod, n)
		}
	}
	if errs := rec.Errors(); len(errs) > 0 {
		t.Errorf("errors: %v", errs)
	}
}

// An address the collector no longer lists (a live pod took it over) leaves every map at the
// next reconciliation: nothing sent to it counts any more, as a terminating or as a deleted pod's.
func TestAddressLeavingListNotCounted(t *testing.T) {
	for _, gone := range []bool{false, true} {
		t.Run(fmt.Sprint("gone=", gone), func(t *testing.T) {
			l, pods, p, rec := startWithClient(t)
			old := probes.LocalPod{Pod: probes.PodRef{Namespace: "default", Name: "web-1", UID: "uid-1"}, Addrs: []netip.Addr{l.podAddr},
				Endpoints: []probes.Endpoint{{Addr: l.podAddr, Port: 8080, Protocol: "TCP"}, {Addr: l.podAddr, Port: 53, Protocol: "UDP"}},
				T0:        time.Now(), Gone: gone}
			pods.set(old)
			rec.Wait(t, "the address tracked", func() bool { p.mu.Lock(); defer p.mu.Unlock(); return len(p.tracked) == 1 })
			l.connect(t, l.clientFD, 8080, 1)
			l.datagrams(t, l.clientFD, 1, 1)
			counted := func() float64 {
				m := gather(t, p)
				return m["endpointlag_late_connections_total,origin=client,protocol=tcp"] + m["endpointlag_terminating_packets_total"] +
					m["endpointlag_dead_endpoint_connections_total,origin=client,protocol=tcp"] + m["endpointlag_dead_endpoint_packets_total"]
			}
			pods.set() // the address is another pod's now
			rec.Wait(t, "the address untracked", func() bool { p.mu.Lock(); defer p.mu.Unlock(); return len(p.tracked) == 0 })
			// Taken when the address left: the last packets of the connection before (its
			// closing ACK) may come after the connection is closed here.
			was := counted()
			if was == 0 {
				t.Fatal("nothing counted while the address was listed")
			}
			l.connect(t, l.clientFD, 8080, 3)
			l.datagrams(t, l.clientFD, 2, 2)
			if now := counted(); now != was {
				t.Errorf("counted %v after the address left the list, %v before", now, was)
			}
			p.mu.Lock()
			defer p.mu.Unlock()
			for name, m := range map[string]*ebpf.Map{"terminating": p.objs.Terminating, "deleted": p.objs.Deleted,
				"filtered": p.objs.Filtered, "served": p.objs.Served} {
				if n := entries(t, m, func([]byte) bool { return true }); n != 0 {
					t.Errorf("the %s map holds %d entries", name, n)
				}
			}
			// Flows to the address: the pod's, from before, are forgotten.
			to := addrKey(l.podAddr)
			for name, m := range map[string]*ebpf.Map{"udp_flows": p.objs.UdpFlows, "syns": p.objs.Syns} {
				if n := entries(t, m, func(k []byte) bool { return string(k[16:32]) == string(to.B[:]) }); n != 0 {
					t.Errorf("the %s map holds %d flows to %s", name, n, l.podAddr)
				}
			}
		})
	}
}

// entries counts the keys of m that match.
func entries(t testing.TB, m *ebpf.Map, match func(key []byte) bool) int {
	t.Helper()
	n := 0
	var cur any // nil: the first key
	for {
		next := make([]byte, m.KeySize())
		if err := m.NextKey(cur, next); errors.Is(err, ebpf.ErrKeyNotExist) {
			return n
		} else if err != nil {
			t.Fatal(err)
		}
		if match(next) {
			n++
		}
		cur = next
	}
}

// After a failure, the next successful reconciliation reports the probe up again.
func TestUpAgainAfterError(t *testing.T) {
	l := newLab(t)
	pods := &fakePods{}
	opts := DefaultOptions()
	opts.ReconcileInterval = time.Hour
	p := NewInNamespace(int(l.nodeFD.Fd()), opts, pods, clock.RealClock{}, slog.New(slog.DiscardHandler))
	fail := make(chan func(error), 1)
	p.subscribe = func(ch chan<- netlink.LinkUpdate, done <-chan struct{}, o netlink.LinkSubscribeOptions) error {
		select {
		case fail <- o.ErrorCallback:
		default:
		}
		return netlink.LinkSubscribeWithOptions(ch, done, o)
	}
	rec, _ := probetest.Run(t, p)
	rec.Wait(t, "the probe up", rec.Up)
	(<-fail)(errors.New("receive: no buffer space available")) // a transient failure
	rec.Wait(t, "the failure reported", func() bool { return !rec.Up() })
	pods.set(probes.LocalPod{Pod: probes.PodRef{Namespace: "default", Name: "web-1", UID: "uid-1"}, Addrs: []netip.Addr{l.podAddr}, T0: time.Now()})
	rec.Wait(t, "the probe up again after a reconciliation", rec.Up)
}

// serve listens on addr until the test ends and hands each accepted connection to handle.
func serve(t testing.TB, addr string, handle func(net.Conn)) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			handle(c)
		}
	}()
	return nil
}
