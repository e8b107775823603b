package main

import (
	"encoding/json"
	"fmt"
	"html/template"
	"log/slog"
	"net/http"
	"strings"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/endpointlag/endpointlag/collector"
)

// RecordsResponse is the body of GET /api/v1/records.
type RecordsResponse struct {
	Node    string                 `json:"node"`
	Records []collector.RecordView `json:"records"`
}

var indexPage = template.Must(template.New("index").Parse(`<!doctype html>
<html><head><title>endpointlag {{.}}</title></head><body>
<h1>endpointlag on {{.}}</h1>
<ul>
<li><a href="metrics">/metrics</a>: Prometheus metrics</li>
<li><a href="api/v1/records">/api/v1/records</a>: terminating endpoints and their timelines (JSON; <code>endpointlag inspect</code> prints it)</li>
<li><a href="healthz">/healthz</a>, <a href="readyz">/readyz</a></li>
</ul></body></html>
`))

func newMux(coll *collector.Collector, reg *prometheus.Registry, node string, log *slog.Logger) *http.ServeMux {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{
		ErrorLog: slog.NewLogLogger(log.Handler(), slog.LevelError), Registry: reg,
	}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		if err := coll.Healthy(); err != nil {
			http.Error(w, err.Error(), http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, _ *http.Request) {
		ready, waiting := coll.Ready()
		if !ready {
			http.Error(w, "waiting for probes to sync: "+strings.Join(waiting, ", "), http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("GET /api/v1/records", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		if err := enc.Encode(RecordsResponse{Node: node, Records: coll.Records()}); err != nil {
			log.Debug("writing records", "err", err)
		}
	})
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, _ *http.Request) {
		if err := indexPage.Execute(w, node); err != nil {
			log.Debug("writing index", "err", err)
		}
	})
	return mux
}
