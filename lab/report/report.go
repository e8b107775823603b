// Package report reads what the lab's endpointlag daemons measured (their /api/v1/records) and
// summarises it per stage and node.
package report

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"net/http"
	"sort"
	"strings"
	"text/tabwriter"
	"time"
)

// Records mirrors the daemon's /api/v1/records answer, keeping what the report needs.
type Records struct {
	Node    string   `json:"node"`
	Records []Record `json:"records"`
}

// Record is one terminating endpoint's timeline.
type Record struct {
	Pod struct {
		Namespace string `json:"namespace"`
		Name      string `json:"name"`
		UID       string `json:"uid"`
	} `json:"pod"`
	Service struct {
		Namespace string `json:"namespace"`
		Name      string `json:"name"`
	} `json:"service"`
	Endpoint struct {
		IP       string `json:"ip"`
		Port     int    `json:"port"`
		Protocol string `json:"protocol"`
	} `json:"endpoint"`
	Local  bool         `json:"local"`
	T0     *time.Time   `json:"t0"`
	Stages []StageEntry `json:"stages"`
	// Serving and Fallback: the endpoint's serving condition when it turned terminating, and
	// where kube-proxy then kept routing to it for want of a ready endpoint (KEP-1669).
	Serving  bool `json:"serving"`
	Fallback struct {
		Cluster bool `json:"cluster"`
		Local   bool `json:"local"`
	} `json:"fallback"`
	// Pending are the stages still awaited; Awaited the dataplane stages and paths ("stage/path")
	// the node's rules reached the endpoint on, Held those kube-proxy holds back on purpose, and
	// NotApplicable the dataplane stages its rules never reached it at.
	Pending       []string `json:"pending"`
	Awaited       []string `json:"awaited"`
	Held          []string `json:"held"`
	NotApplicable []string `json:"not_applicable"`
	// Connections are the new connections the packets probe saw reach the pod after T0 (late)
	// or its address after it was gone (dead).
	Connections []Connection `json:"connections"`
}

// Connection is one late or dead connection.
type Connection struct {
	Time   time.Time `json:"time"`
	Client string    `json:"client"`
	Kind   string    `json:"kind"`
	// Node: the client is one of the node's own addresses (the kubelet's probes, say).
	Node bool `json:"node"`
}

// StageEntry is one stage of a timeline.
type StageEntry struct {
	Stage string `json:"stage"`
	// Source is who saw it (for the ingress stage, the proxy instance); Kind, for the ingress
	// stage, the proxy kind.
	Source string `json:"source"`
	Kind   string `json:"kind"`
	// Path is, for dataplane stages, "cluster" or "external".
	Path    string    `json:"path"`
	Time    time.Time `json:"time"`
	Initial bool      `json:"initial"`
	// Relist: first seen on a re-read after a gap; Fallback: a removal kube-proxy held back while
	// no ready endpoint was left. Neither has a lag.
	Relist   bool `json:"relist"`
	Fallback bool `json:"fallback"`
	// Slice is, for the EndpointSlice stages, the slice change: namespace/name@resourceVersion.
	Slice       string   `json:"slice"`
	Precision   float64  `json:"precision_seconds"`
	Programming *float64 `json:"programming_seconds"`
	Propagation *float64 `json:"propagation_seconds"`
}

// StagePath returns the entry for a dataplane stage on path, or nil.
func (r *Record) StagePath(stage, path string) *StageEntry {
	for i := range r.Stages {
		if r.Stages[i].Stage == stage && r.Stages[i].Path == path {
			return &r.Stages[i]
		}
	}
	return nil
}

// Ingress returns the ingress stage entry from the proxy instance source, or nil.
func (r *Record) Ingress(source string) *StageEntry {
	for i := range r.Stages {
		if r.Stages[i].Stage == "ingress" && r.Stages[i].Source == source {
			return &r.Stages[i]
		}
	}
	return nil
}

// Column names a stage as the lag table groups it: the stage, or ingress/<kind> for the ingress
// stage (each proxy kind is a path of its own).
func (s StageEntry) Column() string {
	if s.Stage == "ingress" && s.Kind != "" {
		return "ingress/" + s.Kind
	}
	return s.Stage
}

// Stage returns the first entry for stage, or nil.
func (r *Record) Stage(stage string) *StageEntry {
	for i := range r.Stages {
		if r.Stages[i].Stage == stage {
			return &r.Stages[i]
		}
	}
	return nil
}

