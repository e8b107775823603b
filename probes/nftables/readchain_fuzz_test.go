package nftables

import (
	"bytes"
	"encoding/binary"
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"

	"github.com/endpointlag/endpointlag/probes"
	"github.com/endpointlag/endpointlag/probes/internal/rulegraph"
)

// fakeKernel answers the probe's netlink requests as the kernel would, from byte strings: a
// chain's rules (each its NFTA_RULE_EXPRESSIONS), and a set's elements (each an NFTA_LIST_ELEM's
// content) by the set's name, those under "" for any other set.
type fakeKernel struct {
	family uint8
	rules  [][]byte
	elems  map[string][][]byte
}

func nfgen(family uint8) []byte { return []byte{family, unix.NFNETLINK_V0, 0, 0} }

func mustAttrs(t testing.TB, attrs []netlink.Attribute) []byte {
	t.Helper()
	b, err := netlink.MarshalAttributes(attrs)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// dial is the fake kernel's nltest.Func.
func (k *fakeKernel) dial(t testing.TB) func([]netlink.Message) ([]netlink.Message, error) {
	msg := func(typ uint16, attrs []netlink.Attribute) netlink.Message {
		return netlink.Message{
			Header: netlink.Header{Type: netlink.HeaderType(unix.NFNL_SUBSYS_NFTABLES<<8 | typ)},
			Data:   append(nfgen(k.family), mustAttrs(t, attrs)...),
		}
	}
	// dump ends a multipart answer as the kernel does.
	dump := func(msgs []netlink.Message) []netlink.Message {
		msgs = append(msgs, netlink.Message{Header: netlink.Header{Type: netlink.Done}, Data: make([]byte, 4)})
		for i := range msgs {
			msgs[i].Header.Flags |= netlink.Multi
		}
		return msgs
	}
	return func(req []netlink.Message) ([]netlink.Message, error) {
		if len(req) == 0 { // the acknowledgement after a set's description
			return []netlink.Message{{Header: netlink.Header{Type: netlink.Error}, Data: make([]byte, 4+unix.NLMSG_HDRLEN)}}, nil
		}
		ad, err := netlink.NewAttributeDecoder(req[0].Data[4:])
		if err != nil {
			t.Fatal(err)
		}
		var chain, set string
		for ad.Next() {
			switch ad.Type() {
			case unix.NFTA_RULE_CHAIN: // NFTA_SET_NAME too
				chain, set = ad.String(), ad.String()
			}
		}
		switch typ := uint16(req[0].Header.Type) & 0xff; typ {
		case unix.NFT_MSG_GETRULE:
			var out []netlink.Message
			for i, r := range k.rules {
				out = append(out, msg(unix.NFT_MSG_NEWRULE, []netlink.Attribute{
					{Type: unix.NFTA_RULE_TABLE, Data: []byte(tableName + "\x00")},
					{Type: unix.NFTA_RULE_CHAIN, Data: []byte(chain + "\x00")},
					{Type: unix.NFTA_RULE_HANDLE, Data: binary.BigEndian.AppendUint64(nil, uint64(i+2))},
					{Type: unix.NLA_F_NESTED | unix.NFTA_RULE_EXPRESSIONS, Data: r},
				}))
			}
			return dump(out), nil
		case unix.NFT_MSG_GETSET:
			return []netlink.Message{msg(unix.NFT_MSG_NEWSET, []netlink.Attribute{
				{Type: unix.NFTA_SET_TABLE, Data: []byte(tableName + "\x00")},
				{Type: unix.NFTA_SET_NAME, Data: []byte(set + "\x00")},
				{Type: unix.NFTA_SET_FLAGS, Data: binary.BigEndian.AppendUint32(nil, unix.NFT_SET_ANONYMOUS|unix.NFT_SET_CONSTANT|unix.NFT_SET_MAP)},
			})}, nil
		case unix.NFT_MSG_GETSETELEM:
			var list []netlink.Attribute
			elems, ok := k.elems[set]
			if !ok {
				elems = k.elems[""]
			}
			for _, e := range elems {
				list = append(list, netlink.Attribute{Type: unix.NLA_F_NESTED | unix.NFTA_LIST_ELEM, Data: e})
			}
			return dump([]netlink.Message{msg(unix.NFT_MSG_NEWSETELEM, []netlink.Attribute{
				{Type: unix.NFTA_SET_ELEM_LIST_TABLE, Data: []byte(tableName + "\x00")},
				{Type: unix.NFTA_SET_ELEM_LIST_SET, Data: []byte(set + "\x00")},
				{Type: unix.NLA_F_NESTED | unix.NFTA_SET_ELEM_LIST_ELEMENTS, Data: mustAttrs(t, list)},
			})}), nil
		default:
			t.Fatalf("unexpected request %v", req[0].Header.Type)
			return nil, nil
		}
	}
}

// read reads chain from the fake kernel as the probe's readChain does, returning what evalRule
// made of its rules, and what the graph, with chain as a root, then reaches.
func (k *fakeKernel) read(t *testing.T, chain string) (*rulegraph.Chain, []probes.ServiceEndpoints, error) {
	conn, err := nftables.New(nftables.AsLasting(), nftables.WithTestDial(k.dial(t)))
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = conn.CloseLasting() }()
	rd := &reader{conn: conn, g: rulegraph.New(policy)}
	fam := nftables.TableFamily(k.family)
	// readChain's steps, keeping the chain it makes.
	tb := table(fam)
	rules, err := conn.GetRules(tb, &nftables.Chain{Name: chain, Table: tb})
	if err != nil {
		return nil, nil, err
	}
	ci := &rulegraph.Chain{}
	for _, r := range rules {
		if err := evalRule(r, func(set string) ([]nftables.SetElement, error) { return rd.elements(tb, set) }, ci); err != nil {
			return nil, nil, err
		}
	}
	// readChain itself, into the graph.
	if err := rd.readChain(fam, chain, nil); err != nil {
		t.Fatalf("evalRule read the chain, readChain failed: %v", err)
	}
	rd.g.SetRoots(k.family, roots([]string{chain}))
	state := rulegraph.NewState()
	rd.g.Publish(state)
	return ci, state.Snapshot(), nil
}

