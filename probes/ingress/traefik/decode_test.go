package traefik

import (
	"slices"
	"testing"

	"github.com/endpointlag/endpointlag/probes/ingress"
	"github.com/endpointlag/endpointlag/probes/ingress/internal/readertest"
)

// The fixtures are answers of Traefik v3's API written in the shape of Traefik's own golden files
// (pkg/api/testdata/services.json, service-bar.json) and of the JSON tags of runtime.ServiceInfo
// and dynamic.Server (url, weight, fenced) in v3.7, with the servers its kubernetes and
// kubernetescrd providers write: "<namespace>-<service>-<port>@<provider>", one server per
// serving endpoint, fenced when terminating.

func TestDecodeServices(t *testing.T) {
	backends, err := decodeServices(readertest.Fixture(t, "services.json"))
	if err != nil {
		t.Fatal(err)
	}
	want := []string{
		// A service Traefik could not build answers nothing.
		`shop-broken-8080@kubernetes "shop/broken" 10.244.1.9:8080/TCP false disabled`,
		// Four dash-separated parts: the Service is ambiguous and left zero.
		`shop-grpc-api-grpc@kubernetescrd "" [fd00:10:244:1::5]:9000/TCP true `,
		`shop-grpc-api-grpc@kubernetescrd "" [fd00:10:244:2::8]:9000/TCP false fenced`,
		`shop-web-8080@kubernetes "shop/web" 10.244.1.5:8080/TCP true `,
		// Terminating: fenced, still serving the requests it has.
		`shop-web-8080@kubernetes "shop/web" 10.244.1.6:8080/TCP false fenced`,
		// Failed its health check.
		`shop-web-8080@kubernetes "shop/web" 10.244.2.7:8080/TCP false DOWN`,
		`shop-web-8080@kubernetes "shop/web" 10.244.2.8:8080/TCP false weight 0`,
		// A host name is no endpoint; a URL without a port has its scheme's.
		`legacy@file "" 192.0.2.10:80/TCP true `,
		// Weighted, mirroring and internal services have no servers of their own: left out.
	}
	if got := readertest.Describe(backends); !slices.Equal(got, want) {
		t.Errorf("got\n%q\nwant\n%q", got, want)
	}
}

func TestDecodeService(t *testing.T) {
	b, ok, err := decodeService(readertest.Fixture(t, "service-shop-web-8080.json"))
	if err != nil || !ok {
		t.Fatal(ok, err)
	}
	want := []string{
		`shop-web-8080@kubernetes "shop/web" 10.244.1.5:8080/TCP true `,
		`shop-web-8080@kubernetes "shop/web" 10.244.2.9:8080/TCP true `,
	}
	if got := readertest.Describe([]ingress.Backend{b}); !slices.Equal(got, want) {
		t.Errorf("got %q, want %q", got, want)
	}
	if _, ok, err := decodeService([]byte(`{"name":"x@file","weighted":{}}`)); ok || err != nil {
		t.Errorf("weighted service: %v %v", ok, err)
	}
}

func TestDecodeErrors(t *testing.T) {
	for _, doc := range []string{``, `{}`, `[{"name": 5}]`, `<html>`} {
		if _, err := decodeServices([]byte(doc)); err == nil {
			t.Errorf("%q decoded", doc)
		}
	}
}

func TestServiceOf(t *testing.T) {
	for name, want := range map[string]string{
		"shop-web-8080@kubernetes":    "shop/web",
		"shop-web-http@kubernetescrd": "shop/web",
		"shop-web-8080@file":          "",
		"shop-web-8080":               "",
		// The Gateway API provider names routes.
		"httproute-shop-web-gw-default-gw-ep-web-0-1c0cf64bde37d9d0df06@kubernetesgateway": "",
	} {
		if got := serviceOf(name).String(); got != want {
			t.Errorf("serviceOf(%q) = %q, want %q", name, got, want)
		}
	}
}

// FuzzDecodeServices's seed corpus in testdata/fuzz holds the fixtures and a few odd answers.
func FuzzDecodeServices(f *testing.F) {
	f.Fuzz(func(t *testing.T, data []byte) {
		backends, err := decodeServices(data)
		readertest.NoPanic(t, err)
		readertest.Check(t, backends, false)
		b, ok, err := decodeService(data)
		readertest.NoPanic(t, err)
		if ok {
			readertest.Check(t, []ingress.Backend{b}, false)
		}
	})
}
