package tracing

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"testing"
	"time"

	coltracepb "go.opentelemetry.io/proto/otlp/collector/trace/v1"
	commonpb "go.opentelemetry.io/proto/otlp/common/v1"
	tracepb "go.opentelemetry.io/proto/otlp/trace/v1"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"
	clocktesting "k8s.io/utils/clock/testing"

	"github.com/endpointlag/endpointlag/collector"
	"github.com/endpointlag/endpointlag/collector/collectortest"
	"github.com/endpointlag/endpointlag/probes"
)

// receiver is an OTLP trace receiver built on the protocol's own protos: gRPC's TraceService and
// HTTP's POST /v1/traces with a protobuf body. It keeps every span with its resource's node name.
type receiver struct {
	coltracepb.UnimplementedTraceServiceServer
	mu    sync.Mutex
	spans []received
}

type received struct {
	node string
	span *tracepb.Span
}

func (r *receiver) Export(_ context.Context, req *coltracepb.ExportTraceServiceRequest) (*coltracepb.ExportTraceServiceResponse, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, rs := range req.GetResourceSpans() {
		node := attr(rs.GetResource().GetAttributes(), "k8s.node.name")
		for _, ss := range rs.GetScopeSpans() {
			for _, s := range ss.GetSpans() {
				r.spans = append(r.spans, received{node: node, span: s})
			}
		}
	}
	return &coltracepb.ExportTraceServiceResponse{}, nil
}

func (r *receiver) ServeHTTP(w http.ResponseWriter, req *http.Request) {
	body, err := io.ReadAll(req.Body)
	if err != nil || req.URL.Path != "/v1/traces" || req.Header.Get("Content-Type") != "application/x-protobuf" {
		http.Error(w, "want a protobuf POST to /v1/traces", http.StatusBadRequest)
		return
	}
	var m coltracepb.ExportTraceServiceRequest
	if err := proto.Unmarshal(body, &m); err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	resp, _ := r.Export(req.Context(), &m)
	out, _ := proto.Marshal(resp)
	w.Header().Set("Content-Type", "application/x-protobuf")
	_, _ = w.Write(out)
}

func (r *receiver) all() []received {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]received(nil), r.spans...)
}

func attr(kvs []*commonpb.KeyValue, key string) string {
	for _, kv := range kvs {
		if kv.GetKey() == key {
			return kv.GetValue().GetStringValue()
		}
	}
	return ""
}

func startReceiver(t *testing.T, protocol string) (*receiver, string) {
	t.Helper()
	r := &receiver{}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	switch protocol {
	case "grpc":
		s := grpc.NewServer()
		coltracepb.RegisterTraceServiceServer(s, r)
		go func() { _ = s.Serve(ln) }()
		t.Cleanup(s.Stop)
	default:
		s := &http.Server{Handler: r, ReadHeaderTimeout: 5 * time.Second}
		go func() { _ = s.Serve(ln) }()
		t.Cleanup(func() { _ = s.Close() })
	}
	return r, "http://" + ln.Addr().String()
}

const uid = "6f1c2a9e-1b2d-4b7d-9c3e-0123456789ab"

var (
	t0  = time.Date(2026, 11, 29, 12, 0, 0, 0, time.UTC)
	pod = probes.PodRef{Namespace: "shop", Name: "web-1", UID: uid}
	svc = probes.ServiceRef{Namespace: "shop", Name: "web"}
	ep  = probes.Endpoint{Addr: netip.MustParseAddr("10.244.1.5"), Port: 8080, Protocol: "TCP"}
)

func at(s float64) time.Time { return t0.Add(time.Duration(s * float64(time.Second))) }

