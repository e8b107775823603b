package nfmon

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/google/nftables/expr"
	"github.com/mdlayher/netlink"
	"golang.org/x/net/bpf"
	"golang.org/x/sys/unix"

	"github.com/endpointlag/endpointlag/probes"
)

// RawChange is one table, chain, rule or set element message of a generation, decoded no further
// than its names, handle and, for elements, verdicts: a rule's expressions stay raw until the
// reader needs them. google/nftables'
// monitor decodes every expression of every message, which for an iptables-mode sync at 10,000
// Services (KUBE-SERVICES rewritten whole: 20,000 rule messages) is most of the cost.
type RawChange struct {
	Type   uint16 // NFT_MSG_*
	Family uint8
	Table  string
	Chain  string // the chain's name for chain messages; the rule's chain for rule messages
	Handle uint64
	// Exprs is a new rule's NFTA_RULE_EXPRESSIONS (nil for deletions), in the received datagram's
	// memory, which is never reused.
	Exprs []byte
	// Set names a set message's set, or an element message's set, whose Elements it lists.
	Set      string
	Elements []RawElement
}

// RawElement is one element of a set element message: its key, its data (Value bytes, or a
// verdict and, for a jump or goto, the chain). Key and Value are in the received datagram's
// memory, which is never reused.
type RawElement struct {
	Key, Value []byte
	Verdict    bool
	Jump       bool
	Chain      string
}

// RawGeneration is the changes of one committed transaction, or Err after which the monitor
// closes (lost messages, or a message that could not be decoded). A large transaction comes in
// parts of Chunk changes, all but the last Partial, so that the reader can apply them while the
// kernel still sends the rest: an iptables-mode sync at 10,000 Services takes the kernel ~20 ms to
// notify.
type RawGeneration struct {
	Changes []RawChange
	Partial bool
	// Time is when the datagram that ended the transaction (or, for a part, its last one) was
	// read from the socket: the moment the change is known, however long the reader then takes
	// to get to it. Netlink sockets give no kernel receive timestamps (SO_TIMESTAMP is ignored).
	Time time.Time
	Err  error
}

// Chunk is how many changes a partial generation carries.
const Chunk = 512

// RawMonitor follows table, chain and rule changes.
type RawMonitor struct {
	Generations <-chan RawGeneration
	conn        *netlink.Conn
	// done ends the reading goroutine when its reader has stopped taking generations.
	done      chan struct{}
	closeOnce sync.Once
}

// dial opens a netlink socket in the nftables multicast group of the network namespace open as
// nsfd (-1: the current one), with the monitor's receive buffer.
func dial(nsfd int) (*netlink.Conn, *receiver, error) {
	cfg := &netlink.Config{}
	if nsfd >= 0 {
		cfg.NetNS = nsfd
	}
	conn, err := netlink.Dial(unix.NETLINK_NETFILTER, cfg)
	if err != nil {
		return nil, nil, fmt.Errorf("nftables monitor: %w", err)
	}
	rc, err := conn.SyscallConn()
	if err == nil {
		err = setReceiveBuffer(conn)
	}
	if err == nil {
		err = conn.JoinGroup(unix.NFNLGRP_NFTABLES)
	}
	if err != nil {
		conn.Close()
		return nil, nil, fmt.Errorf("nftables monitor: %w", err)
	}
	return conn, &receiver{raw: rc}, nil
}

// OpenRaw starts a raw monitor in the network namespace open as nsfd (-1: the current one).
func OpenRaw(nsfd int) (*RawMonitor, error) {
	conn, rcv, err := dial(nsfd)
	if err != nil {
		return nil, err
	}
	ch := make(chan RawGeneration, 64)
	m := &RawMonitor{Generations: ch, conn: conn, done: make(chan struct{})}
	go m.run(rcv, ch)
	return m, nil
}

// Close stops the monitor; its goroutine ends even if nothing reads Generations any more.
func (m *RawMonitor) Close() {
	m.closeOnce.Do(func() { close(m.done) })
	_ = m.conn.Close()
}

// errClosed ends the reading loop once the monitor is closed.
var errClosed = errors.New("monitor closed")

