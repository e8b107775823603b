package collector

import (
	"net/netip"
	"slices"
	"time"

	"github.com/endpointlag/endpointlag/probes"
)

// record is one terminating endpoint's timeline.
type record struct {
	key recordKey
	// id names the record among every record this collector held (Digest.ID).
	id uint64
	// counted is what digest counted of the record, at rev counted.rev.
	counted counted
	pod     probes.PodRef
	local   bool
	// notProxied: kube-proxy does not program the Service, so no dataplane stage is awaited.
	notProxied bool
	// untrusted: an observation of a slice no trusted controller manages started the record, and
	// no trusted one has shown the endpoint terminating since; it is held within
	// MaxUntrustedRecords (budget.go).
	untrusted bool
	created   time.Time
	// timeline is the pod's deletion timeline; nil for pods on other nodes.
	timeline *podTimeline
	stages   []stageEntry
	// serving is the endpoint's serving condition when it turned terminating; fallback says
	// where kube-proxy then kept routing to it for want of a ready endpoint (KEP-1669), and
	// clusterEnded / localEnded when each of those fallbacks ended.
	serving                  bool
	fallback                 probes.Fallback
	clusterEnded, localEnded time.Time
	// awaits are the routing stages, with their paths or sources, that reached the endpoint when
	// the record started (or shortly before: orphans). An active routing stage with none, and not
	// undetermined, does not apply on this node.
	awaits []await
	// undetermined are the routing stages whose probe had not read its source yet when the record
	// started; they are awaited until it has.
	undetermined []probes.Stage
}

// await is one routing stage a record waits for: a dataplane stage on a path, with the policy
// chains that reached the endpoint on it, or the ingress stage at one proxy instance (source).
type await struct {
	stage  probes.Stage
	path   probes.Path
	source string
	policy probes.Policy
}

// name is how views list it: stage/path, or stage@source.
func (a await) name() string {
	if a.source != "" {
		return string(a.stage) + "@" + a.source
	}
	return string(a.stage) + "/" + string(a.path)
}

type stageEntry struct {
	stage  probes.Stage
	source string
	// kind is the source's kind (a proxy kind, for the ingress stage).
	kind      string
	path      probes.Path
	at        time.Time
	precision time.Duration
	initial   bool
	// relist: first seen on a re-read after a gap; fallback: a dataplane removal kube-proxy held
	// back on purpose (KEP-1669). Neither is sampled as lag.
	relist   bool
	fallback bool
	// slice is the EndpointSlice change of a slice stage (namespace/name@resourceVersion).
	slice string
	// progDone and propDone say the sample against each reference was taken (or, for relist
	// and fallback entries, counted apart).
	progDone, propDone bool
}

// podTimeline is a local pod's deletion: T0 and gone.
type podTimeline struct {
	pod     probes.PodRef
	created time.Time
	// untrusted: a record an untrusted observation started created it, and neither the pod's
	// deletion nor a trusted record has shown the pod since; it is not counted against MaxRecords.
	untrusted bool
	t0        time.Time
	// t0Source is the probe that reported the deletion.
	t0Source string
	// t0Initial: the pod was already terminating when the daemon started, so T0 is unknown;
	// t0Relist: its deletion was first seen on a relist, so T0 is only known within a gap.
	t0Initial, t0Relist bool
	t0API               time.Time
	declared            *probes.Declared
	gone                time.Time
	// goneRelist: the pod object's removal was first seen on a relist.
	goneRelist bool
	records    []recordKey
	// addrs are the pod's IPs; lastConn is the last new client connection the packets probe
	// reported an event for, conns the first connections it reported.
	addrs       []netip.Addr
	lastConn    time.Time
	connSampled bool
	conns       []conn
}

// record returns the record an endpoint observation belongs to, creating and starting it when
// create is set (the observation shows the endpoint turn terminating). It returns nil when the
// record does not exist (and is not to be created) or its budget is spent (budget.go): trusted
// records are held within MaxRecords, those an untrusted observation starts within
// MaxUntrustedRecords, and no namespace holds more than MaxRecordsPerNamespace.
//
// An untrusted observation joins an existing record as any other does. A trusted one that would
// have started the record makes a record an untrusted one started trusted (trust).
func (c *Collector) record(o probes.Observation, create bool) *record {
	k := recordKey{uid: o.Pod.UID, service: o.Service, endpoint: o.Endpoint}
	if r, ok := c.records[k]; ok || !create {
		if ok && create && r.untrusted && !o.Untrusted {
			c.trust(r)
		}
		return r
	}
	if reason, ok := c.admit(o, k); !ok {
		c.m.dropped.WithLabelValues(reason).Inc()
		return nil
	}
	now := c.clock.Now()
	c.lastID++
	r := &record{key: k, id: c.lastID, pod: o.Pod, local: o.Local, notProxied: o.NotProxied, untrusted: o.Untrusted, created: now, serving: o.Serving, fallback: o.Fallback}
	c.hold(r)
	if o.Local {
		r.timeline = c.timeline(o.Pod, now, o.Untrusted)
		if r.timeline != nil {
			r.timeline.records = append(r.timeline.records, k)
		}
	}
	c.records[k] = r
	c.byEndpoint[k.endpoint] = append(c.byEndpoint[k.endpoint], k)
	c.peak = max(c.peak, len(c.records))
	c.queue = append(c.queue, queued{created: now, key: k})
	c.awaitDataplane(r, o.Time)
	if len(r.undetermined) == 0 {
		r.fallback = relevantFallback(r.fallback, r.awaits)
	}
	if r.timeline != nil {
		c.localChanged() // the pod's endpoints are known now
	}
	return r
}

