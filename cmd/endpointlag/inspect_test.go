package main

import (
	"bytes"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/endpointlag/endpointlag/collector"
	"github.com/endpointlag/endpointlag/probes"
)

// The table tells a stage that does not apply on this node (n/a), one kube-proxy holds back on
// purpose (held), one first seen on a relist (?) and a removal owed to a fallback's end (!), and
// puts the external path in a column of its own.
func TestInspectTableMarks(t *testing.T) {
	at := time.Date(2026, 11, 29, 12, 0, 0, 0, time.UTC)
	f := func(v float64) *float64 { return &v }
	ep := func(ip string) probes.Endpoint {
		return probes.Endpoint{Addr: netip.MustParseAddr(ip), Port: 8080, Protocol: "TCP"}
	}
	svc := probes.ServiceRef{Namespace: "shop", Name: "web"}
	slice := collector.StageView{Stage: "endpointslice", Source: "kube", Time: at}
	resp := RecordsResponse{Node: "node-a", Records: []collector.RecordView{
		{Pod: probes.PodRef{Namespace: "shop", Name: "remote"}, Service: svc, Endpoint: ep("10.244.2.1"),
			Stages: []collector.StageView{slice}, NotApplicable: []string{"nftables"}, Pending: []string{"endpointslice_removed"}},
		{Pod: probes.PodRef{Namespace: "shop", Name: "solo"}, Service: svc, Endpoint: ep("10.244.1.1"),
			Stages:  []collector.StageView{slice, {Stage: "nftables", Path: "cluster", Time: at.Add(time.Second), Programming: f(1)}},
			Awaited: []string{"nftables/cluster", "nftables/external"}, Held: []string{"nftables/external"}},
		{Pod: probes.PodRef{Namespace: "shop", Name: "gap"}, Service: svc, Endpoint: ep("10.244.1.2"),
			Stages: []collector.StageView{slice,
				{Stage: "nftables", Path: "cluster", Time: at.Add(3 * time.Second), Relist: true, Precision: 3},
				{Stage: "nftables", Path: "external", Time: at.Add(9 * time.Second), Fallback: true}},
			Awaited: []string{"nftables/cluster", "nftables/external"}},
	}}
	var out bytes.Buffer
	writeTable(&out, resp, at)
	lines := strings.Split(out.String(), "\n")
	header := strings.Fields(lines[0])
	want := []string{"POD", "SERVICE", "ENDPOINT", "LOCAL", "DELETED", "ENDPOINTSLICE", "ENDPOINTSLICE_REMOVED", "NFTABLES", "NFTABLES/EXTERNAL", "GONE", "PENDING", "CONNECTIONS"}
	if strings.Join(header, " ") != strings.Join(want, " ") {
		t.Fatalf("header %q, want %q", header, want)
	}
	cells := func(i int) (string, string) {
		row := strings.Fields(lines[i])
		return row[7], row[8]
	}
	local := at.Local()
	for i, w := range [][2]string{
		{"n/a", "n/a"},
		{"~1.000s", "held"},
		{local.Add(3*time.Second).Format("15:04:05.000") + "?", local.Add(9*time.Second).Format("15:04:05.000") + "!"},
	} {
		if a, b := cells(i + 1); a != w[0] || b != w[1] {
			t.Errorf("row %d: nftables %q, nftables/external %q; want %q, %q\n%s", i+1, a, b, w[0], w[1], out.String())
		}
	}
}
