package ingress

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/spf13/pflag"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
	"k8s.io/utils/clock"

	"github.com/endpointlag/endpointlag/probes"
)

// Name is the probe's registry name.
const Name = "ingress"

// Options configure the probe.
type Options struct {
	// Instances are proxies the pod annotations do not find (outside the cluster, or not
	// annotated), as kind=address.
	Instances []string
	// Slow is the heartbeat: how often an instance is read while nothing it routes to is
	// terminating. Fast is how often while something is; after, the interval doubles back to Slow.
	Slow, Fast time.Duration
	// Timeout bounds one read.
	Timeout time.Duration
	// AdminPorts override, per kind, the admin port of an annotated pod whose annotation names
	// none (the Kind's DefaultPort otherwise).
	AdminPorts map[string]int
	// EnterPods lets the probe reach admin interfaces that listen only inside a proxy pod (on its
	// loopback, or a unix socket): it needs hostPID, CAP_SYS_ADMIN and CAP_SYS_PTRACE.
	EnterPods bool
	// ProcRoot is where the processes are listed ("/proc"), for EnterPods.
	ProcRoot string
}

// DefaultOptions are the flags' defaults.
func DefaultOptions() Options {
	return Options{Slow: 10 * time.Second, Fast: 20 * time.Millisecond, Timeout: 2 * time.Second, ProcRoot: "/proc"}
}

// Validate names the first setting out of range.
func (o Options) Validate() error {
	switch {
	case o.Fast <= 0 || o.Slow < o.Fast:
		return fmt.Errorf("--ingress.poll-fast (%s) must be positive and at most --ingress.poll-slow (%s)", o.Fast, o.Slow)
	case o.Timeout <= 0:
		return fmt.Errorf("--ingress.timeout must be positive, got %s", o.Timeout)
	}
	for kind, port := range o.AdminPorts {
		if _, err := Lookup(kind); err != nil {
			return fmt.Errorf("--ingress.admin-ports: %w", err)
		}
		if port <= 0 || port > 65535 {
			return fmt.Errorf("--ingress.admin-ports: %s=%d is not a port", kind, port)
		}
	}
	for _, s := range o.Instances {
		if _, _, err := parseInstance(s); err != nil {
			return fmt.Errorf("--ingress.instances: %w", err)
		}
	}
	return nil
}

var flagOpts = DefaultOptions()

func init() {
	probes.Register(probes.Factory{
		Name:           Name,
		Help:           "ingress and gateway proxies (Traefik, Envoy, HAProxy, ingress-nginx): the pods of this node annotated " + AnnotationProxy + ", and --ingress.instances; read with GET-only requests, slowly while nothing they route to terminates, fast while something does",
		DefaultEnabled: true,
		Stages:         []probes.Stage{probes.StageIngress},
		Flags: func(fs *pflag.FlagSet) {
			flagOpts = DefaultOptions()
			fs.StringSliceVar(&flagOpts.Instances, "ingress.instances", flagOpts.Instances,
				"proxies to read besides the annotated pods of this node, as kind=address (comma-separated): traefik=http://10.0.0.5:9000, haproxy=tcp://10.0.0.6:9999, haproxy=unix:///run/haproxy/api.sock")
			fs.DurationVar(&flagOpts.Slow, "ingress.poll-slow", flagOpts.Slow,
				"how often a proxy instance is read while nothing it routes to is terminating (a heartbeat)")
			fs.DurationVar(&flagOpts.Fast, "ingress.poll-fast", flagOpts.Fast,
				"how often a proxy instance is read while an endpoint it routes to is terminating and not yet removed there (the precision of its ingress stage); after, the interval doubles back to --ingress.poll-slow")
			fs.DurationVar(&flagOpts.Timeout, "ingress.timeout", flagOpts.Timeout, "how long one read of a proxy instance may take")
			fs.StringToIntVar(&flagOpts.AdminPorts, "ingress.admin-ports", flagOpts.AdminPorts,
				"admin port per proxy kind for annotated pods whose "+AnnotationAdmin+" annotation names none, as kind=port (comma-separated); defaults: "+defaultPorts())
			fs.BoolVar(&flagOpts.EnterPods, "ingress.enter-pods", flagOpts.EnterPods,
				"reach admin interfaces that listen only inside a proxy pod (a loopback address or a unix:// socket in "+AnnotationAdmin+") by entering the pod's network namespace or filesystem; needs hostPID, CAP_SYS_ADMIN and CAP_SYS_PTRACE")
		},
		Validate: func() error { return flagOpts.Validate() },
		New: func(env probes.Env) (probes.Probe, error) {
			p := New(flagOpts, env.Client, env.NodeName, env.Pending, env.Clock, env.Logger)
			if env.Registerer != nil {
				if err := env.Registerer.Register(p.Collector()); err != nil {
					return nil, err
				}
			}
			return p, nil
		},
	})
}

