// Package tracing emits, from each daemon, OpenTelemetry spans for what it saw of each
// termination: one span per stage this node measured, from the reference it is measured against
// (T0 on the pod's node, this node's slice change elsewhere) to the stage. The trace ID is the pod's
// UID (a UUID is 16 bytes, as a trace ID is), and every span's parent is a root span whose ID
// derives from the UID too — which the pod's node emits, from T0 to the pod's last stage — so the
// spans of every node join into one trace per termination with no coordination.
//
// Export is OTLP over gRPC or HTTP, configured by the standard OTEL_EXPORTER_OTLP_* environment
// variables; tracing is off unless one of them names an endpoint.
package tracing

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"sync"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracegrpc"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracehttp"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/trace"
	"k8s.io/utils/clock"

	"github.com/endpointlag/endpointlag/collector"
	"github.com/endpointlag/endpointlag/probes"
)

// Enabled tells whether the environment configures an OTLP endpoint for traces (and does not turn
// traces off with OTEL_TRACES_EXPORTER=none).
func Enabled() bool {
	if os.Getenv("OTEL_TRACES_EXPORTER") == "none" || os.Getenv("OTEL_SDK_DISABLED") == "true" {
		return false
	}
	return os.Getenv("OTEL_EXPORTER_OTLP_ENDPOINT") != "" || os.Getenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") != ""
}

// Protocol is the OTLP protocol the environment asks for: grpc, or http/protobuf (the
// specification's default).
func Protocol() string {
	for _, k := range []string{"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"} {
		if v := os.Getenv(k); v != "" {
			return v
		}
	}
	return "http/protobuf"
}

// Tracer turns settled records into spans.
type Tracer struct {
	node   string
	clock  clock.PassiveClock
	log    *slog.Logger
	tp     *sdktrace.TracerProvider
	tracer trace.Tracer

	mu     sync.Mutex
	follow *collector.Follower
}

// New returns a tracer exporting over the protocol the environment names; records is the
// collector. Stop flushes it.
func New(ctx context.Context, node string, records collector.Source, settleAfter time.Duration, clk clock.PassiveClock, log *slog.Logger) (*Tracer, error) {
	var (
		exp sdktrace.SpanExporter
		err error
	)
	switch p := Protocol(); p {
	case "grpc":
		exp, err = otlptracegrpc.New(ctx)
	case "http/protobuf":
		exp, err = otlptracehttp.New(ctx)
	default:
		return nil, fmt.Errorf("OTEL_EXPORTER_OTLP_PROTOCOL %q: use grpc or http/protobuf", p)
	}
	if err != nil {
		return nil, fmt.Errorf("the OTLP exporter: %w", err)
	}
	res, err := resource.Merge(resource.Default(), resource.NewSchemaless(
		attribute.String("service.name", "endpointlag"), attribute.String("k8s.node.name", node)))
	if err != nil {
		return nil, err
	}
	if env, err := resource.New(ctx, resource.WithFromEnv()); err == nil {
		if merged, err := resource.Merge(res, env); err == nil {
			res = merged
		}
	}
	tp := sdktrace.NewTracerProvider(sdktrace.WithBatcher(exp), sdktrace.WithResource(res), sdktrace.WithIDGenerator(ids{}))
	return &Tracer{node: node, follow: collector.NewFollower(records, settleAfter, false), clock: clk, log: log.With("component", "tracing"),
		tp: tp, tracer: tp.Tracer("github.com/endpointlag/endpointlag")}, nil
}

// Run traces settled records every interval until ctx ends, then flushes.
func (t *Tracer) Run(ctx context.Context, interval time.Duration) {
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			t.Once()
			stop, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			if err := t.tp.Shutdown(stop); err != nil {
				t.log.Warn("flushing the last spans failed", "err", err)
			}
			return
		case <-tick.C:
			t.Once()
		}
	}
}

// Flush exports the spans ended so far.
func (t *Tracer) Flush(ctx context.Context) error { return t.tp.ForceFlush(ctx) }

// Once traces the records settled since the last call. It looks at the records only when
// something may have settled, and views only those.
func (t *Tracer) Once() {
	t.mu.Lock()
	defer t.mu.Unlock()
	recs, digests := t.follow.Due(t.clock.Now())
	for i, r := range recs {
		t.follow.Sent(digests[i])
		t.trace(r)
	}
}

