package proxymode

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"testing"
)

func TestDisagrees(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/proxyMode" {
			http.NotFound(w, r)
			return
		}
		fmt.Fprint(w, "ipvs")
	}))
	defer srv.Close()
	ctx := context.Background()
	a := Asker{URL: srv.URL}
	if got := a.Disagrees(ctx, "iptables"); got != "ipvs" {
		t.Errorf("Disagrees(iptables) = %q, want ipvs", got)
	}
	if got := a.Disagrees(ctx, "ipvs"); got != "" {
		t.Errorf("Disagrees(ipvs) = %q, want none", got)
	}
	// Unreachable or not configured: the evidence decides alone.
	srv.Close()
	if got := a.Disagrees(ctx, "iptables"); got != "" {
		t.Errorf("an unreachable kube-proxy disagreed: %q", got)
	}
	if got := (Asker{}).Disagrees(ctx, "iptables"); got != "" {
		t.Errorf("an unconfigured asker disagreed: %q", got)
	}
}
