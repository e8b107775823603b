package main

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"sync"
	"syscall"

	coltracepb "go.opentelemetry.io/proto/otlp/collector/trace/v1"
	commonpb "go.opentelemetry.io/proto/otlp/common/v1"
	"google.golang.org/grpc"
)

// SpanLine is one span as `lab otlp-receiver` writes it, a JSON object per line.
type SpanLine struct {
	TraceID string `json:"trace_id"`
	SpanID  string `json:"span_id"`
	Parent  string `json:"parent,omitempty"`
	Name    string `json:"name"`
	// Node is the resource's k8s.node.name; PodUID the span's k8s.pod.uid.
	Node   string `json:"node"`
	PodUID string `json:"pod_uid"`
}

// otlpReceiver is an OTLP/gRPC trace receiver built on the protocol's own protos: it writes every
// span it receives to --out, until SIGTERM. The lab runs it on the control plane's address, and
// the daemons export their traces to it.
func otlpReceiver(args []string) error {
	fs := flag.NewFlagSet("lab otlp-receiver", flag.ContinueOnError)
	listen := fs.String("listen", "127.0.0.1:4317", "address to serve OTLP/gRPC on")
	out := fs.String("out", "", "file to append the spans to, a JSON object per line")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *out == "" {
		return fmt.Errorf("--out is required")
	}
	f, err := os.OpenFile(*out, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	defer f.Close()
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		return err
	}
	s := grpc.NewServer()
	coltracepb.RegisterTraceServiceServer(s, &spanWriter{enc: json.NewEncoder(f)})
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	go func() {
		<-ctx.Done()
		s.GracefulStop()
	}()
	return s.Serve(ln)
}

type spanWriter struct {
	coltracepb.UnimplementedTraceServiceServer
	mu  sync.Mutex
	enc *json.Encoder
}

func (w *spanWriter) Export(_ context.Context, req *coltracepb.ExportTraceServiceRequest) (*coltracepb.ExportTraceServiceResponse, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, rs := range req.GetResourceSpans() {
		node := stringAttr(rs.GetResource().GetAttributes(), "k8s.node.name")
		for _, ss := range rs.GetScopeSpans() {
			for _, sp := range ss.GetSpans() {
				line := SpanLine{TraceID: hex.EncodeToString(sp.GetTraceId()), SpanID: hex.EncodeToString(sp.GetSpanId()),
					Parent: hex.EncodeToString(sp.GetParentSpanId()), Name: sp.GetName(), Node: node,
					PodUID: stringAttr(sp.GetAttributes(), "k8s.pod.uid")}
				if err := w.enc.Encode(line); err != nil {
					return nil, err
				}
			}
		}
	}
	return &coltracepb.ExportTraceServiceResponse{}, nil
}

func stringAttr(kvs []*commonpb.KeyValue, key string) string {
	for _, kv := range kvs {
		if kv.GetKey() == key {
			return kv.GetValue().GetStringValue()
		}
	}
	return ""
}
