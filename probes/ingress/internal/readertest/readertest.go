// Package readertest holds what the tests of the proxy readers share: their fixtures, a
// description of backends one line per server to compare, and the checks every decoded backend
// must pass (the fuzzers' invariants).
package readertest

import (
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/endpointlag/endpointlag/probes"
	"github.com/endpointlag/endpointlag/probes/ingress"
	"github.com/endpointlag/endpointlag/probes/ingress/internal/svcname"
)

// Fixture returns testdata/name.
func Fixture(t testing.TB, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", name))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// Describe lists backends as `name "namespace/service" endpoint routable state`, a line per
// server, and a backend without servers as `name "namespace/service" -`.
func Describe(backends []ingress.Backend) []string {
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

// NoPanic fails the test when err is a panic the decoder recovered (probes.Recover): fuzzing
// must find those, not have them turned into errors.
func NoPanic(t testing.TB, err error) {
	t.Helper()
	if ie := (*probes.InputError)(nil); errors.As(err, &ie) && ie.Reason == probes.ReasonPanic {
		t.Fatal(err)
	}
}

// Check fails the test for what no reader may return: a backend without a name or with an
// invalid Service, a server whose endpoint is no TCP address (nor port, unless portless: an
// HAProxy server without a port) or whose Routable disagrees with its State.
func Check(t testing.TB, backends []ingress.Backend, portless bool) {
	t.Helper()
	for _, b := range backends {
		if b.Name == "" {
			t.Error("a backend without a name")
		}
		if s := b.Service; s != (probes.ServiceRef{}) {
			if _, ok := svcname.Ref(s.Namespace, s.Name); !ok {
				t.Errorf("%s: invalid Service %q", b.Name, s)
			}
		}
		for _, s := range b.Servers {
			if !s.Endpoint.Addr.IsValid() || (s.Endpoint.Port == 0 && !portless) || s.Endpoint.Protocol != "TCP" {
				t.Errorf("%s: invalid endpoint %+v", b.Name, s.Endpoint)
			}
			if s.Routable != (s.State == "") {
				t.Errorf("%s: %s routable %v with state %q", b.Name, s.Endpoint, s.Routable, s.State)
			}
		}
	}
}

// Reader returns the reader a registered kind makes for address, as the ingress probe makes it
// (through ingress.Lookup, so that the test covers the kind's registration).
func Reader(t testing.TB, kind, address string, timeout time.Duration) ingress.Reader {
	t.Helper()
	k, err := ingress.Lookup(kind)
	if err != nil {
		t.Fatal(err)
	}
	r, err := k.New(ingress.Target{Address: address, Timeout: timeout})
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// Serve answers GET pathQuery (a path and its query, as the reader sends them) with body, and
// anything else with 404, until the test ends; it returns the server's URL.
func Serve(t testing.TB, pathQuery string, body []byte) string {
	t.Helper()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodGet || r.URL.RequestURI() != pathQuery {
			http.NotFound(w, r)
			return
		}
		_, _ = w.Write(body)
	}))
	t.Cleanup(srv.Close)
	return srv.URL
}
