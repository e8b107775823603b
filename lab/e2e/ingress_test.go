package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/netip"
	"os"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/endpointlag/endpointlag/lab/cluster"
	"github.com/endpointlag/endpointlag/lab/haproxy"
	"github.com/endpointlag/endpointlag/lab/load"
	"github.com/endpointlag/endpointlag/lab/report"
	"github.com/endpointlag/endpointlag/lab/scenario"
)

// TestIngress checks the lab's ingress proxies and the daemons' ingress stage, on one lab per
// kube-proxy mode (two nodes): Traefik and HAProxy list the app's endpoints and route to every
// pod; a deleted pod is fenced by Traefik and its slot freed in HAProxy, the ground truth of when
// each path last routed a request to it falls after its deletion and within what each proxy's
// design allows, and the daemon on each proxy's node records the proxy's ingress stage within
// the poll interval (the observation's precision) + 20 ms of that ground truth; in a rollout
// without preStop, every deleted pod's ingress stage is recorded for both proxies and requests
// fail, and with the recommended preStop (which covers the ingress stage) and a drain none fails
// on any path.
func TestIngress(t *testing.T) {
	for _, mode := range []string{"nftables", "iptables"} {
		t.Run(mode, func(t *testing.T) { testIngress(t, mode) })
	}
}

