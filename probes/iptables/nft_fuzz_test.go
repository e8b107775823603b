package iptables

import (
	"bytes"
	"net"
	"net/netip"
	"reflect"
	"slices"
	"testing"

	"github.com/google/nftables/expr"
	"github.com/google/nftables/xt"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"

	"github.com/endpointlag/endpointlag/probes/internal/nfmon"
	"github.com/endpointlag/endpointlag/probes/internal/rulegraph"
)

// protoNumbers are the protocol numbers of the names protocols gives.
var protoNumbers = map[string]byte{"TCP": unix.IPPROTO_TCP, "UDP": unix.IPPROTO_UDP, "SCTP": unix.IPPROTO_SCTP}

// verdicts are the targets iptables-nft writes as nf_tables verdicts.
var verdicts = map[string]expr.VerdictKind{"RETURN": expr.VerdictReturn, "ACCEPT": expr.VerdictAccept, "DROP": expr.VerdictDrop}

// nftRule is how iptables-nft writes a rule into nf_tables: -p as a meta l4proto (or, as older
// versions do, a load of the IP header's protocol field) compared with the number, the comment
// match, a counter, then the jump (a verdict) or the target (an xtables target; DNAT in revision
// rev). ok is false for a rule these expressions cannot carry.
func nftRule(fam byte, r rule, payloadProto bool, rev uint32) (raw []byte, ok bool) {
	var exprs []expr.Any
	if r.proto != "" {
		if payloadProto {
			off := uint32(9)
			if fam == unix.NFPROTO_IPV6 {
				off = 6
			}
			exprs = append(exprs, &expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: off, Len: 1})
		} else {
			exprs = append(exprs, &expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1})
		}
		exprs = append(exprs, &expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{protoNumbers[r.proto]}})
	}
	if r.comment != "" {
		c := xt.Comment(r.comment)
		exprs = append(exprs, &expr.Match{Name: "comment", Info: &c})
	}
	exprs = append(exprs, &expr.Counter{})
	switch {
	case r.jump:
		exprs = append(exprs, &expr.Verdict{Kind: expr.VerdictJump, Chain: r.target})
	case r.target == "DNAT":
		var flags xt.NatRangeFlags
		var ip net.IP
		if r.dnat.IsValid() {
			flags = xt.NatRangeMapIPs
			ip = net.IP(r.dnat.Addr().AsSlice())
			if r.dnat.Port() != 0 {
				flags |= xt.NatRangeProtoSpecified
			}
		}
		rng := xt.NatRange{Flags: uint(flags), MinIP: ip, MaxIP: ip, MinPort: r.dnat.Port(), MaxPort: r.dnat.Port()}
		var info xt.InfoAny
		switch rev {
		case 0:
			info = &xt.NatIPv4MultiRangeCompat{{Flags: rng.Flags, MinIP: ip, MaxIP: ip, MinPort: rng.MinPort, MaxPort: rng.MaxPort}}
		case 1:
			info = &rng
		default:
			rev = 2
			info = &xt.NatRange2{NatRange: rng}
		}
		exprs = append(exprs, &expr.Target{Name: "DNAT", Rev: rev, Info: info})
	case verdicts[r.target] != 0:
		exprs = append(exprs, &expr.Verdict{Kind: verdicts[r.target]})
	case (r.target == "MASQUERADE" || r.target == "SNAT") && fam == unix.NFPROTO_IPV4:
		exprs = append(exprs, &expr.Target{Name: r.target, Info: &xt.NatIPv4MultiRangeCompat{{}}})
	case r.target != "":
		exprs = append(exprs, &expr.Target{Name: r.target, Info: &xt.Unknown{}})
	}
	var attrs []netlink.Attribute
	for _, e := range exprs {
		b, err := expr.Marshal(fam, e)
		if err != nil {
			return nil, false
		}
		attrs = append(attrs, netlink.Attribute{Type: unix.NLA_F_NESTED | unix.NFTA_LIST_ELEM, Data: b})
	}
	b, err := netlink.MarshalAttributes(attrs)
	return b, err == nil
}

// fixtureRules are the rules of the iptables-save fixtures, as iptables-nft writes them into
// nf_tables, with their chains and families.
type fixtureRule struct {
	fam   byte
	chain string
	raw   []byte
}

func fixtureRules(t testing.TB) []fixtureRule {
	var out []fixtureRule
	for _, fx := range []struct {
		file string
		fam  byte
	}{{"kube-proxy.iptables", unix.NFPROTO_IPV4}, {"kube-proxy-policies.iptables", unix.NFPROTO_IPV4}, {"kube-proxy-ipv6.iptables", unix.NFPROTO_IPV6}} {
		chains := readFixture(t, fx.file)
		for _, name := range slices.Sorted(func(yield func(string) bool) {
			for k := range chains {
				if !yield(k) {
					return
				}
			}
		}) {
			for i, r := range chains[name] {
				raw, ok := nftRule(fx.fam, r, i%2 == 1, 2)
				if !ok {
					t.Fatalf("%s: %+v does not encode", fx.file, r)
				}
				out = append(out, fixtureRule{fx.fam, name, raw})
			}
		}
	}
	return out
}

