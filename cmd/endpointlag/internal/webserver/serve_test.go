package webserver

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/crypto/bcrypt"
	"k8s.io/utils/clock"
	clocktesting "k8s.io/utils/clock/testing"
)

// writePair writes a new self-signed certificate and its key as PEM files.
func writePair(t *testing.T, certFile, keyFile string) *x509.Certificate {
	t.Helper()
	cert, err := selfSigned(time.Now(), "127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	key, err := x509.MarshalPKCS8PrivateKey(cert.PrivateKey)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Certificate[0]}), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: key}), 0o600); err != nil {
		t.Fatal(err)
	}
	return cert.Leaf
}

// peer returns the certificate a new TLS connection to addr is served.
func peer(t *testing.T, addr string) *x509.Certificate {
	t.Helper()
	conn, err := tls.Dial("tcp", addr, &tls.Config{InsecureSkipVerify: true})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	return conn.ConnectionState().PeerCertificates[0]
}

// The certificate files are read again when they change (at most once a second): the next
// handshakes get the new certificate; a pair that does not load leaves the previous one served.
func TestCertFileReload(t *testing.T) {
	dir := t.TempDir()
	certFile, keyFile := filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key")
	first := writePair(t, certFile, keyFile)
	clk := clocktesting.NewFakeClock(time.Date(2026, 11, 26, 12, 0, 0, 0, time.UTC))
	s := serve(t, Options{Auth: AuthNone, TLSCertFile: certFile, TLSKeyFile: keyFile}, nil, clk)
	if got := peer(t, s.addr); !got.Equal(first) {
		t.Fatalf("served %s, want the first certificate", got.Subject)
	}
	second := writePair(t, certFile, keyFile)
	if got := peer(t, s.addr); !got.Equal(first) {
		t.Errorf("the files were read again within a second")
	}
	clk.Step(2 * recheckEvery)
	if got := peer(t, s.addr); !got.Equal(second) {
		t.Errorf("after the rotation served %s, want the second certificate", got.Subject)
	}
	if !strings.Contains(s.logs.String(), fingerprint(second.Raw)) {
		t.Errorf("the new certificate's fingerprint is not logged:\n%s", s.logs.String())
	}
	if err := os.WriteFile(keyFile, []byte("half-written"), 0o600); err != nil {
		t.Fatal(err)
	}
	clk.Step(2 * recheckEvery)
	if got := peer(t, s.addr); !got.Equal(second) {
		t.Errorf("a broken pair replaced the certificate served")
	}
	if !strings.Contains(s.logs.String(), "do not load") {
		t.Errorf("the broken pair is not logged:\n%s", s.logs.String())
	}
	if code, _, body := do(t, "GET", "https://"+s.addr+"/metrics", ""); code != http.StatusOK {
		t.Errorf("TLS without auth: %d %s", code, body)
	}
}

// --web.auth=kubernetes without a certificate serves a self-signed one made at start, valid for
// this host's loopback addresses, and logs its fingerprint.
func TestSelfSignedCertificate(t *testing.T) {
	s := serve(t, Options{Auth: AuthKubernetes}, newFakeAPI(), clock.RealClock{})
	got := peer(t, s.addr)
	roots := x509.NewCertPool()
	roots.AddCert(got)
	if _, err := got.Verify(x509.VerifyOptions{Roots: roots, DNSName: "127.0.0.1"}); err != nil {
		t.Errorf("the self-signed certificate does not verify against itself for 127.0.0.1: %v", err)
	}
	if !strings.Contains(s.logs.String(), "sha256="+fingerprint(got.Raw)) {
		t.Errorf("the logs lack the served certificate's fingerprint %s:\n%s", fingerprint(got.Raw), s.logs.String())
	}
	if d := got.NotAfter.Sub(got.NotBefore); d < 360*24*time.Hour {
		t.Errorf("valid for %s, want about a year", d)
	}
}

