package collector

import (
	"net/netip"
	"slices"
	"sort"
	"time"

	"github.com/endpointlag/endpointlag/probes"
)

// RecordView is one terminating endpoint's timeline as `endpointlag inspect` and the daemon's
// /api/v1/records show it.
type RecordView struct {
	Pod      probes.PodRef     `json:"pod"`
	Service  probes.ServiceRef `json:"service"`
	Endpoint probes.Endpoint   `json:"endpoint"`
	// Local is true when the pod runs on the reporting node, so T0 and propagation are known.
	Local bool `json:"local"`
	// Untrusted is true when a slice no trusted controller manages started the record (and no
	// trusted slice has shown the endpoint terminating since): it is held within
	// --record.max-untrusted.
	Untrusted bool `json:"untrusted,omitempty"`
	// T0 is when the pod got its deletionTimestamp as this daemon saw it; T0API is the API
	// server's own value (1 s precision).
	T0     *time.Time  `json:"t0,omitempty"`
	T0API  *time.Time  `json:"t0_api,omitempty"`
	Stages []StageView `json:"stages"`
	// Declared is, for local pods, what the pod declares about its termination (workload,
	// preStop, grace period).
	Declared *probes.Declared `json:"declared,omitempty"`
	// Serving is the endpoint's serving condition when it turned terminating; Fallback says where
	// kube-proxy then kept routing to it because no ready endpoint was left (KEP-1669).
	Serving  bool             `json:"serving"`
	Fallback *probes.Fallback `json:"fallback,omitempty"`
	Pending  []string         `json:"pending,omitempty"`
	// Awaited are the routing stages that reached the endpoint when it turned terminating: dataplane
	// stages by path ("stage/path"), the ingress stage by proxy instance ("ingress@instance"); Held
	// those kube-proxy still holds back on purpose.
	Awaited []string `json:"awaited,omitempty"`
	Held    []string `json:"held,omitempty"`
	// NotApplicable are the active routing stages that never reached the endpoint here (a node-local
	// Service's endpoint on another node, topology, a pod never ready, a Service no proxy routes
	// to): they are not awaited here.
	NotApplicable []string `json:"not_applicable,omitempty"`
	// Connections are the new connections to this endpoint after T0 that the packets probe
	// reported (the first ones, up to a limit per pod), for local pods.
	Connections []ConnectionView `json:"connections,omitempty"`
}

// ConnectionView is one new connection that reached a terminating pod (late) or was sent to the
// address of a pod already gone (dead).
type ConnectionView struct {
	Time   time.Time      `json:"time"`
	Client netip.AddrPort `json:"client"`
	Kind   string         `json:"kind"`
	// Node: the client is one of the node's own addresses (the kubelet's probes, say), not a
	// client of the Service.
	Node bool `json:"node,omitempty"`
}

// StageView is one stage of a timeline. The lags are absent where the reference is unknown.
type StageView struct {
	Stage  string `json:"stage"`
	Source string `json:"source"`
	// Kind is the source's kind: for the ingress stage, the proxy kind of the instance Source.
	Kind string    `json:"kind,omitempty"`
	Path string    `json:"path,omitempty"`
	Time time.Time `json:"time"`
	// Precision is how much earlier it may have happened: a poll interval, or the gap a relist
	// covers.
	Precision float64 `json:"precision_seconds,omitempty"`
	// Initial: the daemon found the endpoint already at this stage when it started. Relist: first
	// seen on a re-read after a gap. Fallback: a removal kube-proxy held back while no ready
	// endpoint was left. None of them is sampled as lag.
	Initial  bool `json:"initial,omitempty"`
	Relist   bool `json:"relist,omitempty"`
	Fallback bool `json:"fallback,omitempty"`
	// Slice is, for the EndpointSlice stages, the slice change that showed it:
	// namespace/name@resourceVersion.
	Slice       string   `json:"slice,omitempty"`
	Programming *float64 `json:"programming_seconds,omitempty"`
	Propagation *float64 `json:"propagation_seconds,omitempty"`
}

// Records returns every record held, oldest first. The views are built under the lock; encoding
// them is the caller's, without it.
func (c *Collector) Records() []RecordView {
	c.mu.Lock()
	out := make([]RecordView, 0, len(c.records))
	for _, r := range c.records {
		out = append(out, c.view(r))
	}
	c.mu.Unlock()
	sort.Slice(out, func(i, j int) bool {
		a, b := out[i], out[j]
		if !a.Stages[0].Time.Equal(b.Stages[0].Time) {
			return a.Stages[0].Time.Before(b.Stages[0].Time)
		}
		return a.Endpoint.String()+a.Service.String() < b.Endpoint.String()+b.Service.String()
	})
	return out
}

