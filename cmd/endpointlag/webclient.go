package main

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"strings"

	"github.com/spf13/pflag"
)

// clientAuth is how a command, or the daemon's pusher, reaches an endpointlag server protected by
// --web.auth=kubernetes (or by TLS alone): the bearer token it sends and how it verifies the
// server's certificate.
type clientAuth struct {
	// prefix is the flags' prefix: "" for the commands, "aggregator." for the pusher.
	prefix    string
	tokenFile string
	caFile    string
	insecure  bool
}

// bind binds the flags, prefixed with prefix; server names the server in their help.
func (c *clientAuth) bind(fs *pflag.FlagSet, prefix, server string) {
	c.prefix = prefix
	fs.StringVar(&c.tokenFile, prefix+"token-file", "",
		"file holding a bearer token to send to "+server+": with --web.auth=kubernetes there, a Kubernetes token whose user RBAC allows the path "+
			"(a ServiceAccount's: in a pod /var/run/secrets/kubernetes.io/serviceaccount/token; or one from kubectl create token); "+
			"read again at each request, so a rotated token is used at once; https URLs only (empty: send none)")
	fs.StringVar(&c.caFile, prefix+"ca-file", "",
		"PEM file of the CA certificate(s) that verify "+server+"'s HTTPS certificate, read at start (empty: the system's roots)")
	fs.BoolVar(&c.insecure, prefix+"insecure-skip-tls-verify", false,
		"do not verify "+server+"'s HTTPS certificate, e.g. the self-signed one of --web.auth=kubernetes without --web.tls-cert-file: "+
			"the connection is encrypted but anyone who can intercept it can impersonate the server and read the token")
}

// validate reports wrong settings for the server URLs, naming the flags. The files they name are
// read by transport.
func (c clientAuth) validate(urls ...string) error {
	var errs []error
	if c.caFile != "" && c.insecure {
		errs = append(errs, fmt.Errorf("--%sca-file and --%sinsecure-skip-tls-verify are mutually exclusive: either verify the certificate or do not", c.prefix, c.prefix))
	}
	if c.tokenFile != "" {
		for _, u := range urls {
			if pu, err := url.Parse(u); err == nil && pu.Scheme == "http" {
				errs = append(errs, fmt.Errorf("--%stoken-file: %s is plain HTTP and would carry the token in clear: use https://", c.prefix, u))
			}
		}
	}
	return errors.Join(errs...)
}

func (c clientAuth) roots() (*x509.CertPool, error) {
	b, err := os.ReadFile(c.caFile)
	if err != nil {
		return nil, fmt.Errorf("--%sca-file: %w", c.prefix, err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(b) {
		return nil, fmt.Errorf("--%sca-file %s: no PEM certificate in it", c.prefix, c.caFile)
	}
	return pool, nil
}

// transport returns the round tripper that carries the requests: http.DefaultTransport, with the
// CA or the skipped verification, and with the token added to each request. It reads the files
// once, so that a wrong one is reported before the first request.
func (c clientAuth) transport() (http.RoundTripper, error) {
	var rt http.RoundTripper = http.DefaultTransport
	if c.caFile != "" || c.insecure {
		t := http.DefaultTransport.(*http.Transport).Clone()
		t.TLSClientConfig = &tls.Config{MinVersion: tls.VersionTLS12, InsecureSkipVerify: c.insecure}
		if c.caFile != "" {
			pool, err := c.roots()
			if err != nil {
				return nil, err
			}
			t.TLSClientConfig.RootCAs = pool
		}
		rt = t
	}
	if c.tokenFile != "" {
		b := &bearerFromFile{file: c.tokenFile, flag: "--" + c.prefix + "token-file", next: rt}
		if _, err := readToken(b.file); err != nil {
			return nil, fmt.Errorf("%s: %w", b.flag, err)
		}
		rt = b
	}
	return rt, nil
}

// client is an http.Client with the transport (http.DefaultTransport without settings).
func (c clientAuth) client() (*http.Client, error) {
	rt, err := c.transport()
	if err != nil {
		return nil, err
	}
	return &http.Client{Transport: rt}, nil
}

// bearerFromFile adds the token of a file to each request, reading the file each time: a
// projected ServiceAccount token is rotated by the kubelet in place, and one small read per
// request is cheaper than knowing when.
type bearerFromFile struct {
	file, flag string
	next       http.RoundTripper
}

func (b *bearerFromFile) RoundTrip(req *http.Request) (*http.Response, error) {
	token, err := readToken(b.file)
	if err != nil {
		if req.Body != nil {
			_ = req.Body.Close()
		}
		return nil, fmt.Errorf("%s: %w", b.flag, err)
	}
	req = req.Clone(req.Context())
	req.Header.Set("Authorization", "Bearer "+token)
	return b.next.RoundTrip(req)
}

func readToken(file string) (string, error) {
	b, err := os.ReadFile(file)
	if err != nil {
		return "", err
	}
	token := strings.TrimSpace(string(b))
	if token == "" {
		return "", fmt.Errorf("%s is empty", file)
	}
	return token, nil
}
