package packets

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"time"

	"github.com/cilium/ebpf"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/endpointlag/endpointlag/bpf"
	"github.com/endpointlag/endpointlag/probes"
)

// This file keeps the programs' maps in step with the collector's list of this node's deleting
// pods (addresses, the ports they serve) and with the node's own addresses, and reports each
// pod's last client connection when its addresses leave the terminating map.

// tracked is a pod address in one of the programs' maps.
type tracked struct {
	pod     probes.PodRef
	t0      time.Time
	deleted bool
	// ifindex is the pod veth the address is routed to while the pod terminates (0: unknown).
	ifindex int
	// services are the ports the address serves as its endpoints list them; nil while they are
	// not known, and then the programs count connections to every port.
	services []service
}

// service is a port a pod address serves, as the programs' served map keys it; port 0 stands for
// every port of the protocol.
type service struct {
	addr  netip.Addr
	port  uint16
	proto uint8
}

func (s service) String() string { return fmt.Sprintf("%s port %d/%d", s.addr, s.port, s.proto) }

func (s service) key() bpf.EndpointlagService {
	return bpf.EndpointlagService{Addr: addrKey(s.addr), Port: s.port, Proto: s.proto}
}

// protocols are the IP protocol numbers of EndpointSlice protocols; Kubernetes' default is TCP.
var protocols = map[string]uint8{"": unix.IPPROTO_TCP, "TCP": unix.IPPROTO_TCP, "UDP": unix.IPPROTO_UDP, "SCTP": unix.IPPROTO_SCTP}

// servicesOf returns what a pod's endpoints say address a serves (nil when they say nothing of a).
func servicesOf(lp probes.LocalPod, a netip.Addr) []service {
	var out []service
	for _, ep := range lp.Endpoints {
		proto, ok := protocols[ep.Protocol]
		if !ok || ep.Addr.Unmap() != a {
			continue
		}
		s := service{addr: a, port: ep.Port, proto: proto}
		if !slices.Contains(out, s) {
			out = append(out, s)
		}
	}
	return out
}

// lastConn is what the addresses of a pod that left the terminating map said of its last client
// connection (zero: none).
type lastConn struct {
	pod probes.PodRef
	at  time.Time
}

func addrKey(a netip.Addr) bpf.EndpointlagAddr {
	return bpf.EndpointlagAddr{B: netip.AddrFrom16(a.As16()).As16()}
}

func keyAddr(k bpf.EndpointlagAddr) netip.Addr {
	return netip.AddrFrom16(k.B).Unmap()
}

// routedTo returns the interface this node routes a pod address to (0 when unknown).
func (p *Probe) routedTo(a netip.Addr) int {
	if p.nl == nil {
		return 0
	}
	routes, err := p.nl.RouteGet(a.AsSlice())
	if err != nil || len(routes) == 0 {
		return 0
	}
	return routes[0].LinkIndex
}

// vethDeleted moves the addresses of terminating pods behind a deleted veth to the deleted map at
// once: their network is gone, and new connections to them go nowhere (the API's word that the
// pod is gone comes later). Called with p.mu held.
func (p *Probe) vethDeleted(idx int, sink probes.Sink) {
	for a, t := range p.tracked {
		if t.deleted || t.ifindex != idx {
			continue
		}
		p.untrack(a, t)
		p.vethGone[a] = t.pod.UID
		t.deleted, t.ifindex = true, 0
		if err := p.objs.Deleted.Update(addrKey(a), bpf.EndpointlagCounters{}, ebpf.UpdateNoExist); err != nil {
			sink.Error(Name, fmt.Errorf("adding %s to the deleted map: %w", a, err))
			continue
		}
		p.tracked[a] = t
	}
	p.reportLastConns(sink)
}

