package main

// Panels of the daemons' own health: scrapes, probes, what was not measured, the process.

// ofDaemonJobs keeps the series of expr whose job runs daemons: with job=All, up and process_*
// are otherwise every job's.
func ofDaemonJobs(expr string) string {
	return expr + " and on (job) " + daemonTargets()
}

// ofEndpointlag keeps the series of expr whose target exports endpointlag_build_info: the
// daemons and the aggregator.
func ofEndpointlag(expr string) string {
	return expr + " and on (job, instance) " + daemon("endpointlag_build_info")
}

// pending draws the terminating endpoints not yet removed, and the oldest one's age, by stage or,
// with byNode, by node and stage.
func pending(b *board, width uint32, byNode bool) {
	labels := []string{"stage"}
	if byNode {
		labels = []string{"node", "stage"}
	}
	b.timeseries(panel{
		title: "Endpoints pending by " + labels[0],
		description: "Terminating endpoints not yet removed at the stage. A dataplane stage is awaited only where this node's rules routed to the endpoint, " +
			"and not while kube-proxy keeps routing to it on purpose because no ready endpoint is left (KEP-1669).",
		unit: "short", width: width, height: 8,
		targets: []target{sumTarget(daemon("endpointlag_pending_endpoints", matchStage), labels...)},
	})
	b.timeseries(panel{
		title: "Oldest pending by " + labels[0],
		description: "Age of the oldest terminating endpoint not yet removed at the stage, since its node saw it turn terminating. " +
			"Growing for a dataplane stage: that node's kube-proxy is late or stuck.",
		unit: "s", width: width, height: 8,
		targets: []target{maxTarget(daemon("endpointlag_oldest_pending_seconds", matchStage), labels...)},
	})
}

func unsampled(b *board, width uint32) {
	b.timeseries(panel{
		title: "Stages seen but not sampled",
		description: "Stages kept out of the lag histograms: reason=fallback (kube-proxy held the endpoint on purpose while no ready endpoint was left), " +
			"reason=relist (first seen on a re-read after a gap, so known only to within it).",
		unit: "cps", width: width, height: 8,
		targets: []target{sumTarget(rate(daemon("endpointlag_unsampled_total", matchStage)), "stage", "path", "reason")},
	})
}

func probeErrors(b *board, width uint32) {
	b.timeseries(panel{
		title: "Probe errors",
		description: "Probe failures: reason=source (reading the source failed), or the kind of input skipped " +
			"(no_service_label, no_target_ref, bad_address, proxy_annotation).",
		unit: "cps", width: width, height: 8,
		targets: []target{sumTarget(rate(daemon("endpointlag_probe_errors_total")), "probe", "reason")},
	})
}

func recordsLost(b *board, width uint32) {
	b.timeseries(panel{
		title: "Records dropped or expired incomplete",
		description: "Terminations the daemons could not measure in full: records not tracked, by reason (max: --record.max; untrusted: --record.max-untrusted, " +
			"records of EndpointSlices no trusted controller manages; namespace: --record.max-per-namespace), dataplane removals dropped while waiting for their record, " +
			"and records that reached --record.horizon with stages still pending.",
		unit: "cps", width: width, height: 8,
		targets: []target{
			{expr: sumBy(rate(daemon("endpointlag_records_dropped_total")), "reason"), legend: "dropped: {{reason}}"},
			{expr: sumBy(rate(daemon("endpointlag_orphans_dropped_total"))), legend: "early removals dropped"},
			{expr: sumBy(rate(daemon("endpointlag_records_expired_total", `outcome="incomplete"`))), legend: "expired incomplete"},
		},
	})
}

func tracked(b *board, width uint32) {
	b.timeseries(panel{
		title:       "Records and pods held",
		description: "Terminating endpoint records and deleting pods each daemon holds in memory.",
		unit:        "short", width: width, height: 8,
		targets: []target{
			{expr: sumBy(daemon("endpointlag_tracked_records"), "node"), legend: "{{node}} records"},
			{expr: sumBy(daemon("endpointlag_tracked_pods"), "node"), legend: "{{node}} pods"},
		},
	})
}

func processCPU(b *board, width uint32) {
	b.timeseries(panel{
		title:       "CPU",
		description: "CPU time the endpointlag processes use, as a share of one core.",
		unit:        "percentunit", width: width, height: 8,
		targets: []target{{
			expr:   ofEndpointlag(rate(daemon("process_cpu_seconds_total"))),
			legend: "{{node}} {{job}}",
		}},
	})
}

func processMemory(b *board, width uint32) {
	b.timeseries(panel{
		title:       "Memory",
		description: "Resident memory of the endpointlag processes.",
		unit:        "bytes", width: width, height: 8,
		targets: []target{{
			expr:   ofEndpointlag(daemon("process_resident_memory_bytes")),
			legend: "{{node}} {{job}}",
		}},
	})
}

func versions(b *board, width uint32) {
	b.table(panel{
		title:       "Versions running",
		description: "How many targets run each build (endpointlag_build_info).",
		unit:        "short", width: width, height: 6,
		targets: []target{{
			expr:   countBy(daemon("endpointlag_build_info"), "job", "version", "revision", "goversion"),
			legend: "targets",
		}},
	}, "")
}
