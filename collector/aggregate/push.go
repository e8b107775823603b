package aggregate

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"k8s.io/utils/clock"

	"github.com/endpointlag/endpointlag/collector"
)

// PushOptions configure a daemon's pushes to the aggregator.
type PushOptions struct {
	// URLs are the aggregator replicas; each pod's records go to the one Shard picks.
	URLs []string
	// Interval is how often settled records are pushed; Heartbeat how often an empty batch tells
	// each replica the daemon is live when there is nothing to push.
	Interval  time.Duration
	Heartbeat time.Duration
	// SettleAfter is how old a record with stages still pending gets before it is pushed as it is.
	SettleAfter time.Duration
	// BatchSize bounds the records of one request.
	BatchSize int
	// Transport carries the pushes, with the TLS settings and the credentials an aggregator run
	// with --web.auth=kubernetes wants; nil is http.DefaultTransport.
	Transport http.RoundTripper
}

// DefaultPushOptions are the daemon's defaults.
func DefaultPushOptions() PushOptions {
	return PushOptions{Interval: 2 * time.Second, Heartbeat: 30 * time.Second, SettleAfter: time.Minute, BatchSize: 500}
}

// Validate says what is wrong, naming the daemon's flags.
func (o PushOptions) Validate() error {
	for _, u := range o.URLs {
		if !strings.HasPrefix(u, "http://") && !strings.HasPrefix(u, "https://") {
			return fmt.Errorf("--aggregator.urls: %q is not a URL like http://endpointlag-aggregate:9870", u)
		}
	}
	switch {
	case o.Interval <= 0:
		return fmt.Errorf("--aggregator.interval must be positive, got %s", o.Interval)
	case o.Heartbeat < o.Interval:
		return fmt.Errorf("--aggregator.heartbeat (%s) must be at least --aggregator.interval (%s)", o.Heartbeat, o.Interval)
	case o.SettleAfter <= 0:
		return fmt.Errorf("--aggregator.settle-after must be positive, got %s", o.SettleAfter)
	case o.BatchSize <= 0:
		return fmt.Errorf("batch size must be positive, got %d", o.BatchSize)
	}
	return nil
}

// Pusher sends a daemon's settled records to the aggregator: each once it has no stage pending
// (and for a pod of this node once the pod is gone, so that its connections are in), or once it is
// SettleAfter old, and again whenever it changed since. A failed push is retried at the next
// interval; what the aggregator got is not sent again.
type Pusher struct {
	opts   PushOptions
	node   string
	follow *collector.Follower
	client *http.Client
	clock  clock.PassiveClock
	log    *slog.Logger

	lastBeat []time.Time
	requests *prometheus.CounterVec
	pushed   prometheus.Counter
}

// NewPusher returns a pusher of records (the collector) for node; reg registers its metrics (nil:
// none).
func NewPusher(opts PushOptions, node string, records collector.Source, reg prometheus.Registerer, clk clock.PassiveClock, log *slog.Logger) (*Pusher, error) {
	if err := opts.Validate(); err != nil {
		return nil, err
	}
	p := &Pusher{opts: opts, node: node, follow: collector.NewFollower(records, opts.SettleAfter, true), client: &http.Client{Timeout: 10 * time.Second, Transport: opts.Transport}, clock: clk,
		log: log.With("component", "aggregator-push"), lastBeat: make([]time.Time, len(opts.URLs)),
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: "endpointlag", Name: "aggregator_pushes_total",
			Help: "Requests to the aggregator (outcome=ok|error), records and heartbeats."}, []string{"outcome"}),
		pushed: prometheus.NewCounter(prometheus.CounterOpts{Namespace: "endpointlag", Name: "aggregator_records_pushed_total",
			Help: "Records the aggregator accepted."}),
	}
	p.requests.WithLabelValues("ok")
	p.requests.WithLabelValues("error")
	if reg != nil {
		for _, c := range []prometheus.Collector{p.requests, p.pushed} {
			if err := reg.Register(c); err != nil {
				return nil, err
			}
		}
	}
	return p, nil
}

// Run pushes every Interval until ctx ends, then once more.
func (p *Pusher) Run(ctx context.Context) {
	t := time.NewTicker(p.opts.Interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			final, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			p.PushOnce(final)
			cancel()
			return
		case <-t.C:
			p.PushOnce(ctx)
		}
	}
}

// PushOnce pushes what is due now: the records settled since the last push, or changed since
// they were pushed. It looks at the records only when something may be due, and views only those.
func (p *Pusher) PushOnce(ctx context.Context) {
	now := p.clock.Now()
	recs, digests := p.follow.Due(now)
	due := make([][]int, len(p.opts.URLs))
	for i, r := range recs {
		shard := Shard(r.Pod.UID, p.opts.URLs)
		due[shard] = append(due[shard], i)
	}
	for i, u := range p.opts.URLs {
		if len(due[i]) == 0 && now.Sub(p.lastBeat[i]) < p.opts.Heartbeat {
			continue
		}
		for start := 0; start == 0 || start < len(due[i]); start += p.opts.BatchSize {
			idx := due[i][start:min(start+p.opts.BatchSize, len(due[i]))]
			batch := make([]collector.RecordView, len(idx))
			for j, k := range idx {
				batch[j] = recs[k]
			}
			if err := p.post(ctx, u, Batch{Node: p.node, Records: batch}); err != nil {
				p.follow.Retry()
				p.requests.WithLabelValues("error").Inc()
				p.log.Warn("pushing records to the aggregator failed; retrying at the next interval", "url", u, "records", len(batch), "err", err)
				break
			}
			p.requests.WithLabelValues("ok").Inc()
			p.pushed.Add(float64(len(batch)))
			p.lastBeat[i] = now
			for _, k := range idx {
				p.follow.Sent(digests[k])
			}
		}
	}
}

func (p *Pusher) post(ctx context.Context, u string, b Batch) error {
	body, err := json.Marshal(b)
	if err != nil {
		return err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, strings.TrimSuffix(u, "/")+"/api/v1/push", bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := p.client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusNoContent && resp.StatusCode != http.StatusOK {
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return fmt.Errorf("%s: %s", resp.Status, strings.TrimSpace(string(msg)))
	}
	return nil
}
