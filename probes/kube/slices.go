package kube

import (
	"fmt"
	"net/netip"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"

	"github.com/endpointlag/endpointlag/probes"
)

// Input errors the slice parser reports; each is a probe_errors_total reason.
const (
	reasonNoServiceLabel = "no_service_label"
	reasonNoTargetRef    = "no_target_ref"
	reasonBadAddress     = "bad_address"
)

// endpointSliceController is the managed-by label value of the slices Kubernetes derives from a
// Service's selector.
const endpointSliceController = "endpointslice-controller.k8s.io"

// condition is an endpoint's state as its Service's consumers see it.
type condition uint8

const (
	notReady condition = iota
	terminating
	ready
)

// epKey identifies one endpoint of one pod. The pod UID is part of it, so a new pod that reuses
// an address is a different endpoint.
type epKey struct {
	uid      string
	endpoint probes.Endpoint
}

type epInfo struct {
	pod  probes.PodRef
	node string
	cond condition
}

// sliceEntry is what one EndpointSlice says about its Service's endpoints.
type sliceEntry struct {
	service probes.ServiceRef
	// notProxied: kube-proxy does not program the Service (headless, or another proxy's).
	notProxied bool
	eps        map[epKey]epInfo
}

// parseSlice turns an EndpointSlice into the endpoints it lists. FQDN slices have no addresses to
// track and give (nil, nil). Endpoints that cannot be attributed to a pod are skipped and reported;
// a slice with no Service is skipped whole.
func parseSlice(s *discoveryv1.EndpointSlice) (*sliceEntry, []error) {
	if s.AddressType != discoveryv1.AddressTypeIPv4 && s.AddressType != discoveryv1.AddressTypeIPv6 {
		return nil, nil
	}
	svc := s.Labels[discoveryv1.LabelServiceName]
	if svc == "" {
		return nil, []error{&probes.InputError{Reason: reasonNoServiceLabel,
			Err: fmt.Errorf("EndpointSlice %s/%s has no %s label; skipped", s.Namespace, s.Name, discoveryv1.LabelServiceName)}}
	}
	_, headless := s.Labels[corev1.IsHeadlessService]
	_, otherProxy := s.Labels["service.kubernetes.io/service-proxy-name"]
	e := &sliceEntry{
		service:    probes.ServiceRef{Namespace: s.Namespace, Name: svc},
		notProxied: headless || otherProxy,
		eps:        make(map[epKey]epInfo, len(s.Endpoints)*max(len(s.Ports), 1)),
	}
	ports := slicePorts(s.Ports)
	var noRef, badAddr []string
	for i := range s.Endpoints {
		ep := &s.Endpoints[i]
		if len(ep.Addresses) == 0 {
			badAddr = append(badAddr, fmt.Sprintf("endpoint %d has no address", i))
			continue
		}
		// Like kube-proxy, use the first address; the API says the others are for consumers
		// that know better.
		addr, err := netip.ParseAddr(ep.Addresses[0])
		if err != nil || addr.Zone() != "" || addr.Is4() != (s.AddressType == discoveryv1.AddressTypeIPv4) {
			badAddr = append(badAddr, fmt.Sprintf("%q is not an %s address", ep.Addresses[0], s.AddressType))
			continue
		}
		ref := ep.TargetRef
		if ref == nil || ref.Kind != "Pod" || ref.UID == "" {
			noRef = append(noRef, addr.String())
			continue
		}
		info := epInfo{
			pod:  probes.PodRef{Namespace: ref.Namespace, Name: ref.Name, UID: string(ref.UID)},
			cond: endpointCondition(ep.Conditions),
		}
		if info.pod.Namespace == "" {
			info.pod.Namespace = s.Namespace
		}
		if ep.NodeName != nil {
			info.node = *ep.NodeName
		}
		for _, p := range ports {
			p.Addr = addr
			e.eps[epKey{uid: info.pod.UID, endpoint: p}] = info
		}
	}
	var errs []error
	// Only the endpointslice controller promises a Pod behind every endpoint; slices of the
	// API server's own Service, mirrored or hand-made ones list addresses without pods, which
	// have no terminations to measure.
	if len(noRef) > 0 && s.Labels[discoveryv1.LabelManagedBy] == endpointSliceController {
		errs = append(errs, &probes.InputError{Reason: reasonNoTargetRef,
			Err: fmt.Errorf("EndpointSlice %s/%s: %d endpoint(s) without a Pod targetRef skipped (first: %s)", s.Namespace, s.Name, len(noRef), noRef[0])})
	}
	if len(badAddr) > 0 {
		errs = append(errs, &probes.InputError{Reason: reasonBadAddress,
			Err: fmt.Errorf("EndpointSlice %s/%s: %d endpoint(s) skipped (first: %s)", s.Namespace, s.Name, len(badAddr), badAddr[0])})
	}
	return e, errs
}

