// Package probes defines what every observation source reports and how sources are registered.
//
// A probe watches one source (the Kubernetes API, this node's kube-proxy rules, packets) and
// reports what it saw, where and when, to a Sink. Probes never compute lags: the collector joins
// observations into per-endpoint timelines and measures.
package probes

import (
	"cmp"
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"runtime/debug"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spf13/pflag"
	"k8s.io/client-go/kubernetes"
	"k8s.io/utils/clock"
)

// Stage names one point of an endpoint's removal timeline. Its string is the `stage` metric label.
type Stage string

// The stages of the timeline in docs/architecture.md known so far.
const (
	// StageDeleted is T0: the pod got its deletionTimestamp. Reported for pods on this node only.
	StageDeleted Stage = "deleted"
	// StageEndpointSlice: the endpoint turned ready=false, terminating=true in its EndpointSlice.
	StageEndpointSlice Stage = "endpointslice"
	// StageEndpointSliceRemoved: the endpoint left every EndpointSlice of its Service.
	StageEndpointSliceRemoved Stage = "endpointslice_removed"
	// StageGone: the pod object was deleted. Reported for pods on this node only.
	StageGone Stage = "gone"
	// StageIngress: an ingress or gateway proxy instance would no longer send a new request to the
	// endpoint (gone from its upstreams, or kept but fenced, draining or in maintenance).
	// Observation.Source names the instance, Observation.SourceKind its kind.
	StageIngress Stage = "ingress"
	// StageNftables, StageIptables and StageIPVS: this node's kube-proxy rules no longer send new
	// connections to the endpoint.
	StageNftables Stage = "nftables"
	StageIptables Stage = "iptables"
	StageIPVS     Stage = "ipvs"
	// StageLateConnection: a new connection (TCP SYN, new UDP flow) reached a pod of this node
	// after its deletion began. Reported by the packets probe, possibly many times per pod.
	StageLateConnection Stage = "late_connection"
	// StageDeadConnection: a new connection arrived for the address of a pod of this node that
	// is already gone.
	StageDeadConnection Stage = "dead_connection"
	// StageLastConnection: the packets probe's exact time of the last new client connection
	// (not from the node's own addresses) that reached a pod of this node while it terminated,
	// read from its map when the pod's addresses leave the terminating map; a zero Time means
	// none came. Reported once per pod.
	StageLastConnection Stage = "last_connection"
	// StageFallbackEnded: kube-proxy's reason to keep routing to a serving, terminating endpoint
	// (no ready endpoint left, KEP-1669) ended: the endpoint stopped serving, or a ready endpoint
	// came back. Observation.Fallback names the fallbacks that ended. A dataplane removal after it
	// is owed to it, not to sync lag.
	StageFallbackEnded Stage = "fallback_ended"
	// StagePodAddresses: the addresses a live pod of this node (not deleting, not in a terminal
	// phase) holds now, in Observation.Addrs; none once it completed or failed (its network is
	// gone). Reported when they change, so that no deleting pod's entry claims an address a live
	// pod now holds (IP reuse).
	StagePodAddresses Stage = "pod_addresses"
)

// Dataplane reports whether s is a stage of this node's service dataplane (kube-proxy's rules),
// which Services that kube-proxy does not program never reach.
func (s Stage) Dataplane() bool {
	return s == StageNftables || s == StageIptables || s == StageIPVS
}

// Connection reports whether s is a stage of traffic still reaching a pod rather than a removal:
// it is never pending, any number of them may come.
func (s Stage) Connection() bool {
	return s == StageLateConnection || s == StageDeadConnection || s == StageLastConnection
}

// Awaited reports whether a record waits for s: the removal stages after the endpoint turned
// terminating, not the pod-level or connection stages.
func (s Stage) Awaited() bool {
	return s == StageEndpointSliceRemoved || s.Routing()
}

// Routing reports whether s is the removal of an endpoint from something that routes traffic to
// it — this node's kube-proxy rules, a proxy instance — and so is awaited only where that reached
// the endpoint when it turned terminating.
func (s Stage) Routing() bool {
	return s.Dataplane() || s == StageIngress
}

// Path is the way new connections reach a Service's endpoints through this node's rules. kube-proxy
// routes each apart (its external chains may keep endpoints its ClusterIP chains dropped), so each
// is judged apart.
type Path string

