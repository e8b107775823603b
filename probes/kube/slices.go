package kube

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"time"
	"unique"

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
	// portName is the Service port the endpoint's port serves (kube-proxy chooses endpoints per
	// Service port); serving is its serving condition.
	portName string
	cond     condition
	serving  bool
	// untrusted: the endpoint's slice is not managed by a trusted controller.
	untrusted bool
}

// sliceEntry is what one EndpointSlice says about its Service's endpoints.
type sliceEntry struct {
	service probes.ServiceRef
	// notProxied: kube-proxy does not program the Service (headless, or another proxy's).
	notProxied bool
	eps        sliceEPs
}

// sliceEP is one endpoint of a slice: a pod's address and port.
type sliceEP struct {
	key  epKey
	info epInfo
}

// sliceEPs are a slice's endpoints, each key once, ordered by compareKeys. Every node keeps
// every proxied endpoint of the cluster here: as a sorted slice they take about half the heap a
// map did (BenchmarkSliceEntryOfTen), and the garbage collector goes through them at every
// cycle.
type sliceEPs []sliceEP

func compareKeys(a, b epKey) int {
	if c := strings.Compare(a.uid, b.uid); c != 0 {
		return c
	}
	return probes.CompareEndpoints(a.endpoint, b.endpoint)
}

// newSliceEPs orders eps (in place) and keeps the last of each key, as a map assigned them in
// order would.
func newSliceEPs(eps []sliceEP) sliceEPs {
	slices.SortStableFunc(eps, func(a, b sliceEP) int { return compareKeys(a.key, b.key) })
	out := eps[:0]
	for _, x := range eps {
		if n := len(out); n > 0 && out[n-1].key == x.key {
			out[n-1] = x
			continue
		}
		out = append(out, x)
	}
	return slices.Clip(out)
}

// get returns what the slice says of the endpoint k, and whether it lists it.
func (s sliceEPs) get(k epKey) (epInfo, bool) {
	i, ok := slices.BinarySearchFunc(s, k, func(x sliceEP, k epKey) int { return compareKeys(x.key, k) })
	if !ok {
		return epInfo{}, false
	}
	return s[i].info, true
}

// parseSlice turns an EndpointSlice into the endpoints it lists, marked untrusted unless trusted.
// FQDN slices have no addresses to track and give (nil, nil). Endpoints that cannot be attributed
// to a pod are skipped and reported; a slice with no Service is skipped whole.
//
// The entry is all that is kept of the slice (the informer's transform makes it, and the tracker
// holds the same entry), so the strings many endpoints share — namespaces, nodes, port names,
// the Service — are interned.
func parseSlice(s *discoveryv1.EndpointSlice, trusted bool) (*sliceEntry, []error) {
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
	ns := intern(s.Namespace)
	e := &sliceEntry{
		service:    probes.ServiceRef{Namespace: ns, Name: intern(svc)},
		notProxied: headless || otherProxy,
	}
	eps := make([]sliceEP, 0, len(s.Endpoints)*max(len(s.Ports), 1))
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
			pod:       probes.PodRef{Namespace: ns, Name: ref.Name, UID: string(ref.UID)},
			cond:      endpointCondition(ep.Conditions),
			serving:   ep.Conditions.Serving == nil || *ep.Conditions.Serving,
			untrusted: !trusted,
		}
		if ref.Namespace != "" && ref.Namespace != ns {
			info.pod.Namespace = intern(ref.Namespace)
		}
		if ep.NodeName != nil {
			info.node = intern(*ep.NodeName)
		}
		for _, p := range ports {
			p.ep.Addr = addr
			info.portName = p.name
			eps = append(eps, sliceEP{epKey{uid: info.pod.UID, endpoint: p.ep}, info})
		}
	}
	e.eps = newSliceEPs(eps)
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

// slicePort is one port every endpoint of a slice has, without address, and the Service port's
// name.
type slicePort struct {
	name string
	ep   probes.Endpoint
}

// slicePorts are the ports every endpoint of the slice has. A slice without ports means all
// ports: one entry with port 0.
func slicePorts(ports []discoveryv1.EndpointPort) []slicePort {
	if len(ports) == 0 {
		return []slicePort{{}}
	}
	out := make([]slicePort, 0, len(ports))
	for _, p := range ports {
		sp := slicePort{ep: probes.Endpoint{Protocol: string(corev1.ProtocolTCP)}}
		if p.Name != nil {
			sp.name = intern(*p.Name)
		}
		if p.Protocol != nil {
			sp.ep.Protocol = intern(string(*p.Protocol))
		}
		if p.Port != nil && *p.Port > 0 && *p.Port <= 65535 {
			sp.ep.Port = uint16(*p.Port)
		}
		out = append(out, sp)
	}
	return out
}

