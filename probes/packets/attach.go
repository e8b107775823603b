package packets

import (
	"errors"
	"fmt"
	"runtime"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Attach modes.
const (
	AttachAuto = "auto"
	AttachTCX  = "tcx"
	AttachTC   = "tc"
)

// filterPrefix names the classic TC filters this program installs, so that a later instance can
// find and remove what a killed one left.
const filterPrefix = "endpointlag-"

// filterPriority is the priority of endpointlag's classic TC filters: late, after what the CNI
// installs, as the programs only count.
const filterPriority = 0xfff0

// netns runs kernel requests in the network namespace the probe watches: directly in its own,
// or on an OS thread moved into another (tests).
type netns struct {
	fd int // -1: the current namespace
}

func (n netns) do(f func() error) error {
	if n.fd < 0 {
		return f()
	}
	errc := make(chan error, 1)
	go func() {
		// The thread is never unlocked, so it ends with this goroutine and no other code runs
		// in the namespace.
		runtime.LockOSThread()
		if err := unix.Setns(n.fd, unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("entering the network namespace: %w", err)
			return
		}
		errc <- f()
	}()
	return <-errc
}

// attachment is one program on one direction of one interface.
type attachment struct {
	ifindex int
	ifname  string
	program string
	role    string // pod or uplink
	ingress bool
	// link is set for TCX; filter for classic TC.
	link   link.Link
	filter *netlink.BpfFilter
}

func (a *attachment) String() string {
	dir := "egress"
	if a.ingress {
		dir = "ingress"
	}
	return fmt.Sprintf("%s %s on %s", a.program, dir, a.ifname)
}

// attach puts prog on one direction of an interface: through TCX where the kernel has it (auto,
// tcx), as a direct-action filter of a clsact qdisc otherwise (auto, tc).
func (p *Probe) attach(ifindex int, ifname, name string, prog *ebpf.Program, ingress bool) (*attachment, error) {
	a := &attachment{ifindex: ifindex, ifname: ifname, program: name, ingress: ingress}
	var err error
	if p.opts.Attach != AttachTC {
		typ := ebpf.AttachTCXEgress
		if ingress {
			typ = ebpf.AttachTCXIngress
		}
		err = p.ns.do(func() error {
			l, err := link.AttachTCX(link.TCXOptions{Interface: ifindex, Program: prog, Attach: typ})
			a.link = l
			return err
		})
		if err == nil || p.opts.Attach == AttachTCX || !errors.Is(err, ebpf.ErrNotSupported) {
			return a, err
		}
	}
	if err := p.ensureClsact(ifindex); err != nil {
		return nil, err
	}
	parent := uint32(netlink.HANDLE_MIN_EGRESS)
	if ingress {
		parent = netlink.HANDLE_MIN_INGRESS
	}
	a.filter = &netlink.BpfFilter{
		FilterAttrs: netlink.FilterAttrs{
			LinkIndex: ifindex, Parent: parent, Handle: netlink.MakeHandle(0, 1),
			Protocol: unix.ETH_P_ALL, Priority: filterPriority,
		},
		Fd: prog.FD(), Name: filterPrefix + name, DirectAction: true,
	}
	if err := p.nl.FilterAdd(a.filter); err != nil {
		return nil, fmt.Errorf("adding TC filter: %w", err)
	}
	return a, nil
}

func (p *Probe) ensureClsact(ifindex int) error {
	q := &netlink.Clsact{QdiscAttrs: netlink.QdiscAttrs{LinkIndex: ifindex, Handle: netlink.MakeHandle(0xffff, 0), Parent: netlink.HANDLE_CLSACT}}
	if err := p.nl.QdiscAdd(q); err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("adding clsact qdisc: %w", err)
	}
	return nil
}

// detach removes the program; an interface that is gone took it along.
func (p *Probe) detach(a *attachment) error {
	if a.link != nil {
		return a.link.Close()
	}
	if err := p.nl.FilterDel(a.filter); err != nil && !errors.Is(err, unix.ENODEV) && !errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.EINVAL) {
		return fmt.Errorf("removing TC filter %s: %w", a, err)
	}
	return nil
}

// removeLeftovers deletes the classic TC filters a previous instance left (killed before it
// could remove them) and returns how many. TCX links need no cleanup: they end with the process
// that holds them.
func (p *Probe) removeLeftovers() (int, error) {
	links, err := p.nl.LinkList()
	if err != nil {
		return 0, fmt.Errorf("listing links: %w", err)
	}
	n := 0
	var errs []error
	for _, l := range links {
		for _, parent := range []uint32{netlink.HANDLE_MIN_INGRESS, netlink.HANDLE_MIN_EGRESS} {
			filters, err := p.nl.FilterList(l, parent)
			if err != nil {
				continue // no clsact qdisc
			}
			for _, f := range filters {
				if bf, ok := f.(*netlink.BpfFilter); ok && strings.HasPrefix(bf.Name, filterPrefix) {
					if err := p.nl.FilterDel(bf); err != nil {
						errs = append(errs, fmt.Errorf("removing %s's filter %s: %w", l.Attrs().Name, bf.Name, err))
						continue
					}
					n++
				}
			}
		}
	}
	return n, errors.Join(errs...)
}