func (m *RawMonitor) run(rcv *receiver, ch chan<- RawGeneration) {
	defer close(ch)
	send := func(g RawGeneration) error {
		select {
		case ch <- g:
			return nil
		case <-m.done:
			return errClosed
		}
	}
	var gen []RawChange
	n := names{}
	err := rcv.each(func(typ uint16, data []byte, at time.Time) error {
		switch typ {
		case unix.NFT_MSG_NEWGEN:
			g := RawGeneration{Changes: gen, Time: at}
			gen = nil
			return send(g)
		case unix.NFT_MSG_NEWTABLE, unix.NFT_MSG_DELTABLE, unix.NFT_MSG_NEWCHAIN, unix.NFT_MSG_DELCHAIN,
			unix.NFT_MSG_NEWRULE, unix.NFT_MSG_DELRULE, unix.NFT_MSG_NEWSET, unix.NFT_MSG_DELSET,
			unix.NFT_MSG_NEWSETELEM, unix.NFT_MSG_DELSETELEM:
			c, err := safeDecodeRaw(typ, data, n)
			if err != nil {
				return err
			}
			if gen = append(gen, c); len(gen) >= Chunk {
				g := RawGeneration{Changes: gen, Partial: true, Time: at}
				gen = nil
				return send(g)
			}
		}
		return nil
	})
	if err != nil && !errors.Is(err, errClosed) {
		_ = send(RawGeneration{Changes: gen, Err: fmt.Errorf("nftables monitor: %w", err)})
	}
}

// safeDecodeRaw is decodeRaw with its panics recovered: a message of a shape it does not expect
// ends the monitor with an error instead of the daemon.
func safeDecodeRaw(typ uint16, data []byte, n names) (c RawChange, err error) {
	defer probes.Recover(&err)
	return decodeRaw(typ, data, n)
}

// Notifications timestamps every committed generation when its end message is read, decoding
// nothing else: the reference against which the benchmarks time the probes.
type Notifications struct {
	// Times delivers one time per generation; it is closed after an error, which Err returns.
	Times <-chan time.Time
	conn  *netlink.Conn
	err   atomic.Pointer[error]
}

// OpenNotifications starts timestamping generations in the network namespace open as nsfd. A
// socket filter drops, in the kernel, every datagram that does not start with a generation's end
// message (which the kernel sends in a datagram of its own), so that the reference does not read
// the 20,000 notifications an iptables-mode sync at 10,000 Services causes: its timestamp is when
// the transaction's notifications were all queued.
func OpenNotifications(nsfd int) (*Notifications, error) {
	conn, rcv, err := dial(nsfd)
	if err != nil {
		return nil, err
	}
	// nlmsg_type is in host order; classic BPF loads half-words in network order.
	var typ [2]byte
	binary.NativeEndian.PutUint16(typ[:], unix.NFNL_SUBSYS_NFTABLES<<8|unix.NFT_MSG_NEWGEN)
	filter, err := bpf.Assemble([]bpf.Instruction{
		bpf.LoadAbsolute{Off: 4, Size: 2},
		bpf.JumpIf{Cond: bpf.JumpEqual, Val: uint32(binary.BigEndian.Uint16(typ[:])), SkipFalse: 1},
		bpf.RetConstant{Val: 0xffff},
		bpf.RetConstant{Val: 0},
	})
	if err == nil {
		err = conn.SetBPF(filter)
	}
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("nftables notifications: socket filter: %w", err)
	}
	ch := make(chan time.Time, 4096)
	n := &Notifications{Times: ch, conn: conn}
	go func() {
		defer close(ch)
		err := rcv.each(func(typ uint16, _ []byte, at time.Time) error {
			if typ == unix.NFT_MSG_NEWGEN {
				ch <- at
			}
			return nil
		})
		if err != nil {
			n.err.Store(&err)
		}
	}()
	return n, nil
}

// Err is the error that ended the notifications, if any.
func (n *Notifications) Err() error {
	if e := n.err.Load(); e != nil {
		return *e
	}
	return nil
}

// Close stops the notifications.
func (n *Notifications) Close() { _ = n.conn.Close() }

// slabSize is how much a receiver allocates at a time; maxDatagram is the room it keeps for one
// datagram. The kernel coalesces nftables notifications into datagrams of at most a page or
// 8 KiB (NLMSG_GOODSIZE).
const slabSize, maxDatagram = 1 << 20, 64 << 10

// receiver reads datagrams into slabs that it never reuses, so that a change's bytes stay valid
// for as long as something refers to them, without a copy per message; a slab is freed by the
// garbage collector once nothing does. One read per datagram, where netlink.Conn.Receive peeks
// first and allocates a buffer per datagram.
type receiver struct {
	raw  syscall.RawConn
	slab []byte
}

// held, while set, is a channel every receiver waits on before its next read (HoldReceiving).
var held atomic.Pointer[chan struct{}]

