package packets

import (
	"fmt"
	"net"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"

	"github.com/endpointlag/endpointlag/bpf"
	"github.com/endpointlag/endpointlag/probes"
)

// BenchmarkProgram measures the to_pod program per packet with BPF_PROG_TEST_RUN and repeat, the
// terminating map holding 65,536 addresses: a miss (the usual packet, to a pod not terminating)
// and a hit (a packet to a terminating pod: counters updated, no new connection), both TCP ACKs;
// a client's SYN to a pod not terminating (counted per veth and written to the CPU's ring of
// recent SYNs); "empty" is a program that only returns, the test run's own cost.
//
// Run: sudo go test ./probes/packets -run '^$' -bench Program
func BenchmarkProgram(b *testing.B) {
	opts := DefaultOptions()
	opts.MaxPods = 1 << 16
	objs := loadObjects(b, opts)
	base := netip.MustParseAddr("10.128.0.0").As4()
	for i := range opts.MaxPods {
		a := base
		a[2], a[3] = byte(i>>8), byte(i)
		if err := objs.Terminating.Put(addrKey(netip.AddrFrom4(a)), bpf.EndpointlagCounters{}); err != nil {
			b.Fatal(err)
		}
	}
	// The test run's own cost per repeat: a program that only returns.
	empty, err := ebpf.NewProgram(&ebpf.ProgramSpec{Type: ebpf.SchedCLS, License: "GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, -1), asm.Return()}})
	if err != nil {
		b.Fatal(err)
	}
	defer empty.Close()
	client := netip.MustParseAddrPort("10.244.2.7:40000")
	for _, tc := range []struct {
		name  string
		prog  *ebpf.Program
		dst   netip.Addr
		flags byte
	}{
		{"empty", empty, netip.MustParseAddr("10.244.1.5"), flagACK},
		{"miss", objs.ToPod, netip.MustParseAddr("10.244.1.5"), flagACK},
		{"hit", objs.ToPod, netip.MustParseAddr("10.128.17.42"), flagACK},
		{"syn-miss", objs.ToPod, netip.MustParseAddr("10.244.1.5"), flagSYN},
	} {
		b.Run(tc.name, func(b *testing.B) {
			pkt := packet(client, netip.AddrPortFrom(tc.dst, 8080), protoTCP, tc.flags, netip.Addr{})
			const repeat = 1_000_000
			var total time.Duration
			for b.Loop() {
				_, d, err := tc.prog.Benchmark(pkt, repeat, nil)
				if err != nil {
					b.Fatal(err)
				}
				total += d
			}
			b.ReportMetric(float64(total.Nanoseconds())/float64(b.N), "ns/packet")
		})
	}
}

// BenchmarkVethThroughput sends TCP over a veth pair for 1 s at a time, alternating within each
// of 10 rounds: no program, the programs attached with the pod not terminating (every packet a
// miss), and attached with the pod terminating (every packet a hit). Medians, side by side in
// one run: single runs on this machine vary by ±20 %.
//
// Run: sudo go test ./probes/packets -run '^$' -bench VethThroughput -benchtime 1x
func BenchmarkVethThroughput(b *testing.B) {
	for b.Loop() {
		l := newLab(b)
		rates := map[string][]float64{}
		for range 10 {
			rates["none"] = append(rates["none"], l.stream(b, time.Second))
			pods := &fakePods{}
			opts := DefaultOptions()
			opts.ReconcileInterval = 50 * time.Millisecond
			_, _, stop := startProbe(b, l, opts, pods)
			rates["miss"] = append(rates["miss"], l.stream(b, time.Second))
			pods.set(probes.LocalPod{Pod: probes.PodRef{Namespace: "b", Name: "p", UID: "u"}, Addrs: []netip.Addr{l.podAddr}, T0: time.Now()})
			time.Sleep(200 * time.Millisecond)
			rates["hit"] = append(rates["hit"], l.stream(b, time.Second))
			stop()
		}
		none, miss, hit := median(rates["none"]), median(rates["miss"]), median(rates["hit"])
		b.ReportMetric(none, "none-Gbit/s")
		b.ReportMetric(miss, "miss-Gbit/s")
		b.ReportMetric(hit, "hit-Gbit/s")
		b.Logf("TCP over veth, medians of 10 × 1 s: none %.2f Gbit/s %v; attached, misses %.2f (%+.1f %%) %v; attached, hits %.2f (%+.1f %%) %v",
			none, fmtRates(rates["none"]), miss, (miss/none-1)*100, fmtRates(rates["miss"]), hit, (hit/none-1)*100, fmtRates(rates["hit"]))
	}
}

func median(vs []float64) float64 {
	s := slices.Clone(vs)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func fmtRates(vs []float64) string {
	s := ""
	for _, v := range vs {
		s += fmt.Sprintf(" %.2f", v)
	}
	return "[" + s[1:] + "]"
}

// stream sends TCP from the node to the pod's echo-less sink for d and returns Gbit/s.
func (l *lab) stream(tb testing.TB, d time.Duration) float64 {
	var n int64
	inNS(tb, l.nodeFD, func() error {
		c, err := net.Dial("tcp", "10.77.0.2:9000")
		if err != nil {
			return err
		}
		defer c.Close()
		buf := make([]byte, 64<<10)
		deadline := time.Now().Add(d)
		start := time.Now()
		for time.Now().Before(deadline) {
			m, err := c.Write(buf)
			n += int64(m)
			if err != nil {
				return err
			}
		}
		d = time.Since(start)
		return nil
	})
	return float64(n) * 8 / d.Seconds() / 1e9
}