// FuzzRuleFromExprs reads fuzzed raw expressions as the probe reads a rule the monitor
// notified: decoded without a panic, a protocol only of those kube-proxy matches, a DNAT
// destination only from a DNAT target, unmapped, and the chain it makes well formed.
func FuzzRuleFromExprs(f *testing.F) {
	for _, r := range fixtureRules(f) {
		f.Add(r.fam, r.raw)
	}
	f.Fuzz(func(t *testing.T, fam byte, raw []byte) {
		exprs, err := nfmon.DecodeExprs(fam, raw)
		if err != nil {
			return
		}
		ru := ruleFromExprs("KUBE-SEP-X", exprs)
		if _, ok := protoNumbers[ru.proto]; ru.proto != "" && !ok {
			t.Errorf("protocol %q", ru.proto)
		}
		if ru.dnat.IsValid() && (ru.dnat.Addr().Is4In6() || !slices.ContainsFunc(exprs, func(e expr.Any) bool {
			tg, ok := e.(*expr.Target)
			return ok && tg.Name == "DNAT"
		})) {
			t.Errorf("DNAT destination %s from %#v", ru.dnat, exprs)
		}
		c := chainOf(chainRules{{rule: ru.stored()}})
		for _, d := range c.DNATs {
			if !d.Dest.Addr().IsValid() || d.Protocol == "" {
				t.Errorf("DNAT %+v", d)
			}
		}
		if ru.jump && (len(c.Jumps) != 1 || c.Jumps[0] != ru.target) {
			t.Errorf("jump to %q made %+v", ru.target, c)
		}
		newEntryRule(fam, ru) // must not panic
	})
}

// FuzzRuleRoundTrip writes a rule of fuzzed fields as iptables-nft does and reads it back: the
// probe must read exactly the rule written.
func FuzzRuleRoundTrip(f *testing.F) {
	f.Add(false, "TCP", "shop/web:http cluster IP", "KUBE-SVC-PFISGYVCUO4ERWLP", true, []byte(nil), uint16(0), false, uint8(2))
	f.Add(false, "TCP", "", "DNAT", false, []byte{10, 244, 1, 3}, uint16(8080), true, uint8(0))
	f.Add(true, "UDP", "kube-system/kube-dns:dns", "DNAT", false, netip.MustParseAddr("fd00:10:244:1::5").AsSlice(), uint16(53), false, uint8(1))
	f.Add(true, "", "", "DNAT", false, netip.MustParseAddr("::ffff:10.0.0.1").AsSlice(), uint16(0), false, uint8(2))
	f.Add(false, "SCTP", "shop/web:sctp", "KUBE-MARK-MASQ", true, []byte(nil), uint16(0), false, uint8(2))
	f.Add(false, "", "", "MASQUERADE", false, []byte(nil), uint16(0), false, uint8(0))
	f.Fuzz(func(t *testing.T, ipv6 bool, proto, comment, target string, jump bool, addr []byte, port uint16, payloadProto bool, rev uint8) {
		fam := byte(unix.NFPROTO_IPV4)
		if ipv6 {
			fam = unix.NFPROTO_IPV6
		}
		// What iptables can write: a known protocol, a comment of less than 256 bytes, a target
		// name (a chain's of up to 28 characters for an extension), no NULs, an address of the
		// table's family.
		if _, ok := protoNumbers[proto]; proto != "" && !ok {
			return
		}
		if len(comment) >= xt.CommentSize || bytes.ContainsRune([]byte(comment+target), 0) || target == "" {
			return
		}
		if !jump && len(target) >= expr.XTablesExtensionNameMaxLen {
			return
		}
		want := rule{chain: "KUBE-SERVICES", target: target, jump: jump, proto: proto, comment: comment}
		if target == "DNAT" && !jump {
			a, ok := netip.AddrFromSlice(addr)
			if ok && (a.Is4() != !ipv6) {
				return
			}
			if ok {
				want.dnat = netip.AddrPortFrom(a.Unmap(), port)
			}
		}
		written := want
		if !jump && verdicts[target] != 0 {
			want.target = "" // a verdict that goes to no chain: nothing to follow
		}
		if ipv6 && rev%3 == 0 {
			rev = 1 // revision 0 is IPv4's only
		}
		raw, ok := nftRule(fam, written, payloadProto, uint32(rev%3))
		if !ok {
			return
		}
		exprs, err := nfmon.DecodeExprs(fam, raw)
		if err != nil {
			if !jump && target != "DNAT" && verdicts[target] == 0 {
				return // another extension's name, whose info the fuzz cannot write
			}
			t.Fatalf("%+v encoded as %x: %v", written, raw, err)
		}
		if got := ruleFromExprs("KUBE-SERVICES", exprs); got != want {
			t.Errorf("wrote %+v, read %+v", want, got)
		}
	})
}

