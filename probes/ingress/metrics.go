package ingress

import (
	"github.com/prometheus/client_golang/prometheus"
)

var (
	instancesDesc = prometheus.NewDesc("endpointlag_ingress_instances",
		"Proxy instances the ingress probe reads on this node, by kind; up=\"false\" for those whose last read failed.",
		[]string{"kind", "up"}, nil)
	readsDesc = prometheus.NewDesc("endpointlag_ingress_reads_total",
		"Reads of proxy instances by kind: query=\"full\" (every backend) or \"targeted\" (only the backends holding owed endpoints).",
		[]string{"kind", "query"}, nil)
)

// Collector exports what the probe reads: instances by kind and reads by kind and query.
func (p *Probe) Collector() prometheus.Collector { return (*metrics)(p) }

type metrics Probe

func (m *metrics) Describe(ch chan<- *prometheus.Desc) {
	ch <- instancesDesc
	ch <- readsDesc
}

func (m *metrics) Collect(ch chan<- prometheus.Metric) {
	p := (*Probe)(m)
	type key struct {
		kind string
		up   bool
	}
	count := map[key]int{}
	p.mu.Lock()
	ins := make([]*instance, 0, len(p.instances))
	for _, in := range p.instances {
		ins = append(ins, in)
	}
	reads := make(map[readKey]uint64, len(p.reads))
	for k, n := range p.reads {
		reads[k] = n
	}
	p.mu.Unlock()
	for _, in := range ins {
		in.mu.Lock()
		count[key{in.kind.Name, !in.down}]++
		in.mu.Unlock()
	}
	for k, n := range count {
		up := "true"
		if !k.up {
			up = "false"
		}
		ch <- prometheus.MustNewConstMetric(instancesDesc, prometheus.GaugeValue, float64(n), k.kind, up)
	}
	for k, n := range reads {
		ch <- prometheus.MustNewConstMetric(readsDesc, prometheus.CounterValue, float64(n), k.kind, k.query)
	}
}

type readKey struct{ kind, query string }
