package main

import (
	"fmt"
	"io"
	"sort"
	"strings"
	"time"

	"github.com/endpointlag/endpointlag/lab/cluster"
	"github.com/endpointlag/endpointlag/lab/report"
	"github.com/endpointlag/endpointlag/lab/scenario"
)

func writeReport(w io.Writer, o options, c *cluster.Cluster, rollouts []*scenario.Rollout, preStop time.Duration, stage string, p99 float64) {
	fmt.Fprintf(w, "\n==== endpointlag demo report ====\n")
	fmt.Fprintf(w, "lab: %d nodes, kube-proxy %s mode; app demo/web, 4 replicas; load %d req/s, %s\n",
		len(c.Nodes), o.ProxyMode, o.rate, map[bool]string{true: "keep-alive", false: "a new connection per request"}[o.keepAlive])
	for i, r := range rollouts {
		fmt.Fprintf(w, "\n-- %s: preStop %s, on SIGTERM %s; %d pods replaced in %s --\n", r.Name,
			r.Behaviour.PreStop, describe(r.Behaviour), len(r.Deleted), r.Took.Round(100*time.Millisecond))
		fmt.Fprintf(w, "requests: %d, failed: %d%s\n", r.Summary.Requests, r.Summary.Failed, kinds(r.Summary.ByKind))
		if r.Summary.Failed > 0 {
			fmt.Fprintf(w, "failed requests went to%s, by the client node's conntrack\n", strings.TrimSuffix(strings.Replace(kinds(backendKinds(r)), " (", ": ", 1), ")"))
		}
		fmt.Fprintf(w, "new connections endpointlag saw reach replaced pods (eBPF, pods' nodes): %s\n", r.Connections())
		if traced, inFlight, seen, _ := r.MatchFailures(); traced > 0 {
			fmt.Fprintf(w, "failed requests traced to replaced pods: %d, of which endpointlag saw %d (matched by client port); %d were in flight before the deletion\n",
				traced, seen, inFlight)
		}
		fmt.Fprintln(w, "lags endpointlag measured (propagation: since the pod's deletion, on the pod's node;")
		fmt.Fprintln(w, "programming: since this node saw the EndpointSlice change):")
		report.WriteLags(w, r.Lags)
		if i == 0 {
			fmt.Fprintf(w, "recommended preStop: %s = p99 propagation to the %s stage (%.3fs, worst node) + %s margin, rounded up\n",
				preStop, stage, p99, scenario.Margin)
		}
	}
	fmt.Fprintf(w, "\nfailure logs: %s/failures-rollout{1,2}.log; component logs: %s/logs/\n", o.StateDir, o.StateDir)
	fmt.Fprintln(w, "the daemons' metrics, while a lab runs (`make lab-up` keeps one running):")
	for _, n := range c.Nodes {
		fmt.Fprintf(w, "  %s: %s/metrics\n", n.Name, n.DaemonURL)
	}
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

// backendKinds counts the failures by where kube-proxy sent them: a pod the rollout replaced, a
// pod that replaced it, or unknown (the conntrack entry was gone when looked up).
func backendKinds(r *scenario.Rollout) map[string]int {
	old := map[string]bool{}
	for _, p := range r.Deleted {
		old[p.Status.PodIP] = true
	}
	out := map[string]int{}
	for _, res := range r.Load {
		switch {
		case res.Failure == "":
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
