package packets

import (
	"errors"
	"fmt"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/endpointlag/endpointlag/probes/internal/inns"
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

// filterPriority is the priority of endpointlag's classic TC filters: the first (1). A CNI's
// filter that ends classification (TC_ACT_OK, a redirect) would otherwise keep the packet from
// programs after it, and the programs, which only count and hand every packet on, must see it.
// Within one priority (and protocol) the kernel runs the newest filter first (cls_bpf adds at the
// head of its list), so the probe's filter, added after the CNI's, runs before it.
const filterPriority = 1

// filterHandle is the handle of endpointlag's classic TC filters; filters of one priority and
// protocol share a handle space, and CNIs use the low numbers (Cilium 1).
const filterHandle = 0xe1a9

// Reasons for attaching a program again (the reattachments counter's label).
const (
	// reasonMissing: the program was gone (a CNI replaced the clsact qdisc, removed the filter or
	// detached the link).
	reasonMissing = "missing"
	// reasonNotFirst: another program was put before it.
	reasonNotFirst = "not_first"
)

// attachment is one program on one direction of one interface.
type attachment struct {
	ifindex int
	ifname  string
	program string
	prog    *ebpf.Program
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

func tcxType(ingress bool) ebpf.AttachType {
	if ingress {
		return ebpf.AttachTCXIngress
	}
	return ebpf.AttachTCXEgress
}

func tcParent(ingress bool) uint32 {
	if ingress {
		return netlink.HANDLE_MIN_INGRESS
	}
	return netlink.HANDLE_MIN_EGRESS
}

// attach puts prog first on one direction of an interface: through TCX where the kernel has it
// (auto, tcx), at the head of the chain; as a direct-action filter of a clsact qdisc otherwise
// (auto, tc), at the first priority.
func (p *Probe) attach(ifindex int, ifname, name string, prog *ebpf.Program, ingress bool) (*attachment, error) {
	a := &attachment{ifindex: ifindex, ifname: ifname, program: name, prog: prog, ingress: ingress}
	var err error
	if p.opts.Attach != AttachTC {
		err = inns.Do(p.nsfd, func() error {
			l, err := link.AttachTCX(link.TCXOptions{Interface: ifindex, Program: prog, Attach: tcxType(ingress), Anchor: link.Head()})
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
	a.filter = &netlink.BpfFilter{
		FilterAttrs: netlink.FilterAttrs{
			LinkIndex: ifindex, Parent: tcParent(ingress), Handle: filterHandle,
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

// checkOrder makes sure each program still runs first where it was attached, and attaches it
// again, first, where a CNI removed it (replaced the clsact qdisc, flushed the filters) or put a
// program before it; each time is counted by reason. Between the removal and the new attachment a
// packet can pass uncounted. Called with p.mu held.
func (p *Probe) checkOrder() error {
	var errs []error
	for _, as := range p.attachments {
		for i, a := range as {
			reason, err := p.position(a)
			if err != nil {
				if !errors.Is(err, unix.ENODEV) { // gone: the link event follows
					errs = append(errs, fmt.Errorf("checking %s: %w", a, err))
				}
				continue
			}
			if reason == "" {
				continue
			}
			if err := p.detach(a); err != nil {
				errs = append(errs, err)
				continue
			}
			na, err := p.attach(a.ifindex, a.ifname, a.program, a.prog, a.ingress)
			if err != nil {
				errs = append(errs, fmt.Errorf("attaching %s again: %w", a, err))
				continue
			}
			na.role = a.role
			as[i] = na
			p.reattachments[reason]++
			p.log.Info("attached again, first", "program", a.program, "interface", a.ifname, "ingress", a.ingress, "reason", reason)
		}
	}
	return errors.Join(errs...)
}

// position tells whether a program still runs first where it was attached: "" when it does, else
// the reason to attach it again.
func (p *Probe) position(a *attachment) (string, error) {
	want := p.progIDs[a.program]
	if a.link != nil {
		var res *link.QueryResult
		err := inns.Do(p.nsfd, func() error {
			var err error
			res, err = link.QueryPrograms(link.QueryOptions{Target: a.ifindex, Attach: tcxType(a.ingress)})
			return err
		})
		if err != nil {
			return "", err
		}
		for i, prog := range res.Programs {
			if prog.ID == want {
				return notFirstUnless(i == 0), nil
			}
		}
		return reasonMissing, nil
	}
	filters, err := p.nl.FilterList(&netlink.Device{LinkAttrs: netlink.LinkAttrs{Index: a.ifindex}}, tcParent(a.ingress))
	if err != nil {
		return "", err
	}
	// The kernel lists a direction's filters in the order it runs them.
	for i, f := range filters {
		if bf, ok := f.(*netlink.BpfFilter); ok && bf.Name == a.filter.Name && bf.Id == int(want) {
			return notFirstUnless(i == 0), nil
		}
	}
	return reasonMissing, nil
}

// notFirstUnless is the reason to attach again a program found attached, first or not.
func notFirstUnless(first bool) string {
	if first {
		return ""
	}
	return reasonNotFirst
}
