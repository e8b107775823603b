// Package kube observes the Kubernetes API: EndpointSlices cluster-wide (as kube-proxy does) and
// the pods of this node only. It reports the deleted, endpointslice, endpointslice_removed and gone
// stages.
package kube

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
	"k8s.io/utils/clock"

	"github.com/spf13/pflag"

	"github.com/endpointlag/endpointlag/probes"
)

// Name is the probe's registry name and the source of its observations.
const Name = "kube"

func init() {
	probes.Register(probes.Factory{
		Name:           Name,
		Help:           "EndpointSlices (cluster-wide) and this node's pods from the Kubernetes API",
		DefaultEnabled: true,
		Stages:         []probes.Stage{probes.StageEndpointSliceRemoved},
		NeedsAPI:       true,
		Flags: func(fs *pflag.FlagSet) {
			flagOpts = DefaultOptions()
			fs.StringVar(&flagOpts.SliceSelector, "kube.endpointslice-selector", flagOpts.SliceSelector,
				"label selector of the EndpointSlices watched; the default is kube-proxy's (no headless Services, no Services of another proxy). Empty watches every slice, e.g. to measure headless Services behind ingress proxies, at the cost of their slices' memory and traffic")
			fs.StringSliceVar(&flagOpts.TrustedManagers, "kube.trusted-managers", flagOpts.TrustedManagers,
				"endpointslice.kubernetes.io/managed-by values of the EndpointSlices whose endpoints are trusted (comma-separated); terminations in other slices, which anyone allowed to write EndpointSlices in a namespace can make up, are held within --record.max-untrusted")
		},
		Validate: func() error { return flagOpts.Validate() },
		New: func(env probes.Env) (probes.Probe, error) {
			return New(flagOpts, env.Client, env.NodeName, env.Clock, env.Logger)
		},
	})
}

// flagOpts are the options the flags set.
var flagOpts = DefaultOptions()

// Probe watches EndpointSlices and this node's pods.
type Probe struct {
	opts   Options
	slices *sliceTransform
	client kubernetes.Interface
	node   string
	clock  clock.PassiveClock
	log    *slog.Logger
	// sliceEvents counts the slice events handled (tests wait on it).
	sliceEvents atomic.Int64
}

// New returns the probe for node.
func New(opts Options, client kubernetes.Interface, node string, clk clock.PassiveClock, log *slog.Logger) (*Probe, error) {
	if client == nil {
		return nil, errors.New("the kube probe needs a Kubernetes client")
	}
	if node == "" {
		return nil, errors.New("the kube probe needs the node name (--node-name or NODE_NAME)")
	}
	if err := opts.Validate(); err != nil {
		return nil, err
	}
	tr, err := newSliceTransform(opts, clk)
	if err != nil {
		return nil, err
	}
	return &Probe{opts: opts, slices: tr, client: client, node: node, clock: clk, log: log.With("probe", Name)}, nil
}

// Name implements probes.Probe.
func (p *Probe) Name() string { return Name }

