package packets

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"runtime"
	"slices"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/ringbuf"
	"github.com/cilium/ebpf/rlimit"
	"github.com/vishvananda/netlink"
	vnetns "github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
	"k8s.io/utils/clock"

	"github.com/endpointlag/endpointlag/bpf"
	"github.com/endpointlag/endpointlag/probes"
	"github.com/endpointlag/endpointlag/probes/internal/probetest"
)

// loadObjects loads the programs for BPF_PROG_TEST_RUN, or skips saying why.
func loadObjects(t testing.TB, opts Options) *bpf.EndpointlagObjects {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: loads eBPF programs")
	}
	if err := rlimit.RemoveMemlock(); err != nil {
		t.Fatal(err)
	}
	p := New(opts, nil, clock.RealClock{}, slog.New(slog.DiscardHandler))
	objs, err := p.load()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = objs.Close() })
	return objs
}

const (
	protoTCP   = 6
	protoUDP   = 17
	protoICMP  = 1
	protoICMP6 = 58
	flagSYN    = 0x02
	flagRST    = 0x04
	flagACK    = 0x10
)

// packet builds an Ethernet frame: IPv4 or IPv6 (by the addresses) with a TCP, UDP or ICMP
// header. For ICMP, inner is the destination of the quoted packet of a destination unreachable.
func packet(src, dst netip.AddrPort, proto byte, tcpFlags byte, inner netip.Addr) []byte {
	var l4 []byte
	switch proto {
	case protoTCP:
		l4 = make([]byte, 20)
		binary.BigEndian.PutUint16(l4[0:], src.Port())
		binary.BigEndian.PutUint16(l4[2:], dst.Port())
		l4[12] = 5 << 4
		l4[13] = tcpFlags
	case protoUDP:
		l4 = make([]byte, 8)
		binary.BigEndian.PutUint16(l4[0:], src.Port())
		binary.BigEndian.PutUint16(l4[2:], dst.Port())
		binary.BigEndian.PutUint16(l4[4:], 8)
	case protoICMP, protoICMP6:
		// Destination unreachable (type 3, or 1 for ICMPv6), quoting the packet sent to inner.
		l4 = make([]byte, 8)
		l4[0] = 3
		if proto == protoICMP6 {
			l4[0] = 1
		}
		q := ipHeader(dst.Addr(), inner, protoUDP, 8)
		l4 = append(l4, q...)
		l4 = append(l4, make([]byte, 8)...)
	}
	frame := make([]byte, 14)
	if src.Addr().Is4() {
		binary.BigEndian.PutUint16(frame[12:], 0x0800)
	} else {
		binary.BigEndian.PutUint16(frame[12:], 0x86dd)
	}
	frame = append(frame, ipHeader(src.Addr(), dst.Addr(), proto, len(l4))...)
	return append(frame, l4...)
}

// unreachable builds the ICMP destination unreachable with code that node sends to from about the
// packet quoted (from → to, TCP with flags or UDP).
func unreachable(node netip.Addr, from, to netip.AddrPort, proto, tcpFlags, code byte) []byte {
	icmp := byte(protoICMP)
	if node.Is6() {
		icmp = protoICMP6
	}
	quoted := packet(from, to, proto, tcpFlags, netip.Addr{})[14:]
	l4 := make([]byte, 8)
	l4[0] = 3
	if icmp == protoICMP6 {
		l4[0] = 1
	}
	l4[1] = code
	l4 = append(l4, quoted...)
	frame := make([]byte, 14)
	binary.BigEndian.PutUint16(frame[12:], 0x0800)
	if node.Is6() {
		binary.BigEndian.PutUint16(frame[12:], 0x86dd)
	}
	frame = append(frame, ipHeader(node, from.Addr(), icmp, len(l4))...)
	return append(frame, l4...)
}

func ipHeader(src, dst netip.Addr, proto byte, payload int) []byte {
	if src.Is4() {
		h := make([]byte, 20)
		h[0] = 0x45
		binary.BigEndian.PutUint16(h[2:], uint16(20+payload))
		h[8] = 64
		h[9] = proto
		s, d := src.As4(), dst.As4()
		copy(h[12:], s[:])
		copy(h[16:], d[:])
		return h
	}
	h := make([]byte, 40)
	h[0] = 0x60
	binary.BigEndian.PutUint16(h[4:], uint16(payload))
	h[6] = proto
	h[7] = 64
	s, d := src.As16(), dst.As16()
	copy(h[8:], s[:])
	copy(h[24:], d[:])
	return h
}

