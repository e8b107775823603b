package e2e

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/utils/ptr"

	"github.com/endpointlag/endpointlag/lab/cluster"
	"github.com/endpointlag/endpointlag/lab/report"
	"github.com/endpointlag/endpointlag/lab/scenario"
)

// TestFaults restarts, in the middle of rollouts under load, the API server, one node's daemon
// (SIGTERM, then SIGKILL) and one node's kube-proxy, on a lab of two nodes (kube-proxy nftables),
// and checks after each that every pod the rollout replaced has a complete record on every node,
// that what was first seen on a relist or at a daemon's start is marked so and kept out of the
// lag histograms (each histogram counts exactly the stages the records give a lag), and that
// nothing was dropped.
func TestFaults(t *testing.T) {
	cfg := config(t)
	cfg.Nodes, cfg.ProxyMode = 2, "nftables"
	// Small budgets, for the made-up slices.
	cfg.DaemonArgs = []string{"--record.max-untrusted=20", "--record.max-per-namespace=30"}
	ctx := context.Background()
	c := upLab(t, ctx, cfg)
	app := &scenario.App{Client: c.Client, Namespace: "faults", Name: "web", Replicas: 4}
	// A preStop keeps the old pods terminating while the fault happens.
	bh := scenario.Behaviour{PreStop: 3 * time.Second}
	if err := app.Apply(ctx, bh); err != nil {
		t.Fatal(err)
	}
	if err := app.WaitSettled(ctx, 2*time.Minute); err != nil {
		t.Fatal(err)
	}
	ls := scenario.LoadSettings{Rate: 50, Timeout: 2 * time.Second}
	rollout := func(t *testing.T, during func(context.Context) error) *scenario.Rollout {
		t.Helper()
		r, err := scenario.RunRolloutWith(ctx, c, app, t.Name(), bh, ls, testWriter{t}, during)
		if err != nil {
			t.Fatal(err)
		}
		if len(r.Deleted) != int(app.Replicas) {
			t.Fatalf("%d pods replaced, want %d", len(r.Deleted), app.Replicas)
		}
		return r
	}
	// afterFirstDeletion waits until the rollout has deleted a pod, so that the fault hits
	// terminations in flight.
	afterFirstDeletion := func(before map[types.UID]bool) error {
		return waitUntil(ctx, time.Minute, "the rollout's first deletion", func() bool {
			pods, err := app.Pods(ctx)
			if err != nil {
				return false
			}
			for uid, p := range pods {
				if before[uid] && p.DeletionTimestamp != nil {
					return true
				}
			}
			return false
		})
	}
	current := func(t *testing.T) map[types.UID]bool {
		pods, err := app.Pods(ctx)
		if err != nil {
			t.Fatal(err)
		}
		out := map[types.UID]bool{}
		for uid := range pods {
			out[uid] = true
		}
		return out
	}

	t.Run("API server restarted mid-rollout: every termination recorded, relists marked and not sampled", func(t *testing.T) {
		before := current(t)
		relistsBefore := relistCounts(t, c)
		r := rollout(t, func(ctx context.Context) error {
			if err := afterFirstDeletion(before); err != nil {
				return err
			}
			return c.RestartAPIServer(ctx, 5*time.Second)
		})
		complete(t, c, r)
		consistent(t, c)
		relists := relistCounts(t, c)
		for _, n := range c.Nodes {
			t.Logf("%s: %d stages first seen on a relist (%d before)", n.Name, relists[n.Name], relistsBefore[n.Name])
		}
	})

	for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGKILL} {
		t.Run(fmt.Sprintf("node2's daemon restarted with %s mid-rollout: re-attached, nothing left behind, in-flight terminations marked initial", sig), func(t *testing.T) {
			progs := endpointlagPrograms(t)
			before := current(t)
			var restarted time.Time
			r := rollout(t, func(ctx context.Context) error {
				if err := afterFirstDeletion(before); err != nil {
					return err
				}
				restarted = time.Now()
				return c.RestartDaemon(ctx, "node2", sig, 2*time.Minute)
			})
			if got := endpointlagPrograms(t); got != progs {
				t.Errorf("%d eBPF programs of endpointlag loaded after the restart, %d before: the killed daemon's are left behind or the new one did not attach", got, progs)
			}
			recs := complete(t, c, r)
			consistent(t, c)
			initial := 0
			for _, rec := range recs["node2"] {
				for _, s := range rec.Stages {
					if s.Initial {
						initial++
						if s.Time.Before(restarted) {
							t.Errorf("node2: %s's %s stage marked initial at %s, before the restart at %s", rec.Pod.Name, s.Stage, s.Time, restarted)
						}
					}
				}
			}
			t.Logf("node2: %d stages of in-flight terminations marked initial", initial)
			if initial == 0 {
				t.Error("node2's restarted daemon marked no stage initial, though the rollout's deletions were in flight")
			}
		})
	}

	t.Run("made-up EndpointSlices fill only their budgets; real terminations are still recorded", func(t *testing.T) {
		// 40 made-up terminating endpoints in a slice no trusted controller manages, and 40 in
		// one that claims to be the endpointslice controller's, each in a namespace of its own.
		for _, f := range []struct{ namespace, manager string }{{"forged-a", "someone"}, {"forged-b", "endpointslice-controller.k8s.io"}} {
			if err := scenario.EnsureNamespace(ctx, c.Client, f.namespace); err != nil {
				t.Fatal(err)
			}
			s := forgedSlice(f.namespace, f.manager, 40)
			if _, err := c.Client.DiscoveryV1().EndpointSlices(f.namespace).Create(ctx, s, metav1.CreateOptions{}); err != nil {
				t.Fatal(err)
			}
		}
		for _, n := range c.Nodes {
			want := map[string]float64{"untrusted": 20, "namespace": 10}
			if err := waitUntil(ctx, 30*time.Second, n.Name+"'s drops of made-up records", func() bool {
				for reason, v := range want {
					if metricSum(t, n.DaemonURL, "endpointlag_records_dropped_total", "reason", reason) != v {
						return false
					}
				}
				return true
			}); err != nil {
				t.Errorf("%s: %v: dropped untrusted %v (want 20 of 40, --record.max-untrusted=20), namespace %v (want 10 of 40, --record.max-per-namespace=30)", n.Name, err,
					metricSum(t, n.DaemonURL, "endpointlag_records_dropped_total", "reason", "untrusted"),
					metricSum(t, n.DaemonURL, "endpointlag_records_dropped_total", "reason", "namespace"))
			}
			if got := metricValue(t, n.DaemonURL, "endpointlag_untrusted_records"); got != 20 {
				t.Errorf("%s: %v untrusted records held, want 20", n.Name, got)
			}
		}
		before := current(t)
		r := rollout(t, func(ctx context.Context) error { return afterFirstDeletion(before) })
		complete(t, c, r)
		consistent(t, c)
	})

	t.Run("node1's kube-proxy restarted mid-rollout: every removal recorded", func(t *testing.T) {
		before := current(t)
		r := rollout(t, func(ctx context.Context) error {
			if err := afterFirstDeletion(before); err != nil {
				return err
			}
			return c.RestartKubeProxy(ctx, "node1")
		})
		complete(t, c, r)
		consistent(t, c)
	})
}

