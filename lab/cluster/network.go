package cluster

import (
	"fmt"
	"net"
	"net/netip"

	"github.com/vishvananda/netlink"
	vnetns "github.com/vishvananda/netns"

	"github.com/endpointlag/endpointlag/lab/internal/ns"
)

// The lab's addresses. They exist only inside the lab's namespaces.
var (
	underlayNet = netip.MustParsePrefix("10.99.0.0/24")
	cpAddr      = netip.MustParseAddr("10.99.0.1")
	clusterCIDR = netip.MustParsePrefix("10.244.0.0/16")
	serviceCIDR = "10.96.0.0/16"
	// gateway is the address every pod's default route points at: each pod's veth peer on the
	// node carries it (as Calico does), so no bridge is needed on the node.
	gateway = netip.MustParseAddr("169.254.1.1")
)

const (
	underlayNS = ns.Prefix + "ul"
	cpNS       = ns.Prefix + "cp"
	bridgeName = "br0"
)

func nodeAddr(i int) netip.Addr { return netip.AddrFrom4([4]byte{10, 99, 0, byte(10 + i)}) }

func podCIDR(i int) netip.Prefix {
	return netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 244, byte(i), 0}), 24)
}

func ipNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

// makeUnderlay creates the underlay namespace and its bridge.
func makeUnderlay() error {
	if err := ns.Create(underlayNS); err != nil {
		return err
	}
	h, err := ns.Handle(underlayNS)
	if err != nil {
		return err
	}
	defer h.Close()
	br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: bridgeName}}
	if err := h.LinkAdd(br); err != nil {
		return fmt.Errorf("underlay bridge: %w", err)
	}
	return h.LinkSetUp(br)
}

// plugUnderlay creates namespace netns and connects its eth0, with address addr, to the bridge.
func plugUnderlay(netns, short string, addr netip.Addr) error {
	if err := ns.Create(netns); err != nil {
		return err
	}
	ul, err := ns.Handle(underlayNS)
	if err != nil {
		return err
	}
	defer ul.Close()
	br, err := ul.LinkByName(bridgeName)
	if err != nil {
		return err
	}
	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "u-" + short, MasterIndex: br.Attrs().Index}, PeerName: "t-" + short}
	if err := ul.LinkAdd(veth); err != nil {
		return fmt.Errorf("underlay veth for %s: %w", netns, err)
	}
	if err := ul.LinkSetUp(veth); err != nil {
		return err
	}
	return moveAndConfigure(ul, "t-"+short, netns, netip.PrefixFrom(addr, underlayNet.Bits()))
}

// moveAndConfigure moves link name from handle from into namespace netns, renames it eth0, gives
// it the address and brings it up.
func moveAndConfigure(from *netlink.Handle, name, netns string, addr netip.Prefix) error {
	peer, err := from.LinkByName(name)
	if err != nil {
		return err
	}
	target, err := ns.Handle(netns)
	if err != nil {
		return err
	}
	defer target.Close()
	fd, err := vnetns.GetFromName(netns)
	if err != nil {
		return err
	}
	defer fd.Close()
	if err := from.LinkSetNsFd(peer, int(fd)); err != nil {
		return fmt.Errorf("moving %s into %s: %w", name, netns, err)
	}
	link, err := target.LinkByName(name)
	if err != nil {
		return err
	}
	if err := target.LinkSetName(link, "eth0"); err != nil {
		return err
	}
	if err := target.AddrAdd(link, &netlink.Addr{IPNet: ipNet(addr)}); err != nil {
		return fmt.Errorf("%s: address %s: %w", netns, addr, err)
	}
	return target.LinkSetUp(link)
}

// routeNodes gives node i routes to the other nodes' pod CIDRs through the underlay and one for
// the Service CIDR, and turns on forwarding. A node's own processes (hostNetwork pods: the
// daemons as the DaemonSet runs them) reach a ClusterIP — the kubernetes Service, for their
// in-cluster configuration — only if a route takes the packet to the output hook, where
// kube-proxy's rules rewrite it; a real node's default route does that.
func routeNodes(netns string, i, nodes int) error {
	if err := ns.Sysctl(netns, "net.ipv4.ip_forward", "1"); err != nil {
		return err
	}
	return routePodCIDRs(netns, i, nodes, netip.MustParsePrefix(serviceCIDR))
}

// routePodCIDRs gives namespace netns, on the underlay, routes to the pod CIDR of every node but
// node except (0 for none) through that node, and on-link routes to the prefixes onLink. The
// control plane gets every pod CIDR, so that programs in pods reach the API server directly (its
// answers find their way back) as they do in a cluster whose control plane can reach pods.
func routePodCIDRs(netns string, except, nodes int, onLink ...netip.Prefix) error {
	h, err := ns.Handle(netns)
	if err != nil {
		return err
	}
	defer h.Close()
	eth0, err := h.LinkByName("eth0")
	if err != nil {
		return err
	}
	for j := 1; j <= nodes; j++ {
		if j == except {
			continue
		}
		r := &netlink.Route{LinkIndex: eth0.Attrs().Index, Dst: ipNet(podCIDR(j)), Gw: nodeAddr(j).AsSlice()}
		if err := h.RouteAdd(r); err != nil {
			return fmt.Errorf("%s: route to %s: %w", netns, podCIDR(j), err)
		}
	}
	for _, p := range onLink {
		if err := h.RouteAdd(&netlink.Route{LinkIndex: eth0.Attrs().Index, Dst: ipNet(p), Scope: netlink.SCOPE_LINK}); err != nil {
			return fmt.Errorf("%s: route to %s: %w", netns, p, err)
		}
	}
	return nil
}

// plugPod creates namespace podNS with address ip, connected to node namespace nodeNS by a veth
// whose node end is hostLink.
func plugPod(nodeNS, podNS, hostLink string, ip netip.Addr) error {
	if err := ns.Create(podNS); err != nil {
		return err
	}
	node, err := ns.Handle(nodeNS)
	if err != nil {
		return err
	}
	defer node.Close()
	peerName := "t" + hostLink
	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: hostLink}, PeerName: peerName}
	if err := node.LinkAdd(veth); err != nil {
		return fmt.Errorf("%s: veth %s: %w", nodeNS, hostLink, err)
	}
	if err := moveAndConfigure(node, peerName, podNS, netip.PrefixFrom(ip, 32)); err != nil {
		return err
	}
	host, err := node.LinkByName(hostLink)
	if err != nil {
		return err
	}
	if err := node.AddrAdd(host, &netlink.Addr{IPNet: ipNet(netip.PrefixFrom(gateway, 32))}); err != nil {
		return err
	}
	if err := node.LinkSetUp(host); err != nil {
		return err
	}
	if err := node.RouteAdd(&netlink.Route{LinkIndex: host.Attrs().Index, Dst: ipNet(netip.PrefixFrom(ip, 32)), Scope: netlink.SCOPE_LINK}); err != nil {
		return fmt.Errorf("%s: route to %s: %w", nodeNS, ip, err)
	}
	pod, err := ns.Handle(podNS)
	if err != nil {
		return err
	}
	defer pod.Close()
	eth0, err := pod.LinkByName("eth0")
	if err != nil {
		return err
	}
	if err := pod.RouteAdd(&netlink.Route{LinkIndex: eth0.Attrs().Index, Dst: ipNet(netip.PrefixFrom(gateway, 32)), Scope: netlink.SCOPE_LINK}); err != nil {
		return err
	}
	return pod.RouteAdd(&netlink.Route{LinkIndex: eth0.Attrs().Index, Gw: gateway.AsSlice()})
}
