package packets

import (
	"bytes"
	"encoding/binary"
	"log/slog"
	"net/netip"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"k8s.io/utils/clock"

	"github.com/endpointlag/endpointlag/bpf"
	"github.com/endpointlag/endpointlag/probes"
)

// rawEvent is a ring-buffer record as the programs write it.
func rawEvent(t testing.TB, saddr, daddr string, timeNs uint64, sport, dport uint16, proto, kind, fromNode uint8) []byte {
	e := bpf.EndpointlagEvent{Saddr: addrKey(netip.MustParseAddr(saddr)), Daddr: addrKey(netip.MustParseAddr(daddr)),
		TimeNs: timeNs, Sport: sport, Dport: dport, Proto: proto, Kind: kind, FromNode: fromNode}
	var b bytes.Buffer
	if err := binary.Write(&b, binary.NativeEndian, &e); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

// FuzzEvent decodes a ring-buffer record as readEvents does and describes it as observation
// does: a record of the event's size (or more) decodes, and encodes back to its bytes; the
// observation's addresses are valid and unmapped, its ports, protocol, stage and source the
// record's, and a tracked address names its pod.
func FuzzEvent(f *testing.F) {
	// Real-shaped records: SYNs and UDP flows to terminating (kind 1) and deleted (kind 2) pods,
	// IPv4 as the programs key it (IPv4-mapped) and IPv6, from a client and from the node.
	f.Add(rawEvent(f, "10.244.2.9", "10.244.1.5", 1_234_567_890_123, 40001, 8080, unix.IPPROTO_TCP, 1, 0))
	f.Add(rawEvent(f, "10.99.0.11", "10.244.1.5", 5_000_000_000, 5002, 53, unix.IPPROTO_UDP, 2, 1))
	f.Add(rawEvent(f, "fd00:99::11", "fd00:10:244:1::5", 7, 40004, 443, unix.IPPROTO_TCP, 2, 1))
	f.Add(rawEvent(f, "169.254.1.1", "10.244.1.5", ^uint64(0), 1, 1, unix.IPPROTO_SCTP, 0, 2))
	f.Add([]byte{1, 2, 3})
	addr := netip.MustParseAddr("10.244.1.5")
	pod := probes.PodRef{Namespace: "shop", Name: "web-7d4b9-x2k4p", UID: "uid-1"}
	f.Fuzz(func(t *testing.T, raw []byte) {
		var e bpf.EndpointlagEvent
		size := binary.Size(e)
		err := binary.Read(bytes.NewReader(raw), binary.NativeEndian, &e)
		if (err == nil) != (len(raw) >= size) {
			t.Fatalf("a record of %d bytes (the event is %d) decoded with error %v", len(raw), size, err)
		}
		if err != nil {
			return
		}
		var back bytes.Buffer
		if err := binary.Write(&back, binary.NativeEndian, &e); err != nil || !bytes.Equal(back.Bytes(), raw[:size]) {
			t.Fatalf("%x decoded to %+v, which encodes to %x (%v)", raw[:size], e, back.Bytes(), err)
		}
		p := New(DefaultOptions(), nil, clock.RealClock{}, slog.New(slog.DiscardHandler))
		p.tracked[addr] = tracked{pod: pod}
		o := p.observation(e)
		for _, a := range []netip.Addr{o.Endpoint.Addr, o.Peer.Addr()} {
			if !a.IsValid() || a.Is4In6() {
				t.Errorf("address %s in %+v", a, o)
			}
		}
		if o.Endpoint.Addr != netip.AddrFrom16(e.Daddr.B).Unmap() || o.Peer.Addr() != netip.AddrFrom16(e.Saddr.B).Unmap() {
			t.Errorf("%+v described as %s → %s", e, o.Peer, o.Endpoint)
		}
		if o.Endpoint.Port != e.Dport || o.Peer.Port() != e.Sport || o.FromNode != (e.FromNode != 0) {
			t.Errorf("%+v described as %+v", e, o)
		}
		wantProto, wantStage := "TCP", probes.StageLateConnection
		if e.Proto == unix.IPPROTO_UDP {
			wantProto = "UDP"
		}
		if e.Kind == eventDeleted {
			wantStage = probes.StageDeadConnection
		}
		if o.Endpoint.Protocol != wantProto || o.Stage != wantStage || o.Source != Name || !o.Local {
			t.Errorf("%+v described as %+v", e, o)
		}
		if (o.Endpoint.Addr == addr) != (o.Pod == pod) {
			t.Errorf("event to %s named pod %+v", o.Endpoint.Addr, o.Pod)
		}
		if !o.Time.Equal(time.Unix(0, int64(e.TimeNs))) {
			t.Errorf("time %d ns described as %s", e.TimeNs, o.Time)
		}
	})
}