// exprData encodes an expression's NFTA_EXPR_DATA as nft does.
func exprData(t testing.TB, fam byte, e expr.Any) []byte {
	t.Helper()
	b, err := expr.MarshalExprData(fam, e)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// ruleExprs encodes a rule's expressions: (name, data) pairs in NFTA_LIST_ELEMs.
func ruleExprs(t testing.TB, named ...namedExpr) []byte {
	var list []netlink.Attribute
	for _, n := range named {
		list = append(list, netlink.Attribute{Type: unix.NLA_F_NESTED | unix.NFTA_LIST_ELEM, Data: mustAttrs(t, []netlink.Attribute{
			{Type: unix.NFTA_EXPR_NAME, Data: []byte(n.name + "\x00")},
			{Type: unix.NLA_F_NESTED | unix.NFTA_EXPR_DATA, Data: n.data},
		})})
	}
	return mustAttrs(t, list)
}

type namedExpr struct {
	name string
	data []byte
}

// Registers as nft allocates them: 32-bit registers, addresses first, then the port.
const (
	regAddr = unix.NFT_REG32_00
)

func regPort(fam byte) uint32 {
	if fam == unix.NFPROTO_IPV6 {
		return unix.NFT_REG32_04
	}
	return unix.NFT_REG32_01
}

// kubeProxyRules are the rules kube-proxy's nftables mode writes into a service chain, for eps
// (addresses of fam, with ports): a DNAT to one endpoint ("meta l4proto tcp dnat to A:P"), a DNAT
// through a numgen map to all of them, a vmap to chains by verdict code, and a goto.
func kubeProxyRules(t testing.TB, fam byte, eps []netip.AddrPort, code int32, chains []string) (rules [][]byte, elems map[string][][]byte) {
	elems = map[string][][]byte{}
	natFam := uint32(unix.NFPROTO_IPV4)
	if fam == unix.NFPROTO_IPV6 {
		natFam = unix.NFPROTO_IPV6
	}
	proto := []namedExpr{
		{"meta", exprData(t, fam, &expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1})},
		{"cmp", exprData(t, fam, &expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.IPPROTO_TCP}})},
	}
	nat := namedExpr{"nat", exprData(t, fam, &expr.NAT{Type: expr.NATTypeDestNAT, Family: natFam, RegAddrMin: regAddr, RegProtoMin: regPort(fam), Specified: true})}
	if len(eps) > 0 {
		rules = append(rules, ruleExprs(t, append(proto,
			namedExpr{"immediate", exprData(t, fam, &expr.Immediate{Register: regAddr, Data: eps[0].Addr().AsSlice()})},
			namedExpr{"immediate", exprData(t, fam, &expr.Immediate{Register: regPort(fam), Data: binary.BigEndian.AppendUint16(nil, eps[0].Port())})},
			nat)...))
	}
	// A numgen map's elements: key i, value address . port (padded to 32 bits).
	for i, ep := range eps {
		val := append(ep.Addr().AsSlice(), 0, 0, 0, 0)
		binary.BigEndian.PutUint16(val[len(val)-4:], ep.Port())
		elems["__map0"] = append(elems["__map0"], mustAttrs(t, []netlink.Attribute{
			{Type: unix.NLA_F_NESTED | unix.NFTA_SET_ELEM_KEY, Data: mustAttrs(t, []netlink.Attribute{{Type: unix.NFTA_DATA_VALUE, Data: binary.BigEndian.AppendUint32(nil, uint32(i))}})},
			{Type: unix.NLA_F_NESTED | unix.NFTA_SET_ELEM_DATA, Data: mustAttrs(t, []netlink.Attribute{{Type: unix.NFTA_DATA_VALUE, Data: val}})},
		}))
	}
	rules = append(rules, ruleExprs(t, append(proto,
		namedExpr{"numgen", exprData(t, fam, &expr.Numgen{Register: regAddr, Modulus: uint32(max(len(eps), 1)), Type: unix.NFT_NG_RANDOM})},
		namedExpr{"lookup", exprData(t, fam, &expr.Lookup{SourceRegister: regAddr, DestRegister: regAddr, IsDestRegSet: true, SetName: "__map0"})},
		nat)...))
	for i, c := range chains {
		v := []netlink.Attribute{{Type: unix.NFTA_VERDICT_CODE, Data: binary.BigEndian.AppendUint32(nil, uint32(code))}}
		if c != "" {
			v = append(v, netlink.Attribute{Type: unix.NFTA_VERDICT_CHAIN, Data: []byte(c + "\x00")})
		}
		elems["__map1"] = append(elems["__map1"], mustAttrs(t, []netlink.Attribute{
			{Type: unix.NLA_F_NESTED | unix.NFTA_SET_ELEM_KEY, Data: mustAttrs(t, []netlink.Attribute{{Type: unix.NFTA_DATA_VALUE, Data: binary.BigEndian.AppendUint32(nil, uint32(i))}})},
			{Type: unix.NLA_F_NESTED | unix.NFTA_SET_ELEM_DATA, Data: mustAttrs(t, []netlink.Attribute{{Type: unix.NLA_F_NESTED | unix.NFTA_DATA_VERDICT, Data: mustAttrs(t, v)}})},
		}))
	}
	rules = append(rules, ruleExprs(t,
		namedExpr{"numgen", exprData(t, fam, &expr.Numgen{Register: regAddr, Modulus: 2, Type: unix.NFT_NG_RANDOM})},
		namedExpr{"lookup", exprData(t, fam, &expr.Lookup{SourceRegister: regAddr, DestRegister: unix.NFT_REG_VERDICT, IsDestRegSet: true, SetName: "__map1"})}))
	if len(chains) > 0 && chains[0] != "" {
		rules = append(rules, ruleExprs(t, namedExpr{"immediate", exprData(t, fam, &expr.Verdict{Kind: expr.VerdictGoto, Chain: chains[0]})}))
	}
	return rules, elems
}