// defaultPorts lists each kind's default admin port, for --help.
func defaultPorts() string {
	var out []string
	for _, n := range Kinds() {
		k, _ := Lookup(n)
		out = append(out, fmt.Sprintf("%s=%d", n, k.DefaultPort))
	}
	if len(out) == 0 {
		return "none"
	}
	return strings.Join(out, ", ")
}

// parseInstance reads kind=address.
func parseInstance(s string) (Kind, string, error) {
	kind, addr, ok := strings.Cut(s, "=")
	if !ok || addr == "" {
		return Kind{}, "", fmt.Errorf("%q is not kind=address", s)
	}
	k, err := Lookup(kind)
	if err != nil {
		return Kind{}, "", fmt.Errorf("%q: %w", s, err)
	}
	return k, addr, nil
}

// Probe reads the proxy instances of this node.
type Probe struct {
	opts    Options
	client  kubernetes.Interface
	node    string
	pending probes.Pending
	clock   clock.PassiveClock
	log     *slog.Logger

	mu        sync.Mutex
	instances map[string]*instance
	// owed is, per instance, the endpoints it still owes a removal for (from the collector).
	owed map[string][]probes.Endpoint
	// notify tells followPending that what is owed may have changed.
	notify chan struct{}
	// synced: the annotated pods were listed (or there is no API) and every instance was read
	// once (or failed to be).
	synced bool
	// reads counts the reads made, by kind and query, for the metrics.
	reads map[readKey]uint64
}

// New returns the probe; client may be nil (then only opts.Instances are read).
func New(opts Options, client kubernetes.Interface, node string, pending probes.Pending, clk clock.PassiveClock, log *slog.Logger) *Probe {
	return &Probe{opts: opts, client: client, node: node, pending: pending, clock: clk, log: log.With("probe", Name),
		instances: map[string]*instance{}, owed: map[string][]probes.Endpoint{}, reads: map[readKey]uint64{}, notify: make(chan struct{}, 1)}
}

// Name implements probes.Probe.
func (p *Probe) Name() string { return Name }

// Run implements probes.Probe.
func (p *Probe) Run(ctx context.Context, sink probes.Sink) error {
	sink.SetStatus(Name, probes.Status{})
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel()
	defer p.stopAll()

	if p.pending != nil {
		p.pending.NotifyPending(p.notify)
	}
	wg.Go(func() { p.followPending(ctx, p.notify) })

	for _, s := range p.opts.Instances {
		k, addr, err := parseInstance(s)
		if err != nil {
			return err
		}
		p.start(ctx, sink, &wg, k.Name+"="+addr, k, Target{Address: addr})
	}
	if p.client != nil {
		synced, err := p.watchPods(ctx, sink, &wg)
		if err != nil {
			return err
		}
		if !cache.WaitForCacheSync(ctx.Done(), synced) {
			return nil
		}
	}
	// Ready once every instance known now was read once (or failed to be).
	for {
		if p.firstReadsDone() {
			break
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(10 * time.Millisecond):
		}
	}
	p.mu.Lock()
	p.synced = true
	n := len(p.instances)
	p.mu.Unlock()
	p.report(sink)
	p.log.Info("synced", "instances", n)
	<-ctx.Done()
	return nil
}

