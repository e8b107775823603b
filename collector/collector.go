// Package collector is the timeline store. It joins the probes' observations into one record per
// terminating endpoint (pod UID, Service, IP, port, protocol), computes the lags against the two
// references of DESIGN.md, owns every metric, and expires records after a horizon.
//
// The references:
//   - programming: stage time − the moment this node saw the endpoint turn terminating in its
//     EndpointSlice. Known on every node.
//   - propagation: stage time − T0, the moment the pod got its deletionTimestamp. Known only for pods
//     on this node, whose deletion this daemon watches.
//
// A stage seen before its reference is kept and sampled once the reference arrives. Observations a
// probe made while listing its source at start-up (Observation.Initial) say where an endpoint was,
// not when it got there: they are kept in the timeline but never sampled or used as a reference.
package collector

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"sort"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"k8s.io/utils/clock"

	"github.com/endpointlag/endpointlag/probes"
)

// Options configure a Collector.
type Options struct {
	// Horizon is how long a record is kept after it was created.
	Horizon time.Duration
	// MaxRecords caps the endpoint records, and separately the pod timelines, held at once.
	MaxRecords int
	// SweepInterval is how often expired records are removed.
	SweepInterval time.Duration
	// Stages are the removal stages the enabled probes report after `endpointslice`; a record is
	// pending at each until it is seen there.
	Stages []probes.Stage
	// Probes are the enabled probes; the collector is ready once each has synced.
	Probes []string
	// StageProbe names the probe that reports each stage of Stages; a stage is not awaited
	// while its probe reports itself inactive.
	StageProbe map[probes.Stage]string
}

// Validate reports the first option that is out of range.
func (o Options) Validate() error {
	switch {
	case o.Horizon <= 0:
		return fmt.Errorf("record horizon must be positive, got %s", o.Horizon)
	case o.MaxRecords <= 0:
		return fmt.Errorf("max records must be positive, got %d", o.MaxRecords)
	case o.SweepInterval <= 0:
		return fmt.Errorf("sweep interval must be positive, got %s", o.SweepInterval)
	}
	return nil
}

// Collector implements probes.Sink.
type Collector struct {
	opts  Options
	clock clock.WithTicker
	log   *slog.Logger
	m     *metrics

	mu      sync.Mutex
	records map[recordKey]*record
	pods    map[string]*podTimeline
	// queue holds records and pod timelines in creation order, for expiry.
	queue []queued
	// peak is the largest size of records since the map was last rebuilt; Go maps never shrink,
	// so the sweep rebuilds it once it has emptied to a quarter of that.
	peak int
	// byEndpoint finds the records of an endpoint, for dataplane observations, which do not
	// know the pod (and, for iptables rules without comments, not the Service either).
	byEndpoint map[probes.Endpoint][]recordKey
	// orphans are dataplane removals seen before this node saw the endpoint terminate (kube-proxy
	// can be faster than this daemon's watch); a record created soon after adopts them.
	orphans []probes.Observation
	status  map[string]probes.Status
	// byAddr finds a local deleting pod by address, for connection observations.
	byAddr        map[netip.Addr]string
	localWatchers []chan<- struct{}
}

// orphanWindow is how long a dataplane removal waits for its record, and maxOrphans how many wait.
const (
	orphanWindow = 5 * time.Second
	maxOrphans   = 10000
)

type recordKey struct {
	uid      string
	service  probes.ServiceRef
	endpoint probes.Endpoint
}

type queued struct {
	created time.Time
	key     recordKey
	pod     bool // the entry is the pod timeline of key.uid, not a record
}

// record is one terminating endpoint's timeline.
type record struct {
	key   recordKey
	pod   probes.PodRef
	local bool
	// notProxied: kube-proxy does not program the Service, so no dataplane stage is awaited.
	notProxied bool
	created    time.Time
	// timeline is the pod's deletion timeline; nil for pods on other nodes.
	timeline *podTimeline
	stages   []stageEntry
}

type stageEntry struct {
	stage     probes.Stage
	source    string
	at        time.Time
	precision time.Duration
	initial   bool
	// progDone and propDone say the sample against each reference was taken.
	progDone, propDone bool
}

// podTimeline is a local pod's deletion: T0 and gone.
type podTimeline struct {
	pod     probes.PodRef
	created time.Time
	t0      time.Time
	// t0Source is the probe that reported the deletion.
	t0Source string
	// t0Initial: the pod was already terminating when the daemon started, so T0 is unknown.
	t0Initial bool
	t0API     time.Time
	gone      time.Time
	records   []recordKey
	// addrs are the pod's IPs; lastConn is the last new connection that reached the pod and
	// conns the first connections the packets probe reported.
	addrs       []netip.Addr
	lastConn    time.Time
	connSampled bool
	conns       []conn
}

