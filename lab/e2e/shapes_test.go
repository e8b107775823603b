package e2e

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"

	"github.com/endpointlag/endpointlag/lab/internal/ns"
	"github.com/endpointlag/endpointlag/lab/scenario"
)

// TestShapes checks, on one lab with two zones and small EndpointSlices, that the lab makes the
// cluster shapes real clusters have: readiness probes, pods that complete, addresses taken over,
// zone hints, slices that overflow, a stuck kube-proxy.
func TestShapes(t *testing.T) {
	cfg := config(t)
	cfg.Nodes, cfg.Zones, cfg.MaxEndpointsPerSlice = 2, []string{"a", "b"}, 2
	ctx := context.Background()
	c := upLab(t, ctx, cfg)
	const namespace = "shapes"

	// The zonal app comes first, while the binder spreads its pods evenly over both nodes: the
	// kube-proxy of a zone without endpoints would ignore the hints and use all of them.
	zonal := &scenario.App{Client: c.Client, Namespace: namespace, Name: "zonal", Replicas: 4, TrafficDistribution: corev1.ServiceTrafficDistributionPreferSameZone}
	t.Run("PreferSameZone: slices carry zone hints and each node's rules hold only its zone's endpoints", func(t *testing.T) {
		if err := zonal.Apply(ctx, scenario.Behaviour{}); err != nil {
			t.Fatal(err)
		}
		if err := zonal.WaitSettled(ctx, time.Minute); err != nil {
			t.Fatal(err)
		}
		zoneOf := map[string]string{}
		for _, n := range c.Nodes {
			zoneOf[n.Name] = n.Zone
		}
		ss, err := scenario.WaitSlices(ctx, c.Client, namespace, zonal.Name, 10*time.Second, func(ss []discoveryv1.EndpointSlice) error {
			n := 0
			for _, s := range ss {
				for _, ep := range s.Endpoints {
					n++
					want := zoneOf[*ep.NodeName]
					if ep.Zone == nil || *ep.Zone != want || ep.Hints == nil || len(ep.Hints.ForZones) != 1 || ep.Hints.ForZones[0].Name != want {
						return fmt.Errorf("endpoint %s on %s: zone %v, hints %+v; want zone and hint %q", ep.Addresses[0], *ep.NodeName, ep.Zone, ep.Hints, want)
					}
				}
			}
			if n != int(zonal.Replicas) {
				return fmt.Errorf("%d endpoints, want %d", n, zonal.Replicas)
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		byZone := map[string][]string{}
		for _, s := range ss {
			for _, ep := range s.Endpoints {
				byZone[ep.Hints.ForZones[0].Name] = append(byZone[ep.Hints.ForZones[0].Name], ep.Addresses[0]+":8080")
			}
		}
		for _, n := range c.Nodes {
			want := byZone[n.Zone]
			sort.Strings(want)
			err := scenario.Poll(ctx, 10*time.Second, n.Name+"'s rules", func() error {
				if got := listedEndpoints(t, n.NS, "nftables", namespace+"/"+zonal.Name); !slices.Equal(got, want) {
					return fmt.Errorf("%s (zone %s) has rules for %q, want its zone's %q", n.Name, n.Zone, got, want)
				}
				return nil
			})
			if err != nil {
				t.Error(err)
			} else {
				t.Logf("%s (zone %s): kube-proxy's rules hold %q, hints say zone %s has %q", n.Name, n.Zone, want, n.Zone, want)
			}
		}
	})

	t.Run("with max-endpoints-per-slice 2, four endpoints overflow into two slices", func(t *testing.T) {
		ss, err := scenario.WaitSlices(ctx, c.Client, namespace, zonal.Name, 10*time.Second, func(ss []discoveryv1.EndpointSlice) error {
			for _, s := range ss {
				if len(s.Endpoints) > 2 {
					return fmt.Errorf("slice %s has %d endpoints", s.Name, len(s.Endpoints))
				}
			}
			if len(ss) < 2 {
				return fmt.Errorf("%d slices", len(ss))
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		for _, s := range ss {
			t.Logf("slice %s: %d endpoints", s.Name, len(s.Endpoints))
		}
	})

	t.Run("a pod with a readiness probe is unready until the probe, sent from its node, succeeds", func(t *testing.T) {
		probe := scenario.HTTPProbe(time.Second, 1)
		probe.InitialDelaySeconds = 2
		p, err := scenario.CreatePod(ctx, c.Client, scenario.Pod{Namespace: namespace, Name: "slow", Node: "node1", Probe: probe})
		if err != nil {
			t.Fatal(err)
		}
		running, err := scenario.WaitPodPhase(ctx, c.Client, namespace, p.Name, corev1.PodRunning, 30*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		if scenario.PodReady(running) {
			t.Errorf("ready as soon as running, within the probe's 2 s initial delay: %+v", running.Status.Conditions)
		}
		ready, err := scenario.WaitPodReady(ctx, c.Client, namespace, p.Name, true, 10*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		started := ready.Status.ContainerStatuses[0].State.Running.StartedAt.Time
		became := condition(ready, corev1.PodReady).LastTransitionTime.Time
		t.Logf("started %s, ready %s (initial delay 2 s; both in whole seconds)", started.Format(time.TimeOnly), became.Format(time.TimeOnly))
		if became.Sub(started) < time.Second {
			t.Errorf("ready %s after the start, before the 2 s initial delay", became.Sub(started))
		}
		out, err := ns.Command(c.Nodes[0].NS, "conntrack", "-L", "-p", "tcp", "-d", ready.Status.PodIP, "--dport", "8080").CombinedOutput()
		if err != nil {
			t.Fatalf("conntrack in %s: %v: %s", c.Nodes[0].NS, err, out)
		}
		if !strings.Contains(string(out), "src=169.254.1.1 dst="+ready.Status.PodIP) {
			t.Errorf("no probe connection from the node (169.254.1.1) in %s's conntrack table:\n%s", c.Nodes[0].Name, out)
		}
	})

	probed := &scenario.App{Client: c.Client, Namespace: namespace, Name: "probed", Replicas: 3, Probe: scenario.HTTPProbe(time.Second, 1)}
	t.Run("a terminating pod whose readiness probe fails turns its endpoint's serving false", func(t *testing.T) {
		if err := probed.Apply(ctx, scenario.Behaviour{Drain: 5 * time.Second, Unready: true}); err != nil {
			t.Fatal(err)
		}
		if err := probed.WaitSettled(ctx, time.Minute); err != nil {
			t.Fatal(err)
		}
		victim := anyPod(t, ctx, probed)
		deleted := time.Now()
		if err := c.Client.CoreV1().Pods(namespace).Delete(ctx, victim.Name, metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		var seen []string
		_, err := scenario.WaitSlices(ctx, c.Client, namespace, probed.Name, 10*time.Second, func(ss []discoveryv1.EndpointSlice) error {
			ep := findEndpoint(ss, string(victim.UID))
			if ep == nil {
				return fmt.Errorf("%s is not in the slices", victim.Name)
			}
			state := fmt.Sprintf("ready=%t serving=%t terminating=%t", *ep.Conditions.Ready, *ep.Conditions.Serving, *ep.Conditions.Terminating)
			if len(seen) == 0 || seen[len(seen)-1] != state {
				seen = append(seen, state)
			}
			if !*ep.Conditions.Terminating || *ep.Conditions.Serving {
				return fmt.Errorf("%s is %s", victim.Name, state)
			}
			return nil
		})
		t.Logf("%s's endpoint after its deletion: %s; %s after the delete", victim.Name, strings.Join(seen, " → "), time.Since(deleted).Round(time.Millisecond))
		if err != nil {
			t.Fatal(err)
		}
		p, err := c.Client.CoreV1().Pods(namespace).Get(ctx, victim.Name, metav1.GetOptions{})
		if err != nil {
			t.Fatalf("the pod is gone already, its 5 s drain not over: %v", err)
		}
		if scenario.PodReady(p) || p.Status.ContainerStatuses[0].State.Running == nil {
			t.Errorf("want a running, unready pod while it drains: ready %t, state %+v", scenario.PodReady(p), p.Status.ContainerStatuses[0].State)
		}
		if err := scenario.WaitPodGone(ctx, c.Client, namespace, victim.Name, 15*time.Second); err != nil {
			t.Error(err)
		}
	})

	var completedIP netip.Addr
	t.Run("a pod that exits 0 with restartPolicy Never succeeds, gives its address back and keeps it in its status", func(t *testing.T) {
		p, err := scenario.CreatePod(ctx, c.Client, scenario.Pod{Namespace: namespace, Name: "job", Node: "node1", RestartPolicy: corev1.RestartPolicyNever, ExitAfter: 2 * time.Second})
		if err != nil {
			t.Fatal(err)
		}
		done, err := scenario.WaitPodPhase(ctx, c.Client, namespace, p.Name, corev1.PodSucceeded, 30*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		cs := done.Status.ContainerStatuses[0]
		if cs.State.Terminated == nil || cs.State.Terminated.ExitCode != 0 || cs.State.Terminated.Reason != "Completed" || cs.Ready {
			t.Errorf("container status %+v; want terminated, exit code 0, Completed, not ready", cs)
		}
		if scenario.PodReady(done) {
			t.Error("a completed pod is ready")
		}
		ip, known := c.PodIP(p.UID)
		if !known || done.Status.PodIP != ip.String() {
			t.Errorf("status podIP %q, the kubelet gave %s", done.Status.PodIP, ip)
		}
		completedIP = ip
		if out, err := ns.Command(c.Nodes[0].NS, "ip", "route", "show", ip.String()).Output(); err != nil || len(out) > 0 {
			t.Errorf("node1 still routes %s to the completed pod (%v): %s", ip, err, out)
		}
		if err := c.Client.CoreV1().Pods(namespace).Delete(ctx, p.Name, metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		if err := scenario.WaitPodGone(ctx, c.Client, namespace, p.Name, 5*time.Second); err != nil {
			t.Error(err)
		}
	})

	t.Run("a pod that exits 3 fails; with restartPolicy OnFailure it is restarted", func(t *testing.T) {
		_, err := scenario.CreatePod(ctx, c.Client, scenario.Pod{Namespace: namespace, Name: "fails", RestartPolicy: corev1.RestartPolicyNever, ExitAfter: time.Second, ExitCode: 3})
		if err != nil {
			t.Fatal(err)
		}
		failed, err := scenario.WaitPodPhase(ctx, c.Client, namespace, "fails", corev1.PodFailed, 30*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		if term := failed.Status.ContainerStatuses[0].State.Terminated; term == nil || term.ExitCode != 3 || term.Reason != "Error" {
			t.Errorf("terminated state %+v, want exit code 3, Error", term)
		}
		_, err = scenario.CreatePod(ctx, c.Client, scenario.Pod{Namespace: namespace, Name: "retries", RestartPolicy: corev1.RestartPolicyOnFailure, ExitAfter: time.Second, ExitCode: 1})
		if err != nil {
			t.Fatal(err)
		}
		restarted, err := scenario.WaitPod(ctx, c.Client, namespace, "retries", 30*time.Second, func(p *corev1.Pod) error {
			if cs := p.Status.ContainerStatuses; len(cs) == 0 || cs[0].RestartCount < 1 || cs[0].LastTerminationState.Terminated == nil {
				return fmt.Errorf("not restarted yet: %+v", p.Status.ContainerStatuses)
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		if restarted.Status.Phase != corev1.PodRunning {
			t.Errorf("phase %s after a restart, want Running", restarted.Status.Phase)
		}
		for _, name := range []string{"fails", "retries"} {
			if err := c.Client.CoreV1().Pods(namespace).Delete(ctx, name, metav1.DeleteOptions{}); err != nil {
				t.Fatal(err)
			}
			if err := scenario.WaitPodGone(ctx, c.Client, namespace, name, 10*time.Second); err != nil {
				t.Error(err)
			}
		}
	})

	t.Run("a new pod takes over a completed pod's address on request; an address in use is refused with an event", func(t *testing.T) {
		if !completedIP.IsValid() {
			t.Skip("no completed pod's address")
		}
		p, err := scenario.CreatePod(ctx, c.Client, scenario.Pod{Namespace: namespace, Name: "heir", IP: completedIP})
		if err != nil {
			t.Fatal(err)
		}
		running, err := scenario.WaitPodPhase(ctx, c.Client, namespace, p.Name, corev1.PodRunning, 30*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		if running.Status.PodIP != completedIP.String() || running.Spec.NodeName != "node1" {
			t.Errorf("got %s on %s, want %s on node1", running.Status.PodIP, running.Spec.NodeName, completedIP)
		}
		q, err := scenario.CreatePod(ctx, c.Client, scenario.Pod{Namespace: namespace, Name: "usurper", IP: completedIP})
		if err != nil {
			t.Fatal(err)
		}
		err = scenario.Poll(ctx, 10*time.Second, "the event", func() error {
			evs, err := c.Client.CoreV1().Events(namespace).List(ctx, metav1.ListOptions{FieldSelector: fields.OneTermEqualSelector("involvedObject.uid", string(q.UID)).String()})
			if err != nil {
				return err
			}
			for _, ev := range evs.Items {
				if ev.Reason == "FailedCreatePodSandBox" && strings.Contains(ev.Message, "in use") {
					t.Logf("event: %s: %s", ev.Reason, ev.Message)
					return nil
				}
			}
			return fmt.Errorf("no FailedCreatePodSandBox event among %d", len(evs.Items))
		})
		if err != nil {
			t.Error(err)
		}
		for _, name := range []string{"heir", "usurper"} {
			if err := c.Client.CoreV1().Pods(namespace).Delete(ctx, name, metav1.DeleteOptions{}); err != nil {
				t.Fatal(err)
			}
		}
	})

	t.Run("a paused kube-proxy keeps its rules until it is resumed", func(t *testing.T) {
		service := namespace + "/" + probed.Name
		node2 := c.Nodes[1]
		victim := anyPod(t, ctx, probed)
		addr := victim.Status.PodIP + ":8080"
		err := scenario.Poll(ctx, 10*time.Second, "node2's rules", func() error {
			if !slices.Contains(listedEndpoints(t, node2.NS, "nftables", service), addr) {
				return fmt.Errorf("node2's rules do not send to %s yet", addr)
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		if err := c.PauseKubeProxy(node2.Name); err != nil {
			t.Fatal(err)
		}
		if err := c.Client.CoreV1().Pods(namespace).Delete(ctx, victim.Name, metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		err = scenario.Poll(ctx, 10*time.Second, "node1's rules", func() error {
			if slices.Contains(listedEndpoints(t, c.Nodes[0].NS, "nftables", service), addr) {
				return fmt.Errorf("node1's rules still send to %s", addr)
			}
			return nil
		})
		if err != nil {
			t.Error(err)
		}
		// kube-proxy syncs at most once a second: two seconds after node1 dropped the endpoint, a
		// running kube-proxy on node2 would have too.
		stuck := time.Now().Add(2 * time.Second)
		for time.Now().Before(stuck) {
			if !slices.Contains(listedEndpoints(t, node2.NS, "nftables", service), addr) {
				t.Fatalf("node2's paused kube-proxy dropped %s", addr)
			}
			time.Sleep(100 * time.Millisecond)
		}
		if err := c.ResumeKubeProxy(node2.Name); err != nil {
			t.Fatal(err)
		}
		resumed := time.Now()
		err = scenario.Poll(ctx, 10*time.Second, "node2's rules", func() error {
			if slices.Contains(listedEndpoints(t, node2.NS, "nftables", service), addr) {
				return fmt.Errorf("node2's rules still send to %s", addr)
			}
			return nil
		})
		if err != nil {
			t.Error(err)
		}
		t.Logf("node2's kube-proxy dropped %s %s after it was resumed", addr, time.Since(resumed).Round(time.Millisecond))
	})
}

// anyPod waits until app has settled and returns one of its pods.
func anyPod(t *testing.T, ctx context.Context, app *scenario.App) corev1.Pod {
	t.Helper()
	if err := app.WaitSettled(ctx, time.Minute); err != nil {
		t.Fatal(err)
	}
	pods, err := app.Pods(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range pods {
		return p
	}
	t.Fatalf("%s/%s has no pod", app.Namespace, app.Name)
	return corev1.Pod{}
}

func condition(p *corev1.Pod, t corev1.PodConditionType) corev1.PodCondition {
	for _, c := range p.Status.Conditions {
		if c.Type == t {
			return c
		}
	}
	return corev1.PodCondition{}
}

func findEndpoint(ss []discoveryv1.EndpointSlice, uid string) *discoveryv1.Endpoint {
	for _, s := range ss {
		for i, ep := range s.Endpoints {
			if ep.TargetRef != nil && string(ep.TargetRef.UID) == uid {
				return &s.Endpoints[i]
			}
		}
	}
	return nil
}
