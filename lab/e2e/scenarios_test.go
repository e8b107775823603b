package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"math"
	"net/netip"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/endpointlag/endpointlag/lab/cluster"
	"github.com/endpointlag/endpointlag/lab/load"
	"github.com/endpointlag/endpointlag/lab/report"
	"github.com/endpointlag/endpointlag/lab/scenario"
)

// shapes runs the cluster shapes where a naive measurement goes wrong, on a running lab of two
// nodes in zones a and b whose EndpointSlices hold at most 5 endpoints, and checks each daemon
// against the test's own ground truth: its nft monitor (what each node's rules send to, after
// each generation) and its own slice watch.
type shapes struct {
	ctx      context.Context
	c        *cluster.Cluster
	mode     string
	monitors map[string]*ruleMonitor
	slices   *sliceTruth
}

const shapesNS = "shapes"

func runShapes(t *testing.T, ctx context.Context, c *cluster.Cluster, mode string) {
	s := &shapes{ctx: ctx, c: c, mode: mode, monitors: map[string]*ruleMonitor{}}
	for _, n := range c.Nodes {
		m, err := startRuleMonitor(c.Tool(), n.NS, mode)
		if err != nil {
			t.Fatal(err)
		}
		defer m.stop(t)
		s.monitors[n.Name] = m
	}
	var err error
	if s.slices, err = watchSlices(ctx, c, shapesNS); err != nil {
		t.Fatal(err)
	}
	defer s.slices.stop()

	t.Run("internalTrafficPolicy Local: a pod's endpoint is awaited on its own node only", s.nodeLocal)
	t.Run("trafficDistribution PreferSameZone: awaited only where the zone's rules held it", s.zonal)
	t.Run("a pod deleted before it was ever ready is awaited nowhere", s.neverReady)
	t.Run("one replica: kube-proxy's fallback to the serving pod is held, not lag, and the kubelet's probes are no clients", s.fallback)
	t.Run("more endpoints than fit one slice, scaled down: every removal on time, none early", s.scaleDown)
	t.Run("a completed pod's address taken over by a new pod: its traffic is counted for nobody", s.reusedAddress)
	t.Run("a stuck kube-proxy is the only thing that makes oldest_pending grow", s.stuckKubeProxy)
}

// service creates a ClusterIP Service selecting app=name.
func (s *shapes) service(t *testing.T, name string, spec func(*corev1.ServiceSpec)) target {
	t.Helper()
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: shapesNS, Name: name},
		Spec: corev1.ServiceSpec{
			Selector: map[string]string{"app": name},
			Ports:    []corev1.ServicePort{{Name: "http", Port: 80, TargetPort: intstr.FromInt32(8080), Protocol: corev1.ProtocolTCP}},
		},
	}
	if spec != nil {
		spec(&svc.Spec)
	}
	if _, err := s.c.Client.CoreV1().Namespaces().Create(s.ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: shapesNS}}, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatal(err)
	}
	created, err := s.c.Client.CoreV1().Services(shapesNS).Create(s.ctx, svc, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return target{vip: created.Spec.ClusterIP, vipPort: 80}
}

