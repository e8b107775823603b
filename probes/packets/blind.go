package packets

import (
	"github.com/vishvananda/netlink"

	"github.com/endpointlag/endpointlag/bpf"
)

// This file finds the pod interfaces where the datapath bypasses the programs, so that the probe
// says it is blind there instead of exporting counts that look healthy.

// Reasons an interface is blind (the blind_interfaces gauge's label).
const (
	// blindNetkit: a netkit pod device. Its programs are netkit's own (attached to the device,
	// not through TC); traffic between the pod and the node never crosses a TC hook the probe
	// could attach to.
	blindNetkit = "netkit"
	// blindRedirectPeer: a pod veth the datapath bypasses towards the pod, delivering into the
	// pod's namespace with bpf_redirect_peer (Cilium's BPF host routing).
	blindRedirectPeer = "redirect_peer"
)

// minRedirectedSynAcks is how many SYN-ACKs a pod sends with no SYN seen towards it before its
// veth counts as bypassed: one may answer a SYN that passed before the programs were attached.
const minRedirectedSynAcks = 3

// netkitPod notes a netkit device whose peer is in another network namespace (a pod's), warning
// once, and reports whether the link is one. Called with p.mu held.
func (p *Probe) netkitPod(idx int, l netlink.Link) bool {
	if _, ok := l.(*netlink.Netkit); !ok || l.Attrs().NetNsID < 0 {
		return false
	}
	if _, seen := p.netkit[idx]; !seen {
		p.netkit[idx] = l.Attrs().Name
		p.log.Warn("netkit pod device: the probe cannot see its traffic", "interface", l.Attrs().Name)
	}
	return true
}

// checkRedirectPeer flags the pod veths whose pods answer SYNs (from other addresses than the
// node's) that never passed towards them: the datapath delivers into the pod's namespace past the
// veth, and the probe does not see the pod's new connections. A flagged veth stays flagged until
// it is deleted. Called with p.mu held.
func (p *Probe) checkRedirectPeer() {
	for idx, as := range p.attachments {
		if len(as) == 0 || as[0].role != "pod" {
			continue
		}
		if _, flagged := p.redirected[idx]; flagged {
			continue
		}
		var st bpf.EndpointlagIfaceStats
		if err := p.objs.Ifaces.Lookup(uint32(idx), &st); err != nil {
			continue // no SYN nor SYN-ACK yet
		}
		if st.Syns == 0 && st.SynAcks >= minRedirectedSynAcks {
			p.redirected[idx] = as[0].ifname
			p.log.Warn("pod veth bypassed towards the pod (bpf_redirect_peer, e.g. Cilium's BPF host routing): the probe does not see its new connections",
				"interface", as[0].ifname, "syn_acks", st.SynAcks)
		}
	}
}

// interfaceGone forgets what was known of a deleted interface. Called with p.mu held.
func (p *Probe) interfaceGone(idx int) {
	delete(p.netkit, idx)
	delete(p.redirected, idx)
	if p.objs != nil {
		_ = p.objs.Ifaces.Delete(uint32(idx)) // none when no SYN crossed it
	}
}
