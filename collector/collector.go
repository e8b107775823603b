// Package collector is the timeline store. It joins the probes' observations into one record per
// terminating endpoint (pod UID, Service, IP, port, protocol), computes the lags against the two
// references of docs/architecture.md, owns every metric, and expires records after a horizon.
//
// The references:
//   - programming: stage time − the moment this node saw the endpoint turn terminating in its
//     EndpointSlice. Known on every node.
//   - propagation: stage time − T0, the moment the pod got its deletionTimestamp. Known only for pods
//     on this node, whose deletion this daemon watches.
//
// A stage seen before its reference is kept and sampled once the reference arrives. Observations a
// probe made while listing its source at start-up (Observation.Initial) say where an endpoint was,
// not when it got there, and those first seen on a re-read after a gap (Observation.Relist) only
// roughly when: both are kept in the timeline but never sampled or used as a reference.
//
// The files split the work: records.go starts records and says what each awaits (a dataplane
// stage only where this node's rules reached the endpoint), budget.go keeps them within their
// caps (trusted, untrusted, per namespace), join.go joins dataplane removals to records (and
// keeps early ones as orphans), sample.go turns stages into histogram samples, expire.go sweeps
// records past the horizon, localpods.go serves the packets probe.
package collector

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"k8s.io/utils/clock"

	"github.com/endpointlag/endpointlag/probes"
)

// Options configure a Collector.
type Options struct {
	// Horizon is how long a record is kept after it was created.
	Horizon time.Duration
	// MaxRecords caps the endpoint records trusted observations started, and separately the pod
	// timelines, held at once.
	MaxRecords int
	// MaxUntrustedRecords caps, apart from MaxRecords, the records started by observations of
	// slices no trusted controller manages (probes.Observation.Untrusted), and the pod timelines
	// those start: they never take a place trusted records or pods may use. 0 means
	// DefaultMaxUntrustedRecords.
	MaxUntrustedRecords int
	// MaxRecordsPerNamespace caps the records (trusted or not) of one namespace held at once, so
	// that one namespace's burst cannot starve the others; 0: no cap.
	MaxRecordsPerNamespace int
	// SweepInterval is how often expired records are removed.
	SweepInterval time.Duration
	// Stages are the removal stages the enabled probes report after `endpointslice`; a record is
	// pending at each until it is seen there.
	Stages []probes.Stage
	// Probes are the enabled probes; the collector is ready once each has synced (or, except
	// for the probes of RequiredProbes, failed).
	Probes []string
	// RequiredProbes must have synced for the collector to be ready; the others may have failed
	// instead.
	RequiredProbes []string
	// StageProbe names the probe that reports each stage of Stages; a stage is not awaited
	// while its probe reports itself inactive.
	StageProbe map[probes.Stage]string
}

// DefaultMaxUntrustedRecords is MaxUntrustedRecords when it is 0.
const DefaultMaxUntrustedRecords = 1000

