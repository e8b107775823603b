package envoy

import (
	"flag"
	"os"
	"path/filepath"
	"testing"

	adminv3 "github.com/envoyproxy/go-control-plane/envoy/admin/v3"
	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

var update = flag.Bool("update", false, "rewrite testdata/clusters.json from fixtureClusters")

const fixture = "clusters.json"

// fixtureClusters is testdata/clusters.json: an Envoy's /clusters?format=json built from Envoy's
// admin protos as its clusters handler fills them (server/admin/clusters_handler.cc: per host its
// address, counters and gauges, health_status with eds_health_status always set, weight,
// locality; per cluster its circuit breakers for both priorities) and marshalled as Envoy does,
// with proto field names. The clusters are named as Envoy Gateway v1.9, Contour v1.33 and Istio
// name theirs, with terminating endpoints as each marks them.
func fixtureClusters() *adminv3.Clusters {
	return &adminv3.Clusters{ClusterStatuses: []*adminv3.ClusterStatus{
		{
			// Envoy Gateway, per route rule. It sends a serving, terminating endpoint as DRAINING.
			Name:            "httproute/shop/web/rule/0",
			AddedViaApi:     true,
			EdsServiceName:  "httproute/shop/web/rule/0",
			CircuitBreakers: circuitBreakers(),
			HostStatuses: []*adminv3.HostStatus{
				host("10.244.1.5", 8080, eds(corev3.HealthStatus_HEALTHY), 3912),
				host("10.244.1.6", 8080, eds(corev3.HealthStatus_DRAINING), 2877),
				host("10.244.2.7", 8080, &adminv3.HostHealthStatus{EdsHealthStatus: corev3.HealthStatus_HEALTHY, FailedOutlierCheck: true}, 12),
			},
		},
		{
			// Envoy Gateway, a backend cluster shared by the routes to one Service port.
			Name:            "service/shop/web/8080",
			AddedViaApi:     true,
			EdsServiceName:  "service/shop/web/8080",
			CircuitBreakers: circuitBreakers(),
			HostStatuses: []*adminv3.HostStatus{
				host("10.244.1.5", 8080, eds(corev3.HealthStatus_HEALTHY), 40),
			},
		},
		{
			// Contour, with active health checks: EDS removed 10.244.2.21, which passes its checks.
			Name:            "shop/api/80/da39a3ee5e",
			AddedViaApi:     true,
			EdsServiceName:  "shop/api/http",
			CircuitBreakers: circuitBreakers(),
			HostStatuses: []*adminv3.HostStatus{
				host("10.244.1.20", 8080, eds(corev3.HealthStatus_HEALTHY), 511),
				host("10.244.2.21", 8080, &adminv3.HostHealthStatus{EdsHealthStatus: corev3.HealthStatus_HEALTHY, PendingDynamicRemoval: true}, 498),
				host("10.244.2.22", 8080, &adminv3.HostHealthStatus{EdsHealthStatus: corev3.HealthStatus_HEALTHY, FailedActiveHealthCheck: true, ActiveHcTimeout: true}, 7),
				host("10.244.1.23", 8080, &adminv3.HostHealthStatus{EdsHealthStatus: corev3.HealthStatus_HEALTHY, FailedActiveHealthCheck: true, PendingActiveHc: true}, 0),
			},
		},
		{
			// Contour, a name Hashname cut to 60 characters; the EDS service name is whole.
			Name:            "a-namesp-4f1e2d/service--4f1e2d/8080/0f3c9ab21e",
			AddedViaApi:     true,
			EdsServiceName:  "a-namespace-with-a-long-name/service-with-a-long-name",
			CircuitBreakers: circuitBreakers(),
			HostStatuses: []*adminv3.HostStatus{
				host("10.244.2.30", 8080, eds(corev3.HealthStatus_HEALTHY), 3),
			},
		},
		{
			// Istio, on an IPv6 cluster; the control plane says 9080's second pod is unhealthy.
			Name:            "outbound|9080||reviews.bookinfo.svc.cluster.local",
			AddedViaApi:     true,
			EdsServiceName:  "outbound|9080||reviews.bookinfo.svc.cluster.local",
			CircuitBreakers: circuitBreakers(),
			HostStatuses: []*adminv3.HostStatus{
				host("fd00:10:244:1::7", 9080, eds(corev3.HealthStatus_HEALTHY), 77),
				host("fd00:10:244:2::9", 9080, eds(corev3.HealthStatus_UNHEALTHY), 75),
			},
		},
		{
			// A cluster whose endpoints all went: it routes nothing.
			Name:            "outbound|80|v1|ratings.bookinfo.svc.cluster.local",
			AddedViaApi:     true,
			EdsServiceName:  "outbound|80|v1|ratings.bookinfo.svc.cluster.local",
			CircuitBreakers: circuitBreakers(),
		},
		{
			// A static cluster on a Unix socket: no pod's endpoint.
			Name:            "prometheus_stats",
			CircuitBreakers: circuitBreakers(),
			HostStatuses: []*adminv3.HostStatus{{
				Address:      &corev3.Address{Address: &corev3.Address_Pipe{Pipe: &corev3.Pipe{Path: "/var/run/envoy/admin.sock"}}},
				HealthStatus: eds(corev3.HealthStatus_HEALTHY),
				Weight:       1,
			}},
		},
	}}
}

func eds(s corev3.HealthStatus) *adminv3.HostHealthStatus {
	return &adminv3.HostHealthStatus{EdsHealthStatus: s}
}

func host(addr string, port uint32, hs *adminv3.HostHealthStatus, requests uint64) *adminv3.HostStatus {
	counter := func(name string, v uint64) *adminv3.SimpleMetric {
		return &adminv3.SimpleMetric{Type: adminv3.SimpleMetric_COUNTER, Name: name, Value: v}
	}
	gauge := func(name string, v uint64) *adminv3.SimpleMetric {
		return &adminv3.SimpleMetric{Type: adminv3.SimpleMetric_GAUGE, Name: name, Value: v}
	}
	return &adminv3.HostStatus{
		Address: &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
			Address: addr, PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: port},
		}}},
		Stats: []*adminv3.SimpleMetric{
			counter("cx_connect_fail", 0), counter("cx_total", requests/20+1), counter("rq_error", 0),
			counter("rq_success", requests), counter("rq_timeout", 0), counter("rq_total", requests),
			gauge("cx_active", 1), gauge("rq_active", 0),
		},
		HealthStatus: hs,
		Weight:       1,
		Locality:     &corev3.Locality{Region: "eu-west-1", Zone: "eu-west-1a"},
	}
}

