package svcname

import (
	"testing"

	"github.com/endpointlag/endpointlag/probes"
)

func TestDashed(t *testing.T) {
	for _, tc := range []struct {
		name string
		want probes.ServiceRef
		ok   bool
	}{
		{"shop-web-8080", probes.ServiceRef{Namespace: "shop", Name: "web"}, true},
		{"shop-web-http", probes.ServiceRef{Namespace: "shop", Name: "web"}, true},
		// Dashes inside a part make the split ambiguous.
		{"default-apple-service-5678", probes.ServiceRef{}, false},
		{"shop-web-http-alt", probes.ServiceRef{}, false},
		{"shop-web-0", probes.ServiceRef{}, false},
		{"shop-web-70000", probes.ServiceRef{}, false},
		{"shop-Web-80", probes.ServiceRef{}, false},
		{"shop-9web-80", probes.ServiceRef{}, false},
		{"-web-80", probes.ServiceRef{}, false},
		{"shop--80", probes.ServiceRef{}, false},
		{"shop-web", probes.ServiceRef{}, false},
	} {
		got, ok := Dashed(tc.name)
		if got != tc.want || ok != tc.ok {
			t.Errorf("Dashed(%q) = %v, %v; want %v, %v", tc.name, got, ok, tc.want, tc.ok)
		}
	}
}

func TestRef(t *testing.T) {
	if _, ok := Ref("kube-system", "kube-dns"); !ok {
		t.Error("kube-system/kube-dns refused")
	}
	for _, bad := range [][2]string{{"", "web"}, {"shop", ""}, {"shop.x", "web"}, {"shop", "web_1"}, {"shop", "1web"}} {
		if _, ok := Ref(bad[0], bad[1]); ok {
			t.Errorf("Ref(%q, %q) accepted", bad[0], bad[1])
		}
	}
}
