package envoy

import (
	"context"
	"slices"
	"testing"
	"time"

	"github.com/endpointlag/endpointlag/probes/ingress"
	"github.com/endpointlag/endpointlag/probes/ingress/internal/readertest"
)

var wantClusters = []string{
	// A route's cluster names no Service.
	`httproute/shop/web/rule/0 "" 10.244.1.5:8080/TCP true `,
	// Terminating: Envoy Gateway sends it DRAINING.
	`httproute/shop/web/rule/0 "" 10.244.1.6:8080/TCP false DRAINING`,
	`httproute/shop/web/rule/0 "" 10.244.2.7:8080/TCP false failed_outlier_check`,
	`service/shop/web/8080 "shop/web" 10.244.1.5:8080/TCP true `,
	`shop/api/80/da39a3ee5e "shop/api" 10.244.1.20:8080/TCP true `,
	// Removed from EDS but kept, and balanced to, while it passes its active health checks.
	`shop/api/80/da39a3ee5e "shop/api" 10.244.2.21:8080/TCP true `,
	`shop/api/80/da39a3ee5e "shop/api" 10.244.2.22:8080/TCP false failed_active_health_check,active_hc_timeout`,
	`shop/api/80/da39a3ee5e "shop/api" 10.244.1.23:8080/TCP false failed_active_health_check,pending_active_hc`,
	`a-namesp-4f1e2d/service--4f1e2d/8080/0f3c9ab21e "a-namespace-with-a-long-name/service-with-a-long-name" 10.244.2.30:8080/TCP true `,
	`outbound|9080||reviews.bookinfo.svc.cluster.local "bookinfo/reviews" [fd00:10:244:1::7]:9080/TCP true `,
	`outbound|9080||reviews.bookinfo.svc.cluster.local "bookinfo/reviews" [fd00:10:244:2::9]:9080/TCP false UNHEALTHY`,
	`outbound|80|v1|ratings.bookinfo.svc.cluster.local "bookinfo/ratings" -`,
	// A Unix socket is no endpoint.
	`prometheus_stats "" -`,
}

func TestDecodeClusters(t *testing.T) {
	backends, err := decodeClusters(readertest.Fixture(t, fixture))
	if err != nil {
		t.Fatal(err)
	}
	if got := readertest.Describe(backends); !slices.Equal(got, wantClusters) {
		t.Errorf("got\n%q\nwant\n%q", got, wantClusters)
	}
}

// Newer Envoys write the document with their own JSON streamer: numbers unquoted, fields these
// protos may not know yet. Both are read.
func TestDecodeStreamedShape(t *testing.T) {
	doc := `{"cluster_statuses":[{"name":"outbound|80||web.shop.svc.cluster.local","observability_name":"web","some_future_field":{"x":1},
		"circuit_breakers":{"thresholds":[{"priority":"DEFAULT","max_connections":1024},{"priority":"HIGH","max_connections":1024}]},
		"host_statuses":[{"address":{"socket_address":{"address":"10.0.0.1","port_value":80}},
			"stats":[{"type":"COUNTER","name":"cx_total","value":3}],
			"health_status":{"eds_health_status":"DRAINING"},"weight":1}]}]}`
	backends, err := decodeClusters([]byte(doc))
	want := []string{`outbound|80||web.shop.svc.cluster.local "shop/web" 10.0.0.1:80/TCP false DRAINING`}
	if got := readertest.Describe(backends); err != nil || !slices.Equal(got, want) {
		t.Errorf("got %q, %v; want %q", got, err, want)
	}
	for _, doc := range []string{``, `[]`, `{"cluster_statuses":{}}`, `<html></html>`} {
		if _, err := decodeClusters([]byte(doc)); err == nil {
			t.Errorf("%q decoded", doc)
		}
	}
}

func TestServiceOf(t *testing.T) {
	for _, tc := range []struct{ cluster, eds, want string }{
		{"outbound|8080||reviews.bookinfo.svc.cluster.local", "", "bookinfo/reviews"},
		{"outbound|8080|v2|reviews.bookinfo.svc.example.org", "", "bookinfo/reviews"},
		// A ServiceEntry's host, an inbound cluster.
		{"outbound|443||api.example.com", "", ""},
		{"inbound|9080||", "", ""},
		{"service/shop/web/8080", "", "shop/web"},
		{"service/shop/web/8080/http2", "", "shop/web"},
		{"httproute/shop/web/rule/0", "", ""},
		{"grpcroute/shop/web/rule/1/backend/0", "", ""},
		{"shop/api/80/da39a3ee5e", "", "shop/api"},
		{"shop/api/80/da39a3ee5e", "shop/api/http", "shop/api"},
		// Cut by Hashname, without the EDS name: the parts are not the names.
		{"a-namesp-4f1e2d/service--4f1e2d/8080/0f3c9ab21e", "", ""},
		{"shop/api/80/not-a-hash", "", ""},
		{"prometheus_stats", "", ""},
	} {
		if got := serviceOf(tc.cluster, tc.eds).String(); got != tc.want {
			t.Errorf("serviceOf(%q, %q) = %q, want %q", tc.cluster, tc.eds, got, tc.want)
		}
	}
}

func TestRead(t *testing.T) {
	k, err := ingress.Lookup(Kind)
	if err != nil || k.MinInterval != MinInterval || k.DefaultPort != 19000 || k.Scheme != "http" {
		t.Fatal(k, err)
	}
	r := readertest.Reader(t, Kind, readertest.Serve(t, clustersPath, readertest.Fixture(t, fixture)), time.Second)
	got, err := r.Read(context.Background())
	if err != nil || !slices.Equal(readertest.Describe(got), wantClusters) {
		t.Errorf("Read: %q %v", readertest.Describe(got), err)
	}
	if _, ok, err := r.ReadBackends(context.Background(), []string{"service/shop/web/8080"}); ok || err != nil {
		t.Errorf("ReadBackends: %v %v", ok, err)
	}
}

// FuzzDecodeClusters's seed corpus in testdata/fuzz holds the fixture and a few odd answers.
func FuzzDecodeClusters(f *testing.F) {
	f.Fuzz(func(t *testing.T, data []byte) {
		backends, err := decodeClusters(data)
		readertest.NoPanic(t, err)
		readertest.Check(t, backends, false)
	})
}
