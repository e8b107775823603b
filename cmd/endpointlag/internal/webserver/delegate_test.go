package webserver

import (
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/http"
	"reflect"
	"strings"
	"testing"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	authorizationv1 "k8s.io/api/authorization/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/utils/clock"
	clocktesting "k8s.io/utils/clock/testing"

	"github.com/endpointlag/endpointlag/cmd/endpointlag/internal/testutil"
)

// The users of the tests' tokens, as a TokenReview describes them.
var (
	prometheus = authenticationv1.UserInfo{
		Username: "system:serviceaccount:monitoring:prometheus", UID: "0c1d7c43-prometheus",
		Groups: []string{"system:serviceaccounts", "system:serviceaccounts:monitoring", "system:authenticated"},
		Extra: map[string]authenticationv1.ExtraValue{
			"authentication.kubernetes.io/pod-name": {"prometheus-0"},
			"authentication.kubernetes.io/pod-uid":  {"5d2e6a41-pod"},
		},
	}
	daemonSA = authenticationv1.UserInfo{Username: "system:serviceaccount:endpointlag:endpointlag", UID: "9a0e-daemon",
		Groups: []string{"system:serviceaccounts", "system:serviceaccounts:endpointlag", "system:authenticated"}}
	alice = authenticationv1.UserInfo{Username: "alice", Groups: []string{"system:authenticated"}}
)

// newFakeAPI answers the reviews of the tests' tokens and users.
func newFakeAPI() *testutil.ReviewAPI {
	return testutil.NewReviewAPI(
		map[string]authenticationv1.UserInfo{"prometheus-token": prometheus, "daemon-token": daemonSA, "alice-token": alice},
		map[string][]string{
			prometheus.Username: {"get /metrics", "get endpointlag.dev/*"},
			daemonSA.Username:   {"create endpointlag.dev/push"},
			// What Kubernetes' system:discovery role grants every authenticated user.
			alice.Username: {"get /api/*", "get /apis/*"},
		})
}

// echo answers every request with its method and path.
var echo = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
	_, _ = io.WriteString(w, r.Method+" "+r.URL.Path)
})

type served struct {
	addr string
	logs *testutil.SyncBuffer
}

// serve runs a Server of opts on a loopback port until the test ends.
func serve(t *testing.T, opts Options, client kubernetes.Interface, clk clock.PassiveClock) served {
	t.Helper()
	logs := &testutil.SyncBuffer{}
	s, err := New(opts, "127.0.0.1", client, clk, testutil.DebugLogger(logs))
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: echo, ReadHeaderTimeout: 5 * time.Second}
	done := make(chan error, 1)
	go func() { done <- s.Serve(ln, srv) }()
	t.Cleanup(func() {
		_ = srv.Close()
		if err := <-done; !errors.Is(err, http.ErrServerClosed) {
			t.Errorf("Serve: %v", err)
		}
	})
	return served{addr: ln.Addr().String(), logs: logs}
}

// insecure is a client that accepts any server certificate and keeps no connection.
var insecure = &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}, DisableKeepAlives: true}}