// intern returns the one copy of s that all slices share.
func intern(s string) string { return unique.Make(s).Value() }

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
	event
	// fallback is, for a stage endpointslice change, where kube-proxy keeps routing to the
	// endpoint for want of a ready one; for fallback_ended, the fallbacks that ended.
	fallback probes.Fallback
}

// event is the slice event a change comes from: when it was seen, and whether on a relist (with
// the gap the relist closes as precision) or on the informer's first list.
type event struct {
	// slice is the change's EndpointSlice as namespace/name@resourceVersion.
	slice     string
	at        time.Time
	relist    bool
	precision time.Duration
	initial   bool
}

// RemovalSettle is how long an endpoint's removal from its slices waits before it is reported:
// the endpointslice controller may move an endpoint from one slice to another in two updates, and
// the one that drops it can arrive first. A removal that comes back within it was no removal; one
// that does not is reported with the time it was seen.
const RemovalSettle = time.Second

// sliceTracker merges the slices of each Service, as its consumers do, and turns slice events into
// endpoint transitions. An endpoint is terminating once no slice of its Service lists it ready and
// one lists it terminating; it is removed once no slice of its Service lists it for settle.
// Applying the same state twice (a resync or relist) yields nothing.
//
// It also follows, for endpoints that turned terminating while serving, whether kube-proxy keeps
// routing to them on purpose (KEP-1669: no ready endpoint of their Service port left, or for
// node-local traffic policies none on this node), and reports when that ends.
type sliceTracker struct {
	// node is this daemon's node: node-local fallbacks are about its endpoints.
	node     string
	slices   map[string]*sliceEntry // by slice namespace/name
	services map[probes.ServiceRef]map[string]*sliceEntry
	// held are the terminating endpoints a fallback held when they turned terminating, with the
	// fallbacks that still hold them, per Service.
	held map[probes.ServiceRef]map[epKey]probes.Fallback
	// deferred are removals waiting out RemovalSettle.
	deferred map[candidate]change
}

type candidate struct {
	service probes.ServiceRef
	key     epKey
}

func newSliceTracker(node string) *sliceTracker {
	return &sliceTracker{
		node: node, slices: map[string]*sliceEntry{}, services: map[probes.ServiceRef]map[string]*sliceEntry{},
		held: map[probes.ServiceRef]map[epKey]probes.Fallback{}, deferred: map[candidate]change{},
	}
}

// apply replaces what slice name says (nil: the slice is gone or unusable) and returns the
// transitions it causes; removals wait in deferred until flush.
func (t *sliceTracker) apply(name string, next *sliceEntry, ev event) []change {
	prev := t.slices[name]
	if prev == nil && next == nil {
		return nil
	}
	var cands []candidate
	seen := map[candidate]bool{}
	for _, e := range []*sliceEntry{prev, next} {
		if e == nil {
			continue
		}
		for _, x := range e.eps {
			c := candidate{e.service, x.key}
			if !seen[c] {
				seen[c] = true
				cands = append(cands, c)
			}
		}
	}
	before := make([]merged, len(cands))
	for i, c := range cands {
		before[i] = t.merged(c.service, c.key)
		if d, ok := t.deferred[c]; ok && !before[i].present {
			// Removed a moment ago and not reported yet: as far as consumers know, still there.
			before[i] = merged{present: true, info: d.info}
		}
	}
	t.set(name, prev, next)
	var out []change
	touched := map[probes.ServiceRef]bool{}
	for i, c := range cands {
		b, a := before[i], t.merged(c.service, c.key)
		touched[c.service] = true
		if a.present {
			delete(t.deferred, c)
		}
		switch {
		case b.present && !a.present:
			if _, waiting := t.deferred[c]; !waiting {
				t.deferred[c] = change{stage: probes.StageEndpointSliceRemoved, service: c.service, notProxied: prev != nil && prev.notProxied,
					key: c.key, info: b.info, event: ev}
			}
		case a.present && a.info.cond == terminating && (!b.present || b.info.cond != terminating):
			out = append(out, change{stage: probes.StageEndpointSlice, service: c.service, notProxied: next != nil && next.notProxied, key: c.key, info: a.info, event: ev})
		}
	}
	for svc := range touched {
		out = t.fallbacks(svc, out, ev)
	}
	return out
}

