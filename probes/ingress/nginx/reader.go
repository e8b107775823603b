// Package nginx reads ingress-nginx controllers: GET /configuration/backends on the internal
// status server of the controller's NGINX (port 10246, --status-port), the backends the
// controller last posted to NGINX's Lua balancer, as `kubectl ingress-nginx backends` shows them.
//
// Every endpoint listed is routable: the controller lists only ready endpoints, so a terminating
// one leaves the list (it has no draining state to report). The NGINX workers take a new list up
// to a second later (balancer.lua syncs every BACKENDS_SYNC_INTERVAL = 1 s), which bounds how
// early this reader can see a removal the workers have not made yet.
//
// A backend's Kubernetes Service is read from its name, "<namespace>-<service>-<port>", when the
// name is unambiguous (see svcname.Dashed): the document carries the Service's spec but not its
// name. There is no per-backend query: ReadBackends is not ok.
//
// The status server listens on 127.0.0.1 inside the controller's pod (nginx.tmpl): it is
// reachable from the node only when the controller runs with hostNetwork, or through an address
// the operator exposes it on.
package nginx

import (
	"context"
	"fmt"

	"github.com/endpointlag/endpointlag/probes/ingress"
	"github.com/endpointlag/endpointlag/probes/ingress/internal/adminhttp"
)

// Kind is ingress-nginx's name among the proxy kinds.
const Kind = "ingress-nginx"

func init() {
	ingress.Register(ingress.Kind{Name: Kind, DefaultPort: 10246, Scheme: "http", New: New})
}

const backendsPath = "/configuration/backends"

// Reader reads one ingress-nginx controller.
type Reader struct {
	c *adminhttp.Client
}

// New returns a reader of the status server at t.Address (http://host:10246).
func New(t ingress.Target) (ingress.Reader, error) {
	c, err := adminhttp.New(t)
	if err != nil {
		return nil, fmt.Errorf("ingress-nginx: %w", err)
	}
	return &Reader{c: c}, nil
}

// Read returns every backend.
func (r *Reader) Read(ctx context.Context) ([]ingress.Backend, error) {
	body, _, err := r.c.Get(ctx, backendsPath)
	if err != nil {
		return nil, fmt.Errorf("ingress-nginx: %w", err)
	}
	backends, err := decodeBackends(body)
	if err != nil {
		return nil, fmt.Errorf("ingress-nginx: GET %s: %w", r.c.URL(backendsPath), err)
	}
	return backends, nil
}

// ReadBackends is not ok: ingress-nginx answers for all backends only.
func (r *Reader) ReadBackends(context.Context, []string) ([]ingress.Backend, bool, error) {
	return nil, false, nil
}
