package nginx

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/endpointlag/endpointlag/probes"
	"github.com/endpointlag/endpointlag/probes/ingress"
	"github.com/endpointlag/endpointlag/probes/ingress/internal/svcname"
)

// testdata/backends.json is an answer of GET /configuration/backends in the shape of the example
// in ingress-nginx's docs/kubectl-plugin.md (`kubectl ingress-nginx backends`) and of
// pkg/apis/ingress/types.go's Backend and Endpoint as configureBackends posts them: the Service
// with its spec only, endpoint ports as strings, "endpoints" left out when there are none (a
// canary whose endpoints all terminated), the default backend on the controller's 127.0.0.1:8181.

func readFixture(t testing.TB, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", name))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func describe(backends []ingress.Backend) []string {
	var out []string
	for _, b := range backends {
		if len(b.Servers) == 0 {
			out = append(out, fmt.Sprintf("%s %q -", b.Name, b.Service.String()))
		}
		for _, s := range b.Servers {
			out = append(out, fmt.Sprintf("%s %q %s %v %s", b.Name, b.Service.String(), s.Endpoint, s.Routable, s.State))
		}
	}
	return out
}

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
	backends, err := decodeBackends(readFixture(t, "backends.json"))
	if err != nil {
		t.Fatal(err)
	}
	if got := describe(backends); !slices.Equal(got, wantBackends) {
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
	body := readFixture(t, "backends.json")
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodGet || r.URL.Path != "/configuration/backends" {
			http.Error(w, "Not found!", http.StatusNotFound)
			return
		}
		_, _ = w.Write(body)
	}))
	defer srv.Close()
	k, err := ingress.Lookup(Kind)
	if err != nil || k.DefaultPort != 10246 {
		t.Fatal(k, err)
	}
	r, err := k.New(ingress.Target{Address: srv.URL, Timeout: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	got, err := r.Read(context.Background())
	if err != nil || !slices.Equal(describe(got), wantBackends) {
		t.Errorf("Read: %q %v", describe(got), err)
	}
	if _, ok, err := r.ReadBackends(context.Background(), []string{"shop-web-http"}); ok || err != nil {
		t.Errorf("ReadBackends: %v %v", ok, err)
	}

	r, err = New(ingress.Target{Address: srv.URL + "/elsewhere", Timeout: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := r.Read(context.Background()); err == nil || !strings.Contains(err.Error(), srv.URL+"/elsewhere/configuration/backends") ||
		!strings.Contains(err.Error(), "404") {
		t.Errorf("error %v does not name the URL and status", err)
	}
}

// FuzzDecodeBackends's seed corpus in testdata/fuzz holds the fixture and a few odd answers.
func FuzzDecodeBackends(f *testing.F) {
	f.Fuzz(func(t *testing.T, data []byte) {
		backends, err := decodeBackends(data)
		if ie := (*probes.InputError)(nil); errors.As(err, &ie) && ie.Reason == probes.ReasonPanic {
			t.Fatal(err)
		}
		if err != nil {
			return
		}
		for _, b := range backends {
			if b.Name == "" {
				t.Error("a backend without a name")
			}
			if s := b.Service; s.Name != "" {
				if _, ok := svcname.Ref(s.Namespace, s.Name); !ok {
					t.Errorf("%s: invalid Service %q", b.Name, s)
				}
			}
			for _, s := range b.Servers {
				if !s.Endpoint.Addr.IsValid() || s.Endpoint.Port == 0 || s.Endpoint.Protocol != "TCP" || !s.Routable || s.State != "" {
					t.Errorf("%s: invalid server %+v", b.Name, s)
				}
			}
		}
	})
}
