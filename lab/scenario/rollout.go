package scenario

import (
	"context"
	"fmt"
	"io"
	"math"
	"slices"
	"sort"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/endpointlag/endpointlag/lab/cluster"
	"github.com/endpointlag/endpointlag/lab/load"
	"github.com/endpointlag/endpointlag/lab/report"
)

// Rollout is what one rolling restart under load gave.
type Rollout struct {
	Name      string
	Behaviour Behaviour
	// Deleted are the pods the rollout replaced.
	Deleted map[types.UID]corev1.Pod
	Load    []load.Result
	// Paths are the load's paths, in the order of the app's targets; Summary counts every
	// path's requests, ByPath each path's.
	Paths   []string
	Summary load.Summary
	ByPath  map[string]load.Summary
	// Records are every daemon's records of the deleted pods.
	Records []report.Records
	Lags    []report.Row
	// Names maps the pod IPs seen in the rollout, old and new, to pod names.
	Names map[string]string
	Took  time.Duration
}

// LoadSettings are the load generator's knobs for a rollout.
type LoadSettings struct {
	Rate      int
	KeepAlive bool
	// Timeout bounds each request (default 1 s).
	Timeout time.Duration
}

// RunRollout restarts the app under load and collects what the load generator and the daemons
// saw. The load starts 2 s before the restart and stops 2 s after the app has settled.
func RunRollout(ctx context.Context, c *cluster.Cluster, app *App, name string, b Behaviour, ls LoadSettings, progress io.Writer) (*Rollout, error) {
	return RunRolloutWith(ctx, c, app, name, b, ls, progress, nil)
}

// RunRolloutWith is RunRollout with a fault: during, when set, runs right after the rollout
// started (a restart of the API server, of a daemon, of kube-proxy), and the rollout is waited
// for once it returned.
func RunRolloutWith(ctx context.Context, c *cluster.Cluster, app *App, name string, b Behaviour, ls LoadSettings, progress io.Writer, during func(context.Context) error) (*Rollout, error) {
	r := &Rollout{Name: name, Behaviour: b}
	if err := app.WaitServing(ctx, c.ClientNS(), time.Minute); err != nil {
		return nil, err
	}
	var err error
	if r.Deleted, err = app.Pods(ctx); err != nil {
		return nil, err
	}
	targets, err := app.Targets(ctx)
	if err != nil {
		return nil, err
	}
	lr, err := c.StartLoad(fmt.Sprintf("%s-%d", app.Name, time.Now().UnixNano()), load.Config{Targets: targets, Rate: ls.Rate, Duration: 5 * time.Minute, KeepAlive: ls.KeepAlive, Timeout: ls.Timeout})
	if err != nil {
		return nil, err
	}
	var along []string
	for _, t := range targets {
		r.Paths = append(r.Paths, t.Path)
		along = append(along, t.Path+" "+t.Addr)
	}
	stopped := false
	defer func() {
		if !stopped {
			_, _ = lr.Stop()
		}
	}()
	fmt.Fprintf(progress, "%s: load at %d req/s on each path (%s) from the client pod on %s\n", name, ls.Rate, strings.Join(along, ", "), c.Nodes[0].Name)
	sleepCtx(ctx, 2*time.Second)
	start := time.Now()
	if err := app.Restart(ctx); err != nil {
		return nil, err
	}
	fmt.Fprintf(progress, "%s: rollout restart of %s/%s (preStop %s, on SIGTERM: %s)\n", name, app.Namespace, app.Name, b.PreStop, b.annotation())
	if during != nil {
		if err := during(ctx); err != nil {
			return nil, err
		}
	}
	if err := app.WaitSettled(ctx, 3*time.Minute); err != nil {
		return nil, err
	}
	r.Took = time.Since(start)
	current, err := app.Pods(ctx)
	if err != nil {
		return nil, err
	}
	r.Names = map[string]string{}
	for _, set := range []map[types.UID]corev1.Pod{r.Deleted, current} {
		for _, p := range set {
			if p.Status.PodIP != "" {
				r.Names[p.Status.PodIP] = p.Name
			}
		}
	}
	fmt.Fprintf(progress, "%s: rolled out in %s\n", name, r.Took.Round(100*time.Millisecond))
	sleepCtx(ctx, 2*time.Second)
	stopped = true
	if r.Load, err = lr.Stop(); err != nil {
		return nil, err
	}
	r.Summary = load.Summarize(r.Load)
	r.ByPath = load.SummarizeByPath(r.Load)
	for _, n := range c.Nodes {
		recs, err := c.Records(ctx, n)
		if err != nil {
			return nil, fmt.Errorf("%s's daemon: %w", n.Name, err)
		}
		kept := recs.Records[:0]
		for _, rec := range recs.Records {
			if _, ok := r.Deleted[types.UID(rec.Pod.UID)]; ok {
				kept = append(kept, rec)
			}
		}
		recs.Records = kept
		r.Records = append(r.Records, recs)
	}
	r.Lags = report.Lags(r.Records, func(report.Record) bool { return true })
	return r, nil
}

