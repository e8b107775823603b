package nfmon

import (
	"encoding/binary"
	"reflect"
	"testing"
	"unsafe"

	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// encode builds netlink attributes the way the kernel sends them: big-endian numbers,
// NUL-terminated strings, nested attributes flagged.
func encode(t testing.TB, fn func(ae *netlink.AttributeEncoder)) []byte {
	t.Helper()
	ae := netlink.NewAttributeEncoder()
	ae.ByteOrder = binary.BigEndian
	fn(ae)
	b, err := ae.Encode()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// datagram frames nftables messages (type, family, attributes) as one netlink datagram.
func datagram(msgs ...message) []byte {
	var out []byte
	for _, m := range msgs {
		body := append([]byte{m.family, 0, 0, 0}, m.attrs...)
		hdr := make([]byte, unix.NLMSG_HDRLEN)
		binary.NativeEndian.PutUint32(hdr, uint32(unix.NLMSG_HDRLEN+len(body)))
		binary.NativeEndian.PutUint16(hdr[4:], unix.NFNL_SUBSYS_NFTABLES<<8|m.typ)
		out = append(out, hdr...)
		out = append(out, body...)
		for len(out)%4 != 0 {
			out = append(out, 0)
		}
	}
	return out
}

// accept is the kernel's NF_ACCEPT verdict code.
const accept = 1

type message struct {
	typ    uint16
	family uint8
	attrs  []byte
}

func sample(t testing.TB) ([]message, []RawChange) {
	exprs := encode(t, func(ae *netlink.AttributeEncoder) {
		ae.Nested(unix.NFTA_LIST_ELEM, func(nae *netlink.AttributeEncoder) error {
			nae.String(unix.NFTA_EXPR_NAME, "immediate")
			nae.Nested(unix.NFTA_EXPR_DATA, func(d *netlink.AttributeEncoder) error {
				d.Uint32(unix.NFTA_IMMEDIATE_DREG, unix.NFT_REG_VERDICT)
				d.Nested(unix.NFTA_IMMEDIATE_DATA, func(v *netlink.AttributeEncoder) error {
					v.Nested(unix.NFTA_DATA_VERDICT, func(vv *netlink.AttributeEncoder) error {
						vv.Int32(unix.NFTA_VERDICT_CODE, unix.NFT_JUMP)
						vv.String(unix.NFTA_VERDICT_CHAIN, "KUBE-SVC-X")
						return nil
					})
					return nil
				})
				return nil
			})
			return nil
		})
	})
	rule := encode(t, func(ae *netlink.AttributeEncoder) {
		ae.String(unix.NFTA_RULE_TABLE, "nat")
		ae.String(unix.NFTA_RULE_CHAIN, "KUBE-SERVICES")
		ae.Uint64(unix.NFTA_RULE_HANDLE, 42)
		ae.Bytes(unix.NFTA_RULE_EXPRESSIONS, exprs)
	})
	verdict := func(ae *netlink.AttributeEncoder, code int32, chain string) {
		ae.Nested(unix.NFTA_SET_ELEM_DATA, func(d *netlink.AttributeEncoder) error {
			d.Nested(unix.NFTA_DATA_VERDICT, func(v *netlink.AttributeEncoder) error {
				v.Int32(unix.NFTA_VERDICT_CODE, code)
				if chain != "" {
					v.String(unix.NFTA_VERDICT_CHAIN, chain)
				}
				return nil
			})
			return nil
		})
	}
	data := func(ae *netlink.AttributeEncoder, typ uint16, v []byte) {
		ae.Nested(typ, func(d *netlink.AttributeEncoder) error {
			d.Bytes(unix.NFTA_DATA_VALUE, v)
			return nil
		})
	}
	elems := encode(t, func(ae *netlink.AttributeEncoder) {
		ae.String(unix.NFTA_SET_ELEM_LIST_TABLE, "kube-proxy")
		ae.String(unix.NFTA_SET_ELEM_LIST_SET, "service-ips")
		ae.Nested(unix.NFTA_SET_ELEM_LIST_ELEMENTS, func(l *netlink.AttributeEncoder) error {
			l.Nested(unix.NFTA_LIST_ELEM, func(e *netlink.AttributeEncoder) error {
				data(e, unix.NFTA_SET_ELEM_KEY, []byte{10, 96, 0, 1})
				verdict(e, unix.NFT_GOTO, "service-ABC-ns/svc/tcp/http")
				return nil
			})
			l.Nested(unix.NFTA_LIST_ELEM, func(e *netlink.AttributeEncoder) error {
				data(e, unix.NFTA_SET_ELEM_KEY, []byte{10, 96, 0, 2})
				verdict(e, accept, "")
				return nil
			})
			l.Nested(unix.NFTA_LIST_ELEM, func(e *netlink.AttributeEncoder) error {
				data(e, unix.NFTA_SET_ELEM_KEY, []byte{10, 96, 0, 3})
				data(e, unix.NFTA_SET_ELEM_DATA, []byte{10, 244, 1, 3, 0x1f, 0x90, 0, 0})
				return nil
			})
			return nil
		})
	})
	set := encode(t, func(ae *netlink.AttributeEncoder) {
		ae.String(unix.NFTA_SET_TABLE, "kube-proxy")
		ae.String(unix.NFTA_SET_NAME, "__map3")
	})
	chain := encode(t, func(ae *netlink.AttributeEncoder) {
		ae.String(unix.NFTA_CHAIN_TABLE, "nat")
		ae.String(unix.NFTA_CHAIN_NAME, "KUBE-SEP-Y")
	})
	table := encode(t, func(ae *netlink.AttributeEncoder) {
		ae.String(unix.NFTA_TABLE_NAME, "kube-proxy")
		ae.Uint32(unix.NFTA_TABLE_FLAGS, 0)
	})
	msgs := []message{
		{unix.NFT_MSG_NEWTABLE, unix.NFPROTO_IPV6, table},
		{unix.NFT_MSG_NEWRULE, unix.NFPROTO_IPV4, rule},
		{unix.NFT_MSG_NEWSET, unix.NFPROTO_IPV6, set},
		{unix.NFT_MSG_DELSETELEM, unix.NFPROTO_IPV6, elems},
		{unix.NFT_MSG_DELCHAIN, unix.NFPROTO_IPV4, chain},
		{unix.NFT_MSG_NEWGEN, unix.NFPROTO_UNSPEC, nil},
	}
	want := []RawChange{
		{Type: unix.NFT_MSG_NEWTABLE, Family: unix.NFPROTO_IPV6, Table: "kube-proxy"},
		{Type: unix.NFT_MSG_NEWRULE, Family: unix.NFPROTO_IPV4, Table: "nat", Chain: "KUBE-SERVICES", Handle: 42, Exprs: exprs},
		{Type: unix.NFT_MSG_NEWSET, Family: unix.NFPROTO_IPV6, Table: "kube-proxy", Set: "__map3"},
		{Type: unix.NFT_MSG_DELSETELEM, Family: unix.NFPROTO_IPV6, Table: "kube-proxy", Set: "service-ips", Elements: []RawElement{
			{Key: []byte{10, 96, 0, 1}, Verdict: true, Jump: true, Chain: "service-ABC-ns/svc/tcp/http"},
			{Key: []byte{10, 96, 0, 2}, Verdict: true},
			{Key: []byte{10, 96, 0, 3}, Value: []byte{10, 244, 1, 3, 0x1f, 0x90, 0, 0}},
		}},
		{Type: unix.NFT_MSG_DELCHAIN, Family: unix.NFPROTO_IPV4, Table: "nat", Chain: "KUBE-SEP-Y"},
	}
	return msgs, want
}

// collect runs a datagram through the monitor's decoding, as run does.
func collect(b []byte) ([]RawChange, int, error) {
	var (
		out  []RawChange
		gens int
		n    = names{}
	)
	err := messages(b, func(typ uint16, data []byte) error {
		if typ == unix.NFT_MSG_NEWGEN {
			gens++
			return nil
		}
		c, err := decodeRaw(typ, data, n)
		out = append(out, c)
		return err
	})
	return out, gens, err
}

func TestDecodeRaw(t *testing.T) {
	msgs, want := sample(t)
	got, gens, err := collect(datagram(msgs...))
	if err != nil {
		t.Fatal(err)
	}
	if gens != 1 || !reflect.DeepEqual(got, want) {
		t.Errorf("decoded %d generations, changes\n%+v\nwant 1 and\n%+v", gens, got, want)
	}
	exprs, err := DecodeExprs(unix.NFPROTO_IPV4, got[1].Exprs)
	if err != nil || len(exprs) != 1 {
		t.Fatalf("expressions: %v, %v", exprs, err)
	}
}

func TestDecodeRawRejectsTruncation(t *testing.T) {
	msgs, _ := sample(t)
	b := datagram(msgs[0])
	// A message whose length runs past the datagram, and one whose attribute does.
	long := append([]byte(nil), b...)
	binary.NativeEndian.PutUint32(long, uint32(len(b)+8))
	if _, _, err := collect(long); err == nil {
		t.Error("a message longer than its datagram decoded")
	}
	bad := append([]byte(nil), b...)
	binary.NativeEndian.PutUint16(bad[unix.NLMSG_HDRLEN+4:], 0xfff0)
	if _, _, err := collect(bad); err == nil {
		t.Error("an attribute longer than its message decoded")
	}
}

func FuzzDecodeRaw(f *testing.F) {
	msgs, _ := sample(f)
	f.Add(datagram(msgs...))
	for _, m := range msgs {
		f.Add(datagram(m))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		changes, _, _ := collect(b)
		for _, c := range changes {
			_, _ = DecodeExprs(c.Family, c.Exprs)
		}
	})
}

// Names are interned, and the table starts over rather than grow without bound.
func TestNamesStayBounded(t *testing.T) {
	n := names{}
	a, b := n.str([]byte("KUBE-SERVICES\x00")), n.str([]byte("KUBE-SERVICES"))
	if a != "KUBE-SERVICES" || unsafe.StringData(a) != unsafe.StringData(b) {
		t.Errorf("str gave %q and %q, not one interned string", a, b)
	}
	for i := range maxNames + 10 {
		n.str(binary.BigEndian.AppendUint32(nil, uint32(i)))
	}
	if len(n) > maxNames {
		t.Errorf("%d names kept, over %d", len(n), maxNames)
	}
}