// do sends method to url with the Authorization header auth (none when empty).
func do(t *testing.T, method, url, auth string) (int, http.Header, string) {
	t.Helper()
	req, err := http.NewRequest(method, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	if auth != "" {
		req.Header.Set("Authorization", auth)
	}
	resp, err := insecure.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, resp.Header, string(b)
}

func TestKubernetesAuth(t *testing.T) {
	api := newFakeAPI()
	s := serve(t, Options{Auth: AuthKubernetes}, api, clock.RealClock{})
	base := "https://" + s.addr
	for _, tc := range []struct {
		name, method, path, auth string
		code                     int
		body                     string
	}{
		{"no token", "GET", "/metrics", "", http.StatusUnauthorized, "Unauthorized"},
		{"not a bearer token", "GET", "/metrics", "Basic cHJvbTpwYXNz", http.StatusUnauthorized, "Unauthorized"},
		{"empty bearer token", "GET", "/metrics", "Bearer ", http.StatusUnauthorized, "Unauthorized"},
		{"a token the TokenReview rejects", "GET", "/metrics", "Bearer forged-token", http.StatusUnauthorized, "Unauthorized"},
		{"authenticated, not authorized", "GET", "/metrics", "Bearer alice-token", http.StatusForbidden, "Forbidden (user=alice, verb=get, path=/metrics)"},
		{"allowed", "GET", "/metrics", "Bearer prometheus-token", http.StatusOK, "GET /metrics"},
		{"allowed by a prefix rule", "GET", "/api/v1/records", "Bearer prometheus-token", http.StatusOK, "GET /api/v1/records"},
		{"the scheme's case does not matter", "GET", "/api/v1/ingress", "bearer prometheus-token", http.StatusOK, "GET /api/v1/ingress"},
		{"a verb the rules do not grant", "POST", "/metrics", "Bearer prometheus-token", http.StatusForbidden, "verb=post"},
		{"the push", "POST", "/api/v1/push", "Bearer daemon-token", http.StatusOK, "POST /api/v1/push"},
		{"the push's path with get", "GET", "/api/v1/push", "Bearer daemon-token", http.StatusForbidden, "verb=get"},
		{"a non-resource rule for /api/* (Kubernetes' system:discovery) does not open the API", "GET", "/api/v1/records", "Bearer alice-token", http.StatusForbidden, "verb=get"},
		{"healthz open", "GET", "/healthz", "", http.StatusOK, "GET /healthz"},
		{"readyz open", "GET", "/readyz", "", http.StatusOK, "GET /readyz"},
		{"readyz open with a bad token", "GET", "/readyz", "Bearer forged-token", http.StatusOK, "GET /readyz"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, h, body := do(t, tc.method, base+tc.path, tc.auth)
			if code != tc.code || !strings.Contains(body, tc.body) {
				t.Errorf("%s %s: %d %q, want %d with %q", tc.method, tc.path, code, body, tc.code, tc.body)
			}
			if code == http.StatusUnauthorized && !strings.HasPrefix(h.Get("WWW-Authenticate"), "Bearer") {
				t.Errorf("401 without a WWW-Authenticate: Bearer challenge: %q", h.Get("WWW-Authenticate"))
			}
		})
	}
	tokens, sars := api.Seen()
	for _, spec := range sars {
		if nr := spec.NonResourceAttributes; nr != nil && (nr.Path == "/healthz" || nr.Path == "/readyz") {
			t.Errorf("an open path was authorized: %+v", spec)
		}
	}
	for _, tok := range tokens {
		if tok == "" {
			t.Error("a TokenReview of an empty token was sent")
		}
	}
	for _, tok := range []string{"prometheus-token", "alice-token", "forged-token", "daemon-token"} {
		if strings.Contains(s.logs.String(), tok) {
			t.Errorf("the logs hold the token %q:\n%s", tok, s.logs.String())
		}
	}
}

// The SubjectAccessReview carries an API path as a resource of APIGroup (its verb as the API
// server names it), and the user exactly as the TokenReview described it: name, UID, groups and
// extra.
func TestSubjectAccessReviewAttributes(t *testing.T) {
	api := newFakeAPI()
	s := serve(t, Options{Auth: AuthKubernetes}, api, clock.RealClock{})
	if code, _, body := do(t, "GET", "https://"+s.addr+"/api/v1/pods/0d8c?limit=3", "Bearer prometheus-token"); code != http.StatusOK {
		t.Fatalf("%d %s", code, body)
	}
	if code, _, body := do(t, "POST", "https://"+s.addr+"/api/v1/push", "Bearer daemon-token"); code != http.StatusOK {
		t.Fatalf("%d %s", code, body)
	}
	want := []authorizationv1.SubjectAccessReviewSpec{
		{
			User: prometheus.Username, UID: prometheus.UID, Groups: prometheus.Groups,
			Extra: map[string]authorizationv1.ExtraValue{
				"authentication.kubernetes.io/pod-name": {"prometheus-0"},
				"authentication.kubernetes.io/pod-uid":  {"5d2e6a41-pod"},
			},
			ResourceAttributes: &authorizationv1.ResourceAttributes{Group: APIGroup, Version: "v1", Resource: "pods", Name: "0d8c", Verb: "get"},
		},
		{
			User: daemonSA.Username, UID: daemonSA.UID, Groups: daemonSA.Groups,
			ResourceAttributes: &authorizationv1.ResourceAttributes{Group: APIGroup, Version: "v1", Resource: "push", Verb: "create"},
		},
	}
	if _, sars := api.Seen(); !reflect.DeepEqual(sars, want) {
		t.Errorf("SubjectAccessReviews sent:\n%+v\nwant:\n%+v", sars, want)
	}
}