const fuzzChain = "service-PFISGYVC-shop/web/tcp/http"

// exprNames are the expressions a fuzzed rule is made of: those kube-proxy's nftables mode
// writes, and those evalRule acts on. (xtables matches and targets are left out: kube-proxy's
// nftables mode writes none, and google/nftables, not the probe, decodes them.)
var exprNames = []string{"immediate", "lookup", "nat", "cmp", "payload", "meta", "numgen", "counter", "bitwise", "ct", "fib", "dynset"}

// fuzzRules cuts fuzzed bytes into rules of expressions: each record is a name's index (the
// high bit ends the rule), a length, and that many bytes of NFTA_EXPR_DATA.
func fuzzRules(t testing.TB, b []byte) [][]byte {
	var rules [][]byte
	var cur []namedExpr
	for len(b) >= 2 {
		name, n := exprNames[int(b[0]&0x7f)%len(exprNames)], min(int(b[1]), len(b)-2)
		cur = append(cur, namedExpr{name, b[2 : 2+n]})
		if b[0]&0x80 != 0 {
			rules = append(rules, ruleExprs(t, cur...))
			cur = nil
		}
		b = b[2+n:]
	}
	if cur != nil {
		rules = append(rules, ruleExprs(t, cur...))
	}
	return rules
}