// Validate reports the first option that is out of range.
func (o Options) Validate() error {
	switch {
	case o.Horizon <= 0:
		return fmt.Errorf("record horizon must be positive, got %s", o.Horizon)
	case o.MaxRecords <= 0:
		return fmt.Errorf("max records must be positive, got %d", o.MaxRecords)
	case o.MaxUntrustedRecords < 0:
		return fmt.Errorf("max untrusted records must not be negative, got %d", o.MaxUntrustedRecords)
	case o.MaxRecordsPerNamespace < 0:
		return fmt.Errorf("max records per namespace must not be negative (0: no cap), got %d", o.MaxRecordsPerNamespace)
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
	// swept is when the sweep loop last ran (Unix nanoseconds): Healthy checks it moves on.
	swept atomic.Int64

	mu      sync.Mutex
	records map[recordKey]*record
	// budgets count the records (and pod timelines) against MaxRecords, MaxUntrustedRecords and
	// MaxRecordsPerNamespace.
	budgets budgets
	pods    map[string]*podTimeline
	// queue holds records and pod timelines in creation order, for expiry.
	queue []queued
	// lastID numbers the records as they start (Digest.ID).
	lastID uint64
	// rev moves on with every change that may change a record's digest (an observation, a
	// probe's status; an expiry changes no record it leaves): digests counted at the same rev
	// are still right.
	rev uint64
	// peak is the largest size of records since the map was last rebuilt; Go maps never shrink,
	// so the sweep rebuilds it once it has emptied to a quarter of that.
	peak int
	// byEndpoint finds the records of an endpoint, for dataplane observations, which do not
	// know the pod (and, for iptables rules without comments, not the Service either).
	byEndpoint map[probes.Endpoint][]recordKey
	orphans    orphans
	// dataplanes answer, per dataplane stage, whether this node's rules reach an endpoint.
	dataplanes map[probes.Stage]probes.Dataplane
	// undetermined are the records whose dataplane stage's probe had not read its rules yet when
	// they started, per stage.
	undetermined map[probes.Stage]map[recordKey]bool
	status       map[string]probes.Status
	// failed are the probes that stopped with an error (and are retried), with why.
	failed map[string]error
	// byAddr finds a local deleting pod by address, for connection observations; liveAddrs are
	// the addresses live pods of this node hold, which no deleting pod's entry may claim.
	byAddr        map[netip.Addr]string
	liveAddrs     map[netip.Addr]string
	livePods      map[string][]netip.Addr
	localWatchers []chan<- struct{}
	// pendingWatchers are told when what a source still owes may have changed.
	pendingWatchers []chan<- struct{}
}

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

// New returns a collector registering its metrics with reg.
func New(opts Options, clk clock.WithTicker, log *slog.Logger, reg prometheus.Registerer) (*Collector, error) {
	if err := opts.Validate(); err != nil {
		return nil, err
	}
	if opts.MaxUntrustedRecords == 0 {
		opts.MaxUntrustedRecords = DefaultMaxUntrustedRecords
	}
	c := &Collector{
		opts:         opts,
		clock:        clk,
		log:          log,
		records:      map[recordKey]*record{},
		budgets:      budgets{byNamespace: map[string]int{}},
		pods:         map[string]*podTimeline{},
		byEndpoint:   map[probes.Endpoint][]recordKey{},
		orphans:      newOrphans(),
		dataplanes:   map[probes.Stage]probes.Dataplane{},
		undetermined: map[probes.Stage]map[recordKey]bool{},
		status:       map[string]probes.Status{},
		failed:       map[string]error{},
		byAddr:       map[netip.Addr]string{},
		liveAddrs:    map[netip.Addr]string{},
		livePods:     map[string][]netip.Addr{},
	}
	c.swept.Store(clk.Now().UnixNano())
	c.m = newMetrics(c)
	if err := c.m.register(reg); err != nil {
		return nil, err
	}
	for _, p := range opts.Probes {
		c.status[p] = probes.Status{}
		c.m.probeUp.WithLabelValues(p).Set(0)
		// Counters start at 0, so that the first failure or unsampled stage is an increase
		// Prometheus sees and a dashboard shows a healthy 0 rather than nothing.
		c.m.probeErrors.WithLabelValues(p, "source")
	}
	for _, st := range opts.Stages {
		if st.Dataplane() {
			for _, path := range []probes.Path{probes.PathCluster, probes.PathExternal} {
				c.m.unsampled.WithLabelValues(string(st), string(path), "fallback")
				c.m.unsampled.WithLabelValues(string(st), string(path), "relist")
			}
		} else if st == probes.StageEndpointSliceRemoved {
			c.m.unsampled.WithLabelValues(string(st), "", "relist")
		}
	}
	for _, st := range []probes.Stage{probes.StageDeleted, probes.StageGone} {
		c.m.unsampled.WithLabelValues(string(st), "", "relist")
	}
	return c, nil
}

// SetDataplane gives the collector the probe of a dataplane stage, to ask what this node's rules
// reach when an endpoint starts terminating. Call it before observations arrive.
func (c *Collector) SetDataplane(stage probes.Stage, dp probes.Dataplane) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.dataplanes[stage] = dp
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

// Healthy reports whether the sweep loop ran within three sweep intervals: a collector whose lock
// is wedged, or whose loop stopped, is not making progress.
func (c *Collector) Healthy() error {
	last := time.Unix(0, c.swept.Load())
	if late := c.clock.Since(last); late > 3*c.opts.SweepInterval {
		return fmt.Errorf("the collector last swept its records %s ago (every %s expected)", late.Round(time.Second), c.opts.SweepInterval)
	}
	return nil
}

// Observe joins one observation into its record.
func (c *Collector) Observe(o probes.Observation) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.rev++
	switch o.Stage {
	case probes.StageDeleted:
		c.podDeleted(o)
	case probes.StageGone:
		c.podGone(o)
	case probes.StagePodAddresses:
		c.podAddresses(o)
	case probes.StageLateConnection, probes.StageDeadConnection:
		c.connection(o)
	case probes.StageLastConnection:
		c.lastConnection(o)
	case probes.StageEndpointSlice:
		if r := c.record(o, true); r != nil {
			c.addStage(r, o)
		}
	case probes.StageFallbackEnded:
		c.fallbackEnded(o)
	default:
		c.endpointRemoved(o)
	}
}

// SetStatus records a probe's health.
func (c *Collector) SetStatus(probe string, s probes.Status) {
	c.mu.Lock()
	defer c.mu.Unlock()
	prev, had := c.status[probe]
	s.Synced = s.Synced || prev.Synced
	if s != prev {
		c.rev++
	}
	c.status[probe] = s
	if s.Up {
		delete(c.failed, probe)
	}
	if had && prev.Inactive != s.Inactive && s.Synced {
		c.log.Info("probe activity changed", "probe", probe, "active", !s.Inactive)
	}
	c.m.probeUp.WithLabelValues(probe).Set(boolFloat(s.Up))
	if s.Synced && c.resolveUndetermined(probe, s) {
		c.rev++
	}
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

// Failed records that a probe stopped with err and will be retried: it counts as settled for
// readiness (unless required) and as down until it reports itself up again.
func (c *Collector) Failed(probe string, err error) {
	c.Error(probe, err)
	c.mu.Lock()
	defer c.mu.Unlock()
	c.failed[probe] = err
}

// Ready reports whether every enabled probe has synced (or, for those not required, failed), and
// names those it waits for.
func (c *Collector) Ready() (bool, []string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	var waiting []string
	for p, s := range c.status {
		if s.Synced {
			continue
		}
		if _, failed := c.failed[p]; failed && !c.required(p) {
			continue
		}
		waiting = append(waiting, p)
	}
	sort.Strings(waiting)
	return len(waiting) == 0, waiting
}

func (c *Collector) required(probe string) bool {
	for _, p := range c.opts.RequiredProbes {
		if p == probe {
			return true
		}
	}
	return false
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