// reconcile makes the maps hold the addresses of the collector's deleting pods (terminating until
// the pod is gone, deleted after that, until the collector forgets the pod) with the ports they
// serve, and the node's own addresses; reports the pods whose addresses left the terminating map;
// and checks that the programs still run first and see the traffic. It returns what failed.
func (p *Probe) reconcile(sink probes.Sink) error {
	if p.pods == nil {
		return nil
	}
	pods := p.pods.LocalPods()
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.objs == nil {
		return nil
	}
	p.monoOffset = monoOffset()
	listed := map[string]bool{}
	for _, lp := range pods {
		listed[lp.Pod.UID] = true
	}
	for uid := range p.reported {
		if !listed[uid] {
			delete(p.reported, uid)
		}
	}
	armed, err := p.reconcileAddrs(pods)
	errs := []error{err, p.reconcileServed(), p.reconcileNodeAddrs(), p.replayRecent(armed, sink)}
	p.reportLastConns(sink)
	errs = append(errs, p.checkOrder())
	p.checkRedirectPeer()
	return errors.Join(errs...)
}

// reconcileAddrs puts the collector's deleting pods' addresses into the terminating and deleted
// maps, and takes out those it no longer lists. It returns the addresses it began to track for a
// pod. Called with p.mu held.
func (p *Probe) reconcileAddrs(pods []probes.LocalPod) (armed []netip.Addr, err error) {
	before := make(map[netip.Addr]string, len(p.tracked))
	for a, t := range p.tracked {
		before[a] = t.pod.UID
	}
	want := map[netip.Addr]tracked{}
	for _, lp := range pods {
		for _, a := range lp.Addrs {
			a = a.Unmap()
			// An address a newer pod took over belongs to the newer pod.
			if have, ok := want[a]; !ok || lp.T0.After(have.t0) {
				want[a] = tracked{pod: lp.Pod, t0: lp.T0, deleted: lp.Gone || p.vethGone[a] == lp.Pod.UID, services: servicesOf(lp, a)}
			}
		}
	}
	for a := range p.vethGone {
		if _, ok := want[a]; !ok {
			delete(p.vethGone, a)
		}
	}
	// Each map keeps the newest addresses it has room for; older ones wanted beyond that are
	// evicted (or never added), and counted once.
	var byAge [2][]netip.Addr
	for a, w := range want {
		byAge[mapIndex(w.deleted)] = append(byAge[mapIndex(w.deleted)], a)
	}
	for i := range byAge {
		slices.SortFunc(byAge[i], func(x, y netip.Addr) int { return want[y].t0.Compare(want[x].t0) })
		if len(byAge[i]) > p.opts.MaxPods {
			for _, a := range byAge[i][p.opts.MaxPods:] {
				if !p.overLimit[a] {
					p.overLimit[a] = true
					p.evictions[i]++
				}
				delete(want, a)
			}
			byAge[i] = byAge[i][:p.opts.MaxPods]
		}
	}
	for a := range p.overLimit {
		if _, ok := want[a]; ok {
			delete(p.overLimit, a) // admitted again
		}
	}
	var gone []netip.Addr
	for a, have := range p.tracked {
		w, ok := want[a]
		if !ok || w.deleted != have.deleted || w.pod.UID != have.pod.UID {
			p.untrack(a, have)
		}
		if !ok || w.pod.UID != have.pod.UID {
			gone = append(gone, a)
		}
	}
	var errs []error
	if err := p.forgetFlows(gone); err != nil {
		errs = append(errs, err)
	}
	for _, addrs := range byAge {
		for _, a := range addrs {
			w := want[a]
			if have, ok := p.tracked[a]; ok {
				have.services = w.services
				p.tracked[a] = have
				continue
			}
			if err := p.mapOf(w.deleted).Update(addrKey(a), bpf.EndpointlagCounters{}, ebpf.UpdateNoExist); err != nil {
				errs = append(errs, fmt.Errorf("adding %s to the %s map: %w", a, mapName(w.deleted), err))
				continue
			}
			if !w.deleted {
				w.ifindex = p.routedTo(a)
			}
			p.tracked[a] = w
			if before[a] != w.pod.UID {
				armed = append(armed, a)
			}
		}
	}
	return armed, errors.Join(errs...)
}