// fuzzElems cuts fuzzed bytes into set elements: a length and that many bytes of an
// NFTA_LIST_ELEM's content.
func fuzzElems(b []byte) [][]byte {
	var out [][]byte
	for len(b) >= 1 {
		n := min(int(b[0]), len(b)-1)
		out = append(out, b[1:1+n])
		b = b[1+n:]
	}
	return out
}

// encodeFuzzRules is fuzzRules' inverse for the seeds: each rule's expressions as records.
func encodeFuzzRules(t testing.TB, rules [][]byte) []byte {
	var out []byte
	for _, r := range rules {
		ad, err := netlink.NewAttributeDecoder(r)
		if err != nil {
			t.Fatal(err)
		}
		var recs [][]byte
		for ad.Next() {
			inner, err := netlink.NewAttributeDecoder(ad.Bytes())
			if err != nil {
				t.Fatal(err)
			}
			var name string
			var data []byte
			for inner.Next() {
				switch inner.Type() {
				case unix.NFTA_EXPR_NAME:
					name = inner.String()
				case unix.NFTA_EXPR_DATA:
					data = inner.Bytes()
				}
			}
			if len(data) > 255 {
				t.Fatalf("%s expression of %d bytes", name, len(data))
			}
			recs = append(recs, append([]byte{byte(slices.Index(exprNames, name)), byte(len(data))}, data...))
		}
		recs[len(recs)-1][0] |= 0x80
		out = append(out, bytes.Join(recs, nil)...)
	}
	return out
}

func encodeFuzzElems(elems [][]byte) []byte {
	var out []byte
	for _, e := range elems {
		out = append(append(out, byte(len(e))), e...)
	}
	return out
}

// FuzzReadChain reads a chain of fuzzed rules and set elements through the probe's netlink reads
// (google/nftables decoding the messages) and evalRule: no panic, every DNAT destination an
// address, no jump to a name with a NUL, the register states bounded, and the graph reaching exactly the DNAT destinations.
func FuzzReadChain(f *testing.F) {
	for _, fam := range []byte{unix.NFPROTO_IPV4, unix.NFPROTO_IPV6} {
		eps := []netip.AddrPort{netip.MustParseAddrPort("10.244.1.3:8080"), netip.MustParseAddrPort("10.244.2.2:8080")}
		if fam == unix.NFPROTO_IPV6 {
			eps = []netip.AddrPort{netip.MustParseAddrPort("[fd00:10:244:1::5]:8080"), netip.MustParseAddrPort("[fd00:10:244:2::6]:8080")}
		}
		rules, elems := kubeProxyRules(f, fam, eps, unix.NFT_GOTO, []string{"endpoint-AAAAAAAA-shop/sticky/tcp/__10.244.1.7/80", "endpoint-BBBBBBBB-shop/sticky/tcp/__10.244.2.7/80"})
		f.Add(fam == unix.NFPROTO_IPV6, encodeFuzzRules(f, rules), encodeFuzzElems(elems["__map0"]))
		f.Add(fam == unix.NFPROTO_IPV6, encodeFuzzRules(f, rules), encodeFuzzElems(append(elems["__map0"], elems["__map1"]...)))
	}
	f.Add(false, []byte{}, []byte{})
	f.Fuzz(func(t *testing.T, ipv6 bool, ruleBytes, elemBytes []byte) {
		k := &fakeKernel{family: unix.NFPROTO_IPV4, rules: fuzzRules(t, ruleBytes), elems: map[string][][]byte{"": fuzzElems(elemBytes)}}
		if ipv6 {
			k.family = unix.NFPROTO_IPV6
		}
		ci, snap, err := k.read(t, fuzzChain)
		if err != nil {
			return
		}
		nats := 0
		for _, r := range k.rules {
			nats += bytes.Count(r, []byte("nat\x00"))
		}
		if len(ci.DNATs) > nats*maxFanout {
			t.Errorf("%d DNATs from %d nat expressions", len(ci.DNATs), nats)
		}
		dests := map[probes.Endpoint]bool{}
		for _, d := range ci.DNATs {
			if !d.Dest.Addr().IsValid() {
				t.Errorf("DNAT to %s", d.Dest)
			}
			dests[probes.Endpoint{Addr: d.Dest.Addr(), Port: d.Dest.Port(), Protocol: "TCP"}] = true
		}
		var reached []probes.Endpoint
		for _, se := range snap {
			reached = append(reached, se.Endpoints...)
		}
		if want := probes.EndpointList(dests); !slices.Equal(reached, want) && len(reached)+len(want) > 0 {
			t.Errorf("the graph reaches %v; the chain DNATs to %v", reached, want)
		}
		for _, j := range ci.Jumps {
			if strings.ContainsRune(j, 0) {
				t.Errorf("jump to %q", j)
			}
		}
	})
}