// report tells the sink the probe's status, once synced: up while no instance's last read failed,
// active while it reads any. It also makes the collector ask Reaches again about the records it
// could not answer for before (an instance settled), so it is called without p.mu held.
func (p *Probe) report(sink probes.Sink) {
	p.mu.Lock()
	synced := p.synced
	up := true
	for _, in := range p.instances {
		up = up && !in.isDown()
	}
	n := len(p.instances)
	p.mu.Unlock()
	if synced {
		sink.SetStatus(Name, probes.Status{Up: up, Synced: true, Inactive: n == 0})
	}
}

func (p *Probe) firstReadsDone() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, in := range p.instances {
		if !in.tried() {
			return false
		}
	}
	return true
}

// followPending keeps owed up to date and wakes the instances that owe something.
func (p *Probe) followPending(ctx context.Context, notify <-chan struct{}) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-notify:
		}
		p.mu.Lock()
		idle := len(p.instances) == 0
		p.mu.Unlock()
		if idle || p.pending == nil {
			// Nothing to wake: spare the collector a pass over every record at each change.
			// An instance that starts asks again (start).
			continue
		}
		owed := p.pending.Pending(probes.StageIngress)
		p.mu.Lock()
		p.owed = owed
		for name, in := range p.instances {
			if len(owed[name]) > 0 {
				in.wakeUp()
			}
		}
		p.mu.Unlock()
	}
}

func (p *Probe) owedBy(name string) []probes.Endpoint {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.owed[name]
}

// start begins reading one instance, unless it is read already.
func (p *Probe) start(ctx context.Context, sink probes.Sink, wg *sync.WaitGroup, name string, k Kind, t Target) {
	p.mu.Lock()
	if _, ok := p.instances[name]; ok {
		p.mu.Unlock()
		return
	}
	t.Timeout = p.opts.Timeout
	reader, err := k.New(t)
	if err != nil {
		p.mu.Unlock()
		sink.Error(Name, fmt.Errorf("%s: %w", name, err))
		return
	}
	ictx, cancel := context.WithCancel(ctx)
	in := newInstance(name, k, t.Address, reader, cancel, p.clock.Now())
	p.instances[name] = in
	p.log.Info("reading a proxy instance", "instance", name, "kind", k.Name, "address", t.Address, "inside_pod", t.Dial != nil)
	wg.Go(func() { p.poll(ictx, sink, in) })
	p.mu.Unlock()
	p.askPending()
	p.report(sink)
}

// askPending has followPending read what is owed now.
func (p *Probe) askPending() {
	select {
	case p.notify <- struct{}{}:
	default: // a notification is already waiting
	}
}

// stop ends the reading of one instance (its pod went).
func (p *Probe) stop(sink probes.Sink, name string) {
	p.mu.Lock()
	in, ok := p.instances[name]
	if !ok {
		p.mu.Unlock()
		return
	}
	in.cancel()
	delete(p.instances, name)
	p.log.Info("proxy instance gone", "instance", name)
	p.mu.Unlock()
	p.report(sink)
}

func (p *Probe) stopAll() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, in := range p.instances {
		in.cancel()
	}
}

