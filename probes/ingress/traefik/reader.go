// Package traefik reads Traefik v3 instances through their API: GET /api/http/services (all
// HTTP services, page by page) and GET /api/http/services/{name} (one service: the cheap query
// while only some endpoints are awaited).
//
// A server gets no new request, and is reported not routable, when it is:
//   - fenced: Traefik's Kubernetes providers (kubernetes, kubernetescrd) keep a serving,
//     terminating endpoint as a fenced server, which the load balancers never pick (a client
//     whose sticky cookie names it still reaches it);
//   - DOWN in serverStatus: its active health check failed (passive health checks do not show
//     in the API);
//   - of weight 0 or less (the balancers ignore it), or in a service whose status is "disabled".
//
// A service's Kubernetes Service is read from its name, "<namespace>-<service>-<port>@kubernetes"
// or "…@kubernetescrd", when the name is unambiguous (see svcname.Dashed); other providers' names
// tell none. Servers given by host name (ExternalName Services) are no pod's endpoints and are
// left out; so are TCP and UDP services, which this reader does not ask for.
//
// The API is served on the "traefik" entrypoint, port 8080 by default and in the Helm chart
// since its v33 (earlier charts used 9000), when api.insecure is set; otherwise it is reachable
// only through a router to api@internal, whose URL (and api.basePath, kept as the address's path)
// is then the instance's address.
package traefik

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strconv"

	"github.com/endpointlag/endpointlag/probes/ingress"
	"github.com/endpointlag/endpointlag/probes/ingress/internal/adminhttp"
)

// Kind is Traefik's name among the proxy kinds.
const Kind = "traefik"

func init() {
	ingress.Register(ingress.Kind{Name: Kind, DefaultPort: 8080, Scheme: "http", New: New})
}

// perPage asks for everything in one page (Traefik's default is 100); the reader still follows
// X-Next-Page should Traefik cap it.
const perPage = 100000

// maxPages stops a reader whose pages never end (a proxy answering nonsense).
const maxPages = 1000

// Reader reads one Traefik instance.
type Reader struct {
	c *adminhttp.Client
}

// New returns a reader of the Traefik API at t.Address (http://host:port, with the API's base
// path if it has one).
func New(t ingress.Target) (ingress.Reader, error) {
	c, err := adminhttp.New(t)
	if err != nil {
		return nil, fmt.Errorf("traefik: %w", err)
	}
	return &Reader{c: c}, nil
}

// Read returns every HTTP service that balances over servers.
func (r *Reader) Read(ctx context.Context) ([]ingress.Backend, error) {
	var all []ingress.Backend
	for page := 1; ; {
		path := "/api/http/services?per_page=" + strconv.Itoa(perPage) + "&page=" + strconv.Itoa(page)
		body, header, err := r.c.Get(ctx, path)
		if err != nil {
			return nil, fmt.Errorf("traefik: %w", err)
		}
		backends, err := decodeServices(body)
		if err != nil {
			return nil, fmt.Errorf("traefik: GET %s: %w", r.c.URL(path), err)
		}
		all = append(all, backends...)
		// Traefik answers 1 on the last page.
		next, err := strconv.Atoi(header.Get("X-Next-Page"))
		if err != nil || next <= page {
			return all, nil
		}
		if next > maxPages {
			return nil, fmt.Errorf("traefik: GET %s: more than %d pages of services", r.c.URL(path), maxPages)
		}
		page = next
	}
}

// ReadBackends returns the named services, one request each. A name Traefik no longer knows, or
// that no longer balances over servers, comes back without servers: nothing is routed through it.
func (r *Reader) ReadBackends(ctx context.Context, names []string) ([]ingress.Backend, bool, error) {
	out := make([]ingress.Backend, 0, len(names))
	for _, name := range names {
		path := "/api/http/services/" + url.PathEscape(name)
		body, _, err := r.c.Get(ctx, path)
		var se *adminhttp.StatusError
		if errors.As(err, &se) && se.Code == http.StatusNotFound {
			out = append(out, ingress.Backend{Name: name, Service: serviceOf(name), Servers: []ingress.Server{}})
			continue
		}
		if err != nil {
			return nil, true, fmt.Errorf("traefik: %w", err)
		}
		b, ok, err := decodeService(body)
		if err != nil {
			return nil, true, fmt.Errorf("traefik: GET %s: %w", r.c.URL(path), err)
		}
		if !ok || b.Name != name {
			b = ingress.Backend{Name: name, Service: serviceOf(name), Servers: []ingress.Server{}}
		}
		out = append(out, b)
	}
	return out, true, nil
}
