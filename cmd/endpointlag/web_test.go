package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/pem"
	"errors"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	authenticationv1 "k8s.io/api/authentication/v1"
	authorizationv1 "k8s.io/api/authorization/v1"
	"k8s.io/utils/clock"
	clocktesting "k8s.io/utils/clock/testing"

	"github.com/endpointlag/endpointlag/cmd/endpointlag/internal/testutil"
	"github.com/endpointlag/endpointlag/cmd/endpointlag/internal/webserver"
	"github.com/endpointlag/endpointlag/collector/aggregate"
	"github.com/endpointlag/endpointlag/collector/collectortest"
)

// reviewer is a user as a TokenReview of the tests describes it.
func reviewer(name string) authenticationv1.UserInfo {
	return authenticationv1.UserInfo{Username: name, Groups: []string{"system:authenticated"}}
}

func writeFile(t *testing.T, dir, name, content string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// A daemon run with --web.auth=kubernetes serves HTTPS with a self-signed certificate; its probes
// stay open; inspect reaches it with a token and either the certificate as its CA or no
// verification, and says which flag is missing otherwise.
func TestProtectedDaemonAndInspect(t *testing.T) {
	const prometheus = "system:serviceaccount:monitoring:prometheus"
	api := testutil.NewReviewAPI(
		map[string]authenticationv1.UserInfo{"prometheus-token": reviewer(prometheus), "alice-token": reviewer("alice"), "bob-token": reviewer("bob")},
		map[string][]string{prometheus: {"get endpointlag.dev/records", "get /metrics"}, "bob": {"get endpointlag.dev/*"}})
	opts := testOptions()
	opts.Web.Auth = webserver.AuthKubernetes
	r := startDaemon(t, opts, clock.RealClock{}, api.Clientset)
	base := "https" + strings.TrimPrefix(r.base, "http")
	addr := strings.TrimPrefix(base, "https://")
	skipVerify := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}}
	status := func(path string) int {
		resp, err := skipVerify.Get(base + path)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	waitFor(t, "/readyz without a token", func() bool { return status("/readyz") == http.StatusOK })
	if code := status("/healthz"); code != http.StatusOK {
		t.Errorf("/healthz without a token: %d", code)
	}
	if code := status("/metrics"); code != http.StatusUnauthorized {
		t.Errorf("/metrics without a token: %d, want 401", code)
	}

	// A path that RBAC's prefix rule matches but that leads elsewhere once cleaned is only
	// redirected: the cleaned path is authorized on its own.
	noRedirect := &http.Client{Transport: skipVerify.Transport, CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	req, err := http.NewRequest(http.MethodGet, base+"/api/v1/../../metrics", nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer bob-token")
	resp, err := noRedirect.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode/100 != 3 || resp.Header.Get("Location") != "/metrics" {
		t.Errorf("/api/v1/../../metrics: %s, Location %q; want a redirect to /metrics", resp.Status, resp.Header.Get("Location"))
	}
	req.URL.Path = "/metrics"
	if resp, err = noRedirect.Do(req); err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusForbidden {
		t.Errorf("/metrics for a user granted the API only: %s", resp.Status)
	}

	conn, err := tls.Dial("tcp", addr, &tls.Config{InsecureSkipVerify: true})
	if err != nil {
		t.Fatal(err)
	}
	served := conn.ConnectionState().PeerCertificates[0]
	conn.Close()
	dir := t.TempDir()
	ca := writeFile(t, dir, "ca.crt", string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: served.Raw})))
	promToken := writeFile(t, dir, "prometheus", "prometheus-token\n")
	aliceToken := writeFile(t, dir, "alice", "alice-token")

	for _, tc := range []struct {
		name string
		args []string
		code int
		want string
	}{
		{"the self-signed certificate unverified", []string{"--token-file", promToken}, 1, "--insecure-skip-tls-verify"},
		{"no token", []string{"--insecure-skip-tls-verify"}, 1, "401 Unauthorized"},
		{"no token: the hint", []string{"--insecure-skip-tls-verify"}, 1, "--token-file"},
		{"a user RBAC does not let", []string{"--insecure-skip-tls-verify", "--token-file", aliceToken}, 1, "403 Forbidden"},
		{"a token, no verification", []string{"--insecure-skip-tls-verify", "--token-file", promToken}, 0, "no terminating endpoints known to node-a"},
		{"a token, the certificate as CA", []string{"--ca-file", ca, "--token-file", promToken}, 0, "no terminating endpoints known to node-a"},
	} {
		var out, errOut bytes.Buffer
		code := run(append([]string{"inspect", "--daemon", base}, tc.args...), &out, &errOut)
		if code != tc.code || !strings.Contains(out.String()+errOut.String(), tc.want) {
			t.Errorf("%s: exit %d, want %d with %q:\n%s%s", tc.name, code, tc.code, tc.want, out.String(), errOut.String())
		}
	}
}

