package collector

import (
	"net/netip"
	"slices"
	"time"

	"github.com/endpointlag/endpointlag/probes"
)

// This file keeps what the packets probe needs and reports: the addresses of this node's deleting
// pods, and the new connections that still reached them.

// maxConnsPerPod bounds the connections a pod's records list; the counts go on beyond it.
const maxConnsPerPod = 1000

// conn is one connection a pod's records list.
type conn struct {
	at       time.Time
	peer     netip.AddrPort
	endpoint probes.Endpoint
	kind     string
}

// LocalPods implements probes.LocalPods: this node's pods whose deletion began, with their
// addresses, until the horizon.
func (c *Collector) LocalPods() []probes.LocalPod {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make([]probes.LocalPod, 0, len(c.pods))
	for _, t := range c.pods {
		if t.t0.IsZero() || len(t.addrs) == 0 {
			continue
		}
		out = append(out, probes.LocalPod{Pod: t.pod, Addrs: slices.Clone(t.addrs), T0: t.t0, Gone: !t.gone.IsZero()})
	}
	return out
}

// NotifyLocalPods implements probes.LocalPods.
func (c *Collector) NotifyLocalPods(ch chan<- struct{}) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.localWatchers = append(c.localWatchers, ch)
}

// localChanged tells the watchers that LocalPods changed. Called with c.mu held.
func (c *Collector) localChanged() {
	for _, ch := range c.localWatchers {
		select {
		case ch <- struct{}{}:
		default: // a notification is already waiting
		}
	}
}

// setAddrs records a local pod's addresses the first time they are known.
func (c *Collector) setAddrs(t *podTimeline, addrs []netip.Addr) {
	if len(t.addrs) > 0 || len(addrs) == 0 {
		return
	}
	t.addrs = slices.Clone(addrs)
	for _, a := range t.addrs {
		c.byAddr[a] = t.pod.UID
	}
}

func (c *Collector) dropAddrs(t *podTimeline) {
	for _, a := range t.addrs {
		if c.byAddr[a] == t.pod.UID {
			delete(c.byAddr, a)
		}
	}
}

// connection joins a late or dead connection to its local pod.
func (c *Collector) connection(o probes.Observation) {
	t := c.pods[o.Pod.UID]
	if t == nil {
		t = c.pods[c.byAddr[o.Endpoint.Addr]]
	}
	if t == nil {
		return
	}
	kind, what := "late", "new connection to a terminating pod"
	if o.Stage == probes.StageDeadConnection {
		kind, what = "dead", "new connection to a deleted pod's address"
	}
	c.log.Debug(what, "pod", t.pod, "endpoint", o.Endpoint, "client", o.Peer, "at", o.Time)
	if len(t.conns) < maxConnsPerPod {
		t.conns = append(t.conns, conn{at: o.Time, peer: o.Peer, endpoint: o.Endpoint, kind: kind})
	}
	if o.Stage == probes.StageLateConnection && o.Time.After(t.lastConn) {
		t.lastConn = o.Time
	}
}

// connectionsWatched reports whether a probe that reports late connections runs and is active.
func (c *Collector) connectionsWatched() bool {
	name, ok := c.opts.StageProbe[probes.StageLateConnection]
	if !ok {
		return false
	}
	s := c.status[name]
	return s.Up && !s.Inactive
}

// sampleLastConnection observes, once per pod, the time from T0 to the last new connection that
// reached it (zero when none did), when the pod is gone or its timeline expires.
func (c *Collector) sampleLastConnection(t *podTimeline) {
	if t.connSampled || t.t0.IsZero() || t.t0Initial || !c.connectionsWatched() {
		return
	}
	t.connSampled = true
	c.m.lastConnection.Observe(lag(t.lastConn, t.t0))
}