// trace emits one record's spans.
func (t *Tracer) trace(r collector.RecordView) {
	tid, ok := TraceID(r.Pod.UID)
	if !ok {
		return
	}
	pod := []attribute.KeyValue{
		attribute.String("k8s.pod.uid", r.Pod.UID), attribute.String("k8s.pod.name", r.Pod.Name),
		attribute.String("k8s.namespace.name", r.Pod.Namespace), attribute.String("k8s.node.name", t.node),
	}
	if d := r.Declared; d != nil && d.Workload.Kind != "" {
		pod = append(pod, attribute.String("k8s."+strings.ToLower(d.Workload.Kind)+".name", d.Workload.Name))
	}
	root := trace.NewSpanContext(trace.SpanContextConfig{TraceID: tid, SpanID: RootSpanID(r.Pod.UID), TraceFlags: trace.FlagsSampled, Remote: true})
	parent := trace.ContextWithRemoteSpanContext(context.Background(), root)
	ref := reference(r)
	if r.Local && r.T0 != nil {
		// The root: the pod's termination on its node, from T0 to its last stage.
		end := *r.T0
		for _, s := range r.Stages {
			if s.Time.After(end) {
				end = s.Time
			}
		}
		ctx := withSpanID(context.Background(), RootSpanID(r.Pod.UID), tid)
		attrs := append(pod, attribute.String("endpointlag.service", r.Service.String()), attribute.String("endpointlag.endpoint", r.Endpoint.String()))
		if d := r.Declared; d != nil && d.PreStopKnown {
			attrs = append(attrs, attribute.Float64("endpointlag.prestop_seconds", d.PreStopSeconds))
		}
		_, span := t.tracer.Start(ctx, "pod termination", trace.WithTimestamp(*r.T0), trace.WithAttributes(attrs...), trace.WithSpanKind(trace.SpanKindInternal))
		for _, c := range r.Connections {
			if !c.Node {
				span.AddEvent(c.Kind+" connection", trace.WithTimestamp(c.Time), trace.WithAttributes(attribute.String("client.address", c.Client.String())))
			}
		}
		span.End(trace.WithTimestamp(end))
	}
	if ref.IsZero() {
		return
	}
	for _, s := range r.Stages {
		if s.Stage == string(probes.StageDeleted) || s.Time.Before(ref) {
			continue
		}
		name := s.Stage
		if s.Path != "" {
			name += " " + s.Path
		}
		attrs := append(append([]attribute.KeyValue(nil), pod...),
			attribute.String("endpointlag.stage", s.Stage), attribute.String("endpointlag.source", s.Source),
			attribute.String("endpointlag.service", r.Service.String()), attribute.String("endpointlag.endpoint", r.Endpoint.String()),
			attribute.Float64("endpointlag.precision_seconds", s.Precision))
		if s.Path != "" {
			attrs = append(attrs, attribute.String("endpointlag.path", s.Path))
		}
		if s.Initial || s.Relist || s.Fallback {
			attrs = append(attrs, attribute.Bool("endpointlag.unsampled", true))
		}
		ctx := withSpanID(parent, StageSpanID(r.Pod.UID, t.node, r.Service.String()+" "+r.Endpoint.String(), s.Stage, s.Source, s.Path), tid)
		_, span := t.tracer.Start(ctx, name, trace.WithTimestamp(ref), trace.WithAttributes(attrs...))
		span.End(trace.WithTimestamp(s.Time))
	}
}

// reference is what the record's stages are measured from on this node: T0 on the pod's node,
// this node's slice change elsewhere.
func reference(r collector.RecordView) time.Time {
	if r.Local && r.T0 != nil {
		return *r.T0
	}
	for _, s := range r.Stages {
		if s.Stage == string(probes.StageEndpointSlice) || s.Stage == string(probes.StageEndpointSliceRemoved) {
			return s.Time
		}
	}
	return time.Time{}
}

// TraceID is the trace of a pod's termination: its UID's 16 bytes, or for a UID that is no UUID
// the first 16 bytes of its SHA-256.
func TraceID(uid string) (trace.TraceID, bool) {
	var id trace.TraceID
	if uid == "" {
		return id, false
	}
	if b, err := hex.DecodeString(strings.ReplaceAll(uid, "-", "")); err == nil && len(b) == 16 {
		copy(id[:], b)
	} else {
		sum := sha256.Sum256([]byte(uid))
		copy(id[:], sum[:16])
	}
	return id, id.IsValid()
}

// RootSpanID is the ID of a termination's root span.
func RootSpanID(uid string) trace.SpanID { return spanID("root", uid) }

// StageSpanID is the ID of one node's span of one stage of one endpoint.
func StageSpanID(uid, node, endpoint, stage, source, path string) trace.SpanID {
	return spanID("stage", uid, node, endpoint, stage, source, path)
}

func spanID(parts ...string) trace.SpanID {
	sum := sha256.Sum256([]byte(strings.Join(parts, "\x00")))
	var id trace.SpanID
	copy(id[:], sum[:8])
	if !id.IsValid() {
		id[7] = 1
	}
	return id
}

// ids gives the SDK the IDs the context asks for: spans of one termination get IDs that every node
// derives alike.
type ids struct{}

type idKey struct{}

type wanted struct {
	span  trace.SpanID
	trace trace.TraceID
}

func withSpanID(ctx context.Context, span trace.SpanID, tid trace.TraceID) context.Context {
	return context.WithValue(ctx, idKey{}, wanted{span: span, trace: tid})
}

// NewIDs implements sdktrace.IDGenerator for a span without a parent: the root.
func (ids) NewIDs(ctx context.Context) (trace.TraceID, trace.SpanID) {
	w, _ := ctx.Value(idKey{}).(wanted)
	return w.trace, w.span
}

// NewSpanID implements sdktrace.IDGenerator for a span with a parent.
func (ids) NewSpanID(ctx context.Context, _ trace.TraceID) trace.SpanID {
	w, _ := ctx.Value(idKey{}).(wanted)
	return w.span
}
