package aggregate

import (
	"fmt"
	"log/slog"
	"math"
	"slices"
	"sort"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"k8s.io/utils/clock"

	"github.com/endpointlag/endpointlag/collector"
	"github.com/endpointlag/endpointlag/probes"
)

// Batch is what a daemon pushes (POST /api/v1/push): the records it holds that are settled (no
// stage pending any more, or old enough), or none as a heartbeat.
type Batch struct {
	Node    string                 `json:"node"`
	Records []collector.RecordView `json:"records,omitempty"`
}

// Options bound the aggregator's state and say when a pod's figure is final.
type Options struct {
	// MaxPods is how many terminating pods are held; the oldest go first, counted.
	MaxPods int
	// Settle is how long after a pod's first report its figure waits for the daemons that have
	// not reported it; it is final earlier once every live daemon did.
	Settle time.Duration
	// DaemonTimeout is how long a daemon that pushed nothing (not even its heartbeat) still
	// counts as live.
	DaemonTimeout time.Duration
	// MaxWorkloads bounds the workloads with figures of their own (metrics labels); Window and
	// MaxSamples the terminations each keeps for its p99.
	MaxWorkloads int
	Window       time.Duration
	MaxSamples   int
}

// DefaultOptions are the aggregate command's defaults.
func DefaultOptions() Options {
	return Options{MaxPods: 20000, Settle: 2 * time.Minute, DaemonTimeout: 90 * time.Second,
		MaxWorkloads: 500, Window: 24 * time.Hour, MaxSamples: 1000}
}

// Validate says what is wrong with the options.
func (o Options) Validate() error {
	switch {
	case o.MaxPods <= 0:
		return fmt.Errorf("max pods must be positive, got %d", o.MaxPods)
	case o.Settle <= 0:
		return fmt.Errorf("settle must be positive, got %s", o.Settle)
	case o.DaemonTimeout <= 0:
		return fmt.Errorf("daemon timeout must be positive, got %s", o.DaemonTimeout)
	case o.MaxWorkloads <= 0:
		return fmt.Errorf("max workloads must be positive, got %d", o.MaxWorkloads)
	case o.Window <= 0 || o.MaxSamples <= 0:
		return fmt.Errorf("the advisor's window (%s) and samples (%d) must be positive", o.Window, o.MaxSamples)
	}
	return nil
}

// Aggregator joins the daemons' records by pod UID.
type Aggregator struct {
	opts  Options
	clock clock.PassiveClock
	log   *slog.Logger
	m     *metrics

	// events posts Events on workloads whose terminations outlast their preStop (nil: none).
	events *Eventer

	mu        sync.Mutex
	pods      map[string]*podState
	order     []string        // pod UIDs, oldest first
	open      map[string]bool // the pods not final yet
	daemons   map[string]time.Time
	workloads map[workloadKey]*workload
}

type podState struct {
	uid    string
	first  time.Time
	byNode map[string]map[string]collector.RecordView // node → record key → record
	final  bool
	// conv is the figure once final (ok false: the pod's node never reported); missing the live
	// daemons that had not reported it then.
	conv    Convergence
	ok      bool
	missing []string
}

type workloadKey struct{ namespace, kind, name string }

type workload struct {
	declared     *probes.Declared
	samples      []sample
	terminations uint64
	late, dead   uint64
	// afterPreStop counts the terminations that reached the pod after its declared preStop.
	afterPreStop uint64
}

type sample struct {
	at      time.Time
	seconds float64
}

// SetEventer makes the aggregator post Events on workloads whose terminations outlast their
// declared preStop. Call it before the first Push.
func (a *Aggregator) SetEventer(e *Eventer) { a.events = e }

// New returns an aggregator whose metrics reg registers (nil: none).
func New(opts Options, reg prometheus.Registerer, clk clock.PassiveClock, log *slog.Logger) (*Aggregator, error) {
	if err := opts.Validate(); err != nil {
		return nil, err
	}
	a := &Aggregator{opts: opts, clock: clk, log: log, pods: map[string]*podState{}, open: map[string]bool{},
		daemons: map[string]time.Time{}, workloads: map[workloadKey]*workload{}}
	a.m = newMetrics(a)
	if reg != nil {
		if err := a.m.register(reg); err != nil {
			return nil, err
		}
	}
	return a, nil
}