// replayRecent reports the clients' SYNs that reached the addresses just armed after their pods'
// deletion began (T0) and before they were armed, from the programs' per-CPU rings of recent
// SYNs to untracked addresses: the collector and this probe learn of a deletion a moment after
// T0, and connections in that moment would be missed otherwise. Once an address is armed the
// programs send events for it and write no more of its SYNs to the rings, so none is reported
// twice. A ring that wrapped past an armed pod's T0 may have lost some: counted as an overrun.
// Called with p.mu held.
func (p *Probe) replayRecent(armed []netip.Addr, sink probes.Sink) error {
	if len(armed) == 0 {
		return nil
	}
	cpus, err := ebpf.PossibleCPU()
	if err != nil {
		return fmt.Errorf("reading the recent SYNs: %w", err)
	}
	var next []uint64
	if err := p.objs.RecentNext.Lookup(uint32(0), &next); err != nil {
		return fmt.Errorf("reading the recent SYNs: %w", err)
	}
	slots := int(p.objs.Recent.MaxEntries())
	syns, err := readRecent(p.objs.Recent, slots, cpus)
	if err != nil {
		return fmt.Errorf("reading the recent SYNs: %w", err)
	}
	p.monoOffset = monoOffset()
	since := map[bpf.EndpointlagAddr]uint64{} // armed address → its pod's T0 in the programs' clock
	for _, a := range armed {
		t := p.tracked[a]
		if ns := t.t0.UnixNano() - int64(p.monoOffset); ns > 0 {
			since[addrKey(a)] = uint64(ns)
		}
	}
	// A CPU whose ring wrapped holds nothing older than its oldest slot.
	oldest := make([]uint64, cpus)
	for cpu := range cpus {
		if cpu >= len(next) || next[cpu] < uint64(slots) {
			continue
		}
		for slot := range slots {
			if ns := syns[slot*cpus+cpu].TimeNs; ns != 0 && (oldest[cpu] == 0 || ns < oldest[cpu]) {
				oldest[cpu] = ns
			}
		}
	}
	for k, t0 := range since {
		for cpu := range cpus {
			if oldest[cpu] > t0 {
				p.recentOverruns++
				p.log.Warn("the ring of recent SYNs wrapped between a pod's deletion and its tracking: late connections in between may be missing", "address", keyAddr(k), "cpu", cpu)
				break
			}
		}
	}
	for _, r := range syns {
		t0, ok := since[r.Daddr]
		if !ok || r.TimeNs < t0 {
			continue
		}
		daddr := keyAddr(r.Daddr)
		t := p.tracked[daddr]
		if !t.servesPort(r.Dport) {
			continue
		}
		p.replayed++
		sink.Observe(probes.Observation{
			Stage: probes.StageLateConnection, Time: p.wallTime(r.TimeNs), Source: Name, Pod: t.pod, Local: true,
			Endpoint: probes.Endpoint{Addr: daddr, Port: r.Dport, Protocol: "TCP"},
			Peer:     netip.AddrPortFrom(keyAddr(r.Saddr), r.Sport),
		})
	}
	return nil
}

// readRecent reads every CPU's ring of recent SYNs: slot-major, cpus values per slot.
func readRecent(m *ebpf.Map, slots, cpus int) ([]bpf.EndpointlagRecentSyn, error) {
	keys := make([]uint32, slots)
	out := make([]bpf.EndpointlagRecentSyn, slots*cpus)
	var cursor ebpf.MapBatchCursor
	n, err := m.BatchLookup(&cursor, keys, out, nil)
	if err == nil || errors.Is(err, ebpf.ErrKeyNotExist) {
		if n == slots {
			return out, nil
		}
		err = fmt.Errorf("a batch of %d slots of %d", n, slots)
	}
	if !errors.Is(err, ebpf.ErrNotSupported) {
		return nil, err
	}
	// Kernels before 5.6 have no batch lookup: one slot at a time.
	vals := make([]bpf.EndpointlagRecentSyn, cpus)
	for slot := range uint32(slots) {
		if err := m.Lookup(slot, &vals); err != nil {
			return nil, err
		}
		copy(out[int(slot)*cpus:], vals)
	}
	return out, nil
}

