package nfmon

import (
	"bytes"
	"net"
	"reflect"
	"testing"

	"github.com/google/nftables/expr"
	"github.com/google/nftables/xt"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// listElems wraps expressions (as expr.Marshal gives them: name and data) in NFTA_LIST_ELEM, as a
// rule's NFTA_RULE_EXPRESSIONS carries them.
func listElems(t testing.TB, family byte, exprs ...expr.Any) []byte {
	t.Helper()
	var attrs []netlink.Attribute
	for _, e := range exprs {
		b, err := expr.Marshal(family, e)
		if err != nil {
			t.Fatal(err)
		}
		attrs = append(attrs, netlink.Attribute{Type: unix.NLA_F_NESTED | unix.NFTA_LIST_ELEM, Data: b})
	}
	b, err := netlink.MarshalAttributes(attrs)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// iptablesNFTRules are rules as iptables-nft writes kube-proxy's: -p tcp (meta l4proto, or the
// IPv4 protocol field), a comment match, a jump, and DNAT targets of each revision.
func iptablesNFTRules(t testing.TB) map[byte][][]byte {
	comment := xt.Comment("shop/web:http cluster IP")
	proto := []expr.Any{
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.IPPROTO_TCP}},
	}
	return map[byte][][]byte{
		unix.NFPROTO_IPV4: {
			listElems(t, unix.NFPROTO_IPV4, append(proto,
				&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 16, Len: 4},
				&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{10, 96, 226, 5}},
				&expr.Match{Name: "comment", Info: &comment},
				&expr.Counter{},
				&expr.Verdict{Kind: expr.VerdictJump, Chain: "KUBE-SVC-PFISGYVCUO4ERWLP"})...),
			listElems(t, unix.NFPROTO_IPV4,
				&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 9, Len: 1},
				&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.IPPROTO_UDP}},
				&expr.Target{Name: "DNAT", Rev: 2, Info: &xt.NatRange2{NatRange: xt.NatRange{
					Flags: uint(xt.NatRangeMapIPs | xt.NatRangeProtoSpecified), MinIP: net.IPv4(10, 244, 1, 3), MaxIP: net.IPv4(10, 244, 1, 3), MinPort: 53, MaxPort: 53}}}),
			listElems(t, unix.NFPROTO_IPV4, append(proto,
				&expr.Target{Name: "DNAT", Info: &xt.NatIPv4MultiRangeCompat{{
					Flags: uint(xt.NatRangeMapIPs | xt.NatRangeProtoSpecified), MinIP: net.IPv4(10, 244, 1, 4), MaxIP: net.IPv4(10, 244, 1, 4), MinPort: 8080, MaxPort: 8080}}})...),
		},
		unix.NFPROTO_IPV6: {
			listElems(t, unix.NFPROTO_IPV6, append(proto,
				&expr.Target{Name: "DNAT", Rev: 1, Info: &xt.NatRange{
					Flags: uint(xt.NatRangeMapIPs | xt.NatRangeProtoSpecified), MinIP: net.ParseIP("fd00:10:244:1::5"), MaxIP: net.ParseIP("fd00:10:244:1::5"), MinPort: 8080, MaxPort: 8080}})...),
			listElems(t, unix.NFPROTO_IPV6, &expr.Verdict{Kind: expr.VerdictGoto, Chain: "KUBE-SEP-AAAA"}),
		},
	}
}

// keptKind tells the expressions DecodeExprs may return.
func keptKind(e expr.Any) bool {
	switch e.(type) {
	case *expr.Meta, *expr.Cmp, *expr.Payload, *expr.Immediate, *expr.Verdict, *expr.Match, *expr.Target:
		return true
	}
	return false
}

