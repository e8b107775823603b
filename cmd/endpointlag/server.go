package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"html/template"
	"log/slog"
	"net/http"
	"net/http/pprof"
	"strings"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/endpointlag/endpointlag/collector"
	"github.com/endpointlag/endpointlag/probes/ingress"
)

// IngressResponse is the body of GET /api/v1/ingress: the proxy instances the ingress probe reads
// and what each routed to at its last read.
type IngressResponse struct {
	Node      string                 `json:"node"`
	Instances []ingress.InstanceView `json:"instances"`
}

// ingressView is what the daemon's ingress probe shows; nil when that probe is not enabled.
type ingressView interface {
	Snapshot() ([]ingress.InstanceView, error)
}

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
<li><a href="api/v1/ingress">/api/v1/ingress</a>: the proxy instances read for the ingress stage and what each routes to (JSON; <code>endpointlag inspect ingress</code> prints it)</li>
<li><a href="healthz">/healthz</a>, <a href="readyz">/readyz</a></li>
</ul></body></html>
`))

// maxRecordsRequests bounds the /api/v1/records requests answered at once: each views every
// record under the collector's lock, which the probes' observations wait for, and holds its
// JSON in memory.
const maxRecordsRequests = 2

func newMux(coll *collector.Collector, ing ingressView, reg *prometheus.Registry, node string, log *slog.Logger) *http.ServeMux {
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
	mux.HandleFunc("GET /api/v1/records", limitConcurrent(maxRecordsRequests, func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		if err := enc.Encode(RecordsResponse{Node: node, Records: coll.Records()}); err != nil {
			log.Debug("writing records", "err", err)
		}
	}))
	mux.HandleFunc("GET /api/v1/ingress", func(w http.ResponseWriter, _ *http.Request) {
		if ing == nil {
			http.Error(w, "the ingress probe is not enabled on this daemon (see --probes)", http.StatusNotFound)
			return
		}
		resp := IngressResponse{Node: node, Instances: []ingress.InstanceView{}}
		instances, err := ing.Snapshot()
		switch {
		case errors.Is(err, ingress.ErrNoInstances):
		case err != nil:
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		default:
			resp.Instances = instances
		}
		w.Header().Set("Content-Type", "application/json")
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		if err := enc.Encode(resp); err != nil {
			log.Debug("writing ingress instances", "err", err)
		}
	})
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, _ *http.Request) {
		if err := indexPage.Execute(w, node); err != nil {
			log.Debug("writing index", "err", err)
		}
	})
	return mux
}

// serveProfiles adds Go's runtime profiles under /debug/pprof/ (--web.enable-profiling), behind
// the same authentication and authorization as the other paths.
func serveProfiles(mux *http.ServeMux) {
	mux.HandleFunc("GET /debug/pprof/", pprof.Index)
	mux.HandleFunc("GET /debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("GET /debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("GET /debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("GET /debug/pprof/trace", pprof.Trace)
}

// limitConcurrent answers 429 Too Many Requests, with Retry-After, to requests beyond n at once.
func limitConcurrent(n int, h http.HandlerFunc) http.HandlerFunc {
	slots := make(chan struct{}, n)
	return func(w http.ResponseWriter, r *http.Request) {
		select {
		case slots <- struct{}{}:
			defer func() { <-slots }()
		default:
			w.Header().Set("Retry-After", "1")
			http.Error(w, fmt.Sprintf("%d requests for %s are being answered; try again", n, r.URL.Path), http.StatusTooManyRequests)
			return
		}
		h(w, r)
	}
}