// Push takes a daemon's batch. A record pushed again (it changed) replaces the one before.
func (a *Aggregator) Push(b Batch) error {
	if b.Node == "" {
		return fmt.Errorf("a batch without its node's name")
	}
	now := a.clock.Now()
	a.mu.Lock()
	defer a.mu.Unlock()
	a.daemons[b.Node] = now
	touched := map[string]bool{}
	for _, r := range b.Records {
		uid := r.Pod.UID
		if uid == "" {
			return fmt.Errorf("a record of %s without its pod's UID", r.Pod)
		}
		p := a.pods[uid]
		if p == nil {
			a.evict()
			p = &podState{uid: uid, first: now, byNode: map[string]map[string]collector.RecordView{}}
			a.pods[uid] = p
			a.order = append(a.order, uid)
			a.open[uid] = true
		}
		if p.final {
			a.m.late.Inc() // a report after the figure was final: the figure stands
			continue
		}
		if p.byNode[b.Node] == nil {
			p.byNode[b.Node] = map[string]collector.RecordView{}
		}
		p.byNode[b.Node][r.Key()] = r
		touched[uid] = true
	}
	a.m.reports.Add(float64(len(b.Records)))
	a.settle(now, touched, false)
	return nil
}

// Tick makes final the pods whose settle time has passed and forgets daemons long silent; the
// aggregate command calls it every second.
func (a *Aggregator) Tick() {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.settle(a.clock.Now(), a.open, true)
}

// live returns the daemons heard from within DaemonTimeout. Called with a.mu held.
func (a *Aggregator) live(now time.Time) []string {
	var out []string
	for node, at := range a.daemons {
		if now.Sub(at) <= a.opts.DaemonTimeout {
			out = append(out, node)
		} else if now.Sub(at) > 10*a.opts.DaemonTimeout {
			delete(a.daemons, node)
		}
	}
	sort.Strings(out)
	return out
}

// settle makes final those of uids that every live daemon reported, and with timeouts those
// past Settle; the daemons that were live when the pod was first reported, or are now, and did
// not report it are named as missing. Called with a.mu held.
func (a *Aggregator) settle(now time.Time, uids map[string]bool, timeouts bool) {
	live := a.live(now)
	for uid := range uids {
		p := a.pods[uid]
		if p == nil || p.final {
			continue
		}
		waiting := false
		for _, n := range live {
			_, reported := p.byNode[n]
			waiting = waiting || !reported
		}
		if waiting && !(timeouts && now.Sub(p.first) >= a.opts.Settle) {
			continue
		}
		// Missing: the daemons live when the pod was first reported (heard from since
		// DaemonTimeout before) that did not report it.
		var missing []string
		for n, heard := range a.daemons {
			if _, ok := p.byNode[n]; !ok && heard.After(p.first.Add(-a.opts.DaemonTimeout)) {
				missing = append(missing, n)
			}
		}
		sort.Strings(missing)
		a.finalize(p, missing, now)
	}
}

// finalize computes a pod's figure and adds it to the metrics and its workload. Called with a.mu
// held.
func (a *Aggregator) finalize(p *podState, missing []string, now time.Time) {
	p.final, p.missing = true, missing
	delete(a.open, p.uid)
	p.conv, p.ok = p.compose()
	switch {
	case !p.ok:
		a.m.pods.WithLabelValues("no_home").Inc()
		return
	case len(missing) > 0:
		a.m.pods.WithLabelValues("missing_nodes").Inc()
	default:
		a.m.pods.WithLabelValues("complete").Inc()
	}
	for _, s := range p.conv.Stages {
		a.m.convergence.WithLabelValues(s.Stage).Observe(s.Seconds)
	}
	a.addToWorkload(p.conv, now)
}