// awaitDataplane asks each active routing probe (kube-proxy's rules, the proxies) whether it
// reaches the endpoint now, and takes the removals seen shortly before (orphans): the stage is
// awaited on those paths and at those instances only. A node-local Service's endpoint on another
// node, an endpoint topology routing keeps to other zones, a pod that never turned ready, a
// Service no proxy routes to: they were never reached, and the stage does not apply here.
func (c *Collector) awaitDataplane(r *record, at time.Time) {
	for _, s := range c.opts.Stages {
		if !s.Routing() || (s.Dataplane() && r.notProxied) || c.status[c.opts.StageProbe[s]].Inactive {
			continue
		}
		dp := c.dataplanes[s]
		if dp == nil {
			// A probe that cannot say what it reaches: await the ClusterIP path.
			r.awaits = append(r.awaits, await{stage: s, path: probes.PathCluster, policy: probes.Policy{Cluster: true}})
			continue
		}
		reach, ok := dp.Reaches(r.key.service, r.key.endpoint)
		if !ok {
			r.undetermined = append(r.undetermined, s)
			c.markUndetermined(s, r.key)
			continue
		}
		for _, rc := range reach {
			r.addAwait(await{stage: s, path: rc.Path, source: rc.Source, policy: rc.Policy})
		}
	}
	for _, o := range c.orphans.take(r.key.endpoint, r.key.service, at) {
		r.addAwait(awaitOf(o))
		c.addStage(r, o)
	}
	c.pendingChanged()
}

// awaitOf is what a removal observation shows was awaited: its path, or its proxy instance.
func awaitOf(o probes.Observation) await {
	a := await{stage: o.Stage, path: o.Path}
	if !o.Stage.Dataplane() {
		a.source = o.Source
	}
	return a
}

func (c *Collector) markUndetermined(s probes.Stage, k recordKey) {
	if c.undetermined[s] == nil {
		c.undetermined[s] = map[recordKey]bool{}
	}
	c.undetermined[s][k] = true
}

// resolveUndetermined asks a probe that has now read its rules about the records that started
// before it had: what it reaches is awaited, the rest does not apply (an inactive probe's stage
// applies nowhere). It tells whether it changed a record.
func (c *Collector) resolveUndetermined(probe string, s probes.Status) (changed bool) {
	for stage, keys := range c.undetermined {
		if c.opts.StageProbe[stage] != probe || len(keys) == 0 {
			continue
		}
		dp := c.dataplanes[stage]
		for k := range keys {
			r := c.records[k]
			if r == nil {
				continue
			}
			if !s.Inactive && dp != nil {
				reach, ok := dp.Reaches(k.service, k.endpoint)
				if !ok {
					continue
				}
				for _, rc := range reach {
					r.addAwait(await{stage: stage, path: rc.Path, source: rc.Source, policy: rc.Policy})
				}
			}
			changed = true
			r.undetermined = slices.DeleteFunc(r.undetermined, func(x probes.Stage) bool { return x == stage })
			if len(r.undetermined) == 0 {
				r.fallback = relevantFallback(r.fallback, r.awaits)
			}
			delete(keys, k)
		}
	}
	return changed
}

// relevantFallback keeps of f the fallbacks a policy chain reaching the endpoint here is subject
// to: a node-local fallback means nothing for a Service whose traffic policies are Cluster.
func relevantFallback(f probes.Fallback, awaits []await) probes.Fallback {
	var cluster, local bool
	for _, a := range awaits {
		cluster = cluster || a.policy.Cluster
		local = local || a.policy.Local
	}
	return probes.Fallback{Cluster: f.Cluster && cluster, Local: f.Local && local}
}

// addAwait adds an awaited path or source, merging policies when it is already awaited.
func (r *record) addAwait(a await) {
	for i := range r.awaits {
		if r.awaits[i].stage == a.stage && r.awaits[i].path == a.path && r.awaits[i].source == a.source {
			p := r.awaits[i].policy
			r.awaits[i].policy = probes.Policy{Cluster: p.Cluster || a.policy.Cluster, Local: p.Local || a.policy.Local}
			return
		}
	}
	r.awaits = append(r.awaits, a)
}

