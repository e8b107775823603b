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
// The status server listens on 127.0.0.1 inside the controller's pod (nginx.tmpl): the daemon
// reaches http://127.0.0.1:10246 inside the pod with --ingress.enter-pods (Target.Dial), or the
// pod IP when the controller runs with hostNetwork.
package nginx

import (
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

// New returns a reader of the status server at t.Address (http://host:10246).
func New(t ingress.Target) (ingress.Reader, error) {
	c, err := adminhttp.New(t)
	if err != nil {
		return nil, fmt.Errorf("ingress-nginx: %w", err)
	}
	return &adminhttp.Document{Client: c, Kind: Kind, Path: backendsPath, Decode: decodeBackends}, nil
}
