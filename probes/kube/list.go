package kube

import (
	"sort"

	discoveryv1 "k8s.io/api/discovery/v1"

	"github.com/endpointlag/endpointlag/probes"
)

// TerminatingEndpoint is an endpoint that its Service's slices list as terminating.
type TerminatingEndpoint struct {
	Pod      probes.PodRef
	Service  probes.ServiceRef
	Endpoint probes.Endpoint
	Node     string
}

// Terminating returns the endpoints that the slices list as terminating, merged per Service the
// way the probe merges them, sorted by Service and endpoint, with the input errors found.
func Terminating(slices []discoveryv1.EndpointSlice) ([]TerminatingEndpoint, []error) {
	t := newSliceTracker("")
	var errs []error
	for i := range slices {
		s := &slices[i]
		entry, perrs := parseSlice(s, true)
		errs = append(errs, perrs...)
		t.apply(s.Namespace+"/"+s.Name, entry, event{})
	}
	var out []TerminatingEndpoint
	seen := map[change]bool{}
	for svc, entries := range t.services {
		for _, e := range entries {
			for _, x := range e.eps {
				k := x.key
				m := t.merged(svc, k)
				c := change{service: svc, key: k, info: m.info}
				if m.info.cond != terminating || seen[c] {
					continue
				}
				seen[c] = true
				out = append(out, TerminatingEndpoint{Pod: m.info.pod, Service: svc, Endpoint: k.endpoint, Node: m.info.node})
			}
		}
	}
	sort.Slice(out, func(i, j int) bool {
		a, b := out[i], out[j]
		if a.Service != b.Service {
			return a.Service.String() < b.Service.String()
		}
		if c := a.Endpoint.Addr.Compare(b.Endpoint.Addr); c != 0 {
			return c < 0
		}
		if a.Endpoint.Port != b.Endpoint.Port {
			return a.Endpoint.Port < b.Endpoint.Port
		}
		return a.Endpoint.Protocol < b.Endpoint.Protocol
	})
	return out, errs
}
