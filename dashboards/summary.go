package main

// The Summary rows that open both dashboards: a few numbers, each a stat panel 4 high.

// summaryStat is one number: expr reduced over the time range with calc ("lastNotNull", "max"),
// red from alertAt on when alertAt > 0.
type summaryStat struct {
	title, description, unit, calc string
	alertAt                        float64
	expr                           string
}

// stats draws the numbers side by side, each width wide.
func stats(b *board, width uint32, ss []summaryStat) {
	for _, s := range ss {
		b.stat(panel{title: s.title, description: s.description, unit: s.unit, width: width, height: 4,
			targets: []target{{expr: s.expr}}}, s.calc, s.alertAt)
	}
}

// The numbers both dashboards show, over the selected nodes.
var (
	daemonsDown      = zeroIfNone(countBy(ofDaemonJobs(daemon("up") + " == 0")))
	probesDown       = zeroIfNone(countBy(daemon("endpointlag_probe_up") + " == 0"))
	endpointsPending = sumBy(daemon("endpointlag_pending_endpoints", matchStage))
	oldestPendingAge = maxBy(daemon("endpointlag_oldest_pending_seconds", matchStage))
	lateClientRate   = sumBy(rate(daemon("endpointlag_late_connections_total", `origin="client"`)))
	clientErrorRate  = sumBy(rate(daemon("endpointlag_terminating_errors_total")))
)

func summary(b *board) {
	stats(b, 3, []summaryStat{
		{"Worst p99 convergence", "The highest p99, over the time range, of the pod's deletion to the last node or proxy that stopped sending it new connections (aggregator, stage all).",
			"s", "max", 0, quantile(0.99, aggregator("endpointlag_convergence_seconds_bucket", `stage="all"`))},
		{"Workloads short of preStop", "Workloads whose recommended preStop (p99 convergence + 1 s) is longer than the one they declare.",
			"short", "lastNotNull", 1, zeroIfNone(countBy(workloadGauge("endpointlag_workload_prestop_shortfall_seconds") + " > 0"))},
		{"Late client connections", "The highest rate, over the time range, of new client connections that reached pods after their deletion began.",
			"cps", "max", 0, lateClientRate},
		{"Errors to clients", "The highest rate, over the time range, of errors (refused, reset, unreachable) terminating pods sent to clients.",
			"cps", "max", 0, clientErrorRate},
		{"Endpoints pending", "Terminating endpoints not yet removed at some stage, now.",
			"short", "lastNotNull", 0, endpointsPending},
		{"Oldest pending", "The age of the oldest terminating endpoint not yet removed at some stage, now.",
			"s", "lastNotNull", 0, oldestPendingAge},
		{"Daemons down", "Daemon targets whose last scrape failed.",
			"short", "lastNotNull", 1, daemonsDown},
		{"Probes down", "Probes, over all daemons, that cannot read their source now.",
			"short", "lastNotNull", 1, probesDown},
	})
}

func nodeSummary(b *board) {
	stats(b, 4, []summaryStat{
		{"Daemon down", "1 when the last scrape of this node's daemon failed.",
			"short", "lastNotNull", 1, daemonsDown},
		{"Probes down", "Probes of this node's daemon that cannot read their source now.",
			"short", "lastNotNull", 1, probesDown},
		{"Endpoints pending", "Terminating endpoints not yet removed at some stage on this node, now.",
			"short", "lastNotNull", 0, endpointsPending},
		{"Oldest pending", "The age of the oldest terminating endpoint not yet removed at some stage on this node, now.",
			"s", "lastNotNull", 0, oldestPendingAge},
		{"Late client connections", "The highest rate, over the time range, of new client connections that reached this node's pods after their deletion began.",
			"cps", "max", 0, lateClientRate},
		{"Errors to clients", "The highest rate, over the time range, of errors (refused, reset, unreachable) this node's terminating pods sent to clients.",
			"cps", "max", 0, clientErrorRate},
	})
}
