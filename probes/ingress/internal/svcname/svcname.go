// Package svcname reads the Kubernetes Service a proxy's backend stands for out of the names
// ingress controllers give backends, where the name tells it for certain. A name that could stand
// for two Services tells none: a wrong Service would join a proxy's servers to another Service's
// records, while none joins them to whichever record holds the endpoint.
package svcname

import (
	"strconv"
	"strings"

	"k8s.io/apimachinery/pkg/util/validation"

	"github.com/endpointlag/endpointlag/probes"
)

// Ref returns the Service namespace/name when both are valid as Kubernetes names (a namespace is
// a DNS-1123 label, a Service name a DNS-1035 label), so that a piece of some other name is not
// taken for one.
func Ref(namespace, name string) (probes.ServiceRef, bool) {
	if len(validation.IsDNS1123Label(namespace)) > 0 || len(validation.IsDNS1035Label(name)) > 0 {
		return probes.ServiceRef{}, false
	}
	return probes.ServiceRef{Namespace: namespace, Name: name}, true
}

// Port reports whether s is a Service port as controllers write it into names: a number from 1 to
// 65535, or a port name (an IANA service name: lower-case letters, digits and single dashes).
func Port(s string) bool {
	if n, err := strconv.Atoi(s); err == nil {
		return len(validation.IsValidPortNum(n)) == 0
	}
	return len(validation.IsValidPortName(s)) == 0
}

// Dashed reads "<namespace>-<service>-<port>", the name ingress-nginx and Traefik's Kubernetes
// providers give the backend of a Service port. Namespaces, Service names and port names may all
// hold dashes, so only a name of exactly three dash-separated parts tells for certain; any other
// tells none ("default-apple-service-5678" is Service "apple-service" of namespace "default", or
// Service "service" of namespace "default-apple").
func Dashed(s string) (probes.ServiceRef, bool) {
	parts := strings.Split(s, "-")
	if len(parts) != 3 || !Port(parts[2]) {
		return probes.ServiceRef{}, false
	}
	return Ref(parts[0], parts[1])
}