// New returns a collector registering its metrics with reg.
func New(opts Options, clk clock.WithTicker, log *slog.Logger, reg prometheus.Registerer) (*Collector, error) {
	if err := opts.Validate(); err != nil {
		return nil, err
	}
	c := &Collector{
		opts:       opts,
		clock:      clk,
		log:        log,
		records:    map[recordKey]*record{},
		pods:       map[string]*podTimeline{},
		byEndpoint: map[probes.Endpoint][]recordKey{},
		status:     map[string]probes.Status{},
		byAddr:     map[netip.Addr]string{},
	}
	c.m = newMetrics(c)
	if err := c.m.register(reg); err != nil {
		return nil, err
	}
	for _, p := range opts.Probes {
		c.status[p] = probes.Status{}
		c.m.probeUp.WithLabelValues(p).Set(0)
	}
	return c, nil
}

// Run removes expired records every SweepInterval until ctx is done.
func (c *Collector) Run(ctx context.Context) error {
	t := c.clock.NewTicker(c.opts.SweepInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C():
			c.Sweep()
		}
	}
}

// Observe joins one observation into its record.
func (c *Collector) Observe(o probes.Observation) {
	c.mu.Lock()
	defer c.mu.Unlock()
	switch o.Stage {
	case probes.StageDeleted:
		c.podDeleted(o)
	case probes.StageGone:
		c.podGone(o)
	case probes.StageLateConnection, probes.StageDeadConnection:
		c.connection(o)
	case probes.StageEndpointSlice:
		if r := c.record(o, true); r != nil {
			c.addStage(r, o)
			c.adoptOrphans(r, o.Time)
		}
	default:
		c.endpointRemoved(o)
	}
}

// SetStatus records a probe's health.
func (c *Collector) SetStatus(probe string, s probes.Status) {
	c.mu.Lock()
	defer c.mu.Unlock()
	prev := c.status[probe]
	s.Synced = s.Synced || prev.Synced
	c.status[probe] = s
	c.m.probeUp.WithLabelValues(probe).Set(boolFloat(s.Up))
}

// Error counts and logs a probe's failure.
func (c *Collector) Error(probe string, err error) {
	reason := "source"
	var ie *probes.InputError
	if errors.As(err, &ie) {
		reason = ie.Reason
		c.log.Warn("skipped invalid input", "probe", probe, "reason", reason, "err", ie.Err)
	} else {
		c.log.Error("probe failed", "probe", probe, "err", err)
		c.mu.Lock()
		s := c.status[probe]
		s.Up = false
		c.status[probe] = s
		c.mu.Unlock()
		c.m.probeUp.WithLabelValues(probe).Set(0)
	}
	c.m.probeErrors.WithLabelValues(probe, reason).Inc()
}

// Ready reports whether every enabled probe has synced, and names those that have not.
func (c *Collector) Ready() (bool, []string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	var waiting []string
	for p, s := range c.status {
		if !s.Synced {
			waiting = append(waiting, p)
		}
	}
	sort.Strings(waiting)
	return len(waiting) == 0, waiting
}

// record returns the record an endpoint observation belongs to, creating it when create is set.
// It returns nil when the record does not exist (and is not to be created) or the cap is reached.
func (c *Collector) record(o probes.Observation, create bool) *record {
	k := recordKey{uid: o.Pod.UID, service: o.Service, endpoint: o.Endpoint}
	if r, ok := c.records[k]; ok || !create {
		return r
	}
	if len(c.records) >= c.opts.MaxRecords {
		c.m.dropped.Inc()
		return nil
	}
	now := c.clock.Now()
	r := &record{key: k, pod: o.Pod, local: o.Local, notProxied: o.NotProxied, created: now}
	if o.Local {
		r.timeline = c.timeline(o.Pod, now)
		if r.timeline != nil {
			r.timeline.records = append(r.timeline.records, k)
		}
	}
	c.records[k] = r
	c.byEndpoint[k.endpoint] = append(c.byEndpoint[k.endpoint], k)
	c.peak = max(c.peak, len(c.records))
	c.queue = append(c.queue, queued{created: now, key: k})
	return r
}

