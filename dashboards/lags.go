package main

// The lag panels both dashboards draw. A lag is a histogram with a stage label: propagation
// (the pod's deletion → removal at the stage, measured by the daemon of the pod's node) and
// programming (this node saw the endpoint turn terminating → removal at the stage, every node).

type reference struct {
	// metric is the histogram's name, without _bucket.
	metric string
	// title names it in panel titles; from says what the lag is measured from.
	title, from string
}

var (
	propagation = reference{
		metric: "endpointlag_propagation_seconds",
		title:  "Propagation",
		from:   "the pod's deletion (T0, as the daemon of the pod's node saw it) to its endpoint's removal at the stage; only that daemon measures it",
	}
	programming = reference{
		metric: "endpointlag_programming_seconds",
		title:  "Programming",
		from:   "the moment this node saw the endpoint turn terminating in its EndpointSlice to its removal at the stage; every node measures it for every endpoint",
	}
)

func (r reference) buckets() string {
	return daemon(r.metric+"_bucket", matchStage)
}

// heatmap draws the lag's distribution, once per selected stage.
func (r reference) heatmap(b *board) {
	b.heatmap(panel{
		title: r.title + ": $stage",
		description: "How many endpoints reached the stage with each lag (" + r.from + "), per interval. " +
			"The y axis is the histogram's buckets (docs/metrics.md); one panel per stage selected above.",
		unit: "s", width: 24, height: 8,
		targets: []target{{expr: sumBy(increase(r.buckets()), "le")}},
	}, "stage")
}

// quantiles draws p50, p90 and p99 of the lag per stage and, with detail, per path (dataplane
// stages: cluster or external) and proxy kind (the ingress stage).
func (r reference) quantiles(b *board, width uint32, detail bool) {
	labels := []string{"stage"}
	if detail {
		labels = append(labels, "path", "source")
	}
	b.timeseries(panel{
		title: r.title + " p50 / p90 / p99 by stage",
		description: "Quantiles of the lag from " + r.from + ", over the selected nodes. " +
			"Only intervals in which endpoints reached a stage have a value.",
		unit: "s", width: width, height: 9,
		targets: quantileTargets(r.buckets(), labels...),
	})
}

// byNode draws the p99 per node and stage: the node whose subscribers lag behind the others.
func (r reference) byNode(b *board) {
	b.timeseries(panel{
		title:       r.title + " p99 by node",
		description: "The p99 lag from " + r.from + ", per node and stage.",
		unit:        "s", width: 12, height: 9,
		targets: []target{{expr: quantile(0.99, r.buckets(), "node", "stage"), legend: legendOf("node", "stage")}},
	})
}
