package main

import (
	"bytes"
	"context"
	"encoding/json"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spf13/pflag"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"
	clocktesting "k8s.io/utils/clock/testing"
	"k8s.io/utils/ptr"

	"github.com/endpointlag/endpointlag/collector"
	"github.com/endpointlag/endpointlag/probes"
	"github.com/endpointlag/endpointlag/probes/ingress"
)

// testProxy is the proxy behind every instance of the kind "cmdtest": one backend for shop/web
// whose single server the test fences.
var testProxy = &fencedProxy{}

type fencedProxy struct {
	mu     sync.Mutex
	fenced bool
}

func (f *fencedProxy) fence() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.fenced = true
}

func (f *fencedProxy) Read(context.Context) ([]ingress.Backend, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	s := ingress.Server{Endpoint: probes.Endpoint{Addr: netip.MustParseAddr("10.244.1.5"), Port: 8080, Protocol: "TCP"}, Routable: !f.fenced}
	if f.fenced {
		s.State = "fenced"
	}
	return []ingress.Backend{{Name: "shop-web-8080", Service: probes.ServiceRef{Namespace: "shop", Name: "web"}, Servers: []ingress.Server{s}}}, nil
}

func (f *fencedProxy) ReadBackends(context.Context, []string) ([]ingress.Backend, bool, error) {
	return nil, false, nil
}

func init() {
	ingress.Register(ingress.Kind{Name: "cmdtest", DefaultPort: 1, Scheme: "http",
		New: func(ingress.Target) (ingress.Reader, error) { return testProxy, nil }})
}

// The daemon reads a proxy instance given by --ingress.instances, times the endpoint's removal
// there against the pod's deletion, exports it under the proxy's kind and shows it in inspect's
// ingress/<kind> column; /api/v1/ingress and inspect ingress show the instance and its servers.
func TestDaemonIngressStage(t *testing.T) {
	start := time.Date(2026, 11, 29, 12, 0, 0, 0, time.UTC)
	clk := clocktesting.NewFakeClock(start)
	p := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: "web-1", UID: "uid-1"}, Spec: corev1.PodSpec{NodeName: "node-a"}}
	s := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Namespace: "shop", Name: "web-x", Labels: map[string]string{discoveryv1.LabelServiceName: "web"}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Port: ptr.To[int32](8080), Protocol: ptr.To(corev1.ProtocolTCP)}},
		Endpoints: []discoveryv1.Endpoint{{
			Addresses:  []string{"10.244.1.5"},
			Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(true)},
			NodeName:   ptr.To("node-a"),
			TargetRef:  &corev1.ObjectReference{Kind: "Pod", Namespace: "shop", Name: "web-1", UID: "uid-1"},
		}},
	}
	client := fake.NewClientset(p, s)

	opts := testOptions()
	var parsed Options
	fs := pflag.NewFlagSet("test", pflag.ContinueOnError)
	bindFlags(fs, &parsed)
	if err := fs.Parse([]string{"--ingress.instances=cmdtest=http://127.0.0.1:1", "--ingress.poll-fast=5ms"}); err != nil {
		t.Fatal(err)
	}
	opts.Probes[ingress.Name] = ptr.To(true)
	r := startDaemon(t, opts, clk, client)
	waitFor(t, "/readyz", func() bool { code, _ := get(t, r.base+"/readyz"); return code == http.StatusOK })

	ctx := context.Background()
	p.DeletionTimestamp = &metav1.Time{Time: start}
	p.DeletionGracePeriodSeconds = ptr.To[int64](30)
	if _, err := client.CoreV1().Pods("shop").Update(ctx, p, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the pod's deletion", func() bool { return strings.Contains(r.logs.String(), "pod deleted") })
	s.Endpoints[0].Conditions = discoveryv1.EndpointConditions{Ready: ptr.To(false), Serving: ptr.To(true), Terminating: ptr.To(true)}
	if _, err := client.DiscoveryV1().EndpointSlices("shop").Update(ctx, s, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the record to await the instance", func() bool {
		_, body := get(t, r.base+"/api/v1/records")
		return strings.Contains(body, `"ingress@cmdtest=http://127.0.0.1:1"`)
	})
	clk.Step(1500 * time.Millisecond)
	testProxy.fence()
	want := `endpointlag_propagation_seconds_count{path="",source="cmdtest",stage="ingress"} 1`
	waitFor(t, "the ingress sample", func() bool { _, m := get(t, r.base+"/metrics"); return strings.Contains(m, want) })
	_, m := get(t, r.base+"/metrics")
	for _, line := range []string{
		`endpointlag_propagation_seconds_sum{path="",source="cmdtest",stage="ingress"} 1.5`,
		`endpointlag_ingress_instances{kind="cmdtest",up="true"} 1`,
		`endpointlag_ingress_reads_total{kind="cmdtest",query="full"} `,
		`endpointlag_probe_up{probe="ingress"} 1`,
	} {
		if !strings.Contains(m, line) {
			t.Errorf("/metrics lacks %q:\n%s", line, grepLines(m, "ingress"))
		}
	}

	var out, errOut bytes.Buffer
	if code := run([]string{"inspect", "--daemon", r.base}, &out, &errOut); code != 0 {
		t.Fatalf("inspect exit %d: %s", code, errOut.String())
	}
	lines := strings.Split(out.String(), "\n")
	header, row := strings.Fields(lines[0]), strings.Fields(lines[1])
	col := -1
	for i, h := range header {
		if h == "INGRESS/CMDTEST" {
			col = i
		}
	}
	if col < 0 || len(row) != len(header) || row[col] != "+1.500s" {
		t.Errorf("inspect has no ingress/cmdtest column saying +1.500s:\n%s", out.String())
	}

	code, body := get(t, r.base+"/api/v1/ingress")
	var resp IngressResponse
	if err := json.Unmarshal([]byte(body), &resp); code != http.StatusOK || err != nil {
		t.Fatalf("/api/v1/ingress: %d %v\n%s", code, err, body)
	}
	if len(resp.Instances) != 1 || resp.Instances[0].Name != "cmdtest=http://127.0.0.1:1" || !resp.Instances[0].Up ||
		len(resp.Instances[0].Backends) != 1 || resp.Instances[0].Backends[0].Servers[0].State != "fenced" {
		t.Errorf("/api/v1/ingress = %+v", resp)
	}
	out.Reset()
	if code := run([]string{"inspect", "ingress", "--daemon", r.base, "-o", "wide"}, &out, &errOut); code != 0 {
		t.Fatalf("inspect ingress exit %d: %s", code, errOut.String())
	}
	wantRow := "cmdtest=http://127.0.0.1:1 shop-web-8080 shop/web 10.244.1.5:8080/TCP no fenced"
	if lines := strings.Split(out.String(), "\n"); len(lines) < 2 || strings.Join(strings.Fields(lines[1]), " ") != wantRow {
		t.Errorf("inspect ingress -o wide:\n%s\nwant the row %q", out.String(), wantRow)
	}
}