// The paths.
const (
	// PathCluster: traffic to the ClusterIP (kube-proxy's service- / local- chains, KUBE-SVC- /
	// KUBE-SVL-).
	PathCluster Path = "cluster"
	// PathExternal: NodePort, external IP and load-balancer IP traffic (external- chains,
	// KUBE-EXT- / KUBE-FW-).
	PathExternal Path = "external"
)

// Policy is which of kube-proxy's endpoint sets a path reaches an endpoint through: the Service's
// cluster-wide endpoints (traffic policy Cluster) or this node's own (traffic policy Local).
type Policy struct {
	Cluster bool `json:"cluster,omitempty"`
	Local   bool `json:"local,omitempty"`
}

// Any reports whether p names a policy.
func (p Policy) Any() bool { return p.Cluster || p.Local }

// Reach is one path on which this node's rules, or one proxy instance, send new connections to an
// endpoint.
type Reach struct {
	Path   Path
	Policy Policy
	// Source is, for a stage read from several instances (ingress), the instance.
	Source string
}

// Dataplane is implemented by the probes of a dataplane stage: what this node's rules reach now.
// The collector asks it when an endpoint starts terminating, to know whether the stage can come
// at all on this node (a node-local Service's remote endpoints, topology-filtered endpoints and
// never-ready pods were never in the rules). It must not block on I/O.
type Dataplane interface {
	// Reaches returns the paths on which the rules send new connections to ep for svc (an empty
	// svc: for any Service); ok is false until the probe has read its rules once.
	Reaches(svc ServiceRef, ep Endpoint) (paths []Reach, ok bool)
}

// Fallback says where kube-proxy keeps routing to a serving, terminating endpoint because no
// ready endpoint is left (KEP-1669): among all of its Service's endpoints (Cluster), among those
// of this node (Local, for node-local traffic policies).
type Fallback = Policy

// PodRef identifies the pod behind an endpoint. UID is what tells a pod from its successor with
// the same name or IP.
type PodRef struct {
	Namespace string `json:"namespace"`
	Name      string `json:"name"`
	UID       string `json:"uid"`
}

func (p PodRef) String() string { return p.Namespace + "/" + p.Name }

// ServiceRef identifies a Service.
type ServiceRef struct {
	Namespace string `json:"namespace"`
	Name      string `json:"name"`
}

func (s ServiceRef) String() string {
	if s.Name == "" {
		return ""
	}
	return s.Namespace + "/" + s.Name
}

// Endpoint is one address and port of a pod as a Service sends traffic to it. Port is 0 when the
// EndpointSlice lists no ports (all ports of the address).
type Endpoint struct {
	Addr     netip.Addr `json:"ip"`
	Port     uint16     `json:"port"`
	Protocol string     `json:"protocol"`
}

func (e Endpoint) String() string {
	return fmt.Sprintf("%s/%s", netip.AddrPortFrom(e.Addr, e.Port), e.Protocol)
}

// Observation says what a probe saw, where and when. Pod-level stages (deleted, gone) leave
// Endpoint and Service zero. Dataplane probes know the Service and endpoint but not the pod:
// they leave Pod zero, and the collector finds the terminating record of that endpoint.
type Observation struct {
	Stage Stage
	// Time is when this daemon saw the change, on the local clock.
	Time time.Time
	// Precision is how late Time may be: 0 for event-driven sources, the poll interval for polled
	// ones.
	Precision time.Duration
	// Source names what was observed: the probe's name, or for the ingress stage the proxy
	// instance; SourceKind is then the proxy's kind (the metrics' bounded source label).
	Source     string
	SourceKind string
	Pod        PodRef
	Service    ServiceRef
	Endpoint   Endpoint
	// Local is true when the pod runs on this daemon's node.
	Local bool
	// NotProxied is true when kube-proxy does not program the Service (headless, or handled by
	// another proxy): its endpoints never reach a dataplane stage.
	NotProxied bool
	// Initial is true when the source was already in this state when the probe started (its first
	// list): Time is when the probe first saw it, not when it happened.
	Initial bool
	// APITime is, for StageDeleted, the deletion time as the API server recorded it
	// (deletionTimestamp − deletionGracePeriodSeconds, 1 s precision).
	APITime time.Time
	// Addrs are, for StageDeleted and StageGone, the pod's IP addresses.
	Addrs []netip.Addr
	// Declared is, for StageDeleted, what the pod declares about its termination.
	Declared *Declared
	// Peer is, for the connection stages, the client's address and port.
	Peer netip.AddrPort
	// FromNode is, for the connection stages, true when the client is one of this node's own
	// addresses (the kubelet's probes, host processes): counted apart from clients.
	FromNode bool
	// Path is, for dataplane stages, the path on which the rules stopped sending to the endpoint.
	Path Path
	// Slice is, for the EndpointSlice stages, the slice change that showed it, as
	// namespace/name@resourceVersion: which write of the endpointslice controller it was.
	Slice string
	// Untrusted is, for the EndpointSlice stages, true when the slice is not managed by a
	// controller the daemon trusts (its endpointslice.kubernetes.io/managed-by label is not one
	// of --kube.trusted-managers): anyone allowed to write EndpointSlices in a namespace can
	// make one up, with made-up pods. Records it starts are held within a budget of their own.
	Untrusted bool
	// Relist is true when the change was first seen on a re-read after a gap (a watch that broke
	// and relisted, a dataplane resync after lost kernel messages): it happened within Precision
	// before Time, and is not sampled as live lag.
	Relist bool
	// Serving is, for StageEndpointSlice, the endpoint's serving condition.
	Serving bool
	// Fallback is, for StageEndpointSlice, where kube-proxy keeps routing to the endpoint for want
	// of a ready one; for StageFallbackEnded, the fallbacks that ended.
	Fallback Fallback
}