// FuzzReadChainRoundTrip writes kube-proxy's rules for fuzzed endpoints and chains and reads them
// back through the probe: it must find exactly the DNAT destinations and jumps written.
func FuzzReadChainRoundTrip(f *testing.F) {
	f.Add(false, []byte{10, 244, 1, 3, 0x1f, 0x90, 10, 244, 2, 2, 0x1f, 0x90}, int32(unix.NFT_GOTO), "endpoint-A-shop/web/tcp/http__10.244.1.3/8080,endpoint-B-shop/web/tcp/http__10.244.2.2/8080")
	f.Add(true, netip.MustParseAddrPort("[fd00:10:244:1::5]:8080").Addr().AsSlice(), int32(unix.NFT_JUMP), "mark-for-masquerade")
	f.Add(false, []byte{}, int32(1) /* NF_ACCEPT */, "")
	f.Fuzz(func(t *testing.T, ipv6 bool, epBytes []byte, code int32, chainList string) {
		fam, size := byte(unix.NFPROTO_IPV4), 4
		if ipv6 {
			fam, size = unix.NFPROTO_IPV6, 16
		}
		var eps []netip.AddrPort
		for b := epBytes; len(b) >= size+2 && len(eps) < 16; b = b[size+2:] {
			a, _ := netip.AddrFromSlice(b[:size])
			eps = append(eps, netip.AddrPortFrom(a, binary.BigEndian.Uint16(b[size:])))
		}
		var chains []string
		if chainList != "" {
			chains = strings.Split(chainList, ",")
		}
		if len(chains) > 16 || strings.ContainsRune(chainList, 0) || len(chainList) > 4096 {
			return
		}
		rules, elems := kubeProxyRules(t, fam, eps, code, chains)
		k := &fakeKernel{family: fam, rules: rules, elems: elems}
		ci, snap, err := k.read(t, fuzzChain)
		if err != nil {
			t.Fatalf("reading kube-proxy's rules: %v", err)
		}
		want := &rulegraph.Chain{}
		if len(eps) > 0 {
			want.DNATs = append(want.DNATs, rulegraph.Target{Dest: eps[0]})
		}
		for _, ep := range eps {
			want.DNATs = append(want.DNATs, rulegraph.Target{Dest: ep})
		}
		for _, c := range chains {
			if (code == unix.NFT_JUMP || code == unix.NFT_GOTO) && c != "" {
				want.Jumps = append(want.Jumps, c)
			}
		}
		if len(chains) > 0 && chains[0] != "" {
			want.Jumps = append(want.Jumps, chains[0])
		}
		if !reflect.DeepEqual(ci, want) {
			t.Errorf("wrote\n%+v\nread\n%+v", want, ci)
		}
		dests := map[probes.Endpoint]bool{}
		for _, d := range want.DNATs {
			dests[probes.Endpoint{Addr: d.Dest.Addr(), Port: d.Dest.Port(), Protocol: "TCP"}] = true
		}
		var reached []probes.Endpoint
		for _, se := range snap {
			reached = append(reached, se.Endpoints...)
		}
		if w := probes.EndpointList(dests); !slices.Equal(reached, w) && len(reached)+len(w) > 0 {
			t.Errorf("the graph reaches %v; want %v", reached, w)
		}
	})
}