// tcUnspec is TC_ACT_UNSPEC (TCX_NEXT) as the program's return value: the packet goes on.
const tcUnspec = 0xffffffff

func TestProgramsCount(t *testing.T) {
	objs := loadObjects(t, DefaultOptions())
	pod4, pod6 := netip.MustParseAddr("10.244.1.5"), netip.MustParseAddr("fd00:10:244:1::5")
	dead4, dead6 := netip.MustParseAddr("10.244.1.9"), netip.MustParseAddr("fd00:10:244:1::9")
	client4, client6 := netip.MustParseAddr("10.244.2.7"), netip.MustParseAddr("fd00:10:244:2::7")
	node4, node6 := netip.MustParseAddr("10.99.0.11"), netip.MustParseAddr("fd00:99::11")
	for _, a := range []netip.Addr{pod4, pod6} {
		if err := objs.Terminating.Put(addrKey(a), bpf.EndpointlagCounters{}); err != nil {
			t.Fatal(err)
		}
	}
	for _, a := range []netip.Addr{dead4, dead6} {
		if err := objs.Deleted.Put(addrKey(a), bpf.EndpointlagCounters{}); err != nil {
			t.Fatal(err)
		}
	}
	ap := netip.AddrPortFrom
	var none netip.Addr
	runAll(t, []progPacket{
		// To terminating pods: two SYNs, one ACK, two datagrams of one UDP flow and one of another,
		// each family; a packet to another pod; an ARP frame.
		{"v4 syn", objs.ToPod, packet(ap(client4, 40000), ap(pod4, 8080), protoTCP, flagSYN, none)},
		{"v4 syn again", objs.ToPod, packet(ap(client4, 40001), ap(pod4, 8080), protoTCP, flagSYN, none)},
		{"v4 ack", objs.ToPod, packet(ap(client4, 40000), ap(pod4, 8080), protoTCP, flagACK, none)},
		{"v4 udp", objs.ToPod, packet(ap(client4, 5000), ap(pod4, 53), protoUDP, 0, none)},
		{"v4 udp same flow", objs.ToPod, packet(ap(client4, 5000), ap(pod4, 53), protoUDP, 0, none)},
		{"v4 udp new flow", objs.ToPod, packet(ap(client4, 5001), ap(pod4, 53), protoUDP, 0, none)},
		{"v4 other pod", objs.ToPod, packet(ap(client4, 40000), ap(netip.MustParseAddr("10.244.1.6"), 8080), protoTCP, flagSYN, none)},
		{"v6 syn", objs.ToPod, packet(ap(client6, 40000), ap(pod6, 8080), protoTCP, flagSYN, none)},
		{"v6 syn-ack is no new connection", objs.ToPod, packet(ap(client6, 40000), ap(pod6, 8080), protoTCP, flagSYN|flagACK, none)},
		{"v6 udp", objs.ToPod, packet(ap(client6, 5000), ap(pod6, 53), protoUDP, 0, none)},
		{"arp", objs.ToPod, append(make([]byte, 12), 0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 1)},
		// From terminating pods: a reset refusing the first SYN, an ICMP unreachable, and a
		// normal ACK.
		{"v4 rst from pod", objs.FromPod, packet(ap(pod4, 8080), ap(client4, 40000), protoTCP, flagRST|flagACK, none)},
		{"v4 unreachable from pod", objs.FromPod, packet(ap(pod4, 0), ap(client4, 0), protoICMP, 0, client4)},
		{"v4 ack from pod", objs.FromPod, packet(ap(pod4, 8080), ap(client4, 40000), protoTCP, flagACK, none)},
		{"v6 rst from pod", objs.FromPod, packet(ap(pod6, 8080), ap(client6, 40000), protoTCP, flagRST, none)},
		// To deleted pods, on the uplink: a SYN each family; the node's unreachables about them.
		{"v4 syn from a local pod to deleted", objs.FromPod, packet(ap(client4, 40003), ap(dead4, 8080), protoTCP, flagSYN, none)},
		{"v4 syn to deleted", objs.UplinkIn, packet(ap(client4, 40002), ap(dead4, 8080), protoTCP, flagSYN, none)},
		{"v6 syn to deleted", objs.UplinkIn, packet(ap(client6, 40002), ap(dead6, 8080), protoTCP, flagSYN, none)},
		{"v4 udp to live pod on uplink", objs.UplinkIn, packet(ap(client4, 40002), ap(pod4, 8080), protoUDP, 0, none)},
		{"v4 unreachable for deleted", objs.UplinkOut, packet(ap(node4, 0), ap(client4, 0), protoICMP, 0, dead4)},
		{"v6 unreachable for deleted", objs.UplinkOut, packet(ap(node6, 0), ap(client6, 0), protoICMP6, 0, dead6)},
		{"v4 unreachable for another", objs.UplinkOut, packet(ap(node4, 0), ap(client4, 0), protoICMP, 0, netip.MustParseAddr("10.244.1.6"))},
		// The node's unreachables about terminating pods whose network is gone: a quoted SYN and
		// a quoted datagram are new connections to a dead pod (no counter of the terminating
		// pod moves); a quoted ACK is not.
		{"v4 unreachable for a terminating pod's SYN", objs.UplinkOut, unreachable(node4, ap(client4, 40004), ap(pod4, 8080), protoTCP, flagSYN, 0)},
		{"v6 unreachable for a terminating pod's datagram", objs.UplinkOut, unreachable(node6, ap(client6, 5002), ap(pod6, 53), protoUDP, 0, 0)},
		{"v4 unreachable for a terminating pod's ACK", objs.UplinkOut, unreachable(node4, ap(client4, 40005), ap(pod4, 8080), protoTCP, flagACK, 0)},
	})
	want := map[netip.Addr]bpf.EndpointlagCounters{
		pod4:  {Packets: 6, TcpConns: 2, UdpFlows: 2, Refused: 1, Unreachables: 1},
		pod6:  {Packets: 3, TcpConns: 1, UdpFlows: 1, Refused: 1},
		dead4: {Packets: 2, TcpConns: 2, Unreachables: 1},
		dead6: {Packets: 1, TcpConns: 1, Unreachables: 1},
	}
	for a, w := range want {
		m := objs.Terminating
		if a == dead4 || a == dead6 {
			m = objs.Deleted
		}
		var got bpf.EndpointlagCounters
		if err := m.Lookup(addrKey(a), &got); err != nil {
			t.Fatal(err)
		}
		if got.Bytes == 0 || got.LastPacketNs == 0 || (w.TcpConns+w.UdpFlows > 0) != (got.LastConnNs > 0) {
			t.Errorf("%s: bytes %d, last packet %d, last connection %d", a, got.Bytes, got.LastPacketNs, got.LastConnNs)
		}
		got.Bytes, got.LastPacketNs, got.LastConnNs = 0, 0, 0
		if got != w {
			t.Errorf("%s: counters\n got %+v\nwant %+v", a, got, w)
		}
	}
	// One event per new connection: 6 to terminating pods (3 TCP, 3 UDP), 5 to deleted ones (3
	// seen on their way, 2 from the node's unreachables, with the quoted packet's addresses).
	kinds := map[uint8]int{}
	var ev bpf.EndpointlagEvent
	fromUnreachables := map[string]bool{}
	r := newEventReader(t, objs)
	for r.next(&ev) {
		kinds[ev.Kind]++
		if ev.TimeNs == 0 || ev.Dport == 0 || ev.Sport == 0 {
			t.Errorf("event without time or ports: %+v", ev)
		}
		if ev.Sport == 40004 || ev.Sport == 5002 {
			fromUnreachables[fmt.Sprintf("%s:%d→%s:%d/%d", keyAddr(ev.Saddr), ev.Sport, keyAddr(ev.Daddr), ev.Dport, ev.Proto)] = true
		}
	}
	if kinds[1] != 6 || kinds[2] != 5 || len(kinds) != 2 {
		t.Errorf("events by kind %v, want 6 of kind 1 (terminating) and 5 of kind 2 (deleted)", kinds)
	}
	for _, want := range []string{"10.244.2.7:40004→10.244.1.5:8080/6", "fd00:10:244:2::7:5002→fd00:10:244:1::5:53/17"} {
		if !fromUnreachables[want] {
			t.Errorf("no event %s from the node's unreachable; got %v", want, fromUnreachables)
		}
	}
}