// WorkloadRef is the controller a pod belongs to, in the pod's namespace: a Deployment (through
// its ReplicaSet), a StatefulSet, a DaemonSet, or whatever else its controlling owner is; empty for
// a pod without one.
type WorkloadRef struct {
	Kind string `json:"kind"`
	Name string `json:"name"`
}

func (w WorkloadRef) String() string { return w.Kind + "/" + w.Name }

// Declared is what a pod declares about its termination.
type Declared struct {
	Workload WorkloadRef `json:"workload"`
	// PreStopSeconds is the longest preStop hook of its containers that is a sleep (a sleep
	// action, or an exec of sleep N, directly or through sh -c); 0 without a hook. PreStopKnown is
	// false when a container has a hook whose length cannot be told (an HTTP call, another
	// command).
	PreStopSeconds float64 `json:"prestop_seconds"`
	PreStopKnown   bool    `json:"prestop_known"`
	// GraceSeconds is terminationGracePeriodSeconds (its default, 30, when unset).
	GraceSeconds float64 `json:"grace_seconds"`
}

// LocalPod is a pod of this node whose deletion began, as the collector tracks it until the
// record horizon.
type LocalPod struct {
	Pod   PodRef
	Addrs []netip.Addr
	// Endpoints are the pod's endpoints as its Services list them: the ports it serves (a port of
	// 0 stands for all ports). Empty until the slices are seen.
	Endpoints []Endpoint
	T0        time.Time
	// Gone is true once the pod object was deleted.
	Gone bool
}

// Pending is the collector's view of what a routing stage still waits for, per source, for probes
// that poll faster while something is pending (the ingress probe).
type Pending interface {
	// Pending returns, per source of stage, the endpoints awaited there and not yet seen removed.
	Pending(stage Stage) map[string][]Endpoint
	// NotifyPending makes the list's changes send on ch, without blocking.
	NotifyPending(ch chan<- struct{})
}

// LocalPods is the collector's list of this node's deleting and deleted pods, for probes that
// watch the traffic still reaching them.
type LocalPods interface {
	LocalPods() []LocalPod
	// NotifyLocalPods makes the list's changes send on ch, without blocking.
	NotifyLocalPods(ch chan<- struct{})
}

// Status is a probe's health as it reports it to the sink.
type Status struct {
	// Up is true while the probe can read its source.
	Up bool
	// Synced is true once the probe has read its source's full state at least once.
	Synced bool
	// Inactive is true while the probe's source does not exist on this node (a kube-proxy mode
	// the node does not run): its stages are not awaited.
	Inactive bool
}

// InputError is a piece of source data a probe had to skip. Reason is a short, fixed word (it
// becomes a metric label); the error says what was wrong and where.
type InputError struct {
	Reason string
	Err    error
}

func (e *InputError) Error() string { return e.Reason + ": " + e.Err.Error() }
func (e *InputError) Unwrap() error { return e.Err }

// ReasonPanic is the InputError reason of a panic recovered while decoding source data.
const ReasonPanic = "panic"

