package adminhttp

import (
	"context"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/endpointlag/endpointlag/probes/ingress"
)

func TestGet(t *testing.T) {
	var sawClose bool
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodGet {
			t.Errorf("method %s", r.Method)
		}
		sawClose = r.Close
		switch r.URL.Path {
		case "/base/doc":
			w.Header().Set("X-Next-Page", "1")
			_, _ = w.Write([]byte(`{"ok":true}`))
		case "/base/big":
			_, _ = w.Write([]byte(strings.Repeat("x", 12)))
		case "/base/moved":
			http.Redirect(w, r, "http://example.invalid/", http.StatusFound)
		case "/base/slow":
			<-r.Context().Done()
		default:
			http.Error(w, "service not found: x@y", http.StatusNotFound)
		}
	}))
	defer srv.Close()
	c, err := New(ingress.Target{Address: srv.URL + "/base/", Timeout: 500 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	c.max = int64(len(`{"ok":true}`))
	ctx := context.Background()

	body, h, err := c.Get(ctx, "/doc?page=1")
	if err != nil || string(body) != `{"ok":true}` || h.Get("X-Next-Page") != "1" {
		t.Errorf("doc: %q %v %v", body, h, err)
	}
	if !sawClose {
		t.Error("the request did not ask to close its connection")
	}

	_, _, err = c.Get(ctx, "/missing")
	var se *StatusError
	if !errors.As(err, &se) || se.Code != http.StatusNotFound || se.URL != srv.URL+"/base/missing" ||
		!strings.Contains(err.Error(), "service not found: x@y") {
		t.Errorf("missing: %v", err)
	}

	if _, _, err = c.Get(ctx, "/big"); !errors.Is(err, ErrTooLarge) || !strings.Contains(err.Error(), "/base/big") {
		t.Errorf("big: %v", err)
	}
	if _, _, err = c.Get(ctx, "/moved"); !errors.As(err, &se) || se.Code != http.StatusFound {
		t.Errorf("redirect followed or not reported: %v", err)
	}
	start := time.Now()
	if _, _, err = c.Get(ctx, "/slow"); err == nil || !strings.Contains(err.Error(), "/base/slow") {
		t.Errorf("slow: %v", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("the timeout did not bound the request: %s", d)
	}
}

func TestNewRefuses(t *testing.T) {
	for _, tc := range []ingress.Target{
		{Address: "tcp://10.0.0.1:9999", Timeout: time.Second},
		{Address: "unix://host/admin.sock", Timeout: time.Second},
		{Address: "10.0.0.1:9000", Timeout: time.Second},
		{Address: "http://", Timeout: time.Second},
		{Address: "http://10.0.0.1:9000/?x=1", Timeout: time.Second},
		{Address: "http://10.0.0.1:9000", Timeout: 0},
	} {
		if _, err := New(tc); err == nil {
			t.Errorf("New(%+v) accepted", tc)
		}
	}
}

func TestDocument(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/admin/doc" {
			http.NotFound(w, r)
			return
		}
		_, _ = w.Write([]byte(r.URL.Query().Get("say")))
	}))
	defer srv.Close()
	decode := func(b []byte) ([]ingress.Backend, error) {
		if string(b) == "bad" {
			return nil, errors.New("not a document")
		}
		return []ingress.Backend{{Name: string(b)}}, nil
	}
	doc := func(path string) *Document {
		c, err := New(ingress.Target{Address: srv.URL + "/admin", Timeout: time.Second})
		if err != nil {
			t.Fatal(err)
		}
		return &Document{Client: c, Kind: "kind", Path: path, Decode: decode}
	}
	got, err := doc("/doc?say=x").Read(context.Background())
	if err != nil || len(got) != 1 || got[0].Name != "x" {
		t.Errorf("Read: %+v %v", got, err)
	}
	if _, ok, err := doc("/doc?say=x").ReadBackends(context.Background(), []string{"x"}); ok || err != nil {
		t.Errorf("ReadBackends: %v %v", ok, err)
	}
	for path, want := range map[string]string{
		"/doc?say=bad": "kind: GET " + srv.URL + "/admin/doc?say=bad: not a document",
		"/elsewhere":   "kind: GET " + srv.URL + "/admin/elsewhere: 404 Not Found",
	} {
		if _, err := doc(path).Read(context.Background()); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: error %v, want %q", path, err, want)
		}
	}
}

// A unix socket speaks HTTP too (Contour's Envoy admin), and Target.Dial, when set, opens every
// connection: with the socket's path, or the URL's host and port.
func TestUnixSocketAndDial(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "admin.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/clusters" {
			http.NotFound(w, r)
			return
		}
		_, _ = w.Write([]byte("ok"))
	}))
	srv.Listener = l
	srv.Start()
	defer srv.Close()

	var dialed []string
	dial := func(ctx context.Context, network, address string) (net.Conn, error) {
		dialed = append(dialed, network+" "+address)
		var d net.Dialer
		return d.DialContext(ctx, "unix", sock)
	}
	for _, tc := range []struct {
		target ingress.Target
		dialed []string
	}{
		{ingress.Target{Address: "unix://" + sock, Timeout: time.Second}, nil},
		{ingress.Target{Address: "unix:///admin/admin.sock", Timeout: time.Second, Dial: dial}, []string{"unix /admin/admin.sock"}},
		{ingress.Target{Address: "http://127.0.0.1:9001", Timeout: time.Second, Dial: dial}, []string{"tcp 127.0.0.1:9001"}},
	} {
		dialed = nil
		c, err := New(tc.target)
		if err != nil {
			t.Fatal(err)
		}
		if body, _, err := c.Get(context.Background(), "/clusters"); err != nil || string(body) != "ok" {
			t.Errorf("%s: %q %v", tc.target.Address, body, err)
		}
		if !slices.Equal(dialed, tc.dialed) {
			t.Errorf("%s: dialed %q, want %q", tc.target.Address, dialed, tc.dialed)
		}
	}
	c, err := New(ingress.Target{Address: "unix://" + sock, Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := c.Get(context.Background(), "/missing"); err == nil || !strings.Contains(err.Error(), "GET unix://"+sock+":/missing: 404") {
		t.Errorf("error %v does not name the socket", err)
	}
	c, err = New(ingress.Target{Address: "unix://" + sock + ".gone", Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := c.Get(context.Background(), "/clusters"); err == nil || !strings.Contains(err.Error(), "GET unix://"+sock+".gone:/clusters") {
		t.Errorf("error %v does not name the socket", err)
	}
}
