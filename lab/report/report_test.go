package report

import (
	"math"
	"testing"
)

func TestCompute(t *testing.T) {
	vs := make([]float64, 0, 200)
	for i := 200; i >= 1; i-- {
		vs = append(vs, float64(i)/1000)
	}
	got := Compute(vs)
	want := Stats{N: 200, P50: 0.100, P99: 0.198, Max: 0.200}
	if got != want {
		t.Errorf("Compute = %+v, want %+v", got, want)
	}
	if got := Compute(nil); got != (Stats{}) {
		t.Errorf("Compute(nil) = %+v", got)
	}
	if got := Compute([]float64{0.5}); got != (Stats{N: 1, P50: 0.5, P99: 0.5, Max: 0.5}) {
		t.Errorf("Compute of one = %+v", got)
	}
}

func f(v float64) *float64 { return &v }

func TestLags(t *testing.T) {
	rec := func(uid string, local bool, slice, removed *float64, prog *float64) Record {
		var r Record
		r.Pod.UID, r.Local = uid, local
		r.Stages = []StageEntry{
			{Stage: "deleted", Propagation: f(0)},
			{Stage: "endpointslice", Propagation: slice},
			{Stage: "endpointslice_removed", Propagation: removed, Programming: prog},
		}
		return r
	}
	withIngress := rec("a", true, f(0.01), f(1), f(0.99))
	withIngress.Stages = append(withIngress.Stages,
		StageEntry{Stage: "ingress", Source: "traefik:ing/t", Kind: "traefik", Programming: f(0.7)},
		StageEntry{Stage: "ingress", Source: "haproxy:ing/h", Kind: "haproxy", Programming: f(0.1)})
	all := []Records{
		{Node: "node1", Records: []Record{withIngress, rec("b", false, nil, nil, f(0.5)), rec("skip", true, f(9), f(9), f(9))}},
		{Node: "node2", Records: []Record{rec("a", false, nil, nil, f(0.98))}},
	}
	rows := Lags(all, func(r Record) bool { return r.Pod.UID != "skip" })
	// node2's propagation for pod a is composed: a's slice lag on node1 (0.01) + node2's
	// programming (0.98).
	var got []string
	for _, r := range rows {
		got = append(got, r.Reference+" "+r.Stage+" "+r.Node)
	}
	want := []string{
		"propagation endpointslice node1",
		"propagation endpointslice_removed node1",
		"propagation endpointslice_removed node2",
		"programming ingress/haproxy node1",
		"programming ingress/traefik node1",
		"programming endpointslice_removed node1",
		"programming endpointslice_removed node2",
	}
	if len(got) != len(want) {
		t.Fatalf("rows %q, want %q", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("row %d = %q, want %q", i, got[i], want[i])
		}
	}
	if st := rows[2].Stats; st.N != 1 || math.Abs(st.Max-0.99) > 1e-9 {
		t.Errorf("node2 composed propagation stats %+v, want one value of 0.99", st)
	}
	if rows[5].Stats != (Stats{N: 2, P50: 0.5, P99: 0.99, Max: 0.99}) {
		t.Errorf("node1 programming stats %+v", rows[5].Stats)
	}
}