// pod creates a pod of app on node and waits until it runs (and, with a probe, until ready).
func (s *shapes) pod(t *testing.T, name, app, node string, probe *corev1.Probe, ready bool) corev1.Pod {
	t.Helper()
	if _, err := scenario.CreatePod(s.ctx, s.c.Client, scenario.Pod{Namespace: shapesNS, Name: name, Labels: map[string]string{"app": app}, Node: node, Probe: probe}); err != nil {
		t.Fatal(err)
	}
	p, err := scenario.WaitPodPhase(s.ctx, s.c.Client, shapesNS, name, corev1.PodRunning, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	if ready {
		if p, err = scenario.WaitPodReady(s.ctx, s.c.Client, shapesNS, name, true, time.Minute); err != nil {
			t.Fatal(err)
		}
	}
	return *p
}

func (s *shapes) node(t *testing.T, name string) *cluster.Node {
	n, err := s.c.Node(name)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// appTarget is an app's Service port as the rules know it.
func (s *shapes) appTarget(t *testing.T, app *scenario.App) target {
	t.Helper()
	vip, err := app.ClusterIP(s.ctx)
	if err != nil {
		t.Fatal(err)
	}
	host, port, _ := strings.Cut(vip, ":")
	p, err := strconv.Atoi(port)
	if err != nil {
		t.Fatal(err)
	}
	return target{vip: host, vipPort: p}
}

// at is t with p's endpoint.
func at(t target, p corev1.Pod) target {
	t.endpoint = p.Status.PodIP + ":8080"
	return t
}

// waitReached waits until each node's rules reach exactly the pods want says for it.
func (s *shapes) waitReached(t *testing.T, svc target, pods []corev1.Pod, want func(node string, p corev1.Pod) bool) {
	t.Helper()
	for _, n := range s.c.Nodes {
		err := scenario.Poll(s.ctx, 20*time.Second, n.Name+"'s rules", func() error {
			for _, p := range pods {
				if got, w := s.monitors[n.Name].reaches(at(svc, p)), want(n.Name, p); got != w {
					return fmt.Errorf("%s's rules reach %s (%s on %s): %t, want %t", n.Name, p.Name, p.Status.PodIP, p.Spec.NodeName, got, w)
				}
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
}

// record waits until node's daemon has a record of uid that cond accepts, and returns it; nil,
// with the test failed, when none comes.
func (s *shapes) record(t *testing.T, n *cluster.Node, uid string, cond func(*report.Record) error) *report.Record {
	t.Helper()
	var got *report.Record
	err := scenario.Poll(s.ctx, 15*time.Second, n.Name+"'s record", func() error {
		recs, err := report.Fetch(s.ctx, n.DaemonURL)
		if err != nil {
			return err
		}
		if got = findRecord(recs, uid); got == nil {
			return fmt.Errorf("no record of %s", uid)
		}
		return cond(got)
	})
	if err != nil {
		t.Error(err)
		return nil
	}
	return got
}

func (s *shapes) delete(t *testing.T, p corev1.Pod) time.Time {
	t.Helper()
	issued := time.Now()
	if err := s.c.Client.CoreV1().Pods(shapesNS).Delete(s.ctx, p.Name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	return issued
}

// checkDeletion checks every node's record of a deleted pod: on the nodes whose rules sent to
// it when its deletion was issued, the dataplane stage came within 20 ms of the rule change the
// test's monitor saw; elsewhere it is not applicable, never pending.
func (s *shapes) checkDeletion(t *testing.T, svc target, p corev1.Pod, issued time.Time) (applied []string) {
	t.Helper()
	for _, n := range s.c.Nodes {
		m := s.monitors[n.Name]
		// The oracle first: kube-proxy syncs at most once a second.
		var (
			changed       time.Time
			reached, done bool
		)
		_ = scenario.Poll(s.ctx, 10*time.Second, "the rule change", func() error {
			if changed, reached, done = m.removedAt(at(svc, p), issued); reached && !done {
				return fmt.Errorf("%s still sends to %s", n.Name, p.Name)
			}
			return nil
		})
		if reached && !done {
			t.Errorf("%s's rules never stopped sending to %s", n.Name, p.Name)
			continue
		}
		r := s.record(t, n, string(p.UID), func(r *report.Record) error {
			if r.Stage("endpointslice") == nil {
				return fmt.Errorf("no endpointslice stage yet")
			}
			if reached && r.StagePath(s.mode, "cluster") == nil {
				return fmt.Errorf("no %s stage yet (pending %v)", s.mode, r.Pending)
			}
			return nil
		})
		if r == nil {
			continue
		}
		if !reached {
			if !slices.Contains(r.NotApplicable, s.mode) || slices.Contains(r.Pending, s.mode) {
				t.Errorf("%s never sent to %s, yet its daemon says: not applicable %v, pending %v", n.Name, p.Name, r.NotApplicable, r.Pending)
			}
			continue
		}
		applied = append(applied, n.Name)
		d := r.StagePath(s.mode, "cluster")
		if diff := d.Time.Sub(changed); math.Abs(diff.Seconds()) > 0.020 {
			t.Errorf("%s on %s: %s stage at %s, the rules changed at %s: off by %.1f ms (limit 20 ms)",
				p.Name, n.Name, s.mode, d.Time.Format("15:04:05.000"), changed.Format("15:04:05.000"), diff.Seconds()*1000)
		} else {
			t.Logf("%s on %s: %s stage %+.1f ms from the rule change", p.Name, n.Name, s.mode, diff.Seconds()*1000)
		}
	}
	return applied
}

func (s *shapes) nodeLocal(t *testing.T) {
	svc := s.service(t, "local", func(spec *corev1.ServiceSpec) {
		spec.InternalTrafficPolicy = ptrTo(corev1.ServiceInternalTrafficPolicyLocal)
	})
	var pods []corev1.Pod
	for i, node := range []string{"node1", "node2", "node1"} {
		pods = append(pods, s.pod(t, fmt.Sprintf("local-%d", i+1), "local", node, nil, false))
	}
	s.waitReached(t, svc, pods, func(node string, p corev1.Pod) bool { return p.Spec.NodeName == node })
	victim := pods[0] // node1 keeps local-3: no node-local fallback
	applied := s.checkDeletion(t, svc, victim, s.delete(t, victim))
	if !slices.Equal(applied, []string{"node1"}) {
		t.Errorf("the stage applied on %v, want node1 only", applied)
	}
}

func (s *shapes) zonal(t *testing.T) {
	svc := s.service(t, "zonal", func(spec *corev1.ServiceSpec) {
		spec.TrafficDistribution = ptrTo(corev1.ServiceTrafficDistributionPreferSameZone)
	})
	var pods []corev1.Pod
	for i, node := range []string{"node1", "node2", "node1", "node2"} {
		pods = append(pods, s.pod(t, fmt.Sprintf("zonal-%d", i+1), "zonal", node, nil, false))
	}
	zone := map[string]string{}
	for _, n := range s.c.Nodes {
		zone[n.Name] = n.Zone
	}
	s.waitReached(t, svc, pods, func(node string, p corev1.Pod) bool { return zone[node] == zone[p.Spec.NodeName] })
	victim := pods[0] // zone a keeps zonal-3, so node1's rules stay with their zone
	applied := s.checkDeletion(t, svc, victim, s.delete(t, victim))
	if !slices.Equal(applied, []string{"node1"}) {
		t.Errorf("the stage applied on %v, want node1, zone a's", applied)
	}
}

func (s *shapes) neverReady(t *testing.T) {
	svc := s.service(t, "never", nil)
	probe := &corev1.Probe{ProbeHandler: corev1.ProbeHandler{TCPSocket: &corev1.TCPSocketAction{Port: intstr.FromInt32(9)}}, PeriodSeconds: 1}
	p := s.pod(t, "never-1", "never", "node2", probe, false)
	if _, err := scenario.WaitSlices(s.ctx, s.c.Client, shapesNS, "never", 20*time.Second, func(ss []discoveryv1.EndpointSlice) error {
		if ep := findEndpoint(ss, string(p.UID)); ep == nil || ep.Conditions.Ready == nil || *ep.Conditions.Ready {
			return fmt.Errorf("the slice does not list %s as not ready", p.Name)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if applied := s.checkDeletion(t, svc, p, s.delete(t, p)); len(applied) != 0 {
		t.Errorf("the stage applied on %v for a pod never ready", applied)
	}
}

func (s *shapes) fallback(t *testing.T) {
	app := &scenario.App{Client: s.c.Client, Namespace: shapesNS, Name: "solo", Replicas: 1, Probe: scenario.HTTPProbe(time.Second, 1)}
	if err := app.Apply(s.ctx, scenario.Behaviour{PreStop: 2 * time.Second}); err != nil {
		t.Fatal(err)
	}
	if err := app.WaitSettled(s.ctx, time.Minute); err != nil {
		t.Fatal(err)
	}
	victim := anyPod(t, s.ctx, app)
	svc := s.appTarget(t, app)
	s.waitReached(t, svc, []corev1.Pod{victim}, func(string, corev1.Pod) bool { return true })
	before := map[string]float64{}
	for _, n := range s.c.Nodes {
		before[n.Name] = metricValue(t, n.DaemonURL, "endpointlag_unsampled_total", "stage", s.mode, "path", "cluster", "reason", "fallback")
	}
	s.delete(t, victim)
	for _, n := range s.c.Nodes {
		r := s.record(t, n, string(victim.UID), func(r *report.Record) error {
			if r.StagePath(s.mode, "cluster") == nil {
				return fmt.Errorf("no %s stage yet (held %v, pending %v)", s.mode, r.Held, r.Pending)
			}
			return nil
		})
		if r == nil {
			continue
		}
		d := r.StagePath(s.mode, "cluster")
		if !r.Serving || !r.Fallback.Cluster || !d.Fallback || d.Programming != nil {
			t.Errorf("%s: the only replica's removal: serving %t, fallback %+v, stage %+v; want serving, held, a fallback removal without a lag", n.Name, r.Serving, r.Fallback, d)
		}
		if r.Stage("fallback_ended") == nil {
			t.Errorf("%s: no fallback_ended stage: %+v", n.Name, r.Stages)
		}
		if got := metricValue(t, n.DaemonURL, "endpointlag_unsampled_total", "stage", s.mode, "path", "cluster", "reason", "fallback"); got != before[n.Name]+1 {
			t.Errorf("%s: unsampled_total{reason=fallback} went from %g to %g, want one more", n.Name, before[n.Name], got)
		}
	}
	// During its preStop the kubelet went on probing the pod's readiness from its node: those
	// connections are listed as the node's, not as clients'.
	home := s.node(t, victim.Spec.NodeName)
	r := s.record(t, home, string(victim.UID), func(r *report.Record) error {
		for _, cn := range r.Connections {
			if cn.Node {
				return nil
			}
		}
		return fmt.Errorf("no connection from the node among %d", len(r.Connections))
	})
	if r == nil {
		return
	}
	for _, cn := range r.Connections {
		if ap, err := netip.ParseAddrPort(cn.Client); err == nil && isNodeAddr(home, ap.Addr()) && !cn.Node {
			t.Errorf("a connection from the node's own address %s counted as a client's", cn.Client)
		}
	}
	if got := metricValue(t, home.DaemonURL, "endpointlag_late_connections_total", "protocol", "tcp", "origin", "node"); got == 0 {
		t.Error("no late connection counted with origin=node")
	}
}

// isNodeAddr tells the node's own addresses in the lab: its underlay address and the address the
// host side of every pod veth carries.
func isNodeAddr(n *cluster.Node, a netip.Addr) bool {
	return a == n.Addr || a == netip.MustParseAddr("169.254.1.1")
}

func (s *shapes) scaleDown(t *testing.T) {
	// A preStop keeps the endpoints terminating for five seconds, so that every node sees them so
	// (an endpoint that leaves its slice without a terminating phase is measured on its pod's node
	// only). Not one: with three slices to rewrite, the endpointslice controller often finds its
	// slice cache out of date and retries after one second, then two, and an endpoint whose pod
	// is gone by then leaves its slice without ever being written as terminating (CI saw this).
	behaviour := scenario.Behaviour{PreStop: 5 * time.Second}
	app := &scenario.App{Client: s.c.Client, Namespace: shapesNS, Name: "many", Replicas: 12}
	if err := app.Apply(s.ctx, behaviour); err != nil {
		t.Fatal(err)
	}
	if err := app.WaitSettled(s.ctx, 2*time.Minute); err != nil {
		t.Fatal(err)
	}
	ss, err := scenario.WaitSlices(s.ctx, s.c.Client, shapesNS, app.Name, 20*time.Second, func(ss []discoveryv1.EndpointSlice) error {
		if len(ss) < 3 {
			return fmt.Errorf("%d slices", len(ss))
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%d endpoints in %d slices", app.Replicas, len(ss))
	pods, err := app.Pods(s.ctx)
	if err != nil {
		t.Fatal(err)
	}
	svc := s.appTarget(t, app)
	var all []corev1.Pod
	for _, p := range pods {
		all = append(all, p)
	}
	s.waitReached(t, svc, all, func(string, corev1.Pod) bool { return true })
	issued := time.Now()
	app.Replicas = 3
	if err := app.Apply(s.ctx, behaviour); err != nil {
		t.Fatal(err)
	}
	if err := app.WaitSettled(s.ctx, 2*time.Minute); err != nil {
		t.Fatal(err)
	}
	kept, err := app.Pods(s.ctx)
	if err != nil {
		t.Fatal(err)
	}
	var diffs []float64
	for uid, p := range pods {
		if _, ok := kept[uid]; ok {
			continue
		}
		if !s.slices.sawTerminating(string(uid)) {
			t.Errorf("the test's watch never saw %s terminating", p.Name)
			continue
		}
		s.checkDeletion(t, svc, p, issued)
		// Left every slice in the slice change the test's own watch says, not at a move between
		// slices: the same write of the endpointslice controller, named by its resourceVersion.
		var left leave
		if err := scenario.Poll(s.ctx, 10*time.Second, p.Name+" to leave its slices", func() error {
			var ok bool
			if left, ok = s.slices.leftAt(string(uid)); !ok {
				return fmt.Errorf("the test's watch has not seen it leave")
			}
			return nil
		}); err != nil {
			t.Error(err)
			continue
		}
		for _, n := range s.c.Nodes {
			r := s.record(t, n, string(uid), func(r *report.Record) error {
				if r.Stage("endpointslice_removed") == nil {
					return fmt.Errorf("no endpointslice_removed stage yet")
				}
				return nil
			})
			if r == nil {
				continue
			}
			removed := r.Stage("endpointslice_removed")
			diffs = append(diffs, removed.Time.Sub(left.at).Seconds())
			if removed.Slice != left.change {
				t.Errorf("%s on %s: endpointslice_removed at %s in slice change %s, the test's watch saw it leave every slice at %s in %s",
					p.Name, n.Name, removed.Time.Format("15:04:05.000"), removed.Slice, left.at.Format("15:04:05.000"), left.change)
			}
		}
	}
	// Two processes' watches of the same write: on a loaded machine the API server's fan-out to
	// its watchers can spread by more than 100 ms, so the times are shown, not compared.
	t.Logf("endpointslice_removed − the test's own watch of the same slice change, %d (pod, node) pairs: %s", len(diffs), distribution(diffs))
}

func (s *shapes) reusedAddress(t *testing.T) {
	job, err := scenario.CreatePod(s.ctx, s.c.Client, scenario.Pod{Namespace: shapesNS, Name: "job", Node: "node1", RestartPolicy: corev1.RestartPolicyNever, ExitAfter: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	done, err := scenario.WaitPodPhase(s.ctx, s.c.Client, shapesNS, job.Name, corev1.PodSucceeded, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	addr := netip.MustParseAddr(done.Status.PodIP)
	if _, err := scenario.CreatePod(s.ctx, s.c.Client, scenario.Pod{Namespace: shapesNS, Name: "heir", Labels: map[string]string{"app": "heir"}, Node: "node1", IP: addr}); err != nil {
		t.Fatal(err)
	}
	if _, err := scenario.WaitPodPhase(s.ctx, s.c.Client, shapesNS, "heir", corev1.PodRunning, time.Minute); err != nil {
		t.Fatal(err)
	}
	node1 := s.node(t, "node1")
	counted := func() float64 {
		return metricSum(t, node1.DaemonURL, "endpointlag_late_connections_total", "protocol", "tcp") +
			metricSum(t, node1.DaemonURL, "endpointlag_dead_endpoint_connections_total", "protocol", "tcp")
	}
	before := counted()
	s.delete(t, *done)
	if err := scenario.WaitPodGone(s.ctx, s.c.Client, shapesNS, job.Name, time.Minute); err != nil {
		t.Fatal(err)
	}
	target := netip.AddrPortFrom(addr, 8080).String()
	rs, err := load.Run(s.ctx, load.Config{NS: s.c.ClientNS(), Targets: []load.Target{{Path: load.PathClusterIP, Addr: target}}, Rate: 50, Duration: time.Second, Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	ok := 0
	for _, r := range rs {
		if r.Failure == "" && r.Backend == "heir" {
			ok++
		}
	}
	if ok == 0 {
		t.Fatalf("none of %d requests to %s reached the pod that holds it now", len(rs), target)
	}
	if after := counted(); after != before {
		t.Errorf("%d requests to the live pod at %s, the completed pod's old address: node1 counted %g late or dead connections", ok, target, after-before)
	} else {
		t.Logf("%d requests reached the new holder of %s; no connection counted", ok, target)
	}
}

func (s *shapes) stuckKubeProxy(t *testing.T) {
	local := target{}
	svcLocal, err := s.c.Client.CoreV1().Services(shapesNS).Get(s.ctx, "local", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	local.vip, local.vipPort = svcLocal.Spec.ClusterIP, 80
	app := &scenario.App{Client: s.c.Client, Namespace: shapesNS, Name: "steady", Replicas: 3}
	if err := app.Apply(s.ctx, scenario.Behaviour{}); err != nil {
		t.Fatal(err)
	}
	victim := anyPod(t, s.ctx, app)
	steady := s.appTarget(t, app)
	s.waitReached(t, steady, []corev1.Pod{victim}, func(string, corev1.Pod) bool { return true })
	localPod := s.pod(t, "local-4", "local", "node1", nil, false)
	s.waitReached(t, local, []corev1.Pod{localPod}, func(node string, _ corev1.Pod) bool { return node == "node1" })

	stuck := s.node(t, "node2")
	if err := s.c.PauseKubeProxy(stuck.Name); err != nil {
		t.Fatal(err)
	}
	resumed := false
	defer func() {
		if !resumed {
			_ = s.c.ResumeKubeProxy(stuck.Name)
		}
	}()
	s.delete(t, victim)
	s.delete(t, localPod)
	time.Sleep(4 * time.Second)
	for _, n := range s.c.Nodes {
		oldest := metricValue(t, n.DaemonURL, "endpointlag_oldest_pending_seconds", "stage", s.mode)
		pending := metricValue(t, n.DaemonURL, "endpointlag_pending_endpoints", "stage", s.mode)
		switch {
		case n == stuck && (oldest < 3 || pending != 1):
			t.Errorf("%s, kube-proxy stopped: oldest pending %.1f s, %g pending; want ≥ 3 s, 1 (the steady pod, not the node-local one)", n.Name, oldest, pending)
		case n != stuck && (oldest != 0 || pending != 0):
			t.Errorf("%s: oldest pending %.1f s, %g pending; want 0", n.Name, oldest, pending)
		default:
			t.Logf("%s: oldest pending at %s %.1f s, %g pending", n.Name, s.mode, oldest, pending)
		}
	}
	if err := s.c.ResumeKubeProxy(stuck.Name); err != nil {
		t.Fatal(err)
	}
	resumed = true
	r := s.record(t, stuck, string(victim.UID), func(r *report.Record) error {
		if r.StagePath(s.mode, "cluster") == nil {
			return fmt.Errorf("no %s stage yet", s.mode)
		}
		return nil
	})
	if r == nil {
		return
	}
	if d := r.StagePath(s.mode, "cluster"); d.Programming == nil || *d.Programming < 3 {
		t.Errorf("the stuck node's lag: %+v, want a programming value of 3 s or more", d)
	} else {
		t.Logf("the stuck node's programming lag after SIGCONT: %.3f s", *d.Programming)
	}
	if err := scenario.Poll(s.ctx, 10*time.Second, "no pending endpoint", func() error {
		if got := metricValue(t, stuck.DaemonURL, "endpointlag_pending_endpoints", "stage", s.mode); got != 0 {
			return fmt.Errorf("%g pending", got)
		}
		return nil
	}); err != nil {
		t.Error(err)
	}
}

func ptrTo[T any](v T) *T { return &v }

// sliceTruth is the test's own watch of a namespace's EndpointSlices: when each pod's endpoint
// last left every slice of its Service.
type sliceTruth struct {
	mu sync.Mutex
	// byS holds each slice's pod UIDs per Service; left when each UID last left them all.
	byS  map[string]map[string]map[string]bool
	left map[string]leave
	// terminating is when the watch first saw each UID's endpoint terminating.
	terminating map[string]time.Time
	stop        func()
}

// watchSlices starts `lab watch-slices` for the namespace and follows what it prints: a process of
// its own, as the daemons are, so that the test process's load (its kubelet stand-ins tearing pods
// down) does not delay the ground truth.
func watchSlices(ctx context.Context, c *cluster.Cluster, namespace string) (*sliceTruth, error) {
	st := &sliceTruth{byS: map[string]map[string]map[string]bool{}, left: map[string]leave{}, terminating: map[string]time.Time{}}
	cmd := exec.CommandContext(ctx, c.Tool(), "watch-slices", "--kubeconfig="+c.Kubeconfig, "--namespace="+namespace)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	synced := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		sc := bufio.NewScanner(stdout)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		first := true
		for sc.Scan() {
			var ev sliceEvent
			if err := json.Unmarshal(sc.Bytes(), &ev); err != nil {
				continue
			}
			if ev.Slice == "" {
				if first {
					first = false
					close(synced)
				}
				continue
			}
			st.note(ev)
		}
	}()
	st.stop = func() {
		stdin.Close() // it stops when its stdin closes
		<-done
		_ = cmd.Wait()
	}
	select {
	case <-synced:
		return st, nil
	case <-done:
		_ = cmd.Wait()
		return nil, fmt.Errorf("lab watch-slices ended before its initial list")
	case <-time.After(30 * time.Second):
		st.stop()
		return nil, fmt.Errorf("lab watch-slices: no initial list in 30s")
	}
}

// sliceEvent is one line of `lab watch-slices`.
type sliceEvent struct {
	At          time.Time `json:"at"`
	Service     string    `json:"service"`
	Slice       string    `json:"slice"`
	Change      string    `json:"change"`
	Deleted     bool      `json:"deleted"`
	Pods        []string  `json:"pods"`
	Terminating []string  `json:"terminating"`
}

func (st *sliceTruth) note(ev sliceEvent) {
	st.mu.Lock()
	defer st.mu.Unlock()
	before := st.present(ev.Service)
	if st.byS[ev.Service] == nil {
		st.byS[ev.Service] = map[string]map[string]bool{}
	}
	uids := map[string]bool{}
	for _, uid := range ev.Pods {
		uids[uid] = true
	}
	for _, uid := range ev.Terminating {
		if _, seen := st.terminating[uid]; !seen {
			st.terminating[uid] = ev.At
		}
	}
	st.byS[ev.Service][ev.Slice] = uids
	after := st.present(ev.Service)
	for uid := range before {
		if !after[uid] {
			st.left[uid] = leave{ev.At, ev.Change}
		}
	}
	for uid := range after {
		delete(st.left, uid)
	}
}

func (st *sliceTruth) present(svc string) map[string]bool {
	out := map[string]bool{}
	for _, uids := range st.byS[svc] {
		for uid := range uids {
			out[uid] = true
		}
	}
	return out
}

func (st *sliceTruth) sawTerminating(uid string) bool {
	_, ok := st.terminatingAt(uid)
	return ok
}

// terminatingAt is when the watch first saw uid's endpoint terminating.
func (st *sliceTruth) terminatingAt(uid string) (time.Time, bool) {
	st.mu.Lock()
	defer st.mu.Unlock()
	t, ok := st.terminating[uid]
	return t, ok
}

// leave is when the test's watch saw a pod's endpoint leave every slice of its Service, and in
// which slice change.
type leave struct {
	at     time.Time
	change string
}

func (st *sliceTruth) leftAt(uid string) (leave, bool) {
	st.mu.Lock()
	defer st.mu.Unlock()
	t, ok := st.left[uid]
	return t, ok
}

// metricValue scrapes a daemon's /metrics and returns the value of the first series of name whose
// labels include the given pairs (0 when there is none).
func metricValue(t testing.TB, base, name string, labels ...string) float64 {
	t.Helper()
	vs := metricValues(t, base, name, labels...)
	if len(vs) == 0 {
		return 0
	}
	return vs[0]
}

// metricSum is the sum over every series of name whose labels include the given pairs.
func metricSum(t testing.TB, base, name string, labels ...string) float64 {
	t.Helper()
	return seriesSum(t, metricsText(t, base), name, labels...)
}

// seriesSum is metricSum over /metrics text already read.
func seriesSum(t testing.TB, text, name string, labels ...string) float64 {
	t.Helper()
	var sum float64
	for _, v := range seriesValues(t, text, name, labels...) {
		sum += v
	}
	return sum
}

func metricValues(t testing.TB, base, name string, labels ...string) []float64 {
	t.Helper()
	return seriesValues(t, metricsText(t, base), name, labels...)
}

// seriesValues are the values in /metrics text of every series of name whose labels include the
// given pairs.
func seriesValues(t testing.TB, text, name string, labels ...string) []float64 {
	t.Helper()
	var out []float64
	for _, line := range strings.Split(text, "\n") {
		if !strings.HasPrefix(line, name+"{") && !strings.HasPrefix(line, name+" ") {
			continue
		}
		match := true
		for i := 0; i+1 < len(labels); i += 2 {
			match = match && strings.Contains(line, fmt.Sprintf("%s=%q", labels[i], labels[i+1]))
		}
		if !match {
			continue
		}
		f := strings.Fields(line)
		v, err := strconv.ParseFloat(f[len(f)-1], 64)
		if err != nil {
			t.Fatalf("%s: %v", line, err)
		}
		out = append(out, v)
	}
	return out
}
