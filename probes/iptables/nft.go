package iptables

import (
	"net"
	"net/netip"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/xt"
	"golang.org/x/sys/unix"
)

// natTable is the nftables table iptables-nft keeps iptables' nat table in (families ip and ip6).
const natTable = "nat"

var families = []nftables.TableFamily{nftables.TableFamilyIPv4, nftables.TableFamilyIPv6}

// protocols names the layer-4 protocol numbers kube-proxy matches with -p.
var protocols = map[byte]string{unix.IPPROTO_TCP: "TCP", unix.IPPROTO_UDP: "UDP", unix.IPPROTO_SCTP: "SCTP"}

// ruleFromExprs reads what an iptables-nft rule does from its nftables expressions: a jump or goto
// (-j CHAIN / -g CHAIN), an xtables target (-j DNAT --to-destination, -j MARK, ...), the
// protocol (-p, a meta l4proto or IP protocol comparison) and the comment match.
func ruleFromExprs(chain string, exprs []expr.Any) rule {
	ru := rule{chain: chain}
	// loaded tells which register holds the layer-4 protocol, from the last load into it.
	loaded := map[uint32]bool{}
	for _, e := range exprs {
		switch e := e.(type) {
		case *expr.Meta:
			if !e.SourceRegister {
				loaded[e.Register] = e.Key == expr.MetaKeyL4PROTO
			}
		case *expr.Payload:
			if e.OperationType == expr.PayloadLoad {
				// The IPv4 protocol field (offset 9) or the IPv6 next header (offset 6).
				loaded[e.DestRegister] = e.Base == expr.PayloadBaseNetworkHeader && e.Len == 1 && (e.Offset == 9 || e.Offset == 6)
			}
		case *expr.Cmp:
			if loaded[e.Register] && e.Op == expr.CmpOpEq && len(e.Data) == 1 {
				ru.proto = protocols[e.Data[0]]
			}
		case *expr.Verdict:
			if e.Kind == expr.VerdictJump || e.Kind == expr.VerdictGoto {
				ru.target, ru.jump = e.Chain, true
			}
		case *expr.Match:
			if c, ok := e.Info.(*xt.Comment); ok {
				ru.comment = string(*c)
			}
		case *expr.Target:
			ru.target = e.Name
			if e.Name == "DNAT" {
				ru.dnat = dnatDestination(e.Info)
			}
		}
	}
	return ru
}

// dnatDestination reads the first address and port of a DNAT target's range, in any of the
// revisions iptables writes (0: IPv4 multi-range, 1: nf_nat_range, 2: nf_nat_range2).
func dnatDestination(info xt.InfoAny) netip.AddrPort {
	var (
		flags xt.NatRangeFlags
		ip    net.IP
		port  uint16
	)
	switch r := info.(type) {
	case *xt.NatIPv4MultiRangeCompat:
		if len(*r) == 0 {
			return netip.AddrPort{}
		}
		flags, ip, port = xt.NatRangeFlags((*r)[0].Flags), (*r)[0].MinIP, (*r)[0].MinPort
	case *xt.NatRange:
		flags, ip, port = xt.NatRangeFlags(r.Flags), r.MinIP, r.MinPort
	case *xt.NatRange2:
		flags, ip, port = xt.NatRangeFlags(r.Flags), r.MinIP, r.MinPort
	default:
		return netip.AddrPort{}
	}
	addr, ok := netip.AddrFromSlice(ip)
	if !ok || flags&xt.NatRangeMapIPs == 0 {
		return netip.AddrPort{}
	}
	if flags&xt.NatRangeProtoSpecified == 0 {
		port = 0
	}
	return netip.AddrPortFrom(addr.Unmap(), port)
}