// Run implements probes.Probe. Informers retry with backoff while the API server is unreachable;
// every failed list or watch is reported to the sink, and the probe counts as up again at the
// next event it receives. What an informer first sees on a relist after its watch broke is
// flagged as such (Observation.Relist), with the gap as precision.
func (p *Probe) Run(ctx context.Context, sink probes.Sink) error {
	sink.SetStatus(Name, probes.Status{})
	sliceRelists, podRelists := newRelists(p.clock), newRelists(p.clock)
	slices := &sliceHandler{probe: p, sink: sink, tracker: newSliceTracker(p.node), reported: map[string]string{}, relists: sliceRelists,
		deferred: make(chan struct{}, 1)}
	pods := &podHandler{probe: p, sink: sink, deleted: map[string]bool{}, live: map[string][]netip.Addr{}, relists: podRelists}

	sliceLW := &cache.ListWatch{
		ListWithContextFunc: func(ctx context.Context, o metav1.ListOptions) (runtime.Object, error) {
			o.LabelSelector = p.opts.SliceSelector
			return p.client.DiscoveryV1().EndpointSlices(metav1.NamespaceAll).List(ctx, o)
		},
		WatchFuncWithContext: func(ctx context.Context, o metav1.ListOptions) (watch.Interface, error) {
			o.LabelSelector = p.opts.SliceSelector
			return p.client.DiscoveryV1().EndpointSlices(metav1.NamespaceAll).Watch(ctx, o)
		},
	}
	onNode := fields.OneTermEqualSelector("spec.nodeName", p.node).String()
	podLW := &cache.ListWatch{
		ListWithContextFunc: func(ctx context.Context, o metav1.ListOptions) (runtime.Object, error) {
			o.FieldSelector = onNode
			return p.client.CoreV1().Pods(metav1.NamespaceAll).List(ctx, o)
		},
		WatchFuncWithContext: func(ctx context.Context, o metav1.ListOptions) (watch.Interface, error) {
			o.FieldSelector = onNode
			return p.client.CoreV1().Pods(metav1.NamespaceAll).Watch(ctx, o)
		},
	}
	sliceInf := cache.NewSharedIndexInformer(sliceRelists.wrap(sliceLW, p.client), &discoveryv1.EndpointSlice{}, 0, cache.Indexers{})
	podInf := cache.NewSharedIndexInformer(podRelists.wrap(podLW, p.client), &corev1.Pod{}, 0, cache.Indexers{})

	var synced []cache.InformerSynced
	for _, h := range []struct {
		inf       cache.SharedIndexInformer
		transform cache.TransformFunc
		handler   cache.ResourceEventHandler
	}{
		{sliceInf, p.slices.transform, cache.ResourceEventHandlerDetailedFuncs{AddFunc: slices.add, UpdateFunc: slices.update, DeleteFunc: slices.delete}},
		{podInf, podTransform(p.clock), cache.ResourceEventHandlerDetailedFuncs{AddFunc: pods.add, UpdateFunc: pods.update, DeleteFunc: pods.delete}},
	} {
		if err := h.inf.SetTransform(h.transform); err != nil {
			return fmt.Errorf("kube probe: %w", err)
		}
		if err := h.inf.SetWatchErrorHandlerWithContext(func(_ context.Context, r *cache.Reflector, err error) {
			sink.Error(Name, fmt.Errorf("watching %s: %w", r.TypeDescription(), err))
		}); err != nil {
			return fmt.Errorf("kube probe: %w", err)
		}
		reg, err := h.inf.AddEventHandler(h.handler)
		if err != nil {
			return fmt.Errorf("kube probe: %w", err)
		}
		synced = append(synced, reg.HasSynced)
	}
	var wg sync.WaitGroup
	defer wg.Wait()
	runCtx, stop := context.WithCancel(ctx)
	defer stop()
	for _, inf := range []cache.SharedIndexInformer{sliceInf, podInf} {
		wg.Go(func() { inf.RunWithContext(runCtx) })
	}
	wg.Go(func() { slices.settle(runCtx) })

	p.log.Info("waiting for informers to sync", "node", p.node)
	if !p.waitForSync(ctx, sink, synced) {
		return nil
	}
	sink.SetStatus(Name, probes.Status{Up: true, Synced: true})
	p.log.Info("informers synced")
	<-ctx.Done()
	return nil
}

// waitForSync waits for the informers' first list. Informers retry an unreachable API server
// quietly (a refused connection is backed off inside client-go without reaching the watch error
// handler), so while they wait the probe asks the server for its version, with backoff, and
// reports why it cannot be reached. It returns false when ctx ends first.
func (p *Probe) waitForSync(ctx context.Context, sink probes.Sink, synced []cache.InformerSynced) bool {
	done := make(chan bool, 1)
	go func() { done <- cache.WaitForCacheSync(ctx.Done(), synced...) }()
	start, delay := time.Now(), time.Second
	for {
		t := time.NewTimer(delay)
		select {
		case ok := <-done:
			t.Stop()
			return ok
		case <-t.C:
		}
		if _, err := p.client.Discovery().ServerVersion(); err != nil {
			sink.Error(Name, fmt.Errorf("informers not synced after %s: API server unreachable: %w", time.Since(start).Round(time.Second), err))
		}
		delay = min(2*delay, 30*time.Second)
	}
}

// sliceHandler runs on the slice informer's single handler goroutine; its removals are reported
// by settle, on another, hence the lock around the tracker.
type sliceHandler struct {
	probe   *Probe
	sink    probes.Sink
	relists *relists
	mu      sync.Mutex
	tracker *sliceTracker
	// deferred wakes settle when a removal starts waiting: with none waiting it sleeps, so that a
	// node at rest does not wake five times a second for nothing.
	deferred chan struct{}
	// reported remembers the input errors already reported per slice, so that a bad slice is
	// reported when it turns bad, not at every update.
	reported map[string]string
}