// The chains a reader fuzz picks from: the entry chains, service chains of each kind, endpoint
// chains and one that is none of kube-proxy's.
var fuzzChains = []string{"KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-SVC-PFISGYVCUO4ERWLP", "KUBE-SVL-PFISGYVCUO4ERWLP",
	"KUBE-EXT-PFISGYVCUO4ERWLP", "KUBE-FW-PFISGYVCUO4ERWLP", "KUBE-SEP-AAAAAAAAAAAAAAAA", "KUBE-SEP-BBBBBBBBBBBBBBBB", "KUBE-MARK-MASQ"}

// FuzzReaderApply follows a fuzzed stream of the monitor's rule, chain and table changes, made of
// the fixtures' rules (and one fuzzed rule), and checks after every generation that the reader,
// following the changes, reaches exactly what a reader that read the resulting tables whole
// reaches; that its counts of entry rules and shared decodes add up; and that once both tables
// are deleted nothing is left.
func FuzzReaderApply(f *testing.F) {
	pool := fixtureRules(f)
	chains := slices.Clone(fuzzChains)
	for _, r := range pool {
		if !slices.Contains(chains, r.chain) {
			chains = append(chains, r.chain)
		}
	}
	f.Add([]byte{0, 0, 0, 1, 2, 0x11, 2, 3, 0x22, 7, 0, 0, 3, 0, 0, 7, 0, 0, 6, 0, 0}, []byte{})
	f.Add([]byte{0, 1, 1, 0, 2, 2, 0, 3, 3, 0, 4, 4, 0, 5, 5, 0, 6, 6, 7, 0, 0, 5, 0, 0, 7, 0, 0}, pool[0].raw)
	seq := []byte{}
	for i := range pool {
		seq = append(seq, 0, byte(i), byte(i))
	}
	f.Add(append(seq, 7, 0, 0, 6, 0, 0, 7, 0, 0), []byte{})
	// Every rule added, then every other one deleted from its chain.
	seq = append(seq, 7, 0, 0)
	for i, r := range pool {
		if i%2 == 0 {
			seq = append(seq, 3, byte(slices.Index(chains, r.chain)), byte(i))
		}
	}
	f.Add(append(seq, 7, 0, 0), []byte{})
	f.Fuzz(func(t *testing.T, ops []byte, fuzzed []byte) {
		rd := newReader()
		state := rulegraph.NewState()
		// tables is what the kernel holds after the changes: per family, chain and handle, the
		// raw expressions.
		tables := map[uint8]map[string]map[uint64][]byte{}
		check := func() {
			t.Helper()
			rd.flush()
			rd.g.Publish(state)
			checkCounts(t, rd)
			whole := newReader()
			for _, fam := range []uint8{unix.NFPROTO_IPV4, unix.NFPROTO_IPV6} {
				next := map[string]chainRules{}
				for chain, rules := range tables[fam] {
					var read []handleRule
					for h, raw := range rules {
						exprs, err := nfmon.DecodeExprs(fam, raw)
						if err != nil {
							t.Fatalf("a rule the reader took does not decode: %v", err)
						}
						read = append(read, handleRule{h, ruleFromExprs(chain, exprs).stored()})
					}
					next[chain] = byHandle(read)
				}
				whole.replace(fam, next)
			}
			whole.flush()
			fresh := rulegraph.NewState()
			whole.g.Publish(fresh)
			if got, want := state.Snapshot(), fresh.Snapshot(); !reflect.DeepEqual(got, want) {
				t.Fatalf("following the changes reaches\n%q\nreading the tables whole\n%q", describeSnapshot(got), describeSnapshot(want))
			}
			if got, want := rd.roots(), whole.roots(); got != want {
				t.Fatalf("%d roots following the changes, %d reading the tables whole", got, want)
			}
		}
		apply := func(c nfmon.RawChange) {
			// applyOne, not apply: a panic must fail the fuzz, not be recovered into an error.
			if err := rd.applyOne(c); err != nil {
				// The probe reads the tables whole after a change it cannot decode; nothing
				// was applied of it (expressions are decoded first): the fuzz leaves it out.
				return
			}
			fam := c.Family
			switch c.Type {
			case unix.NFT_MSG_NEWRULE:
				if tables[fam] == nil {
					tables[fam] = map[string]map[uint64][]byte{}
				}
				if tables[fam][c.Chain] == nil {
					tables[fam][c.Chain] = map[uint64][]byte{}
				}
				tables[fam][c.Chain][c.Handle] = c.Exprs
			case unix.NFT_MSG_DELRULE:
				delete(tables[fam][c.Chain], c.Handle)
			case unix.NFT_MSG_NEWCHAIN:
				if tables[fam] == nil {
					tables[fam] = map[string]map[uint64][]byte{}
				}
				if tables[fam][c.Chain] == nil {
					tables[fam][c.Chain] = map[uint64][]byte{}
				}
			case unix.NFT_MSG_DELCHAIN:
				delete(tables[fam], c.Chain)
			case unix.NFT_MSG_DELTABLE:
				delete(tables, fam)
			}
		}
		families := []uint8{unix.NFPROTO_IPV4, unix.NFPROTO_IPV6}
		for i := 0; i+2 < len(ops) && i < 3*256; i += 3 {
			op, a, b := ops[i], ops[i+1], ops[i+2]
			fam := families[op>>7]
			chain := chains[int(a)%len(chains)]
			handle := uint64(b & 15)
			c := nfmon.RawChange{Family: fam, Table: natTable, Chain: chain, Handle: handle}
			switch op & 7 {
			case 0, 1: // a fixture's rule, in its own chain and family
				r := pool[int(a)%len(pool)]
				c.Type, c.Family, c.Chain, c.Exprs = unix.NFT_MSG_NEWRULE, r.fam, r.chain, r.raw
			case 2: // a fixture's rule, or the fuzzed one, in a chain of the fuzz's choosing
				c.Type, c.Exprs = unix.NFT_MSG_NEWRULE, fuzzed
				if b&16 != 0 {
					c.Exprs = pool[int(b>>5)%len(pool)].raw
				}
			case 3:
				c.Type = unix.NFT_MSG_DELRULE
			case 4:
				c.Type = unix.NFT_MSG_NEWCHAIN
			case 5:
				c.Type = unix.NFT_MSG_DELCHAIN
			case 6:
				c.Type, c.Chain = unix.NFT_MSG_DELTABLE, ""
			case 7: // the generation ends
				check()
				continue
			}
			apply(c)
		}
		check()
		for _, fam := range families {
			apply(nfmon.RawChange{Type: unix.NFT_MSG_DELTABLE, Family: fam, Table: natTable})
		}
		check()
		if snap := state.Snapshot(); len(snap) != 0 || rd.roots() != 0 {
			t.Fatalf("after both tables were deleted: %d roots, %q reached", rd.roots(), describeSnapshot(snap))
		}
		for _, fam := range families {
			if len(rd.targets[fam]) != 0 || len(rd.cache[fam]) != 0 {
				t.Fatalf("after both tables were deleted: %d targets, %d cached rules in family %d", len(rd.targets[fam]), len(rd.cache[fam]), fam)
			}
		}
	})
}