func circuitBreakers() *clusterv3.CircuitBreakers {
	threshold := func(p corev3.RoutingPriority) *clusterv3.CircuitBreakers_Thresholds {
		return &clusterv3.CircuitBreakers_Thresholds{
			Priority:           p,
			MaxConnections:     wrapperspb.UInt32(1024),
			MaxPendingRequests: wrapperspb.UInt32(1024),
			MaxRequests:        wrapperspb.UInt32(1024),
			MaxRetries:         wrapperspb.UInt32(3),
		}
	}
	return &clusterv3.CircuitBreakers{Thresholds: []*clusterv3.CircuitBreakers_Thresholds{
		threshold(corev3.RoutingPriority_DEFAULT), threshold(corev3.RoutingPriority_HIGH),
	}}
}

// TestFixtureIsEnvoysOwn keeps testdata/clusters.json what Envoy's protos marshal (go test
// -run TestFixtureIsEnvoysOwn -update rewrites it), read strictly: no field Envoy lacks.
func TestFixtureIsEnvoysOwn(t *testing.T) {
	path := filepath.Join("testdata", fixture)
	want := fixtureClusters()
	if *update {
		b, err := protojson.MarshalOptions{UseProtoNames: true, Multiline: true, Indent: "  "}.Marshal(want)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, append(b, '\n'), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var got adminv3.Clusters
	if err := protojson.Unmarshal(b, &got); err != nil {
		t.Fatal(err)
	}
	if !proto.Equal(&got, want) {
		t.Errorf("%s differs from fixtureClusters: run go test -run TestFixtureIsEnvoysOwn -update", path)
	}
}