type eventReader struct {
	t *testing.T
	r *ringbuf.Reader
}

// newEventReader reads the events already in the ring buffer, without waiting.
func newEventReader(t *testing.T, objs *bpf.EndpointlagObjects) *eventReader {
	r, err := ringbuf.NewReader(objs.Events)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = r.Close() })
	r.SetDeadline(time.Now())
	return &eventReader{t: t, r: r}
}

func (e *eventReader) next(ev *bpf.EndpointlagEvent) bool {
	rec, err := e.r.Read()
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return false
	}
	if err != nil {
		e.t.Fatal(err)
	}
	if err := binary.Read(bytes.NewReader(rec.RawSample), binary.NativeEndian, ev); err != nil {
		e.t.Fatal(err)
	}
	return true
}

// The maps are bounded: with room for two addresses, a third terminating pod evicts the oldest,
// counted; counts of an address that leaves a map stay in the exported totals.
func TestMapsAreBoundedAndTotalsKept(t *testing.T) {
	opts := DefaultOptions()
	opts.MaxPods = 2
	objs := loadObjects(t, opts)
	pods := &fakePods{}
	p := New(opts, pods, clock.RealClock{}, slog.New(slog.DiscardHandler))
	p.objs = objs
	rec := &probetest.Recorder{}
	t0 := time.Now()
	addr := func(i int) netip.Addr { return netip.AddrFrom4([4]byte{10, 244, 1, byte(i)}) }
	pod := func(i int, gone bool) probes.LocalPod {
		return probes.LocalPod{Pod: probes.PodRef{Namespace: "ns", Name: fmt.Sprint("p", i), UID: fmt.Sprint("u", i)},
			Addrs: []netip.Addr{addr(i)}, T0: t0.Add(time.Duration(i) * time.Second), Gone: gone}
	}
	pods.set(pod(1, false), pod(2, false))
	p.reconcile(rec)
	// Traffic to pod 1 while it terminates.
	if _, err := objs.ToPod.Run(&ebpf.RunOptions{Data: packet(netip.MustParseAddrPort("10.244.2.7:40000"), netip.AddrPortFrom(addr(1), 80), protoTCP, flagSYN, netip.Addr{})}); err != nil {
		t.Fatal(err)
	}
	pods.set(pod(1, false), pod(2, false), pod(3, false))
	p.reconcile(rec)
	if _, ok := p.tracked[addr(1)]; ok || len(p.tracked) != 2 {
		t.Errorf("tracked %v: want pods 2 and 3, the oldest evicted", p.tracked)
	}
	p.reconcile(rec) // the same list again: nothing moves, nothing more is counted
	if _, ok := p.tracked[addr(1)]; ok || len(p.tracked) != 2 {
		t.Errorf("after another reconciliation, tracked %v", p.tracked)
	}
	m := gather(t, p)
	if m["endpointlag_packet_map_evictions_total,map=terminating"] != 1 || m["endpointlag_late_connections_total,origin=client,protocol=tcp"] != 1 {
		t.Errorf("evictions %v, late TCP connections %v; want 1 and 1 (kept after the eviction)",
			m["endpointlag_packet_map_evictions_total,map=terminating"], m["endpointlag_late_connections_total,origin=client,protocol=tcp"])
	}
	// Pod 3 is gone: it moves to the deleted map; forgotten, it leaves it.
	pods.set(pod(2, false), pod(3, true))
	p.reconcile(rec)
	var c bpf.EndpointlagCounters
	if err := objs.Deleted.Lookup(addrKey(addr(3)), &c); err != nil {
		t.Errorf("pod 3 not in the deleted map: %v", err)
	}
	pods.set(pod(2, false))
	p.reconcile(rec)
	if err := objs.Deleted.Lookup(addrKey(addr(3)), &c); err == nil {
		t.Error("pod 3 still in the deleted map after the collector forgot it")
	}
	// A newer pod took pod 2's address: the address is the newer pod's, whatever the order.
	successor := pod(2, false)
	successor.Pod.UID, successor.T0 = "u2-new", t0.Add(time.Hour)
	gone := pod(2, true)
	pods.set(successor, gone)
	p.reconcile(rec)
	if got := p.tracked[addr(2)]; got.pod.UID != "u2-new" || got.deleted {
		t.Errorf("address 2 tracked as %+v, want the successor's, terminating", got)
	}
	if errs := rec.Errors(); len(errs) > 0 {
		t.Errorf("errors: %v", errs)
	}
}