// flush reports the removals that waited RemovalSettle by now. An endpoint that left without a
// terminating phase (its pod exited and turned terminal before the endpointslice controller
// published it terminating, or was deleted with no grace) is reported turning terminating at its
// removal first, so that every node starts a record of it, unless its Service went with all its
// slices (the Service was deleted: nothing terminated).
func (t *sliceTracker) flush(now time.Time) []change {
	var out []change
	for c, d := range t.deferred {
		if now.Sub(d.at) < RemovalSettle {
			continue
		}
		delete(t.deferred, c)
		if f, ok := t.held[c.service][c.key]; ok {
			// It left the slice while a fallback still held it: that ends the fallback.
			out = append(out, change{stage: probes.StageFallbackEnded, service: c.service, key: c.key, info: d.info, event: d.event, fallback: f})
			t.unhold(c.service, c.key)
		}
		if d.info.cond != terminating && len(t.services[c.service]) > 0 {
			abrupt := d
			abrupt.stage = probes.StageEndpointSlice
			abrupt.info.serving = false
			out = append(out, abrupt)
		}
		out = append(out, d)
	}
	return out
}

// portKey is a Service port of one address family: kube-proxy picks endpoints per Service port and
// family.
type portKey struct {
	name     string
	protocol string
	ipv4     bool
}

type readyCount struct{ cluster, local int }

// fallbacks sets the fallback of the Service's endpoints that turned terminating in out, and adds
// a fallback_ended change for each held endpoint whose fallback ended.
func (t *sliceTracker) fallbacks(svc probes.ServiceRef, out []change, ev event) []change {
	starting := false
	for _, c := range out {
		starting = starting || (c.service == svc && c.stage == probes.StageEndpointSlice && c.info.serving)
	}
	if !starting && len(t.held[svc]) == 0 {
		return out
	}
	ready := t.ready(svc)
	for i := range out {
		c := &out[i]
		if c.service != svc || c.stage != probes.StageEndpointSlice {
			continue
		}
		if c.fallback = t.fallbackOf(c.key, c.info, ready); c.fallback.Any() {
			if t.held[svc] == nil {
				t.held[svc] = map[epKey]probes.Fallback{}
			}
			t.held[svc][c.key] = c.fallback
		}
	}
	for k, f := range t.held[svc] {
		m := t.merged(svc, k)
		if !m.present {
			continue // left the slice: settled by flush
		}
		now := t.fallbackOf(k, m.info, ready)
		ended := probes.Fallback{Cluster: f.Cluster && !now.Cluster, Local: f.Local && !now.Local}
		if !ended.Any() {
			continue
		}
		out = append(out, change{stage: probes.StageFallbackEnded, service: svc, key: k, info: m.info, event: ev, fallback: ended})
		if left := (probes.Fallback{Cluster: f.Cluster && now.Cluster, Local: f.Local && now.Local}); left.Any() {
			t.held[svc][k] = left
		} else {
			t.unhold(svc, k)
		}
	}
	return out
}

func (t *sliceTracker) unhold(svc probes.ServiceRef, k epKey) {
	delete(t.held[svc], k)
	if len(t.held[svc]) == 0 {
		delete(t.held, svc)
	}
}

// fallbackOf tells where kube-proxy keeps routing to a terminating endpoint on purpose, as its
// CategorizeEndpoints does: while it serves and no endpoint of its Service port and family is
// ready (cluster-wide), or, for this node's endpoints, none on this node is (node-local policies).
func (t *sliceTracker) fallbackOf(k epKey, info epInfo, ready map[portKey]readyCount) probes.Fallback {
	if info.cond != terminating || !info.serving {
		return probes.Fallback{}
	}
	n := ready[portKey{info.portName, k.endpoint.Protocol, k.endpoint.Addr.Is4()}]
	return probes.Fallback{Cluster: n.cluster == 0, Local: info.node == t.node && n.local == 0}
}

// ready counts the Service's ready endpoints per port and family, cluster-wide and on this node.
func (t *sliceTracker) ready(svc probes.ServiceRef) map[portKey]readyCount {
	out := map[portKey]readyCount{}
	for _, e := range t.services[svc] {
		for _, x := range e.eps {
			if x.info.cond != ready {
				continue
			}
			pk := portKey{x.info.portName, x.key.endpoint.Protocol, x.key.endpoint.Addr.Is4()}
			n := out[pk]
			n.cluster++
			if x.info.node == t.node {
				n.local++
			}
			out[pk] = n
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
		info, ok := e.eps.get(k)
		if !ok {
			continue
		}
		if !m.present || info.cond > m.info.cond {
			m = merged{present: true, info: info}
		}
	}
	return m
}
