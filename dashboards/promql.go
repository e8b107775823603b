package main

import (
	"fmt"
	"strings"
)

// Every query selects its series through the dashboards' variables. The daemon's metrics carry no
// node label of their own: the scrape adds it (docs/dashboards.md), together with job and, where
// there are several clusters, cluster. The aggregator's metrics are cluster-wide, so they are
// never filtered by node.
const (
	matchJob     = `job=~"$job"`
	matchCluster = `cluster=~"$cluster"`
	matchNode    = `node=~"$node"`
	matchStage   = `stage=~"$stage"`
)

// daemon selects a daemon metric on the chosen jobs, clusters and nodes, with extra matchers.
func daemon(metric string, extra ...string) string {
	return selector(metric, append([]string{matchJob, matchCluster, matchNode}, extra...))
}

// aggregator selects an aggregator metric on the chosen jobs and clusters, with extra matchers.
func aggregator(metric string, extra ...string) string {
	return selector(metric, append([]string{matchJob, matchCluster}, extra...))
}

// daemonTargets has one series per daemon on the chosen jobs and clusters: only daemons export
// endpointlag_tracked_records. Its node labels are the nodes that run one.
func daemonTargets() string {
	return selector("endpointlag_tracked_records", []string{matchJob, matchCluster})
}

func selector(metric string, matchers []string) string {
	return metric + "{" + strings.Join(matchers, ", ") + "}"
}

// rate is the per-second rate of a counter over Grafana's $__rate_interval.
func rate(sel string) string {
	return "rate(" + sel + "[$__rate_interval])"
}

// increase is a counter's (or a histogram bucket's) increase over $__rate_interval.
func increase(sel string) string {
	return "increase(" + sel + "[$__rate_interval])"
}

// sumBy aggregates expr by labels; no labels sums everything.
func sumBy(expr string, labels ...string) string {
	return aggregate("sum", expr, labels)
}

// maxBy takes the maximum of expr by labels.
func maxBy(expr string, labels ...string) string {
	return aggregate("max", expr, labels)
}

// countBy counts the series of expr by labels.
func countBy(expr string, labels ...string) string {
	return aggregate("count", expr, labels)
}

func aggregate(op, expr string, labels []string) string {
	if len(labels) == 0 {
		return op + "(" + expr + ")"
	}
	return op + " by (" + strings.Join(labels, ", ") + ") (" + expr + ")"
}

// quantile is the q-quantile of a histogram's buckets (bucketSel selects its _bucket series),
// kept apart by labels.
func quantile(q float64, bucketSel string, labels ...string) string {
	return fmt.Sprintf("histogram_quantile(%g, %s)", q, sumBy(rate(bucketSel), append([]string{"le"}, labels...)...))
}

// zeroIfNone makes a count answer 0 instead of no data when nothing matches.
func zeroIfNone(expr string) string {
	return expr + " or vector(0)"
}

// quantiles are the three a lag panel draws, each as one target.
var quantiles = []struct {
	q    float64
	name string
}{{0.5, "p50"}, {0.9, "p90"}, {0.99, "p99"}}

// quantileTargets draws p50, p90 and p99 of a histogram, kept apart by labels; the legend names
// the quantile and then the labels' values.
func quantileTargets(bucketSel string, labels ...string) []target {
	ts := make([]target, 0, len(quantiles))
	for _, q := range quantiles {
		ts = append(ts, target{expr: quantile(q.q, bucketSel, labels...), legend: strings.TrimSpace(q.name + " " + legendOf(labels...))})
	}
	return ts
}

// legendOf is the Grafana legend format that shows the values of labels, space-separated.
func legendOf(labels ...string) string {
	fields := make([]string, len(labels))
	for i, l := range labels {
		fields[i] = "{{" + l + "}}"
	}
	return strings.Join(fields, " ")
}
