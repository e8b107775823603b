package main

import (
	"fmt"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/prometheus/prometheus/model/labels"
	"github.com/prometheus/prometheus/promql/parser"
)

// The lint rules follow Grafana's dashboard-linter (its rule names), written here, stricter
// where these dashboards can be: every panel and every target names the templated data source,
// every range is $__rate_interval, every selector filters by job and cluster.

type lintRule struct {
	name  string
	check func(d *dashboardJSON, docs *metricDocs) []string
}

var lintRules = []lintRule{
	{"template-datasource-rule", templateDatasource},
	{"template-job-rule", templateJob},
	{"template-label-rule", templateLabels},
	{"template-unused-rule", templateUnused},
	{"panel-datasource-rule", panelDatasource},
	{"panel-title-description-rule", panelTitleDescription},
	{"panel-units-rule", panelUnits},
	{"panel-layout-rule", panelLayout},
	{"target-promql-rule", targetPromQL},
	{"target-rate-interval-rule", targetRateInterval},
	{"target-job-rule", targetMatcher("job")},
	{"target-cluster-rule", targetMatcher("cluster")},
	{"target-node-rule", targetNode},
	{"target-counter-agg-rule", targetCounterAgg},
	{"target-legend-rule", targetLegend},
}

func TestLint(t *testing.T) {
	docs := loadDocs(t)
	for file, d := range committed(t) {
		for _, r := range lintRules {
			t.Run(r.name+"/"+file, func(t *testing.T) {
				for _, p := range r.check(d, docs) {
					t.Error(p)
				}
			})
		}
	}
}

func templatedDatasource(ds *dsRef) bool {
	return ds != nil && (ds.UID == "${datasource}" || ds.UID == "$datasource")
}

func templateDatasource(d *dashboardJSON, _ *metricDocs) []string {
	var problems []string
	var found []*variableJSON
	for _, v := range d.Templating.List {
		if v.Type == "datasource" {
			found = append(found, v)
		}
	}
	if len(found) != 1 {
		return []string{fmt.Sprintf("%d data source variables, want 1", len(found))}
	}
	v := found[0]
	if v.Name != "datasource" || v.Label != "Data source" || v.query() != "prometheus" {
		problems = append(problems, fmt.Sprintf("data source variable %q labelled %q of %q, want datasource, Data source, prometheus", v.Name, v.Label, v.query()))
	}
	return problems
}

func templateJob(d *dashboardJSON, _ *metricDocs) []string {
	v := d.variable("job")
	if v == nil {
		return []string{"no job variable"}
	}
	if v.Type != "query" || !v.Multi || !v.IncludeAll || v.AllValue != ".+" {
		return []string{fmt.Sprintf("job variable: type %s, multi %v, includeAll %v, allValue %q; want a query, multi, All = .+", v.Type, v.Multi, v.IncludeAll, v.AllValue)}
	}
	return nil
}

// templateLabels: every query variable lists one label's values through the templated data
// source, is labelled with its name, and reloads when the time range changes; cluster's All
// also matches series without the label.
func templateLabels(d *dashboardJSON, _ *metricDocs) []string {
	var problems []string
	for _, v := range d.Templating.List {
		if v.Type != "query" {
			continue
		}
		if !templatedDatasource(v.Datasource) {
			problems = append(problems, v.Name+": does not use the templated data source")
		}
		if want := strings.ToUpper(v.Name[:1]) + v.Name[1:]; v.Label != want {
			problems = append(problems, fmt.Sprintf("%s: labelled %q, want %q", v.Name, v.Label, want))
		}
		if v.Refresh != 2 {
			problems = append(problems, v.Name+": does not reload on time range change (refresh 2)")
		}
		sel, label, ok := variableSelector(v)
		if !ok || label != v.Name {
			problems = append(problems, fmt.Sprintf("%s: query %q is not label_values(selector, %s)", v.Name, v.query(), v.Name))
		} else if _, err := parse(sel); err != nil {
			problems = append(problems, fmt.Sprintf("%s: %v", v.Name, err))
		}
	}
	if v := d.variable("cluster"); v == nil || !v.IncludeAll || v.AllValue != ".*" {
		problems = append(problems, "no cluster variable whose All (.*) matches series without the label")
	}
	return problems
}

var variableUse = regexp.MustCompile(`\$\{?(\w+)`)

