package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	authorizationv1 "k8s.io/api/authorization/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/utils/ptr"

	"github.com/endpointlag/endpointlag/lab/cluster"
	"github.com/endpointlag/endpointlag/lab/scenario"
)

const (
	chartDir      = "../../deploy/helm/endpointlag"
	kustomizeBase = "../../deploy/base"
	installNS     = "endpointlag"
	// The ServiceAccount the chart binds to its metrics reader by default (kube-prometheus's).
	promNS, promSA = "monitoring", "prometheus-k8s"
)

// TestInstall installs endpointlag as a user does — the Prometheus Operator's CRDs, then the Helm
// chart with every toggle on — and the lab's kubelets run the DaemonSet's pods with the
// ServiceAccount, RBAC and capabilities the chart gives them; the app behind Traefik and HAProxy
// under load, a real Prometheus scraping the daemons and evaluating the chart's alerting rules.
// It skips, saying why, without helm ($LAB_HELM), the CRDs ($LAB_PROMETHEUS_CRDS; `make e2e`
// provides both), the ingress proxies or Debian's prometheus.
func TestInstall(t *testing.T) {
	cfg := config(t)
	helm, crdDir := os.Getenv("LAB_HELM"), os.Getenv("LAB_PROMETHEUS_CRDS")
	if _, err := os.Stat(helm); err != nil {
		t.Skipf("no helm (LAB_HELM=%q): run `make e2e`, which builds it", helm)
	}
	if _, err := os.Stat(crdDir); err != nil {
		t.Skipf("no Prometheus Operator CRDs (LAB_PROMETHEUS_CRDS=%q): run `make e2e`, which fetches them", crdDir)
	}
	if cfg.Traefik == "" || cfg.HAProxy == "" {
		t.Skipf("the ingress proxies' binaries are missing (LAB_TRAEFIK=%q, built by make lab-bins; haproxy %q, Debian's package, installed by make deps)",
			os.Getenv("LAB_TRAEFIK"), cfg.HAProxy)
	}
	promBin, err := exec.LookPath("prometheus")
	if err != nil {
		t.Skip("no prometheus: install Debian's package prometheus (make deps does)")
	}
	cfg.Install, cfg.ProxyMode = true, "nftables"
	ctx, cancel := context.WithTimeout(context.Background(), 12*time.Minute)
	defer cancel()
	c := upLab(t, ctx, cfg)
	rc, err := clientcmd.BuildConfigFromFlags("", c.Kubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	ap, err := scenario.NewApplier(rc)
	if err != nil {
		t.Fatal(err)
	}
	var crds []*unstructured.Unstructured
	files, _ := filepath.Glob(filepath.Join(crdDir, "*.yaml"))
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		objs, err := scenario.Decode(b)
		if err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		crds = append(crds, objs...)
	}
	if len(crds) == 0 {
		t.Fatalf("no CRD in %s", crdDir)
	}
	if err := ap.Apply(ctx, crds, false); err != nil {
		t.Fatal(err)
	}
	if err := ap.WaitCRDs(ctx, crds, time.Minute); err != nil {
		t.Fatal(err)
	}
	render := func(set ...string) []*unstructured.Unstructured {
		t.Helper()
		set = append([]string{"namespace.create=true", "serviceMonitor.enabled=true", "podMonitor.enabled=true", "prometheusRule.enabled=true",
			"dashboards.enabled=true", "packets.uplinks={eth0}", "log.level=debug"}, set...)
		rendered, err := scenario.HelmTemplate(ctx, helm, chartDir, "endpointlag", installNS, set...)
		if err != nil {
			t.Fatal(err)
		}
		objs, err := scenario.Decode(rendered)
		if err != nil {
			t.Fatal(err)
		}
		return objs
	}
	chart := render()
	kustomized, err := scenario.Kustomize(kustomizeBase)
	if err != nil {
		t.Fatal(err)
	}
	base, err := scenario.Decode(kustomized)
	if err != nil {
		t.Fatal(err)
	}

	t.Run("the chart and the kustomize base pass the API server's checks in a server-side dry run", func(t *testing.T) {
		// A dry run stores nothing, so the objects of a namespace it would create would be
		// refused: the namespace goes first, for real, as `kubectl apply` of a Namespace would.
		var namespaces []*unstructured.Unstructured
		for _, o := range append(append([]*unstructured.Unstructured{}, chart...), base...) {
			if o.GetKind() == "Namespace" {
				namespaces = append(namespaces, o)
			}
		}
		if len(namespaces) == 0 {
			t.Error("neither the chart (namespace.create=true) nor the kustomize base creates the namespace")
		}
		if err := ap.Apply(ctx, namespaces, false); err != nil {
			t.Fatal(err)
		}
		for name, objs := range map[string][]*unstructured.Unstructured{"helm template": chart, "kubectl kustomize deploy/base": base} {
			if err := ap.Apply(ctx, objs, true); err != nil {
				t.Errorf("%s: %v", name, err)
			} else {
				t.Logf("%s: %d objects accepted: %s", name, len(objs), kinds(objs))
			}
		}
	})

	// The daemons run on the nodes' network, where the lab has no cluster DNS: as a user whose
	// nodes cannot resolve Service names does, they are given the aggregator Service's ClusterIP.
	var aggSvc []*unstructured.Unstructured
	for _, o := range chart {
		if o.GetKind() == "Service" && strings.HasSuffix(o.GetName(), "-aggregate") {
			aggSvc = append(aggSvc, o)
		}
	}
	if len(aggSvc) != 1 {
		t.Fatalf("the chart renders %d aggregator Services, want 1", len(aggSvc))
	}
	if err := ap.Apply(ctx, aggSvc, false); err != nil {
		t.Fatal(err)
	}
	svc, err := c.Client.CoreV1().Services(installNS).Get(ctx, aggSvc[0].GetName(), metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	chart = render(fmt.Sprintf("aggregator.url=https://%s:%d", svc.Spec.ClusterIP, svc.Spec.Ports[0].Port))
	if err := ap.Apply(ctx, chart, false); err != nil {
		t.Fatal(err)
	}
	ds := daemonSetOf(t, chart)
	if err := scenario.Poll(ctx, 2*time.Minute, "the DaemonSet's pods to be ready on every node", func() error {
		got, err := c.Client.AppsV1().DaemonSets(installNS).Get(ctx, ds, metav1.GetOptions{})
		if err != nil {
			return err
		}
		if s := got.Status; s.ObservedGeneration != got.Generation || s.DesiredNumberScheduled != int32(len(c.Nodes)) ||
			s.NumberReady != s.DesiredNumberScheduled || s.UpdatedNumberScheduled != s.DesiredNumberScheduled {
			return fmt.Errorf("desired %d, ready %d, updated %d (of %d nodes)", s.DesiredNumberScheduled, s.NumberReady, s.UpdatedNumberScheduled, len(c.Nodes))
		}
		return nil
	}); err != nil {
		logPodLogs(t, c, installNS)
		t.Fatal(err)
	}
	pods, err := c.Client.CoreV1().Pods(installNS).List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	daemonSA := daemonServiceAccount(t, c, ds)
	promToken := serviceAccountToken(t, ctx, c.Client, promNS, promSA)
	inspector := serviceAccountToken(t, ctx, c.Client, "default", "inspector")
	bindClusterRole(t, ctx, c.Client, "inspector", "endpointlag-api-reader", "default", "inspector")
	nobody := serviceAccountToken(t, ctx, c.Client, "default", "nobody")

	t.Run("the daemon serves TLS and lets in only who RBAC allows: anonymous 401, a token without the role 403, Prometheus's token 200", func(t *testing.T) {
		for _, n := range c.Nodes {
			for _, tc := range []struct {
				what, path, token string
				want              int
			}{
				{"anonymous", "/metrics", "", http.StatusUnauthorized},
				{"a ServiceAccount without the metrics reader role", "/metrics", nobody, http.StatusForbidden},
				{"Prometheus's ServiceAccount", "/metrics", promToken, http.StatusOK},
				{"Prometheus's ServiceAccount, for the records (not granted)", "/api/v1/records", promToken, http.StatusForbidden},
				{"the api-reader role", "/api/v1/records", inspector, http.StatusOK},
				{"the kubelet's probe, anonymous", "/readyz", "", http.StatusOK},
			} {
				if got := status(t, ctx, n.DaemonURL+tc.path, tc.token); got != tc.want {
					t.Errorf("%s: GET %s as %s: %d, want %d", n.Name, tc.path, tc.what, got, tc.want)
				}
			}
			if !strings.HasPrefix(n.DaemonURL, "https://") {
				t.Errorf("%s: the daemon is reached at %s, not over TLS", n.Name, n.DaemonURL)
			}
		}
	})

	t.Run("the daemon holds exactly the RBAC it needs: it may read pods and EndpointSlices and delegate authentication, nothing more", func(t *testing.T) {
		for _, tc := range []struct {
			group, resource, verb string
			want                  bool
		}{
			{"", "pods", "watch", true},
			{"discovery.k8s.io", "endpointslices", "list", true},
			{"authentication.k8s.io", "tokenreviews", "create", true},
			{"authorization.k8s.io", "subjectaccessreviews", "create", true},
			{"", "secrets", "get", false},
			{"", "pods", "delete", false},
			{"", "nodes", "list", false},
			{"discovery.k8s.io", "endpointslices", "update", false},
			{"apps", "daemonsets", "patch", false},
		} {
			sar := &authorizationv1.SubjectAccessReview{Spec: authorizationv1.SubjectAccessReviewSpec{
				User:               "system:serviceaccount:" + installNS + ":" + daemonSA,
				Groups:             []string{"system:serviceaccounts", "system:serviceaccounts:" + installNS, "system:authenticated"},
				ResourceAttributes: &authorizationv1.ResourceAttributes{Group: tc.group, Resource: tc.resource, Verb: tc.verb},
			}}
			got, err := c.Client.AuthorizationV1().SubjectAccessReviews().Create(ctx, sar, metav1.CreateOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if got.Status.Allowed != tc.want {
				t.Errorf("%s may %s %s.%s: %t, want %t", daemonSA, tc.verb, tc.resource, tc.group, got.Status.Allowed, tc.want)
			}
		}
	})

	c.SetDaemonToken(inspector)
	app := &scenario.App{Client: c.Client, Namespace: "inst", Name: "web", Replicas: 4}
	// The pods a rollout replaces terminate as they were made: the sized ones first.
	sizedBehaviour := scenario.Behaviour{PreStop: 4 * time.Second, Drain: 2 * time.Second}
	if err := app.Apply(ctx, sizedBehaviour); err != nil {
		t.Fatal(err)
	}
	if err := app.WaitSettled(ctx, 2*time.Minute); err != nil {
		t.Fatal(err)
	}
	if _, err := scenario.DeployIngress(ctx, c, app, scenario.IngressOptions{}); err != nil {
		t.Fatal(err)
	}
	// Prometheus scrapes from here on, evaluating the chart's alerting rules with every `for:` at
	// 5 s (the thresholds are the users'; promtool's unit tests check the real durations).
	promURL, err := c.StartPrometheus(ctx, cluster.PrometheusConfig{
		Binary: promBin, Token: promToken, Jobs: scrapeJobs(t, ctx, c),
		RuleFiles: []string{shortenedRules(t)}, ScrapeInterval: 2 * time.Second, EvaluationInterval: time.Second,
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := scenario.Poll(ctx, time.Minute, "every daemon and the aggregator to be scraped", func() error {
		res, err := promQuery(ctx, promURL, `up == 1`)
		if err != nil {
			return err
		}
		if len(res) != len(c.Nodes)+1 {
			return fmt.Errorf("%d of %d targets up", len(res), len(c.Nodes)+1)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	load := scenario.LoadSettings{Rate: 100, Timeout: 2 * time.Second}

	t.Run("a rollout with a sized preStop and a drain fails no request and fires no alert", func(t *testing.T) {
		sized, err := scenario.RunRollout(ctx, c, app, "sized", sizedBehaviour, load, testWriter{t})
		if err != nil {
			t.Fatal(err)
		}
		if sized.Summary.Failed > 0 {
			t.Errorf("%d of %d requests failed %v", sized.Summary.Failed, sized.Summary.Requests, sized.Summary.ByKind)
		}
		// Past every shortened `for:` and a few evaluations.
		time.Sleep(15 * time.Second)
		firing, err := alerts(ctx, promURL)
		if err != nil {
			t.Fatal(err)
		}
		for _, a := range firing {
			t.Errorf("alert firing: %v", a)
		}
	})

	if err := app.Apply(ctx, scenario.Behaviour{}); err != nil {
		t.Fatal(err)
	}
	if err := app.WaitSettled(ctx, 2*time.Minute); err != nil {
		t.Fatal(err)
	}
	r, err := scenario.RunRollout(ctx, c, app, "rollout", scenario.Behaviour{}, load, testWriter{t})
	if err != nil {
		t.Fatal(err)
	}

	t.Run("with only that RBAC and those capabilities, every daemon records every replaced pod's slice, dataplane and ingress stages", func(t *testing.T) {
		for _, recs := range r.Records {
			for uid, p := range r.Deleted {
				rec := findRecord(recs, string(uid))
				switch {
				case rec == nil:
					t.Errorf("%s's daemon has no record of %s", recs.Node, p.Name)
				case rec.Stage("endpointslice") == nil || rec.Stage(cfg.ProxyMode) == nil:
					t.Errorf("%s's daemon recorded %s's stages %v, want endpointslice and %s", recs.Node, p.Name, stageNames(rec), cfg.ProxyMode)
				}
			}
		}
		ingress := 0
		for _, recs := range r.Records {
			for _, rec := range recs.Records {
				if rec.Stage("ingress") != nil {
					ingress++
				}
			}
		}
		if ingress == 0 {
			t.Error("no daemon recorded an ingress stage from Traefik or HAProxy")
		}
		if s := r.Connections(); s.Dead+s.Late == 0 {
			t.Errorf("a rollout without preStop under load, and no late or dead connection recorded: the packets probe did not run (%s)", s)
		}
		for _, p := range pods.Items {
			logs := c.PodLogs(p.Name)
			if len(logs) == 0 {
				t.Errorf("no log of %s", p.Name)
			}
			for _, l := range logs {
				b, err := os.ReadFile(l)
				if err != nil {
					t.Error(err)
					continue
				}
				// The API server's word for a request RBAC refused, and the kernel's for a
				// missing capability (the daemon's own 403s to the test's callers are not it).
				for _, line := range strings.Split(string(b), "\n") {
					if strings.Contains(line, "is forbidden") || strings.Contains(line, "operation not permitted") {
						t.Errorf("%s: %s", filepath.Base(l), line)
					}
				}
			}
		}
	})

	t.Run("the rollout without preStop fires EndpointlagNewConnectionsToGonePods", func(t *testing.T) {
		if err := scenario.Poll(ctx, time.Minute, "the alert", func() error {
			firing, err := alerts(ctx, promURL)
			if err != nil {
				return err
			}
			for _, a := range firing {
				if a["alertname"] == "EndpointlagNewConnectionsToGonePods" {
					t.Logf("firing: %v", a)
					return nil
				}
			}
			return fmt.Errorf("firing: %v", firing)
		}); err != nil {
			t.Error(err)
		}
	})

	t.Run("every dashboard panel's query returns data from that Prometheus", func(t *testing.T) {
		// The aggregator's figures for the last rollout (its shortfall, say) come after the
		// daemons' alert: a push once the records settle, then a scrape. The queries that have no
		// data yet are asked again until they have, for up to a minute.
		queries := dashboardQueries(t)
		n := len(queries)
		var empty []string
		start := time.Now()
		for deadline := start.Add(time.Minute); ; time.Sleep(2 * time.Second) {
			var left []panelQuery
			empty = empty[:0]
			for _, q := range queries {
				res, err := promQuery(ctx, promURL, q.expr)
				switch {
				case err != nil:
					t.Errorf("%s / %s: %v\n%s", q.dashboard, q.panel, err, q.expr)
				case len(res) == 0:
					left = append(left, q)
					empty = append(empty, q.dashboard+" / "+q.panel+": "+q.expr)
				}
			}
			if queries = left; len(left) == 0 || t.Failed() || time.Now().After(deadline) {
				break
			}
		}
		t.Logf("%d panel queries run, %d returned no data (%s after the first ask)", n, len(empty), time.Since(start).Round(time.Second))
		for _, e := range empty {
			t.Errorf("no data: %s", e)
		}
	})

	t.Run("a SIGSTOPped kube-proxy fires EndpointlagDataplaneProgrammingStuck for its node only", func(t *testing.T) {
		stuck := c.Nodes[len(c.Nodes)-1].Name
		if err := c.PauseKubeProxy(stuck); err != nil {
			t.Fatal(err)
		}
		defer func() {
			if err := c.ResumeKubeProxy(stuck); err != nil {
				t.Error(err)
			}
		}()
		pods, err := app.Pods(ctx)
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range pods {
			if err := c.Client.CoreV1().Pods(app.Namespace).Delete(ctx, p.Name, metav1.DeleteOptions{}); err != nil {
				t.Fatal(err)
			}
			break
		}
		// The threshold is the users' 30 s of oldest pending, then the shortened `for:`.
		if err := scenario.Poll(ctx, 90*time.Second, "the alert on "+stuck, func() error {
			firing, err := alerts(ctx, promURL)
			if err != nil {
				return err
			}
			var nodes []string
			for _, a := range firing {
				if a["alertname"] == "EndpointlagDataplaneProgrammingStuck" {
					nodes = append(nodes, a["node"])
				}
			}
			if len(nodes) == 0 {
				return fmt.Errorf("not firing")
			}
			if len(nodes) != 1 || nodes[0] != stuck {
				t.Errorf("EndpointlagDataplaneProgrammingStuck fires for %v, want %s only", nodes, stuck)
			}
			return nil
		}); err != nil {
			t.Error(err)
		}
	})
}

// alerts are the labels of the alerts Prometheus has firing.
func alerts(ctx context.Context, base string) ([]map[string]string, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, base+"/api/v1/alerts", nil)
	if err != nil {
		return nil, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	var r struct {
		Data struct {
			Alerts []struct {
				Labels map[string]string `json:"labels"`
				State  string            `json:"state"`
			} `json:"alerts"`
		} `json:"data"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&r); err != nil {
		return nil, err
	}
	var out []map[string]string
	for _, a := range r.Data.Alerts {
		if a.State == "firing" {
			out = append(out, a.Labels)
		}
	}
	return out, nil
}

// scrapeJobs are the chart's pods as its PodMonitors select them, with the target labels their
// relabelings give: the daemons (job endpointlag, on their node's address) and the aggregator
// (job endpointlag-aggregate, its own labels kept).
func scrapeJobs(t *testing.T, ctx context.Context, c *cluster.Cluster) []cluster.ScrapeJob {
	t.Helper()
	jobs := []cluster.ScrapeJob{{Name: "endpointlag"}, {Name: "endpointlag-aggregate", HonorLabels: true}}
	for i, sel := range []string{"app.kubernetes.io/name=endpointlag", "app.kubernetes.io/name=endpointlag-aggregate"} {
		pods, err := c.Client.CoreV1().Pods(installNS).List(ctx, metav1.ListOptions{LabelSelector: sel})
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range pods.Items {
			if p.DeletionTimestamp != nil || p.Status.PodIP == "" || len(p.Spec.Containers) == 0 || len(p.Spec.Containers[0].Ports) == 0 {
				continue
			}
			jobs[i].Targets = append(jobs[i].Targets, cluster.ScrapeTarget{
				Addr:   fmt.Sprintf("%s:%d", p.Status.PodIP, p.Spec.Containers[0].Ports[0].ContainerPort),
				Labels: map[string]string{"node": p.Spec.NodeName, "namespace": p.Namespace, "pod": p.Name},
			})
		}
		if len(jobs[i].Targets) == 0 {
			t.Fatalf("no pod %s to scrape", sel)
		}
	}
	return jobs
}

func kinds(objs []*unstructured.Unstructured) string {
	count := map[string]int{}
	var order []string
	for _, o := range objs {
		if count[o.GetKind()] == 0 {
			order = append(order, o.GetKind())
		}
		count[o.GetKind()]++
	}
	var out []string
	for _, k := range order {
		out = append(out, fmt.Sprintf("%d %s", count[k], k))
	}
	return strings.Join(out, ", ")
}

func daemonSetOf(t *testing.T, objs []*unstructured.Unstructured) string {
	t.Helper()
	for _, o := range objs {
		if o.GetKind() == "DaemonSet" {
			return o.GetName()
		}
	}
	t.Fatal("the chart renders no DaemonSet")
	return ""
}

func daemonServiceAccount(t *testing.T, c *cluster.Cluster, name string) string {
	t.Helper()
	ds, err := c.Client.AppsV1().DaemonSets(installNS).Get(context.Background(), name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return ds.Spec.Template.Spec.ServiceAccountName
}

// serviceAccountToken creates the ServiceAccount (and its namespace) if needed and returns a
// token of it.
func serviceAccountToken(t *testing.T, ctx context.Context, client kubernetes.Interface, ns, name string) string {
	t.Helper()
	if err := scenario.EnsureNamespace(ctx, client, ns); err != nil {
		t.Fatal(err)
	}
	sa := &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name}}
	if _, err := client.CoreV1().ServiceAccounts(ns).Create(ctx, sa, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatal(err)
	}
	tok, err := client.CoreV1().ServiceAccounts(ns).CreateToken(ctx, name, &authenticationv1.TokenRequest{
		Spec: authenticationv1.TokenRequestSpec{ExpirationSeconds: ptr.To(int64(3600))}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return tok.Status.Token
}

func bindClusterRole(t *testing.T, ctx context.Context, client kubernetes.Interface, name, role, ns, sa string) {
	t.Helper()
	b := &rbacv1.ClusterRoleBinding{ObjectMeta: metav1.ObjectMeta{Name: name},
		RoleRef:  rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: role},
		Subjects: []rbacv1.Subject{{Kind: rbacv1.ServiceAccountKind, Namespace: ns, Name: sa}}}
	if _, err := client.RbacV1().ClusterRoleBindings().Create(ctx, b, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
}

func status(t *testing.T, ctx context.Context, u, token string) int {
	t.Helper()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		t.Fatal(err)
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := cluster.DaemonClient.Do(req)
	if err != nil {
		t.Errorf("GET %s: %v", u, err)
		return 0
	}
	resp.Body.Close()
	return resp.StatusCode
}

func logPodLogs(t *testing.T, c *cluster.Cluster, ns string) {
	pods, err := c.Client.CoreV1().Pods(ns).List(context.Background(), metav1.ListOptions{})
	if err != nil {
		t.Log(err)
		return
	}
	for _, p := range pods.Items {
		for _, l := range c.PodLogs(p.Name) {
			b, _ := os.ReadFile(l)
			if len(b) > 3000 {
				b = b[len(b)-3000:]
			}
			t.Logf("pod %s on %q, phase %s; %s ends:\n%s", p.Name, p.Spec.NodeName, p.Status.Phase, filepath.Base(l), b)
		}
	}
}

var forLine = regexp.MustCompile(`(?m)^(\s+for:\s*)\S+\s*$`)

// shortenedRules writes the alerting rules with every `for:` at 5 s, for a lab run of minutes;
// the thresholds are the ones users get. (promtool's unit tests check the real durations.)
func shortenedRules(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile("../../deploy/rules/endpointlag.rules.yaml")
	if err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(t.TempDir(), "endpointlag.rules.yaml")
	if err := os.WriteFile(out, forLine.ReplaceAll(b, []byte("${1}5s")), 0o644); err != nil {
		t.Fatal(err)
	}
	return out
}

type panelQuery struct{ dashboard, panel, expr string }

// dashboardQueries are the queries of every panel of the committed dashboards, with the
// template variables as a user with "All" selected gets them and $__rate_interval at 4 scrape
// intervals, as Grafana computes it.
func dashboardQueries(t *testing.T) []panelQuery {
	t.Helper()
	files, _ := filepath.Glob("../../dashboards/*.json")
	if len(files) == 0 {
		t.Fatal("no dashboard in dashboards/")
	}
	vars := strings.NewReplacer("$__rate_interval", "8s", "$__interval", "2s", "${job}", ".+", "$job", ".+", "${cluster}", ".*", "$cluster", ".*",
		"${node}", ".+", "$node", ".+", "${stage}", ".+", "$stage", ".+")
	var out []panelQuery
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		var d struct {
			Panels []json.RawMessage `json:"panels"`
		}
		if err := json.Unmarshal(b, &d); err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		var walk func([]json.RawMessage)
		walk = func(raw []json.RawMessage) {
			for _, r := range raw {
				var p struct {
					Title   string            `json:"title"`
					Panels  []json.RawMessage `json:"panels"`
					Targets []struct {
						Expr string `json:"expr"`
					} `json:"targets"`
				}
				if err := json.Unmarshal(r, &p); err != nil {
					t.Fatalf("%s: %v", f, err)
				}
				walk(p.Panels)
				for _, tg := range p.Targets {
					if tg.Expr != "" {
						out = append(out, panelQuery{filepath.Base(f), p.Title, vars.Replace(tg.Expr)})
					}
				}
			}
		}
		walk(d.Panels)
	}
	return out
}

// promQuery runs an instant query and returns its series.
func promQuery(ctx context.Context, base, q string) ([]json.RawMessage, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, base+"/api/v1/query?query="+url.QueryEscape(q), nil)
	if err != nil {
		return nil, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, err
	}
	var r struct {
		Status string `json:"status"`
		Error  string `json:"error"`
		Data   struct {
			Result json.RawMessage `json:"result"`
		} `json:"data"`
	}
	if err := json.Unmarshal(body, &r); err != nil {
		return nil, fmt.Errorf("%s: %s", err, bytes.TrimSpace(body))
	}
	if r.Status != "success" {
		return nil, fmt.Errorf("%s", r.Error)
	}
	var series []json.RawMessage
	if err := json.Unmarshal(r.Data.Result, &series); err != nil {
		// A scalar or string result: one value.
		return []json.RawMessage{r.Data.Result}, nil
	}
	return series, nil
}