func (h *sliceHandler) add(obj any, initial bool) { h.apply(obj, false, initial) }
func (h *sliceHandler) update(_, obj any)         { h.apply(obj, false, false) }
func (h *sliceHandler) delete(obj any)            { h.apply(obj, true, false) }

func (h *sliceHandler) apply(obj any, deleted, initial bool) {
	ev := event{at: h.probe.clock.Now(), initial: initial}
	if relist, gap := h.relists.seen(obj); relist && !initial {
		ev.relist, ev.precision = true, gap
	}
	tomb, isTomb := obj.(cache.DeletedFinalStateUnknown)
	if isTomb {
		obj, deleted = tomb.Obj, true
	}
	s, ok := obj.(*sliceObject)
	if !ok {
		h.sink.Error(Name, fmt.Errorf("slice informer delivered %T", obj))
		return
	}
	if !isTomb && !s.seen.IsZero() {
		// When the event arrived, not when this handler got to it (a tombstone's object is
		// the last one seen before it: its time is not the deletion's).
		ev.at = s.seen
	}
	h.sink.SetStatus(Name, probes.Status{Up: true})
	key := s.Namespace + "/" + s.Name
	ev.slice = key + "@" + s.ResourceVersion
	var entry *sliceEntry
	if !deleted {
		entry = s.entry
		h.report(key, s.errs)
	} else {
		delete(h.reported, key)
	}
	h.mu.Lock()
	changes := h.tracker.apply(key, entry, ev)
	waiting := len(h.tracker.deferred) > 0
	h.mu.Unlock()
	if waiting {
		select {
		case h.deferred <- struct{}{}:
		default: // settle is awake already or will be
		}
	}
	h.observe(changes)
	h.probe.sliceEvents.Add(1)
}

// settle reports the removals that waited long enough to be sure, until ctx is done. It checks
// five times per RemovalSettle while removals wait, and sleeps while none does.
func (h *sliceHandler) settle(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-h.deferred:
		}
		if !h.flushWhileWaiting(ctx) {
			return
		}
	}
}

// flushWhileWaiting flushes every RemovalSettle/5 until no removal waits (true) or ctx is done
// (false).
func (h *sliceHandler) flushWhileWaiting(ctx context.Context) bool {
	t := time.NewTicker(RemovalSettle / 5)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return false
		case <-t.C:
		}
		h.mu.Lock()
		changes := h.tracker.flush(h.probe.clock.Now())
		waiting := len(h.tracker.deferred) > 0
		h.mu.Unlock()
		h.observe(changes)
		if !waiting {
			return true
		}
	}
}

func (h *sliceHandler) observe(changes []change) {
	for _, c := range changes {
		h.sink.Observe(probes.Observation{
			Stage:      c.stage,
			Time:       c.at,
			Precision:  c.precision,
			Source:     Name,
			Pod:        c.info.pod,
			Service:    c.service,
			Endpoint:   c.key.endpoint,
			Local:      c.info.node == h.probe.node,
			NotProxied: c.notProxied,
			Initial:    c.initial,
			Relist:     c.relist,
			Slice:      c.slice,
			Untrusted:  c.info.untrusted,
			Serving:    c.info.serving,
			Fallback:   c.fallback,
		})
	}
}

func (h *sliceHandler) report(key string, errs []error) {
	var sig string
	for _, err := range errs {
		sig += err.Error() + "\n"
	}
	if sig == h.reported[key] {
		return
	}
	if sig == "" {
		delete(h.reported, key)
		return
	}
	h.reported[key] = sig
	for _, err := range errs {
		h.sink.Error(Name, err)
	}
}

// podHandler runs on the pod informer's single handler goroutine.
type podHandler struct {
	probe   *Probe
	sink    probes.Sink
	relists *relists
	// deleted holds the UIDs whose deletion was reported; live the addresses each live pod was
	// last reported to hold. Both are bounded by this node's pods.
	deleted map[string]bool
	live    map[string][]netip.Addr
}

func (h *podHandler) add(obj any, initial bool) { h.seen(obj, initial) }
func (h *podHandler) update(_, obj any)         { h.seen(obj, false) }

func (h *podHandler) seen(obj any, initial bool) {
	relist, gap := h.relists.seen(obj)
	pod, at, ok := h.pod(obj)
	if !ok {
		return
	}
	uid := string(pod.UID)
	if pod.DeletionTimestamp == nil {
		h.liveAddrs(pod, at)
		return
	}
	if h.deleted[uid] {
		return
	}
	h.deleted[uid] = true
	delete(h.live, uid)
	o := deletedObservation(pod, at, initial)
	if relist && !initial {
		o.Relist, o.Precision = true, gap
	}
	h.sink.Observe(o)
}

