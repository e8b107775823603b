// Package ipvs observes this node's kube-proxy in IPVS mode: it reads the virtual servers and
// their real servers over generic netlink, polled with jitter (IPVS sends no change events), and
// reports a real server as removed (stage ipvs) once it is gone or has weight 0: kube-proxy sets
// weight 0 first, so that no new connection goes there, and deletes the real server later.
//
// IPVS rules do not name Services; removals name the endpoint only, and the collector joins them
// to that endpoint's terminating records.
package ipvs

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"sync"
	"time"

	"github.com/mdlayher/genetlink"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
	"k8s.io/utils/clock"

	"github.com/endpointlag/endpointlag/probes"
	"github.com/endpointlag/endpointlag/probes/internal/poll"
	"github.com/endpointlag/endpointlag/probes/internal/proxymode"
)

// Name is the probe's registry name and the source of its observations.
const Name = "ipvs"

func init() {
	probes.Register(probes.Factory{
		Name:           Name,
		Help:           "this node's kube-proxy rules in IPVS mode, polled over generic netlink (experimental: decoded and unit-tested, not yet run against a kernel with IPVS); inactive while the node has no kube-ipvs0 interface (kube-proxy's IPVS mode makes it; keepalived and kube-vip do not) or kube-proxy's /proxyMode names another mode",
		DefaultEnabled: true,
		Stages:         []probes.Stage{probes.StageIPVS},
		New: func(env probes.Env) (probes.Probe, error) {
			p := New(env.PollInterval, env.Clock, env.Logger)
			p.KubeProxy = proxymode.Asker{URL: env.KubeProxyURL}
			return p, nil
		},
	})
}

// From include/uapi/linux/ip_vs.h.
const (
	genlName = "IPVS"

	cmdGetService = 4
	cmdGetDest    = 8

	cmdAttrService = 1
	cmdAttrDest    = 2

	svcAttrAF       = 1
	svcAttrProtocol = 2
	svcAttrAddr     = 3
	svcAttrPort     = 4
	svcAttrFwmark   = 5

	destAttrAddr       = 1
	destAttrPort       = 2
	destAttrWeight     = 4
	destAttrAddrFamily = 11
)

// virtualServer is one IPVS service: a ClusterIP (or node) address and port, or a firewall mark.
type virtualServer struct {
	af       uint16
	protocol uint16
	addr     netip.Addr
	port     uint16
	fwmark   uint32
	// raw is the service's attributes as the kernel sent them, to ask for its real servers.
	raw []byte
}

// realServer is one destination of a virtual server.
type realServer struct {
	addr   netip.Addr
	port   uint16
	weight uint32
}

// decodeService reads the nested attributes of IPVS_CMD_ATTR_SERVICE.
func decodeService(b []byte) (virtualServer, error) {
	vs := virtualServer{raw: b}
	ad, err := netlink.NewAttributeDecoder(b)
	if err != nil {
		return vs, err
	}
	var addr []byte
	for ad.Next() {
		switch ad.Type() {
		case svcAttrAF:
			vs.af = ad.Uint16()
		case svcAttrProtocol:
			vs.protocol = ad.Uint16()
		case svcAttrAddr:
			addr = ad.Bytes()
		case svcAttrPort:
			if p := ad.Bytes(); len(p) == 2 {
				vs.port = binary.BigEndian.Uint16(p)
			}
		case svcAttrFwmark:
			vs.fwmark = ad.Uint32()
		}
	}
	if err := ad.Err(); err != nil {
		return vs, err
	}
	vs.addr, err = inetAddr(vs.af, addr)
	return vs, err
}

// decodeDest reads the nested attributes of IPVS_CMD_ATTR_DEST; af is the service's family,
// used when the kernel does not send the destination's own.
func decodeDest(b []byte, af uint16) (realServer, error) {
	var rs realServer
	ad, err := netlink.NewAttributeDecoder(b)
	if err != nil {
		return rs, err
	}
	var addr []byte
	for ad.Next() {
		switch ad.Type() {
		case destAttrAddr:
			addr = ad.Bytes()
		case destAttrPort:
			if p := ad.Bytes(); len(p) == 2 {
				rs.port = binary.BigEndian.Uint16(p)
			}
		case destAttrWeight:
			rs.weight = ad.Uint32()
		case destAttrAddrFamily:
			af = ad.Uint16()
		}
	}
	if err := ad.Err(); err != nil {
		return rs, err
	}
	rs.addr, err = inetAddr(af, addr)
	return rs, err
}

