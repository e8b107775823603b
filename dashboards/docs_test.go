package main

import (
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/prometheus/prometheus/promql/parser"
)

// The metrics the dashboards may use are the ones the docs list: docs/metrics.md's table (the
// daemon's), docs/aggregate.md's (the aggregator's), and the standard collectors those pages
// name with a wildcard (`go_*`, `process_*`). Their own tests keep those tables true to the code.
var docFiles = []string{"../docs/metrics.md", "../docs/aggregate.md"}

// targetLabels are the labels the scrape adds to every series (docs/dashboards.md).
var targetLabels = []string{"job", "instance", "cluster", "node"}

// prometheusSeries are the series Prometheus itself adds for every target.
var prometheusSeries = map[string]metricDoc{"up": {typ: "gauge"}}

type metricDoc struct {
	typ    string
	labels []string
	// aggregator: the aggregator exports it (docs/aggregate.md), cluster-wide.
	aggregator bool
}

type metricDocs struct {
	metrics map[string]metricDoc
	// prefixes of the standard collectors' metrics (`process_*`): any name, target labels only.
	prefixes []string
}

var (
	tableRow   = regexp.MustCompile("^\\| `([a-zA-Z_:][a-zA-Z0-9_:]*)` \\| (counter|gauge|histogram|summary) \\|([^|]*)\\|")
	backticked = regexp.MustCompile("`([^`]+)`")
	wildcard   = regexp.MustCompile("`([a-z_]+_)\\*`")
)

func loadDocs(t *testing.T) *metricDocs {
	t.Helper()
	docs := &metricDocs{metrics: map[string]metricDoc{}}
	for _, file := range docFiles {
		raw, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		var previous []string
		for line := range strings.Lines(string(raw)) {
			for _, m := range wildcard.FindAllStringSubmatch(line, -1) {
				if !slices.Contains(docs.prefixes, m[1]) {
					docs.prefixes = append(docs.prefixes, m[1])
				}
			}
			m := tableRow.FindStringSubmatch(line)
			if m == nil {
				continue
			}
			var labels []string
			// "same" and "same + `type`": the row above's labels (and more).
			if strings.HasPrefix(strings.TrimSpace(m[3]), "same") {
				labels = slices.Clone(previous)
			}
			for _, l := range backticked.FindAllStringSubmatch(m[3], -1) {
				labels = append(labels, l[1])
			}
			previous = labels
			docs.metrics[m[1]] = metricDoc{typ: m[2], labels: labels, aggregator: strings.HasSuffix(file, "aggregate.md")}
		}
	}
	if len(docs.metrics) < 45 {
		t.Fatalf("read only %d metrics from %v: has the tables' format changed?", len(docs.metrics), docFiles)
	}
	return docs
}

// lookup finds the documented metric a series name belongs to (a histogram's _bucket, _count,
// _sum too) and the labels its series can carry.
func (d *metricDocs) lookup(series string) (doc metricDoc, labels []string, ok bool) {
	if doc, ok := d.metrics[series]; ok {
		return doc, append(slices.Clone(doc.labels), targetLabels...), true
	}
	for _, suffix := range []string{"_bucket", "_count", "_sum"} {
		doc, ok := d.metrics[strings.TrimSuffix(series, suffix)]
		if ok && doc.typ == "histogram" && strings.HasSuffix(series, suffix) {
			labels := append(slices.Clone(doc.labels), targetLabels...)
			if suffix == "_bucket" {
				labels = append(labels, "le")
			}
			return doc, labels, true
		}
	}
	if doc, ok := prometheusSeries[series]; ok {
		return doc, targetLabels, true
	}
	for _, p := range d.prefixes {
		if strings.HasPrefix(series, p) {
			return metricDoc{}, targetLabels, true
		}
	}
	return metricDoc{}, nil, false
}

// isCounter: a counter's series, or a histogram's (its buckets, count and sum only grow).
func (d *metricDocs) isCounter(series string) bool {
	doc, _, ok := d.lookup(series)
	return ok && (doc.typ == "counter" || doc.typ == "histogram") || strings.HasSuffix(series, "_total")
}

// selectorName is the metric a selector names, or its __name__ matcher's value.
func selectorName(vs *parser.VectorSelector) string {
	if vs.Name != "" {
		return vs.Name
	}
	for _, m := range vs.LabelMatchers {
		if m.Name == "__name__" {
			return m.Value
		}
	}
	return ""
}

// checkSelector: the selector names documented series (a __name__ regex: at least one of them)
// and matches only labels they carry.
func (d *metricDocs) checkSelector(vs *parser.VectorSelector) []string {
	names := d.seriesNames(vs)
	if len(names) == 0 {
		return []string{"selects no documented metric: " + vs.String()}
	}
	var problems []string
	for _, name := range names {
		_, labels, _ := d.lookup(name)
		for _, m := range vs.LabelMatchers {
			if m.Name != "__name__" && !slices.Contains(labels, m.Name) {
				problems = append(problems, name+" has no label "+m.Name)
			}
		}
	}
	return problems
}