// Fetch reads one daemon's records.
func Fetch(ctx context.Context, baseURL string) (Records, error) {
	return FetchWith(ctx, http.DefaultClient, "", baseURL)
}

// FetchWith reads one daemon's records with client, sending token as a bearer token when set (a
// daemon that checks its callers, as the manifests run it).
func FetchWith(ctx context.Context, client *http.Client, token, baseURL string) (Records, error) {
	var out Records
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, baseURL+"/api/v1/records", nil)
	if err != nil {
		return out, err
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := client.Do(req)
	if err != nil {
		return out, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return out, fmt.Errorf("%s: %s", baseURL, resp.Status)
	}
	return out, json.NewDecoder(resp.Body).Decode(&out)
}

// Stats of a set of lags, in seconds.
type Stats struct {
	N             int
	P50, P99, Max float64
}

// Compute returns exact order statistics (nearest rank).
func Compute(vs []float64) Stats {
	if len(vs) == 0 {
		return Stats{}
	}
	s := append([]float64(nil), vs...)
	sort.Float64s(s)
	rank := func(q float64) float64 {
		i := int(math.Ceil(q*float64(len(s)))) - 1
		return s[max(i, 0)]
	}
	return Stats{N: len(s), P50: rank(0.5), P99: rank(0.99), Max: s[len(s)-1]}
}

// Row is one line of the lag table.
type Row struct {
	Node      string
	Reference string // propagation or programming
	Stage     string
	Stats     Stats
}

// Lags gathers, per node, reference and stage, the lags of the records selected by keep.
// Propagation is measured only on the pod's own node (the only one that knows when it was
// deleted); for the other nodes it is composed, as a cluster-wide view does without comparing
// two nodes' clocks: the pod's node's endpointslice propagation (deletion → that node saw the
// slice change) + the other node's programming lag (it saw the slice change → the stage).
func Lags(all []Records, keep func(Record) bool) []Row {
	sliceLag := map[string]float64{} // pod UID → endpointslice propagation on its own node
	for _, rs := range all {
		for _, r := range rs.Records {
			if s := r.Stage("endpointslice"); r.Local && s != nil && s.Propagation != nil {
				sliceLag[r.Pod.UID] = *s.Propagation
			}
		}
	}
	var rows []Row
	for _, rs := range all {
		values := map[[2]string][]float64{}
		add := func(ref, stage string, v float64) {
			values[[2]string{ref, stage}] = append(values[[2]string{ref, stage}], v)
		}
		for _, r := range rs.Records {
			if !keep(r) {
				continue
			}
			slice, composable := sliceLag[r.Pod.UID]
			for _, s := range r.Stages {
				switch {
				case s.Propagation != nil && s.Stage != "deleted":
					add("propagation", s.Column(), *s.Propagation)
				case s.Propagation == nil && s.Programming != nil && !r.Local && composable:
					add("propagation", s.Column(), slice+*s.Programming)
				}
				if s.Programming != nil {
					add("programming", s.Column(), *s.Programming)
				}
			}
		}
		for k, v := range values {
			rows = append(rows, Row{Node: rs.Node, Reference: k[0], Stage: k[1], Stats: Compute(v)})
		}
	}
	order := map[string]int{"endpointslice": 0, "nftables": 1, "iptables": 1, "ipvs": 1, "ingress": 2, "endpointslice_removed": 3, "gone": 9}
	rank := func(stage string) int {
		s, _, _ := strings.Cut(stage, "/")
		return order[s]
	}
	sort.Slice(rows, func(i, j int) bool {
		a, b := rows[i], rows[j]
		if a.Reference != b.Reference {
			return a.Reference > b.Reference
		}
		if a.Stage != b.Stage {
			if rank(a.Stage) != rank(b.Stage) {
				return rank(a.Stage) < rank(b.Stage)
			}
			return a.Stage < b.Stage
		}
		return a.Node < b.Node
	})
	return rows
}

// WriteLags prints the rows as a table.
func WriteLags(w io.Writer, rows []Row) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "reference\tstage\tnode\tendpoints\tp50\tp99\tmax\t")
	for _, r := range rows {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%s\t%s\t%s\t\n", r.Reference, r.Stage, r.Node, r.Stats.N,
			seconds(r.Stats.P50), seconds(r.Stats.P99), seconds(r.Stats.Max))
	}
	tw.Flush()
}

func seconds(v float64) string {
	if v < 1 {
		return fmt.Sprintf("%.0fms", v*1000)
	}
	return strings.TrimSuffix(fmt.Sprintf("%.2fs", v), "0")
}
