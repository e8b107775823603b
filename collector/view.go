package collector

import (
	"net/netip"
	"sort"
	"time"

	"github.com/endpointlag/endpointlag/probes"
)

// RecordView is one terminating endpoint's timeline as `endpointlag inspect` and the daemon's
// /api/v1/records show it.
type RecordView struct {
	Pod      probes.PodRef     `json:"pod"`
	Service  probes.ServiceRef `json:"service"`
	Endpoint probes.Endpoint   `json:"endpoint"`
	// Local is true when the pod runs on the reporting node, so T0 and propagation are known.
	Local bool `json:"local"`
	// T0 is when the pod got its deletionTimestamp as this daemon saw it; T0API is the API
	// server's own value (1 s precision).
	T0      *time.Time  `json:"t0,omitempty"`
	T0API   *time.Time  `json:"t0_api,omitempty"`
	Stages  []StageView `json:"stages"`
	Pending []string    `json:"pending,omitempty"`
	// Connections are the new connections to this endpoint after T0 that the packets probe
	// reported (the first ones, up to a limit per pod), for local pods.
	Connections []ConnectionView `json:"connections,omitempty"`
}

// ConnectionView is one new connection that reached a terminating pod (late) or was sent to the
// address of a pod already gone (dead).
type ConnectionView struct {
	Time   time.Time      `json:"time"`
	Client netip.AddrPort `json:"client"`
	Kind   string         `json:"kind"`
}

// StageView is one stage of a timeline. The lags are absent where the reference is unknown.
type StageView struct {
	Stage     string    `json:"stage"`
	Source    string    `json:"source"`
	Time      time.Time `json:"time"`
	Precision float64   `json:"precision_seconds,omitempty"`
	// Initial: the daemon found the endpoint already at this stage when it started.
	Initial     bool     `json:"initial,omitempty"`
	Programming *float64 `json:"programming_seconds,omitempty"`
	Propagation *float64 `json:"propagation_seconds,omitempty"`
}

// Records returns every record held, oldest first.
func (c *Collector) Records() []RecordView {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make([]RecordView, 0, len(c.records))
	for _, r := range c.records {
		out = append(out, c.view(r))
	}
	sort.Slice(out, func(i, j int) bool {
		a, b := out[i], out[j]
		if !a.Stages[0].Time.Equal(b.Stages[0].Time) {
			return a.Stages[0].Time.Before(b.Stages[0].Time)
		}
		return a.Endpoint.String()+a.Service.String() < b.Endpoint.String()+b.Service.String()
	})
	return out
}

func (c *Collector) view(r *record) RecordView {
	v := RecordView{Pod: r.pod, Service: r.key.service, Endpoint: r.key.endpoint, Local: r.local}
	progRef, hasProg := r.programmingRef()
	t0, hasT0 := r.t0()
	if t := r.timeline; t != nil {
		if !t.t0.IsZero() {
			v.T0 = &t.t0
			s := StageView{Stage: string(probes.StageDeleted), Source: t.t0Source, Time: t.t0, Initial: t.t0Initial}
			if hasT0 {
				s.Propagation = ptr(0.0)
			}
			v.Stages = append(v.Stages, s)
		}
		if !t.t0API.IsZero() {
			v.T0API = &t.t0API
		}
	}
	for _, e := range r.stages {
		s := StageView{Stage: string(e.stage), Source: e.source, Time: e.at, Precision: e.precision.Seconds(), Initial: e.initial}
		if !e.initial {
			if hasProg && e.stage != probes.StageEndpointSlice {
				s.Programming = ptr(lag(e.at, progRef))
			}
			if hasT0 {
				s.Propagation = ptr(lag(e.at, t0))
			}
		}
		v.Stages = append(v.Stages, s)
	}
	if t := r.timeline; t != nil && !t.gone.IsZero() {
		s := StageView{Stage: string(probes.StageGone), Source: t.t0Source, Time: t.gone}
		if hasT0 {
			s.Propagation = ptr(lag(t.gone, t0))
		}
		v.Stages = append(v.Stages, s)
	}
	sort.SliceStable(v.Stages, func(i, j int) bool { return v.Stages[i].Time.Before(v.Stages[j].Time) })
	if t := r.timeline; t != nil {
		for _, cn := range t.conns {
			if cn.endpoint == r.key.endpoint {
				v.Connections = append(v.Connections, ConnectionView{Time: cn.at, Client: cn.peer, Kind: cn.kind})
			}
		}
	}
	for _, s := range c.pendingStages(r) {
		v.Pending = append(v.Pending, string(s))
	}
	return v
}

func ptr[T any](v T) *T { return &v }