// Without the ingress probe, /api/v1/ingress says so, and so does inspect ingress.
func TestInspectIngressWithoutProbe(t *testing.T) {
	r := startDaemon(t, testOptions(), clocktesting.NewFakeClock(time.Now()), fake.NewClientset())
	if code, body := get(t, r.base+"/api/v1/ingress"); code != http.StatusNotFound || !strings.Contains(body, "not enabled") {
		t.Errorf("/api/v1/ingress: %d %s", code, body)
	}
	var out, errOut bytes.Buffer
	if code := run([]string{"inspect", "ingress", "--daemon", r.base}, &out, &errOut); code != 1 || !strings.Contains(errOut.String(), "ingress probe is not enabled") {
		t.Errorf("inspect ingress: exit %d, %s", code, errOut.String())
	}
}

// The ingress/<kind> cell: the last instance of the kind to stop routing to the endpoint, how many
// of the awaited instances have, and n/a where none of the kind routed to it.
func TestInspectIngressColumns(t *testing.T) {
	at := time.Date(2026, 11, 29, 12, 0, 0, 0, time.UTC)
	f := func(v float64) *float64 { return &v }
	ep := probes.Endpoint{Addr: netip.MustParseAddr("10.244.1.1"), Port: 8080, Protocol: "TCP"}
	svc := probes.ServiceRef{Namespace: "shop", Name: "web"}
	resp := RecordsResponse{Node: "node-a", Records: []collector.RecordView{
		{Pod: probes.PodRef{Namespace: "shop", Name: "both"}, Service: svc, Endpoint: ep,
			Stages: []collector.StageView{
				{Stage: "ingress", Source: "traefik:ing/t-1", Kind: "traefik", Time: at.Add(time.Second), Propagation: f(1)},
				{Stage: "ingress", Source: "traefik:ing/t-2", Kind: "traefik", Time: at.Add(2 * time.Second), Propagation: f(2)},
			},
			Awaited: []string{"ingress@traefik:ing/t-1", "ingress@traefik:ing/t-2", "ingress@haproxy=tcp://10.0.0.1:9999"}},
		{Pod: probes.PodRef{Namespace: "shop", Name: "half"}, Service: svc, Endpoint: ep,
			Stages:  []collector.StageView{{Stage: "ingress", Source: "traefik:ing/t-1", Kind: "traefik", Time: at.Add(time.Second), Propagation: f(0.5)}},
			Awaited: []string{"ingress@traefik:ing/t-1", "ingress@traefik:ing/t-2"}},
		{Pod: probes.PodRef{Namespace: "shop", Name: "none"}, Service: svc, Endpoint: ep, NotApplicable: []string{"ingress"}},
	}}
	var out bytes.Buffer
	writeTable(&out, resp, at)
	lines := strings.Split(out.String(), "\n")
	header := strings.Fields(lines[0])
	want := []string{"POD", "SERVICE", "ENDPOINT", "LOCAL", "DELETED", "ENDPOINTSLICE", "ENDPOINTSLICE_REMOVED", "INGRESS/TRAEFIK", "INGRESS/HAPROXY", "GONE", "PENDING", "CONNECTIONS"}
	if strings.Join(header, " ") != strings.Join(want, " ") {
		t.Fatalf("header %q, want %q", header, want)
	}
	for i, w := range [][2]string{{"+2.000s(2/2)", "-(0/1)"}, {"+0.500s(1/2)", "n/a"}, {"n/a", "n/a"}} {
		row := strings.Fields(lines[i+1])
		if row[7] != w[0] || row[8] != w[1] {
			t.Errorf("row %d: %q %q, want %q %q\n%s", i+1, row[7], row[8], w[0], w[1], out.String())
		}
	}
}