// HoldReceiving makes every monitor wait before its next read from its socket until release is
// called. Tests use it with a small ReceiveBuffer to have the kernel drop messages for certain:
// a reader that drains as fast as the kernel notifies would otherwise sometimes keep up.
func HoldReceiving() (release func()) {
	ch := make(chan struct{})
	held.Store(&ch)
	var once sync.Once
	return func() {
		once.Do(func() {
			held.Store(nil)
			close(ch)
		})
	}
}

// next returns the next datagram's bytes and when it was read.
func (r *receiver) next() ([]byte, time.Time, error) {
	if ch := held.Load(); ch != nil {
		<-*ch
	}
	if len(r.slab) < maxDatagram {
		r.slab = make([]byte, slabSize)
	}
	var (
		n    int
		rerr error
	)
	err := r.raw.Read(func(fd uintptr) bool {
		n, _, rerr = unix.Recvfrom(int(fd), r.slab[:maxDatagram], unix.MSG_TRUNC|unix.MSG_DONTWAIT)
		return rerr != unix.EAGAIN && rerr != unix.EWOULDBLOCK
	})
	at := time.Now()
	switch {
	case err != nil:
		return nil, at, err
	case rerr != nil:
		return nil, at, os.NewSyscallError("recvfrom", rerr)
	case n > maxDatagram:
		return nil, at, fmt.Errorf("a datagram of %d bytes, over the %d read", n, maxDatagram)
	}
	b := r.slab[:n:n]
	r.slab = r.slab[(n+3)&^3:]
	return b, at, nil
}

// each calls fn with the type and payload of every nftables message received and the time its
// datagram was read, until the socket is closed (nil) or reading or fn fails (the error).
func (r *receiver) each(fn func(typ uint16, data []byte, at time.Time) error) error {
	for {
		b, at, err := r.next()
		if err == nil {
			err = messages(b, func(typ uint16, data []byte) error { return fn(typ, data, at) })
		}
		if errors.Is(err, net.ErrClosed) || errors.Is(err, os.ErrClosed) {
			return nil
		}
		if err != nil {
			return err
		}
	}
}

// messages calls fn with the type and payload of each nftables message in a datagram.
func messages(b []byte, fn func(typ uint16, data []byte) error) error {
	for len(b) >= unix.NLMSG_HDRLEN {
		l := int(binary.NativeEndian.Uint32(b))
		if l < unix.NLMSG_HDRLEN || l > len(b) {
			return fmt.Errorf("netlink message of length %d in %d bytes", l, len(b))
		}
		typ := binary.NativeEndian.Uint16(b[4:])
		if typ>>8 == unix.NFNL_SUBSYS_NFTABLES && l >= unix.NLMSG_HDRLEN+4 {
			if err := fn(typ&0xff, b[unix.NLMSG_HDRLEN:l]); err != nil {
				return err
			}
		}
		b = b[min((l+3)&^3, len(b)):]
	}
	return nil
}

// attrs calls fn with the type (flags masked off) and payload of each netlink attribute in b,
// without allocating; it reports an attribute that overruns b.
func attrs(b []byte, fn func(typ uint16, data []byte)) error {
	for len(b) >= unix.SizeofNlAttr {
		l := int(binary.NativeEndian.Uint16(b))
		if l < unix.SizeofNlAttr || l > len(b) {
			return fmt.Errorf("netlink attribute of length %d in %d bytes", l, len(b))
		}
		fn(binary.NativeEndian.Uint16(b[2:])&^(unix.NLA_F_NESTED|unix.NLA_F_NET_BYTEORDER), b[unix.SizeofNlAttr:l])
		b = b[min((l+3)&^3, len(b)):]
	}
	return nil
}

// cstring cuts a NUL-terminated string attribute at its NUL.
func cstring(b []byte) []byte {
	if i := bytes.IndexByte(b, 0); i >= 0 {
		return b[:i]
	}
	return b
}

// names interns the table, chain and set names of a monitor's messages (a sync at 10,000
// Services names KUBE-SERVICES 20,000 times). It starts over past maxNames, so that names of
// chains long deleted are not kept.
type names map[string]string

const maxNames = 4096

// str reads a NUL-terminated string attribute.
func (n names) str(b []byte) string {
	b = cstring(b)
	if s, ok := n[string(b)]; ok {
		return s
	}
	s := string(b)
	if len(n) >= maxNames {
		clear(n)
	}
	n[s] = s
	return s
}

