package ipvs

import (
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
	"k8s.io/utils/clock"

	"github.com/endpointlag/endpointlag/probes"
	"github.com/endpointlag/endpointlag/probes/internal/probetest"
	"github.com/endpointlag/endpointlag/probes/internal/proxymode"
)

// The attributes below are laid out as the kernel's ip_vs_genl_fill_service and
// ip_vs_genl_fill_dest write them: family and protocol u16 and weight u32 in host order, ports
// big-endian, addresses as a 16-byte union nf_inet_addr.

func u16(v uint16) []byte { b := make([]byte, 2); binary.NativeEndian.PutUint16(b, v); return b }
func u32(v uint32) []byte { b := make([]byte, 4); binary.NativeEndian.PutUint32(b, v); return b }
func be16(v uint16) []byte {
	b := make([]byte, 2)
	binary.BigEndian.PutUint16(b, v)
	return b
}

func inet(a netip.Addr) []byte {
	b := make([]byte, 16)
	copy(b, a.AsSlice())
	return b
}

func attrs(t testing.TB, as ...netlink.Attribute) []byte {
	b, err := netlink.MarshalAttributes(as)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func serviceAttrs(t testing.TB, af uint16, addr string, port uint16, proto uint16) []byte {
	return attrs(t,
		netlink.Attribute{Type: svcAttrAF, Data: u16(af)},
		netlink.Attribute{Type: svcAttrProtocol, Data: u16(proto)},
		netlink.Attribute{Type: svcAttrAddr, Data: inet(netip.MustParseAddr(addr))},
		netlink.Attribute{Type: svcAttrPort, Data: be16(port)},
		netlink.Attribute{Type: 6, Data: []byte("rr\x00")}, // IPVS_SVC_ATTR_SCHED_NAME
	)
}

func destAttrs(t testing.TB, addr string, port uint16, weight uint32, withFamily bool) []byte {
	as := []netlink.Attribute{
		{Type: destAttrAddr, Data: inet(netip.MustParseAddr(addr))},
		{Type: destAttrPort, Data: be16(port)},
		{Type: 3, Data: u32(0)}, // IPVS_DEST_ATTR_FWD_METHOD: masquerade
		{Type: destAttrWeight, Data: u32(weight)},
	}
	if withFamily {
		af := uint16(unix.AF_INET)
		if netip.MustParseAddr(addr).Is6() {
			af = unix.AF_INET6
		}
		as = append(as, netlink.Attribute{Type: destAttrAddrFamily, Data: u16(af)})
	}
	return attrs(t, as...)
}

func TestDecode(t *testing.T) {
	vs, err := decodeService(serviceAttrs(t, unix.AF_INET, "10.96.0.10", 53, unix.IPPROTO_UDP))
	if err != nil || virtualKey(vs) != "10.96.0.10:53/UDP" {
		t.Errorf("service: %q %v", virtualKey(vs), err)
	}
	vs6, err := decodeService(serviceAttrs(t, unix.AF_INET6, "fd00:10:96::a", 80, unix.IPPROTO_TCP))
	if err != nil || virtualKey(vs6) != "[fd00:10:96::a]:80/TCP" {
		t.Errorf("IPv6 service: %q %v", virtualKey(vs6), err)
	}
	for _, withFamily := range []bool{true, false} {
		rs, err := decodeDest(destAttrs(t, "10.244.1.5", 8080, 1, withFamily), unix.AF_INET)
		if err != nil || rs.addr.String() != "10.244.1.5" || rs.port != 8080 || rs.weight != 1 {
			t.Errorf("dest (family attribute %v): %+v %v", withFamily, rs, err)
		}
	}
	if _, err := decodeDest(attrs(t, netlink.Attribute{Type: destAttrAddr, Data: []byte{1, 2}}), unix.AF_INET); err == nil {
		t.Error("a 2-byte address decoded")
	}
}

// kube-proxy takes a real server out of rotation by setting its weight to 0 and deletes it
// later: the removal counts at the weight change, once.
func TestRemovedAtWeightZero(t *testing.T) {
	vs, _ := decodeService(serviceAttrs(t, unix.AF_INET, "10.96.0.20", 80, unix.IPPROTO_TCP))
	dest := func(addr string, weight uint32) realServer {
		rs, err := decodeDest(destAttrs(t, addr, 8080, weight, true), unix.AF_INET)
		if err != nil {
			t.Fatal(err)
		}
		return rs
	}
	build := func(dests ...realServer) table {
		tb := table{}
		for _, d := range dests {
			tb.add(vs, d)
		}
		return tb
	}
	steps := []struct {
		t    table
		want []string
	}{
		{build(dest("10.244.1.5", 1), dest("10.244.2.6", 1)), nil},
		{build(dest("10.244.1.5", 0), dest("10.244.2.6", 1)), []string{"10.244.1.5:8080/TCP"}},
		{build(dest("10.244.2.6", 1)), nil}, // deleted later: nothing new
		{table{}, []string{"10.244.2.6:8080/TCP"}},
	}
	var prev table
	for i, s := range steps {
		var got []string
		if prev != nil {
			for _, ep := range removed(prev, s.t) {
				got = append(got, ep.String())
			}
		}
		if !slices.Equal(got, s.want) {
			t.Errorf("step %d: removed %q, want %q", i, got, s.want)
		}
		prev = s.t
	}
}

func FuzzDecode(f *testing.F) {
	f.Add(serviceAttrs(f, unix.AF_INET, "10.96.0.10", 53, unix.IPPROTO_UDP), destAttrs(f, "10.244.1.5", 8080, 1, true))
	f.Add(serviceAttrs(f, unix.AF_INET6, "fd00::1", 443, unix.IPPROTO_TCP), destAttrs(f, "fd00::5", 8443, 0, false))
	f.Fuzz(func(t *testing.T, svc, dest []byte) {
		vs, err := decodeService(svc)
		if err != nil || !vs.addr.IsValid() {
			return
		}
		// What decodes encodes back, as the kernel lays it out, to the same virtual server.
		again, err := decodeService(serviceAttrs(t, vs.af, vs.addr.String(), vs.port, vs.protocol))
		if err != nil || virtualKey(again) != virtualKey(vs) {
			t.Errorf("service %q does not round-trip: %q, %v", virtualKey(vs), virtualKey(again), err)
		}
		rs, err := decodeDest(dest, vs.af)
		if err != nil || !rs.addr.IsValid() {
			return
		}
		back, err := decodeDest(destAttrs(t, rs.addr.String(), rs.port, rs.weight, true), vs.af)
		if err != nil || back != rs {
			t.Errorf("real server %+v does not round-trip: %+v, %v", rs, back, err)
		}
	})
}

type statusSink struct {
	mu       sync.Mutex
	statuses []probes.Status
	errs     []error
}

func (s *statusSink) Observe(probes.Observation) {}
func (s *statusSink) SetStatus(_ string, st probes.Status) {
	s.mu.Lock()
	s.statuses = append(s.statuses, st)
	s.mu.Unlock()
}
func (s *statusSink) Error(_ string, err error) {
	s.mu.Lock()
	s.errs = append(s.errs, err)
	s.mu.Unlock()
}

// Without IPVS in the kernel (as on this project's machines) or without a virtual server, the
// probe is inactive: synced, up, and its stage not awaited.
func TestInactiveWithoutVirtualServers(t *testing.T) {
	if _, err := read(); err == nil {
		if tb, _ := read(); len(tb) > 0 {
			t.Skip("this kernel has IPVS virtual servers; the test wants none")
		}
	}
	sink := &statusSink{}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- New(10*time.Millisecond, clock.RealClock{}, slog.New(slog.NewTextHandler(io.Discard, nil))).Run(ctx, sink)
	}()
	time.Sleep(50 * time.Millisecond)
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	sink.mu.Lock()
	defer sink.mu.Unlock()
	if len(sink.statuses) < 2 || len(sink.errs) > 0 {
		t.Fatalf("statuses %+v, errors %v", sink.statuses, sink.errs)
	}
	for _, st := range sink.statuses {
		if !st.Inactive || !st.Synced || !st.Up {
			t.Errorf("status %+v, want up, synced and inactive", st)
		}
	}
}

