package nginx

import (
	"context"
	"errors"
	"slices"
	"testing"
	"time"

	"github.com/endpointlag/endpointlag/probes/ingress"
	"github.com/endpointlag/endpointlag/probes/ingress/internal/readertest"
)

// testdata/backends.json is an answer of GET /configuration/backends in the shape of the example
// in ingress-nginx's docs/kubectl-plugin.md (`kubectl ingress-nginx backends`) and of
// pkg/apis/ingress/types.go's Backend and Endpoint as configureBackends posts them: the Service
// with its spec only, endpoint ports as strings, "endpoints" left out when there are none (a
// canary whose endpoints all terminated), the default backend on the controller's 127.0.0.1:8181.

var wantBackends = []string{
	// Ambiguous names tell no Service.
	`default-apple-service-5678 "" 10.1.3.86:5678/TCP true `,
	`shop-web-http "shop/web" 10.244.1.5:8080/TCP true `,
	`shop-web-http "shop/web" 10.244.2.7:8080/TCP true `,
	`shop-web-http "shop/web" [fd00:10:244:1::5]:8080/TCP true `,
	`shop-web-v2-80 "" -`,
	// An ExternalName Service's host name is no endpoint.
	`shop-payments-443 "shop/payments" -`,
	`upstream-default-backend "" 127.0.0.1:8181/TCP true `,
}

func TestDecodeBackends(t *testing.T) {
	backends, err := decodeBackends(readertest.Fixture(t, "backends.json"))
	if err != nil {
		t.Fatal(err)
	}
	if got := readertest.Describe(backends); !slices.Equal(got, wantBackends) {
		t.Errorf("got\n%q\nwant\n%q", got, wantBackends)
	}
	if _, err := decodeBackends([]byte("nil")); !errors.Is(err, ErrNotConfigured) {
		t.Errorf("nil: %v", err)
	}
	for _, doc := range []string{``, `{}`, `[{"name":"a-b-80","endpoints":[{"address":"10.0.0.1","port":80}]}]`} {
		if _, err := decodeBackends([]byte(doc)); err == nil {
			t.Errorf("%q decoded", doc)
		}
	}
}

func TestRead(t *testing.T) {
	k, err := ingress.Lookup(Kind)
	if err != nil || k.DefaultPort != 10246 || k.Scheme != "http" {
		t.Fatal(k, err)
	}
	r := readertest.Reader(t, Kind, readertest.Serve(t, backendsPath, readertest.Fixture(t, "backends.json")), time.Second)
	got, err := r.Read(context.Background())
	if err != nil || !slices.Equal(readertest.Describe(got), wantBackends) {
		t.Errorf("Read: %q %v", readertest.Describe(got), err)
	}
	if _, ok, err := r.ReadBackends(context.Background(), []string{"shop-web-http"}); ok || err != nil {
		t.Errorf("ReadBackends: %v %v", ok, err)
	}
}

// FuzzDecodeBackends's seed corpus in testdata/fuzz holds the fixture and a few odd answers.
func FuzzDecodeBackends(f *testing.F) {
	f.Fuzz(func(t *testing.T, data []byte) {
		backends, err := decodeBackends(data)
		readertest.NoPanic(t, err)
		readertest.Check(t, backends, false)
		for _, b := range backends {
			for _, s := range b.Servers {
				if !s.Routable {
					t.Errorf("%s: %s listed, not routable", b.Name, s.Endpoint)
				}
			}
		}
	})
}