// checkCounts checks, after a flush, that every service chain's count is the entry rules jumping
// to it, and every cached decode's count the handles sharing it.
func checkCounts(t *testing.T, rd *reader) {
	t.Helper()
	for _, fam := range []uint8{unix.NFPROTO_IPV4, unix.NFPROTO_IPV6} {
		entries := rd.entries[fam]
		jumps := map[string]int{}
		refs := map[*entryRule]int{}
		for _, rules := range entries {
			for _, er := range rules {
				if er.ok {
					jumps[er.target]++
				}
				if er.cached {
					refs[er]++
				}
			}
		}
		counted := map[string]int{}
		for name, tg := range rd.targets[fam] {
			if len(tg.roots) == 0 || !tg.isRoot || tg.gone {
				t.Fatalf("family %d: service chain %s kept without a root: %+v", fam, name, tg)
			}
			for _, rc := range tg.roots {
				if rc.n <= 0 {
					t.Fatalf("family %d: service chain %s counts %d rules for %+v", fam, name, rc.n, rc.root)
				}
				counted[name] += rc.n
			}
		}
		if !reflect.DeepEqual(jumps, counted) && (len(jumps) != 0 || len(counted) != 0) {
			t.Fatalf("family %d: entry rules jump %v, counted %v", fam, jumps, counted)
		}
		for er, n := range refs {
			if er.refs != n {
				t.Fatalf("family %d: a cached rule shared by %d handles counts %d", fam, n, er.refs)
			}
			if rd.cache[fam][er.exprs] != er {
				t.Fatalf("family %d: a rule a handle holds is not the one cached for its expressions", fam)
			}
		}
		for key, er := range rd.cache[fam] {
			if refs[er] == 0 || key != er.exprs {
				t.Fatalf("family %d: a cached rule no handle holds (%d refs)", fam, er.refs)
			}
		}
	}
}