// Only kube-proxy's IPVS mode makes kube-ipvs0: virtual servers keepalived or kube-vip made leave
// the probe inactive, and so does kube-proxy naming another mode.
func TestActiveOnlyInKubeProxysIPVSMode(t *testing.T) {
	vs := virtualServer{af: unix.AF_INET, protocol: unix.IPPROTO_TCP, addr: netip.MustParseAddr("10.0.0.100"), port: 80}
	servers := table{}
	servers.add(vs, realServer{addr: netip.MustParseAddr("10.0.1.1"), port: 80, weight: 1})
	for _, tc := range []struct {
		name   string
		dummy  bool
		mode   string
		active bool
	}{
		{"keepalived's virtual server", false, "", false},
		{"kube-proxy IPVS mode", true, "ipvs", true},
		{"kube-proxy unreachable, kube-ipvs0 present", true, "", true},
		{"kube-ipvs0 left behind, kube-proxy in nftables mode", true, "nftables", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := New(time.Millisecond, clock.RealClock{}, slog.New(slog.NewTextHandler(io.Discard, nil)))
			p.read = func() (table, error) { return servers, nil }
			p.dummy = func() bool { return tc.dummy }
			if tc.mode != "" {
				srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { fmt.Fprint(w, tc.mode) }))
				defer srv.Close()
				p.KubeProxy = proxymode.Asker{URL: srv.URL}
			}
			rec, _ := probetest.Run(t, p)
			rec.Wait(t, "a read", func() bool { _, ok := p.Reaches(probes.ServiceRef{}, probes.Endpoint{}); return ok })
			rec.Wait(t, "the status", func() bool { return rec.Status().Inactive != tc.active })
			reach, _ := p.Reaches(probes.ServiceRef{}, probes.Endpoint{Addr: netip.MustParseAddr("10.0.1.1"), Port: 80, Protocol: "TCP"})
			if len(reach) != 1 || reach[0].Path != probes.PathCluster {
				t.Errorf("the real server is not reached: %+v", reach)
			}
		})
	}
}