// templateUnused: every variable is used by a query, another variable, a title or a repeat.
func templateUnused(d *dashboardJSON, _ *metricDocs) []string {
	used := map[string]bool{}
	use := func(s string) {
		for _, m := range variableUse.FindAllStringSubmatch(s, -1) {
			used[m[1]] = true
		}
	}
	for _, v := range d.Templating.List {
		use(v.query())
	}
	for _, p := range d.panels() {
		use(p.Title)
		used[p.Repeat] = true
		if p.Datasource != nil {
			use(p.Datasource.UID)
		}
		for _, t := range p.Targets {
			use(t.Expr)
		}
	}
	var problems []string
	for _, v := range d.Templating.List {
		if !used[v.Name] {
			problems = append(problems, v.Name+": unused")
		}
	}
	return problems
}

func panelDatasource(d *dashboardJSON, _ *metricDocs) []string {
	var problems []string
	for _, p := range d.panels() {
		if !templatedDatasource(p.Datasource) {
			problems = append(problems, fmt.Sprintf("panel %q: data source %+v, want ${datasource}", p.Title, p.Datasource))
		}
		if len(p.Targets) == 0 {
			problems = append(problems, fmt.Sprintf("panel %q: no targets", p.Title))
		}
		for _, t := range p.Targets {
			if !templatedDatasource(t.Datasource) {
				problems = append(problems, fmt.Sprintf("panel %q, target %s: data source %+v, want ${datasource}", p.Title, t.RefID, t.Datasource))
			}
		}
	}
	return problems
}

func panelTitleDescription(d *dashboardJSON, _ *metricDocs) []string {
	var problems []string
	for _, p := range d.panels() {
		if strings.TrimSpace(p.Title) == "" || strings.TrimSpace(p.Description) == "" {
			problems = append(problems, fmt.Sprintf("panel %d: title %q, description %q: want both", p.ID, p.Title, p.Description))
		}
	}
	return problems
}

// units are Grafana's unit ids these dashboards may use.
var units = []string{
	"none", "short", "percent", "percentunit", "bool", "bool_yes_no", "bool_on_off",
	"bytes", "decbytes", "bits", "decbits",
	"Bps", "bps", "binBps", "binbps", "pps",
	"ns", "µs", "ms", "s", "m", "h", "d", "dtdurations", "dtdurationms",
	"cps", "ops", "reqps", "rps", "wps", "iops", "cpm", "opm", "rpm", "wpm",
}

func panelUnits(d *dashboardJSON, _ *metricDocs) []string {
	var problems []string
	for _, p := range d.panels() {
		if !slices.Contains(units, p.FieldConfig.Defaults.Unit) {
			problems = append(problems, fmt.Sprintf("panel %q: unit %q", p.Title, p.FieldConfig.Defaults.Unit))
		}
		if p.Type == "heatmap" && !slices.Contains(units, p.Options.YAxis.Unit) {
			problems = append(problems, fmt.Sprintf("panel %q: y axis unit %q", p.Title, p.Options.YAxis.Unit))
		}
	}
	return problems
}

// panelLayout: unique panel ids, unique refIds within a panel, every panel on the 24-column grid.
func panelLayout(d *dashboardJSON, _ *metricDocs) []string {
	var problems []string
	ids := map[int]bool{}
	var check func([]*panelJSON)
	check = func(ps []*panelJSON) {
		for _, p := range ps {
			if ids[p.ID] || p.ID == 0 {
				problems = append(problems, fmt.Sprintf("panel %q: id %d missing or used twice", p.Title, p.ID))
			}
			ids[p.ID] = true
			if p.GridPos.W <= 0 || p.GridPos.H <= 0 || p.GridPos.X < 0 || p.GridPos.X+p.GridPos.W > 24 {
				problems = append(problems, fmt.Sprintf("panel %q: off the grid at %+v", p.Title, p.GridPos))
			}
			refs := map[string]bool{}
			for _, t := range p.Targets {
				if refs[t.RefID] || t.RefID == "" {
					problems = append(problems, fmt.Sprintf("panel %q: refId %q missing or used twice", p.Title, t.RefID))
				}
				refs[t.RefID] = true
			}
			check(p.Panels)
		}
	}
	check(d.Panels)
	return problems
}

