package main

import (
	"fmt"
	"io"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"k8s.io/apimachinery/pkg/types"

	"github.com/endpointlag/endpointlag/lab/cluster"
	"github.com/endpointlag/endpointlag/lab/load"
	"github.com/endpointlag/endpointlag/lab/report"
	"github.com/endpointlag/endpointlag/lab/scenario"
)

// demoAdvice is what sized rollout 2's preStop: the aggregator's advice for the app (what
// endpointlag advise prints), each replaced pod's convergence, and the stage-by-stage view.
type demoAdvice struct {
	rec    scenario.Recommendation
	advice scenario.Advice
	conv   map[types.UID]scenario.PodConvergence
}

func writeReport(w io.Writer, o options, c *cluster.Cluster, rollouts []*scenario.Rollout, adv demoAdvice) {
	fmt.Fprintf(w, "\n==== endpointlag demo report ====\n")
	paths := "its ClusterIP"
	if len(rollouts) > 0 && len(rollouts[0].Paths) > 1 {
		paths = strings.Join(rollouts[0].Paths, ", ")
	}
	fmt.Fprintf(w, "lab: %d nodes, kube-proxy %s mode; app demo/web, 4 replicas; load %d req/s on each path (%s), %s\n",
		len(c.Nodes), o.ProxyMode, o.rate, paths, map[bool]string{true: "keep-alive", false: "a new connection per request"}[o.keepAlive])
	for i, r := range rollouts {
		fmt.Fprintf(w, "\n-- %s: preStop %s, on SIGTERM %s; %d pods replaced in %s --\n", r.Name,
			r.Behaviour.PreStop, describe(r.Behaviour), len(r.Deleted), r.Took.Round(100*time.Millisecond))
		fmt.Fprintf(w, "requests: %d, failed: %d%s\n", r.Summary.Requests, r.Summary.Failed, kinds(r.Summary.ByKind))
		if len(r.Paths) > 1 {
			for _, p := range r.Paths {
				s := r.ByPath[p]
				fmt.Fprintf(w, "  %-9s %6d requests, %4d failed%s\n", pathName(p)+":", s.Requests, s.Failed, kinds(s.ByKind))
			}
		}
		if bk := backendKinds(r); len(bk) > 0 {
			fmt.Fprintf(w, "failed requests to the ClusterIP went to%s, by the client node's conntrack\n", strings.TrimSuffix(strings.Replace(kinds(bk), " (", ": ", 1), ")"))
		}
		fmt.Fprintf(w, "new connections endpointlag saw reach replaced pods (eBPF, pods' nodes): %s\n", r.Connections())
		if traced, inFlight, seen, _ := r.MatchFailures(); traced > 0 {
			fmt.Fprintf(w, "failed requests traced to replaced pods: %d, of which endpointlag saw %d (matched by client port); %d were in flight before the deletion\n",
				traced, seen, inFlight)
		}
		fmt.Fprintln(w, "lags endpointlag measured (propagation: since the pod's deletion, measured on the pod's node and")
		fmt.Fprintln(w, "composed for the others: the pod's node's endpointslice lag + that node's programming lag;")
		fmt.Fprintln(w, "programming: since this node saw the EndpointSlice change; ingress/<kind>: a proxy of that kind):")
		report.WriteLags(w, r.Lags)
		if i == 0 {
			writeConvergence(w, r, adv.conv)
			fmt.Fprintf(w, "recommended preStop: %s\n", adv.advice)
			fmt.Fprintf(w, "  by stage: %s\n", adv.rec)
		}
	}
	fmt.Fprintf(w, "\nfailure logs: %s/failures-rollout{1,2}.log; component logs: %s/logs/\n", o.StateDir, o.StateDir)
	fmt.Fprintln(w, "the daemons' metrics, while a lab runs (`make lab-up` keeps one running):")
	for _, n := range c.Nodes {
		fmt.Fprintf(w, "  %s: %s/metrics\n", n.Name, n.DaemonURL)
	}
	fmt.Fprintf(w, "  aggregator: %s/metrics, bin/endpointlag advise --aggregator %s\n", c.AggregatorURL, c.AggregatorURL)
}

// writeConvergence prints each replaced pod's convergence as the aggregator composed it.
func writeConvergence(w io.Writer, r *scenario.Rollout, conv map[types.UID]scenario.PodConvergence) {
	fmt.Fprintln(w, "convergence per replaced pod (endpointlag aggregate: from the pod's deletion to the last node or")
	fmt.Fprintln(w, "proxy at each stage, composed from same-clock differences only):")
	type row struct {
		name, home, nodes, all, last string
	}
	var rows []row
	for uid, p := range r.Deleted {
		pc, ok := conv[uid]
		if !ok {
			continue
		}
		rw := row{name: p.Name, home: pc.Home, nodes: strings.Join(pc.Reported, ","), all: "-", last: "-"}
		for _, s := range pc.Convergence.Stages {
			if s.Stage == "all" {
				rw.all = fmt.Sprintf("%.3fs", s.Seconds)
				rw.last = s.Source + " on " + s.Node
			}
		}
		rows = append(rows, rw)
	}
	sort.Slice(rows, func(i, j int) bool { return rows[i].name < rows[j].name })
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "pod\tnode\treported by\tconvergence\tlast to stop\t")
	for _, rw := range rows {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t\n", rw.name, rw.home, rw.nodes, rw.all, rw.last)
	}
	_ = tw.Flush()
}

func describe(b scenario.Behaviour) string {
	switch {
	case b.Drain > 0 && b.Unready:
		return "drain " + b.Drain.String() + " failing readiness"
	case b.Drain > 0:
		return "drain " + b.Drain.String()
	}
	return "exit at once"
}

func kinds(m map[string]int) string {
	if len(m) == 0 {
		return ""
	}
	var parts []string
	for k, v := range m {
		parts = append(parts, fmt.Sprintf("%s %d", k, v))
	}
	sort.Strings(parts)
	return " (" + strings.Join(parts, ", ") + ")"
}

// pathName is how the report names a load path.
func pathName(p string) string {
	switch p {
	case load.PathClusterIP:
		return "ClusterIP"
	case load.PathTraefik:
		return "Traefik"
	case load.PathHAProxy:
		return "HAProxy"
	}
	return p
}

// backendKinds counts the failures of the ClusterIP path by where kube-proxy sent them: a pod
// the rollout replaced, a pod that replaced it, or unknown (the conntrack entry was gone when
// looked up). A proxy's failures have no such trace: the client's node sent them to the proxy.
func backendKinds(r *scenario.Rollout) map[string]int {
	old := map[string]bool{}
	for _, p := range r.Deleted {
		old[p.Status.PodIP] = true
	}
	out := map[string]int{}
	for _, res := range r.Load {
		switch {
		case res.Failure == "" || res.Path != load.PathClusterIP:
		case res.BackendIP == "":
			out["unknown"]++
		case old[res.BackendIP]:
			out["replaced pods"]++
		default:
			out["new pods"]++
		}
	}
	return out
}
