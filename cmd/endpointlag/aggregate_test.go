package main

import (
	"bytes"
	"fmt"
	"log/slog"
	"net/http/httptest"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"k8s.io/utils/clock"

	"github.com/endpointlag/endpointlag/collector"
	"github.com/endpointlag/endpointlag/collector/aggregate"
	"github.com/endpointlag/endpointlag/probes"
)

// advise merges what two aggregator replicas hold (each pod on one of them) into one table.
func TestAdvise(t *testing.T) {
	var urls []string
	var aggs []*aggregate.Aggregator
	for range 2 {
		reg := prometheus.NewRegistry()
		a, err := aggregate.New(aggregate.DefaultOptions(), reg, clock.RealClock{}, slog.New(slog.DiscardHandler))
		if err != nil {
			t.Fatal(err)
		}
		srv := httptest.NewServer(aggregate.Handler(a, reg))
		t.Cleanup(srv.Close)
		urls, aggs = append(urls, srv.URL), append(aggs, a)
	}
	t0 := time.Now()
	for i := range 40 {
		uid := fmt.Sprintf("uid-%d", i)
		conv := 0.4
		if i == 7 {
			conv = 2.5
		}
		rec := collector.RecordView{Pod: probes.PodRef{Namespace: "shop", Name: "web-" + uid, UID: uid},
			Service: probes.ServiceRef{Namespace: "shop", Name: "web"}, Endpoint: probes.Endpoint{Addr: netip.MustParseAddr("10.244.1.5"), Port: 8080, Protocol: "TCP"},
			Local: true, T0: &t0, Declared: &probes.Declared{Workload: probes.WorkloadRef{Kind: "Deployment", Name: "web"}, PreStopSeconds: 2, PreStopKnown: true, GraceSeconds: 30},
			Stages: []collector.StageView{{Stage: "nftables", Time: t0.Add(time.Duration(conv * float64(time.Second))), Propagation: &conv}}}
		if err := aggs[aggregate.Shard(uid, urls)].Push(aggregate.Batch{Node: "node1", Records: []collector.RecordView{rec}}); err != nil {
			t.Fatal(err)
		}
	}
	var out, errOut bytes.Buffer
	if code := run([]string{"advise", "--aggregator=" + strings.Join(urls, ",")}, &out, &errOut); code != 0 {
		t.Fatalf("advise: exit %d: %s", code, errOut.String())
	}
	t.Logf("\n%s", out.String())
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	if len(lines) != 2 {
		t.Fatalf("want a header and one workload:\n%s", out.String())
	}
	// p99 of 40 is the slowest; 2.5 + 1 rounded up: 4 s; declared 2 s: 2 s short; 1 after it.
	for _, want := range []string{"shop", "deployment/web", "2s", "30s", "2.5s", "4s", "40", "1"} {
		if !strings.Contains(lines[1], want) {
			t.Errorf("the row lacks %q: %s", want, lines[1])
		}
	}
	if f := strings.Fields(lines[1]); len(f) != 11 || f[6] != "2s" || f[7] != "40" || f[8] != "1" {
		t.Errorf("row fields %q: want shortfall 2s, 40 terminations, 1 after preStop", f)
	}
	out.Reset()
	if code := run([]string{"advise", "--aggregator=" + urls[0], "-o", "json"}, &out, &errOut); code != 0 || !strings.Contains(out.String(), `"recommended_prestop_seconds"`) {
		t.Errorf("advise -o json: exit %d\n%s", code, out.String())
	}
	for _, bad := range [][]string{{"advise", "-o", "yaml"}, {"aggregate", "--settle=0"}, {"aggregate", "--log.format=xml"}} {
		errOut.Reset()
		if code := run(bad, &out, &errOut); code != 2 {
			t.Errorf("%v: exit %d, want 2 (%s)", bad, code, errOut.String())
		}
	}
	errOut.Reset()
	if code := run([]string{"advise", "--aggregator=http://127.0.0.1:1"}, &out, &errOut); code != 1 || !strings.Contains(errOut.String(), "is endpointlag aggregate running") {
		t.Errorf("advise against nothing: exit %d: %s", code, errOut.String())
	}
}

func TestPushFlags(t *testing.T) {
	var errOut bytes.Buffer
	code := run([]string{"--node-name=node1", "--probe.packets=false", "--probe.nftables=false", "--probe.iptables=false", "--probe.ipvs=false", "--probe.ingress=false",
		"--aggregator.urls=endpointlag-aggregate:9870"}, &bytes.Buffer{}, &errOut)
	if code != 2 || !strings.Contains(errOut.String(), "--aggregator.urls") {
		t.Errorf("a URL without a scheme: exit %d: %s", code, errOut.String())
	}
}
