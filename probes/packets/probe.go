// Package packets loads endpointlag's TC programs (package bpf) and counts the traffic that
// still reaches this node's pods after their deletion began, and the traffic sent to pods already
// gone. It attaches to the host side of every pod veth (followed through netlink link events) and,
// when named, to the node's uplinks; keeps the programs' maps of terminating and deleted pod
// addresses (and the ports they serve) in step with the collector's list of this node's deleting
// pods; turns the programs' events about new connections into late_connection / dead_connection
// observations, and each pod's exact last client connection into a last_connection observation;
// keeps its programs first among the interfaces' TC programs; says where the datapath bypasses
// them; and exports the counters at scrape time. The programs never drop or change a packet.
package packets

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/ringbuf"
	"github.com/cilium/ebpf/rlimit"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/spf13/pflag"
	"github.com/vishvananda/netlink"
	vnetns "github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
	"k8s.io/utils/clock"

	"github.com/endpointlag/endpointlag/bpf"
	"github.com/endpointlag/endpointlag/probes"
	"github.com/endpointlag/endpointlag/probes/internal/poll"
)

// Name is the probe's registry name and the source of its observations.
const Name = "packets"

// Options configure the probe.
type Options struct {
	// Uplinks are the node's interfaces towards other nodes, where packets to deleted pods
	// arrive; none by default.
	Uplinks []string
	// Attach is auto (TCX where the kernel has it, classic TC otherwise), tcx or tc.
	Attach string
	// MaxPods bounds each of the terminating and deleted address maps.
	MaxPods int
	// EventsPerSecond bounds, per CPU, the new-connection events sent to user space.
	EventsPerSecond int
	// ReconcileInterval is how often the maps are compared with the collector's list even
	// without a change notification, and the programs' places among the interfaces' checked,
	// while the probe tracks a pod's addresses. While it tracks none, the reconciliations grow
	// apart up to poll.AbsentPolls intervals: a pod that starts terminating is reconciled at
	// once, by its notification.
	ReconcileInterval time.Duration
}

// Validate names the first setting out of range.
func (o Options) Validate() error {
	switch {
	case o.Attach != AttachAuto && o.Attach != AttachTCX && o.Attach != AttachTC:
		return fmt.Errorf("--packets.attach must be auto, tcx or tc, got %q", o.Attach)
	case o.MaxPods <= 0:
		return fmt.Errorf("--packets.max-pods must be positive, got %d", o.MaxPods)
	case o.EventsPerSecond <= 0:
		return fmt.Errorf("--packets.events-per-second must be positive, got %d", o.EventsPerSecond)
	case o.ReconcileInterval <= 0:
		return fmt.Errorf("reconcile interval must be positive, got %s", o.ReconcileInterval)
	}
	return nil
}

// DefaultOptions are the flags' defaults.
func DefaultOptions() Options {
	return Options{Attach: AttachAuto, MaxPods: 4096, EventsPerSecond: 1000, ReconcileInterval: 5 * time.Second}
}

var flagOpts = DefaultOptions()

func init() {
	probes.Register(probes.Factory{
		Name:           Name,
		Help:           "eBPF TC programs on pod veths (and --packets.uplinks) count packets and new connections that reach this node's pods after their deletion began, and packets to pods already gone",
		DefaultEnabled: true,
		Stages:         []probes.Stage{probes.StageLateConnection, probes.StageDeadConnection, probes.StageLastConnection},
		Flags: func(fs *pflag.FlagSet) {
			flagOpts = DefaultOptions()
			fs.StringSliceVar(&flagOpts.Uplinks, "packets.uplinks", flagOpts.Uplinks,
				"the node's interfaces towards other nodes (comma-separated), where packets to deleted pods arrive; none by default")
			fs.StringVar(&flagOpts.Attach, "packets.attach", flagOpts.Attach,
				"how the programs attach: auto (TCX where the kernel has it, else a clsact filter), tcx or tc")
			fs.IntVar(&flagOpts.MaxPods, "packets.max-pods", flagOpts.MaxPods,
				"most terminating, and separately deleted, pod addresses the programs watch; more evict the oldest, counted")
			fs.IntVar(&flagOpts.EventsPerSecond, "packets.events-per-second", flagOpts.EventsPerSecond,
				"most new-connection events per CPU per second sent to user space (counters are exact regardless)")
		},
		Validate: func() error { return flagOpts.Validate() },
		New: func(env probes.Env) (probes.Probe, error) {
			p := New(flagOpts, env.LocalPods, env.Clock, env.Logger)
			if env.Registerer != nil {
				if err := env.Registerer.Register(p.Collector()); err != nil {
					return nil, err
				}
			}
			return p, nil
		},
	})
}

