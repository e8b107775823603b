package aggregate

import (
	_ "embed"
	"encoding/json"
	"errors"
	"net/http"
	"strconv"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// page is the aggregator's web page: the recent terminations, and one pod's waterfall.
//
//go:embed web/index.html
var page []byte

// maxPushBytes bounds a push's body: 500 records of a few KiB each.
const maxPushBytes = 32 << 20

// Handler serves the aggregator's API, its metrics and its page.
func Handler(a *Aggregator, gatherer prometheus.Gatherer) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /api/v1/push", func(w http.ResponseWriter, r *http.Request) {
		var b Batch
		dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, maxPushBytes))
		if err := dec.Decode(&b); err != nil {
			var tooBig *http.MaxBytesError
			if errors.As(err, &tooBig) {
				http.Error(w, "the batch is larger than 32 MiB: push fewer records at a time", http.StatusRequestEntityTooLarge)
				return
			}
			http.Error(w, "decoding the batch: "+err.Error(), http.StatusBadRequest)
			return
		}
		if err := a.Push(b); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		w.WriteHeader(http.StatusNoContent)
	})
	mux.HandleFunc("GET /api/v1/pods", func(w http.ResponseWriter, r *http.Request) {
		limit := 200
		if s := r.URL.Query().Get("limit"); s != "" {
			n, err := strconv.Atoi(s)
			if err != nil || n <= 0 {
				http.Error(w, "limit: want a positive number, got "+strconv.Quote(s), http.StatusBadRequest)
				return
			}
			limit = n
		}
		writeJSON(w, a.Pods(limit))
	})
	mux.HandleFunc("GET /api/v1/pods/{uid}", func(w http.ResponseWriter, r *http.Request) {
		d, ok := a.Pod(r.PathValue("uid"))
		if !ok {
			http.Error(w, "no pod with UID "+r.PathValue("uid")+" is held (unknown, or evicted)", http.StatusNotFound)
			return
		}
		writeJSON(w, d)
	})
	mux.HandleFunc("GET /api/v1/advice", func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, a.Advise())
	})
	mux.Handle("GET /metrics", promhttp.HandlerFor(gatherer, promhttp.HandlerOpts{}))
	servePage := func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		w.Header().Set("Content-Security-Policy", "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'")
		_, _ = w.Write(page)
	}
	mux.HandleFunc("GET /{$}", servePage)
	mux.HandleFunc("GET /pod/{uid}", servePage)
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write([]byte("ok\n")) })
	return mux
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}