// Recover turns a panic of the calling function into an *InputError with reason "panic" in *err,
// with the panicking stack. Decoders of outside data (kernel messages, rules any privileged process
// may write) run under `defer probes.Recover(&err)`, so that data of a shape they do not expect
// costs the probe a re-read of its source, not the daemon.
func Recover(err *error) {
	if v := recover(); v != nil {
		*err = &InputError{Reason: ReasonPanic, Err: fmt.Errorf("%v\n%s", v, debug.Stack())}
	}
}

// Sink receives what probes report. Its methods are safe for concurrent use and do not block on
// I/O.
type Sink interface {
	Observe(Observation)
	// SetStatus reports the probe's health.
	SetStatus(probe string, s Status)
	// Error reports a failure of the probe (reading its source, or an *InputError for data it
	// skipped). The probe keeps running.
	Error(probe string, err error)
}

// Probe observes one source until its context is done.
type Probe interface {
	Name() string
	// Run reports to sink until ctx is done. A returned error ends this probe only.
	Run(ctx context.Context, sink Sink) error
}

// ServiceEndpoints is what a dataplane sends one Service's new connections to.
type ServiceEndpoints struct {
	Service ServiceRef `json:"service"`
	Path    Path       `json:"path,omitempty"`
	// Chain names the rules when they do not name the Service (iptables mode above 1000
	// endpoints, where kube-proxy writes no comments).
	Chain     string     `json:"chain,omitempty"`
	Endpoints []Endpoint `json:"endpoints"`
}

// DefaultKubeProxyURL is kube-proxy's default metrics address, whose /proxyMode names its mode.
const DefaultKubeProxyURL = "http://127.0.0.1:10249"

// Env is what the daemon hands every probe constructor.
type Env struct {
	NodeName string
	// PollInterval is how often probes read sources that have no change events.
	PollInterval time.Duration
	// Client is nil when no API server is configured.
	Client kubernetes.Interface
	Clock  clock.Clock
	Logger *slog.Logger
	// LocalPods lists this node's deleting pods (the collector).
	LocalPods LocalPods
	// Pending lists what routing stages still wait for (the collector).
	Pending Pending
	// Registerer takes the metrics a probe exports itself.
	Registerer prometheus.Registerer
	// KubeProxyURL is kube-proxy's metrics address, whose /proxyMode the dataplane probes ask
	// (empty: never ask).
	KubeProxyURL string
}

// Factory describes a registered probe.
type Factory struct {
	Name string
	// Help is one line for --help.
	Help string
	// DefaultEnabled is the value of --probe.<name> when not given.
	DefaultEnabled bool
	// Stages are the endpoint stages the probe reports removals at; the collector tracks them as
	// pending until seen.
	Stages []Stage
	// NeedsAPI is true for probes that cannot run without a Kubernetes client.
	NeedsAPI bool
	// Flags, when set, binds the probe's own settings as flags named <probe>.<setting>, and
	// Validate checks them, naming the flag.
	Flags    func(*pflag.FlagSet)
	Validate func() error
	New      func(Env) (Probe, error)
}

var registry = map[string]Factory{}

// Register adds a probe factory. It is called from the probe packages' init functions and panics
// on a duplicate name, which is a programming error.
func Register(f Factory) {
	if _, dup := registry[f.Name]; dup {
		panic("probes: duplicate registration of " + f.Name)
	}
	registry[f.Name] = f
}

// Registered returns every registered probe factory, sorted by name.
func Registered() []Factory {
	out := make([]Factory, 0, len(registry))
	for _, f := range registry {
		out = append(out, f)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// EndpointList returns a set of endpoints as a list ordered by address, port and protocol.
func EndpointList(set map[Endpoint]bool) []Endpoint {
	out := make([]Endpoint, 0, len(set))
	for ep := range set {
		out = append(out, ep)
	}
	slices.SortFunc(out, CompareEndpoints)
	return out
}

// CompareEndpoints orders endpoints by address, port and protocol.
func CompareEndpoints(a, b Endpoint) int {
	if c := a.Addr.Compare(b.Addr); c != 0 {
		return c
	}
	if c := cmp.Compare(a.Port, b.Port); c != 0 {
		return c
	}
	return strings.Compare(a.Protocol, b.Protocol)
}

// SortServiceEndpoints orders by Service, then path, then chain.
func SortServiceEndpoints(s []ServiceEndpoints) {
	sort.Slice(s, func(i, j int) bool {
		if a, b := s[i].Service.String(), s[j].Service.String(); a != b {
			return a < b
		}
		if s[i].Path != s[j].Path {
			return s[i].Path < s[j].Path
		}
		return s[i].Chain < s[j].Chain
	})
}