// LastRouted is the last request on path (load.PathTraefik, …) that pod answered: the proxy of
// that path (or, for the ClusterIP, the client node's rules) routed it to the pod between its
// Start and Start+Latency. ok is false when the pod answered none on that path.
func (r *Rollout) LastRouted(path, pod string) (load.Result, bool) {
	return load.LastRouted(r.Load, path, pod)
}

// trafficStages are the stages after which no new connection reaches a terminating endpoint
// through kube-proxy, best first: the node's dataplane, or failing that the EndpointSlice change
// every dataplane reacts to.
var trafficStages = []string{"nftables", "iptables", "ipvs", "endpointslice"}

// ExtraStages are stages on other paths that preStop must also cover when the daemons report
// them: "ingress", when each proxy stops sending new requests to a terminating endpoint, one
// path per proxy kind (the lag table's ingress/<kind>).
var ExtraStages = []string{"ingress"}

// Margin is added to the measured lag when sizing preStop; while only the EndpointSlice stage is
// measured it also covers kube-proxy's own sync delay (minSyncPeriod, 1 s by default).
const Margin = time.Second

// StageLag is one stage's largest p99 propagation lag over nodes, in seconds.
type StageLag struct {
	Stage string
	P99   float64
}

// Recommendation is a preStop sized from a rollout.
type Recommendation struct {
	PreStop time.Duration
	// Stages are the stages weighed: the last traffic-stopping stage of kube-proxy's path
	// measured, then every extra stage (ExtraStages) the daemons reported. The slowest sized it.
	Stages []StageLag
}

// Slowest is the stage that sized the recommendation.
func (r Recommendation) Slowest() StageLag {
	var s StageLag
	for _, st := range r.Stages {
		if st.P99 >= s.P99 {
			s = st
		}
	}
	return s
}

// String explains the recommendation.
func (r Recommendation) String() string {
	if r.PreStop == 0 {
		return "none: nothing measured"
	}
	s := r.Slowest()
	out := fmt.Sprintf("%s = p99 propagation to the %s stage (%.3fs, worst node) + %s margin, rounded up", r.PreStop, s.Stage, s.P99, Margin)
	if len(r.Stages) > 1 {
		var parts []string
		for _, st := range r.Stages {
			parts = append(parts, fmt.Sprintf("%s %.3fs", st.Stage, st.P99))
		}
		return out + "; the slowest of " + strings.Join(parts, ", ")
	}
	return out + fmt.Sprintf("; no daemon reported an %s stage, so paths through proxies are not in it", strings.Join(ExtraStages, " or "))
}

// Recommend sizes preStop from a rollout: the largest p99 over nodes of the propagation lag at
// the last traffic-stopping stage measured on kube-proxy's path, or at an extra stage
// (ExtraStages) when the daemons measured one and it is slower, plus Margin, rounded up to whole
// seconds. Without extra stages it is the rule of kube-proxy's path alone.
func Recommend(rows []report.Row) Recommendation {
	worst := func(stage string) (StageLag, bool) {
		l, found := StageLag{Stage: stage}, false
		for _, r := range rows {
			if r.Reference == "propagation" && r.Stage == stage && r.Stats.N > 0 {
				l.P99, found = math.Max(l.P99, r.Stats.P99), true
			}
		}
		return l, found
	}
	// The stages the rows have under an extra stage: "ingress/traefik", "ingress/haproxy", …
	under := func(stage string) []string {
		var out []string
		for _, r := range rows {
			if (r.Stage == stage || strings.HasPrefix(r.Stage, stage+"/")) && !slices.Contains(out, r.Stage) {
				out = append(out, r.Stage)
			}
		}
		sort.Strings(out)
		return out
	}
	var rec Recommendation
	for _, stage := range trafficStages {
		if l, ok := worst(stage); ok {
			rec.Stages = append(rec.Stages, l)
			break
		}
	}
	if len(rec.Stages) == 0 {
		return rec
	}
	for _, extra := range ExtraStages {
		for _, stage := range under(extra) {
			if l, ok := worst(stage); ok {
				rec.Stages = append(rec.Stages, l)
			}
		}
	}
	rec.PreStop = time.Duration(math.Ceil(rec.Slowest().P99+Margin.Seconds())) * time.Second
	return rec
}

