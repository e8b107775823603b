package main

import (
	"slices"

	"github.com/grafana/grafana-foundation-sdk/go/cog"
	"github.com/grafana/grafana-foundation-sdk/go/cog/variants"
	"github.com/grafana/grafana-foundation-sdk/go/common"
	"github.com/grafana/grafana-foundation-sdk/go/dashboard"
	"github.com/grafana/grafana-foundation-sdk/go/heatmap"
	"github.com/grafana/grafana-foundation-sdk/go/prometheus"
	"github.com/grafana/grafana-foundation-sdk/go/stat"
	"github.com/grafana/grafana-foundation-sdk/go/statetimeline"
	"github.com/grafana/grafana-foundation-sdk/go/table"
	"github.com/grafana/grafana-foundation-sdk/go/timeseries"
)

// datasource is the templated data source every panel and every target uses.
func datasource() common.DataSourceRef {
	return common.DataSourceRef{Type: cog.ToPtr("prometheus"), Uid: cog.ToPtr("${datasource}")}
}

// panel is what every panel states: what it shows, in which unit, and its queries.
type panel struct {
	title, description string
	// unit is one of Grafana's unit ids ("s", "cps", "bytes", ...).
	unit string
	// width and height on Grafana's 24-column grid.
	width, height uint32
	targets       []target
}

type target struct {
	expr, legend string
	// format is how Grafana reads the result: as series (""), a table of one instant value per
	// series, or a heatmap's buckets.
	format prometheus.PromQueryFormat
}

// sumTarget sums expr by labels, one series per combination of their values, named by them.
func sumTarget(expr string, labels ...string) target {
	return target{expr: sumBy(expr, labels...), legend: legendOf(labels...)}
}

// maxTarget is sumTarget with the maximum.
func maxTarget(expr string, labels ...string) target {
	return target{expr: maxBy(expr, labels...), legend: legendOf(labels...)}
}

// panelBuilder is what the SDK's panel builders of every kind have in common.
type panelBuilder[B any] interface {
	cog.Builder[dashboard.Panel]
	Id(id uint32) B
	Title(title string) B
	Description(description string) B
	Datasource(datasource common.DataSourceRef) B
	Unit(unit string) B
	Span(w uint32) B
	Height(h uint32) B
	WithTarget(target cog.Builder[variants.Dataquery]) B
}

// board lays out one dashboard: rows, always expanded, each followed by its panels at the top
// level of the dashboard's panels (Grafana's layout for rows that are not collapsed), with ids
// in order of appearance.
type board struct {
	//lint:ignore SA1019 the classic dashboard model is the JSON Grafana imports and provisions (docs/dashboards.md); dashboardv2 is another schema.
	d  *dashboard.DashboardBuilder
	id uint32
}

func (b *board) nextID() uint32 {
	b.id++
	return b.id
}

func (b *board) row(title string) {
	b.d.WithRow(dashboard.NewRowBuilder(title).Id(b.nextID()))
}

// add sets what every panel has — id, title, description, unit, size, the templated data
// source — and its targets (refIds A, B, …), then places the panel after the previous one.
func add[B panelBuilder[B]](b *board, pb B, p panel) {
	pb.Id(b.nextID())
	pb.Title(p.title)
	pb.Description(p.description)
	pb.Datasource(datasource())
	pb.Unit(p.unit)
	pb.Span(p.width)
	pb.Height(p.height)
	for i, t := range p.targets {
		q := prometheus.NewDataqueryBuilder().
			Datasource(datasource()).
			RefId(string(rune('A' + i))).
			Expr(t.expr).
			LegendFormat(t.legend)
		switch t.format {
		case prometheus.PromQueryFormatTable:
			q.Instant().Format(t.format)
		case prometheus.PromQueryFormatHeatmap:
			q.Format(t.format)
		}
		pb.WithTarget(q)
	}
	b.d.WithPanel(pb)
}

// timeseries draws series with a table legend of their mean and maximum.
func (b *board) timeseries(p panel) {
	add(b, timeseries.NewPanelBuilder().
		Min(0).
		Legend(common.NewVizLegendOptionsBuilder().
			ShowLegend(true).
			DisplayMode(common.LegendDisplayModeTable).
			Placement(common.LegendPlacementBottom).
			Calcs([]string{"mean", "max"})).
		Tooltip(tooltip()), p)
}

// tooltip lists every series at the cursor, largest first.
func tooltip() *common.VizTooltipOptionsBuilder {
	return common.NewVizTooltipOptionsBuilder().Mode(common.TooltipDisplayModeMulti).Sort(common.SortOrderDescending)
}

