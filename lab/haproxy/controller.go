package haproxy

import (
	"context"
	"log/slog"
	"net/netip"
	"slices"
	"strconv"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	discoverylisters "k8s.io/client-go/listers/discovery/v1"
	"k8s.io/client-go/tools/cache"
)

// Controller stands in for the HAProxy Kubernetes Ingress Controller of one HAProxy instance
// (the real one runs in the instance's container, one per instance). It follows the
// EndpointSlices of each backend's Service and keeps the backend's slots holding exactly the
// ready endpoints, through the instance's runtime API at level admin:
//
//   - an endpoint that turns ready takes the first free slot: `set server <backend>/SRV_<n> addr
//     <ip> port <port>` then `state ready`;
//   - an endpoint that is no longer ready (terminating, or failing its probe) or has left the
//     slices frees its slot: `set server … addr 127.0.0.1 port 1` then `state maint`.
//
// Like the controller it counts an endpoint only when its ready condition is true: a
// terminating endpoint is not routed to, even while it still serves. Events are gathered for
// SyncDelay before a sync, so that the several slice updates of one change make one runtime
// exchange (the real controller applies each slice event as its informer delivers it).
type Controller struct {
	Client kubernetes.Interface
	// Namespace and Pod name the HAProxy instance. When its process changes (a new container
	// ID: restarted, or the pod recreated), every slot is set again: the new process has read
	// the configuration, whose slots are free.
	Namespace, Pod string
	// Runtime reaches the instance's admin socket.
	Runtime  *Runtime
	Backends []Backend
	// Slots per backend, as in the instance's Config.
	Slots int
	// SyncDelay gathers events before a sync (DefaultSyncDelay when 0).
	SyncDelay time.Duration
	Log       *slog.Logger

	mu sync.Mutex
	// instance is the container ID of the process the slots were set for ("" before).
	instance string
	slots    map[string]*slots
	// changes are the slot changes applied, in order, for tests and the demo.
	changes []Change
}

// DefaultSyncDelay is the stand-in's own delay between an EndpointSlice event and the runtime
// update it causes.
const DefaultSyncDelay = 100 * time.Millisecond

// Change is one slot change the controller applied.
type Change struct {
	// Time is when HAProxy acknowledged it.
	Time    time.Time
	Backend string
	Server  string
	// Addr is the endpoint now in the slot; the zero AddrPort when the slot was freed.
	Addr netip.AddrPort
}

// Changes returns the slot changes applied so far.
func (c *Controller) Changes() []Change {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Clone(c.changes)
}

// Run drives the instance until ctx ends.
func (c *Controller) Run(ctx context.Context) {
	if c.SyncDelay == 0 {
		c.SyncDelay = DefaultSyncDelay
	}
	if c.Log == nil {
		c.Log = slog.New(slog.DiscardHandler)
	}
	c.Log = c.Log.With("haproxy-controller", c.Namespace+"/"+c.Pod)
	trigger := make(chan struct{}, 1)
	kick := func() {
		select {
		case trigger <- struct{}{}:
		default:
		}
	}
	handler := cache.ResourceEventHandlerFuncs{
		AddFunc:    func(any) { kick() },
		UpdateFunc: func(_, _ any) { kick() },
		DeleteFunc: func(any) { kick() },
	}
	f := informers.NewSharedInformerFactory(c.Client, 0)
	slicesInf := f.Discovery().V1().EndpointSlices()
	podsInf := f.Core().V1().Pods()
	_, _ = slicesInf.Informer().AddEventHandler(handler)
	_, _ = podsInf.Informer().AddEventHandler(handler)
	f.Start(ctx.Done())
	defer f.Shutdown()
	f.WaitForCacheSync(ctx.Done())
	for {
		select {
		case <-ctx.Done():
			return
		case <-trigger:
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(c.SyncDelay):
		}
		pod, err := podsInf.Lister().Pods(c.Namespace).Get(c.Pod)
		if err != nil {
			pod = nil
		}
		if !c.sync(ctx, pod, slicesInf.Lister()) {
			time.AfterFunc(time.Second, kick)
		}
	}
}

// runningContainer is the ID of the pod's running process, "" when none runs.
func runningContainer(pod *corev1.Pod) string {
	if pod == nil || pod.DeletionTimestamp != nil || len(pod.Status.ContainerStatuses) == 0 {
		return ""
	}
	cs := pod.Status.ContainerStatuses[0]
	if cs.State.Running == nil {
		return ""
	}
	return cs.ContainerID
}

// sync applies the slices to the instance's slots; false asks for a retry.
func (c *Controller) sync(ctx context.Context, pod *corev1.Pod, lister discoverylisters.EndpointSliceLister) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	id := runningContainer(pod)
	if id == "" {
		c.instance = ""
		return true
	}
	if id != c.instance {
		c.slots = map[string]*slots{}
		for _, b := range c.Backends {
			c.slots[b.Name()] = newSlots(b.Name(), c.Slots)
		}
	}
	for _, b := range c.Backends {
		s := c.slots[b.Name()]
		ready, err := readyEndpoints(lister, b)
		if err != nil {
			c.Log.Warn("listing EndpointSlices", "backend", b.Name(), "err", err)
			return false
		}
		changes, left := s.sync(ready)
		if len(left) > 0 {
			c.Log.Warn("more ready endpoints than server slots: some left out (the real controller adds slots and reloads)",
				"backend", b.Name(), "slots", c.Slots, "left", left)
		}
		if len(changes) == 0 {
			continue
		}
		if err := c.Runtime.SetServers(ctx, s.commands(changes)); err != nil {
			if ctx.Err() == nil {
				c.Log.Warn("updating servers through the runtime API; will set every slot again", "backend", b.Name(), "err", err)
			}
			// What HAProxy holds is unknown now: start from its configuration's state again
			// (the real controller reloads HAProxy after a failed runtime update).
			c.instance = ""
			return false
		}
		now := time.Now()
		for _, ch := range changes {
			c.changes = append(c.changes, Change{Time: now, Backend: b.Name(), Server: serverName(ch.slot), Addr: ch.addr})
			c.Log.Debug("server slot set", "backend", b.Name(), "server", serverName(ch.slot), "addr", ch.addr)
		}
	}
	c.instance = id
	return true
}

// readyEndpoints are the addresses and ports of the endpoints of b's Service whose ready
// condition is true, from the slices' port named b.Port (or unnamed, for a Service port without
// a name, which b names by number).
func readyEndpoints(lister discoverylisters.EndpointSliceLister, b Backend) ([]netip.AddrPort, error) {
	list, err := lister.EndpointSlices(b.Namespace).List(labels.SelectorFromSet(labels.Set{discoveryv1.LabelServiceName: b.Service}))
	if err != nil {
		return nil, err
	}
	// A Service port without a name is named by its number here; its slices' port has no name.
	_, err = strconv.Atoi(b.Port)
	unnamed := err == nil
	var out []netip.AddrPort
	for _, s := range list {
		port := 0
		for _, p := range s.Ports {
			name := ""
			if p.Name != nil {
				name = *p.Name
			}
			if p.Port != nil && (name == b.Port || name == "" && unnamed) {
				port = int(*p.Port)
			}
		}
		if port == 0 {
			continue
		}
		for _, ep := range s.Endpoints {
			if ep.Conditions.Ready == nil || !*ep.Conditions.Ready {
				continue
			}
			for _, a := range ep.Addresses {
				if ip, err := netip.ParseAddr(a); err == nil {
					out = append(out, netip.AddrPortFrom(ip, uint16(port)))
				}
			}
		}
	}
	return out, nil
}