// Probe runs the programs in the network namespace it starts in (or the one NewInNamespace names).
type Probe struct {
	opts  Options
	pods  probes.LocalPods
	clock clock.PassiveClock
	log   *slog.Logger
	// nsfd is the network namespace the probe watches (-1: its own); kernel requests go there
	// through inns.Do.
	nsfd int
	nl   *netlink.Handle

	mu      sync.Mutex
	objs    *bpf.EndpointlagObjects
	tracked map[netip.Addr]tracked
	// retired holds the counters of addresses already removed from the maps, so that the
	// exported totals never go down.
	retired   [2]bpf.EndpointlagCounters
	evictions [2]float64
	// overLimit are addresses wanted but left out of a full map, each counted once.
	overLimit map[netip.Addr]bool
	// vethGone are terminating pods' addresses whose veth is deleted: the pod's network is gone
	// before the API says the pod is, and traffic to them counts as to a deleted pod.
	vethGone map[netip.Addr]string // address → pod UID
	// served, filtered and nodeAddrs are what the maps of the same names hold.
	served    map[service]bool
	filtered  map[netip.Addr]bool
	nodeAddrs map[netip.Addr]bool
	// lastConns are pods some of whose addresses left the terminating map, until the last one
	// did; reported are the pods whose last connection was reported, until the collector
	// forgets them.
	lastConns map[string]*lastConn
	reported  map[string]bool
	// progIDs are the loaded programs' kernel IDs, by program name: what the checks of the order
	// among TC programs look for.
	progIDs       map[string]ebpf.ProgramID
	attachments   map[int][]*attachment
	reattachments map[string]float64 // by reason
	// netkit (netkit pod devices) and redirected (pod veths bypassed towards the pod) are the
	// interfaces the programs cannot see the pods' traffic on, by index, with their names.
	netkit     map[int]string
	redirected map[int]string
	// monoOffset turns the programs' CLOCK_MONOTONIC nanoseconds into wall time.
	monoOffset time.Duration
	// replayed counts the late connections taken from the rings of recent SYNs; recentOverruns
	// the pods whose window before tracking outlasted a CPU's ring.
	replayed       uint64
	recentOverruns uint64
	// subscribe starts link events (netlink.LinkSubscribeWithOptions; tests replace it).
	subscribe func(chan<- netlink.LinkUpdate, <-chan struct{}, netlink.LinkSubscribeOptions) error
}

// New returns the probe for the current network namespace.
func New(opts Options, pods probes.LocalPods, clk clock.PassiveClock, log *slog.Logger) *Probe {
	return &Probe{opts: opts, pods: pods, clock: clk, log: log.With("probe", Name), nsfd: -1,
		tracked: map[netip.Addr]tracked{}, overLimit: map[netip.Addr]bool{}, vethGone: map[netip.Addr]string{},
		served: map[service]bool{}, filtered: map[netip.Addr]bool{}, nodeAddrs: map[netip.Addr]bool{},
		lastConns: map[string]*lastConn{}, reported: map[string]bool{}, progIDs: map[string]ebpf.ProgramID{},
		attachments: map[int][]*attachment{}, reattachments: map[string]float64{}, netkit: map[int]string{}, redirected: map[int]string{},
		subscribe: netlink.LinkSubscribeWithOptions}
}

// NewInNamespace returns the probe for the network namespace open as fd.
func NewInNamespace(fd int, opts Options, pods probes.LocalPods, clk clock.PassiveClock, log *slog.Logger) *Probe {
	p := New(opts, pods, clk, log)
	p.nsfd = fd
	return p
}

// Name implements probes.Probe.
func (p *Probe) Name() string { return Name }

// servedPerAddr is the room the served map has per tracked address: ports its endpoints list.
const servedPerAddr = 8

// load loads the programs and maps, sized from the options.
func (p *Probe) load() (*bpf.EndpointlagObjects, error) {
	spec, err := bpf.LoadEndpointlag()
	if err != nil {
		return nil, err
	}
	spec.Maps[bpf.EndpointlagMapTerminating].MaxEntries = uint32(p.opts.MaxPods)
	spec.Maps[bpf.EndpointlagMapDeleted].MaxEntries = uint32(p.opts.MaxPods)
	spec.Maps[bpf.EndpointlagMapFiltered].MaxEntries = uint32(2 * p.opts.MaxPods)
	spec.Maps[bpf.EndpointlagMapServed].MaxEntries = uint32(2 * servedPerAddr * p.opts.MaxPods)
	if err := spec.Variables[bpf.EndpointlagVarEventsPerSecond].Set(uint64(p.opts.EventsPerSecond)); err != nil {
		return nil, err
	}
	objs := &bpf.EndpointlagObjects{}
	if err := spec.LoadAndAssign(objs, nil); err != nil {
		var ve *ebpf.VerifierError
		if errors.As(err, &ve) {
			return nil, fmt.Errorf("loading the eBPF programs: %+v", ve)
		}
		return nil, fmt.Errorf("loading the eBPF programs: %w", err)
	}
	return objs, nil
}

