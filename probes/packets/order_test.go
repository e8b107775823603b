package packets

import (
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	vnetns "github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
	"k8s.io/utils/clock"

	"github.com/endpointlag/endpointlag/probes"
	"github.com/endpointlag/endpointlag/probes/internal/probetest"
)

// newProgram loads a TC program made of insns, closed when the test ends.
func newProgram(t testing.TB, insns asm.Instructions) *ebpf.Program {
	t.Helper()
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{Type: ebpf.SchedCLS, License: "GPL", Instructions: insns})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { prog.Close() })
	return prog
}

// passProgram is a CNI's program that ends the chain: it returns TC_ACT_OK (TCX_PASS), so that
// no program after it runs.
func passProgram(t testing.TB) *ebpf.Program {
	return newProgram(t, asm.Instructions{asm.Mov.Imm(asm.R0, 0), asm.Return()})
}

// redirectPeerProgram delivers IPv4 packets for dst straight into the network namespace of the
// peer of the veth ifindex, as Cilium's BPF host routing does: the node's side of that veth never
// sees them leave. Other packets go on (TC_ACT_UNSPEC).
func redirectPeerProgram(t testing.TB, dst netip.Addr, ifindex int) *ebpf.Program {
	d := dst.As4()
	return newProgram(t, asm.Instructions{
		asm.LoadMem(asm.R2, asm.R1, 76, asm.Word), // skb->data
		asm.LoadMem(asm.R3, asm.R1, 80, asm.Word), // skb->data_end
		asm.Mov.Reg(asm.R4, asm.R2),
		asm.Add.Imm(asm.R4, 34), // Ethernet and IPv4 headers
		asm.JGT.Reg(asm.R4, asm.R3, "next"),
		asm.LoadMem(asm.R4, asm.R2, 12, asm.Half),
		asm.JNE.Imm(asm.R4, int32(binary.NativeEndian.Uint16([]byte{0x08, 0x00})), "next"),
		asm.LoadMem(asm.R4, asm.R2, 30, asm.Word), // destination address
		asm.JNE.Imm32(asm.R4, int32(binary.NativeEndian.Uint32(d[:])), "next"),
		asm.Mov.Imm(asm.R1, int32(ifindex)),
		asm.Mov.Imm(asm.R2, 0),
		asm.FnRedirectPeer.Call(),
		asm.Return(),
		asm.Mov.Imm(asm.R0, -1).WithSymbol("next"),
		asm.Return(),
	})
}