// watchPods follows this node's pods and reads those annotated as proxies.
func (p *Probe) watchPods(ctx context.Context, sink probes.Sink, wg *sync.WaitGroup) (cache.InformerSynced, error) {
	f := informers.NewSharedInformerFactoryWithOptions(p.client, 0, informers.WithTweakListOptions(func(o *metav1.ListOptions) {
		o.FieldSelector = fields.OneTermEqualSelector("spec.nodeName", p.node).String()
	}))
	inf := f.Core().V1().Pods().Informer()
	seen := func(obj any) {
		pod, ok := obj.(*corev1.Pod)
		if !ok {
			return
		}
		name := instanceName(pod)
		kindName, annotated := pod.Annotations[AnnotationProxy]
		if !annotated || pod.DeletionTimestamp != nil || pod.Status.Phase != corev1.PodRunning || pod.Status.PodIP == "" {
			p.stop(sink, name)
			return
		}
		k, err := Lookup(kindName)
		if err != nil {
			sink.Error(Name, &probes.InputError{Reason: "proxy_annotation", Err: fmt.Errorf("pod %s/%s: %s: %w", pod.Namespace, pod.Name, AnnotationProxy, err)})
			return
		}
		t, err := p.target(k, pod.Status.PodIP, pod.Annotations[AnnotationAdmin])
		if err != nil {
			sink.Error(Name, &probes.InputError{Reason: "proxy_annotation", Err: fmt.Errorf("pod %s/%s: %s: %w", pod.Namespace, pod.Name, AnnotationAdmin, err)})
			return
		}
		p.start(ctx, sink, wg, name, k, t)
	}
	gone := func(obj any) {
		if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
			obj = t.Obj
		}
		if pod, ok := obj.(*corev1.Pod); ok {
			p.stop(sink, instanceName(pod))
		}
	}
	reg, err := inf.AddEventHandler(cache.ResourceEventHandlerFuncs{AddFunc: seen, UpdateFunc: func(_, o any) { seen(o) }, DeleteFunc: gone})
	if err != nil {
		return nil, fmt.Errorf("ingress: %w", err)
	}
	f.Start(ctx.Done())
	wg.Go(func() {
		<-ctx.Done()
		f.Shutdown()
	})
	return reg.HasSynced, nil
}

func instanceName(pod *corev1.Pod) string {
	return pod.Annotations[AnnotationProxy] + ":" + pod.Namespace + "/" + pod.Name
}

// target is how to reach an annotated pod's admin interface: its IP and the annotation's port (or
// the kind's default), or the annotation's full address; one inside the pod (loopback, a unix
// socket) is dialed from within the pod when --ingress.enter-pods allows.
func (p *Probe) target(k Kind, podIP, annotation string) (Target, error) {
	ip, err := netip.ParseAddr(podIP)
	if err != nil {
		return Target{}, fmt.Errorf("pod IP %q: %w", podIP, err)
	}
	if !strings.Contains(annotation, "://") {
		port := k.DefaultPort
		if n, ok := p.opts.AdminPorts[k.Name]; ok {
			port = n
		}
		addr, err := adminAddress(k.Scheme, ip, port, annotation)
		return Target{Address: addr}, err
	}
	if !insidePod(annotation) {
		return Target{Address: annotation}, nil
	}
	if !p.opts.EnterPods {
		return Target{}, fmt.Errorf("%q listens inside the pod; reading it takes --ingress.enter-pods (hostPID, CAP_SYS_ADMIN, CAP_SYS_PTRACE), or serve the admin on the pod IP", annotation)
	}
	return Target{Address: annotation, Dial: newPodDialer(p.opts.ProcRoot, ip).DialContext}, nil
}

// adminAddress is scheme://podIP:port, the port from the annotation when it names one.
func adminAddress(scheme string, ip netip.Addr, port int, annotation string) (string, error) {
	if annotation != "" {
		n, err := strconv.Atoi(annotation)
		if err != nil || n <= 0 || n > 65535 {
			return "", fmt.Errorf("%q is neither a port nor an address like http://host:port", annotation)
		}
		port = n
	}
	return scheme + "://" + net.JoinHostPort(ip.String(), strconv.Itoa(port)), nil
}

// Reaches implements probes.Dataplane: the instances that route new requests to ep (for svc, or
// through a backend that names no Service) now. It is not ok while an instance is settling: not
// read successfully yet, for at most firstReadGrace (a proxy starting up); the probe reports its
// status when one settles, and the collector asks again.
func (p *Probe) Reaches(svc probes.ServiceRef, ep probes.Endpoint) ([]probes.Reach, bool) {
	p.mu.Lock()
	if !p.synced {
		p.mu.Unlock()
		return nil, false
	}
	ins := make([]*instance, 0, len(p.instances))
	for _, in := range p.instances {
		ins = append(ins, in)
	}
	p.mu.Unlock()
	now := p.clock.Now()
	var out []probes.Reach
	sure := true
	for _, in := range ins {
		switch in.reaches(svc, ep, now) {
		case reached:
			out = append(out, probes.Reach{Source: in.name})
		case unsure:
			sure = false
		}
	}
	if !sure {
		return nil, false
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Source < out[j].Source })
	return out, true
}