// The pusher reaches an aggregator run with --web.auth=kubernetes: it sends the token of its
// file, read again when the file is rotated, and the push is authorized as verb post on its path.
// Without a token it is refused and counts an error.
func TestPushToProtectedAggregator(t *testing.T) {
	const daemonSA = "system:serviceaccount:endpointlag:endpointlag"
	api := testutil.NewReviewAPI(map[string]authenticationv1.UserInfo{"token-1": reviewer(daemonSA), "token-2": reviewer(daemonSA)},
		map[string][]string{daemonSA: {"create endpointlag.dev/push"}})
	log := slog.New(slog.DiscardHandler)
	reg := prometheus.NewRegistry()
	agg, err := aggregate.New(aggregate.DefaultOptions(), reg, clock.RealClock{}, log)
	if err != nil {
		t.Fatal(err)
	}
	ws, err := webserver.New(webserver.Options{Auth: webserver.AuthKubernetes}, "127.0.0.1", api, clock.RealClock{}, log)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: aggregate.Handler(agg, reg), ReadHeaderTimeout: 5 * time.Second}
	done := make(chan error, 1)
	go func() { done <- ws.Serve(ln, srv) }()
	t.Cleanup(func() {
		_ = srv.Close()
		if err := <-done; !errors.Is(err, http.ErrServerClosed) {
			t.Errorf("serve: %v", err)
		}
	})
	url := "https://" + ln.Addr().String()
	dir := t.TempDir()
	tokenFile := writeFile(t, dir, "token", "token-1")

	push := func(auth clientAuth) (*aggregate.Pusher, *clocktesting.FakeClock, *prometheus.Registry) {
		t.Helper()
		if err := auth.validate(url); err != nil {
			t.Fatal(err)
		}
		opts := aggregate.DefaultPushOptions()
		opts.URLs = []string{url}
		if opts.Transport, err = auth.transport(); err != nil {
			t.Fatal(err)
		}
		clk := clocktesting.NewFakeClock(time.Now())
		preg := prometheus.NewRegistry()
		p, err := aggregate.NewPusher(opts, "node1", new(collectortest.Views), preg, clk, log)
		if err != nil {
			t.Fatal(err)
		}
		return p, clk, preg
	}
	outcome := func(reg *prometheus.Registry, outcome string) float64 {
		t.Helper()
		mfs, err := reg.Gather()
		if err != nil {
			t.Fatal(err)
		}
		for _, mf := range mfs {
			if mf.GetName() != "endpointlag_aggregator_pushes_total" {
				continue
			}
			for _, m := range mf.GetMetric() {
				if m.GetLabel()[0].GetValue() == outcome {
					return m.GetCounter().GetValue()
				}
			}
		}
		return 0
	}

	p, clk, preg := push(clientAuth{prefix: "aggregator.", tokenFile: tokenFile, insecure: true})
	p.PushOnce(context.Background())
	writeFile(t, dir, "token", "token-2\n") // the kubelet rotated it
	clk.Step(aggregate.DefaultPushOptions().Heartbeat + time.Second)
	p.PushOnce(context.Background())
	if ok := outcome(preg, "ok"); ok != 2 {
		t.Errorf("%v pushes accepted, want 2", ok)
	}
	tokens, sars := api.Seen()
	if strings.Join(tokens, ",") != "token-1,token-2" {
		t.Errorf("tokens reviewed %q, want token-1 then the rotated token-2", tokens)
	}
	for _, s := range sars {
		if s.User != daemonSA || s.ResourceAttributes == nil || *s.ResourceAttributes != (authorizationv1.ResourceAttributes{Group: "endpointlag.dev", Version: "v1", Resource: "push", Verb: "create"}) {
			t.Errorf("SubjectAccessReview %+v, want %s create push.endpointlag.dev", s, daemonSA)
		}
	}

	anonymous, _, areg := push(clientAuth{prefix: "aggregator.", insecure: true})
	anonymous.PushOnce(context.Background())
	if errs := outcome(areg, "error"); errs != 1 {
		t.Errorf("a push without a token: %v errors, want 1", errs)
	}
}

