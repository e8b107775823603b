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

	appsv1 "k8s.io/api/apps/v1"
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
// ServiceAccount, RBAC and capabilities the chart gives them. It skips, saying why, without
// helm ($LAB_HELM), the CRDs ($LAB_PROMETHEUS_CRDS; `make e2e` provides both) or Debian's
// prometheus.
func TestInstall(t *testing.T) {
	cfg := config(t)
	helm, crdDir := os.Getenv("LAB_HELM"), os.Getenv("LAB_PROMETHEUS_CRDS")
	if _, err := os.Stat(helm); err != nil {
		t.Skipf("no helm (LAB_HELM=%q): run `make e2e`, which builds it", helm)
	}
	if _, err := os.Stat(crdDir); err != nil {
		t.Skipf("no Prometheus Operator CRDs (LAB_PROMETHEUS_CRDS=%q): run `make e2e`, which fetches them", crdDir)
	}
	promBin, err := exec.LookPath("prometheus")
	if err != nil {
		t.Skip("no prometheus: install Debian's package prometheus (make deps does)")
	}
	cfg.Install = true
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
	rendered, err := scenario.HelmTemplate(ctx, helm, chartDir, "endpointlag", installNS,
		"namespace.create=true", "serviceMonitor.enabled=true", "podMonitor.enabled=true", "prometheusRule.enabled=true",
		"dashboards.enabled=true", "packets.uplinks={eth0}", "log.level=debug")
	if err != nil {
		t.Fatal(err)
	}
	chart, err := scenario.Decode(rendered)
	if err != nil {
		t.Fatal(err)
	}
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

	if err := ap.Apply(ctx, chart, false); err != nil {
		t.Fatal(err)
	}
	ds := daemonSetOf(t, chart)
	if err := scenario.Poll(ctx, 2*time.Minute, "the DaemonSet's pods to be ready on every node", func() error {
		got, err := c.Client.AppsV1().DaemonSets(installNS).Get(ctx, ds, metav1.GetOptions{})
		if err != nil {
			return err
		}
		if s := got.Status; s.DesiredNumberScheduled != int32(len(c.Nodes)) || s.NumberReady != s.DesiredNumberScheduled {
			return fmt.Errorf("desired %d, ready %d (of %d nodes)", s.DesiredNumberScheduled, s.NumberReady, len(c.Nodes))
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
	if err := app.Apply(ctx, scenario.Behaviour{}); err != nil {
		t.Fatal(err)
	}
	if err := app.WaitSettled(ctx, 2*time.Minute); err != nil {
		t.Fatal(err)
	}
	r, err := scenario.RunRollout(ctx, c, app, "rollout", scenario.Behaviour{}, scenario.LoadSettings{Rate: 100, Timeout: 2 * time.Second}, testWriter{t})
	if err != nil {
		t.Fatal(err)
	}

	t.Run("with only that RBAC and those capabilities, every daemon records every replaced pod's slice and dataplane stages", func(t *testing.T) {
		dataplane := cfg.ProxyMode
		for _, recs := range r.Records {
			for uid, p := range r.Deleted {
				rec := findRecord(recs, string(uid))
				switch {
				case rec == nil:
					t.Errorf("%s's daemon has no record of %s", recs.Node, p.Name)
				case rec.Stage("endpointslice") == nil || rec.Stage(dataplane) == nil:
					t.Errorf("%s's daemon recorded %s's stages %v, want endpointslice and %s", recs.Node, p.Name, stageNames(rec), dataplane)
				}
			}
		}
		if s := r.Connections(); s.Dead+s.Late == 0 {
			t.Errorf("a rollout without preStop under load, and no late or dead connection recorded: the packets probe did not run (%s)", s)
		}
		for _, p := range pods.Items {
			b, err := os.ReadFile(filepath.Join(c.StateDir(), "logs", "pod-"+p.Name+".log"))
			if err != nil {
				t.Error(err)
				continue
			}
			for _, line := range strings.Split(string(b), "\n") {
				if strings.Contains(line, "forbidden") || strings.Contains(line, "operation not permitted") {
					t.Errorf("%s: %s", p.Name, line)
				}
			}
		}
	})

	t.Run("a real Prometheus scrapes every daemon with its ServiceAccount's token, and every dashboard panel's query returns data", func(t *testing.T) {
		grantDiscovery(t, ctx, c.Client)
		rules := shortenedRules(t)
		promURL, err := c.StartPrometheus(ctx, cluster.PrometheusConfig{
			Binary: promBin, Token: promToken, Namespace: installNS, PodSelector: "app.kubernetes.io/name=endpointlag",
			Port: "metrics", RuleFiles: []string{rules}, ScrapeInterval: 2 * time.Second, EvaluationInterval: time.Second,
		})
		if err != nil {
			t.Fatal(err)
		}
		if err := scenario.Poll(ctx, time.Minute, "every daemon to be scraped", func() error {
			res, err := promQuery(ctx, promURL, `up{job="endpointlag"} == 1`)
			if err != nil {
				return err
			}
			if len(res) != len(c.Nodes) {
				return fmt.Errorf("%d of %d daemons up", len(res), len(c.Nodes))
			}
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		time.Sleep(5 * time.Second)
		var empty []string
		n := 0
		for _, q := range dashboardQueries(t) {
			n++
			res, err := promQuery(ctx, promURL, q.expr)
			switch {
			case err != nil:
				t.Errorf("%s / %s: %v\n%s", q.dashboard, q.panel, err, q.expr)
			case len(res) == 0:
				empty = append(empty, q.dashboard+" / "+q.panel+": "+q.expr)
			}
		}
		t.Logf("%d panel queries run, %d returned no data", n, len(empty))
		for _, e := range empty {
			t.Errorf("no data: %s", e)
		}
	})
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
	return serviceAccountName(ds)
}

func serviceAccountName(ds *appsv1.DaemonSet) string { return ds.Spec.Template.Spec.ServiceAccountName }

// serviceAccountToken creates the ServiceAccount (and its namespace) if needed and returns a
// token of it.
func serviceAccountToken(t *testing.T, ctx context.Context, client kubernetes.Interface, ns, name string) string {
	t.Helper()
	if _, err := client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
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

// grantDiscovery lets Prometheus's ServiceAccount find the daemons' pods, as kube-prometheus
// grants its Prometheus in the namespaces it monitors.
func grantDiscovery(t *testing.T, ctx context.Context, client kubernetes.Interface) {
	t.Helper()
	role := &rbacv1.Role{ObjectMeta: metav1.ObjectMeta{Namespace: installNS, Name: "prometheus-discovery"},
		Rules: []rbacv1.PolicyRule{{APIGroups: []string{""}, Resources: []string{"pods", "services", "endpoints"}, Verbs: []string{"get", "list", "watch"}}}}
	if _, err := client.RbacV1().Roles(installNS).Create(ctx, role, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	b := &rbacv1.RoleBinding{ObjectMeta: metav1.ObjectMeta{Namespace: installNS, Name: "prometheus-discovery"},
		RoleRef:  rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "Role", Name: role.Name},
		Subjects: []rbacv1.Subject{{Kind: rbacv1.ServiceAccountKind, Namespace: promNS, Name: promSA}}}
	if _, err := client.RbacV1().RoleBindings(installNS).Create(ctx, b, metav1.CreateOptions{}); err != nil {
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
		b, _ := os.ReadFile(filepath.Join(c.StateDir(), "logs", "pod-"+p.Name+".log"))
		if len(b) > 3000 {
			b = b[len(b)-3000:]
		}
		t.Logf("pod %s on %q, phase %s; its log ends:\n%s", p.Name, p.Spec.NodeName, p.Status.Phase, b)
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