// awaiting tells whether r waits for a (or cannot tell yet).
func (r *record) awaiting(a await) bool {
	if slices.Contains(r.undetermined, a.stage) {
		return true
	}
	for _, x := range r.awaits {
		if x.stage == a.stage && x.path == a.path && x.source == a.source {
			return true
		}
	}
	return false
}

// heldAtStart tells whether kube-proxy kept routing to the endpoint on a path, for want of a
// ready endpoint, when it turned terminating: a removal on that path is owed to the fallback
// ending, not to sync lag.
func (r *record) heldAtStart(a await) bool {
	return (a.policy.Cluster && r.fallback.Cluster) || (a.policy.Local && r.fallback.Local)
}

// heldSince returns, for a path held by a fallback, when the fallback ended (zero: it holds on).
func (r *record) heldSince(a await) (ended time.Time, held bool) {
	if !r.heldAtStart(a) {
		return time.Time{}, false
	}
	var cluster, local time.Time
	if a.policy.Cluster && r.fallback.Cluster {
		if cluster = r.clusterEnded; cluster.IsZero() {
			return time.Time{}, true
		}
	}
	if a.policy.Local && r.fallback.Local {
		if local = r.localEnded; local.IsZero() {
			return time.Time{}, true
		}
	}
	if cluster.After(local) {
		return cluster, true
	}
	return local, true
}

// fallbackEnded notes that kube-proxy's reason to keep routing to a terminating endpoint ended.
func (c *Collector) fallbackEnded(o probes.Observation) {
	r := c.record(o, false)
	if r == nil {
		return
	}
	if o.Fallback.Cluster && r.fallback.Cluster && r.clusterEnded.IsZero() {
		r.clusterEnded = o.Time
	}
	if o.Fallback.Local && r.fallback.Local && r.localEnded.IsZero() {
		r.localEnded = o.Time
	}
}

// timeline returns the local pod's timeline, creating it; nil when the cap is reached.
// untrusted: a record an untrusted observation starts asks for it (a made-up slice can say its
// made-up pods run here). Such a timeline is not counted against MaxRecords, which caps the
// others: it is held because its record is, within MaxUntrustedRecords, and expires with it.
// The pod's own deletion, or a trusted record, makes it trusted (trustTimeline).
func (c *Collector) timeline(pod probes.PodRef, now time.Time, untrusted bool) *podTimeline {
	if t, ok := c.pods[pod.UID]; ok {
		if t.untrusted && !untrusted {
			c.trustTimeline(t)
		}
		return t
	}
	if !untrusted && len(c.pods)-c.budgets.untrustedPods >= c.opts.MaxRecords {
		c.m.dropped.WithLabelValues(dropMax).Inc()
		return nil
	}
	t := &podTimeline{pod: pod, created: now, untrusted: untrusted}
	if untrusted {
		c.budgets.untrustedPods++
	}
	c.pods[pod.UID] = t
	c.queue = append(c.queue, queued{created: now, key: recordKey{uid: pod.UID}, pod: true})
	return t
}

func (c *Collector) podDeleted(o probes.Observation) {
	c.dropLive(o.Pod.UID)
	t := c.timeline(o.Pod, c.clock.Now(), false)
	if t == nil || !t.t0.IsZero() {
		return
	}
	t.t0, t.t0Source, t.t0Initial, t.t0Relist, t.t0API, t.declared = o.Time, o.Source, o.Initial, o.Relist, o.APITime, o.Declared
	if o.Relist && !o.Initial {
		// No T0: none of the pod's stages is sampled against it. Counted like the stages.
		c.m.unsampled.WithLabelValues(string(probes.StageDeleted), "", reasonRelist).Inc()
	}
	c.setAddrs(t, o.Addrs)
	c.localChanged()
	// The endpoint's slice change seen before the pod's own event means that event was late: T0
	// is no later than it. (Dataplane removals are no evidence: kube-proxy may have dropped the
	// endpoint before the deletion, when its readiness failed.)
	for _, k := range t.records {
		if r := c.records[k]; r != nil {
			for _, e := range r.stages {
				if !e.initial && !e.relist && (e.stage == probes.StageEndpointSlice || e.stage == probes.StageEndpointSliceRemoved) && e.at.Before(t.t0) {
					t.t0 = e.at
				}
			}
		}
	}
	c.log.Debug("pod deleted", "pod", o.Pod, "uid", o.Pod.UID, "t0", t.t0, "t0_api", t.t0API, "initial", o.Initial, "relist", o.Relist)
	for _, k := range t.records {
		if r := c.records[k]; r != nil {
			c.sample(r)
		}
	}
}