// Answers are kept 10 s, allowed and denied alike: the next requests within that time do not ask
// the API server; after it, they do.
func TestAuthCache(t *testing.T) {
	api := newFakeAPI()
	clk := clocktesting.NewFakeClock(time.Date(2026, 11, 26, 12, 0, 0, 0, time.UTC))
	s := serve(t, Options{Auth: AuthKubernetes}, api, clk)
	base := "https://" + s.addr
	check := func(what string, wantTR, wantSAR int) {
		t.Helper()
		if tr, sar := api.Calls(); tr != wantTR || sar != wantSAR {
			t.Errorf("%s: %d TokenReviews and %d SubjectAccessReviews, want %d and %d", what, tr, sar, wantTR, wantSAR)
		}
	}
	for range 3 {
		if code, _, _ := do(t, "GET", base+"/metrics", "Bearer prometheus-token"); code != http.StatusOK {
			t.Fatalf("allowed: %d", code)
		}
	}
	check("an allowed request thrice", 1, 1)
	for range 2 {
		if code, _, _ := do(t, "GET", base+"/metrics", "Bearer alice-token"); code != http.StatusForbidden {
			t.Fatalf("denied: %d", code)
		}
	}
	check("a denied request twice", 2, 2)
	for range 2 {
		if code, _, _ := do(t, "GET", base+"/metrics", "Bearer forged-token"); code != http.StatusUnauthorized {
			t.Fatalf("forged: %d", code)
		}
	}
	check("a rejected token twice", 3, 2)
	if code, _, _ := do(t, "GET", base+"/api/v1/records", "Bearer prometheus-token"); code != http.StatusOK {
		t.Fatalf("another path: %d", code)
	}
	check("a known token on another path", 3, 3)
	clk.Step(authnTTL + time.Second)
	if code, _, _ := do(t, "GET", base+"/metrics", "Bearer prometheus-token"); code != http.StatusOK {
		t.Fatalf("allowed after expiry: %d", code)
	}
	check("an allowed request once the answers expired", 4, 4)
}

// An API server that does not answer gives 503 and a log, and nothing is cached: once it answers
// again, so does the server.
func TestAPIServerUnavailable(t *testing.T) {
	api := newFakeAPI()
	s := serve(t, Options{Auth: AuthKubernetes}, api, clock.RealClock{})
	base := "https://" + s.addr
	api.SetFail(errors.New("connection refused"))
	if code, _, body := do(t, "GET", base+"/metrics", "Bearer prometheus-token"); code != http.StatusServiceUnavailable || !strings.Contains(body, "cannot check the token") {
		t.Errorf("TokenReview failing: %d %q, want 503", code, body)
	}
	if !strings.Contains(s.logs.String(), "TokenReview") || !strings.Contains(s.logs.String(), "connection refused") {
		t.Errorf("the failure is not logged:\n%s", s.logs.String())
	}
	api.SetFail(nil)
	if code, _, _ := do(t, "GET", base+"/metrics", "Bearer prometheus-token"); code != http.StatusOK {
		t.Errorf("API back: %d, want 200", code)
	}
	api.SetFail(errors.New("etcdserver: request timed out"))
	if code, _, body := do(t, "GET", base+"/api/v1/records", "Bearer prometheus-token"); code != http.StatusServiceUnavailable || !strings.Contains(body, "cannot authorize") {
		t.Errorf("SubjectAccessReview failing: %d %q, want 503", code, body)
	}
	if !strings.Contains(s.logs.String(), "SubjectAccessReview") || !strings.Contains(s.logs.String(), "etcdserver: request timed out") {
		t.Errorf("the failure is not logged:\n%s", s.logs.String())
	}
	api.SetFail(nil)
	if code, _, _ := do(t, "GET", base+"/api/v1/records", "Bearer prometheus-token"); code != http.StatusOK {
		t.Errorf("API back: %d, want 200", code)
	}
}

func TestTTLCacheBounded(t *testing.T) {
	clk := clocktesting.NewFakeClock(time.Date(2026, 11, 26, 12, 0, 0, 0, time.UTC))
	c := newTTLCache[int](clk, 10*time.Second, 2)
	c.set("a", 1)
	clk.Step(6 * time.Second)
	c.set("b", 2)
	clk.Step(6 * time.Second) // a expired
	c.set("c", 3)
	if _, ok := c.get("b"); !ok || c.size() != 2 {
		t.Errorf("the expired entry should have gone first: b kept %v, %d entries", ok, c.size())
	}
	c.set("d", 4)
	if v, ok := c.get("d"); !ok || v != 4 || c.size() != 2 {
		t.Errorf("a full cache takes the new entry and stays at its limit: d=%d %v, %d entries", v, ok, c.size())
	}
	c.set("d", 5)
	if v, _ := c.get("d"); v != 5 || c.size() != 2 {
		t.Errorf("replacing an entry: d=%d, %d entries", v, c.size())
	}
	clk.Step(10 * time.Second)
	if _, ok := c.get("d"); ok {
		t.Error("an entry outlived its TTL")
	}
}