// seriesNames are the documented series a selector may select.
func (d *metricDocs) seriesNames(vs *parser.VectorSelector) []string {
	if vs.Name != "" {
		if _, _, ok := d.lookup(vs.Name); ok {
			return []string{vs.Name}
		}
		return nil
	}
	var names []string
	for _, m := range vs.LabelMatchers {
		if m.Name != "__name__" {
			continue
		}
		for metric, doc := range d.metrics {
			candidates := []string{metric}
			if doc.typ == "histogram" {
				candidates = append(candidates, metric+"_bucket", metric+"_count", metric+"_sum")
			}
			for _, c := range candidates {
				if m.Matches(c) {
					names = append(names, c)
				}
			}
		}
	}
	slices.Sort(names)
	return names
}

// availableLabels are the labels the series under node can carry.
func (d *metricDocs) availableLabels(node parser.Node) []string {
	var out []string
	parser.Inspect(node, func(n parser.Node, _ []parser.Node) error {
		if vs, ok := n.(*parser.VectorSelector); ok {
			for _, name := range d.seriesNames(vs) {
				_, labels, _ := d.lookup(name)
				out = append(out, labels...)
			}
		}
		return nil
	})
	slices.Sort(out)
	return slices.Compact(out)
}

// TestMetricsDocumented: every series a query or a variable selects is documented, with the
// labels it matches and groups by.
func TestMetricsDocumented(t *testing.T) {
	docs := loadDocs(t)
	for file, d := range committed(t) {
		for _, v := range d.Templating.List {
			sel, _, ok := variableSelector(v)
			if !ok {
				continue
			}
			expr, err := parse(sel)
			if err != nil {
				t.Errorf("%s: variable %s: %v", file, v.Name, err)
				continue
			}
			for _, p := range docs.checkExpr(expr) {
				t.Errorf("%s: variable %s: %s", file, v.Name, p)
			}
		}
		for _, p := range d.panels() {
			for _, tg := range p.Targets {
				expr, err := parse(tg.Expr)
				if err != nil {
					continue // target-promql-rule reports it
				}
				for _, problem := range docs.checkExpr(expr) {
					t.Errorf("%s: panel %q, target %s: %s", file, p.Title, tg.RefID, problem)
				}
			}
		}
	}
}

// checkExpr checks every selector of expr, and that each label it groups or matches by (by,
// on) is one its series carry.
func (d *metricDocs) checkExpr(expr parser.Expr) []string {
	var problems []string
	parser.Inspect(expr, func(n parser.Node, _ []parser.Node) error {
		var labels []string
		switch n := n.(type) {
		case *parser.VectorSelector:
			problems = append(problems, d.checkSelector(n)...)
		case *parser.AggregateExpr:
			labels = n.Grouping
		case *parser.BinaryExpr:
			if n.VectorMatching != nil {
				labels = n.VectorMatching.MatchingLabels
			}
		}
		if len(labels) > 0 {
			available := d.availableLabels(n)
			for _, l := range labels {
				if !slices.Contains(available, l) {
					problems = append(problems, "no series under "+n.String()+" has the label "+l)
				}
			}
		}
		return nil
	})
	return problems
}

// TestDocsRead guards the reading of the docs: known metrics with their types and labels.
func TestDocsRead(t *testing.T) {
	docs := loadDocs(t)
	for name, want := range map[string]metricDoc{
		"endpointlag_propagation_seconds":           {typ: "histogram", labels: []string{"stage", "path", "source"}},
		"endpointlag_tracked_records":               {typ: "gauge"},
		"endpointlag_convergence_seconds":           {typ: "histogram", labels: []string{"stage"}, aggregator: true},
		"endpointlag_workload_prestop_seconds":      {typ: "gauge", labels: []string{"namespace", "kind", "workload"}, aggregator: true},
		"endpointlag_workload_connections_total":    {typ: "counter", labels: []string{"namespace", "kind", "workload", "type"}, aggregator: true},
		"endpointlag_late_connections_total":        {typ: "counter", labels: []string{"protocol", "origin"}},
		"endpointlag_packet_blind_interfaces":       {typ: "gauge", labels: []string{"reason"}},
		"endpointlag_workload_grace_period_seconds": {typ: "gauge", labels: []string{"namespace", "kind", "workload"}, aggregator: true},
	} {
		got, ok := docs.metrics[name]
		if !ok || got.typ != want.typ || got.aggregator != want.aggregator || !slices.Equal(got.labels, want.labels) {
			t.Errorf("%s: read %+v (found %v), want %+v", name, got, ok, want)
		}
	}
	for _, series := range []string{"process_cpu_seconds_total", "go_goroutines", "up", "endpointlag_propagation_seconds_bucket"} {
		if _, _, ok := docs.lookup(series); !ok {
			t.Errorf("%s: not found", series)
		}
	}
	for _, series := range []string{"endpointlag_nonexistent_total", "endpointlag_tracked_records_bucket"} {
		if _, _, ok := docs.lookup(series); ok {
			t.Errorf("%s: found", series)
		}
	}
}