// timeline returns the local pod's timeline, creating it; nil when the cap is reached.
func (c *Collector) timeline(pod probes.PodRef, now time.Time) *podTimeline {
	if t, ok := c.pods[pod.UID]; ok {
		return t
	}
	if len(c.pods) >= c.opts.MaxRecords {
		c.m.dropped.Inc()
		return nil
	}
	t := &podTimeline{pod: pod, created: now}
	c.pods[pod.UID] = t
	c.queue = append(c.queue, queued{created: now, key: recordKey{uid: pod.UID}, pod: true})
	return t
}

func (c *Collector) podDeleted(o probes.Observation) {
	t := c.timeline(o.Pod, c.clock.Now())
	if t == nil || !t.t0.IsZero() {
		return
	}
	t.t0, t.t0Source, t.t0Initial, t.t0API = o.Time, o.Source, o.Initial, o.APITime
	c.setAddrs(t, o.Addrs)
	c.localChanged()
	// A stage seen before the pod's own event means that event was late: T0 is no later than the
	// earliest stage.
	for _, k := range t.records {
		if r := c.records[k]; r != nil {
			for _, e := range r.stages {
				if !e.initial && e.at.Before(t.t0) {
					t.t0 = e.at
				}
			}
		}
	}
	c.log.Debug("pod deleted", "pod", o.Pod, "uid", o.Pod.UID, "t0", t.t0, "t0_api", t.t0API, "initial", o.Initial)
	for _, k := range t.records {
		if r := c.records[k]; r != nil {
			c.sample(r)
		}
	}
}

func (c *Collector) podGone(o probes.Observation) {
	if t := c.pods[o.Pod.UID]; t != nil && t.gone.IsZero() {
		t.gone = o.Time
		c.setAddrs(t, o.Addrs)
		c.sampleLastConnection(t)
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
		if r = c.record(o, true); r == nil {
			return
		}
		slice := o
		slice.Stage = probes.StageEndpointSlice
		c.addStage(r, slice)
	}
	c.addStage(r, o)
}

// dataplaneRemoved joins a removal that names an endpoint, and its Service when the rules say,
// but not the pod, to the terminating records of that endpoint still waiting for the stage, or
// keeps it as an orphan.
func (c *Collector) dataplaneRemoved(o probes.Observation) {
	joined := false
	for _, k := range c.byEndpoint[o.Endpoint] {
		r := c.records[k]
		if r == nil || !sameService(o.Service, k.service) || r.stage(probes.StageEndpointSlice) == nil || r.stage(o.Stage) != nil {
			continue
		}
		c.addStage(r, o)
		joined = true
	}
	if joined {
		return
	}
	if len(c.orphans) >= maxOrphans {
		c.orphans = c.orphans[1:]
		c.m.dropped.Inc()
	}
	c.orphans = append(c.orphans, o)
}

// sameService matches a dataplane observation's Service to a record's; an observation that
// names none matches every Service.
func sameService(observed, record probes.ServiceRef) bool {
	return observed.Name == "" || observed == record
}

// adoptOrphans gives a record that just turned terminating the dataplane removals of its
// endpoint seen shortly before.
func (c *Collector) adoptOrphans(r *record, at time.Time) {
	kept := c.orphans[:0]
	for _, o := range c.orphans {
		if o.Endpoint == r.key.endpoint && sameService(o.Service, r.key.service) && at.Sub(o.Time) <= orphanWindow && r.stage(o.Stage) == nil {
			c.addStage(r, o)
			continue
		}
		kept = append(kept, o)
	}
	clear(c.orphans[len(kept):])
	c.orphans = kept
}

// addStage keeps the first observation of each (stage, source) and samples what can be sampled.
func (c *Collector) addStage(r *record, o probes.Observation) {
	for _, e := range r.stages {
		if e.stage == o.Stage && e.source == o.Source {
			return
		}
	}
	r.stages = append(r.stages, stageEntry{stage: o.Stage, source: o.Source, at: o.Time, precision: o.Precision, initial: o.Initial})
	c.log.Debug("stage", "stage", o.Stage, "pod", r.pod, "service", r.key.service, "endpoint", r.key.endpoint, "initial", o.Initial)
	c.sample(r)
}

// sample observes every lag of r whose stage and reference are both known and live.
func (c *Collector) sample(r *record) {
	progRef, hasProg := r.programmingRef()
	t0, hasT0 := r.t0()
	for i := range r.stages {
		e := &r.stages[i]
		if e.initial {
			continue
		}
		if hasProg && !e.progDone && e.stage != probes.StageEndpointSlice {
			c.m.programming.WithLabelValues(string(e.stage)).Observe(lag(e.at, progRef))
			e.progDone = true
		}
		if hasT0 && !e.propDone {
			c.m.propagation.WithLabelValues(string(e.stage)).Observe(lag(e.at, t0))
			e.propDone = true
		}
	}
}