// While inactive (no IPVS in the kernel, or no kube-ipvs0) the probe reads less and less often,
// and at every poll interval again once kube-proxy's IPVS mode shows up.
func TestReadsLessOftenWhileInactive(t *testing.T) {
	vs := virtualServer{af: unix.AF_INET, protocol: unix.IPPROTO_TCP, addr: netip.MustParseAddr("10.96.0.10"), port: 80}
	servers := table{}
	servers.add(vs, realServer{addr: netip.MustParseAddr("10.0.1.1"), port: 80, weight: 1})
	// Each read: whether IPVS is there, and whether kube-ipvs0 is.
	script := []struct{ ipvs, dummy bool }{
		{false, false}, {false, false}, {false, false}, {false, false}, {false, false}, {false, false},
		{true, true}, {true, true},
		{true, false}, {true, false},
	}
	p := New(time.Second, clock.RealClock{}, slog.New(slog.NewTextHandler(io.Discard, nil)))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var n int
	p.read = func() (table, error) {
		if n == len(script) {
			cancel()
			<-ctx.Done()
			return nil, errNoIPVS
		}
		if !script[n].ipvs {
			return nil, errNoIPVS
		}
		return servers, nil
	}
	p.dummy = func() bool { return script[n].dummy }
	var waits []time.Duration
	p.after = func(d time.Duration) <-chan time.Time {
		if n < len(script) {
			waits = append(waits, d)
			n++
		}
		ch := make(chan time.Time, 1)
		ch <- time.Time{}
		return ch
	}
	if err := p.Run(ctx, &statusSink{}); err != nil {
		t.Fatal(err)
	}
	s := time.Second
	want := []time.Duration{s, 2 * s, 4 * s, 8 * s, 10 * s, 10 * s, s, s, s, 2 * s}
	if len(waits) != len(want) {
		t.Fatalf("waits %v, want about %v", waits, want)
	}
	for i, w := range want {
		if waits[i] < w-w/10 || waits[i] > w+w/10 {
			t.Errorf("wait %d after %+v: %s, want %s ± 10 %%", i, script[i], waits[i], w)
		}
	}
}
