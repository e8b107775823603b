package packets

import (
	"github.com/cilium/ebpf"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/endpointlag/endpointlag/bpf"
)

// metrics exports the programs' counters, read at scrape time.
type metrics Probe

func desc(name, help string, labels ...string) *prometheus.Desc {
	return prometheus.NewDesc("endpointlag_"+name, help, labels, nil)
}

var (
	lateConnsDesc = desc("late_connections_total",
		"New connections (TCP SYN without ACK, new UDP flows) to ports its endpoints serve that reached a pod of this node after its deletion began (origin=client|node: from this node's own addresses).", "protocol", "origin")
	termPacketsDesc = desc("terminating_packets_total",
		"Packets that reached a pod of this node after its deletion began.")
	termBytesDesc = desc("terminating_bytes_total",
		"Bytes of the packets that reached a pod of this node after its deletion began.")
	termErrorsDesc = desc("terminating_errors_total",
		"Errors that pods of this node sent to clients after their deletion began (kind=refused: a TCP reset answering a new connection; reset: one ending a connection; unreachable: ICMP destination unreachable).", "kind")
	deadPacketsDesc = desc("dead_endpoint_packets_total",
		"Packets sent to the address of a pod of this node that is already gone (arriving on the uplinks, or from another pod of this node).")
	deadConnsDesc = desc("dead_endpoint_connections_total",
		"New connections among them, to ports its endpoints served (origin=client|node: from this node's own addresses).", "protocol", "origin")
	deadErrorsDesc = desc("dead_endpoint_errors_total",
		"TCP resets and ICMP destination-unreachable messages sent out of the uplinks about pods of this node that are already gone (kind=reset|unreachable).", "kind")
	eventsDroppedDesc = desc("packet_events_dropped_total",
		"New-connection events not sent to user space (per-CPU rate limit or full ring buffer); the counters still count them.")
	evictionsDesc = desc("packet_map_evictions_total",
		"Pod addresses dropped from a full terminating or deleted map to make room for newer ones (map=terminating|deleted).", "map")
	attachedDesc = desc("packet_attachments",
		"Interfaces the programs are attached to (role=pod|uplink).", "role")
	reattachedDesc = desc("packet_reattachments_total",
		"Programs attached again, first, after a CNI removed them (reason=missing) or put a program before them (reason=not_first).", "reason")
	recentOverrunsDesc = desc("packet_recent_overruns_total",
		"Pods whose first moments of terminating outlasted a CPU's ring of recent SYNs (the SYNs that reach a pod after its deletion and before the probe tracks its address): some of their late connections may be missing.")
	blindDesc = desc("packet_blind_interfaces",
		"Pod interfaces where the datapath bypasses the programs: netkit devices (reason=netkit), veths delivered to past the node's side (reason=redirect_peer).", "reason")
)

// Describe implements prometheus.Collector.
func (m *metrics) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{lateConnsDesc, termPacketsDesc, termBytesDesc, termErrorsDesc,
		deadPacketsDesc, deadConnsDesc, deadErrorsDesc, eventsDroppedDesc, evictionsDesc, attachedDesc, reattachedDesc, recentOverrunsDesc, blindDesc} {
		ch <- d
	}
}

// Collect implements prometheus.Collector: the retired totals plus what the maps hold now.
func (m *metrics) Collect(ch chan<- prometheus.Metric) {
	p := (*Probe)(m)
	p.mu.Lock()
	totals := p.retired
	evictions := p.evictions
	// Late connections taken from the rings of recent SYNs are clients' TCP connections.
	totals[0].TcpConns += p.replayed
	overruns := p.recentOverruns
	reattached := map[string]float64{reasonMissing: p.reattachments[reasonMissing], reasonNotFirst: p.reattachments[reasonNotFirst]}
	blind := map[string]float64{blindNetkit: float64(len(p.netkit)), blindRedirectPeer: float64(len(p.redirected))}
	var dropped uint64
	roles := map[string]int{"pod": 0, "uplink": 0}
	for _, as := range p.attachments {
		if len(as) > 0 {
			roles[as[0].role]++
		}
	}
	if p.objs != nil {
		for i, mp := range []*ebpf.Map{p.objs.Terminating, p.objs.Deleted} {
			var (
				k bpf.EndpointlagAddr
				v bpf.EndpointlagCounters
			)
			it := mp.Iterate()
			for it.Next(&k, &v) {
				addCounters(&totals[i], v)
			}
		}
		var limits []bpf.EndpointlagRatelimit
		if err := p.objs.Limits.Lookup(uint32(0), &limits); err == nil {
			for _, l := range limits {
				dropped += l.Dropped
			}
		}
	}
	p.mu.Unlock()
	counter := func(d *prometheus.Desc, v uint64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), labels...)
	}
	t, d := totals[0], totals[1]
	counter(lateConnsDesc, t.TcpConns, "tcp", "client")
	counter(lateConnsDesc, t.UdpFlows, "udp", "client")
	counter(lateConnsDesc, t.NodeTcpConns, "tcp", "node")
	counter(lateConnsDesc, t.NodeUdpFlows, "udp", "node")
	counter(termPacketsDesc, t.Packets)
	counter(termBytesDesc, t.Bytes)
	counter(termErrorsDesc, t.Refused, "refused")
	counter(termErrorsDesc, t.Resets, "reset")
	counter(termErrorsDesc, t.Unreachables, "unreachable")
	counter(deadPacketsDesc, d.Packets)
	counter(deadConnsDesc, d.TcpConns, "tcp", "client")
	counter(deadConnsDesc, d.UdpFlows, "udp", "client")
	counter(deadConnsDesc, d.NodeTcpConns, "tcp", "node")
	counter(deadConnsDesc, d.NodeUdpFlows, "udp", "node")
	counter(deadErrorsDesc, d.Resets, "reset")
	counter(deadErrorsDesc, d.Unreachables, "unreachable")
	counter(eventsDroppedDesc, dropped)
	counter(recentOverrunsDesc, overruns)
	ch <- prometheus.MustNewConstMetric(evictionsDesc, prometheus.CounterValue, evictions[0], "terminating")
	ch <- prometheus.MustNewConstMetric(evictionsDesc, prometheus.CounterValue, evictions[1], "deleted")
	for role, n := range roles {
		ch <- prometheus.MustNewConstMetric(attachedDesc, prometheus.GaugeValue, float64(n), role)
	}
	for reason, n := range reattached {
		ch <- prometheus.MustNewConstMetric(reattachedDesc, prometheus.CounterValue, n, reason)
	}
	for reason, n := range blind {
		ch <- prometheus.MustNewConstMetric(blindDesc, prometheus.GaugeValue, n, reason)
	}
}