// nodeHandle is a netlink handle in the lab's node namespace.
func (l *lab) nodeHandle(t testing.TB) *netlink.Handle {
	t.Helper()
	h, err := netlink.NewHandleAt(vnetns.NsHandle(l.nodeFD.Fd()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(h.Close)
	return h
}

func (l *lab) ifindex(t testing.TB, dev string) int {
	t.Helper()
	lk, err := l.nodeHandle(t).LinkByName(dev)
	if err != nil {
		t.Fatal(err)
	}
	return lk.Attrs().Index
}

// attachFirst puts prog first on one direction of an interface of the node: a TCX link at the
// head, or a classic filter at priority 1 (handle 1, protocol all: what Cilium installs).
func (l *lab) attachFirst(t testing.TB, mode, dev string, prog *ebpf.Program, ingress bool) {
	t.Helper()
	idx := l.ifindex(t, dev)
	if mode == AttachTCX {
		inNS(t, l.nodeFD, func() error {
			lk, err := link.AttachTCX(link.TCXOptions{Interface: idx, Program: prog, Attach: tcxType(ingress), Anchor: link.Head()})
			if err != nil {
				return err
			}
			t.Cleanup(func() { lk.Close() })
			return nil
		})
		return
	}
	h := l.nodeHandle(t)
	q := &netlink.Clsact{QdiscAttrs: netlink.QdiscAttrs{LinkIndex: idx, Handle: netlink.MakeHandle(0xffff, 0), Parent: netlink.HANDLE_CLSACT}}
	if err := h.QdiscAdd(q); err != nil && !errors.Is(err, unix.EEXIST) {
		t.Fatal(err)
	}
	if err := h.FilterAdd(&netlink.BpfFilter{
		FilterAttrs: netlink.FilterAttrs{LinkIndex: idx, Parent: tcParent(ingress), Handle: 1, Protocol: unix.ETH_P_ALL, Priority: 1},
		Fd:          prog.FD(), Name: "cni", DirectAction: true,
	}); err != nil {
		t.Fatal(err)
	}
}

// firstProgram names the program that runs first on one direction of an interface of the node.
func (l *lab) firstProgram(t testing.TB, mode, dev string, ingress bool) string {
	t.Helper()
	idx := l.ifindex(t, dev)
	if mode == AttachTCX {
		name := ""
		inNS(t, l.nodeFD, func() error {
			res, err := link.QueryPrograms(link.QueryOptions{Target: idx, Attach: tcxType(ingress)})
			if err != nil || len(res.Programs) == 0 {
				return err
			}
			prog, err := ebpf.NewProgramFromID(res.Programs[0].ID)
			if err != nil {
				return err
			}
			defer prog.Close()
			info, err := prog.Info()
			if err != nil {
				return err
			}
			name = info.Name
			return nil
		})
		return name
	}
	filters, err := l.nodeHandle(t).FilterList(&netlink.Dummy{LinkAttrs: netlink.LinkAttrs{Index: idx}}, tcParent(ingress))
	if err != nil || len(filters) == 0 {
		t.Fatalf("filters of %s: %v %v", dev, filters, err)
	}
	return filters[0].(*netlink.BpfFilter).Name
}

// Another program that ends the chain (TC_ACT_OK) does not hide traffic from the probe: the
// probe's programs run first, whether the other was there before the probe attached or put
// itself first afterwards (the next reconciliation attaches the probe's first again, counted),
// and after a CNI replaced the clsact qdisc, taking the probe's filters along. TCX and classic TC
// (where, within priority 1, the newest filter runs first).
func TestFirstAmongTCPrograms(t *testing.T) {
	for _, tc := range []struct{ mode, when, reason string }{
		{AttachTCX, "before", ""},
		{AttachTCX, "after", "not_first"},
		{AttachTCX, "detached", "missing"},
		{AttachTC, "before", ""},
		{AttachTC, "after", "not_first"},
		{AttachTC, "qdisc replaced", "missing"},
	} {
		t.Run(tc.mode+"/"+tc.when, func(t *testing.T) {
			l := newLab(t)
			l.addClient(t)
			other := passProgram(t)
			if tc.when == "before" {
				l.attachFirst(t, tc.mode, "vpod", other, false)
			}
			pods := &fakePods{}
			opts := DefaultOptions()
			opts.Attach = tc.mode
			opts.ReconcileInterval = 20 * time.Millisecond
			p, rec, _ := startProbe(t, l, opts, pods)
			switch tc.when {
			case "after":
				l.attachFirst(t, tc.mode, "vpod", other, false)
			case "detached":
				l.detachFirst(t, "vpod", false)
			case "qdisc replaced":
				// A CNI deletes the qdisc and makes a new one. The probe may make it first, in
				// between (it reconciles every 20 ms here): replace takes either.
				run(t, "tc", "-n", l.node, "qdisc", "del", "dev", "vpod", "clsact")
				run(t, "tc", "-n", l.node, "qdisc", "replace", "dev", "vpod", "clsact")
			}
			if tc.reason != "" {
				key := "endpointlag_packet_reattachments_total,reason=" + tc.reason
				rec.Wait(t, key, func() bool { return gather(t, p)[key] >= 1 })
			}
			for _, ingress := range []bool{false, true} {
				if first := l.firstProgram(t, tc.mode, "vpod", ingress); first != "to_pod" && first != "from_pod" &&
					first != filterPrefix+"to_pod" && first != filterPrefix+"from_pod" {
					t.Errorf("ingress %v: %q runs first", ingress, first)
				}
			}
			pods.set(probes.LocalPod{Pod: probes.PodRef{Namespace: "default", Name: "web-1", UID: "uid-1"}, Addrs: []netip.Addr{l.podAddr},
				Endpoints: []probes.Endpoint{{Addr: l.podAddr, Port: 8080, Protocol: "TCP"}}, T0: time.Now()})
			rec.Wait(t, "the address tracked", func() bool { p.mu.Lock(); defer p.mu.Unlock(); return len(p.tracked) == 1 })
			if refused := l.connect(t, l.clientFD, 8080, 3); refused != 0 {
				t.Fatalf("%d connections refused", refused)
			}
			wantMetrics(t, p, map[string]float64{"endpointlag_late_connections_total,origin=client,protocol=tcp": 3})
		})
	}
}

// detachFirst detaches the TCX link that runs first on a direction of an interface of the node,
// as a tool (bpftool link detach) or another agent could.
func (l *lab) detachFirst(t testing.TB, dev string, ingress bool) {
	t.Helper()
	idx := l.ifindex(t, dev)
	inNS(t, l.nodeFD, func() error {
		res, err := link.QueryPrograms(link.QueryOptions{Target: idx, Attach: tcxType(ingress)})
		if err != nil {
			return err
		}
		id, ok := res.Programs[0].LinkID()
		if !ok {
			return fmt.Errorf("no link ID for the first program of %s", dev)
		}
		lk, err := link.NewFromID(id)
		if err != nil {
			return err
		}
		defer lk.Close()
		return lk.Detach()
	})
}

// A datapath that delivers to the pod with bpf_redirect_peer, bypassing the node's side of the
// pod's veth (Cilium's BPF host routing), leaves the probe blind towards the pod: the pod sends
// SYN-ACKs while no SYN passed towards it. The probe says so, for that interface only.
func TestRedirectPeerFlagged(t *testing.T) {
	l := newLab(t)
	l.addClient(t)
	opts := DefaultOptions()
	opts.Attach = AttachTCX
	opts.ReconcileInterval = 20 * time.Millisecond
	p, rec, _ := startProbe(t, l, opts, &fakePods{})
	l.attachFirst(t, AttachTCX, "vcli", redirectPeerProgram(t, l.podAddr, l.ifindex(t, "vpod")), true)
	if refused := l.connect(t, l.clientFD, 8080, 3); refused != 0 {
		t.Fatalf("%d connections refused through the redirect", refused)
	}
	key := "endpointlag_packet_blind_interfaces,reason=redirect_peer"
	rec.Wait(t, "vpod flagged", func() bool { return gather(t, p)[key] == 1 })
	time.Sleep(5 * opts.ReconcileInterval) // more reconciliations flag nothing more
	if got := gather(t, p)[key]; got != 1 {
		t.Errorf("%s = %v, want 1 (vpod only)", key, got)
	}
}

// A netkit pod device (peer in another namespace) is one the probe cannot see into: reported
// blind. Skips where the kernel has no netkit.
func TestNetkitBlind(t *testing.T) {
	l := newLab(t)
	h := l.nodeHandle(t)
	nk := &netlink.Netkit{LinkAttrs: netlink.LinkAttrs{Name: "nk0"}, Mode: netlink.NETKIT_MODE_L3, Policy: netlink.NETKIT_POLICY_FORWARD,
		PeerPolicy: netlink.NETKIT_POLICY_FORWARD}
	nk.SetPeerAttrs(&netlink.LinkAttrs{Name: "nk0p", Namespace: netlink.NsFd(int(l.podFD.Fd()))})
	if err := h.LinkAdd(nk); err != nil {
		t.Skipf("the kernel creates no netkit device (CONFIG_NETKIT): %v", err)
	}
	p, rec, _ := startProbe(t, l, DefaultOptions(), &fakePods{})
	key := "endpointlag_packet_blind_interfaces,reason=netkit"
	rec.Wait(t, "nk0 reported blind", func() bool { return gather(t, p)[key] == 1 })
	if err := h.LinkDel(nk); err != nil {
		t.Fatal(err)
	}
	rec.Wait(t, "nk0 gone", func() bool { return gather(t, p)[key] == 0 })
}

// The netkit check as the link events deliver it, where the kernel creates no netkit device: a
// netkit link whose peer is in another namespace is blind, one without is not.
func TestNetkitLinkEvents(t *testing.T) {
	p := New(DefaultOptions(), nil, clock.RealClock{}, slog.New(slog.DiscardHandler))
	rec := &probetest.Recorder{}
	update := func(typ uint16, idx int32, nsid int) netlink.LinkUpdate {
		u := netlink.LinkUpdate{Link: &netlink.Netkit{LinkAttrs: netlink.LinkAttrs{Index: int(idx), Name: fmt.Sprint("nk", idx), NetNsID: nsid}}}
		u.Header.Type, u.Index = typ, idx
		return u
	}
	key := "endpointlag_packet_blind_interfaces,reason=netkit"
	p.linkChanged(update(unix.RTM_NEWLINK, 7, 1), rec)
	p.linkChanged(update(unix.RTM_NEWLINK, 8, -1), rec)
	if got := gather(t, p)[key]; got != 1 {
		t.Errorf("%s = %v after a pod netkit and a netkit without peer namespace, want 1", key, got)
	}
	p.linkChanged(update(unix.RTM_DELLINK, 7, 1), rec)
	if got := gather(t, p)[key]; got != 0 {
		t.Errorf("%s = %v after the pod's netkit was deleted, want 0", key, got)
	}
}
