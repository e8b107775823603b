// Package haproxy is the lab's stand-in for the HAProxy Kubernetes Ingress Controller
// (github.com/haproxytech/kubernetes-ingress), which the Go module proxy does not serve: it
// renders an HAProxy configuration whose backends hold a fixed number of server slots, and
// follows the EndpointSlices of each backend's Service, putting ready endpoints into slots and
// freeing the slots of endpoints that are no longer ready, through HAProxy's runtime API, as
// that controller does between reloads. HAProxy itself is real (Debian's).
package haproxy

import (
	"fmt"
	"strconv"
	"strings"

	corev1 "k8s.io/api/core/v1"
)

// Backend is one HAProxy backend: a Service's port.
type Backend struct {
	// Namespace, Service and Port (the Service port's name, or its number when it has none)
	// say which EndpointSlices feed it.
	Namespace, Service, Port string
	// Host and Path route requests to it: a request whose Host header (without port) is Host,
	// or any when empty, and whose path starts with Path ("/" when empty).
	Host, Path string
}

// BackendName is the controller's name for the backend of a Service port:
// <namespace>_svc_<service>_<port name>, or the port number when the port has no name
// (kubernetes-ingress pkg/service/service.go, GetBackendName, since v3.2.0; earlier versions
// left out "svc_").
func BackendName(namespace, service string, port corev1.ServicePort) string {
	return Backend{Namespace: namespace, Service: service, Port: PortKey(port)}.Name()
}

// PortKey is how the controller names a Service port: its name, or its number when it has none.
func PortKey(port corev1.ServicePort) string {
	if port.Name != "" {
		return port.Name
	}
	return strconv.Itoa(int(port.Port))
}

// Name is the backend's HAProxy name (BackendName).
func (b Backend) Name() string {
	return fmt.Sprintf("%s_svc_%s_%s", b.Namespace, b.Service, b.Port)
}

// Config is one HAProxy instance's configuration.
type Config struct {
	// HTTPPort is the frontend's port (on every address of the pod).
	HTTPPort int
	// HealthzPort answers GET /healthz with 200 (the controller's healthz frontend, 1042).
	HealthzPort int
	// AdminPort is the runtime API socket at level admin, on the pod's loopback only: the
	// controller's (the real one uses a Unix socket in its container).
	AdminPort int
	// UserPort is a runtime API socket at level user (read-only: "show" commands), on the
	// pod's IP (from the environment variable POD_IP, which the pod sets from the downward
	// API): the one endpointlag reads.
	UserPort int
	// Slots is the number of server slots per backend (the controller's scale-server-slots,
	// 42 by default).
	Slots    int
	Backends []Backend
}

// DefaultSlots is the controller's default number of server slots per backend.
const DefaultSlots = 42

// Render writes the configuration: the controller's defaults (timeouts, roundrobin, a health
// check on every server, X-Forwarded-For), one frontend routing by Host and path prefix, and
// each backend with its slots, all free (disabled, at 127.0.0.1:1) until the controller fills
// them.
func (c Config) Render() string {
	var b strings.Builder
	w := func(format string, args ...any) { fmt.Fprintf(&b, format+"\n", args...) }
	w("# Rendered by the endpointlag lab (lab/haproxy), standing in for the HAProxy Kubernetes")
	w("# Ingress Controller; its stand-in in the lab process drives the slots at run time.")
	w("global")
	w("  stats socket ipv4@127.0.0.1:%d level admin", c.AdminPort)
	w(`  stats socket "ipv4@${POD_IP}:%d" level user`, c.UserPort)
	w("")
	w("defaults")
	w("  mode http")
	w("  timeout http-request 5s")
	w("  timeout connect 5s")
	w("  timeout client 50s")
	w("  timeout queue 5s")
	w("  timeout server 50s")
	w("  timeout http-keep-alive 60s")
	w("")
	w("frontend http")
	w("  bind :%d", c.HTTPPort)
	for _, be := range c.Backends {
		cond := ""
		if be.Host != "" {
			cond += fmt.Sprintf(" { req.hdr(host),field(1,:) -i %s }", be.Host)
		}
		path := be.Path
		if path == "" {
			path = "/"
		}
		cond += fmt.Sprintf(" { path_beg %s }", path)
		w("  use_backend %s if%s", be.Name(), cond)
	}
	w("")
	w("frontend healthz")
	w("  bind :%d", c.HealthzPort)
	w("  monitor-uri /healthz")
	for _, be := range c.Backends {
		w("")
		w("backend %s", be.Name())
		w("  balance roundrobin")
		w("  option forwardfor")
		w("  default-server check")
		for i := range c.Slots {
			w("  server %s %s:%d disabled", serverName(i), freeAddr.Addr(), freeAddr.Port())
		}
	}
	return b.String()
}