// nameAttrs are, per message type, the attributes that name the table and the chain or set (0:
// none; attribute types start at 1).
var nameAttrs = map[uint16]struct{ table, chain, set uint16 }{
	unix.NFT_MSG_NEWTABLE:   {table: unix.NFTA_TABLE_NAME},
	unix.NFT_MSG_DELTABLE:   {table: unix.NFTA_TABLE_NAME},
	unix.NFT_MSG_NEWCHAIN:   {table: unix.NFTA_CHAIN_TABLE, chain: unix.NFTA_CHAIN_NAME},
	unix.NFT_MSG_DELCHAIN:   {table: unix.NFTA_CHAIN_TABLE, chain: unix.NFTA_CHAIN_NAME},
	unix.NFT_MSG_NEWRULE:    {table: unix.NFTA_RULE_TABLE, chain: unix.NFTA_RULE_CHAIN},
	unix.NFT_MSG_DELRULE:    {table: unix.NFTA_RULE_TABLE, chain: unix.NFTA_RULE_CHAIN},
	unix.NFT_MSG_NEWSET:     {table: unix.NFTA_SET_TABLE, set: unix.NFTA_SET_NAME},
	unix.NFT_MSG_DELSET:     {table: unix.NFTA_SET_TABLE, set: unix.NFTA_SET_NAME},
	unix.NFT_MSG_NEWSETELEM: {table: unix.NFTA_SET_ELEM_LIST_TABLE, set: unix.NFTA_SET_ELEM_LIST_SET},
	unix.NFT_MSG_DELSETELEM: {table: unix.NFTA_SET_ELEM_LIST_TABLE, set: unix.NFTA_SET_ELEM_LIST_SET},
}

// decodeRaw reads a table, chain, rule, set or set element message: the nfgenmsg header (family
// first), then its attributes.
func decodeRaw(typ uint16, data []byte, n names) (RawChange, error) {
	c := RawChange{Type: typ, Family: data[0]}
	na := nameAttrs[typ]
	rule := typ == unix.NFT_MSG_NEWRULE || typ == unix.NFT_MSG_DELRULE
	elems := typ == unix.NFT_MSG_NEWSETELEM || typ == unix.NFT_MSG_DELSETELEM
	var nested error
	err := attrs(data[4:], func(at uint16, b []byte) {
		switch {
		case at == 0: // NFTA_*_UNSPEC, never sent; 0 in nameAttrs means none
		case at == na.table:
			c.Table = n.str(b)
		case at == na.chain:
			c.Chain = n.str(b)
		case at == na.set:
			c.Set = n.str(b)
		case elems && at == unix.NFTA_SET_ELEM_LIST_ELEMENTS:
			c.Elements, nested = decodeElements(b, n)
		case rule && at == unix.NFTA_RULE_HANDLE:
			if len(b) == 8 {
				c.Handle = binary.BigEndian.Uint64(b)
			} else {
				nested = fmt.Errorf("rule handle of %d bytes", len(b))
			}
		case typ == unix.NFT_MSG_NEWRULE && at == unix.NFTA_RULE_EXPRESSIONS:
			c.Exprs = b
		}
	})
	return c, errors.Join(err, nested)
}

// decodeElements reads a set element list: for each element, the chain its verdict data jumps
// or goes to.
func decodeElements(b []byte, n names) ([]RawElement, error) {
	var (
		out  []RawElement
		errs []error
	)
	// value reads a nested data attribute: NFTA_DATA_VALUE bytes or an NFTA_DATA_VERDICT.
	value := func(data []byte, el *RawElement, key bool) {
		errs = append(errs, attrs(data, func(at uint16, v []byte) {
			switch {
			case at == unix.NFTA_DATA_VALUE && key:
				el.Key = v
			case at == unix.NFTA_DATA_VALUE:
				el.Value = v
			case at == unix.NFTA_DATA_VERDICT && !key:
				el.Verdict = true
				errs = append(errs, attrs(v, func(at uint16, vv []byte) {
					switch at {
					case unix.NFTA_VERDICT_CODE:
						if len(vv) == 4 {
							code := int32(binary.BigEndian.Uint32(vv))
							el.Jump = code == unix.NFT_JUMP || code == unix.NFT_GOTO
						}
					case unix.NFTA_VERDICT_CHAIN:
						el.Chain = n.str(vv)
					}
				}))
			}
		}))
	}
	errs = append(errs, attrs(b, func(at uint16, elem []byte) {
		if at != unix.NFTA_LIST_ELEM {
			return
		}
		var el RawElement
		errs = append(errs, attrs(elem, func(at uint16, data []byte) {
			switch at {
			case unix.NFTA_SET_ELEM_KEY:
				value(data, &el, true)
			case unix.NFTA_SET_ELEM_DATA:
				value(data, &el, false)
			}
		}))
		out = append(out, el)
	}))
	return out, errors.Join(errs...)
}