type reachAnswer int

const (
	notReached reachAnswer = iota
	reached
	unsure
)

// reaches tells whether the instance routes new requests for svc to ep, by its last read. It is
// unsure while the instance has not answered yet, and when its last read does not route to ep:
// when it routes svc, ep may be a new endpoint added since those backends were read, which are
// then read (targeted); when it does not route svc at all, the proxy may have begun to since its
// last full read (an Ingress created meanwhile), and a full read follows, at most one per
// fullCheckEvery for all such questions. It is sure once what it asked for was read after the
// question. An instance whose last read failed is answered for by that read.
func (in *instance) reaches(svc probes.ServiceRef, ep probes.Endpoint, now time.Time) reachAnswer {
	in.mu.Lock()
	defer in.mu.Unlock()
	if !in.settled {
		return unsure
	}
	if in.routing[routed{service: svc, endpoint: ep}] > 0 || in.routing[routed{endpoint: ep}] > 0 {
		return reached
	}
	if in.down {
		// Its admin does not answer: what it routes to is its last read, for as long as that
		// lasts; waiting for a read could hold the records forever.
		return notReached
	}
	var names []string
	for name, b := range in.backends {
		if b.Service == svc && svc.Name != "" {
			names = append(names, name)
		}
	}
	key := routed{service: svc, endpoint: ep}
	asked, ok := in.checks[key]
	if !ok {
		in.checks[key] = now
		asked = now
	}
	fresh := len(names) > 0 || !in.lastFull.Before(asked)
	for _, n := range names {
		fresh = fresh && !in.readStart[n].Before(asked)
	}
	if fresh {
		delete(in.checks, key)
		return notReached
	}
	if len(names) == 0 {
		in.fullCheck = true
	}
	for _, n := range names {
		in.checkNames[n] = true
	}
	select {
	case in.wake <- struct{}{}:
	default:
	}
	return unsure
}

// fullCheckEvery is the least time between two full reads made for questions about Services an
// instance's last full read did not show: one read answers every question asked before it began,
// so a burst of terminations of Services the proxy does not route costs one read.
const fullCheckEvery = time.Second

// fullCheckDue says whether a full read was asked for by reaches, and how long until one may be
// made; at 0 it takes the request.
func (in *instance) fullCheckDue(now time.Time) (asked bool, wait time.Duration) {
	in.mu.Lock()
	defer in.mu.Unlock()
	if !in.fullCheck {
		return false, 0
	}
	wait = max(fullCheckEvery-now.Sub(in.lastFull), 0)
	if wait == 0 {
		in.fullCheck = false
	}
	return true, wait
}

// takeChecks returns, sorted, the backends Reaches asked to have read, and forgets them.
func (in *instance) takeChecks() []string {
	in.mu.Lock()
	defer in.mu.Unlock()
	if len(in.checkNames) == 0 {
		return nil
	}
	out := make([]string, 0, len(in.checkNames))
	for n := range in.checkNames {
		out = append(out, n)
	}
	clear(in.checkNames)
	sort.Strings(out)
	return out
}

