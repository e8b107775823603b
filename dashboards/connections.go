package main

// Panels of what reached terminating pods and the addresses of pods already gone, read by the
// packets probe's eBPF programs on the pods' nodes.

func lateConnections(b *board, width uint32) {
	b.timeseries(panel{
		title: "Late connections",
		description: "New connections (TCP SYN without ACK, new UDP flows) to a port a pod serves that reached it after its deletion began. " +
			"origin=client: from elsewhere, each one a client that a stale route sent to a terminating pod; origin=node: from the node's own addresses (the kubelet's probes).",
		unit: "cps", width: width, height: 8,
		targets: []target{sumTarget(rate(daemon("endpointlag_late_connections_total")), "origin", "protocol")},
	})
}

func lateConnectionsByNode(b *board, width uint32) {
	b.timeseries(panel{
		title:       "Late client connections by node",
		description: "Late connections from clients (origin=client) to the terminating pods of each node.",
		unit:        "cps", width: width, height: 8,
		targets: []target{sumTarget(rate(daemon("endpointlag_late_connections_total", `origin="client"`)), "node")},
	})
}

func lastConnection(b *board, width uint32) {
	b.timeseries(panel{
		title: "Last client connection after deletion",
		description: "Per pod, the pod's deletion to the last new client connection that still reached it (0 when none did), read when the pod is gone. " +
			"A preStop longer than this would have served every one of them.",
		unit: "s", width: width, height: 8,
		targets: quantileTargets(daemon("endpointlag_last_connection_seconds_bucket")),
	})
}

func terminatingErrors(b *board, width uint32) {
	b.timeseries(panel{
		title: "Errors terminating pods sent to clients",
		description: "Errors that pods sent back to clients after their deletion began, on ports their endpoints serve: " +
			"refused (a TCP RST to a new connection: nothing listens any more), reset (a TCP RST ending a connection), unreachable (ICMP). Each is a client that got an error.",
		unit: "cps", width: width, height: 8,
		targets: []target{sumTarget(rate(daemon("endpointlag_terminating_errors_total")), "kind")},
	})
}

func deadConnections(b *board, width uint32) {
	b.timeseries(panel{
		title: "Connections to pods already gone",
		description: "New connections to the address of a pod of the node that is already gone (arriving on the uplinks, or from another pod of the node), " +
			"to ports its endpoints served: routes that outlived the pod.",
		unit: "cps", width: width, height: 8,
		targets: []target{sumTarget(rate(daemon("endpointlag_dead_endpoint_connections_total")), "origin", "protocol")},
	})
}

func deadErrors(b *board, width uint32) {
	b.timeseries(panel{
		title:       "Errors about addresses of pods already gone",
		description: "TCP resets and ICMP destination-unreachable messages the node sent out of its uplinks to clients about ports of its pods already gone.",
		unit:        "cps", width: width, height: 8,
		targets: []target{sumTarget(rate(daemon("endpointlag_dead_endpoint_errors_total")), "kind")},
	})
}
