package envoy

import (
	"fmt"
	"net/netip"
	"regexp"
	"strconv"
	"strings"

	adminv3 "github.com/envoyproxy/go-control-plane/envoy/admin/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"google.golang.org/protobuf/encoding/protojson"

	"github.com/endpointlag/endpointlag/probes"
	"github.com/endpointlag/endpointlag/probes/ingress"
	"github.com/endpointlag/endpointlag/probes/ingress/internal/svcname"
)

// unmarshal reads Envoy's JSON (proto field names, as MessageUtil writes it) and skips fields
// newer than the protos this daemon was built with.
var unmarshal = protojson.UnmarshalOptions{DiscardUnknown: true}

// decodeClusters decodes the answer of GET /clusters?format=json, an envoy.admin.v3.Clusters.
// Every cluster is a backend, its hosts with an IP socket address (TCP) its servers; pipes and
// internal addresses are no pod's endpoints and are left out.
func decodeClusters(data []byte) (backends []ingress.Backend, err error) {
	defer probes.Recover(&err)
	var clusters adminv3.Clusters
	if err := unmarshal.Unmarshal(data, &clusters); err != nil {
		return nil, fmt.Errorf("decoding Envoy's clusters: %w", err)
	}
	for _, c := range clusters.GetClusterStatuses() {
		if c.GetName() == "" {
			continue
		}
		b := ingress.Backend{Name: c.GetName(), Service: serviceOf(c.GetName(), c.GetEdsServiceName()), Servers: []ingress.Server{}}
		for _, h := range c.GetHostStatuses() {
			ep, ok := endpointOf(h.GetAddress())
			if !ok {
				continue
			}
			why := notRoutable(h.GetHealthStatus())
			b.Servers = append(b.Servers, ingress.Server{Endpoint: ep, Routable: len(why) == 0, State: strings.Join(why, ",")})
		}
		backends = append(backends, b)
	}
	return backends, nil
}

func endpointOf(a *corev3.Address) (probes.Endpoint, bool) {
	sa := a.GetSocketAddress()
	if sa == nil || sa.GetProtocol() != corev3.SocketAddress_TCP {
		return probes.Endpoint{}, false
	}
	addr, err := netip.ParseAddr(sa.GetAddress())
	port := sa.GetPortValue()
	if err != nil || port == 0 || port > 65535 {
		return probes.Endpoint{}, false
	}
	return probes.Endpoint{Addr: addr.Unmap(), Port: uint16(port), Protocol: "TCP"}, true
}

// notRoutable names what keeps the load balancer from picking a host for a new request, in the
// admin's words: the flags that make Envoy's Host::coarseHealth() unhealthy (failed active health
// check, outlier ejection, EDS health UNHEALTHY; TIMEOUT from EDS counts as unhealthy too) and
// those that put it among the excluded hosts (EDS DRAINING, pending its first active health
// check, excluded via an immediate health-check failure). A degraded host still gets requests
// while too few are healthy, so it counts as routable.
//
// pending_dynamic_removal alone does not keep a host from new requests: EDS removed it, but Envoy
// keeps a host that passes its active health checks in the load balancer (upstream_impl.cc, unless
// the cluster sets ignore_health_on_host_removal) until a check fails, which then shows here.
func notRoutable(hs *adminv3.HostHealthStatus) []string {
	var why []string
	switch eds := hs.GetEdsHealthStatus(); eds {
	case corev3.HealthStatus_UNHEALTHY, corev3.HealthStatus_DRAINING, corev3.HealthStatus_TIMEOUT:
		why = append(why, eds.String())
	}
	for _, f := range []struct {
		set  bool
		name string
	}{
		{hs.GetFailedActiveHealthCheck(), "failed_active_health_check"},
		{hs.GetActiveHcTimeout(), "active_hc_timeout"},
		{hs.GetFailedOutlierCheck(), "failed_outlier_check"},
		{hs.GetPendingActiveHc(), "pending_active_hc"},
		{hs.GetExcludedViaImmediateHcFail(), "excluded_via_immediate_hc_fail"},
	} {
		if f.set {
			why = append(why, f.name)
		}
	}
	return why
}

// serviceOf reads the Kubernetes Service from the cluster names of the control planes that tell
// it:
//   - Istio: outbound|<port>|<subset>|<service>.<namespace>.svc.<cluster domain>;
//   - Envoy Gateway's backend clusters shared by routes: service/<namespace>/<name>/<port>[/<protocol>]
//     (its per-route clusters, httproute/<namespace>/<route>/rule/<n>, name the route: none);
//   - Contour: <namespace>/<service>/<port>/<10 hex digits>, cut down to 60 characters by hashing
//     the longest parts, so its EDS service name, <namespace>/<service>[/<port name>], is read
//     first.
func serviceOf(cluster, edsService string) probes.ServiceRef {
	if rest, ok := strings.CutPrefix(cluster, "outbound|"); ok {
		parts := strings.Split(rest, "|")
		if len(parts) != 3 || !svcname.Port(parts[0]) {
			return probes.ServiceRef{}
		}
		labels := strings.Split(parts[2], ".")
		if len(labels) < 4 || labels[2] != "svc" {
			return probes.ServiceRef{}
		}
		ref, _ := svcname.Ref(labels[1], labels[0])
		return ref
	}
	parts := strings.Split(cluster, "/")
	if parts[0] == "service" && (len(parts) == 4 || len(parts) == 5) && numericPort(parts[3]) {
		ref, _ := svcname.Ref(parts[1], parts[2])
		return ref
	}
	if len(parts) == 4 && numericPort(parts[2]) && contourHash.MatchString(parts[3]) {
		if eds := strings.Split(edsService, "/"); len(eds) == 2 || len(eds) == 3 {
			ref, _ := svcname.Ref(eds[0], eds[1])
			return ref
		}
		if contourCut.MatchString(parts[0]) || contourCut.MatchString(parts[1]) {
			return probes.ServiceRef{}
		}
		ref, _ := svcname.Ref(parts[0], parts[1])
		return ref
	}
	return probes.ServiceRef{}
}

var (
	// contourHash is the end of a Contour cluster name: 5 bytes of a SHA-1 in hex.
	contourHash = regexp.MustCompile(`^[0-9a-f]{10}$`)
	// contourCut is a part envoy.Hashname shortened: 8 characters, a dash, 6 hex digits.
	contourCut = regexp.MustCompile(`^.{8}-[0-9a-f]{6}$`)
)

func numericPort(s string) bool {
	n, err := strconv.Atoi(s)
	return err == nil && n > 0 && n <= 65535
}