// addToWorkload counts a pod's figure for its workload. Called with a.mu held.
func (a *Aggregator) addToWorkload(c Convergence, now time.Time) {
	if c.Declared == nil || c.Declared.Workload.Kind == "" {
		return
	}
	k := workloadKey{c.Pod.Namespace, c.Declared.Workload.Kind, c.Declared.Workload.Name}
	w := a.workloads[k]
	if w == nil {
		if len(a.workloads) >= a.opts.MaxWorkloads {
			a.m.workloadsDropped.Inc()
			return
		}
		w = &workload{}
		a.workloads[k] = w
	}
	w.declared = c.Declared
	w.terminations++
	w.late += uint64(len(c.Late))
	w.dead += uint64(len(c.Dead))
	all, ok := c.Seconds(StageAll)
	if ok {
		w.samples = append(w.samples, sample{at: now, seconds: all})
		cut := 0
		for cut < len(w.samples) && (now.Sub(w.samples[cut].at) > a.opts.Window || len(w.samples)-cut > a.opts.MaxSamples) {
			cut++
		}
		w.samples = w.samples[cut:]
	}
	late := 0
	for _, d := range c.Late {
		if d > c.Declared.PreStopSeconds {
			late++
		}
	}
	if c.Declared.PreStopKnown && (ok && all > c.Declared.PreStopSeconds || late > 0) {
		w.afterPreStop++
		if a.events != nil {
			a.events.note(c, all, late)
		}
	}
}

// evict drops the oldest pod when the cap is reached, finalizing it first. Called with a.mu held.
func (a *Aggregator) evict() {
	for len(a.pods) >= a.opts.MaxPods && len(a.order) > 0 {
		uid := a.order[0]
		a.order = a.order[1:]
		if p := a.pods[uid]; p != nil && !p.final {
			a.finalize(p, nil, a.clock.Now())
		}
		delete(a.pods, uid)
		delete(a.open, uid)
		a.m.evicted.Inc()
	}
	if cap(a.order) > 2*a.opts.MaxPods {
		a.order = slices.Clone(a.order)
	}
}

// PodSummary is one pod in the list of recent terminations.
type PodSummary struct {
	Pod      probes.PodRef      `json:"pod"`
	Workload probes.WorkloadRef `json:"workload"`
	Home     string             `json:"home,omitempty"`
	First    time.Time          `json:"first_report"`
	Final    bool               `json:"final"`
	// Seconds is the convergence over all routing stages, when measured.
	Seconds  *float64 `json:"seconds,omitempty"`
	Reported []string `json:"reported"`
	Missing  []string `json:"missing,omitempty"`
}

// PodDetail is one pod: its figure (with every node's stages) and who reported it.
type PodDetail struct {
	PodSummary
	Convergence Convergence `json:"convergence"`
}

// Pods lists the pods held, newest first, at most limit.
func (a *Aggregator) Pods(limit int) []PodSummary {
	a.mu.Lock()
	defer a.mu.Unlock()
	var out []PodSummary
	for i := len(a.order) - 1; i >= 0 && len(out) < limit; i-- {
		if p := a.pods[a.order[i]]; p != nil {
			sum, _ := a.summary(p)
			out = append(out, sum)
		}
	}
	return out
}

// Pod returns one pod's detail.
func (a *Aggregator) Pod(uid string) (PodDetail, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	p := a.pods[uid]
	if p == nil {
		return PodDetail{}, false
	}
	s, c := a.summary(p)
	return PodDetail{PodSummary: s, Convergence: c}, true
}

// summary sums a pod up, with its figure (so far, when not final). Called with a.mu held.
func (a *Aggregator) summary(p *podState) (PodSummary, Convergence) {
	s := PodSummary{First: p.first, Final: p.final, Missing: p.missing}
	for n, recs := range p.byNode {
		s.Reported = append(s.Reported, n)
		for _, r := range recs {
			s.Pod = r.Pod
			if r.Local {
				s.Home = n
				if r.Declared != nil {
					s.Workload = r.Declared.Workload
				}
			}
		}
	}
	s.Pod.UID = p.uid
	sort.Strings(s.Reported)
	c := p.conv
	if !p.final {
		c, _ = p.compose()
	}
	if v, ok := c.Seconds(StageAll); ok {
		s.Seconds = &v
	}
	return s, c
}

// compose computes the pod's figure from the records held.
func (p *podState) compose() (Convergence, bool) {
	byNode := make(map[string][]collector.RecordView, len(p.byNode))
	for n, recs := range p.byNode {
		for _, r := range recs {
			byNode[n] = append(byNode[n], r)
		}
	}
	return Compose(byNode)
}

