package main

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
)

// server is one of endpointlag's HTTP servers as a command reaches it: the flag that sets its
// base URL, an example of one, and what to say when it does not answer.
type server struct {
	flag, example, unreachable string
}

var (
	daemonServer     = server{"--daemon", "http://127.0.0.1:9860", "asking the daemon: %w (is it running? --daemon sets its address)"}
	aggregatorServer = server{"--aggregator", "http://127.0.0.1:9870", "asking the aggregator: %w (is endpointlag aggregate running? --aggregator sets its address)"}
)

// getJSON GETs path below base with client and decodes the answer into v, with errors that name
// the flag to change.
func (s server) getJSON(ctx context.Context, client *http.Client, base, path string, v any) error {
	u, err := url.Parse(base)
	if err != nil || u.Scheme == "" || u.Host == "" {
		return fmt.Errorf("%s %q is not a URL like %s", s.flag, base, s.example)
	}
	u = u.JoinPath(path)
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	if err != nil {
		return err
	}
	r, err := client.Do(req)
	if err != nil {
		var verify *tls.CertificateVerificationError
		if errors.As(err, &verify) {
			return fmt.Errorf("%s: %w (--ca-file names the CA that signed the server's certificate; --insecure-skip-tls-verify skips the check, e.g. for a self-signed one)", u, err)
		}
		return fmt.Errorf(s.unreachable, err)
	}
	defer r.Body.Close()
	if r.StatusCode != http.StatusOK {
		body, _ := io.ReadAll(io.LimitReader(r.Body, 512))
		err := fmt.Errorf("%s answered %s: %s", u, r.Status, strings.TrimSpace(string(body)))
		switch r.StatusCode {
		case http.StatusUnauthorized:
			if strings.HasPrefix(r.Header.Get("WWW-Authenticate"), "Bearer") {
				return fmt.Errorf("%w (the server runs with --web.auth=kubernetes: --token-file names a file with a Kubernetes token, e.g. from kubectl create token)", err)
			}
		case http.StatusForbidden:
			return fmt.Errorf("%w (the token's user needs RBAC get on the resource of apiGroup endpointlag.dev this path names, as the ClusterRole endpointlag-api-reader grants: see docs/security.md)", err)
		}
		return err
	}
	if err := json.NewDecoder(r.Body).Decode(v); err != nil {
		return fmt.Errorf("%s: decoding the answer: %w", u, err)
	}
	return nil
}
