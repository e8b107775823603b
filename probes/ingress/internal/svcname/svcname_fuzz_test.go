package svcname

import (
	"strings"
	"testing"
)

// FuzzDashed reads fuzzed backend names as ingress-nginx and Traefik name them: a name it reads
// a Service from is exactly "<namespace>-<service>-<port>" of that Service, both valid
// Kubernetes names, with a valid port; and a name with more or fewer dashes names none.
func FuzzDashed(f *testing.F) {
	for _, s := range []string{"shop-web-8080", "shop-web-http", "default-apple-service-5678", "shop-web-0", "shop-web-70000",
		"shop-Web-80", "kube-system-kube-dns-53", "ingress-nginx-controller-443", "shop--80", "a-b-c"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		ref, ok := Dashed(s)
		if !ok {
			if ref.Namespace != "" || ref.Name != "" {
				t.Errorf("%q: %+v without ok", s, ref)
			}
			return
		}
		if strings.Count(s, "-") != 2 {
			t.Errorf("%q, a name of %d dashes, read as %+v", s, strings.Count(s, "-"), ref)
		}
		port, found := strings.CutPrefix(s, ref.Namespace+"-"+ref.Name+"-")
		if !found || !Port(port) {
			t.Errorf("%q read as %+v: not <namespace>-<service>-<port>", s, ref)
		}
		if again, ok := Ref(ref.Namespace, ref.Name); !ok || again != ref {
			t.Errorf("%q read as %+v, which is no valid Service reference", s, ref)
		}
	})
}
