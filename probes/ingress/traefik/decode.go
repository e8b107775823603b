package traefik

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"net/url"
	"strconv"
	"strings"

	"github.com/endpointlag/endpointlag/probes"
	"github.com/endpointlag/endpointlag/probes/ingress"
	"github.com/endpointlag/endpointlag/probes/ingress/internal/svcname"
)

// service is the part of Traefik's API representation of an HTTP service (pkg/api
// serviceRepresentation: runtime.ServiceInfo, which embeds dynamic.Service, plus name and
// serverStatus) that tells where new requests go.
type service struct {
	Name         string            `json:"name"`
	Status       string            `json:"status"`
	LoadBalancer *loadBalancer     `json:"loadBalancer"`
	ServerStatus map[string]string `json:"serverStatus"`
}

type loadBalancer struct {
	Servers []server `json:"servers"`
}

// server is dynamic.Server as Traefik's API shows it.
type server struct {
	URL    string `json:"url"`
	Weight *int   `json:"weight"`
	// Fenced is set by the Kubernetes providers on an endpoint that is serving and terminating:
	// the load balancers (wrr, p2c, hrw, leasttime) keep it but pick it for no new request.
	Fenced bool `json:"fenced"`
}

// Words of Traefik's runtime package (runtime.StatusDown, runtime.StatusDisabled).
const (
	statusDown     = "DOWN"
	statusDisabled = "disabled"
)

// Kubernetes providers whose service names are "<namespace>-<service>-<port>" (provider.Normalize
// of the three joined by dashes; the port by number or by name). The Gateway API provider's names
// hold the route, not the Service.
var kubernetesProviders = map[string]bool{"kubernetes": true, "kubernetescrd": true}

// decodeServices decodes the answer of GET /api/http/services: the services that balance over
// servers, in the API's order. Weighted, mirroring, failover and highest-random-weight services
// have no servers of their own (they send to other services, listed apart) and are left out.
func decodeServices(data []byte) (backends []ingress.Backend, err error) {
	defer probes.Recover(&err)
	var list []service
	if err := json.Unmarshal(data, &list); err != nil {
		return nil, fmt.Errorf("decoding Traefik's services: %w", err)
	}
	for _, s := range list {
		if b, ok := backendOf(s); ok {
			backends = append(backends, b)
		}
	}
	return backends, nil
}

// decodeService decodes the answer of GET /api/http/services/{name}; ok is false for a service
// without servers of its own.
func decodeService(data []byte) (b ingress.Backend, ok bool, err error) {
	defer probes.Recover(&err)
	var s service
	if err := json.Unmarshal(data, &s); err != nil {
		return ingress.Backend{}, false, fmt.Errorf("decoding a Traefik service: %w", err)
	}
	b, ok = backendOf(s)
	return b, ok, nil
}

func backendOf(s service) (ingress.Backend, bool) {
	if s.LoadBalancer == nil || s.Name == "" {
		return ingress.Backend{}, false
	}
	b := ingress.Backend{Name: s.Name, Service: serviceOf(s.Name), Servers: []ingress.Server{}}
	for _, srv := range s.LoadBalancer.Servers {
		ep, key, ok := endpointOf(srv.URL)
		if !ok {
			// A host name (an ExternalName Service, a file-provider URL): no pod's endpoint.
			continue
		}
		var why []string
		if srv.Fenced {
			why = append(why, "fenced")
		}
		// The health checker keys serverStatus by the parsed URL (url.URL.String()).
		if s.ServerStatus[key] == statusDown || s.ServerStatus[srv.URL] == statusDown {
			why = append(why, statusDown)
		}
		if srv.Weight != nil && *srv.Weight <= 0 {
			// The balancers ignore a server of non-positive weight.
			why = append(why, "weight "+strconv.Itoa(*srv.Weight))
		}
		if s.Status == statusDisabled {
			// The service could not be built: it answers nothing.
			why = append(why, statusDisabled)
		}
		b.Servers = append(b.Servers, ingress.Server{Endpoint: ep, Routable: len(why) == 0, State: strings.Join(why, ",")})
	}
	return b, true
}

// serviceOf reads the Kubernetes Service from "<namespace>-<service>-<port>@<provider>" when the
// provider is a Kubernetes one and the name unambiguous.
func serviceOf(name string) probes.ServiceRef {
	i := strings.LastIndexByte(name, '@')
	if i < 0 || !kubernetesProviders[name[i+1:]] {
		return probes.ServiceRef{}
	}
	ref, _ := svcname.Dashed(name[:i])
	return ref
}

// endpointOf reads a server URL ("http://10.244.1.5:8080", "h2c://[fd00::5]:9000") as an
// endpoint, and returns the URL as Traefik's health checker keys it.
func endpointOf(raw string) (probes.Endpoint, string, bool) {
	u, err := url.Parse(raw)
	if err != nil || u.Host == "" {
		return probes.Endpoint{}, "", false
	}
	addr, err := netip.ParseAddr(u.Hostname())
	if err != nil {
		return probes.Endpoint{}, "", false
	}
	port := u.Port()
	if port == "" {
		switch u.Scheme {
		case "http", "h2c":
			port = "80"
		case "https":
			port = "443"
		default:
			return probes.Endpoint{}, "", false
		}
	}
	n, err := strconv.ParseUint(port, 10, 16)
	if err != nil || n == 0 {
		return probes.Endpoint{}, "", false
	}
	return probes.Endpoint{Addr: addr.Unmap(), Port: uint16(n), Protocol: "TCP"}, u.String(), true
}