// poll reads one instance until ctx ends: fast while it owes a removal (only the backends that
// hold what it owes, when its kind can), then backing off to the slow heartbeat, the interval
// doubling at each read. While it backs off it reads the backends that held what it owed (a
// rolling update adds and removes more endpoints there), and the heartbeat reads everything.
func (p *Probe) poll(ctx context.Context, sink probes.Sink, in *instance) {
	fast := max(p.opts.Fast, in.kind.MinInterval)
	next := p.opts.Slow
	failures := 0
	var recent []string
	for first := true; ; first = false {
		owed := p.owedBy(in.name)
		woken := false
		if !first {
			d := next
			if len(owed) > 0 {
				d = fast
			}
			if asked, wait := in.fullCheckDue(p.clock.Now()); asked && failures == 0 {
				d = min(d, max(wait, fast))
			}
			t := time.NewTimer(max(d, in.kind.MinInterval))
			select {
			case <-ctx.Done():
				t.Stop()
				return
			case <-t.C:
			case <-in.wake:
				t.Stop()
				woken = true
				// Woken to poll fast: the next read may wait no longer than a fast interval.
				if !waitFor(ctx, in.sinceLastRead(p.clock), fast) {
					return
				}
			}
			owed = p.owedBy(in.name)
		}
		// The backends Reaches asked about are read too (all are, on a full read); a full read it
		// asked for is made once fullCheckEvery allows.
		checks := in.takeChecks()
		fullAsked, wait := in.fullCheckDue(p.clock.Now())
		fullCheck := fullAsked && wait == 0
		// The backends that list what is owed (none when nothing is).
		holding := in.backendsOf(owed)
		var names []string
		switch {
		case fullCheck:
			recent = mergeNames(recent, holding)
		case len(holding) > 0:
			recent = mergeNames(recent, holding)
			names = mergeNames(holding, checks)
		case len(owed) > 0 && len(checks) == 0:
			// Owed, but no backend lists them any more: their removals were seen and the
			// collector has not taken them yet. Nothing to read.
			continue
		case next < p.opts.Slow:
			names = mergeNames(slices.Clone(recent), checks)
		case woken && len(checks) > 0:
			names = checks
		case woken:
			// Woken for a full read that may not be made yet (the timer waits for it), or for
			// an owed removal the collector has taken meanwhile: nothing to read now. The
			// heartbeat's full read comes from the timer.
			continue
		default:
			recent = nil
		}
		ok := p.read(ctx, sink, in, names)
		if ok && (len(checks) > 0 || fullCheck) {
			p.report(sink) // the collector asks Reaches again
		}
		switch {
		case !ok:
			// A proxy starting up, or one down: try again soon, then less and less often. What
			// Reaches asked to have read waits for the next read.
			in.recheck(checks, fullCheck)
			failures++
			next = min(retryInterval<<min(failures-1, 16), p.opts.Slow)
		case len(owed) > 0:
			failures, next = 0, fast
		default:
			failures, next = 0, min(2*next, p.opts.Slow)
		}
		if in.settleAfter(p.clock.Now(), firstReadGrace) {
			p.log.Warn("a proxy instance gave no answer in its first "+firstReadGrace.String()+"; what it routes to counts as nothing until it does", "instance", in.name)
			p.report(sink)
		}
	}
}

// mergeNames adds the names of b missing from a, keeping a sorted.
func mergeNames(a, b []string) []string {
	for _, n := range b {
		if i, found := slices.BinarySearch(a, n); !found {
			a = slices.Insert(a, i, n)
		}
	}
	return a
}