// FuzzDecodeExprs feeds a rule's raw expressions (NFTA_RULE_EXPRESSIONS, as the monitor hands
// them to the iptables probe) to DecodeExprs: it returns only the kinds it keeps, one per list
// element at most, never an immediate into the verdict register without data (a verdict), and
// what it returns decodes the same after it is encoded again.
func FuzzDecodeExprs(f *testing.F) {
	_, want := sample(f)
	f.Add(uint8(unix.NFPROTO_IPV4), want[1].Exprs)
	for fam, rules := range iptablesNFTRules(f) {
		for _, r := range rules {
			f.Add(fam, r)
		}
	}
	f.Add(uint8(unix.NFPROTO_IPV4), []byte{})
	f.Fuzz(func(t *testing.T, family uint8, raw []byte) {
		exprs, err := DecodeExprs(family, raw)
		elems := 0
		_ = attrs(raw, func(at uint16, _ []byte) {
			if at == unix.NFTA_LIST_ELEM {
				elems++
			}
		})
		if len(exprs) > elems {
			t.Fatalf("%d expressions out of %d list elements", len(exprs), elems)
		}
		for _, e := range exprs {
			if !keptKind(e) {
				t.Errorf("an expression of a kind not kept: %T", e)
			}
			if imm, ok := e.(*expr.Immediate); ok && imm.Register == unix.NFT_REG_VERDICT && len(imm.Data) == 0 {
				t.Errorf("a verdict left as an immediate: %+v", imm)
			}
		}
		if err != nil || len(exprs) == 0 {
			return
		}
		// Encoded again (google/nftables' encoder, as nft writes rules), the expressions decode
		// to themselves; what the first decode normalised (a verdict's kind, trailing NULs) is
		// compared from the second round on.
		again := func(in []expr.Any) []expr.Any {
			var attrs []netlink.Attribute
			for _, e := range in {
				b, err := expr.Marshal(family, e)
				if err != nil {
					return nil // not every decoded value encodes (a match's unknown info, say)
				}
				attrs = append(attrs, netlink.Attribute{Type: unix.NLA_F_NESTED | unix.NFTA_LIST_ELEM, Data: b})
			}
			b, err := netlink.MarshalAttributes(attrs)
			if err != nil {
				return nil
			}
			out, err := DecodeExprs(family, b)
			if err != nil {
				t.Fatalf("%T... re-encoded as %x does not decode: %v", in[0], b, err)
			}
			return out
		}
		second := again(exprs)
		if second == nil {
			return
		}
		if len(second) != len(exprs) {
			t.Fatalf("%d expressions re-encoded decode to %d", len(exprs), len(second))
		}
		if third := again(second); third != nil && !reflect.DeepEqual(second, third) {
			t.Errorf("decode(encode(x)) != x:\n%#v\n%#v", second, third)
		}
	})
}

