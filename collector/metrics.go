package collector

import (
	"errors"
	"runtime"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/endpointlag/endpointlag/probes"
)

const namespace = "endpointlag"

// LagBuckets are fine at the low end, where dataplane programming lands, and exact at the values
// people set preStop and terminationGracePeriodSeconds to.
var LagBuckets = []float64{
	0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75,
	1, 2, 3, 5, 10, 15, 20, 30, 45, 60, 90, 120, 300,
}

type metrics struct {
	c           *Collector
	propagation *prometheus.HistogramVec
	programming *prometheus.HistogramVec
	// lastConnection is T0 → the last new connection that reached a pod of this node.
	lastConnection prometheus.Histogram
	// unsampled counts the stages kept out of the histograms, by reason.
	unsampled *prometheus.CounterVec
	// dropped counts the records and pod timelines not started, by reason (budget.go).
	dropped        *prometheus.CounterVec
	orphansDropped prometheus.Counter
	expired        *prometheus.CounterVec
	probeUp        *prometheus.GaugeVec
	probeErrors    *prometheus.CounterVec

	pendingDesc   *prometheus.Desc
	oldestDesc    *prometheus.Desc
	trackedDesc   *prometheus.Desc
	untrustedDesc *prometheus.Desc
	podsDesc      *prometheus.Desc
	activeDesc    *prometheus.Desc
}

func newMetrics(c *Collector) *metrics {
	return &metrics{
		c: c,
		propagation: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: namespace,
			Name:      "propagation_seconds",
			Help:      "Time from a pod's deletion (T0) to the removal of its endpoint at each stage (for dataplane stages per path: cluster or external; for the ingress stage per proxy kind, source); pods on this node only.",
			Buckets:   LagBuckets,
		}, []string{"stage", "path", "source"}),
		programming: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: namespace,
			Name:      "programming_seconds",
			Help:      "Time from this node seeing an endpoint turn terminating in its EndpointSlice to its removal at each stage (for dataplane stages per path: cluster or external; for the ingress stage per proxy kind, source).",
			Buckets:   LagBuckets,
		}, []string{"stage", "path", "source"}),
		lastConnection: prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: namespace,
			Name:      "last_connection_seconds",
			Help:      "Time from a pod's deletion (T0) to the last new client connection (TCP SYN, new UDP flow to a port it serves, not from this node's own addresses) that still reached it, read exactly from the packets probe's map when the pod is gone; 0 when none did. Pods on this node, while the packets probe runs.",
			Buckets:   LagBuckets,
		}),
		unsampled: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace,
			Name:      "unsampled_total",
			Help:      "Stages seen but kept out of the lag histograms: reason=relist (first seen on a re-read after a gap, known only to within it; stage=deleted or gone: a pod whose deletion or removal a relist showed first, none of whose propagation lags is sampled), reason=fallback (a dataplane removal kube-proxy held back on purpose while no ready endpoint was left, KEP-1669).",
		}, []string{"stage", "path", "reason"}),
		dropped: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace,
			Name:      "records_dropped_total",
			Help:      "Terminating endpoints and pods not tracked, by reason: max (trusted records, or deleting pods, filled --record.max), untrusted (records of slices no trusted controller manages filled --record.max-untrusted), namespace (the namespace held --record.max-per-namespace records).",
		}, []string{"reason"}),
		orphansDropped: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: namespace,
			Name:      "orphans_dropped_total",
			Help:      "Dataplane removals seen before their endpoint's slice change that were dropped because too many waited for their record.",
		}),
		expired: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace,
			Name:      "records_expired_total",
			Help:      "Records removed after the horizon; outcome=incomplete had stages still pending.",
		}, []string{"outcome"}),
		probeUp: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: namespace,
			Name:      "probe_up",
			Help:      "1 while the probe can read its source.",
		}, []string{"probe"}),
		probeErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace,
			Name:      "probe_errors_total",
			Help:      "Probe failures by reason: source (reading the source failed) or the kind of invalid input skipped.",
		}, []string{"probe", "reason"}),
		pendingDesc: prometheus.NewDesc(namespace+"_pending_endpoints",
			"Terminating endpoints not yet removed at the stage.", []string{"stage"}, nil),
		oldestDesc: prometheus.NewDesc(namespace+"_oldest_pending_seconds",
			"Age of the oldest terminating endpoint not yet removed at the stage, since this node saw it terminate.", []string{"stage"}, nil),
		trackedDesc: prometheus.NewDesc(namespace+"_tracked_records",
			"Terminating endpoint records held in memory.", nil, nil),
		untrustedDesc: prometheus.NewDesc(namespace+"_untrusted_records",
			"Of those, the records started by slices no trusted controller manages (held within --record.max-untrusted).", nil, nil),
		podsDesc: prometheus.NewDesc(namespace+"_tracked_pods",
			"Deleting pods of this node held in memory.", nil, nil),
		activeDesc: prometheus.NewDesc(namespace+"_probe_active",
			"1 while the probe's source exists on this node and its stages are awaited (a dataplane probe: the node runs kube-proxy in its mode); 0 while inactive or failed.", []string{"probe"}, nil),
	}
}

