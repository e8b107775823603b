package aggregate

import (
	"bytes"
	"encoding/json"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	clocktesting "k8s.io/utils/clock/testing"

	"github.com/endpointlag/endpointlag/collector"
)

// FuzzPush posts two fuzzed batches (the pod's node's and another node's, as daemons push them)
// to the aggregator's API, settles the figures and reads every answer back: a batch is taken
// (204) or refused as a client error, never with a panic; every record of a batch taken is held;
// and the pods, each pod's figure, the advice and the metrics still encode.
func FuzzPush(f *testing.F) {
	batch := func(node string, recs ...collector.RecordView) []byte {
		b, err := json.Marshal(Batch{Node: node, Records: recs})
		if err != nil {
			f.Fatal(err)
		}
		return b
	}
	h, r := podRecords("uid-2", "web", 5, 1.5)
	f.Add(batch("node1", home()), batch("node2", remote(7*time.Second, home().Stages[2])))
	f.Add(batch("node1", h), batch("node2", r))
	f.Add(batch("node1"), batch("node2", r, r))
	f.Add([]byte(`{"node":"node1","records":[{"pod":{"uid":""}}]}`), []byte(`{"node":""}`))
	f.Fuzz(func(t *testing.T, body1, body2 []byte) {
		clk := clocktesting.NewFakeClock(t0)
		reg := prometheus.NewRegistry()
		a, err := New(DefaultOptions(), reg, clk, slog.New(slog.DiscardHandler))
		if err != nil {
			t.Fatal(err)
		}
		api := Handler(a, reg)
		// Both daemons were heard from before (their heartbeats), so that a pod's figure waits
		// for both.
		for _, body := range [][]byte{body1, body2} {
			var b Batch
			if json.Unmarshal(body, &b) == nil && b.Node != "" {
				_ = a.Push(Batch{Node: b.Node})
			}
		}
		for _, body := range [][]byte{body1, body2} {
			w := httptest.NewRecorder()
			api.ServeHTTP(w, httptest.NewRequest(http.MethodPost, "/api/v1/push", bytes.NewReader(body)))
			var b Batch
			decodes := json.NewDecoder(bytes.NewReader(body)).Decode(&b) == nil
			switch w.Code {
			case http.StatusNoContent:
				if !decodes {
					t.Fatalf("%q taken, but it does not decode", body)
				}
				for _, r := range b.Records {
					if _, ok := a.Pod(r.Pod.UID); !ok {
						t.Errorf("pod %q of a batch taken is not held", r.Pod.UID)
					}
				}
			case http.StatusBadRequest:
			default:
				t.Fatalf("%q answered %d: %s", body, w.Code, w.Body)
			}
		}
		clk.Step(DefaultOptions().Settle + time.Second)
		a.Tick()
		// Every answer the API gives encodes: a figure the JSON cannot carry (an infinite or
		// NaN number of seconds) would leave its reader an empty answer.
		valid := func(what string, v any) {
			t.Helper()
			w := httptest.NewRecorder()
			writeJSON(w, v)
			if !json.Valid(w.Body.Bytes()) {
				b, err := json.Marshal(v)
				t.Errorf("%s does not encode (%v): %q from %+v", what, err, b, v)
			}
		}
		pods := a.Pods(1000)
		valid("the pods", pods)
		for _, p := range pods {
			d, ok := a.Pod(p.Pod.UID)
			if !ok {
				t.Errorf("pod %q listed, not held", p.Pod.UID)
			}
			valid("pod "+p.Pod.UID, d)
		}
		valid("the advice", a.Advise())
		if _, err := reg.Gather(); err != nil {
			t.Errorf("metrics: %v", err)
		}
	})
}