// nodeNetns is a network namespace whose addresses are those of a node: 10.99.0.11, the
// host side of pod veths' 169.254.1.1 and fd00:99::11 (on lo: the kernel has no dummy
// interfaces here). The probe lists them as the node's own.
func nodeNetns(t *testing.T) *os.File {
	name, fd := probetest.Netns(t, "eltest-pkt-prog-", "ip")
	for _, a := range []string{"10.99.0.11/32", "169.254.1.1/32", "fd00:99::11/128"} {
		run(t, "ip", "-n", name, "addr", "add", a, "dev", "lo")
	}
	run(t, "ip", "-n", name, "link", "set", "lo", "up")
	return fd
}

// progProbe is a probe over loaded objects in a node namespace, with no interface attached:
// reconcile fills its maps, BPF_PROG_TEST_RUN runs its programs.
func progProbe(t *testing.T, pods *fakePods) *Probe {
	t.Helper()
	objs := loadObjects(t, DefaultOptions())
	fd := nodeNetns(t)
	p := NewInNamespace(int(fd.Fd()), DefaultOptions(), pods, clock.RealClock{}, slog.New(slog.DiscardHandler))
	nl, err := netlink.NewHandleAt(vnetns.NsHandle(fd.Fd()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nl.Close)
	p.nl, p.objs = nl, objs
	return p
}

// runAll runs each packet through its program, and fails the test when a program does not let
// the packet go on unchanged.
func runAll(t *testing.T, pkts []progPacket) {
	t.Helper()
	for _, tc := range pkts {
		out := make([]byte, len(tc.pkt))
		ret, err := tc.prog.Run(&ebpf.RunOptions{Data: tc.pkt, DataOut: out})
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		if ret != tcUnspec {
			t.Errorf("%s: returned %#x, want TC_ACT_UNSPEC: the program must let every packet go on", tc.name, ret)
		}
		if string(out) != string(tc.pkt) {
			t.Errorf("%s: the packet was changed", tc.name)
		}
	}
}

type progPacket struct {
	name string
	prog *ebpf.Program
	pkt  []byte
}

// Late and dead connections count only those to ports the pod's endpoints serve (an endpoint of
// port 0 serves every port of its protocol; an address whose endpoints are not known yet is not
// filtered), and those from the node's own addresses apart; packets count all the same. A reply
// to a datagram the pod sent is no new flow.
func TestProgramsCountOnlyClients(t *testing.T) {
	pods := &fakePods{}
	p := progProbe(t, pods)
	pod4, pod6, dead4 := netip.MustParseAddr("10.244.1.5"), netip.MustParseAddr("fd00:10:244:1::5"), netip.MustParseAddr("10.244.1.9")
	client4, client6 := netip.MustParseAddr("10.244.2.7"), netip.MustParseAddr("fd00:10:244:2::7")
	node4, link4, node6 := netip.MustParseAddr("10.99.0.11"), netip.MustParseAddr("169.254.1.1"), netip.MustParseAddr("fd00:99::11")
	ref := func(n string) probes.PodRef { return probes.PodRef{Namespace: "ns", Name: n, UID: "uid-" + n} }
	pods.set(
		probes.LocalPod{Pod: ref("a"), Addrs: []netip.Addr{pod4, pod6}, T0: time.Now(),
			Endpoints: []probes.Endpoint{{Addr: pod4, Port: 8080, Protocol: "TCP"}, {Addr: pod4, Protocol: "UDP"}}},
		probes.LocalPod{Pod: ref("b"), Addrs: []netip.Addr{dead4}, T0: time.Now(), Gone: true,
			Endpoints: []probes.Endpoint{{Addr: dead4, Port: 8080, Protocol: "TCP"}}},
	)
	rec := &probetest.Recorder{}
	p.reconcile(rec)
	ap := netip.AddrPortFrom
	var none netip.Addr
	objs := p.objs
	runAll(t, []progPacket{
		{"client to a served port", objs.ToPod, packet(ap(client4, 40000), ap(pod4, 8080), protoTCP, flagSYN, none)},
		{"client to a port no endpoint lists", objs.ToPod, packet(ap(client4, 40001), ap(pod4, 9999), protoTCP, flagSYN, none)},
		{"the node's address", objs.ToPod, packet(ap(node4, 40002), ap(pod4, 8080), protoTCP, flagSYN, none)},
		{"the veths' link-local address", objs.ToPod, packet(ap(link4, 40003), ap(pod4, 8080), protoTCP, flagSYN, none)},
		{"client datagram, every UDP port served", objs.ToPod, packet(ap(client4, 5000), ap(pod4, 5353), protoUDP, 0, none)},
		{"the pod's own datagram", objs.FromPod, packet(ap(pod4, 6000), ap(client4, 53), protoUDP, 0, none)},
		{"its reply", objs.ToPod, packet(ap(client4, 53), ap(pod4, 6000), protoUDP, 0, none)},
		{"v6, endpoints unknown", objs.ToPod, packet(ap(client6, 40000), ap(pod6, 9999), protoTCP, flagSYN, none)},
		{"v6 from the node", objs.ToPod, packet(ap(node6, 40000), ap(pod6, 22), protoTCP, flagSYN, none)},
		{"to a deleted pod's served port", objs.UplinkIn, packet(ap(client4, 40004), ap(dead4, 8080), protoTCP, flagSYN, none)},
		{"to a deleted pod's other port", objs.UplinkIn, packet(ap(client4, 40005), ap(dead4, 9999), protoTCP, flagSYN, none)},
	})
	wantMetrics(t, p, map[string]float64{
		"endpointlag_late_connections_total,origin=client,protocol=tcp":          2,
		"endpointlag_late_connections_total,origin=node,protocol=tcp":            3,
		"endpointlag_late_connections_total,origin=client,protocol=udp":          1,
		"endpointlag_late_connections_total,origin=node,protocol=udp":            0,
		"endpointlag_terminating_packets_total":                                  8,
		"endpointlag_dead_endpoint_connections_total,origin=client,protocol=tcp": 1,
		"endpointlag_dead_endpoint_connections_total,origin=node,protocol=tcp":   0,
		"endpointlag_dead_endpoint_packets_total":                                2,
	})
	var fromNode []string
	r := newEventReader(t, objs)
	var ev bpf.EndpointlagEvent
	n := 0
	for r.next(&ev) {
		n++
		if o := p.observation(ev); o.FromNode {
			fromNode = append(fromNode, o.Peer.Addr().String())
		}
	}
	slices.Sort(fromNode)
	if n != 7 || fmt.Sprint(fromNode) != "[10.99.0.11 169.254.1.1 fd00:99::11]" {
		t.Errorf("%d events, from the node %v; want 7, 3 of them from the node", n, fromNode)
	}
	if errs := rec.Errors(); len(errs) > 0 {
		t.Errorf("errors: %v", errs)
	}
}

// Errors that are errors: a terminating pod's reset answering a SYN it never accepted is a
// refused connection, one ending an accepted connection a reset; an ICMP "fragmentation needed"
// is no failure, every other destination unreachable (every ICMPv6 one) is; errors sent to the
// node's own addresses (the kubelet's probes) are not a client's.
func TestProgramsErrors(t *testing.T) {
	pods := &fakePods{}
	p := progProbe(t, pods)
	pod4, pod6, dead4 := netip.MustParseAddr("10.244.1.5"), netip.MustParseAddr("fd00:10:244:1::5"), netip.MustParseAddr("10.244.1.9")
	client4, client6, node4 := netip.MustParseAddr("10.244.2.7"), netip.MustParseAddr("fd00:10:244:2::7"), netip.MustParseAddr("10.99.0.11")
	pods.set(
		probes.LocalPod{Pod: probes.PodRef{Namespace: "ns", Name: "a", UID: "a"}, Addrs: []netip.Addr{pod4, pod6}, T0: time.Now()},
		probes.LocalPod{Pod: probes.PodRef{Namespace: "ns", Name: "b", UID: "b"}, Addrs: []netip.Addr{dead4}, T0: time.Now(), Gone: true},
	)
	rec := &probetest.Recorder{}
	p.reconcile(rec)
	ap := netip.AddrPortFrom
	var none netip.Addr
	objs := p.objs
	const (
		portUnreachable   = 3
		hostUnreachable   = 1
		fragNeeded        = 4
		v6PortUnreachable = 4
	)
	runAll(t, []progPacket{
		{"SYN", objs.ToPod, packet(ap(client4, 40000), ap(pod4, 8080), protoTCP, flagSYN, none)},
		{"refused", objs.FromPod, packet(ap(pod4, 8080), ap(client4, 40000), protoTCP, flagRST|flagACK, none)},
		{"SYN accepted", objs.ToPod, packet(ap(client4, 40001), ap(pod4, 8080), protoTCP, flagSYN, none)},
		{"SYN-ACK", objs.FromPod, packet(ap(pod4, 8080), ap(client4, 40001), protoTCP, flagSYN|flagACK, none)},
		{"reset after accepting", objs.FromPod, packet(ap(pod4, 8080), ap(client4, 40001), protoTCP, flagRST, none)},
		{"reset of a connection from before", objs.FromPod, packet(ap(pod4, 8080), ap(client4, 40002), protoTCP, flagRST, none)},
		{"v6 SYN", objs.ToPod, packet(ap(client6, 40000), ap(pod6, 8080), protoTCP, flagSYN, none)},
		{"v6 refused", objs.FromPod, packet(ap(pod6, 8080), ap(client6, 40000), protoTCP, flagRST|flagACK, none)},
		{"SYN from the node", objs.ToPod, packet(ap(node4, 40003), ap(pod4, 8080), protoTCP, flagSYN, none)},
		{"refused to the node", objs.FromPod, packet(ap(pod4, 8080), ap(node4, 40003), protoTCP, flagRST|flagACK, none)},
		{"port unreachable", objs.FromPod, unreachable(pod4, ap(client4, 5000), ap(pod4, 53), protoUDP, 0, portUnreachable)},
		{"host unreachable", objs.FromPod, unreachable(pod4, ap(client4, 5001), ap(pod4, 53), protoUDP, 0, hostUnreachable)},
		{"fragmentation needed", objs.FromPod, unreachable(pod4, ap(client4, 40001), ap(pod4, 8080), protoTCP, flagACK, fragNeeded)},
		{"v6 port unreachable", objs.FromPod, unreachable(pod6, ap(client6, 5000), ap(pod6, 53), protoUDP, 0, v6PortUnreachable)},
		{"port unreachable to the node", objs.FromPod, unreachable(pod4, ap(node4, 5000), ap(pod4, 53), protoUDP, 0, portUnreachable)},
		{"the node: fragmentation needed for a deleted pod", objs.UplinkOut, unreachable(node4, ap(client4, 40004), ap(dead4, 8080), protoTCP, flagACK, fragNeeded)},
		{"the node: fragmentation needed for a terminating pod", objs.UplinkOut, unreachable(node4, ap(client4, 40005), ap(pod4, 8080), protoTCP, flagSYN, fragNeeded)},
		{"the node: host unreachable for a deleted pod", objs.UplinkOut, unreachable(node4, ap(client4, 40006), ap(dead4, 8080), protoTCP, flagSYN, hostUnreachable)},
	})
	wantMetrics(t, p, map[string]float64{
		"endpointlag_terminating_errors_total,kind=refused":       2,
		"endpointlag_terminating_errors_total,kind=reset":         2,
		"endpointlag_terminating_errors_total,kind=unreachable":   3,
		"endpointlag_dead_endpoint_errors_total,kind=unreachable": 1,
	})
	// Events: the four SYNs to the terminating pod; no dead connection from the node's
	// "fragmentation needed" about the terminating pod.
	r := newEventReader(t, objs)
	var ev bpf.EndpointlagEvent
	n := 0
	for r.next(&ev) {
		n++
	}
	if n != 4 {
		t.Errorf("%d events, want 4", n)
	}
}

// A client's SYN that reaches a pod after its deletion began but before the probe tracks its
// address (the collector and the probe learn of the deletion a moment after it) is reported as a
// late connection once the probe tracks it, from the programs' ring of recent SYNs; one before the
// deletion is not, and none is reported twice.
func TestSYNsBeforeTrackingAreReported(t *testing.T) {
	opts := DefaultOptions()
	objs := loadObjects(t, opts)
	pods := &fakePods{}
	p := New(opts, pods, clock.RealClock{}, slog.New(slog.DiscardHandler))
	p.objs = objs
	rec := &probetest.Recorder{}
	podAddr := netip.MustParseAddrPort("10.244.1.9:80")
	syn := func(port uint16) {
		t.Helper()
		if _, err := objs.ToPod.Run(&ebpf.RunOptions{Data: packet(netip.AddrPortFrom(netip.MustParseAddr("10.244.2.7"), port), podAddr, protoTCP, flagSYN, netip.Addr{})}); err != nil {
			t.Fatal(err)
		}
	}
	syn(40001) // before the deletion
	time.Sleep(time.Millisecond)
	t0 := time.Now()
	syn(40002) // after it, before the probe tracks the address
	syn(40003)
	lp := probes.LocalPod{Pod: probes.PodRef{Namespace: "ns", Name: "web", UID: "u1"}, Addrs: []netip.Addr{podAddr.Addr()}, T0: t0}
	pods.set(lp)
	p.reconcile(rec)
	syn(40004) // tracked now: an event of the ring buffer, not of the recent ring
	pods.set(lp)
	p.reconcile(rec)
	var ports []uint16
	for _, o := range rec.Observations() {
		if o.Stage != probes.StageLateConnection {
			continue
		}
		ports = append(ports, o.Peer.Port())
		if o.Pod.UID != "u1" || o.Endpoint.Addr != podAddr.Addr() || o.Endpoint.Port != 80 || o.FromNode || o.Time.Before(t0) {
			t.Errorf("late connection %+v: want pod u1, endpoint %s, from a client, after T0 %s", o, podAddr, t0.Format(time.RFC3339Nano))
		}
	}
	if !slices.Equal(ports, []uint16{40002, 40003}) {
		t.Errorf("late connections reported from the recent SYNs, by client port: %v; want [40002 40003]", ports)
	}
	// Counted too: the two from the rings and the one the programs counted once tracking began.
	if got := gather(t, p)["endpointlag_late_connections_total,origin=client,protocol=tcp"]; got != 3 {
		t.Errorf("late TCP connections from clients: %v; want 3", got)
	}
	// A pod whose SYNs between T0 and its tracking outnumber a CPU's ring: an overrun, counted.
	// The thread stays on one CPU so that the SYNs fill one ring (it ends with the test, locked).
	runtime.LockOSThread()
	var one unix.CPUSet
	one.Set(0)
	if err := unix.SchedSetaffinity(0, &one); err != nil {
		t.Fatal(err)
	}
	t0b := time.Now()
	for i := range int(objs.Recent.MaxEntries()) + 10 {
		src := netip.AddrPortFrom(netip.MustParseAddr("10.244.2.7"), uint16(20000+i))
		if _, err := objs.ToPod.Run(&ebpf.RunOptions{Data: packet(src, netip.MustParseAddrPort("10.244.1.11:80"), protoTCP, flagSYN, netip.Addr{})}); err != nil {
			t.Fatal(err)
		}
	}
	other := probes.LocalPod{Pod: probes.PodRef{Namespace: "ns", Name: "api", UID: "u2"}, Addrs: []netip.Addr{netip.MustParseAddr("10.244.1.10")}, T0: t0b}
	pods.set(lp, other)
	p.reconcile(rec)
	if got := gather(t, p)["endpointlag_packet_recent_overruns_total"]; got != 1 {
		t.Errorf("overruns %v; want 1", got)
	}
	if errs := rec.Errors(); len(errs) > 0 {
		t.Errorf("errors: %v", errs)
	}
}