func (m *metrics) register(reg prometheus.Registerer) error {
	// Both outcomes are exported from the start, at 0: a series born at 1 on the first expiry
	// would be invisible to increase(), and so to the alert on incomplete records.
	for _, outcome := range []string{"complete", "incomplete"} {
		m.expired.WithLabelValues(outcome)
	}
	for _, reason := range dropReasons {
		m.dropped.WithLabelValues(reason)
	}
	return errors.Join(
		reg.Register(m.propagation),
		reg.Register(m.programming),
		reg.Register(m.lastConnection),
		reg.Register(m.unsampled),
		reg.Register(m.dropped),
		reg.Register(m.orphansDropped),
		reg.Register(m.expired),
		reg.Register(m.probeUp),
		reg.Register(m.probeErrors),
		reg.Register(m),
	)
}

// Describe implements prometheus.Collector for the values read from the store at scrape time.
func (m *metrics) Describe(ch chan<- *prometheus.Desc) {
	ch <- m.pendingDesc
	ch <- m.oldestDesc
	ch <- m.trackedDesc
	ch <- m.untrustedDesc
	ch <- m.podsDesc
	ch <- m.activeDesc
}

// Collect implements prometheus.Collector.
func (m *metrics) Collect(ch chan<- prometheus.Metric) {
	c := m.c
	c.mu.Lock()
	now := c.clock.Now()
	pending := make(map[probes.Stage]int, len(c.opts.Stages))
	oldest := make(map[probes.Stage]float64, len(c.opts.Stages))
	for _, r := range c.records {
		stages, since := c.pending(r)
		for i, s := range stages {
			pending[s]++
			oldest[s] = max(oldest[s], now.Sub(since[i]).Seconds(), 0)
		}
	}
	records, untrusted, pods := len(c.records), c.budgets.untrusted, len(c.pods)
	var awaited []probes.Stage
	for _, s := range c.opts.Stages {
		if !c.status[c.opts.StageProbe[s]].Inactive {
			awaited = append(awaited, s)
		}
	}
	active := make(map[string]bool, len(c.status))
	for p, st := range c.status {
		_, failed := c.failed[p]
		active[p] = !st.Inactive && !failed
	}
	c.mu.Unlock()

	for p, a := range active {
		ch <- prometheus.MustNewConstMetric(m.activeDesc, prometheus.GaugeValue, boolFloat(a), p)
	}

	for _, s := range awaited {
		ch <- prometheus.MustNewConstMetric(m.pendingDesc, prometheus.GaugeValue, float64(pending[s]), string(s))
		ch <- prometheus.MustNewConstMetric(m.oldestDesc, prometheus.GaugeValue, oldest[s], string(s))
	}
	ch <- prometheus.MustNewConstMetric(m.trackedDesc, prometheus.GaugeValue, float64(records))
	ch <- prometheus.MustNewConstMetric(m.untrustedDesc, prometheus.GaugeValue, float64(untrusted))
	ch <- prometheus.MustNewConstMetric(m.podsDesc, prometheus.GaugeValue, float64(pods))
}

// RegisterBuildInfo registers endpointlag_build_info, a constant 1 labelled with what was built.
func RegisterBuildInfo(reg prometheus.Registerer, version, revision string) error {
	g := prometheus.NewGauge(prometheus.GaugeOpts{
		Namespace:   namespace,
		Name:        "build_info",
		Help:        "A constant 1 labelled with the version, revision and Go version endpointlag was built from.",
		ConstLabels: prometheus.Labels{"version": version, "revision": revision, "goversion": runtime.Version()},
	})
	g.Set(1)
	return reg.Register(g)
}