// waitUntil polls cond every 50 ms until it holds or timeout passes.
func waitUntil(ctx context.Context, timeout time.Duration, what string, cond func() bool) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	for !cond() {
		select {
		case <-ctx.Done():
			return fmt.Errorf("waiting for %s: %w", what, ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
	return nil
}

// complete waits until every daemon has a record of each replaced pod with nothing pending, its
// slice stages and the nftables stage, and returns each node's records of them.
func complete(t *testing.T, c *cluster.Cluster, r *scenario.Rollout) map[string][]report.Record {
	t.Helper()
	out := map[string][]report.Record{}
	var problems []string
	err := waitUntil(context.Background(), time.Minute, "complete records", func() bool {
		problems = problems[:0]
		for _, n := range c.Nodes {
			recs, err := c.Records(context.Background(), n)
			if err != nil {
				problems = append(problems, fmt.Sprintf("%s: %v", n.Name, err))
				continue
			}
			var kept []report.Record
			for _, rec := range recs.Records {
				if _, ok := r.Deleted[types.UID(rec.Pod.UID)]; ok {
					kept = append(kept, rec)
				}
			}
			out[n.Name] = kept
			for uid, p := range r.Deleted {
				rec := findRecord(recs, string(uid))
				switch {
				case rec == nil:
					problems = append(problems, fmt.Sprintf("%s: no record of %s", n.Name, p.Name))
				case len(rec.Pending) > 0:
					problems = append(problems, fmt.Sprintf("%s: %s still pending at %v", n.Name, p.Name, rec.Pending))
				default:
					for _, stage := range []string{"endpointslice", "endpointslice_removed", "nftables"} {
						// A daemon that started while the endpoint was terminating already
						// finds it gone from the rules if kube-proxy was quicker: then the
						// stage is not applicable there, not missing.
						if !slicesContainsStage(rec.Stages, stage) && !(stage == "nftables" && startedTerminating(rec) && slices.Contains(rec.NotApplicable, stage)) {
							problems = append(problems, fmt.Sprintf("%s: %s has no %s stage", n.Name, p.Name, stage))
						}
					}
				}
			}
		}
		return len(problems) == 0
	})
	if err != nil {
		t.Fatalf("%v:\n%s", err, strings.Join(problems, "\n"))
	}
	return out
}

// startedTerminating tells a record whose endpoint was terminating when the daemon started.
func startedTerminating(rec *report.Record) bool {
	for _, s := range rec.Stages {
		if s.Stage == "endpointslice" && s.Initial {
			return true
		}
	}
	return false
}

func slicesContainsStage(stages []report.StageEntry, stage string) bool {
	for _, s := range stages {
		if s.Stage == stage {
			return true
		}
	}
	return false
}

// consistent checks each daemon's metrics against all its records: nothing dropped, every stage
// with a programming lag counted once in endpointlag_programming_seconds, and every stage first
// seen on a relist counted in endpointlag_unsampled_total{reason="relist"} and given no lag.
func consistent(t *testing.T, c *cluster.Cluster) {
	t.Helper()
	for _, n := range c.Nodes {
		recs, err := c.Records(context.Background(), n)
		if err != nil {
			t.Fatal(err)
		}
		var programming, relist int
		podStages := map[string]bool{}
		for _, rec := range recs.Records {
			for _, s := range rec.Stages {
				if s.Programming != nil {
					programming++
				}
				if s.Relist {
					// A pod's deletion and removal show in each of its records, and count once.
					if s.Stage == "deleted" || s.Stage == "gone" {
						if podStages[rec.Pod.UID+s.Stage] {
							continue
						}
						podStages[rec.Pod.UID+s.Stage] = true
					}
					relist++
					if s.Programming != nil || s.Propagation != nil {
						t.Errorf("%s: %s's %s stage was first seen on a relist but has a lag", n.Name, rec.Pod.Name, s.Stage)
					}
				}
			}
		}
		if got := metricSum(t, n.DaemonURL, "endpointlag_programming_seconds_count"); int(got) != programming {
			t.Errorf("%s: endpointlag_programming_seconds counts %v samples, its records have %d stages with a programming lag", n.Name, got, programming)
		}
		if got := metricSum(t, n.DaemonURL, "endpointlag_unsampled_total", "reason", "relist"); int(got) != relist {
			t.Errorf("%s: endpointlag_unsampled_total{reason=\"relist\"} is %v, its records have %d stages first seen on a relist", n.Name, got, relist)
		}
		if got := metricSum(t, n.DaemonURL, "endpointlag_records_dropped_total", "reason", "max"); got != 0 {
			t.Errorf("%s: %v records dropped at --record.max", n.Name, got)
		}
		if got := metricValue(t, n.DaemonURL, "endpointlag_probe_up", "probe", "kube"); got != 1 {
			t.Errorf("%s: the kube probe is not up (%v)", n.Name, got)
		}
		if resp, err := http.Get(n.DaemonURL + "/readyz"); err != nil || resp.StatusCode != http.StatusOK {
			t.Errorf("%s: not ready: %v %v", n.Name, resp, err)
		} else {
			resp.Body.Close()
		}
	}
}

// relistCounts is each daemon's endpointlag_unsampled_total{reason="relist"}.
func relistCounts(t *testing.T, c *cluster.Cluster) map[string]int {
	out := map[string]int{}
	for _, n := range c.Nodes {
		out[n.Name] = int(metricSum(t, n.DaemonURL, "endpointlag_unsampled_total", "reason", "relist"))
	}
	return out
}

// endpointlagPrograms counts the eBPF programs loaded in the kernel that carry the names of the
// packets probe's programs.
func endpointlagPrograms(t *testing.T) int {
	t.Helper()
	names := map[string]bool{"to_pod": true, "from_pod": true, "uplink_in": true, "uplink_out": true}
	n := 0
	for id := ebpf.ProgramID(0); ; {
		next, err := ebpf.ProgramGetNextID(id)
		if errors.Is(err, os.ErrNotExist) {
			return n
		}
		if err != nil {
			t.Fatal(err)
		}
		id = next
		p, err := ebpf.NewProgramFromID(id)
		if err != nil {
			continue // unloaded since
		}
		if info, err := p.Info(); err == nil && names[info.Name] {
			n++
		}
		p.Close()
	}
}

// forgedSlice lists n made-up pods, terminating, on no node of the lab, as managed by manager.
func forgedSlice(namespace, manager string, n int) *discoveryv1.EndpointSlice {
	s := &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{Namespace: namespace, Name: "made-up", Labels: map[string]string{
			discoveryv1.LabelServiceName: "made-up", discoveryv1.LabelManagedBy: manager}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: ptr.To("http"), Port: ptr.To[int32](80), Protocol: ptr.To(corev1.ProtocolTCP)}},
	}
	for i := range n {
		name := fmt.Sprintf("made-up-%d", i)
		s.Endpoints = append(s.Endpoints, discoveryv1.Endpoint{
			Addresses:  []string{fmt.Sprintf("100.127.%d.%d", i/250, i%250+1)},
			Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(false), Serving: ptr.To(true), Terminating: ptr.To(true)},
			NodeName:   ptr.To("elsewhere"),
			TargetRef:  &corev1.ObjectReference{Kind: "Pod", Namespace: namespace, Name: name, UID: types.UID(namespace + "-" + name)},
		})
	}
	return s
}
