package ingress

import (
	"log/slog"
	"net"
	"net/netip"
	"net/url"
	"strconv"
	"strings"
	"testing"

	"k8s.io/utils/clock"
)

// FuzzTarget reads a proxy pod's IP and its endpointlag.dev/proxy-admin annotation (both from
// the Kubernetes API) as the probe does: a port (or none) makes scheme://podIP:port, a URL that
// parses back to the pod's IP and that port; a full address is taken as it is, dialed inside the
// pod exactly when it listens there and --ingress.enter-pods allows, refused when it does not.
func FuzzTarget(f *testing.F) {
	for _, tc := range []struct {
		ip, ann string
		enter   bool
	}{
		{"10.244.1.7", "", false}, {"10.244.1.7", "8080", false}, {"fd00:10:244:1::7", "9000", false},
		{"10.244.1.7", "tcp://10.0.0.1:9999", false}, {"10.244.1.7", "http://127.0.0.1:19000", false},
		{"10.244.1.7", "http://localhost:19000", true}, {"10.244.1.7", "unix:///var/run/haproxy.sock", true},
		{"10.244.1.7", "nine", false}, {"10.244.1.7", "70000", false}, {"10.244.1.7", "http://[::1]:9901", true},
	} {
		f.Add(tc.ip, tc.ann, tc.enter)
	}
	k := Kind{Name: "fuzzkind", DefaultPort: 9000, Scheme: "http"}
	f.Fuzz(func(t *testing.T, podIP, annotation string, enter bool) {
		opts := DefaultOptions()
		opts.EnterPods = enter
		p := New(opts, nil, "node-a", nil, clock.RealClock{}, slog.New(slog.DiscardHandler))
		got, err := p.target(k, podIP, annotation)
		ip, ipErr := netip.ParseAddr(podIP)
		if ipErr != nil {
			if err == nil {
				t.Fatalf("pod IP %q taken: %+v", podIP, got)
			}
			return
		}
		if ip.Zone() != "" {
			return // the API server's pod IPs carry no zone
		}
		if !strings.Contains(annotation, "://") {
			port, convErr := strconv.Atoi(annotation)
			if annotation == "" {
				port, convErr = k.DefaultPort, nil
			}
			if valid := convErr == nil && port > 0 && port <= 65535; valid != (err == nil) {
				t.Fatalf("annotation %q: %+v, %v", annotation, got, err)
			}
			if err != nil {
				return
			}
			u, perr := url.Parse(got.Address)
			if perr != nil || u.Scheme != k.Scheme || u.Port() != strconv.Itoa(port) || got.Dial != nil {
				t.Fatalf("pod %s, annotation %q: address %q (%v)", ip, annotation, got.Address, perr)
			}
			if back, perr := netip.ParseAddr(u.Hostname()); perr != nil || back != ip {
				t.Fatalf("pod %s, annotation %q: address %q names host %q", ip, annotation, got.Address, u.Hostname())
			}
			if host, _, _ := net.SplitHostPort(u.Host); host != ip.String() {
				t.Fatalf("pod %s: host %q", ip, host)
			}
			return
		}
		inside := insidePod(annotation)
		switch {
		case inside && !enter:
			if err == nil {
				t.Fatalf("%q listens inside the pod, taken without --ingress.enter-pods: %+v", annotation, got)
			}
		case err != nil:
			t.Fatalf("%q refused: %v", annotation, err)
		case got.Address != annotation || (got.Dial != nil) != inside:
			t.Fatalf("%q (inside the pod: %v) made %q, dialed inside: %v", annotation, inside, got.Address, got.Dial != nil)
		}
	})
}
