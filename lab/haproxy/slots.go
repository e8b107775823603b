package haproxy

import (
	"fmt"
	"net/netip"
	"slices"
	"strconv"
)

// slots are one backend's server slots, SRV_1 … SRV_n, each holding an endpoint or free, as the
// HAProxy Kubernetes Ingress Controller keeps them (its store.HAProxySrv list): the
// configuration declares the slots once, and endpoints come and go through the runtime API
// without a reload.
type slots struct {
	backend string
	// addrs[i] is the endpoint in SRV_<i+1>; the zero AddrPort for a free slot.
	addrs []netip.AddrPort
}

func newSlots(backend string, n int) *slots {
	return &slots{backend: backend, addrs: make([]netip.AddrPort, n)}
}

// serverName is the name of slot i (0-based): the controller's "SRV_<i+1>".
func serverName(i int) string { return "SRV_" + strconv.Itoa(i+1) }

// freeAddr is where the controller points a freed slot, in maintenance.
var freeAddr = netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, 0, 1}), 1)

// change is one slot to set: to an endpoint and ready, or freed (the zero AddrPort) and in
// maintenance.
type change struct {
	slot int
	addr netip.AddrPort
}

// sync brings the slots in line with ready, the backend's ready endpoints, as the controller's
// SyncBackendSrvs does: a slot whose endpoint is no longer ready is freed; then each new
// endpoint takes the first free slot (in address order here, where the controller takes them
// in map order); endpoints beyond the last slot are left out (the controller would add slots
// and reload) and returned. Slots start free, as HAProxy's configuration declares them: a new
// HAProxy process wants new slots.
func (s *slots) sync(ready []netip.AddrPort) (changes []change, left []netip.AddrPort) {
	want := map[netip.AddrPort]bool{}
	for _, a := range ready {
		want[a] = true
	}
	changed := make([]bool, len(s.addrs))
	var free []int
	for i, a := range s.addrs {
		switch {
		case a.IsValid() && want[a]:
			delete(want, a)
		case a.IsValid():
			s.addrs[i], changed[i] = netip.AddrPort{}, true
			free = append(free, i)
		default:
			free = append(free, i)
		}
	}
	fresh := make([]netip.AddrPort, 0, len(want))
	for a := range want {
		fresh = append(fresh, a)
	}
	slices.SortFunc(fresh, func(a, b netip.AddrPort) int { return a.Compare(b) })
	for _, a := range fresh {
		if len(free) == 0 {
			left = append(left, a)
			continue
		}
		s.addrs[free[0]], changed[free[0]] = a, true
		free = free[1:]
	}
	for i := range s.addrs {
		if changed[i] {
			changes = append(changes, change{slot: i, addr: s.addrs[i]})
		}
	}
	return changes, left
}

// commands are the runtime API commands for changes, two per slot as the controller sends them
// (SetServerAddrAndState): the address, then the state — ready for an endpoint, maint for a
// freed slot, which goes back to 127.0.0.1 port 1.
func (s *slots) commands(changes []change) []string {
	cmds := make([]string, 0, 2*len(changes))
	for _, c := range changes {
		addr, state := c.addr, "ready"
		if !addr.IsValid() {
			addr, state = freeAddr, "maint"
		}
		srv := s.backend + "/" + serverName(c.slot)
		cmds = append(cmds,
			fmt.Sprintf("set server %s addr %s port %d", srv, addr.Addr(), addr.Port()),
			fmt.Sprintf("set server %s state %s", srv, state))
	}
	return cmds
}