// Wrong combinations of the web and client flags stop the start with an error naming the flag.
func TestWebFlags(t *testing.T) {
	dir := t.TempDir()
	token := writeFile(t, dir, "token", "a-token")
	webConfig := writeFile(t, dir, "web.yml", "tls_server_config: {}\n")
	daemon := []string{"--node-name=node1", "--probe.packets=false", "--probe.nftables=false", "--probe.iptables=false", "--probe.ipvs=false", "--probe.ingress=false"}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{append(daemon, "--web.auth=oidc"), `--web.auth: "oidc" is neither none nor kubernetes`},
		{append(daemon, "--web.auth=kubernetes", "--web.config.file="+webConfig), "--web.config.file and --web.auth=kubernetes are mutually exclusive"},
		{append(daemon, "--web.tls-cert-file=/etc/tls/tls.crt"), "--web.tls-cert-file and --web.tls-key-file go together"},
		{append(daemon, "--aggregator.urls=http://endpointlag-aggregate:9870", "--aggregator.token-file="+token),
			"--aggregator.token-file: http://endpointlag-aggregate:9870 is plain HTTP"},
		{append(daemon, "--aggregator.urls=https://endpointlag-aggregate:9870", "--aggregator.ca-file="+token, "--aggregator.insecure-skip-tls-verify"),
			"--aggregator.ca-file and --aggregator.insecure-skip-tls-verify are mutually exclusive"},
		{[]string{"aggregate", "--events=false", "--web.auth=kubernetes", "--web.config.file=" + webConfig}, "mutually exclusive"},
		{[]string{"aggregate", "--events=false", "--web.tls-key-file=/etc/tls/tls.key"}, "--web.tls-cert-file and --web.tls-key-file go together"},
		{[]string{"inspect", "--daemon=http://127.0.0.1:9860", "--token-file=" + token}, "--token-file: http://127.0.0.1:9860 is plain HTTP"},
		{[]string{"inspect", "ingress", "--daemon=https://127.0.0.1:9860", "--ca-file=" + token, "--insecure-skip-tls-verify"}, "--ca-file and --insecure-skip-tls-verify are mutually exclusive"},
		{[]string{"advise", "--aggregator=http://127.0.0.1:9870", "--token-file=" + token}, "--token-file: http://127.0.0.1:9870 is plain HTTP"},
	} {
		var out, errOut bytes.Buffer
		if code := run(tc.args, &out, &errOut); code != 2 || !strings.Contains(errOut.String(), tc.want) {
			t.Errorf("%q: exit %d, want 2 with %q:\n%s", tc.args, code, tc.want, errOut.String())
		}
	}
	// The files are read before the first request: a command stops with the flag's name.
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"inspect", "--daemon=https://127.0.0.1:1", "--token-file=" + filepath.Join(dir, "none")}, "--token-file: open " + filepath.Join(dir, "none")},
		{[]string{"inspect", "ingress", "--daemon=https://127.0.0.1:1", "--token-file=" + writeFile(t, dir, "empty", "\n")}, "--token-file: " + filepath.Join(dir, "empty") + " is empty"},
		{[]string{"advise", "--aggregator=https://127.0.0.1:1", "--ca-file=" + token}, "--ca-file " + token + ": no PEM certificate"},
	} {
		var out, errOut bytes.Buffer
		if code := run(tc.args, &out, &errOut); code != 1 || !strings.Contains(errOut.String(), tc.want) {
			t.Errorf("%q: exit %d, want 1 with %q:\n%s", tc.args, code, tc.want, errOut.String())
		}
	}
	if _, err := (clientAuth{prefix: "aggregator.", tokenFile: filepath.Join(dir, "none")}).transport(); err == nil || !strings.Contains(err.Error(), "--aggregator.token-file: open") {
		t.Errorf("the pusher's transport with a missing token file: %v", err)
	}
	var out, errOut bytes.Buffer
	if code := run([]string{"--help"}, &out, &errOut); code != 0 {
		t.Fatalf("--help: exit %d", code)
	}
	for _, flag := range []string{"--web.auth", "--web.tls-cert-file", "--web.tls-key-file", "--web.config.file", "--aggregator.token-file", "--aggregator.ca-file", "--aggregator.insecure-skip-tls-verify"} {
		if !strings.Contains(errOut.String(), flag) {
			t.Errorf("--help lacks %s", flag)
		}
	}
}