// Print is what changes in a record's view as its timeline fills: the counts of its Stages,
// Connections, Pending and Awaited. What sends each settled record once, and again when it
// changed, compares prints.
type Print struct{ Stages, Connections, Pending, Awaited int }

// Print returns the view's print.
func (v RecordView) Print() Print {
	return Print{Stages: len(v.Stages), Connections: len(v.Connections), Pending: len(v.Pending), Awaited: len(v.Awaited)}
}

// Digest is what a reader of settled records (the pusher, the tracer) needs to decide whether
// to view a record. Viewing every record held at every push took 2.22 % of a core at rest with
// 6,000 records held, against 0.12 % with digests (docs/benchmarks.md), and held a second copy
// of every record while it lasted.
type Digest struct {
	// ID names the record among every record the collector held: a record that expired and
	// started again has a new one.
	ID      uint64
	Settled bool
	// SettlesAt is, for a record not settled, when it settles by age if nothing else changes
	// (zero: settled, or no stage yet).
	SettlesAt time.Time
	Print     Print
}

// Source is what readers of settled records read: the collector, or views a test made.
type Source interface {
	// Rev moves on whenever a digest may have changed: with the same Rev, the digests are the
	// same but for records settling by age (Digest.SettlesAt).
	Rev() uint64
	// ViewsWhere returns the views of the records want accepts.
	ViewsWhere(now time.Time, settleAfter time.Duration, want func(Digest) bool) []RecordView
}

// Digest is the view's digest, for a record of that ID.
func (v RecordView) Digest(id uint64, now time.Time, settleAfter time.Duration) Digest {
	d := Digest{ID: id, Settled: v.Settled(now, settleAfter), Print: v.Print()}
	if !d.Settled && len(v.Stages) > 0 {
		d.SettlesAt = v.Stages[0].Time.Add(settleAfter)
	}
	return d
}

// Rev implements Source.
func (c *Collector) Rev() uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.rev
}

// ViewsWhere returns the views of the records want accepts, in the order it accepted them.
// Settled in a digest is RecordView.Settled(now, settleAfter). want sees the digest of every
// record held, under the collector's lock: it must not call the collector.
func (c *Collector) ViewsWhere(now time.Time, settleAfter time.Duration, want func(Digest) bool) []RecordView {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []RecordView
	for _, r := range c.records {
		if want(c.digest(r, now, settleAfter)) {
			out = append(out, c.view(r))
		}
	}
	return out
}

// counted is what a record's digest counts, kept until the collector's rev moves on: a look at
// every record held costs a comparison each while nothing changes.
type counted struct {
	rev   uint64
	first time.Time
	print Print
	gone  bool
}

// digest is what the record's view would tell of it, counted without building the view.
func (c *Collector) digest(r *record, now time.Time, settleAfter time.Duration) Digest {
	if r.counted.rev != c.rev {
		r.counted = c.count(r)
	}
	n := r.counted
	d := Digest{ID: r.id, Print: n.print,
		Settled: settled(now, settleAfter, n.first, n.print.Stages > 0, n.print.Pending > 0, r.local, n.gone)}
	if !d.Settled && n.print.Stages > 0 {
		d.SettlesAt = n.first.Add(settleAfter)
	}
	return d
}

func (c *Collector) count(r *record) counted {
	n := counted{rev: c.rev, print: Print{Pending: len(c.pendingStages(r)), Awaited: len(r.awaits)}}
	at := func(t time.Time) {
		if n.print.Stages == 0 || t.Before(n.first) {
			n.first = t
		}
		n.print.Stages++
	}
	t := r.timeline
	if t != nil && !t.t0.IsZero() {
		at(t.t0)
	}
	for _, e := range r.stages {
		at(e.at)
	}
	for _, ended := range []time.Time{r.clusterEnded, r.localEnded} {
		if !ended.IsZero() {
			at(ended)
		}
	}
	if t != nil && !t.gone.IsZero() {
		at(t.gone)
		n.gone = true
	}
	if t != nil {
		for _, cn := range t.conns {
			if cn.endpoint == r.key.endpoint {
				n.print.Connections++
			}
		}
	}
	return n
}