// eachTarget runs check on every target whose expression parses (target-promql-rule reports
// the others).
func eachTarget(d *dashboardJSON, check func(p *panelJSON, t *targetJSON, expr parser.Expr) []string) []string {
	var problems []string
	for _, p := range d.panels() {
		for _, t := range p.Targets {
			expr, err := parse(t.Expr)
			if err != nil {
				continue
			}
			for _, problem := range check(p, t, expr) {
				problems = append(problems, fmt.Sprintf("panel %q, target %s: %s", p.Title, t.RefID, problem))
			}
		}
	}
	return problems
}

func targetPromQL(d *dashboardJSON, _ *metricDocs) []string {
	var problems []string
	for _, p := range d.panels() {
		for _, t := range p.Targets {
			if _, err := parse(t.Expr); err != nil {
				problems = append(problems, fmt.Sprintf("panel %q, target %s: %q: %v", p.Title, t.RefID, t.Expr, err))
			}
		}
	}
	return problems
}

// targetRateInterval: every range (rate, increase, anything over a range) is $__rate_interval.
func targetRateInterval(d *dashboardJSON, _ *metricDocs) []string {
	return eachTarget(d, func(_ *panelJSON, _ *targetJSON, expr parser.Expr) []string {
		var problems []string
		parser.Inspect(expr, func(n parser.Node, _ []parser.Node) error {
			switch n := n.(type) {
			case *parser.MatrixSelector:
				if n.Range != durationVariables["__rate_interval"] {
					problems = append(problems, "range "+n.String()+" is not [$__rate_interval]")
				}
			case *parser.SubqueryExpr:
				problems = append(problems, "subquery "+n.String())
			}
			return nil
		})
		return problems
	})
}

// hasMatcher: the selector matches label against the variable of the same name (=~"$label").
func hasMatcher(vs *parser.VectorSelector, label string) bool {
	for _, m := range vs.LabelMatchers {
		if m.Name == label && m.Type == labels.MatchRegexp && m.Value == placeholder(label) {
			return true
		}
	}
	return false
}

func selectors(expr parser.Expr) []*parser.VectorSelector {
	var out []*parser.VectorSelector
	parser.Inspect(expr, func(n parser.Node, _ []parser.Node) error {
		if vs, ok := n.(*parser.VectorSelector); ok {
			out = append(out, vs)
		}
		return nil
	})
	return out
}

// targetMatcher: every selector filters label by its variable.
func targetMatcher(label string) func(d *dashboardJSON, _ *metricDocs) []string {
	return func(d *dashboardJSON, _ *metricDocs) []string {
		return eachTarget(d, func(_ *panelJSON, _ *targetJSON, expr parser.Expr) []string {
			var problems []string
			for _, vs := range selectors(expr) {
				if !hasMatcher(vs, label) {
					problems = append(problems, fmt.Sprintf("%s has no %s=~\"$%s\"", vs, label, label))
				}
			}
			return problems
		})
	}
}

// targetNode: a target that reads the daemons' series filters them by node; the aggregator's
// series are cluster-wide and never filtered by the node its pod runs on.
func targetNode(d *dashboardJSON, docs *metricDocs) []string {
	if d.variable("node") == nil {
		return []string{"no node variable"}
	}
	return eachTarget(d, func(_ *panelJSON, _ *targetJSON, expr parser.Expr) []string {
		var problems []string
		daemonSeries, filtered := false, false
		for _, vs := range selectors(expr) {
			doc, _, _ := docs.lookup(selectorName(vs))
			switch {
			case doc.aggregator && hasMatcher(vs, "node"):
				problems = append(problems, vs.String()+": the aggregator's series filtered by node")
			case !doc.aggregator:
				daemonSeries = true
				filtered = filtered || hasMatcher(vs, "node")
			}
		}
		if daemonSeries && !filtered {
			problems = append(problems, `reads the daemons' series without node=~"$node"`)
		}
		return problems
	})
}

// targetCounterAgg: counters (and histograms' series) are read only through rate, irate or
// increase.
func targetCounterAgg(d *dashboardJSON, docs *metricDocs) []string {
	return eachTarget(d, func(_ *panelJSON, _ *targetJSON, expr parser.Expr) []string {
		var problems []string
		parser.Inspect(expr, func(n parser.Node, path []parser.Node) error {
			vs, ok := n.(*parser.VectorSelector)
			if !ok || !docs.isCounter(selectorName(vs)) {
				return nil
			}
			if !underCounterFunction(path) {
				problems = append(problems, "counter "+vs.String()+" not read through rate, irate or increase")
			}
			return nil
		})
		return problems
	})
}

