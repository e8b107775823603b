package collector

import (
	"net/netip"
	"slices"
	"time"

	"github.com/endpointlag/endpointlag/probes"
)

// This file keeps what the packets probe needs and reports: the addresses and endpoints of this
// node's deleting pods, and the new connections that still reached them.

// maxConnsPerPod bounds the connections a pod's records list; the counts go on beyond it.
const maxConnsPerPod = 1000

// conn is one connection a pod's records list.
type conn struct {
	at       time.Time
	peer     netip.AddrPort
	endpoint probes.Endpoint
	kind     string
	// node: the client is one of this node's own addresses (the kubelet's probes, say).
	node bool
}

// LocalPods implements probes.LocalPods: this node's pods whose deletion began, with their
// addresses (less those a live pod holds now) and endpoints, until the horizon.
func (c *Collector) LocalPods() []probes.LocalPod {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make([]probes.LocalPod, 0, len(c.pods))
	for _, t := range c.pods {
		if t.t0.IsZero() || len(t.addrs) == 0 {
			continue
		}
		lp := probes.LocalPod{Pod: t.pod, Addrs: slices.Clone(t.addrs), T0: t.t0, Gone: !t.gone.IsZero()}
		for _, k := range t.records {
			if !slices.Contains(lp.Endpoints, k.endpoint) {
				lp.Endpoints = append(lp.Endpoints, k.endpoint)
			}
		}
		out = append(out, lp)
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

// setAddrs records a local pod's addresses the first time they are known, less those a live pod
// of this node holds (a completed pod's status keeps an address its CNI released long ago).
func (c *Collector) setAddrs(t *podTimeline, addrs []netip.Addr) {
	if len(t.addrs) > 0 || len(addrs) == 0 {
		return
	}
	for _, a := range addrs {
		if owner, live := c.liveAddrs[a]; live && owner != t.pod.UID {
			c.log.Debug("address held by a live pod: not watched for the deleting one", "address", a, "pod", t.pod)
			continue
		}
		t.addrs = append(t.addrs, a)
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

// podAddresses records the addresses a live pod holds now. An address a deleting pod's timeline
// had belongs to the live pod from now on: it leaves that timeline, and so the packets probe's
// maps, at once.
func (c *Collector) podAddresses(o probes.Observation) {
	c.dropLive(o.Pod.UID)
	if len(o.Addrs) == 0 {
		return
	}
	c.livePods[o.Pod.UID] = slices.Clone(o.Addrs)
	changed := false
	for _, a := range o.Addrs {
		c.liveAddrs[a] = o.Pod.UID
		uid, ok := c.byAddr[a]
		if !ok || uid == o.Pod.UID {
			continue
		}
		delete(c.byAddr, a)
		if t := c.pods[uid]; t != nil {
			t.addrs = slices.DeleteFunc(t.addrs, func(x netip.Addr) bool { return x == a })
			c.log.Debug("address reused by a live pod: no longer watched for the deleting one", "address", a, "pod", t.pod, "by", o.Pod)
		}
		changed = true
	}
	if changed {
		c.localChanged()
	}
}

// dropLive forgets the addresses a pod held while live (it is deleting or gone now).
func (c *Collector) dropLive(uid string) {
	for _, a := range c.livePods[uid] {
		if c.liveAddrs[a] == uid {
			delete(c.liveAddrs, a)
		}
	}
	delete(c.livePods, uid)
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
	c.log.Debug(what, "pod", t.pod, "endpoint", o.Endpoint, "client", o.Peer, "from_node", o.FromNode, "at", o.Time)
	if len(t.conns) < maxConnsPerPod {
		t.conns = append(t.conns, conn{at: o.Time, peer: o.Peer, endpoint: o.Endpoint, kind: kind, node: o.FromNode})
	}
	if o.Stage == probes.StageLateConnection && !o.FromNode && o.Time.After(t.lastConn) {
		t.lastConn = o.Time
	}
}

// lastConnection takes the packets probe's exact time of the last new client connection to a pod
// that is gone (zero: none came) and samples it.
func (c *Collector) lastConnection(o probes.Observation) {
	t := c.pods[o.Pod.UID]
	if t == nil {
		return
	}
	if o.Time.After(t.lastConn) {
		t.lastConn = o.Time
	}
	c.sampleLastConnection(t)
}

// sampleLastConnection observes, once per pod, the time from T0 to the last new client connection
// that reached it (zero when none did).
func (c *Collector) sampleLastConnection(t *podTimeline) {
	if t.connSampled || t.t0.IsZero() || t.t0Initial || t.t0Relist {
		return
	}
	t.connSampled = true
	c.m.lastConnection.Observe(lag(t.lastConn, t.t0))
}