// waitFor sleeps until since reaches d, or returns false when ctx ends first.
func waitFor(ctx context.Context, since, d time.Duration) bool {
	if since >= d {
		return true
	}
	t := time.NewTimer(d - since)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

// read reads an instance — the named backends, when its kind can, else all — and reports the
// endpoints it no longer routes new requests to, at the moment its answer came (the proxy's state
// is from some moment of the read: by then, it was so).
func (p *Probe) read(ctx context.Context, sink probes.Sink, in *instance, names []string) bool {
	start := p.clock.Now()
	var (
		backends []Backend
		full     = true
		err      error
	)
	if len(names) > 0 {
		var ok bool
		backends, ok, err = in.reader.ReadBackends(ctx, names)
		full = !ok
		if ok {
			p.counted(in.kind.Name, "targeted")
		}
	}
	if full && err == nil {
		backends, err = in.reader.Read(ctx)
		p.counted(in.kind.Name, "full")
	}
	if ctx.Err() != nil {
		return false
	}
	if err != nil {
		in.failed(err)
		sink.Error(Name, fmt.Errorf("%s: %w", in.name, err))
		return false
	}
	at := p.clock.Now()
	removed, first := in.apply(start, at, backends, full)
	if !first {
		for _, r := range removed {
			sink.Observe(probes.Observation{Stage: probes.StageIngress, Time: at, Precision: r.precision, Source: in.name, SourceKind: in.kind.Name,
				Service: r.service, Endpoint: r.endpoint})
		}
	}
	if recovered, settled := in.succeeded(); recovered || settled {
		p.report(sink)
	}
	return true
}

// firstReadGrace is how long an instance may take to answer its first read (a proxy starting up)
// while the records that start meanwhile wait to learn whether it routes to them.
const firstReadGrace = 30 * time.Second

// retryInterval is the first wait after a failed read; it doubles with each failure after, up to
// the heartbeat.
const retryInterval = 100 * time.Millisecond

func (p *Probe) counted(kind, query string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.reads[readKey{kind, query}]++
}

// instance is one proxy being read, and what it routed to at the last read.
type instance struct {
	name   string
	kind   Kind
	addr   string
	reader Reader
	cancel context.CancelFunc
	wake   chan struct{}

	mu sync.Mutex
	// backends are the backends by name as last read, and readStart when each was last asked
	// for; routing counts, for each endpoint new requests can go to (per Service, the zero
	// Service for backends that name none), the backends that route to it.
	backends  map[string]Backend
	readStart map[string]time.Time
	routing   map[routed]int
	// last is when the last read was answered.
	last time.Time
	// tried: read (or failed to be) at least once; down: the last read failed, with lastErr.
	triedOnce bool
	down      bool
	lastErr   string
	// started is when reading it began; settled: read successfully once, or given up on after
	// firstReadGrace.
	started time.Time
	settled bool
	// checks are the endpoints Reaches could not answer for (see reaches), with when it was first
	// asked; checkNames the backends to read for them, fullCheck whether a full read is wanted.
	// lastFull is when the last full read that was answered began.
	checks     map[routed]time.Time
	checkNames map[string]bool
	fullCheck  bool
	lastFull   time.Time
}

// recheck asks again for the backends (or the full read) of a read that failed.
func (in *instance) recheck(names []string, full bool) {
	in.mu.Lock()
	defer in.mu.Unlock()
	in.fullCheck = in.fullCheck || full
	for _, n := range names {
		in.checkNames[n] = true
	}
}

type routed struct {
	service  probes.ServiceRef
	endpoint probes.Endpoint
}

func newInstance(name string, k Kind, addr string, r Reader, cancel context.CancelFunc, started time.Time) *instance {
	return &instance{name: name, kind: k, addr: addr, reader: r, cancel: cancel, wake: make(chan struct{}, 1), started: started,
		checks: map[routed]time.Time{}, checkNames: map[string]bool{},
		backends: map[string]Backend{}, readStart: map[string]time.Time{}, routing: map[routed]int{}}
}

func (in *instance) wakeUp() {
	select {
	case in.wake <- struct{}{}:
	default:
	}
}

func (in *instance) tried() bool {
	in.mu.Lock()
	defer in.mu.Unlock()
	return in.triedOnce
}

func (in *instance) sinceLastRead(clk clock.PassiveClock) time.Duration {
	in.mu.Lock()
	defer in.mu.Unlock()
	if in.last.IsZero() {
		return time.Hour
	}
	return clk.Since(in.last)
}

func (in *instance) failed(err error) {
	in.mu.Lock()
	defer in.mu.Unlock()
	in.triedOnce, in.down, in.lastErr = true, true, err.Error()
}

// succeeded takes a successful read: it says whether it followed a failure, and whether it
// settled the instance.
func (in *instance) succeeded() (recovered, settled bool) {
	in.mu.Lock()
	defer in.mu.Unlock()
	recovered, settled = in.down, !in.settled
	in.down, in.lastErr, in.settled = false, "", true
	return recovered, settled
}

// settleAfter gives up waiting for the first answer once grace has passed since reading began;
// it reports whether that happened now.
func (in *instance) settleAfter(now time.Time, grace time.Duration) bool {
	in.mu.Lock()
	defer in.mu.Unlock()
	if in.settled || now.Sub(in.started) < grace {
		return false
	}
	in.settled = true
	return true
}

func (in *instance) isDown() bool {
	in.mu.Lock()
	defer in.mu.Unlock()
	return in.down
}

// backendsOf names the backends that held any of eps at the last read.
func (in *instance) backendsOf(eps []probes.Endpoint) []string {
	if len(eps) == 0 {
		return nil
	}
	want := map[probes.Endpoint]bool{}
	for _, ep := range eps {
		want[ep] = true
	}
	in.mu.Lock()
	defer in.mu.Unlock()
	var out []string
	for name, b := range in.backends {
		for _, s := range b.Servers {
			if want[s.Endpoint] {
				out = append(out, name)
				break
			}
		}
	}
	sort.Strings(out)
	return out
}

// removal is an endpoint a read found no longer routable, and how long before the read's answer
// it may have happened (since the previous read of its backends was sent).
type removal struct {
	routed
	precision time.Duration
}

// apply takes a read that was sent at start and answered at at: all backends (full), or only
// some. It returns what no longer gets new requests, and whether this was the first read. Its
// work is in proportion to the backends read, not to all the instance has.
func (in *instance) apply(start, at time.Time, backends []Backend, full bool) (removed []removal, first bool) {
	in.mu.Lock()
	defer in.mu.Unlock()
	first = in.last.IsZero()
	in.triedOnce, in.last = true, at
	if full {
		in.lastFull = start
	}
	// dropped: what a backend read now no longer routes, with the oldest previous read of such a
	// backend (the removal happened after it).
	dropped := map[routed]time.Time{}
	update := func(name string, nb *Backend) {
		was, since := routables(in.backends[name]), in.readStart[name]
		var now map[routed]bool
		if nb != nil {
			now = routables(*nb)
			in.backends[name], in.readStart[name] = *nb, start
		} else {
			delete(in.backends, name)
			delete(in.readStart, name)
		}
		for r := range was {
			if now[r] {
				continue
			}
			if in.routing[r]--; in.routing[r] <= 0 {
				delete(in.routing, r)
			}
			if t, ok := dropped[r]; !ok || since.Before(t) {
				dropped[r] = since
			}
		}
		for r := range now {
			if !was[r] {
				in.routing[r]++
			}
		}
	}
	read := make(map[string]bool, len(backends))
	for i := range backends {
		read[backends[i].Name] = true
		update(backends[i].Name, &backends[i])
	}
	if full {
		for name := range in.backends {
			if !read[name] {
				update(name, nil)
			}
		}
	}
	for r, since := range dropped {
		if in.routing[r] == 0 {
			removed = append(removed, removal{routed: r, precision: at.Sub(since)})
		}
	}
	return removed, first
}

// routables are the endpoints a backend sends new requests to.
func routables(b Backend) map[routed]bool {
	out := make(map[routed]bool, len(b.Servers))
	for _, s := range b.Servers {
		if s.Routable {
			out[routed{service: b.Service, endpoint: s.Endpoint}] = true
		}
	}
	return out
}

// ErrNoInstances is returned by Snapshot when nothing is read.
var ErrNoInstances = errors.New("no proxy instance is read on this node")

// InstanceView is what one instance routes to, for /api/v1/ingress and inspect.
type InstanceView struct {
	Name     string    `json:"name"`
	Kind     string    `json:"kind"`
	Address  string    `json:"address"`
	LastRead time.Time `json:"last_read"`
	Up       bool      `json:"up"`
	// Error is why the last read failed (Up false).
	Error    string    `json:"error,omitempty"`
	Backends []Backend `json:"backends"`
}

// Snapshot lists each instance and the backends it routed to at its last read.
func (p *Probe) Snapshot() ([]InstanceView, error) {
	p.mu.Lock()
	ins := make([]*instance, 0, len(p.instances))
	for _, in := range p.instances {
		ins = append(ins, in)
	}
	p.mu.Unlock()
	if len(ins) == 0 {
		return nil, ErrNoInstances
	}
	out := make([]InstanceView, 0, len(ins))
	for _, in := range ins {
		in.mu.Lock()
		v := InstanceView{Name: in.name, Kind: in.kind.Name, Address: in.addr, LastRead: in.last, Up: !in.last.IsZero() && !in.down, Error: in.lastErr}
		for _, b := range in.backends {
			v.Backends = append(v.Backends, b)
		}
		in.mu.Unlock()
		sort.Slice(v.Backends, func(i, j int) bool { return v.Backends[i].Name < v.Backends[j].Name })
		out = append(out, v)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}
