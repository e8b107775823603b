package aggregate

import (
	"bufio"
	"context"
	"log/slog"
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/endpointlag/endpointlag/collector/collectortest"
	"github.com/prometheus/client_golang/prometheus"
	"k8s.io/client-go/kubernetes/fake"
	clocktesting "k8s.io/utils/clock/testing"
)

var docRow = regexp.MustCompile("^\\| `(endpointlag_[a-z0-9_]+)` \\| ([a-z]+) \\|([^|]*)\\|")

// docs/aggregate.md's table lists exactly the aggregator's metrics (and the daemon's pusher's),
// with their types and labels.
func TestMetricsDoc(t *testing.T) {
	clk := clocktesting.NewFakeClock(t0)
	reg := prometheus.NewRegistry()
	a, err := New(DefaultOptions(), reg, clk, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	a.SetEventer(NewEventer(fake.NewClientset(), time.Minute, clk, slog.New(slog.DiscardHandler)))
	push(t, a, "node2")
	h, r := podRecords("u1", "web", 1, 0.5)
	push(t, a, "node1", h)
	push(t, a, "node2", r)
	popts := DefaultPushOptions()
	popts.URLs = []string{"http://127.0.0.1:1"}
	p, err := NewPusher(popts, "node1", new(collectortest.Views), reg, clk, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	p.PushOnce(context.Background())
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	code := map[string]string{}
	for _, mf := range mfs {
		var labels []string
		if len(mf.GetMetric()) > 0 {
			for _, l := range mf.GetMetric()[0].GetLabel() {
				labels = append(labels, l.GetName())
			}
		}
		slices.Sort(labels)
		code[mf.GetName()] = strings.ToLower(mf.GetType().String()) + " " + strings.Join(labels, ",")
	}
	f, err := os.Open("../../docs/aggregate.md")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	doc := map[string]string{}
	sc := bufio.NewScanner(f)
	var last []string
	for sc.Scan() {
		m := docRow.FindStringSubmatch(sc.Text())
		if m == nil {
			continue
		}
		labels := last
		if cell := strings.TrimSpace(m[3]); cell != "same" && !strings.HasPrefix(cell, "same +") {
			labels = nil
			for _, l := range strings.Split(cell, ",") {
				if l = strings.Trim(strings.TrimSpace(l), "`"); l != "" {
					labels = append(labels, l)
				}
			}
		} else if extra, ok := strings.CutPrefix(cell, "same +"); ok {
			labels = append(slices.Clone(last), strings.Trim(strings.TrimSpace(extra), "`"))
		}
		if cell := strings.TrimSpace(m[3]); cell != "same" && !strings.HasPrefix(cell, "same +") {
			last = labels
		}
		sorted := slices.Clone(labels)
		slices.Sort(sorted)
		doc[m[1]] = m[2] + " " + strings.Join(sorted, ",")
	}
	// The pusher's metrics are named in the text, not the table.
	delete(code, "endpointlag_aggregator_pushes_total")
	delete(code, "endpointlag_aggregator_records_pushed_total")
	for name, want := range code {
		if doc[name] != want {
			t.Errorf("%s is %q in the code, %q in docs/aggregate.md", name, want, doc[name])
		}
	}
	for name := range doc {
		if _, ok := code[name]; !ok {
			t.Errorf("docs/aggregate.md lists %s, which the aggregator does not export", name)
		}
	}
}