func underCounterFunction(path []parser.Node) bool {
	for i := len(path) - 1; i >= 0; i-- {
		switch n := path[i].(type) {
		case *parser.MatrixSelector, parser.Expressions:
			continue
		case *parser.Call:
			return slices.Contains([]string{"rate", "irate", "increase"}, n.Func.Name)
		}
		return false
	}
	return false
}

var legendLabel = regexp.MustCompile(`\{\{\s*(\w+)\s*\}\}`)

// targetLegend: the labels a legend names are labels of the query's result.
func targetLegend(d *dashboardJSON, docs *metricDocs) []string {
	return eachTarget(d, func(_ *panelJSON, t *targetJSON, expr parser.Expr) []string {
		var problems []string
		result := docs.resultLabels(expr)
		for _, m := range legendLabel.FindAllStringSubmatch(t.LegendFormat, -1) {
			if !slices.Contains(result, m[1]) {
				problems = append(problems, fmt.Sprintf("legend %q names %s, not a label of the result %v", t.LegendFormat, m[1], result))
			}
		}
		return problems
	})
}

// resultLabels are the labels the series of expr's result can carry.
func (d *metricDocs) resultLabels(expr parser.Node) []string {
	switch n := expr.(type) {
	case *parser.AggregateExpr:
		if n.Without {
			return slices.DeleteFunc(d.resultLabels(n.Expr), func(l string) bool { return slices.Contains(n.Grouping, l) })
		}
		return n.Grouping
	case *parser.Call:
		switch n.Func.Name {
		case "histogram_quantile":
			return slices.DeleteFunc(d.resultLabels(n.Args[1]), func(l string) bool { return l == "le" })
		case "vector":
			return nil
		}
		return d.resultLabels(n.Args[0])
	case *parser.BinaryExpr:
		if n.Op == parser.LOR {
			return append(d.resultLabels(n.LHS), d.resultLabels(n.RHS)...)
		}
		if n.LHS.Type() == parser.ValueTypeScalar {
			return d.resultLabels(n.RHS)
		}
		return d.resultLabels(n.LHS)
	case *parser.ParenExpr:
		return d.resultLabels(n.Expr)
	}
	return d.availableLabels(expr)
}