// Run implements probes.Probe.
func (p *Probe) Run(ctx context.Context, sink probes.Sink) error {
	sink.SetStatus(Name, probes.Status{})
	var err error
	if p.nsfd < 0 {
		p.nl, err = netlink.NewHandle()
	} else {
		p.nl, err = netlink.NewHandleAt(vnetns.NsHandle(p.nsfd))
	}
	if err != nil {
		return fmt.Errorf("packets: netlink: %w", err)
	}
	defer p.nl.Close()
	if n, err := p.removeLeftovers(); err != nil {
		sink.Error(Name, err)
	} else if n > 0 {
		p.log.Info("removed TC filters a previous instance left", "filters", n)
	}
	// Kernels before 5.11 charge eBPF maps to RLIMIT_MEMLOCK; later ones need nothing here.
	if err := rlimit.RemoveMemlock(); err != nil {
		return fmt.Errorf("packets: %w", err)
	}
	objs, err := p.load()
	if err != nil {
		return fmt.Errorf("packets: %w", err)
	}
	p.mu.Lock()
	p.objs = objs
	p.mu.Unlock()
	defer p.close()
	for name, prog := range map[string]*ebpf.Program{"to_pod": objs.ToPod, "from_pod": objs.FromPod, "uplink_in": objs.UplinkIn, "uplink_out": objs.UplinkOut} {
		info, err := prog.Info()
		if err != nil {
			return fmt.Errorf("packets: program %s: %w", name, err)
		}
		id, ok := info.ID()
		if !ok {
			return fmt.Errorf("packets: program %s: the kernel tells no program ID (Linux 4.13+)", name)
		}
		p.progIDs[name] = id
	}

	events, err := ringbuf.NewReader(objs.Events)
	if err != nil {
		return fmt.Errorf("packets: ring buffer: %w", err)
	}
	var wg sync.WaitGroup
	defer wg.Wait()
	defer events.Close()
	wg.Add(1)
	go func() {
		defer wg.Done()
		p.readEvents(events, sink)
	}()

	subErr := make(chan error, 1)
	links, stopLinks, err := p.subscribeLinks(subErr)
	if err != nil {
		return fmt.Errorf("packets: link events: %w", err)
	}
	defer func() { stopLinks() }()
	notify := make(chan struct{}, 1)
	if p.pods != nil {
		p.pods.NotifyLocalPods(notify)
	}
	wait := poll.Backoff{Interval: p.opts.ReconcileInterval}
	// reconcile syncs and returns the wait before the next reconciliation.
	reconcile := func() time.Duration {
		p.sync(sink)
		return wait.Next(p.idle())
	}
	tick := time.NewTimer(reconcile())
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case u, ok := <-links:
			if ok {
				p.linkChanged(u, sink)
				continue
			}
			// The subscription ended after an error (reported through subErr): subscribe again,
			// listing the links anew; those already attached stay as they are.
			stopLinks()
			for {
				select {
				case <-ctx.Done():
					return nil
				case <-time.After(time.Second):
				}
				if links, stopLinks, err = p.subscribeLinks(subErr); err == nil {
					break
				}
				stopLinks = func() {}
				sink.Error(Name, fmt.Errorf("link events: %w", err))
			}
		case err := <-subErr:
			sink.Error(Name, fmt.Errorf("link events: %w", err))
		case <-notify:
			tick.Reset(reconcile())
		case <-tick.C:
			tick.Reset(reconcile())
		}
	}
}

// idle tells whether the probe tracks no pod's address.
func (p *Probe) idle() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.tracked) == 0
}

// sync reconciles and reports the probe's health: up again after a reconciliation that
// succeeded, whatever failed before it.
func (p *Probe) sync(sink probes.Sink) {
	if err := p.reconcile(sink); err != nil {
		sink.Error(Name, err)
		return
	}
	sink.SetStatus(Name, probes.Status{Up: true, Synced: true})
}

// subscribeLinks starts following link events, the existing links first; errors go to errs.
// stop ends the subscription.
func (p *Probe) subscribeLinks(errs chan<- error) (links chan netlink.LinkUpdate, stop func(), err error) {
	links = make(chan netlink.LinkUpdate, 256)
	done := make(chan struct{})
	opts := netlink.LinkSubscribeOptions{ListExisting: true, ErrorCallback: func(err error) {
		select {
		case errs <- err:
		default:
		}
	}}
	if p.nsfd >= 0 {
		h := vnetns.NsHandle(p.nsfd)
		opts.Namespace = &h
	}
	if err := p.subscribe(links, done, opts); err != nil {
		return nil, nil, err
	}
	var once sync.Once
	return links, func() { once.Do(func() { close(done) }) }, nil
}