// stat shows one number, reduced over the time range with calc ("lastNotNull", "max").
// With alertAt > 0 it turns red from that value on.
func (b *board) stat(p panel, calc string, alertAt float64) {
	steps := []dashboard.Threshold{{Color: "green"}}
	if alertAt > 0 {
		steps = append(steps, dashboard.Threshold{Value: cog.ToPtr(alertAt), Color: "red"})
	}
	add(b, stat.NewPanelBuilder().
		GraphMode(common.BigValueGraphModeArea).
		ColorMode(common.BigValueColorModeValue).
		Orientation(common.VizOrientationAuto).
		ReduceOptions(common.NewReduceDataOptionsBuilder().Calcs([]string{calc})).
		Thresholds(dashboard.NewThresholdsConfigBuilder().Mode(dashboard.ThresholdsModeAbsolute).Steps(steps)), p)
}

// heatmap draws a Prometheus histogram's buckets as they come (no recalculation): each cell is
// how many observations fell in that bucket during the interval. The y axis is in p.unit; the
// cells count observations. With repeat it is drawn once per value of that variable, side by
// side.
func (b *board) heatmap(p panel, repeat string) {
	pb := heatmap.NewPanelBuilder().
		Calculate(false).
		YAxis(heatmap.NewYAxisConfigBuilder().Unit(p.unit)).
		CellValues(heatmap.NewCellValuesBuilder().Unit("short")).
		Color(heatmap.NewHeatmapColorOptionsBuilder().
			Mode(heatmap.HeatmapColorModeScheme).
			Scheme("Oranges").
			Scale(heatmap.HeatmapColorScaleExponential).
			Exponent(0.5).
			Steps(64)).
		Tooltip(heatmap.NewHeatmapTooltipBuilder().Mode(common.TooltipDisplayModeSingle).YHistogram(true))
	if repeat != "" {
		pb.Repeat(repeat).RepeatDirection(dashboard.PanelRepeatDirectionH).MaxPerRow(4)
	}
	p.targets = slices.Clone(p.targets)
	for i := range p.targets {
		p.targets[i].legend = "{{le}}"
		p.targets[i].format = prometheus.PromQueryFormatHeatmap
	}
	add(b, pb, p)
}

// table shows instant values, one row per series, with the columns renamed: the targets'
// values by their legend, labels as they are.
func (b *board) table(p panel, sortBy string) {
	rename := map[string]any{}
	p.targets = slices.Clone(p.targets)
	for i, t := range p.targets {
		rename["Value #"+string(rune('A'+i))] = t.legend
		p.targets[i].format = prometheus.PromQueryFormatTable
	}
	if len(p.targets) == 1 {
		rename = map[string]any{"Value": p.targets[0].legend}
	}
	pb := table.NewPanelBuilder().
		Footer(common.NewTableFooterOptionsBuilder().Show(false).Reducer([]string{"sum"})).
		Transformations([]dashboard.DataTransformerConfig{
			{Id: "merge", Options: map[string]any{}},
			{Id: "organize", Options: map[string]any{
				"excludeByName": map[string]any{"Time": true},
				"renameByName":  rename,
			}},
		})
	if sortBy != "" {
		pb.SortBy([]cog.Builder[common.TableSortByFieldState]{
			common.NewTableSortByFieldStateBuilder().DisplayName(sortBy).Desc(true),
		})
	}
	add(b, pb, p)
}

// states draws 0/1 gauges over time as down/up.
func (b *board) states(p panel, off, on string) {
	add(b, statetimeline.NewPanelBuilder().
		ShowValue(common.VisibilityModeNever).
		Tooltip(tooltip()).
		Mappings([]dashboard.ValueMapping{{ValueMap: &dashboard.ValueMap{
			Type: dashboard.MappingTypeValueToText,
			Options: map[string]dashboard.ValueMappingResult{
				"0": {Text: cog.ToPtr(off), Color: cog.ToPtr("red"), Index: cog.ToPtr[int32](0)},
				"1": {Text: cog.ToPtr(on), Color: cog.ToPtr("green"), Index: cog.ToPtr[int32](1)},
			},
		}}}), p)
}

// newBoard starts a dashboard with a stable uid, its variables, and a link to the other
// endpointlag dashboards (by tag) that keeps the time range and the variables.
func newBoard(uid, title, description string, variables ...cog.Builder[dashboard.VariableModel]) *board {
	//lint:ignore SA1019 as for board.d.
	d := dashboard.NewDashboardBuilder(title).
		Uid(uid).
		Description(description).
		Tags([]string{"endpointlag"}).
		Readonly().
		Refresh("1m").
		Time("now-3h", "now").
		Tooltip(dashboard.DashboardCursorSyncCrosshair).
		Link(dashboard.NewDashboardLinkBuilder("endpointlag").
			Type(dashboard.DashboardLinkTypeDashboards).
			Tags([]string{"endpointlag"}).
			AsDropdown(false).
			IncludeVars(true).
			KeepTime(true))
	for _, v := range variables {
		d.WithVariable(v)
	}
	return &board{d: d}
}
