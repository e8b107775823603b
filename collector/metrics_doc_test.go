package collector

import (
	"bufio"
	"context"
	"errors"
	"log/slog"
	"net/netip"
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"k8s.io/utils/clock"

	"github.com/endpointlag/endpointlag/probes"
	"github.com/endpointlag/endpointlag/probes/ingress"
	"github.com/endpointlag/endpointlag/probes/packets"
)

// docRow is one metric as docs/metrics.md lists it.
type docRow struct {
	typ    string
	labels []string
}

var rowRE = regexp.MustCompile("^\\| `(endpointlag_[a-z_]+)` \\| ([a-z]+) \\|([^|]*)\\|")

func readMetricsDoc(t *testing.T) map[string]docRow {
	t.Helper()
	f, err := os.Open("../docs/metrics.md")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	rows := map[string]docRow{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		m := rowRE.FindStringSubmatch(sc.Text())
		if m == nil {
			continue
		}
		var labels []string
		for _, l := range strings.Split(m[3], ",") {
			if l = strings.Trim(strings.TrimSpace(l), "`"); l != "" {
				labels = append(labels, l)
			}
		}
		slices.Sort(labels)
		rows[m[1]] = docRow{typ: m[2], labels: labels}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return rows
}

// docProxy is a proxy of the kind "doctest": one backend, one server.
type docProxy struct{}

func (docProxy) Read(context.Context) ([]ingress.Backend, error) {
	return []ingress.Backend{{Name: "b", Servers: []ingress.Server{{Endpoint: probes.Endpoint{Addr: netip.MustParseAddr("10.0.0.1"), Port: 80, Protocol: "TCP"}, Routable: true}}}}, nil
}

func (docProxy) ReadBackends(context.Context, []string) ([]ingress.Backend, bool, error) {
	return nil, false, nil
}

// readIngressInstance runs an ingress probe on one instance until it has read it, with its
// metrics in reg.
func readIngressInstance(t *testing.T, reg *prometheus.Registry) {
	t.Helper()
	ingress.Register(ingress.Kind{Name: "doctest", DefaultPort: 1, Scheme: "http", New: func(ingress.Target) (ingress.Reader, error) { return docProxy{}, nil }})
	opts := ingress.DefaultOptions()
	opts.Instances = []string{"doctest=http://127.0.0.1:1"}
	p := ingress.New(opts, nil, "node-a", nil, clock.RealClock{}, slog.New(slog.DiscardHandler))
	reg.MustRegister(p.Collector())
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx, discardSink{}) }()
	t.Cleanup(func() {
		cancel()
		<-done
	})
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, ok := p.Reaches(probes.ServiceRef{}, probes.Endpoint{}); ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("the ingress probe did not read its instance within 10 s")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

type discardSink struct{}

func (discardSink) Observe(probes.Observation)      {}
func (discardSink) SetStatus(string, probes.Status) {}
func (discardSink) Error(string, error)             {}

// TestMetricsDoc drives the collector until every metric it has exports a series (the packets
// probe's metrics come with their zero values), then checks
// that docs/metrics.md lists exactly those metrics with their types and labels.
func TestMetricsDoc(t *testing.T) {
	f := newFixture(t, Options{Horizon: time.Minute, MaxRecords: 2, Probes: []string{"kube"}})
	if err := RegisterBuildInfo(f.reg, "v0", "abc"); err != nil {
		t.Fatal(err)
	}
	// The packets and ingress probes export their own metrics, into the same registry in the
	// daemon; the ingress probe's come once it reads an instance.
	f.reg.MustRegister(packets.New(packets.DefaultOptions(), nil, f.clock, slog.New(slog.DiscardHandler)).Collector())
	readIngressInstance(t, f.reg)
	f.c.SetStatus("kube", probes.Status{Up: true, Synced: true})
	f.c.Error("kube", errors.New("x"))
	f.c.Observe(obs(probes.StageDeleted, 1, t0, true))
	f.c.Observe(obs(probes.StageEndpointSlice, 1, t0, true))
	f.c.Observe(obs(probes.StageEndpointSliceRemoved, 1, t0, true))
	f.c.Observe(obs(probes.StageEndpointSlice, 2, t0, false))
	relisted := obs(probes.StageEndpointSliceRemoved, 2, t0, false)
	relisted.Relist = true
	f.c.Observe(relisted)
	f.c.Observe(obs(probes.StageEndpointSlice, 3, t0, false)) // over the limit: dropped
	f.clock.Step(time.Minute)
	f.c.Sweep()

	mfs, err := f.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	code := map[string]docRow{}
	for _, mf := range mfs {
		name := mf.GetName()
		if !strings.HasPrefix(name, "endpointlag_") {
			continue
		}
		var labels []string
		for _, l := range mf.GetMetric()[0].GetLabel() {
			labels = append(labels, l.GetName())
		}
		slices.Sort(labels)
		code[name] = docRow{typ: strings.ToLower(mf.GetType().String()), labels: labels}
	}
	doc := readMetricsDoc(t)
	for name, c := range code {
		d, ok := doc[name]
		switch {
		case !ok:
			t.Errorf("%s is exported but not in docs/metrics.md", name)
		case d.typ != c.typ:
			t.Errorf("%s: docs/metrics.md says %s, the code exports a %s", name, d.typ, c.typ)
		case !slices.Equal(d.labels, c.labels):
			t.Errorf("%s: docs/metrics.md lists labels %q, the code has %q", name, d.labels, c.labels)
		}
	}
	for name := range doc {
		if _, ok := code[name]; !ok {
			t.Errorf("docs/metrics.md lists %s, which the code does not export", name)
		}
	}
}