// slicePorts are the ports every endpoint of the slice has, without address. A slice without ports
// means all ports: one entry with port 0.
func slicePorts(ports []discoveryv1.EndpointPort) []probes.Endpoint {
	if len(ports) == 0 {
		return []probes.Endpoint{{}}
	}
	out := make([]probes.Endpoint, 0, len(ports))
	for _, p := range ports {
		ep := probes.Endpoint{Protocol: string(corev1.ProtocolTCP)}
		if p.Protocol != nil {
			ep.Protocol = string(*p.Protocol)
		}
		if p.Port != nil && *p.Port > 0 && *p.Port <= 65535 {
			ep.Port = uint16(*p.Port)
		}
		out = append(out, ep)
	}
	return out
}

// endpointCondition reads the conditions as the API defines them: a nil ready means ready, a nil
// terminating means not terminating. Terminating wins over ready (publishNotReadyAddresses keeps
// terminating endpoints ready).
func endpointCondition(c discoveryv1.EndpointConditions) condition {
	switch {
	case c.Terminating != nil && *c.Terminating:
		return terminating
	case c.Ready == nil || *c.Ready:
		return ready
	}
	return notReady
}

// change is an endpoint transition worth an observation.
type change struct {
	stage      probes.Stage
	service    probes.ServiceRef
	notProxied bool
	key        epKey
	info       epInfo
}

// sliceTracker merges the slices of each Service, as its consumers do, and turns slice events into
// endpoint transitions. An endpoint is terminating once no slice of its Service lists it ready and
// one lists it terminating; it is removed once no slice of its Service lists it. Applying the same
// state twice (a resync or relist) yields nothing.
type sliceTracker struct {
	slices   map[string]*sliceEntry // by slice namespace/name
	services map[probes.ServiceRef]map[string]*sliceEntry
}

func newSliceTracker() *sliceTracker {
	return &sliceTracker{slices: map[string]*sliceEntry{}, services: map[probes.ServiceRef]map[string]*sliceEntry{}}
}

// apply replaces what slice name says (nil: the slice is gone or unusable) and returns the
// transitions it causes.
func (t *sliceTracker) apply(name string, next *sliceEntry) []change {
	prev := t.slices[name]
	if prev == nil && next == nil {
		return nil
	}
	type candidate struct {
		service probes.ServiceRef
		key     epKey
	}
	var cands []candidate
	seen := map[candidate]bool{}
	for _, e := range []*sliceEntry{prev, next} {
		if e == nil {
			continue
		}
		for k := range e.eps {
			c := candidate{e.service, k}
			if !seen[c] {
				seen[c] = true
				cands = append(cands, c)
			}
		}
	}
	before := make([]merged, len(cands))
	for i, c := range cands {
		before[i] = t.merged(c.service, c.key)
	}
	t.set(name, prev, next)
	var out []change
	for i, c := range cands {
		b, a := before[i], t.merged(c.service, c.key)
		switch {
		case b.present && !a.present:
			out = append(out, change{stage: probes.StageEndpointSliceRemoved, service: c.service, key: c.key, info: b.info})
		case a.present && a.info.cond == terminating && (!b.present || b.info.cond != terminating):
			out = append(out, change{stage: probes.StageEndpointSlice, service: c.service, notProxied: next != nil && next.notProxied, key: c.key, info: a.info})
		}
	}
	return out
}

func (t *sliceTracker) set(name string, prev, next *sliceEntry) {
	if prev != nil {
		svc := t.services[prev.service]
		delete(svc, name)
		if len(svc) == 0 {
			delete(t.services, prev.service)
		}
		delete(t.slices, name)
	}
	if next != nil {
		t.slices[name] = next
		svc := t.services[next.service]
		if svc == nil {
			svc = map[string]*sliceEntry{}
			t.services[next.service] = svc
		}
		svc[name] = next
	}
}

type merged struct {
	present bool
	info    epInfo
}

// merged is the endpoint's state over all slices of its Service: ready if any slice says ready,
// else terminating if any says terminating.
func (t *sliceTracker) merged(svc probes.ServiceRef, k epKey) merged {
	var m merged
	for _, e := range t.services[svc] {
		info, ok := e.eps[k]
		if !ok {
			continue
		}
		if !m.present || info.cond > m.info.cond {
			m = merged{present: true, info: info}
		}
	}
	return m
}
