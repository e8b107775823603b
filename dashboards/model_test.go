package main

import (
	"encoding/json"
	"fmt"
	"os"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/prometheus/promql/parser"
)

// The tests read the committed JSON files the way Grafana (and the lab's end-to-end tests) do:
// as plain dashboard JSON, not through the SDK that wrote them.

type dsRef struct {
	Type string `json:"type"`
	UID  string `json:"uid"`
}

type dashboardJSON struct {
	UID         string         `json:"uid"`
	Title       string         `json:"title"`
	Description string         `json:"description"`
	Tags        []string       `json:"tags"`
	Panels      []*panelJSON   `json:"panels"`
	Templating  templatingJSON `json:"templating"`
}

type templatingJSON struct {
	List []*variableJSON `json:"list"`
}

type variableJSON struct {
	Type       string `json:"type"`
	Name       string `json:"name"`
	Label      string `json:"label"`
	Query      any    `json:"query"`
	Datasource *dsRef `json:"datasource"`
	Multi      bool   `json:"multi"`
	IncludeAll bool   `json:"includeAll"`
	AllValue   string `json:"allValue"`
	Refresh    int    `json:"refresh"`
}

type panelJSON struct {
	ID          int           `json:"id"`
	Type        string        `json:"type"`
	Title       string        `json:"title"`
	Description string        `json:"description"`
	Datasource  *dsRef        `json:"datasource"`
	Targets     []*targetJSON `json:"targets"`
	Repeat      string        `json:"repeat"`
	GridPos     struct {
		X, Y, W, H int
	} `json:"gridPos"`
	FieldConfig struct {
		Defaults struct {
			Unit string `json:"unit"`
		} `json:"defaults"`
	} `json:"fieldConfig"`
	Options struct {
		// YAxis is the heatmap's.
		YAxis struct {
			Unit string `json:"unit"`
		} `json:"yAxis"`
	} `json:"options"`
	// Panels are a row's when it is collapsed; these dashboards never collapse theirs.
	Panels []*panelJSON `json:"panels"`
}

type targetJSON struct {
	Datasource   *dsRef `json:"datasource"`
	Expr         string `json:"expr"`
	LegendFormat string `json:"legendFormat"`
	RefID        string `json:"refId"`
	Format       string `json:"format"`
}

// committed reads the committed dashboards, by file name.
func committed(t *testing.T) map[string]*dashboardJSON {
	t.Helper()
	out := make(map[string]*dashboardJSON, len(dashboards))
	for _, d := range dashboards {
		out[d.file] = read(t, d.file)
	}
	return out
}

func read(t *testing.T, file string) *dashboardJSON {
	t.Helper()
	raw, err := os.ReadFile(file)
	if err != nil {
		t.Fatalf("%s: %v (run make generate)", file, err)
	}
	var d dashboardJSON
	if err := json.Unmarshal(raw, &d); err != nil {
		t.Fatalf("%s: %v", file, err)
	}
	return &d
}

// panels lists every panel but the rows, those inside rows included.
func (d *dashboardJSON) panels() []*panelJSON {
	var out []*panelJSON
	var walk func([]*panelJSON)
	walk = func(ps []*panelJSON) {
		for _, p := range ps {
			if p.Type == "row" {
				walk(p.Panels)
				continue
			}
			out = append(out, p)
		}
	}
	walk(d.Panels)
	return out
}

func (d *dashboardJSON) variable(name string) *variableJSON {
	for _, v := range d.Templating.List {
		if v.Name == name {
			return v
		}
	}
	return nil
}

// query is a variable's query as a string (Grafana also stores it as an object with a query).
func (v *variableJSON) query() string {
	switch q := v.Query.(type) {
	case string:
		return q
	case map[string]any:
		s, _ := q["query"].(string)
		return s
	}
	return ""
}

// Grafana's own variables that stand for a duration, and the durations they become for parsing:
// unlikely values, so that a range that is not $__rate_interval cannot pass for it.
var durationVariables = map[string]time.Duration{
	"__rate_interval": 987654321 * time.Millisecond,
	"__interval":      987654322 * time.Millisecond,
	"__range":         987654323 * time.Millisecond,
}

var variableRef = regexp.MustCompile(`\$\{(\w+)(?::[^}]*)?\}|\$(\w+)|\[\[(\w+)\]\]`)

// placeholder is what the template variable name becomes for parsing.
func placeholder(name string) string {
	return "var_" + name
}

// expand replaces the template variables in a query ($v, ${v}, ${v:format}, [[v]]) with values
// the PromQL parser accepts: durations for Grafana's interval variables, a placeholder word for
// the others (inside label values as outside them).
func expand(expr string) string {
	return variableRef.ReplaceAllStringFunc(expr, func(ref string) string {
		m := variableRef.FindStringSubmatch(ref)
		name := m[1] + m[2] + m[3]
		if d, ok := durationVariables[name]; ok {
			return fmt.Sprintf("%dms", d.Milliseconds())
		}
		return placeholder(name)
	})
}

var promql = parser.NewParser(parser.Options{})

// parse parses a target's expression once its variables are expanded.
func parse(expr string) (parser.Expr, error) {
	return promql.ParseExpr(expand(expr))
}

var labelValues = regexp.MustCompile(`^label_values\((.+),\s*(\w+)\)$`)

// variableSelector is the series selector of a label_values(selector, label) variable query.
func variableSelector(v *variableJSON) (sel, label string, ok bool) {
	m := labelValues.FindStringSubmatch(strings.TrimSpace(v.query()))
	if m == nil {
		return "", "", false
	}
	return m[1], m[2], true
}