// programmingRef is the time this node saw the endpoint turn terminating, when seen live.
func (r *record) programmingRef() (time.Time, bool) {
	e := r.stage(probes.StageEndpointSlice)
	if e == nil || e.initial {
		return time.Time{}, false
	}
	return e.at, true
}

func (r *record) t0() (time.Time, bool) {
	t := r.timeline
	if t == nil || t.t0.IsZero() || t.t0Initial {
		return time.Time{}, false
	}
	return t.t0, true
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

// lag is a non-negative duration in seconds. Observations of one change by two watch streams can
// arrive in either order; a stage seen before its reference counts as no lag.
func lag(at, ref time.Time) float64 {
	return max(at.Sub(ref).Seconds(), 0)
}

// Sweep removes records and pod timelines older than the horizon.
func (c *Collector) Sweep() {
	c.mu.Lock()
	defer c.mu.Unlock()
	cutoff := c.clock.Now().Add(-c.opts.Horizon)
	n := 0
	for n < len(c.queue) && !c.queue[n].created.After(cutoff) {
		q := c.queue[n]
		n++
		if q.pod {
			if t := c.pods[q.key.uid]; t != nil {
				c.sampleLastConnection(t)
				c.dropAddrs(t)
				c.localChanged()
			}
			delete(c.pods, q.key.uid)
			continue
		}
		if r := c.records[q.key]; r != nil {
			outcome := "complete"
			if len(c.pendingStages(r)) > 0 {
				outcome = "incomplete"
			}
			c.m.expired.WithLabelValues(outcome).Inc()
			delete(c.records, q.key)
			c.unindex(q.key)
		}
	}
	c.expireOrphans()
	if n == 0 {
		return
	}
	c.queue = append([]queued(nil), c.queue[n:]...)
	if len(c.byEndpoint) == 0 {
		c.byEndpoint = map[probes.Endpoint][]recordKey{}
	}
	if len(c.records) <= c.peak/4 {
		fresh := make(map[recordKey]*record, len(c.records))
		for k, r := range c.records {
			fresh[k] = r
		}
		c.records, c.peak = fresh, len(fresh)
		pods := make(map[string]*podTimeline, len(c.pods))
		for k, t := range c.pods {
			pods[k] = t
		}
		c.pods = pods
	}
}

func (c *Collector) unindex(k recordKey) {
	keys := c.byEndpoint[k.endpoint]
	for i, x := range keys {
		if x == k {
			keys = append(keys[:i], keys[i+1:]...)
			break
		}
	}
	if len(keys) == 0 {
		delete(c.byEndpoint, k.endpoint)
	} else {
		c.byEndpoint[k.endpoint] = keys
	}
}

func (c *Collector) expireOrphans() {
	cutoff := c.clock.Now().Add(-orphanWindow)
	n := 0
	for n < len(c.orphans) && c.orphans[n].Time.Before(cutoff) {
		n++
	}
	if n > 0 {
		c.orphans = append([]probes.Observation(nil), c.orphans[n:]...)
	}
}

// pendingStages are the stages r still waits for. Records of endpoints that were never seen
// terminating wait for nothing.
func (c *Collector) pendingStages(r *record) []probes.Stage {
	if r.stage(probes.StageEndpointSlice) == nil {
		return nil
	}
	var out []probes.Stage
	for _, s := range c.opts.Stages {
		if s.Dataplane() && r.notProxied || c.status[c.opts.StageProbe[s]].Inactive {
			continue
		}
		if r.stage(s) == nil {
			out = append(out, s)
		}
	}
	return out
}

// Summary is what the collector holds, for the log line at shutdown.
type Summary struct {
	Records int
	Pods    int
	Pending map[probes.Stage]int
}

// Summary counts the records held and those still pending per stage.
func (c *Collector) Summary() Summary {
	c.mu.Lock()
	defer c.mu.Unlock()
	s := Summary{Records: len(c.records), Pods: len(c.pods), Pending: map[probes.Stage]int{}}
	for _, r := range c.records {
		for _, st := range c.pendingStages(r) {
			s.Pending[st]++
		}
	}
	return s
}

func boolFloat(b bool) float64 {
	if b {
		return 1
	}
	return 0
}
