package aggregate

import (
	"errors"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/endpointlag/endpointlag/collector"
)

type metrics struct {
	a                *Aggregator
	convergence      *prometheus.HistogramVec
	pods             *prometheus.CounterVec
	reports          prometheus.Counter
	late             prometheus.Counter
	evicted          prometheus.Counter
	workloadsDropped prometheus.Counter
}

func newMetrics(a *Aggregator) *metrics {
	return &metrics{
		a: a,
		convergence: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: "endpointlag", Name: "convergence_seconds",
			Help:    "Time from a pod's deletion (T0) to the moment the last node or proxy reached each stage (stage=all: the last routing stage of any, the last to stop sending the pod new connections), composed without comparing clocks across nodes.",
			Buckets: collector.LagBuckets,
		}, []string{"stage"}),
		pods: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "endpointlag", Name: "convergence_pods_total",
			Help: "Terminating pods whose figure became final (outcome=complete: every live daemon reported it; missing_nodes: some had not by the settle time; no_home: the pod's node never did, so there is no T0 and no figure).",
		}, []string{"outcome"}),
		reports: prometheus.NewCounter(prometheus.CounterOpts{Namespace: "endpointlag", Name: "aggregate_records_total",
			Help: "Records the daemons pushed."}),
		late: prometheus.NewCounter(prometheus.CounterOpts{Namespace: "endpointlag", Name: "aggregate_records_late_total",
			Help: "Records pushed after their pod's figure was final (raise --settle when it grows); they are not counted in it."}),
		evicted: prometheus.NewCounter(prometheus.CounterOpts{Namespace: "endpointlag", Name: "aggregate_pods_evicted_total",
			Help: "Pods dropped from the aggregator's state to keep it within --max-pods (made final first)."}),
		workloadsDropped: prometheus.NewCounter(prometheus.CounterOpts{Namespace: "endpointlag", Name: "workloads_dropped_total",
			Help: "Terminations of workloads beyond --max-workloads, left out of the per-workload figures (they are in endpointlag_convergence_seconds)."}),
	}
}

func (m *metrics) register(reg prometheus.Registerer) error {
	var errs []error
	for _, c := range []prometheus.Collector{m.convergence, m.pods, m.reports, m.late, m.evicted, m.workloadsDropped, (*state)(m.a)} {
		errs = append(errs, reg.Register(c))
	}
	return errors.Join(errs...)
}

// state exports what the aggregator holds, read at scrape time.
type state Aggregator

var (
	heldDesc   = prometheus.NewDesc("endpointlag_aggregate_pods", "Terminating pods the aggregator holds (final=true|false).", []string{"final"}, nil)
	liveDesc   = prometheus.NewDesc("endpointlag_aggregate_daemons", "Daemons heard from (a push or a heartbeat) within --daemon-timeout.", nil, nil)
	eventsDesc = prometheus.NewDesc("endpointlag_events_total",
		"Events on workloads whose terminations outlasted their preStop (outcome=posted|rate_limited: one per workload per --events.interval|dropped: the queue was full|error).", []string{"outcome"}, nil)
	wlLabels = []string{"namespace", "kind", "workload"}
	p99Desc  = prometheus.NewDesc("endpointlag_workload_convergence_p99_seconds",
		"The p99 of the workload's pods' convergence (stage all) over the advisor's window.", wlLabels, nil)
	preStopDesc = prometheus.NewDesc("endpointlag_workload_prestop_seconds",
		"The preStop sleep the workload's pods declare (absent when a hook's length cannot be told).", wlLabels, nil)
	graceDesc = prometheus.NewDesc("endpointlag_workload_grace_period_seconds",
		"The terminationGracePeriodSeconds the workload's pods declare.", wlLabels, nil)
	recDesc = prometheus.NewDesc("endpointlag_workload_recommended_prestop_seconds",
		"The recommended preStop: p99 convergence + 1 s, rounded up to whole seconds.", wlLabels, nil)
	shortDesc = prometheus.NewDesc("endpointlag_workload_prestop_shortfall_seconds",
		"How much longer the recommended preStop is than the declared one (0 when it is long enough).", wlLabels, nil)
	termsDesc = prometheus.NewDesc("endpointlag_workload_terminations_total",
		"The workload's terminations with a final figure.", wlLabels, nil)
	afterDesc = prometheus.NewDesc("endpointlag_workload_terminations_after_prestop_total",
		"Terminations a stage or a new client connection reached after the declared preStop had ended.", wlLabels, nil)
	wlConnsDesc = prometheus.NewDesc("endpointlag_workload_connections_total",
		"New client connections that reached the workload's terminating pods (type=late) or their addresses once gone (type=dead).", append(wlLabels, "type"), nil)
)

// Describe implements prometheus.Collector.
func (s *state) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{heldDesc, liveDesc, eventsDesc, p99Desc, preStopDesc, graceDesc, recDesc, shortDesc, termsDesc, afterDesc, wlConnsDesc} {
		ch <- d
	}
}

// Collect implements prometheus.Collector.
func (s *state) Collect(ch chan<- prometheus.Metric) {
	a := (*Aggregator)(s)
	a.mu.Lock()
	final := 0
	for _, p := range a.pods {
		if p.final {
			final++
		}
	}
	held, live := len(a.pods), len(a.live(a.clock.Now()))
	a.mu.Unlock()
	ch <- prometheus.MustNewConstMetric(heldDesc, prometheus.GaugeValue, float64(final), "true")
	ch <- prometheus.MustNewConstMetric(heldDesc, prometheus.GaugeValue, float64(held-final), "false")
	ch <- prometheus.MustNewConstMetric(liveDesc, prometheus.GaugeValue, float64(live))
	if a.events != nil {
		for outcome, n := range a.events.counts() {
			ch <- prometheus.MustNewConstMetric(eventsDesc, prometheus.CounterValue, float64(n), outcome)
		}
	}
	for _, ad := range a.Advise() {
		l := []string{ad.Namespace, ad.Workload.Kind, ad.Workload.Name}
		gauge := func(d *prometheus.Desc, v *float64) {
			if v != nil {
				ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, *v, l...)
			}
		}
		gauge(p99Desc, ad.P99)
		gauge(recDesc, ad.Recommended)
		gauge(shortDesc, ad.Shortfall)
		if d := ad.Declared; d != nil {
			if d.PreStopKnown {
				gauge(preStopDesc, &d.PreStopSeconds)
			}
			gauge(graceDesc, &d.GraceSeconds)
		}
		ch <- prometheus.MustNewConstMetric(termsDesc, prometheus.CounterValue, float64(ad.Terminations), l...)
		ch <- prometheus.MustNewConstMetric(afterDesc, prometheus.CounterValue, float64(ad.AfterPreStop), l...)
		ch <- prometheus.MustNewConstMetric(wlConnsDesc, prometheus.CounterValue, float64(ad.Late), append(l, "late")...)
		ch <- prometheus.MustNewConstMetric(wlConnsDesc, prometheus.CounterValue, float64(ad.Dead), append(l, "dead")...)
	}
}
