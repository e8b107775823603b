// Package adminhttp reads documents from the HTTP admin interfaces of proxies, the way every reader
// of probes/ingress must: GET requests only, one connection each (closed after the answer, so that
// a daemon on every node keeps nothing open on the proxies it polls), bounded in time and in size,
// never through an HTTP proxy from the environment, never following a redirect elsewhere. Its
// errors name the URL and what was wrong.
package adminhttp

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"

	"github.com/endpointlag/endpointlag/probes/ingress"
)

// MaxBody is the largest document read: a proxy with tens of thousands of upstreams stays well
// below it, and a larger answer is an error rather than a document cut short.
const MaxBody = 64 << 20

// Client GETs documents below one base URL.
type Client struct {
	// base is where requests go; shown how errors name it (the socket, for a unix socket).
	base, shown string
	client      *http.Client
	max         int64
}

// New checks the target's address and timeout: http:// or https://, a host, optionally a path
// prefix such as Traefik's api.basePath; or unix:///path, a socket that speaks HTTP (Contour's
// Envoy admin, /admin/admin.sock). Connections are opened by t.Dial when it is set (inside a
// proxy's pod).
func New(t ingress.Target) (*Client, error) {
	u, err := url.Parse(t.Address)
	if err != nil {
		return nil, fmt.Errorf("admin address %q: %w", t.Address, err)
	}
	if t.Timeout <= 0 {
		return nil, fmt.Errorf("admin address %q: the timeout must be positive, got %s", t.Address, t.Timeout)
	}
	dial := t.Dial
	if dial == nil {
		dial = (&net.Dialer{Timeout: t.Timeout}).DialContext
	}
	c := &Client{max: MaxBody}
	switch {
	case (u.Scheme == "http" || u.Scheme == "https") && u.Host != "" && u.RawQuery == "" && u.Fragment == "" && u.User == nil:
		c.base = strings.TrimSuffix(u.String(), "/")
		c.shown = c.base
	case u.Scheme == "unix" && u.Host == "" && u.Path != "":
		// Every request goes to the socket, whatever its URL's host.
		socket, unixDial := u.Path, dial
		dial = func(ctx context.Context, _, _ string) (net.Conn, error) { return unixDial(ctx, "unix", socket) }
		c.base = "http://localhost"
		c.shown = "unix://" + socket + ":"
	default:
		return nil, fmt.Errorf("admin address %q: want http://host:port or https://host:port (optionally with a path), or unix:///path", t.Address)
	}
	c.client = &http.Client{
		Transport: &http.Transport{
			Proxy:                  nil,
			DialContext:            dial,
			DisableKeepAlives:      true,
			TLSHandshakeTimeout:    t.Timeout,
			ResponseHeaderTimeout:  t.Timeout,
			MaxResponseHeaderBytes: 1 << 20,
		},
		Timeout: t.Timeout,
		// A redirect is answered as it is (an error below): an admin interface has no reason to
		// send the daemon elsewhere.
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
	return c, nil
}

// StatusError is an answer other than 200 OK.
type StatusError struct {
	URL  string
	Code int
	// Status is the status line's text; Body the start of the answer, which often says why.
	Status string
	Body   string
}

func (e *StatusError) Error() string {
	if e.Body == "" {
		return fmt.Sprintf("GET %s: %s", e.URL, e.Status)
	}
	return fmt.Sprintf("GET %s: %s: %q", e.URL, e.Status, e.Body)
}

// bodyExcerpt is how much of an error answer a StatusError keeps.
const bodyExcerpt = 256

// URL is how errors name what Get asks for pathQuery ("unix:///path:/clusters" for a socket).
func (c *Client) URL(pathQuery string) string { return c.shown + pathQuery }

// Get GETs pathQuery (a path, escaped as it must go on the wire, and its query) below the base
// URL and returns the body of a 200 answer and its header.
func (c *Client) Get(ctx context.Context, pathQuery string) ([]byte, http.Header, error) {
	target := c.URL(pathQuery)
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.base+pathQuery, nil)
	if err != nil {
		return nil, nil, fmt.Errorf("GET %s: %w", target, err)
	}
	req.Header.Set("Accept", "application/json")
	resp, err := c.client.Do(req)
	if err != nil {
		if c.shown != c.base {
			// The client's error names the request's URL, not the socket.
			err = fmt.Errorf("GET %s: %w", target, err)
		}
		return nil, nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		excerpt, _ := io.ReadAll(io.LimitReader(resp.Body, bodyExcerpt))
		return nil, nil, &StatusError{URL: target, Code: resp.StatusCode, Status: resp.Status, Body: strings.TrimSpace(string(excerpt))}
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, c.max+1))
	if err != nil {
		return nil, nil, fmt.Errorf("GET %s: reading the answer: %w", target, err)
	}
	if int64(len(body)) > c.max {
		return nil, nil, fmt.Errorf("GET %s: %w (%d bytes)", target, ErrTooLarge, c.max)
	}
	return body, resp.Header, nil
}

// ErrTooLarge is a document larger than MaxBody.
var ErrTooLarge = errors.New("the answer is larger than the most a reader takes")

// Document reads a proxy whose backends all come in one document (Envoy's /clusters,
// ingress-nginx's /configuration/backends): it has no cheaper query for some of them.
type Document struct {
	Client *Client
	// Kind starts errors; Path (with its query) is below the client's base URL; Decode reads the
	// body.
	Kind   string
	Path   string
	Decode func([]byte) ([]ingress.Backend, error)
}

// Read returns every backend.
func (d *Document) Read(ctx context.Context) ([]ingress.Backend, error) {
	body, _, err := d.Client.Get(ctx, d.Path)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", d.Kind, err)
	}
	backends, err := d.Decode(body)
	if err != nil {
		return nil, fmt.Errorf("%s: GET %s: %w", d.Kind, d.Client.URL(d.Path), err)
	}
	return backends, nil
}

// ReadBackends is not ok: the proxy answers for all backends only.
func (d *Document) ReadBackends(context.Context, []string) ([]ingress.Backend, bool, error) {
	return nil, false, nil
}