func sleepCtx(ctx context.Context, d time.Duration) {
	select {
	case <-ctx.Done():
	case <-time.After(d):
	}
}

// MatchFailures pairs each failed request the load generator traced to a replaced pod with a late
// or dead connection a daemon recorded for that pod's address, by the client's port (the lab never
// reuses one). A request that started before the pod's T0 (the earliest any daemon recorded) was
// in flight when the deletion began: not a new connection after it, so not one the daemons must
// have seen; those are counted apart. It returns how many were traced (in flight or not), in
// flight and seen, and a line for each unseen one.
func (r *Rollout) MatchFailures() (traced, inFlight, seen int, missed []string) {
	replaced := map[string]string{}
	for _, p := range r.Deleted {
		for _, ip := range p.Status.PodIPs {
			replaced[ip.IP] = p.Name
		}
	}
	conns := map[string]bool{}
	t0 := map[string]time.Time{}
	for _, recs := range r.Records {
		for _, rec := range recs.Records {
			if _, ok := replaced[rec.Endpoint.IP]; ok && rec.T0 != nil {
				if have, ok := t0[rec.Endpoint.IP]; !ok || rec.T0.Before(have) {
					t0[rec.Endpoint.IP] = *rec.T0
				}
			}
			for _, cn := range rec.Connections {
				if i := strings.LastIndex(cn.Client, ":"); i > 0 {
					conns[rec.Endpoint.IP+" "+cn.Client[i+1:]] = true
				}
			}
		}
	}
	for _, res := range r.Load {
		name, ok := replaced[res.BackendIP]
		if res.Failure == "" || !ok {
			continue
		}
		traced++
		switch at, known := t0[res.BackendIP]; {
		case conns[fmt.Sprintf("%s %d", res.BackendIP, res.SrcPort)]:
			seen++
		case known && res.Start.Before(at):
			inFlight++
		default:
			since := "no T0 recorded"
			if known {
				since = fmt.Sprintf("started %s after T0", res.Start.Sub(at).Round(time.Microsecond))
			}
			missed = append(missed, fmt.Sprintf("%s at %s from port %d to %s (%s, %s; %s)",
				res.Failure, res.Start.Format("15:04:05.000"), res.SrcPort, name, res.BackendIP, res.TCPState, since))
		}
	}
	return traced, inFlight, seen, missed
}

// ConnectionSummary is what the daemons' packets probes saw of the replaced pods.
type ConnectionSummary struct {
	// Late are new connections that reached a pod after its deletion began, Dead those sent to
	// its address after it was gone (each SYN retransmission counts).
	Late, Dead int
	// LastLate is the latest late connection after its pod's T0.
	LastLate time.Duration
}

func (s ConnectionSummary) String() string {
	return fmt.Sprintf("%d late (the last %.3fs after its pod's deletion), %d to pods already gone", s.Late, s.LastLate.Seconds(), s.Dead)
}

// Connections sums up the late and dead connections the daemons recorded.
func (r *Rollout) Connections() ConnectionSummary {
	var s ConnectionSummary
	for _, recs := range r.Records {
		for _, rec := range recs.Records {
			for _, cn := range rec.Connections {
				if cn.Kind == "dead" {
					s.Dead++
					continue
				}
				s.Late++
				if rec.T0 != nil {
					s.LastLate = max(s.LastLate, cn.Time.Sub(*rec.T0))
				}
			}
		}
	}
	return s
}