// inetAddr reads a union nf_inet_addr (16 bytes; IPv4 in the first 4).
func inetAddr(af uint16, b []byte) (netip.Addr, error) {
	switch {
	case af == unix.AF_INET && len(b) >= 4:
		return netip.AddrFrom4([4]byte(b[:4])), nil
	case af == unix.AF_INET6 && len(b) >= 16:
		return netip.AddrFrom16([16]byte(b[:16])), nil
	case len(b) == 0:
		return netip.Addr{}, nil // a firewall-mark service has no address
	}
	return netip.Addr{}, fmt.Errorf("address of %d bytes for family %d", len(b), af)
}

func protocolName(p uint16) string {
	switch p {
	case unix.IPPROTO_TCP:
		return "TCP"
	case unix.IPPROTO_UDP:
		return "UDP"
	case unix.IPPROTO_SCTP:
		return "SCTP"
	}
	return fmt.Sprintf("proto-%d", p)
}

// table is what the rules send to: per virtual server, its real servers with weight > 0.
type table map[string]map[probes.Endpoint]bool

func virtualKey(vs virtualServer) string {
	if vs.fwmark != 0 {
		return fmt.Sprintf("fwmark %d", vs.fwmark)
	}
	return fmt.Sprintf("%s/%s", netip.AddrPortFrom(vs.addr, vs.port), protocolName(vs.protocol))
}

// add records a real server; weight 0 means kube-proxy has taken it out of rotation.
func (t table) add(vs virtualServer, rs realServer) {
	k := virtualKey(vs)
	if t[k] == nil {
		t[k] = map[probes.Endpoint]bool{}
	}
	if rs.weight > 0 {
		t[k][probes.Endpoint{Addr: rs.addr.Unmap(), Port: rs.port, Protocol: protocolName(vs.protocol)}] = true
	}
}

// removed lists the endpoints that some virtual server of prev sent to and the same virtual
// server of next does not.
func removed(prev, next table) []probes.Endpoint {
	out := map[probes.Endpoint]bool{}
	for k, eps := range prev {
		for ep := range eps {
			if !next[k][ep] {
				out[ep] = true
			}
		}
	}
	return probes.EndpointList(out)
}

// Probe polls IPVS in the network namespace it runs in.
type Probe struct {
	interval time.Duration
	clock    clock.PassiveClock
	log      *slog.Logger
	// KubeProxy is asked for kube-proxy's mode when its IPVS interface appears.
	KubeProxy proxymode.Asker
	// read and dummy read the virtual servers and tell whether kube-proxy's IPVS interface exists
	// (tests replace them: this project's machines have no IPVS).
	read  func() (table, error)
	dummy func() bool
	// after is time.After; tests see the waits through it.
	after func(time.Duration) <-chan time.Time

	mu sync.Mutex
	// reached are the endpoints some virtual server sends to, at the last read; nil before it.
	reached map[probes.Endpoint]bool
}

// dummyInterface is the interface kube-proxy's IPVS mode binds every Service address to. Other
// users of IPVS (keepalived, kube-vip, ipvsadm by hand) make virtual servers but not this.
const dummyInterface = "kube-ipvs0"

func hasDummyInterface() bool {
	_, err := net.InterfaceByName(dummyInterface)
	return err == nil
}

// New returns the probe; it reads every interval, with ±10 % jitter.
func New(interval time.Duration, clk clock.PassiveClock, log *slog.Logger) *Probe {
	if interval <= 0 {
		interval = time.Second
	}
	return &Probe{interval: interval, clock: clk, log: log.With("probe", Name), read: read, dummy: hasDummyInterface, after: time.After}
}

// Reaches implements probes.Dataplane. IPVS names no Services: an endpoint is reached when any
// virtual server sends to it.
func (p *Probe) Reaches(_ probes.ServiceRef, ep probes.Endpoint) ([]probes.Reach, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.reached == nil {
		return nil, false
	}
	if !p.reached[ep] {
		return nil, true
	}
	return []probes.Reach{{Path: probes.PathCluster, Policy: probes.Policy{Cluster: true}}}, true
}

func (p *Probe) setReached(t table) {
	eps := map[probes.Endpoint]bool{}
	for _, vs := range t {
		for ep := range vs {
			eps[ep] = true
		}
	}
	p.mu.Lock()
	p.reached = eps
	p.mu.Unlock()
}

// Name implements probes.Probe.
func (p *Probe) Name() string { return Name }

// errNoIPVS says the kernel has no IPVS (no module, no generic netlink family).
var errNoIPVS = errors.New("the kernel has no IPVS")