// close detaches everything and frees the programs and maps.
func (p *Probe) close() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for idx, as := range p.attachments {
		for _, a := range as {
			if err := p.detach(a); err != nil {
				p.log.Warn("detaching", "err", err)
			}
		}
		delete(p.attachments, idx)
	}
	_ = p.objs.Close()
	p.objs = nil
}

// role tells which programs an interface gets: pod veths (the host side, peer in another
// namespace) and the named uplinks.
func (p *Probe) role(l netlink.Link) string {
	name := l.Attrs().Name
	if slices.Contains(p.opts.Uplinks, name) {
		return "uplink"
	}
	if _, ok := l.(*netlink.Veth); ok && l.Attrs().NetNsID >= 0 {
		return "pod"
	}
	return ""
}

// hook is a program and the direction it attaches to.
type hook struct {
	name    string
	prog    *ebpf.Program
	ingress bool
}

func (p *Probe) linkChanged(u netlink.LinkUpdate, sink probes.Sink) {
	idx := int(u.Index)
	p.mu.Lock()
	defer p.mu.Unlock()
	if u.Header.Type == unix.RTM_DELLINK {
		// The kernel removed the programs with the interface; release the links.
		for _, a := range p.attachments[idx] {
			if a.link != nil {
				_ = a.link.Close()
			}
		}
		delete(p.attachments, idx)
		p.interfaceGone(idx)
		if p.objs != nil {
			p.vethDeleted(idx, sink)
		}
		return
	}
	if p.netkitPod(idx, u.Link) {
		return
	}
	if _, done := p.attachments[idx]; done || p.objs == nil {
		return
	}
	role := p.role(u.Link)
	if role == "" {
		return
	}
	hooks := []hook{{"to_pod", p.objs.ToPod, false}, {"from_pod", p.objs.FromPod, true}}
	if role == "uplink" {
		hooks = []hook{{"uplink_in", p.objs.UplinkIn, true}, {"uplink_out", p.objs.UplinkOut, false}}
	}
	var as []*attachment
	for _, pr := range hooks {
		a, err := p.attach(idx, u.Attrs().Name, pr.name, pr.prog, pr.ingress)
		switch {
		case errors.Is(err, unix.ENODEV): // gone already, with what was attached
			for _, a := range as {
				_ = p.detach(a)
			}
			return
		case err != nil:
			sink.Error(Name, fmt.Errorf("attaching %s to %s: %w", pr.name, u.Attrs().Name, err))
			continue
		}
		a.role = role
		as = append(as, a)
	}
	p.attachments[idx] = as
	p.log.Debug("attached", "interface", u.Attrs().Name, "role", role)
}

// attached lists what is attached where.
func (p *Probe) attached() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	var out []string
	for _, as := range p.attachments {
		for _, a := range as {
			out = append(out, a.String())
		}
	}
	slices.Sort(out)
	return out
}

// readEvents turns the programs' new-connection events into observations until the reader is
// closed.
func (p *Probe) readEvents(r *ringbuf.Reader, sink probes.Sink) {
	var e bpf.EndpointlagEvent
	for {
		rec, err := r.Read()
		if err != nil {
			if !errors.Is(err, ringbuf.ErrClosed) {
				sink.Error(Name, fmt.Errorf("reading events: %w", err))
			}
			return
		}
		if err := binary.Read(bytes.NewReader(rec.RawSample), binary.NativeEndian, &e); err != nil {
			sink.Error(Name, &probes.InputError{Reason: "event", Err: err})
			continue
		}
		sink.Observe(p.observation(e))
	}
}

// eventDeleted is the C program's EVENT_DELETED: a new connection to a deleted pod's address.
const eventDeleted = 2

// observation describes one event: a new connection to a terminating or deleted pod.
func (p *Probe) observation(e bpf.EndpointlagEvent) probes.Observation {
	daddr, saddr := keyAddr(e.Daddr), keyAddr(e.Saddr)
	stage := probes.StageLateConnection
	if e.Kind == eventDeleted {
		stage = probes.StageDeadConnection
	}
	proto := "TCP"
	if e.Proto == unix.IPPROTO_UDP {
		proto = "UDP"
	}
	p.mu.Lock()
	t := p.tracked[daddr]
	at := p.wallTime(e.TimeNs)
	p.mu.Unlock()
	return probes.Observation{
		Stage: stage, Time: at, Source: Name, Pod: t.pod, Local: true,
		Endpoint: probes.Endpoint{Addr: daddr, Port: e.Dport, Protocol: proto},
		Peer:     netip.AddrPortFrom(saddr, e.Sport), FromNode: e.FromNode != 0,
	}
}

// Collector returns the metrics read from the programs' maps at scrape time.
func (p *Probe) Collector() prometheus.Collector { return (*metrics)(p) }
