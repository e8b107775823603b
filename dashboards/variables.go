package main

import (
	"github.com/grafana/grafana-foundation-sdk/go/cog"
	"github.com/grafana/grafana-foundation-sdk/go/dashboard"
)

// The jobs the chart's scrape configuration names: the DaemonSet's and the aggregator's (the
// name of its Service in deploy/base/aggregate.yaml).
const (
	daemonJob     = "endpointlag"
	aggregatorJob = "endpointlag-aggregate"
)

// dataSourceVariable picks the Prometheus every panel reads.
func dataSourceVariable() *dashboard.DatasourceVariableBuilder {
	return dashboard.NewDatasourceVariableBuilder("datasource").
		Label("Data source").
		Description("The Prometheus that scrapes endpointlag.").
		Type("prometheus")
}

// labelVariable lists the values of the label called name on the series sel selects, refreshed
// when the time range changes so that nodes and clusters that come and go are listed.
func labelVariable(name, title, description, sel string) *dashboard.QueryVariableBuilder {
	query := "label_values(" + sel + ", " + name + ")"
	return dashboard.NewQueryVariableBuilder(name).
		Label(title).
		Description(description).
		Datasource(datasource()).
		Query(dashboard.StringOrMap{String: cog.ToPtr(query)}).
		Definition(query).
		Refresh(dashboard.VariableRefreshOnTimeRangeChanged).
		Sort(dashboard.VariableSortAlphabeticalAsc)
}

// all makes v a multi-select whose "All" matches allValue, selected unless current says else.
func all(v *dashboard.QueryVariableBuilder, allValue string) *dashboard.QueryVariableBuilder {
	return v.Multi(true).IncludeAll(true).AllValue(allValue).
		Current(dashboard.VariableOption{
			Text:  dashboard.StringOrArrayOfString{String: cog.ToPtr("All")},
			Value: dashboard.StringOrArrayOfString{String: cog.ToPtr("$__all")},
		})
}

// clusterVariable: All matches ".*", so a Prometheus whose series have no cluster label works
// unchanged.
func clusterVariable() *dashboard.QueryVariableBuilder {
	return all(labelVariable("cluster", "Cluster",
		"The cluster label, where one Prometheus holds several clusters. All also matches series without it.",
		"endpointlag_build_info"), ".*")
}

// jobVariable defaults to the given jobs; All matches every job (".+"), and every query names an
// endpointlag metric or keeps only the jobs that export one, so All stays within endpointlag.
func jobVariable(jobs ...string) *dashboard.QueryVariableBuilder {
	return all(labelVariable("job", "Job",
		"The scrape jobs of the endpointlag daemons and aggregator.",
		selector("endpointlag_build_info", []string{matchCluster})), ".+").
		Current(dashboard.VariableOption{
			Text:  dashboard.StringOrArrayOfString{ArrayOfString: jobs},
			Value: dashboard.StringOrArrayOfString{ArrayOfString: jobs},
		})
}

// nodesVariable selects any number of nodes, All by default (".*": series without a node label
// too, when the scrape does not set it).
func nodesVariable() *dashboard.QueryVariableBuilder {
	return all(labelVariable("node", "Node",
		"The nodes whose daemons to show: the node label the scrape sets from the pod's node name.",
		daemonTargets()), ".*")
}

// nodeVariable selects one node; Grafana starts with the first.
func nodeVariable() *dashboard.QueryVariableBuilder {
	return labelVariable("node", "Node",
		"The node whose daemon to show: the node label the scrape sets from the pod's node name.",
		daemonTargets())
}

// stageVariable lists the stages the chosen daemons measured (the lag histograms' stage label);
// the heatmaps repeat per stage.
func stageVariable() *dashboard.QueryVariableBuilder {
	return all(labelVariable("stage", "Stage",
		"The stages to show: endpointslice, nftables, iptables, ipvs, ingress, endpointslice_removed.",
		selector("", []string{`__name__=~"endpointlag_(propagation|programming)_seconds_count"`, matchJob, matchCluster, matchNode})), ".+")
}
