package traefik

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/endpointlag/endpointlag/probes/ingress"
	"github.com/endpointlag/endpointlag/probes/ingress/internal/readertest"
)

// traefikAPI serves the fixtures as Traefik's API does: the list in pages of perPage services
// (X-Next-Page 1 on the last), one service by its escaped name, 404 for an unknown one.
func traefikAPI(t *testing.T, perPage int) *httptest.Server {
	var list []json.RawMessage
	if err := json.Unmarshal(readertest.Fixture(t, "services.json"), &list); err != nil {
		t.Fatal(err)
	}
	one := readertest.Fixture(t, "service-shop-web-8080.json")
	return httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodGet {
			t.Errorf("%s %s", r.Method, r.URL)
		}
		switch {
		case r.URL.Path == "/api/http/services":
			page, _ := strconv.Atoi(r.URL.Query().Get("page"))
			start, end := (page-1)*perPage, min(page*perPage, len(list))
			next := 1
			if end < len(list) {
				next = page + 1
			}
			w.Header().Set("X-Next-Page", strconv.Itoa(next))
			_ = json.NewEncoder(w).Encode(list[start:end])
		case r.URL.EscapedPath() == "/api/http/services/shop-web-8080@kubernetes":
			_, _ = w.Write(one)
		case r.URL.Path == "/api/http/services/mirror@file":
			_, _ = w.Write([]byte(`{"mirroring":{"service":"shop-web-8080@kubernetes"},"name":"mirror@file","status":"enabled"}`))
		case r.URL.Path == "/api/http/services/flaky@file":
			http.Error(w, "boom", http.StatusInternalServerError)
		case strings.HasPrefix(r.URL.Path, "/api/http/services/"):
			http.Error(w, `{"message":"service not found: gone"}`, http.StatusNotFound)
		default:
			http.NotFound(w, r)
		}
	}))
}

func TestReadFollowsPages(t *testing.T) {
	want, err := decodeServices(readertest.Fixture(t, "services.json"))
	if err != nil {
		t.Fatal(err)
	}
	for _, perPage := range []int{100, 2} {
		srv := traefikAPI(t, perPage)
		got, err := readertest.Reader(t, Kind, srv.URL, 2*time.Second).Read(context.Background())
		srv.Close()
		if err != nil {
			t.Fatalf("%d per page: %v", perPage, err)
		}
		if !slices.Equal(readertest.Describe(got), readertest.Describe(want)) {
			t.Errorf("%d per page:\n got %q\nwant %q", perPage, readertest.Describe(got), readertest.Describe(want))
		}
	}
}

func TestReadBackends(t *testing.T) {
	srv := traefikAPI(t, 100)
	defer srv.Close()
	r := readertest.Reader(t, Kind, srv.URL, 2*time.Second)
	got, ok, err := r.ReadBackends(context.Background(), []string{"shop-web-8080@kubernetes", "shop-old-8080@kubernetes", "mirror@file"})
	if err != nil || !ok {
		t.Fatal(ok, err)
	}
	want := []string{
		`shop-web-8080@kubernetes "shop/web" 10.244.1.5:8080/TCP true `,
		`shop-web-8080@kubernetes "shop/web" 10.244.2.9:8080/TCP true `,
		// Gone from Traefik, or no longer balancing over servers: nothing routed through them.
		`shop-old-8080@kubernetes "shop/old" -`,
		`mirror@file "" -`,
	}
	if d := readertest.Describe(got); !slices.Equal(d, want) {
		t.Errorf("got %q\nwant %q", d, want)
	}

	_, _, err = r.ReadBackends(context.Background(), []string{"flaky@file"})
	if err == nil || !strings.Contains(err.Error(), srv.URL+"/api/http/services/flaky@file") || !strings.Contains(err.Error(), "500") {
		t.Errorf("error %v does not name the URL and status", err)
	}
}

func TestReadErrors(t *testing.T) {
	if k, err := ingress.Lookup(Kind); err != nil || k.Scheme != "http" || k.DefaultPort != 8080 {
		t.Errorf("kind %+v, %v", k, err)
	}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = w.Write([]byte(`{"not":"a list"}`))
	}))
	defer srv.Close()
	_, err := readertest.Reader(t, Kind, srv.URL, 2*time.Second).Read(context.Background())
	if err == nil || !strings.Contains(err.Error(), srv.URL+"/api/http/services?per_page=") {
		t.Errorf("error %v does not say where", err)
	}
	if _, err := New(ingress.Target{Address: "tcp://10.0.0.1:9000", Timeout: time.Second}); err == nil {
		t.Error("a tcp:// address accepted")
	}
}