// Two nodes' tracers, over gRPC and over HTTP: one trace, whose ID is the pod's UID, with the
// pod's node's root span and every node's stage spans under it, each from the node's own reference
// to its stage; traced once.
func TestTracesJoinAcrossNodes(t *testing.T) {
	for _, protocol := range []string{"grpc", "http/protobuf"} {
		t.Run(protocol, func(t *testing.T) {
			rcv, endpoint := startReceiver(t, protocol)
			t.Setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
			t.Setenv("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
			t.Setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
			if !Enabled() {
				t.Fatal("not enabled with OTEL_EXPORTER_OTLP_ENDPOINT set")
			}
			home := collector.RecordView{Pod: pod, Service: svc, Endpoint: ep, Local: true, T0: &t0,
				Declared: &probes.Declared{Workload: probes.WorkloadRef{Kind: "Deployment", Name: "web"}, PreStopSeconds: 2, PreStopKnown: true},
				Stages: []collector.StageView{
					{Stage: "deleted", Time: t0},
					{Stage: "endpointslice", Source: "kube", Time: at(0.02)},
					{Stage: "nftables", Source: "nftables", Path: "cluster", Time: at(0.5)},
					{Stage: "gone", Source: "kube", Time: at(0.6)},
				},
				Connections: []collector.ConnectionView{{Time: at(0.1), Client: netip.MustParseAddrPort("10.244.2.9:40000"), Kind: "late"}}}
			remote := collector.RecordView{Pod: pod, Service: svc, Endpoint: ep, Stages: []collector.StageView{
				{Stage: "endpointslice", Source: "kube", Time: at(0.03)},
				{Stage: "nftables", Source: "nftables", Path: "cluster", Time: at(0.93)},
			}}
			clk := clocktesting.NewFakeClock(at(1))
			ctx := context.Background()
			for node, rec := range map[string]collector.RecordView{"node1": home, "node2": remote} {
				var views collectortest.Views
				views.Set(rec)
				tr, err := New(ctx, node, &views, time.Minute, clk, slog.New(slog.DiscardHandler))
				if err != nil {
					t.Fatal(err)
				}
				tr.Once()
				tr.Once() // nothing new
				if n, walks := views.Viewed(); n != 1 || walks != 1 {
					t.Errorf("%s: %d views in %d walks for one record traced once, nothing changed since; want 1 in 1", node, n, walks)
				}
				if err := tr.Flush(ctx); err != nil {
					t.Fatal(err)
				}
			}
			tid, _ := TraceID(uid)
			root := RootSpanID(uid)
			byName := map[string]received{}
			for _, s := range rcv.all() {
				if !bytes.Equal(s.span.GetTraceId(), tid[:]) {
					t.Errorf("span %q in trace %x, want the pod's UID %x", s.span.GetName(), s.span.GetTraceId(), tid[:])
				}
				if attr(s.span.GetAttributes(), "k8s.pod.uid") != uid || attr(s.span.GetAttributes(), "k8s.namespace.name") != "shop" ||
					attr(s.span.GetAttributes(), "k8s.pod.name") != "web-1" || attr(s.span.GetAttributes(), "k8s.node.name") != s.node {
					t.Errorf("span %q on %s: attributes %v", s.span.GetName(), s.node, s.span.GetAttributes())
				}
				key := s.node + " " + s.span.GetName()
				if _, dup := byName[key]; dup {
					t.Errorf("span %s exported twice", key)
				}
				byName[key] = s
			}
			want := map[string][2]time.Time{
				"node1 pod termination":  {t0, at(0.6)},
				"node1 endpointslice":    {t0, at(0.02)},
				"node1 nftables cluster": {t0, at(0.5)},
				"node1 gone":             {t0, at(0.6)},
				"node2 endpointslice":    {at(0.03), at(0.03)},
				"node2 nftables cluster": {at(0.03), at(0.93)},
			}
			for key, w := range want {
				s, ok := byName[key]
				if !ok {
					t.Errorf("no span %s; got %v", key, keys(byName))
					continue
				}
				if start, end := time.Unix(0, int64(s.span.GetStartTimeUnixNano())), time.Unix(0, int64(s.span.GetEndTimeUnixNano())); !start.Equal(w[0]) || !end.Equal(w[1]) {
					t.Errorf("span %s from %s to %s, want %s to %s", key, start.Format(time.StampMicro), end.Format(time.StampMicro), w[0].Format(time.StampMicro), w[1].Format(time.StampMicro))
				}
				if key == "node1 pod termination" {
					if !bytes.Equal(s.span.GetSpanId(), root[:]) || len(s.span.GetParentSpanId()) != 0 || len(s.span.GetEvents()) != 1 {
						t.Errorf("root span %x (parent %x, %d events), want %x without a parent and the late connection as an event", s.span.GetSpanId(), s.span.GetParentSpanId(), len(s.span.GetEvents()), root[:])
					}
				} else if !bytes.Equal(s.span.GetParentSpanId(), root[:]) {
					t.Errorf("span %s's parent %x, want the root %x", key, s.span.GetParentSpanId(), root[:])
				}
			}
			if len(byName) != len(want) {
				t.Errorf("spans %v, want %d", keys(byName), len(want))
			}
		})
	}
}

func keys(m map[string]received) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return out
}

func TestTraceID(t *testing.T) {
	id, ok := TraceID(uid)
	if !ok || id.String() != "6f1c2a9e1b2d4b7d9c3e0123456789ab" {
		t.Errorf("TraceID(%s) = %s", uid, id)
	}
	if other, ok := TraceID("not-a-uuid"); !ok || other == id {
		t.Errorf("TraceID of a UID that is no UUID: %s, %v", other, ok)
	}
	if _, ok := TraceID(""); ok {
		t.Error("a trace ID for no UID")
	}
}

// A record still pending is traced once it is settleAfter old, with nothing else changed, and
// looked at again only then.
func TestTracesRecordsSettledByAge(t *testing.T) {
	_, endpoint := startReceiver(t, "http/protobuf")
	t.Setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
	t.Setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
	t.Setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
	var views collectortest.Views
	views.Set(collector.RecordView{Pod: pod, Service: svc, Endpoint: ep, Pending: []string{"nftables"},
		Stages: []collector.StageView{{Stage: "endpointslice", Source: "kube", Time: t0}}})
	clk := clocktesting.NewFakeClock(at(1))
	tr, err := New(context.Background(), "node2", &views, time.Minute, clk, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	tr.Once()
	clk.Step(30 * time.Second)
	tr.Once()
	if n, walks := views.Viewed(); n != 0 || walks != 1 {
		t.Errorf("before it settled: %d views in %d walks; want none in 1", n, walks)
	}
	clk.Step(30 * time.Second)
	tr.Once()
	if n, walks := views.Viewed(); n != 1 || walks != 2 {
		t.Errorf("once settled by age: %d views in %d walks; want 1 in 2", n, walks)
	}
}