// exprKinds are the expressions DecodeExprs keeps, by name: those that decide where a packet goes.
var exprKinds = map[string]func() expr.Any{
	"meta":      func() expr.Any { return &expr.Meta{} },
	"cmp":       func() expr.Any { return &expr.Cmp{} },
	"payload":   func() expr.Any { return &expr.Payload{} },
	"immediate": func() expr.Any { return &expr.Immediate{} },
	"match":     func() expr.Any { return &expr.Match{} },
	"target":    func() expr.Any { return &expr.Target{} },
}

// checkNATRanges refuses an xtables NAT target of the old IPv4 layout (one range count, then the
// ranges) that counts more ranges than its bytes could hold: google/nftables allocates the count
// it reads before reading the ranges, and a count of 2^32-1 is a fatal out-of-memory, not an error
// (FuzzDecodeExprs found it). The kernel accepts one range only, so the monitor never sees such a
// target from it; the check keeps a decoder from trusting a count. The layouts are the ones
// google/nftables' xt.Unmarshal picks: SNAT and MASQUERADE, DNAT and REDIRECT of revision 0.
func checkNATRanges(family uint8, data []byte) error {
	if family != unix.NFPROTO_IPV4 {
		return nil
	}
	var (
		name, info []byte
		rev        uint32
	)
	err := attrs(data, func(at uint16, v []byte) {
		switch at {
		case unix.NFTA_TARGET_NAME:
			name = cstring(v)
		case unix.NFTA_TARGET_REV:
			if len(v) == 4 {
				rev = binary.BigEndian.Uint32(v)
			}
		case unix.NFTA_TARGET_INFO:
			info = v
		}
	})
	if err != nil {
		return err
	}
	switch string(name) {
	case "SNAT", "MASQUERADE":
	case "DNAT", "REDIRECT":
		if rev != 0 {
			return nil
		}
	default:
		return nil
	}
	// The count is the kernel's unsigned int at the start of the info, native endian.
	if len(info) < 4 {
		return nil // too short to hold a count: xt.Unmarshal says so
	}
	if count := binary.NativeEndian.Uint32(info); count > uint32(len(info)) {
		return fmt.Errorf("%s target: %d NAT ranges in %d bytes", name, count, len(info))
	}
	return nil
}

// unmarshal is google/nftables' expr.Unmarshal with its panics made errors: it trusts lengths
// (a verdict of fewer than 8 bytes panics, FuzzDecodeRaw found it).
func unmarshal(family uint8, data []byte, e expr.Any) (err error) {
	defer probes.Recover(&err)
	return expr.Unmarshal(family, data, e)
}

// DecodeExprs reads a rule's raw expressions, keeping the kinds that decide where a packet goes
// (meta, cmp, payload, immediate and verdicts, xtables match and target); others are skipped.
// It walks the attributes as the monitor does; only the expressions kept are unmarshalled.
func DecodeExprs(family uint8, raw []byte) ([]expr.Any, error) {
	var (
		out  []expr.Any
		errs []error
	)
	errs = append(errs, attrs(raw, func(at uint16, elem []byte) {
		if at != unix.NFTA_LIST_ELEM {
			return
		}
		var name, data []byte
		errs = append(errs, attrs(elem, func(at uint16, v []byte) {
			switch at {
			case unix.NFTA_EXPR_NAME:
				name = cstring(v)
			case unix.NFTA_EXPR_DATA:
				data = v
			}
		}))
		kind, ok := exprKinds[string(name)]
		if !ok {
			return
		}
		if string(name) == "target" {
			if err := checkNATRanges(family, data); err != nil {
				errs = append(errs, err)
				return
			}
		}
		e := kind()
		if err := unmarshal(family, data, e); err != nil {
			errs = append(errs, fmt.Errorf("%s expression: %w", name, err))
			return
		}
		// A verdict is an immediate into the verdict register.
		if imm, ok := e.(*expr.Immediate); ok && imm.Register == unix.NFT_REG_VERDICT && len(imm.Data) == 0 {
			e = &expr.Verdict{}
			if err := unmarshal(family, data, e); err != nil {
				errs = append(errs, fmt.Errorf("verdict: %w", err))
				return
			}
		}
		out = append(out, e)
	}))
	return out, errors.Join(errs...)
}