// servesPort reports whether the address serves TCP port, by its endpoints (all ports while they
// are not known), as the programs' served map says.
func (t tracked) servesPort(port uint16) bool {
	if len(t.services) == 0 {
		return true
	}
	for _, s := range t.services {
		if s.proto == unix.IPPROTO_TCP && (s.port == port || s.port == 0) {
			return true
		}
	}
	return false
}

// reconcileServed makes the served and filtered maps say which ports each tracked address
// serves. An address's ports are in the served map before its mark in filtered, and the mark
// leaves first: the programs never filter an address on a partial list. Called with p.mu held.
func (p *Probe) reconcileServed() error {
	want := map[service]bool{}
	filter := map[netip.Addr]bool{}
	for a, t := range p.tracked {
		for _, s := range t.services {
			want[s] = true
		}
		if len(t.services) > 0 {
			filter[a] = true
		}
	}
	served := keySet[service, bpf.EndpointlagService]{"served", p.objs.Served, p.served, service.key}
	filtered := keySet[netip.Addr, bpf.EndpointlagAddr]{"filtered", p.objs.Filtered, p.filtered, addrKey}
	errs := []error{filtered.remove(filter)}
	failed, err := served.add(want)
	for _, s := range failed {
		delete(filter, s.addr) // counted unfiltered rather than filtered on a partial list
	}
	_, errFiltered := filtered.add(filter)
	errs = append(errs, err, errFiltered, served.remove(want))
	return errors.Join(errs...)
}

// reconcileNodeAddrs puts the addresses of the network namespace the probe runs in into the
// node_addrs map: connections from them are the node's own. Called with p.mu held.
func (p *Probe) reconcileNodeAddrs() error {
	if p.nl == nil {
		return nil
	}
	list, err := p.nl.AddrList(nil, netlink.FAMILY_ALL)
	if err != nil {
		return fmt.Errorf("listing the node's addresses: %w", err)
	}
	want := map[netip.Addr]bool{}
	for _, a := range list {
		if na, ok := netip.AddrFromSlice(a.IP); ok {
			want[na.Unmap()] = true
		}
	}
	node := keySet[netip.Addr, bpf.EndpointlagAddr]{"node_addrs", p.objs.NodeAddrs, p.nodeAddrs, addrKey}
	_, errAdd := node.add(want)
	return errors.Join(errAdd, node.remove(want))
}

// keySet is one of the programs' maps used as a set (every value 1), and the keys user space put
// into it.
type keySet[K comparable, B any] struct {
	name string
	m    *ebpf.Map
	have map[K]bool
	key  func(K) B
}

// add puts the keys of want the map lacks, and returns those it could not.
func (s keySet[K, B]) add(want map[K]bool) (failed []K, err error) {
	var errs []error
	for k := range want {
		if s.have[k] {
			continue
		}
		if err := s.m.Put(s.key(k), uint8(1)); err != nil {
			failed = append(failed, k)
			errs = append(errs, fmt.Errorf("adding %v to the %s map: %w", k, s.name, err))
			continue
		}
		s.have[k] = true
	}
	return failed, errors.Join(errs...)
}

// remove takes the keys not in want out of the map.
func (s keySet[K, B]) remove(want map[K]bool) error {
	var errs []error
	for k := range s.have {
		if want[k] {
			continue
		}
		if err := s.m.Delete(s.key(k)); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			errs = append(errs, fmt.Errorf("removing %v from the %s map: %w", k, s.name, err))
			continue
		}
		delete(s.have, k)
	}
	return errors.Join(errs...)
}

