package nginx

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"strconv"

	"github.com/endpointlag/endpointlag/probes"
	"github.com/endpointlag/endpointlag/probes/ingress"
	"github.com/endpointlag/endpointlag/probes/ingress/internal/svcname"
)

// backend is the part of ingress-nginx's ingress.Backend, as its controller posts it to
// /configuration/backends (configureBackends: the Service's spec only, no metadata), that tells
// where new requests go.
type backend struct {
	Name      string     `json:"name"`
	Endpoints []endpoint `json:"endpoints"`
}

type endpoint struct {
	Address string `json:"address"`
	// Port is a string in ingress.Endpoint.
	Port string `json:"port"`
}

// defaultBackend is the backend of requests no Ingress matches (controller.defUpstreamName);
// its name has the shape of a Service port's.
const defaultBackend = "upstream-default-backend"

// ErrNotConfigured is the answer of an ingress-nginx whose controller has posted no backends
// yet: the Lua handler prints its empty shared dictionary entry as "nil".
var ErrNotConfigured = errors.New("ingress-nginx has no backends configured yet")

// decodeBackends decodes the answer of GET /configuration/backends. Every endpoint listed gets
// new requests: the controller lists only ready endpoints (its endpointslices.go skips those
// with ready=false, so a terminating endpoint leaves at once).
func decodeBackends(data []byte) (backends []ingress.Backend, err error) {
	defer probes.Recover(&err)
	if bytes.Equal(bytes.TrimSpace(data), []byte("nil")) {
		return nil, ErrNotConfigured
	}
	var list []backend
	if err := json.Unmarshal(data, &list); err != nil {
		return nil, fmt.Errorf("decoding ingress-nginx's backends: %w", err)
	}
	for _, b := range list {
		if b.Name == "" {
			continue
		}
		out := ingress.Backend{Name: b.Name, Servers: []ingress.Server{}}
		if b.Name != defaultBackend {
			out.Service, _ = svcname.Dashed(b.Name)
		}
		for _, e := range b.Endpoints {
			// An ExternalName Service's endpoint is a host name: no pod's.
			addr, err := netip.ParseAddr(e.Address)
			if err != nil {
				continue
			}
			port, err := strconv.ParseUint(e.Port, 10, 16)
			if err != nil || port == 0 {
				continue
			}
			out.Servers = append(out.Servers, ingress.Server{
				Endpoint: probes.Endpoint{Addr: addr.Unmap(), Port: uint16(port), Protocol: "TCP"},
				Routable: true,
			})
		}
		backends = append(backends, out)
	}
	return backends, nil
}