// Advice is one workload's figures over the window, as /api/v1/advice gives them. Samples lets
// a reader of several aggregator replicas (sharded by pod UID) merge them.
type Advice struct {
	Namespace string             `json:"namespace"`
	Workload  probes.WorkloadRef `json:"workload"`
	Declared  *probes.Declared   `json:"declared,omitempty"`
	// Terminations seen, Late and Dead connections over them, AfterPreStop the terminations that
	// reached the pod after its declared preStop.
	Terminations uint64    `json:"terminations"`
	Late         uint64    `json:"late_connections"`
	Dead         uint64    `json:"dead_connections"`
	AfterPreStop uint64    `json:"after_prestop"`
	Samples      []float64 `json:"samples"`
	// P99 (of Samples), the recommended preStop and the shortfall (recommended − declared, when
	// positive and the declared one is known).
	P99         *float64 `json:"p99_seconds,omitempty"`
	Recommended *float64 `json:"recommended_prestop_seconds,omitempty"`
	Shortfall   *float64 `json:"shortfall_seconds,omitempty"`
}

// Advise lists every workload's figures, sorted by namespace, kind and name.
func (a *Aggregator) Advise() []Advice {
	a.mu.Lock()
	out := make([]Advice, 0, len(a.workloads))
	for k, w := range a.workloads {
		ad := Advice{Namespace: k.namespace, Workload: probes.WorkloadRef{Kind: k.kind, Name: k.name}, Declared: w.declared,
			Terminations: w.terminations, Late: w.late, Dead: w.dead, AfterPreStop: w.afterPreStop}
		for _, s := range w.samples {
			ad.Samples = append(ad.Samples, s.seconds)
		}
		out = append(out, ad)
	}
	a.mu.Unlock()
	for i := range out {
		out[i].Complete()
	}
	SortAdvice(out)
	return out
}

// SortAdvice orders workloads by namespace, kind and name.
func SortAdvice(ads []Advice) {
	sort.Slice(ads, func(i, j int) bool {
		a, b := ads[i], ads[j]
		return a.Namespace+"/"+a.Workload.Kind+"/"+a.Workload.Name < b.Namespace+"/"+b.Workload.Kind+"/"+b.Workload.Name
	})
}

// Complete computes P99, Recommended and Shortfall from Samples and Declared.
func (ad *Advice) Complete() {
	ad.P99, ad.Recommended, ad.Shortfall = nil, nil, nil
	if len(ad.Samples) == 0 {
		return
	}
	p99 := Quantile(ad.Samples, 0.99)
	rec := Recommend(p99).Seconds()
	ad.P99, ad.Recommended = &p99, &rec
	if ad.Declared != nil && ad.Declared.PreStopKnown {
		short := math.Max(0, rec-ad.Declared.PreStopSeconds)
		ad.Shortfall = &short
	}
}

// Quantile is the q-quantile of vs by the nearest-rank method (the value at rank ⌈q·n⌉).
func Quantile(vs []float64, q float64) float64 {
	s := slices.Clone(vs)
	sort.Float64s(s)
	i := int(math.Ceil(q*float64(len(s)))) - 1
	return s[max(0, min(i, len(s)-1))]
}

// Merge joins the advice of several aggregator replicas: the same workload's samples and counts
// add up.
func Merge(parts ...[]Advice) []Advice {
	byKey := map[string]*Advice{}
	var keys []string
	for _, part := range parts {
		for _, ad := range part {
			k := ad.Namespace + "/" + ad.Workload.String()
			have := byKey[k]
			if have == nil {
				c := ad
				c.Samples = slices.Clone(ad.Samples)
				byKey[k] = &c
				keys = append(keys, k)
				continue
			}
			have.Terminations += ad.Terminations
			have.Late += ad.Late
			have.Dead += ad.Dead
			have.AfterPreStop += ad.AfterPreStop
			have.Samples = append(have.Samples, ad.Samples...)
			if have.Declared == nil {
				have.Declared = ad.Declared
			}
		}
	}
	out := make([]Advice, 0, len(keys))
	for _, k := range keys {
		ad := *byKey[k]
		ad.Complete()
		out = append(out, ad)
	}
	SortAdvice(out)
	return out
}