// read returns the current virtual servers and their real servers.
func read() (table, error) {
	if _, err := os.Stat("/proc/net/ip_vs"); err != nil {
		return nil, errNoIPVS
	}
	c, err := genetlink.Dial(nil)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	fam, err := c.GetFamily(genlName)
	if err != nil {
		return nil, errNoIPVS
	}
	msgs, err := c.Execute(genetlink.Message{Header: genetlink.Header{Command: cmdGetService, Version: fam.Version}},
		fam.ID, netlink.Request|netlink.Dump)
	if err != nil {
		return nil, fmt.Errorf("IPVS services: %w", err)
	}
	t := table{}
	for _, m := range msgs {
		svcAttr, err := nested(m.Data, cmdAttrService)
		if err != nil {
			return nil, err
		}
		vs, err := decodeService(svcAttr)
		if err != nil {
			return nil, fmt.Errorf("IPVS service: %w", err)
		}
		req, err := netlink.MarshalAttributes([]netlink.Attribute{{Type: cmdAttrService | unix.NLA_F_NESTED, Data: vs.raw}})
		if err != nil {
			return nil, err
		}
		dests, err := c.Execute(genetlink.Message{Header: genetlink.Header{Command: cmdGetDest, Version: fam.Version}, Data: req},
			fam.ID, netlink.Request|netlink.Dump)
		if err != nil {
			return nil, fmt.Errorf("IPVS real servers of %s: %w", virtualKey(vs), err)
		}
		if len(dests) == 0 {
			t[virtualKey(vs)] = map[probes.Endpoint]bool{}
		}
		for _, d := range dests {
			destAttr, err := nested(d.Data, cmdAttrDest)
			if err != nil {
				return nil, err
			}
			rs, err := decodeDest(destAttr, vs.af)
			if err != nil {
				return nil, fmt.Errorf("IPVS real server of %s: %w", virtualKey(vs), err)
			}
			t.add(vs, rs)
		}
	}
	return t, nil
}

// nested returns the payload of attribute typ of a generic netlink message.
func nested(b []byte, typ uint16) ([]byte, error) {
	ad, err := netlink.NewAttributeDecoder(b)
	if err != nil {
		return nil, err
	}
	for ad.Next() {
		if ad.Type() == typ {
			return ad.Bytes(), nil
		}
	}
	if err := ad.Err(); err != nil {
		return nil, err
	}
	return nil, fmt.Errorf("IPVS message without attribute %d", typ)
}

// Run implements probes.Probe. It stays inactive while the kernel has no IPVS or the node has no
// kube-ipvs0 interface, and while kube-proxy names another mode; while inactive it reads less
// and less often, down to once every poll.AbsentPolls intervals (poll.Backoff).
func (p *Probe) Run(ctx context.Context, sink probes.Sink) error {
	sink.SetStatus(Name, probes.Status{Up: true, Synced: true, Inactive: true})
	var (
		prev     table
		evidence bool
		active   bool
		wait     = poll.Backoff{Interval: p.interval}
	)
	for {
		now := p.clock.Now()
		next, err := p.read()
		idle := false
		switch {
		case errors.Is(err, errNoIPVS):
			idle = true
			sink.SetStatus(Name, probes.Status{Up: true, Synced: true, Inactive: true})
		case err != nil:
			sink.Error(Name, err)
		default:
			if e := p.dummy(); e != evidence {
				evidence, active = e, e
				if other := p.KubeProxy.Disagrees(ctx, Name); e && other != "" {
					active = false
					p.log.Info("kube-ipvs0 exists, but kube-proxy runs in another mode: inactive", "mode", other)
				}
				p.log.Info("kube-proxy's IPVS interface", "present", e, "active", active)
			}
			idle = !active
			sink.SetStatus(Name, probes.Status{Up: true, Synced: true, Inactive: !active})
			if prev != nil {
				for _, ep := range removed(prev, next) {
					sink.Observe(probes.Observation{Stage: probes.StageIPVS, Time: now, Precision: p.interval, Source: Name, Path: probes.PathCluster, Endpoint: ep})
				}
			}
			prev = next
			p.setReached(next)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-p.after(poll.Jitter(wait.Next(idle))):
		}
	}
}

// Snapshot reads IPVS once and returns what each virtual server sends to.
func Snapshot() ([]probes.ServiceEndpoints, error) {
	t, err := read()
	if errors.Is(err, errNoIPVS) {
		return []probes.ServiceEndpoints{}, nil
	}
	if err != nil {
		return nil, err
	}
	out := make([]probes.ServiceEndpoints, 0, len(t))
	for k, eps := range t {
		out = append(out, probes.ServiceEndpoints{Chain: k, Endpoints: probes.EndpointList(eps)})
	}
	probes.SortServiceEndpoints(out)
	return out, nil
}