func (c *Collector) podGone(o probes.Observation) {
	c.dropLive(o.Pod.UID)
	if t := c.pods[o.Pod.UID]; t != nil && t.gone.IsZero() {
		t.gone, t.goneRelist = o.Time, o.Relist
		if o.Relist {
			c.m.unsampled.WithLabelValues(string(probes.StageGone), "", reasonRelist).Inc()
		}
		c.setAddrs(t, o.Addrs)
		c.localChanged()
		c.log.Debug("pod gone", "pod", o.Pod, "uid", o.Pod.UID)
	}
}

// endpointRemoved records a removal stage. An endpoint that left its slice without being seen
// terminating is tracked only when it belongs to a local pod known to be deleting: then the
// removal is also its endpointslice stage. Other removals (a Service deleted, a selector changed)
// are not terminations.
func (c *Collector) endpointRemoved(o probes.Observation) {
	if o.Pod.UID == "" {
		c.dataplaneRemoved(o)
		return
	}
	r := c.record(o, false)
	if r == nil {
		t := c.pods[o.Pod.UID]
		if !o.Local || o.Stage != probes.StageEndpointSliceRemoved || t == nil || t.t0.IsZero() {
			return
		}
		slice := o
		slice.Stage = probes.StageEndpointSlice
		if r = c.record(slice, true); r == nil {
			return
		}
		c.addStage(r, slice)
	}
	c.addStage(r, o)
}

// addStage keeps the first observation of each (stage, source, path) and samples what can be
// sampled.
func (c *Collector) addStage(r *record, o probes.Observation) {
	for _, e := range r.stages {
		if e.stage == o.Stage && e.source == o.Source && e.path == o.Path {
			return
		}
	}
	e := stageEntry{stage: o.Stage, source: o.Source, kind: o.SourceKind, path: o.Path, at: o.Time, precision: o.Precision, initial: o.Initial, relist: o.Relist, slice: o.Slice}
	if o.Stage.Dataplane() {
		for _, a := range r.awaits {
			if a.stage == o.Stage && a.path == o.Path && r.heldAtStart(a) {
				e.fallback = true
			}
		}
	}
	r.stages = append(r.stages, e)
	c.log.Debug("stage", "stage", o.Stage, "path", o.Path, "source", o.Source, "pod", r.pod, "service", r.key.service, "endpoint", r.key.endpoint,
		"initial", o.Initial, "relist", o.Relist, "fallback", e.fallback)
	c.sample(r)
	if o.Stage == probes.StageIngress {
		c.pendingChanged()
	}
}

// arrived tells whether a was seen: its stage on its path, and at its source when it names one.
func (r *record) arrived(a await) bool {
	for _, e := range r.stages {
		if e.stage == a.stage && e.path == a.path && (a.source == "" || e.source == a.source) {
			return true
		}
	}
	return false
}

// stage returns the first entry of stage s, or nil.
func (r *record) stage(s probes.Stage) *stageEntry {
	for i := range r.stages {
		if r.stages[i].stage == s {
			return &r.stages[i]
		}
	}
	return nil
}

// pendingStages are the stages r still waits for. Records of endpoints that were never seen
// terminating wait for nothing; a routing stage is pending only on a path or at an instance that
// reached the endpoint, not while kube-proxy holds it back on purpose (KEP-1669), and not while
// its probe is inactive.
func (c *Collector) pendingStages(r *record) []probes.Stage {
	out, _ := c.pending(r)
	return out
}

// pending returns the stages r waits for and, for each, since when: the slice change, or the
// end of the fallback that held it.
func (c *Collector) pending(r *record) ([]probes.Stage, []time.Time) {
	slice := r.stage(probes.StageEndpointSlice)
	if slice == nil {
		return nil, nil
	}
	var (
		out   []probes.Stage
		since []time.Time
	)
	add := func(s probes.Stage, t time.Time) {
		if i := slices.Index(out, s); i >= 0 {
			since[i] = minTime(since[i], t)
			return
		}
		out, since = append(out, s), append(since, t)
	}
	for _, s := range c.opts.Stages {
		if c.status[c.opts.StageProbe[s]].Inactive {
			continue
		}
		if !s.Routing() {
			if r.stage(s) == nil {
				add(s, slice.at)
			}
			continue
		}
		if s.Dataplane() && r.notProxied {
			continue
		}
		if slices.Contains(r.undetermined, s) {
			add(s, slice.at)
		}
		for _, a := range r.awaits {
			if a.stage != s || r.arrived(a) {
				continue
			}
			ended, held := r.heldSince(a)
			switch {
			case !held:
				add(s, slice.at)
			case !ended.IsZero():
				add(s, ended)
			}
		}
	}
	return out, since
}

func minTime(a, b time.Time) time.Time {
	if b.Before(a) {
		return b
	}
	return a
}
