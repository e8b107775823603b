// Package aggregate joins the records every node's daemon pushes into one figure per terminating
// pod — its convergence: from the pod's deletion (T0) to the moment the last node and the last
// proxy stopped sending it new connections — and per workload into a preStop recommendation.
//
// No figure subtracts one node's clock from another's. The pod's node measures T0 → the slice
// change it saw; every other node measures the slice change it saw → its own stages. The
// composition adds the two: it is exact up to the spread with which the nodes receive the same
// slice update (a few milliseconds; measured in the lab, see docs/aggregate.md).
package aggregate

import (
	"math"
	"slices"
	"sort"
	"time"

	"github.com/endpointlag/endpointlag/collector"
	"github.com/endpointlag/endpointlag/probes"
)

// StageAll is the convergence over every routing stage: the last node or proxy to stop sending
// the pod new connections.
const StageAll = "all"

// Margin is what the recommendation adds to the p99 convergence before rounding up to whole
// seconds; the demo's report uses the same rule.
const Margin = time.Second

// Recommend is the preStop for a p99 convergence: p99 + Margin, rounded up to whole seconds.
func Recommend(p99 float64) time.Duration {
	return time.Duration(math.Ceil(p99+Margin.Seconds())) * time.Second
}

// StageConvergence is when the last node (or proxy) reached one stage, from T0.
type StageConvergence struct {
	Stage string `json:"stage"`
	// Seconds from T0; Node is where the last one was, Source what (a probe, a proxy instance).
	Seconds float64 `json:"seconds"`
	Node    string  `json:"node"`
	Source  string  `json:"source"`
}

// NodeStage is one node's stage of the pod, on the pod's T0 axis.
type NodeStage struct {
	Node    string  `json:"node"`
	Stage   string  `json:"stage"`
	Source  string  `json:"source,omitempty"`
	Path    string  `json:"path,omitempty"`
	Seconds float64 `json:"seconds"`
}

// Convergence is one pod's figure, from what the nodes reported.
type Convergence struct {
	Pod      probes.PodRef    `json:"pod"`
	Home     string           `json:"home,omitempty"`
	Declared *probes.Declared `json:"declared,omitempty"`
	T0       *time.Time       `json:"t0,omitempty"`
	// Stages are the per-stage maxima, StageAll among them when a routing stage was measured;
	// Timeline every node's stages on the same axis (the waterfall).
	Stages   []StageConvergence `json:"stages"`
	Timeline []NodeStage        `json:"timeline"`
	// Late and Dead are the connections the pod's node saw after T0 (late: reached the pod while
	// it terminated; dead: sent to its address once gone), with their times from T0.
	Late []float64 `json:"late,omitempty"`
	Dead []float64 `json:"dead,omitempty"`
}

// Seconds is the convergence at stage, and whether it was measured.
func (c Convergence) Seconds(stage string) (float64, bool) {
	s, ok := c.stage(stage)
	return s.Seconds, ok
}

func (c Convergence) stage(stage string) (StageConvergence, bool) {
	for _, s := range c.Stages {
		if s.Stage == stage {
			return s, true
		}
	}
	return StageConvergence{}, false
}

// Compose computes a pod's convergence from each node's records of it (by node name). Without
// the pod's node (the one whose records are Local) there is no T0 and no figure: ok is false.
func Compose(byNode map[string][]collector.RecordView) (c Convergence, ok bool) {
	// The pod's node: T0, and for each endpoint the slice lag there (T0 → its slice change).
	sliceLag := map[string]float64{}
	minLag := math.Inf(1)
	for node, recs := range byNode {
		for _, r := range recs {
			if !r.Local || r.T0 == nil {
				continue
			}
			c.Home, c.T0, c.Pod, ok = node, r.T0, r.Pod, true
			if r.Declared != nil {
				c.Declared = r.Declared
			}
			for _, s := range r.Stages {
				if s.Stage == string(probes.StageEndpointSlice) && s.Propagation != nil {
					sliceLag[r.Key()] = *s.Propagation
					minLag = math.Min(minLag, *s.Propagation)
				}
			}
			for _, cn := range r.Connections {
				if cn.Node {
					continue
				}
				d := cn.Time.Sub(*r.T0).Seconds()
				if cn.Kind == "dead" {
					c.Dead = append(c.Dead, d)
				} else {
					c.Late = append(c.Late, d)
				}
			}
		}
	}
	if !ok {
		return Convergence{}, false
	}
	best := map[string]StageConvergence{}
	note := func(stage string, sc StageConvergence) {
		have, found := best[stage]
		if !found || sc.Seconds > have.Seconds || sc.Seconds == have.Seconds && sc.Node+sc.Source < have.Node+have.Source {
			sc.Stage = stage
			best[stage] = sc
		}
	}
	for node, recs := range byNode {
		for _, r := range recs {
			lagThere, known := sliceLag[r.Key()]
			if !known {
				lagThere, known = minLag, !math.IsInf(minLag, 1)
			}
			for _, s := range r.Stages {
				if s.Stage == string(probes.StageDeleted) {
					continue // T0 itself
				}
				var secs float64
				switch {
				case node == c.Home && s.Propagation != nil:
					secs = *s.Propagation
				case node != c.Home && s.Programming != nil && known:
					secs = lagThere + *s.Programming
				case node != c.Home && s.Stage == string(probes.StageEndpointSlice) && known && !s.Initial && !s.Relist:
					// Every node's slice change is the pod's node's, within the fan-out spread.
					secs = lagThere
				default:
					continue
				}
				c.Timeline = append(c.Timeline, NodeStage{Node: node, Stage: s.Stage, Source: s.Source, Path: s.Path, Seconds: secs})
				sc := StageConvergence{Seconds: secs, Node: node, Source: s.Source}
				note(s.Stage, sc)
				if probes.Stage(s.Stage).Routing() {
					note(StageAll, sc)
				}
			}
		}
	}
	for _, sc := range best {
		c.Stages = append(c.Stages, sc)
	}
	sort.Slice(c.Stages, func(i, j int) bool { return c.Stages[i].Stage < c.Stages[j].Stage })
	sort.Slice(c.Timeline, func(i, j int) bool {
		a, b := c.Timeline[i], c.Timeline[j]
		if a.Seconds != b.Seconds {
			return a.Seconds < b.Seconds
		}
		return a.Node+a.Stage+a.Source+a.Path < b.Node+b.Stage+b.Source+b.Path
	})
	c.Timeline = slices.Compact(c.Timeline)
	sort.Float64s(c.Late)
	sort.Float64s(c.Dead)
	return c, true
}