func (c *Collector) view(r *record) RecordView {
	v := RecordView{Pod: r.pod, Service: r.key.service, Endpoint: r.key.endpoint, Local: r.local, Untrusted: r.untrusted, Serving: r.serving}
	if r.fallback.Any() {
		v.Fallback = &r.fallback
	}
	progRef, hasProg := r.programmingRef()
	t0, hasT0 := r.t0()
	if t := r.timeline; t != nil {
		if !t.t0.IsZero() {
			v.T0 = &t.t0
			s := StageView{Stage: string(probes.StageDeleted), Source: t.t0Source, Time: t.t0, Initial: t.t0Initial, Relist: t.t0Relist}
			if hasT0 {
				s.Propagation = ptr(0.0)
			}
			v.Stages = append(v.Stages, s)
		}
		if !t.t0API.IsZero() {
			v.T0API = &t.t0API
		}
		v.Declared = t.declared
	}
	for _, e := range r.stages {
		s := StageView{Stage: string(e.stage), Source: e.source, Kind: e.kind, Path: string(e.path), Time: e.at, Precision: e.precision.Seconds(),
			Initial: e.initial, Relist: e.relist, Fallback: e.fallback, Slice: e.slice}
		if e.unsampled() == "" && !e.initial {
			if hasProg && e.stage != probes.StageEndpointSlice {
				s.Programming = ptr(lag(e.at, progRef))
			}
			if hasT0 {
				s.Propagation = ptr(lag(e.at, t0))
			}
		}
		v.Stages = append(v.Stages, s)
	}
	for _, ended := range []struct {
		at    time.Time
		which probes.Fallback
	}{{r.clusterEnded, probes.Fallback{Cluster: true}}, {r.localEnded, probes.Fallback{Local: true}}} {
		if !ended.at.IsZero() {
			v.Stages = append(v.Stages, StageView{Stage: string(probes.StageFallbackEnded), Source: "kube", Time: ended.at, Path: fallbackName(ended.which)})
		}
	}
	if t := r.timeline; t != nil && !t.gone.IsZero() {
		s := StageView{Stage: string(probes.StageGone), Source: t.t0Source, Time: t.gone, Relist: t.goneRelist}
		if hasT0 && !t.goneRelist {
			s.Propagation = ptr(lag(t.gone, t0))
		}
		v.Stages = append(v.Stages, s)
	}
	sort.SliceStable(v.Stages, func(i, j int) bool { return v.Stages[i].Time.Before(v.Stages[j].Time) })
	if t := r.timeline; t != nil {
		for _, cn := range t.conns {
			if cn.endpoint == r.key.endpoint {
				v.Connections = append(v.Connections, ConnectionView{Time: cn.at, Client: cn.peer, Kind: cn.kind, Node: cn.node})
			}
		}
	}
	for _, s := range c.pendingStages(r) {
		v.Pending = append(v.Pending, string(s))
	}
	for _, a := range r.awaits {
		v.Awaited = append(v.Awaited, a.name())
		if ended, held := r.heldSince(a); held && ended.IsZero() && !r.arrived(a) {
			v.Held = append(v.Held, a.name())
		}
	}
	v.NotApplicable = c.notApplicable(r)
	return v
}

// notApplicable lists the active routing stages r awaits on no path and at no instance.
func (c *Collector) notApplicable(r *record) []string {
	var out []string
	for _, s := range c.opts.Stages {
		if !s.Routing() || (s.Dataplane() && r.notProxied) || c.status[c.opts.StageProbe[s]].Inactive || slices.Contains(r.undetermined, s) {
			continue
		}
		if !slices.ContainsFunc(r.awaits, func(a await) bool { return a.stage == s }) {
			out = append(out, string(s))
		}
	}
	return out
}

func fallbackName(f probes.Fallback) string {
	if f.Local {
		return "local"
	}
	return "cluster"
}

func ptr[T any](v T) *T { return &v }

// Key identifies the record among every node's: its pod, Service and endpoint.
func (v RecordView) Key() string {
	return v.Pod.UID + " " + v.Service.String() + " " + v.Endpoint.String()
}

// Settled tells a record whose timeline is done: no stage pending and, for a pod of this node,
// its gone stage (its connections are all in by then); or one older than after, with stages still
// pending. What pushes records elsewhere (the aggregator, traces) sends them once settled.
func (v RecordView) Settled(now time.Time, after time.Duration) bool {
	var first time.Time
	if len(v.Stages) > 0 {
		first = v.Stages[0].Time
	}
	gone := slices.ContainsFunc(v.Stages, func(s StageView) bool { return s.Stage == string(probes.StageGone) })
	return settled(now, after, first, len(v.Stages) > 0, len(v.Pending) > 0, v.Local, gone)
}

// settled is Settled of a record whose first stage came at first (if it has any).
func settled(now time.Time, after time.Duration, first time.Time, hasStages, pending, local, gone bool) bool {
	switch {
	case hasStages && now.Sub(first) >= after:
		return true
	case pending:
		return false
	}
	return !local || gone
}
