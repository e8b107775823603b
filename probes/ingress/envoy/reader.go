// Package envoy reads Envoy instances (Envoy Gateway, Contour, Istio and any other control plane)
// through their admin interface: GET /clusters?format=json, decoded with Envoy's own admin protos
// (envoy.admin.v3.Clusters from go-control-plane).
//
// A host gets no new request, and is reported not routable, when its eds_health_status is
// DRAINING (a terminating endpoint, excluded from load balancing), UNHEALTHY or TIMEOUT, or when
// it failed its active health check (also active_hc_timeout), was ejected as an outlier
// (failed_outlier_check), awaits its first active health check (pending_active_hc), or was
// excluded via an immediate health-check failure. A host pending_dynamic_removal that has none of
// these still gets requests (see notRoutable). In panic mode, when a cluster's healthy hosts fall
// below its panic threshold (50% by default), Envoy balances over unhealthy hosts too; /clusters
// does not say so (the stat cluster.<name>.lb_healthy_panic does) and this reader reports the
// hosts' own states.
//
// Clusters are mapped to Kubernetes Services where their names tell (see serviceOf): Istio's
// outbound clusters, Envoy Gateway's shared backend clusters, Contour's clusters. Envoy has no
// cheap query for some clusters only: ReadBackends is not ok.
//
// Envoy serves its admin interface on its main thread, which also applies configuration
// updates, and /clusters walks every host of every cluster: the kind's MinInterval keeps reads of
// one instance at least 250 ms apart however urgent. The admin port differs by control plane and
// is bound to loopback by all of them: Envoy Gateway 19000 (the default here), Contour 9001 (a
// listener proxying the admin's read-only paths, the admin itself being unix:///admin/admin.sock,
// which this reader reads too), Istio 15000, Envoy's own examples 9901. The daemon reaches such
// an address inside the pod with --ingress.enter-pods (Target.Dial), or where the operator
// exposes the admin on the pod IP.
package envoy

import (
	"fmt"
	"time"

	"github.com/endpointlag/endpointlag/probes/ingress"
	"github.com/endpointlag/endpointlag/probes/ingress/internal/adminhttp"
)

// Kind is Envoy's name among the proxy kinds.
const Kind = "envoy"

// MinInterval is the shortest time between two reads of one Envoy.
const MinInterval = 250 * time.Millisecond

func init() {
	ingress.Register(ingress.Kind{Name: Kind, DefaultPort: 19000, Scheme: "http", MinInterval: MinInterval, New: New})
}

const clustersPath = "/clusters?format=json"

// New returns a reader of the admin interface at t.Address (http://host:port).
func New(t ingress.Target) (ingress.Reader, error) {
	c, err := adminhttp.New(t)
	if err != nil {
		return nil, fmt.Errorf("envoy: %w", err)
	}
	return &adminhttp.Document{Client: c, Kind: Kind, Path: clustersPath, Decode: decodeClusters}, nil
}
