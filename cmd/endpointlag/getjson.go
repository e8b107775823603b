package main

import (
	"context"
	"encoding/json"
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

// getJSON GETs path below base and decodes the answer into v, with errors that name the flag.
func (s server) getJSON(ctx context.Context, base, path string, v any) error {
	u, err := url.Parse(base)
	if err != nil || u.Scheme == "" || u.Host == "" {
		return fmt.Errorf("%s %q is not a URL like %s", s.flag, base, s.example)
	}
	u = u.JoinPath(path)
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	if err != nil {
		return err
	}
	r, err := http.DefaultClient.Do(req)
	if err != nil {
		return fmt.Errorf(s.unreachable, err)
	}
	defer r.Body.Close()
	if r.StatusCode != http.StatusOK {
		body, _ := io.ReadAll(io.LimitReader(r.Body, 512))
		return fmt.Errorf("%s answered %s: %s", u, r.Status, strings.TrimSpace(string(body)))
	}
	if err := json.NewDecoder(r.Body).Decode(v); err != nil {
		return fmt.Errorf("%s: decoding the answer: %w", u, err)
	}
	return nil
}