// forgetFlows removes the UDP flows and unanswered SYNs to addresses no longer tracked for the
// same pod, so that the address's next pod starts with none. Called with p.mu held.
func (p *Probe) forgetFlows(addrs []netip.Addr) error {
	if len(addrs) == 0 {
		return nil
	}
	gone := map[bpf.EndpointlagAddr]bool{}
	for _, a := range addrs {
		gone[addrKey(a)] = true
	}
	var errs []error
	for _, m := range []*ebpf.Map{p.objs.UdpFlows, p.objs.Syns} {
		var (
			k    bpf.EndpointlagFlow
			v    uint8
			keys []bpf.EndpointlagFlow
		)
		it := m.Iterate()
		for it.Next(&k, &v) {
			if gone[k.Daddr] {
				keys = append(keys, k)
			}
		}
		if err := it.Err(); err != nil {
			errs = append(errs, fmt.Errorf("reading the flows: %w", err))
		}
		for _, k := range keys {
			// An LRU map may have dropped the entry meanwhile.
			if err := m.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
				errs = append(errs, fmt.Errorf("removing a flow to %s: %w", keyAddr(k.Daddr), err))
			}
		}
	}
	return errors.Join(errs...)
}

func mapName(deleted bool) string {
	if deleted {
		return "deleted"
	}
	return "terminating"
}

func mapIndex(deleted bool) int {
	if deleted {
		return 1
	}
	return 0
}

func (p *Probe) mapOf(deleted bool) *ebpf.Map {
	if deleted {
		return p.objs.Deleted
	}
	return p.objs.Terminating
}

// untrack removes an address from its map, keeping its counts in the retired totals and, for a
// terminating pod, its last client connection until the pod's last address left.
func (p *Probe) untrack(a netip.Addr, t tracked) {
	var c bpf.EndpointlagCounters
	m := p.mapOf(t.deleted)
	if err := m.LookupAndDelete(addrKey(a), &c); err == nil {
		addCounters(&p.retired[mapIndex(t.deleted)], c)
	} else if err := m.Lookup(addrKey(a), &c); err == nil {
		// Hash maps have no atomic lookup-and-delete before Linux 5.14.
		addCounters(&p.retired[mapIndex(t.deleted)], c)
		_ = m.Delete(addrKey(a))
	}
	delete(p.tracked, a)
	if t.deleted {
		return
	}
	lc := p.lastConns[t.pod.UID]
	if lc == nil {
		lc = &lastConn{pod: t.pod}
		p.lastConns[t.pod.UID] = lc
	}
	if c.LastConnNs != 0 {
		if at := p.wallTime(c.LastConnNs); at.After(lc.at) {
			lc.at = at
		}
	}
}

// reportLastConns reports, once per pod, the last client connection of each pod whose addresses
// all left the terminating map. Called with p.mu held.
func (p *Probe) reportLastConns(sink probes.Sink) {
	for uid, lc := range p.lastConns {
		if p.terminating(uid) {
			continue
		}
		delete(p.lastConns, uid)
		if p.reported[uid] {
			continue
		}
		p.reported[uid] = true
		sink.Observe(probes.Observation{Stage: probes.StageLastConnection, Time: lc.at, Source: Name, Pod: lc.pod, Local: true})
	}
}

// terminating reports whether an address of the pod is in the terminating map.
func (p *Probe) terminating(uid string) bool {
	for _, t := range p.tracked {
		if !t.deleted && t.pod.UID == uid {
			return true
		}
	}
	return false
}

func addCounters(into *bpf.EndpointlagCounters, c bpf.EndpointlagCounters) {
	into.Packets += c.Packets
	into.Bytes += c.Bytes
	into.TcpConns += c.TcpConns
	into.UdpFlows += c.UdpFlows
	into.NodeTcpConns += c.NodeTcpConns
	into.NodeUdpFlows += c.NodeUdpFlows
	into.Resets += c.Resets
	into.Refused += c.Refused
	into.Unreachables += c.Unreachables
}

// monoOffset is wall time minus CLOCK_MONOTONIC, which bpf_ktime_get_ns reads.
func monoOffset() time.Duration {
	var ts unix.Timespec
	_ = unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
	return time.Duration(time.Now().UnixNano() - ts.Nano())
}

// wallTime turns the programs' CLOCK_MONOTONIC nanoseconds into wall time. Called with p.mu held.
func (p *Probe) wallTime(ns uint64) time.Time {
	return time.Unix(0, int64(p.monoOffset)+int64(ns))
}
