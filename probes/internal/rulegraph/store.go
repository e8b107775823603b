package rulegraph

import (
	"sync"
	"time"

	"github.com/endpointlag/endpointlag/probes"
)

// Store is what a rule probe publishes to its readers — Snapshot (inspect rules) and Reaches (the
// collector, when an endpoint starts terminating) — and keeps across runs: a run the daemon starts
// again after a failure compares its first read with what the last run knew.
type Store struct {
	mu sync.Mutex
	// state is nil until the rules were read.
	state *State
	// last is when the last run last read its source.
	last time.Time
}

// When says when published changes happened, as well as a probe knows.
type When struct {
	Time time.Time
	// Precision is how much earlier they may have happened.
	Precision time.Duration
	// Relist: found by reading the source whole after a gap (lost messages, a run started again).
	Relist bool
}

// Publish updates the graph and the published state and returns the endpoints no longer reached.
func (s *Store) Publish(g *Graph) []Removal {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.state == nil {
		s.state = NewState()
	}
	return g.Publish(s.state)
}

// Start says when a run's first read, g, happened: for the first run nothing is reported (what
// the rules held at start is no change); for a run started again, what went since the last run
// last read is compared and reported, as a relist.
func (s *Store) Start(g *Graph, now time.Time) When {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.state == nil {
		return When{}
	}
	g.Compare(s.state)
	return When{Time: now, Precision: now.Sub(s.last), Relist: true}
}

// Stop notes when the ending run last read its source.
func (s *Store) Stop(last time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.last = last
}

// Reaches implements probes.Dataplane for the probe.
func (s *Store) Reaches(svc probes.ServiceRef, ep probes.Endpoint) ([]probes.Reach, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.state == nil {
		return nil, false
	}
	return s.state.Reaches(svc, ep), true
}

// Snapshot lists the published state; ok is false before the rules were read.
func (s *Store) Snapshot() (_ []probes.ServiceEndpoints, ok bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.state == nil {
		return nil, false
	}
	return s.state.Snapshot(), true
}

// Len is the number of groups published.
func (s *Store) Len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.state.Len()
}

// Observations turns removals into the observations of stage by source at w; a zero w (a first
// read) gives none.
func Observations(stage probes.Stage, source string, w When, removed []Removal) []probes.Observation {
	if w.Time.IsZero() {
		return nil
	}
	out := make([]probes.Observation, 0, len(removed))
	for _, r := range removed {
		out = append(out, probes.Observation{Stage: stage, Time: w.Time, Precision: w.Precision, Relist: w.Relist,
			Source: source, Service: r.Service, Path: r.Path, Endpoint: r.Endpoint})
	}
	return out
}