func testIngress(t *testing.T, mode string) {
	cfg := config(t)
	if cfg.Traefik == "" || cfg.HAProxy == "" {
		t.Skipf("the ingress proxies' binaries are missing (LAB_TRAEFIK=%q, built by make lab-bins; haproxy %q, Debian's package, installed by make deps)",
			os.Getenv("LAB_TRAEFIK"), cfg.HAProxy)
	}
	cfg.Nodes, cfg.ProxyMode = 2, mode
	ctx := context.Background()
	c := upLab(t, ctx, cfg)
	app := &scenario.App{Client: c.Client, Namespace: "ing", Name: "web", Replicas: 4}
	if err := app.Apply(ctx, scenario.Behaviour{}); err != nil {
		t.Fatal(err)
	}
	if err := app.WaitSettled(ctx, 2*time.Minute); err != nil {
		t.Fatal(err)
	}
	in, err := scenario.DeployIngress(ctx, c, app, scenario.IngressOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("Traefik %s on %s, HAProxy %s on %s", in.Traefik.Status.PodIP, in.Traefik.Spec.NodeName, in.HAProxy.Status.PodIP, in.HAProxy.Spec.NodeName)

	t.Run("Traefik's API and HAProxy's servers state list the app's endpoints, and both route to every pod", func(t *testing.T) {
		pods, err := app.Pods(ctx)
		if err != nil {
			t.Fatal(err)
		}
		var want []string
		for _, p := range pods {
			want = append(want, p.Status.PodIP+":8080")
		}
		sort.Strings(want)
		err = scenario.Poll(ctx, 20*time.Second, "the proxies' endpoints", func() error {
			tr, hp, err := in.Endpoints(ctx)
			if err != nil {
				return err
			}
			if got := addrs(tr); !slices.Equal(got, want) {
				return fmt.Errorf("traefik routes to %q, want %q", got, want)
			}
			if got := addrs(hp); !slices.Equal(got, want) {
				return fmt.Errorf("haproxy routes to %q, want %q", got, want)
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		_, raw, err := in.TraefikServices(ctx)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("GET /api/http/services, %s:\n%s", in.TraefikService, serviceJSON(t, raw, in.TraefikService))
		_, state, err := in.HAProxyServers(ctx)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("show servers state %s (the filled slots):\n%s", in.HAProxyBackend, filledSlots(state))
		if err := app.WaitServing(ctx, c.ClientNS(), time.Minute); err != nil {
			t.Fatal(err)
		}
		// The daemon on each proxy's node reads it at its heartbeat: its view, which
		// inspect ingress shows, gets there too.
		for _, px := range []*corev1.Pod{in.Traefik, in.HAProxy} {
			n, err := c.Node(px.Spec.NodeName)
			if err != nil {
				t.Fatal(err)
			}
			err = scenario.Poll(ctx, 30*time.Second, "the daemon's view of "+px.Name, func() error {
				got, err := daemonRoutes(n.DaemonURL, proxySource(px))
				if err != nil {
					return err
				}
				if !slices.Equal(got, want) {
					return fmt.Errorf("%s's daemon shows %s routing to %q, want %q", n.Name, proxySource(px), got, want)
				}
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
		}
	})

	// One pod on each node: each proxy's daemon then times one pod of its own node (with
	// propagation) and one of the other.
	for _, node := range []string{"node1", "node2"} {
		t.Run("a deleted pod on "+node+": fenced by Traefik, its HAProxy slot freed, each path's last request to it after the deletion and within the proxy's bound, each proxy's ingress stage on the ground truth", func(t *testing.T) {
			deletedPod(t, ctx, c, app, in, node)
		})
	}

	t.Run("a rollout without preStop fails requests; with the recommended preStop and a drain none fails on any path", func(t *testing.T) {
		if err := app.Apply(ctx, scenario.Behaviour{}); err != nil {
			t.Fatal(err)
		}
		if err := app.WaitSettled(ctx, 2*time.Minute); err != nil {
			t.Fatal(err)
		}
		ls := scenario.LoadSettings{Rate: 100, Timeout: 3 * time.Second}
		first, err := scenario.RunRollout(ctx, c, app, "no preStop", scenario.Behaviour{}, ls, testWriter{t})
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range first.Paths {
			s := first.ByPath[p]
			t.Logf("no preStop, %s: %d requests, %d failed %v", p, s.Requests, s.Failed, s.ByKind)
		}
		if first.Summary.Failed == 0 {
			t.Error("a rollout of pods that exit at once failed no request: nothing was measured")
		}
		for _, px := range []*corev1.Pod{in.Traefik, in.HAProxy} {
			recs := nodeRecords(t, first.Records, px.Spec.NodeName)
			source := proxySource(px)
			for uid, p := range first.Deleted {
				r := findRecord(recs, string(uid))
				switch {
				case r == nil:
					t.Errorf("%s's daemon has no record of %s", px.Spec.NodeName, p.Name)
				case r.Ingress(source) == nil:
					t.Errorf("%s's daemon has no ingress stage from %s for %s (stages %v, awaited %v, pending %v)",
						px.Spec.NodeName, source, p.Name, stageNames(r), r.Awaited, r.Pending)
				}
			}
		}
		rec := scenario.Recommend(first.Lags)
		if rec.PreStop == 0 {
			t.Fatal("nothing measured to size preStop from")
		}
		b := scenario.Behaviour{PreStop: rec.PreStop, Drain: 2 * time.Second}
		t.Logf("preStop %s, drain %s", rec, b.Drain)
		if !slices.ContainsFunc(rec.Stages, func(s scenario.StageLag) bool { return strings.HasPrefix(s.Stage, "ingress/") }) {
			t.Errorf("the recommendation weighs no ingress stage: %s", rec)
		}
		if err := app.Apply(ctx, b); err != nil {
			t.Fatal(err)
		}
		if err := app.WaitSettled(ctx, 3*time.Minute); err != nil {
			t.Fatal(err)
		}
		second, err := scenario.RunRollout(ctx, c, app, "sized", b, ls, testWriter{t})
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range second.Paths {
			s := second.ByPath[p]
			t.Logf("preStop %s and drain, %s: %d requests, %d failed %v", b.PreStop, p, s.Requests, s.Failed, s.ByKind)
			if s.Requests < 300 || s.Failed != 0 {
				t.Errorf("%s: %d of %d requests failed; want 0 of at least 300", p, s.Failed, s.Requests)
			}
		}
	})
}

// Bounds on how long after its endpoint turned terminating each path may still route a request
// to a pod: kube-proxy syncs at most once a second (minSyncPeriod), the HAProxy controller's
// stand-in waits its sync delay (100 ms), Traefik applies at most one configuration per
// providersThrottleDuration (2 s); each with a second to spare on this loaded machine.
var routeBounds = map[string]time.Duration{
	load.PathClusterIP: 2 * time.Second,
	load.PathHAProxy:   time.Second,
	load.PathTraefik:   3 * time.Second,
}

// deletedPod deletes one pod with a long preStop under load along every path and compares what
// the load generator saw (the ground truth: the last request each path routed to the pod)
// with the deletion, the test's own slice watch, and what the proxies' admin interfaces said.
func deletedPod(t *testing.T, ctx context.Context, c *cluster.Cluster, app *scenario.App, in *scenario.Ingress, node string) {
	const preStop = 5 * time.Second
	if err := app.Apply(ctx, scenario.Behaviour{PreStop: preStop, Drain: time.Second}); err != nil {
		t.Fatal(err)
	}
	if err := app.WaitSettled(ctx, 2*time.Minute); err != nil {
		t.Fatal(err)
	}
	if err := app.WaitServing(ctx, c.ClientNS(), time.Minute); err != nil {
		t.Fatal(err)
	}
	st, err := watchSlices(ctx, c, app.Namespace)
	if err != nil {
		t.Fatal(err)
	}
	defer st.stop()
	targets, err := app.Targets(ctx)
	if err != nil {
		t.Fatal(err)
	}
	// 300 requests a second on each path: a proxy balancing over the four pods sends the victim
	// one about every 13 ms, the resolution of the ground truth.
	lr, err := c.StartLoad("ingress-deletion", load.Config{Targets: targets, Rate: 300, Duration: 2 * time.Minute, Timeout: 3 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	stopped := false
	defer func() {
		if !stopped {
			_, _ = lr.Stop()
		}
	}()
	time.Sleep(1500 * time.Millisecond)
	victim := podOn(t, ctx, app, node)
	ep := victim.Status.PodIP + ":8080"
	issued := time.Now()
	if err := c.Client.CoreV1().Pods(app.Namespace).Delete(ctx, victim.Name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}

	// Watch the proxies' own view until Traefik has dropped the server and HAProxy freed its slot.
	var fenced, traefikGone, freed time.Time
	var fencedJSON, freedState string
	deadline := issued.Add(preStop + 10*time.Second)
	for (traefikGone.IsZero() || freed.IsZero()) && time.Now().Before(deadline) {
		_, raw, err := in.TraefikServices(ctx)
		if err != nil {
			t.Fatal(err)
		}
		now := time.Now()
		switch s := traefikServer(t, raw, in.TraefikService, ep); {
		case s == nil && traefikGone.IsZero():
			traefikGone = now
		case s != nil && s.Fenced && fenced.IsZero():
			fenced, fencedJSON = now, serviceJSON(t, raw, in.TraefikService)
		}
		states, state, err := in.HAProxyServers(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if now := time.Now(); freed.IsZero() && !slices.ContainsFunc(states, func(s haproxy.ServerState) bool { return s.Ready() && fmt.Sprintf("%s:%d", s.Addr, s.Port) == ep }) {
			freed, freedState = now, filledSlots(state)
		}
		time.Sleep(25 * time.Millisecond)
	}
	if err := scenario.WaitPodGone(ctx, c.Client, app.Namespace, victim.Name, 30*time.Second); err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Second)
	stopped = true
	rs, err := lr.Stop()
	if err != nil {
		t.Fatal(err)
	}
	term, ok := st.terminatingAt(string(victim.UID))
	if !ok {
		t.Fatalf("the test's slice watch never saw %s terminating", victim.Name)
	}
	t.Logf("%s (%s) deleted at %s, terminating in the test's slice watch %s later", victim.Name, ep, issued.Format("15:04:05.000"), term.Sub(issued).Round(time.Millisecond))
	switch {
	case fenced.IsZero():
		t.Errorf("Traefik's API never showed %s fenced (preStop %s)", ep, preStop)
	default:
		t.Logf("Traefik's API showed it fenced %s after it turned terminating, gone %s after:\n%s",
			fenced.Sub(term).Round(time.Millisecond), traefikGone.Sub(term).Round(time.Millisecond), fencedJSON)
	}
	if freed.IsZero() {
		t.Errorf("HAProxy never freed the slot of %s", ep)
	} else {
		t.Logf("HAProxy's slot freed %s after it turned terminating; the filled slots then:\n%s", freed.Sub(term).Round(time.Millisecond), freedState)
	}

	for _, path := range []string{load.PathClusterIP, load.PathHAProxy, load.PathTraefik} {
		last, ok := load.LastRouted(rs, path, victim.Name)
		if !ok {
			t.Errorf("%s: no request reached %s", path, victim.Name)
			continue
		}
		lag := last.Start.Sub(term)
		t.Logf("%s: the last request routed to %s started %s after its endpoint turned terminating (%s after the delete; bound %s)",
			path, victim.Name, lag.Round(time.Millisecond), last.Start.Sub(issued).Round(time.Millisecond), routeBounds[path])
		// At 100 requests a second over four pods, a path that still routes to the pod sends it
		// one every 40 ms on average: none in the 500 ms before a path stops (e^-12.5) means the
		// path stopped before the deletion.
		if last.Start.Before(issued.Add(-500 * time.Millisecond)) {
			t.Errorf("%s: the last request to %s started %s before its deletion: the path stopped routing to it before it was deleted",
				path, victim.Name, issued.Sub(last.Start).Round(time.Millisecond))
		}
		if lag > routeBounds[path] {
			t.Errorf("%s: routed to %s %s after its endpoint turned terminating, more than %s", path, victim.Name, lag.Round(time.Millisecond), routeBounds[path])
		}
		// No request that started after the proxy's admin interface showed the endpoint out may
		// have been routed to it (the interface shows what the proxy applied, a little later).
		for p, out := range map[string]time.Time{load.PathTraefik: fenced, load.PathHAProxy: freed} {
			if p == path && !out.IsZero() && last.Start.After(out.Add(100*time.Millisecond)) {
				t.Errorf("%s: a request that started %s after the admin interface showed %s out was routed to it",
					path, last.Start.Sub(out).Round(time.Millisecond), ep)
			}
		}
	}
	for path, s := range load.SummarizeByPath(rs) {
		if s.Failed > 0 {
			t.Errorf("%s: %d of %d requests failed %v, though the pod kept serving through its %s preStop", path, s.Failed, s.Requests, s.ByKind, preStop)
		}
	}

	// The daemon on each proxy's node: its ingress stage from that proxy against the ground truth.
	for path, px := range map[string]*corev1.Pod{load.PathTraefik: in.Traefik, load.PathHAProxy: in.HAProxy} {
		node, err := c.Node(px.Spec.NodeName)
		if err != nil {
			t.Fatal(err)
		}
		var e, seen *report.StageEntry
		err = scenario.Poll(ctx, 10*time.Second, "the ingress stage", func() error {
			recs, err := report.Fetch(ctx, node.DaemonURL)
			if err != nil {
				return err
			}
			r := findRecord(recs, string(victim.UID))
			if r == nil {
				return fmt.Errorf("%s's daemon has no record of %s", node.Name, victim.Name)
			}
			seen = r.Stage("endpointslice")
			if e = r.Ingress(proxySource(px)); e == nil {
				return fmt.Errorf("%s's daemon has no ingress stage from %s for %s (stages %v, awaited %v, pending %v)",
					node.Name, proxySource(px), victim.Name, stageNames(r), r.Awaited, r.Pending)
			}
			return nil
		})
		if err != nil {
			t.Error(err)
			continue
		}
		last, ok := load.LastRouted(rs, path, victim.Name)
		if !ok {
			continue // reported above
		}
		// The proxy stopped routing to the pod after the last request it routed there and before
		// the one it would have sent there next: the ground truth is as precise as the longest
		// interval between the path's requests to the pod, measured over the load before.
		gap := load.RoutedGap(rs, path, victim.Name, issued.Add(-time.Second), last.Start)
		// The daemon reads a proxy often only once it knows the endpoint is terminating: a proxy
		// that stopped before the daemon's own slice watch told it (a loaded API server fans out
		// late) is seen at the first read after that, not before.
		ref := last.Start
		if seen != nil && seen.Time.After(ref) {
			t.Logf("%s: %s stopped routing to %s before %s's daemon saw its slice change (%s later): measured from that",
				path, px.Name, victim.Name, node.Name, seen.Time.Sub(ref).Round(time.Millisecond))
			ref = seen.Time
		}
		d := e.Time.Sub(ref)
		bound := time.Duration(e.Precision*float64(time.Second)) + gap + 20*time.Millisecond
		t.Logf("%s: the daemon on %s saw %s stop routing to %s %s after its last request there (precision %.1f ms, the path's requests to it at most %s apart, bound %s); %s after the endpoint turned terminating",
			path, node.Name, px.Name, victim.Name, d.Round(100*time.Microsecond), e.Precision*1000, gap.Round(100*time.Microsecond), bound.Round(100*time.Microsecond), e.Time.Sub(term).Round(time.Millisecond))
		if d < -20*time.Millisecond || d > bound {
			t.Errorf("%s: the ingress stage is %s from the ground truth (the last request %s routed to %s), beyond −20 ms … precision + request interval + 20 ms = %s",
				path, d.Round(100*time.Microsecond), path, victim.Name, bound.Round(100*time.Microsecond))
		}
	}
}

// podOn is one of the app's pods on node.
func podOn(t *testing.T, ctx context.Context, app *scenario.App, node string) corev1.Pod {
	t.Helper()
	if err := app.WaitSettled(ctx, time.Minute); err != nil {
		t.Fatal(err)
	}
	pods, err := app.Pods(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range pods {
		if p.Spec.NodeName == node {
			return p
		}
	}
	t.Fatalf("%s/%s has no pod on %s", app.Namespace, app.Name, node)
	return corev1.Pod{}
}

// proxySource is the name the daemons give a proxy pod's instance: kind:namespace/name.
func proxySource(px *corev1.Pod) string {
	return px.Annotations["endpointlag.dev/proxy"] + ":" + px.Namespace + "/" + px.Name
}

// daemonRoutes is what a daemon's /api/v1/ingress says an instance routes new requests to, as
// sorted ip:port.
func daemonRoutes(base, instance string) ([]string, error) {
	resp, err := http.Get(base + "/api/v1/ingress")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s/api/v1/ingress: %s", base, resp.Status)
	}
	var body struct {
		Instances []struct {
			Name     string `json:"name"`
			Backends []struct {
				Servers []struct {
					Endpoint struct {
						Addr netip.Addr `json:"ip"`
						Port uint16     `json:"port"`
					} `json:"endpoint"`
					Routable bool `json:"routable"`
				} `json:"servers"`
			} `json:"backends"`
		} `json:"instances"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&body); err != nil {
		return nil, fmt.Errorf("GET %s/api/v1/ingress: %w", base, err)
	}
	for _, v := range body.Instances {
		if v.Name != instance {
			continue
		}
		var out []string
		for _, b := range v.Backends {
			for _, s := range b.Servers {
				if s.Routable {
					out = append(out, netip.AddrPortFrom(s.Endpoint.Addr, s.Endpoint.Port).String())
				}
			}
		}
		sort.Strings(out)
		return slices.Compact(out), nil
	}
	return nil, fmt.Errorf("GET %s/api/v1/ingress: no instance %s", base, instance)
}

// nodeRecords is one node's records among a rollout's.
func nodeRecords(t *testing.T, all []report.Records, node string) report.Records {
	t.Helper()
	for _, r := range all {
		if r.Node == node {
			return r
		}
	}
	t.Fatalf("no records from %s", node)
	return report.Records{}
}

func stageNames(r *report.Record) []string {
	var out []string
	for _, s := range r.Stages {
		name := s.Stage
		if s.Source != "" && s.Stage == "ingress" {
			name += "@" + s.Source
		}
		out = append(out, name)
	}
	return out
}

func addrs(aps []netip.AddrPort) []string {
	out := make([]string, 0, len(aps))
	for _, a := range aps {
		out = append(out, a.String())
	}
	sort.Strings(out)
	return out
}

// serviceJSON is the entry called name in Traefik's GET /api/http/services answer, indented.
func serviceJSON(t *testing.T, raw []byte, name string) string {
	var all []json.RawMessage
	if err := json.Unmarshal(raw, &all); err != nil {
		t.Fatalf("Traefik's services: %v", err)
	}
	for _, s := range all {
		var head struct{ Name string }
		if json.Unmarshal(s, &head) == nil && head.Name == name {
			var v any
			_ = json.Unmarshal(s, &v)
			b, _ := json.MarshalIndent(v, "", "  ")
			return string(b)
		}
	}
	return "(no service " + name + ")"
}

// traefikServer is the server of service name with endpoint ep, nil when Traefik lists none.
func traefikServer(t *testing.T, raw []byte, name, ep string) *scenario.TraefikServer {
	var services []scenario.TraefikService
	if err := json.Unmarshal(raw, &services); err != nil {
		t.Fatalf("Traefik's services: %v", err)
	}
	for _, s := range services {
		if s.Name != name || s.LoadBalancer == nil {
			continue
		}
		for i, srv := range s.LoadBalancer.Servers {
			if strings.HasSuffix(srv.URL, "://"+ep) {
				return &s.LoadBalancer.Servers[i]
			}
		}
	}
	return nil
}

// filledSlots keeps the header and the slots holding an endpoint (not at 127.0.0.1) of an
// answer to `show servers state`.
func filledSlots(state string) string {
	var out []string
	for _, line := range strings.Split(strings.TrimSpace(state), "\n") {
		if !strings.Contains(line, " 127.0.0.1 ") {
			out = append(out, line)
		}
	}
	return strings.Join(out, "\n")
}