// FuzzDecodeRawRoundTrip encodes table, chain, rule, set and set element messages from fuzzed
// fields the way the kernel does, frames them as a datagram, and checks that the monitor
// decodes exactly those fields back.
func FuzzDecodeRawRoundTrip(f *testing.F) {
	f.Add(uint8(3), uint8(unix.NFPROTO_IPV4), "nat", "KUBE-SERVICES", "", uint64(42), []byte{1, 2, 3, 4}, []byte{10, 96, 0, 1}, []byte(nil), int32(unix.NFT_JUMP), "KUBE-SVC-X")
	f.Add(uint8(8), uint8(unix.NFPROTO_IPV6), "kube-proxy", "", "service-ips", uint64(0), []byte(nil), []byte{10, 96, 0, 1}, []byte(nil), int32(unix.NFT_GOTO), "service-ABC-ns/svc/tcp/http")
	f.Add(uint8(9), uint8(unix.NFPROTO_IPV4), "kube-proxy", "", "__map3", uint64(0), []byte(nil), []byte{0, 0, 0, 1}, []byte{10, 244, 1, 3, 0x1f, 0x90, 0, 0}, int32(0), "")
	f.Add(uint8(0), uint8(unix.NFPROTO_IPV6), "kube-proxy", "", "", uint64(0), []byte(nil), []byte(nil), []byte(nil), int32(0), "")
	f.Add(uint8(5), uint8(unix.NFPROTO_IPV4), "nat", "KUBE-SEP-Y", "", uint64(0), []byte(nil), []byte(nil), []byte(nil), int32(0), "")
	types := []uint16{unix.NFT_MSG_NEWTABLE, unix.NFT_MSG_DELTABLE, unix.NFT_MSG_NEWCHAIN, unix.NFT_MSG_NEWRULE, unix.NFT_MSG_DELRULE,
		unix.NFT_MSG_DELCHAIN, unix.NFT_MSG_NEWSET, unix.NFT_MSG_DELSET, unix.NFT_MSG_NEWSETELEM, unix.NFT_MSG_DELSETELEM}
	f.Fuzz(func(t *testing.T, which, family uint8, table, chain, set string, handle uint64, exprs, key, value []byte, code int32, target string) {
		typ := types[int(which)%len(types)]
		// Names are NUL-terminated strings in the kernel's messages: they hold no NUL.
		for _, s := range []string{table, chain, set, target} {
			if bytes.IndexByte([]byte(s), 0) >= 0 || len(s) > 1024 {
				return
			}
		}
		if len(exprs) > 4096 || len(key) > 1024 || len(value) > 1024 {
			return
		}
		want := RawChange{Type: typ, Family: family, Table: table}
		attrs := encode(t, func(ae *netlink.AttributeEncoder) {
			switch typ {
			case unix.NFT_MSG_NEWTABLE, unix.NFT_MSG_DELTABLE:
				ae.String(unix.NFTA_TABLE_NAME, table)
				ae.Uint32(unix.NFTA_TABLE_FLAGS, 0)
			case unix.NFT_MSG_NEWCHAIN, unix.NFT_MSG_DELCHAIN:
				ae.String(unix.NFTA_CHAIN_TABLE, table)
				ae.String(unix.NFTA_CHAIN_NAME, chain)
				ae.Uint64(unix.NFTA_CHAIN_HANDLE, handle) // a chain's handle is not a rule's
				want.Chain = chain
			case unix.NFT_MSG_NEWRULE, unix.NFT_MSG_DELRULE:
				ae.String(unix.NFTA_RULE_TABLE, table)
				ae.String(unix.NFTA_RULE_CHAIN, chain)
				ae.Uint64(unix.NFTA_RULE_HANDLE, handle)
				want.Chain, want.Handle = chain, handle
				if typ == unix.NFT_MSG_NEWRULE {
					ae.Bytes(unix.NLA_F_NESTED|unix.NFTA_RULE_EXPRESSIONS, exprs)
					want.Exprs = exprs
				}
			case unix.NFT_MSG_NEWSET, unix.NFT_MSG_DELSET:
				ae.String(unix.NFTA_SET_TABLE, table)
				ae.String(unix.NFTA_SET_NAME, set)
				want.Set = set
			case unix.NFT_MSG_NEWSETELEM, unix.NFT_MSG_DELSETELEM:
				ae.String(unix.NFTA_SET_ELEM_LIST_TABLE, table)
				ae.String(unix.NFTA_SET_ELEM_LIST_SET, set)
				want.Set = set
				el := RawElement{Key: key}
				ae.Nested(unix.NFTA_SET_ELEM_LIST_ELEMENTS, func(l *netlink.AttributeEncoder) error {
					l.Nested(unix.NFTA_LIST_ELEM, func(e *netlink.AttributeEncoder) error {
						e.Nested(unix.NFTA_SET_ELEM_KEY, func(d *netlink.AttributeEncoder) error {
							d.Bytes(unix.NFTA_DATA_VALUE, key)
							return nil
						})
						switch {
						case value != nil:
							el.Value = value
							e.Nested(unix.NFTA_SET_ELEM_DATA, func(d *netlink.AttributeEncoder) error {
								d.Bytes(unix.NFTA_DATA_VALUE, value)
								return nil
							})
						case code != 0:
							el.Verdict, el.Jump = true, code == unix.NFT_JUMP || code == unix.NFT_GOTO
							e.Nested(unix.NFTA_SET_ELEM_DATA, func(d *netlink.AttributeEncoder) error {
								d.Nested(unix.NFTA_DATA_VERDICT, func(v *netlink.AttributeEncoder) error {
									v.Int32(unix.NFTA_VERDICT_CODE, code)
									if target != "" {
										v.String(unix.NFTA_VERDICT_CHAIN, target)
										el.Chain = target
									}
									return nil
								})
								return nil
							})
						}
						return nil
					})
					return nil
				})
				want.Elements = []RawElement{el}
			}
		})
		got, gens, err := collect(datagram(message{typ, family, attrs}, message{unix.NFT_MSG_NEWGEN, unix.NFPROTO_UNSPEC, nil}))
		if err != nil {
			t.Fatalf("%x: %v", attrs, err)
		}
		if gens != 1 || len(got) != 1 {
			t.Fatalf("%d generations, %d changes; want 1 and 1", gens, len(got))
		}
		// An empty attribute decodes as an empty slice, whichever of nil or empty was sent.
		norm := func(c *RawChange) {
			if len(c.Exprs) == 0 {
				c.Exprs = nil
			}
			for i := range c.Elements {
				if len(c.Elements[i].Key) == 0 {
					c.Elements[i].Key = nil
				}
				if len(c.Elements[i].Value) == 0 {
					c.Elements[i].Value = nil
				}
			}
		}
		norm(&got[0])
		norm(&want)
		if !reflect.DeepEqual(got[0], want) {
			t.Errorf("decoded\n%+v\nwant\n%+v", got[0], want)
		}
	})
}