// An exporter-toolkit web configuration file: TLS from its tls_server_config (paths relative to
// the file), basic auth from its bcrypt hashes, headers from its http_server_config.
func TestWebConfigFile(t *testing.T) {
	dir := t.TempDir()
	writePair(t, filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key"))
	hash, err := bcrypt.GenerateFromPassword([]byte("s3cret"), bcrypt.MinCost)
	if err != nil {
		t.Fatal(err)
	}
	config := filepath.Join(dir, "web.yml")
	yml := "tls_server_config:\n  cert_file: tls.crt\n  key_file: tls.key\n" +
		"basic_auth_users:\n  prometheus: " + string(hash) + "\n" +
		"http_server_config:\n  headers:\n    X-Frame-Options: deny\n"
	if err := os.WriteFile(config, []byte(yml), 0o600); err != nil {
		t.Fatal(err)
	}
	s := serve(t, Options{Auth: AuthNone, ConfigFile: config}, nil, clock.RealClock{})
	base := "https://" + s.addr
	for _, tc := range []struct {
		name, auth string
		code       int
	}{
		{"no credentials", "", http.StatusUnauthorized},
		{"a wrong password", "Basic cHJvbWV0aGV1czp3cm9uZw==", http.StatusUnauthorized}, // prometheus:wrong
		{"an unknown user", "Basic bWFsbG9yeTpzM2NyZXQ=", http.StatusUnauthorized},      // mallory:s3cret
		{"the user's password", "Basic cHJvbWV0aGV1czpzM2NyZXQ=", http.StatusOK},        // prometheus:s3cret
		{"a bearer token means nothing here", "Bearer prometheus-token", http.StatusUnauthorized},
	} {
		code, h, body := do(t, "GET", base+"/metrics", tc.auth)
		if code != tc.code {
			t.Errorf("%s: %d %q, want %d", tc.name, code, body, tc.code)
		}
		if h.Get("X-Frame-Options") != "deny" {
			t.Errorf("%s: the configured header is missing: %v", tc.name, h)
		}
	}
}

func TestValidate(t *testing.T) {
	dir := t.TempDir()
	certFile, keyFile := filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key")
	writePair(t, certFile, keyFile)
	otherCert, otherKey := filepath.Join(dir, "other.crt"), filepath.Join(dir, "other.key")
	writePair(t, otherCert, otherKey)
	hash, err := bcrypt.GenerateFromPassword([]byte("s3cret"), bcrypt.MinCost)
	if err != nil {
		t.Fatal(err)
	}
	write := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	good := write("web.yml", "basic_auth_users:\n  prometheus: "+string(hash)+"\n")
	plainPassword := write("plain.yml", "basic_auth_users:\n  prometheus: s3cret\n")
	unknownKey := write("unknown.yml", "basic_auth:\n  prometheus: x\n")
	for _, tc := range []struct {
		name string
		opts Options
		want []string // in the error; none: valid
	}{
		{"the default", Options{Auth: AuthNone}, nil},
		{"kubernetes with a self-signed certificate", Options{Auth: AuthKubernetes}, nil},
		{"kubernetes with a certificate", Options{Auth: AuthKubernetes, TLSCertFile: certFile, TLSKeyFile: keyFile}, nil},
		{"TLS alone", Options{Auth: AuthNone, TLSCertFile: certFile, TLSKeyFile: keyFile}, nil},
		{"a web config file", Options{Auth: AuthNone, ConfigFile: good}, nil},
		{"an unknown auth", Options{Auth: "basic"}, []string{`--web.auth: "basic" is neither none nor kubernetes`}},
		{"a certificate without its key", Options{Auth: AuthKubernetes, TLSCertFile: certFile}, []string{"--web.tls-cert-file and --web.tls-key-file go together"}},
		{"a key without its certificate", Options{Auth: AuthNone, TLSKeyFile: keyFile}, []string{"--web.tls-cert-file and --web.tls-key-file go together"}},
		{"the web config file with kubernetes", Options{Auth: AuthKubernetes, ConfigFile: good},
			[]string{"--web.config.file and --web.auth=kubernetes are mutually exclusive"}},
		{"the web config file with TLS flags", Options{Auth: AuthNone, ConfigFile: good, TLSCertFile: certFile, TLSKeyFile: keyFile},
			[]string{"--web.config.file and --web.tls-cert-file/--web.tls-key-file are mutually exclusive"}},
	} {
		checkErr(t, tc.name, tc.opts.Validate(), tc.want)
	}
	// The files are read by New, before the first request.
	for _, tc := range []struct {
		name string
		opts Options
		want []string
	}{
		{"a key of another certificate", Options{Auth: AuthNone, TLSCertFile: certFile, TLSKeyFile: otherKey}, []string{"--web.tls-cert-file " + certFile, "private key does not match"}},
		{"a missing certificate file", Options{Auth: AuthNone, TLSCertFile: filepath.Join(dir, "none.crt"), TLSKeyFile: keyFile}, []string{"--web.tls-cert-file: open", "no such file"}},
		{"a missing web config file", Options{Auth: AuthNone, ConfigFile: filepath.Join(dir, "none.yml")}, []string{"--web.config.file " + filepath.Join(dir, "none.yml"), "no such file"}},
		{"a password that is no bcrypt hash", Options{Auth: AuthNone, ConfigFile: plainPassword}, []string{"--web.config.file " + plainPassword, "hash"}},
		{"a key the format does not have", Options{Auth: AuthNone, ConfigFile: unknownKey}, []string{"--web.config.file " + unknownKey, "basic_auth"}},
		{"a good web config file", Options{Auth: AuthNone, ConfigFile: good}, nil},
		{"kubernetes without the API", Options{Auth: AuthKubernetes}, []string{"--web.auth=kubernetes needs the Kubernetes API"}},
	} {
		if err := tc.opts.Validate(); err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		_, err := New(tc.opts, "", nil, clock.RealClock{}, slog.New(slog.DiscardHandler))
		checkErr(t, tc.name, err, tc.want)
	}
}

// checkErr checks that err holds each of want, or is nil when want is empty.
func checkErr(t *testing.T, name string, err error, want []string) {
	t.Helper()
	if len(want) == 0 {
		if err != nil {
			t.Errorf("%s: %v", name, err)
		}
		return
	}
	if err == nil {
		t.Errorf("%s: no error, want one with %q", name, want)
		return
	}
	for _, w := range want {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("%s: %q lacks %q", name, err, w)
		}
	}
}
