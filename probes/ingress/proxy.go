// Package ingress observes ingress and gateway proxies (Traefik, Envoy, HAProxy, ingress-nginx):
// for each proxy instance, when it stops sending new requests to a terminating endpoint (stage
// ingress). The proxies push nothing: each is read with GET-only requests through a reader of its
// kind (the packages below this one register them), polled slowly while nothing it routes to is
// terminating and fast while something is.
package ingress

import (
	"context"
	"fmt"
	"net"
	"sort"
	"time"

	"github.com/endpointlag/endpointlag/probes"
)

// Server is one upstream of a proxy's backend.
type Server struct {
	// Endpoint is where the proxy sends requests (Protocol "TCP").
	Endpoint probes.Endpoint `json:"endpoint"`
	// Routable is true when the proxy would send it a new request now: not fenced, draining, in
	// maintenance, unhealthy for the proxy's discovery, or pending removal.
	Routable bool `json:"routable"`
	// State says why not, in the proxy's own words ("fenced", "DRAINING", "MAINT", …); empty for a
	// routable server.
	State string `json:"state,omitempty"`
}

// Backend is one of a proxy's upstream groups (a Traefik service, an Envoy cluster, an HAProxy
// backend, an ingress-nginx backend) and the Kubernetes Service it stands for when its name or
// its data tell (zero otherwise: its servers then join records of any Service).
type Backend struct {
	Name    string            `json:"name"`
	Service probes.ServiceRef `json:"service"`
	Servers []Server          `json:"servers"`
}

// Reader reads one proxy instance. Every request it makes only reads (HTTP GET, or a "show"
// command of HAProxy's runtime API): it never changes the proxy.
type Reader interface {
	// Read returns every backend of the proxy.
	Read(ctx context.Context) ([]Backend, error)
	// ReadBackends returns the named backends only, when the proxy answers for them more cheaply
	// than for all (Traefik's API per service, HAProxy's state per backend); ok is false when it
	// cannot, and the caller reads all.
	ReadBackends(ctx context.Context, names []string) (backends []Backend, ok bool, err error)
}

// Target is how to reach one proxy instance's admin interface: a base URL (http://10.244.1.7:9000)
// or, for HAProxy's runtime API, a stream address (tcp://10.244.1.7:9999, unix:///run/haproxy.sock).
type Target struct {
	Address string
	// Timeout bounds one request.
	Timeout time.Duration
	// Dial, when set, opens the connections (to reach an admin interface inside a pod's network
	// namespace or filesystem): network is "tcp" or "unix", address host:port or a socket path.
	// Nil dials from the daemon's own network namespace.
	Dial func(ctx context.Context, network, address string) (net.Conn, error)
}

// Kind describes a proxy kind: its name (the source label of its observations) and how to read an
// instance of it.
type Kind struct {
	Name string
	// DefaultPort is the admin port an annotated pod is reached on when the annotation names none.
	DefaultPort int
	// Scheme is the scheme of an address built from a pod IP and port: "http" or "tcp".
	Scheme string
	// MinInterval is the shortest time between two reads of one instance, however urgent (Envoy
	// serves its admin interface on its main thread: it is polled gently); 0 for none.
	MinInterval time.Duration
	New         func(Target) (Reader, error)
}

var kinds = map[string]Kind{}

// Register adds a proxy kind; the kind packages call it from init. A duplicate is a programming
// error and panics.
func Register(k Kind) {
	if _, dup := kinds[k.Name]; dup {
		panic("ingress: duplicate kind " + k.Name)
	}
	kinds[k.Name] = k
}

// Kinds lists the registered kinds by name.
func Kinds() []string {
	out := make([]string, 0, len(kinds))
	for n := range kinds {
		out = append(out, n)
	}
	sort.Strings(out)
	return out
}

// Lookup returns a registered kind.
func Lookup(name string) (Kind, error) {
	k, ok := kinds[name]
	if !ok {
		return Kind{}, fmt.Errorf("unknown proxy kind %q (known: %v)", name, Kinds())
	}
	return k, nil
}

// The annotations that make a pod of this node a proxy instance the daemon reads:
//
//	endpointlag.dev/proxy: traefik            # the kind (see Kinds)
//	endpointlag.dev/proxy-admin: "9000"       # optional: the admin port on the pod's IP, or a full
//	                                          # address (http://…, tcp://…, unix://…)
const (
	AnnotationProxy = "endpointlag.dev/proxy"
	AnnotationAdmin = "endpointlag.dev/proxy-admin"
)