// TestLintRulesCatch breaks the overview in the ways each rule is there for, and expects that
// rule to say so.
func TestLintRulesCatch(t *testing.T) {
	docs := loadDocs(t)
	rules := map[string]lintRule{}
	for _, r := range lintRules {
		rules[r.name] = r
	}
	// target finds the first target whose expression contains s.
	target := func(t *testing.T, d *dashboardJSON, s string) *targetJSON {
		for _, p := range d.panels() {
			for _, tg := range p.Targets {
				if strings.Contains(tg.Expr, s) {
					return tg
				}
			}
		}
		t.Fatalf("no target has %q", s)
		return nil
	}
	for _, tc := range []struct {
		rule   string
		mutate func(t *testing.T, d *dashboardJSON)
	}{
		{"template-datasource-rule", func(_ *testing.T, d *dashboardJSON) { d.variable("datasource").Name = "ds" }},
		{"template-job-rule", func(_ *testing.T, d *dashboardJSON) { d.variable("job").AllValue = ".*" }},
		{"template-label-rule", func(_ *testing.T, d *dashboardJSON) { d.variable("node").Refresh = 1 }},
		{"template-label-rule", func(_ *testing.T, d *dashboardJSON) { d.variable("cluster").AllValue = ".+" }},
		{"template-label-rule", func(_ *testing.T, d *dashboardJSON) { d.variable("node").Query = "label_values(up, instance)" }},
		{"template-unused-rule", func(_ *testing.T, d *dashboardJSON) {
			d.Templating.List = append(d.Templating.List, &variableJSON{Type: "query", Name: "namespace"})
		}},
		{"panel-datasource-rule", func(_ *testing.T, d *dashboardJSON) { d.panels()[3].Targets[0].Datasource.UID = "prometheus" }},
		{"panel-datasource-rule", func(_ *testing.T, d *dashboardJSON) { d.panels()[3].Datasource = nil }},
		{"panel-title-description-rule", func(_ *testing.T, d *dashboardJSON) { d.panels()[5].Description = "" }},
		{"panel-units-rule", func(_ *testing.T, d *dashboardJSON) { d.panels()[5].FieldConfig.Defaults.Unit = "seconds" }},
		{"panel-units-rule", func(_ *testing.T, d *dashboardJSON) { d.panels()[5].FieldConfig.Defaults.Unit = "" }},
		{"panel-layout-rule", func(_ *testing.T, d *dashboardJSON) { d.panels()[5].ID = d.panels()[4].ID }},
		{"target-promql-rule", func(t *testing.T, d *dashboardJSON) {
			tg := target(t, d, "sum by")
			tg.Expr = strings.TrimSuffix(tg.Expr, ")")
		}},
		{"target-rate-interval-rule", func(t *testing.T, d *dashboardJSON) {
			tg := target(t, d, "$__rate_interval")
			tg.Expr = strings.Replace(tg.Expr, "$__rate_interval", "5m", 1)
		}},
		{"target-job-rule", func(t *testing.T, d *dashboardJSON) {
			tg := target(t, d, matchJob)
			tg.Expr = strings.Replace(tg.Expr, matchJob, `job="endpointlag"`, 1)
		}},
		{"target-cluster-rule", func(t *testing.T, d *dashboardJSON) {
			tg := target(t, d, matchCluster+", ")
			tg.Expr = strings.Replace(tg.Expr, matchCluster+", ", "", 1)
		}},
		{"target-node-rule", func(t *testing.T, d *dashboardJSON) {
			tg := target(t, d, "endpointlag_pending_endpoints")
			tg.Expr = strings.ReplaceAll(tg.Expr, ", "+matchNode, "")
		}},
		{"target-node-rule", func(t *testing.T, d *dashboardJSON) {
			tg := target(t, d, "endpointlag_convergence_seconds_bucket")
			tg.Expr = strings.Replace(tg.Expr, matchCluster, matchCluster+", "+matchNode, 1)
		}},
		{"target-counter-agg-rule", func(t *testing.T, d *dashboardJSON) {
			target(t, d, "endpointlag_pending_endpoints").Expr = "sum(" + daemon("endpointlag_late_connections_total") + ")"
		}},
		{"target-legend-rule", func(t *testing.T, d *dashboardJSON) {
			target(t, d, "sum by (origin, protocol)").LegendFormat = "{{origin}} {{proto}}"
		}},
	} {
		t.Run(tc.rule, func(t *testing.T) {
			d := read(t, "endpointlag-overview.json")
			if problems := rules[tc.rule].check(d, docs); len(problems) > 0 {
				t.Fatalf("reports the committed dashboard: %v", problems)
			}
			tc.mutate(t, d)
			if problems := rules[tc.rule].check(d, docs); len(problems) == 0 {
				t.Error("reports nothing")
			} else {
				t.Log(problems)
			}
		})
	}
}

// TestDocsCatch: an undocumented metric or label is reported.
func TestDocsCatch(t *testing.T) {
	docs := loadDocs(t)
	for _, expr := range []string{
		`sum(rate(endpointlag_late_connection_total[$__rate_interval]))`,
		`sum by (stages) (endpointlag_pending_endpoints)`,
		`endpointlag_pending_endpoints{path="cluster"}`,
		`endpointlag_tracked_records and on (instances) endpointlag_build_info`,
		`{__name__=~"endpointlag_nothing_.*"}`,
	} {
		e, err := parse(expr)
		if err != nil {
			t.Fatal(err)
		}
		if problems := docs.checkExpr(e); len(problems) == 0 {
			t.Errorf("%s: nothing reported", expr)
		}
	}
}

func TestExpand(t *testing.T) {
	for in, want := range map[string]string{
		`rate(x{job=~"$job"}[$__rate_interval])`:       `rate(x{job=~"var_job"}[987654321ms])`,
		`x{node=~"${node}", c=~"${cluster:regex}"}`:    `x{node=~"var_node", c=~"var_cluster"}`,
		`sum by ([[label]]) (x[$__range])`:             `sum by (var_label) (x[987654323ms])`,
		`increase(x[${__rate_interval}]) > $threshold`: `increase(x[987654321ms]) > var_threshold`,
	} {
		if got := expand(in); got != want {
			t.Errorf("expand(%s) = %s, want %s", in, got, want)
		}
	}
}