// liveAddrs reports the addresses a live pod holds when they change: a running pod's, none for
// one that completed or failed (its sandbox, and so its address, is gone).
func (h *podHandler) liveAddrs(pod *corev1.Pod, at time.Time) {
	uid := string(pod.UID)
	var addrs []netip.Addr
	if !terminal(pod) {
		addrs = podAddrs(pod)
	}
	if slices.Equal(addrs, h.live[uid]) {
		return
	}
	if len(addrs) == 0 {
		delete(h.live, uid)
	} else {
		h.live[uid] = addrs
	}
	h.sink.Observe(probes.Observation{Stage: probes.StagePodAddresses, Time: at, Source: Name, Pod: podRef(pod), Local: true, Addrs: addrs})
}

func (h *podHandler) delete(obj any) {
	relist, gap := h.relists.seen(obj)
	tomb, isTomb := obj.(cache.DeletedFinalStateUnknown)
	if isTomb {
		obj = tomb.Obj
	}
	pod, now, ok := h.pod(obj)
	if !ok {
		return
	}
	if isTomb {
		now = h.probe.clock.Now()
	}
	uid := string(pod.UID)
	if !h.deleted[uid] {
		o := deletedObservation(pod, now, false)
		o.Relist, o.Precision = relist, gap
		h.sink.Observe(o)
	}
	delete(h.deleted, uid)
	delete(h.live, uid)
	gone := probes.Observation{Stage: probes.StageGone, Time: now, Source: Name, Pod: podRef(pod), Local: true, Addrs: deletingAddrs(pod)}
	gone.Relist, gone.Precision = relist, gap
	h.sink.Observe(gone)
}

// pod unpacks an informer object, with when its event arrived, and keeps only pods of this node;
// the field selector already does, this guards against a server or fake that ignores it.
func (h *podHandler) pod(obj any) (*corev1.Pod, time.Time, bool) {
	po, ok := obj.(*podObject)
	if !ok {
		h.sink.Error(Name, fmt.Errorf("pod informer delivered %T", obj))
		return nil, time.Time{}, false
	}
	h.sink.SetStatus(Name, probes.Status{Up: true})
	return po.Pod, po.seen, po.Spec.NodeName == h.probe.node
}

func deletedObservation(pod *corev1.Pod, now time.Time, initial bool) probes.Observation {
	return probes.Observation{
		Stage:    probes.StageDeleted,
		Time:     now,
		Source:   Name,
		Pod:      podRef(pod),
		Local:    true,
		Initial:  initial,
		APITime:  APIDeletionTime(pod),
		Addrs:    deletingAddrs(pod),
		Declared: declared(pod),
	}
}

// terminal tells a pod whose containers have all ended for good (a Job's completed pod, an
// evicted one): its network is gone, though its status keeps the address.
func terminal(pod *corev1.Pod) bool {
	return pod.Status.Phase == corev1.PodSucceeded || pod.Status.Phase == corev1.PodFailed
}

// deletingAddrs are the addresses whose traffic counts against a deleting pod: none once it is in
// a terminal phase, as its CNI released them and another pod may hold them by now.
func deletingAddrs(pod *corev1.Pod) []netip.Addr {
	if terminal(pod) {
		return nil
	}
	return podAddrs(pod)
}

// podAddrs are the pod's IPs (status.podIPs), without host-network pods' node addresses.
func podAddrs(pod *corev1.Pod) []netip.Addr {
	if pod.Spec.HostNetwork {
		return nil
	}
	var out []netip.Addr
	for _, ip := range pod.Status.PodIPs {
		if a, err := netip.ParseAddr(ip.IP); err == nil {
			out = append(out, a.Unmap())
		}
	}
	return out
}

// APIDeletionTime is when the API server accepted the delete: it sets deletionTimestamp to that
// moment plus the grace period. Zero when the pod has no deletionTimestamp.
func APIDeletionTime(pod *corev1.Pod) time.Time {
	if pod.DeletionTimestamp == nil {
		return time.Time{}
	}
	var grace int64
	if pod.DeletionGracePeriodSeconds != nil {
		grace = *pod.DeletionGracePeriodSeconds
	}
	return pod.DeletionTimestamp.Add(-time.Duration(grace) * time.Second)
}

func podRef(pod *corev1.Pod) probes.PodRef {
	return probes.PodRef{Namespace: pod.Namespace, Name: pod.Name, UID: string(pod.UID)}
}
