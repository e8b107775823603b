package chart_test

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"

	monitoringv1 "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	"sigs.k8s.io/yaml"

	"github.com/endpointlag/endpointlag/deploy/tools/internal/manifests"
)

func TestMain(m *testing.M) {
	code := m.Run()
	if binPath != "" {
		_ = os.RemoveAll(filepath.Dir(binPath))
	}
	if valuesChartDir != "" {
		_ = os.RemoveAll(valuesChartDir)
	}
	os.Exit(code)
}

const digest = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"

// everything turns every optional part on.
var everything = []string{
	"--set", "namespace.create=true",
	"--set", "serviceMonitor.enabled=true",
	"--set", "podMonitor.enabled=true",
	"--set", "prometheusRule.enabled=true",
	"--set", "dashboards.enabled=true",
	"--set", "aggregator.enabled=true",
	"--set", "otlp.enabled=true",
	"--set", "otlp.endpoint=http://otel-collector.observability.svc:4317",
	"--set", "otlp.insecure=true",
	"--set", "otlp.headers.x-tenant=team-a",
	"--set", "image.digest=" + digest,
	"--set", "prometheus.serviceAccount.bind=true",
	"--set", "dataplane.kubeProxyURL=http://127.0.0.1:10249",
	"--set-json", `packets.uplinks=["eth0","eth1"]`,
	"--set-json", `ingress.instances=["traefik=http://10.0.0.5:9000","haproxy=tcp://10.0.0.6:9999"]`,
	"--set-json", `extraArgs=["--ingress.poll-fast=50ms"]`,
	"--set-json", `aggregator.extraArgs=["--settle=1m"]`,
	"--set-json", `extraEnv=[{"name":"GOMAXPROCS","value":"2"}]`,
	"--set-json", `imagePullSecrets=[{"name":"pull"}]`,
	"--set", "ingress.enterPods=true",
}

// variants are the renderings every test of the chart checks.
var variants = []struct {
	name string
	args []string
}{
	{"defaults", nil},
	{"everything", everything},
	{"everything without auth", append(slices.Clone(everything), "--set", "auth.enabled=false")},
	{"without the aggregator", []string{"--set", "aggregator.enabled=false", "--set", "serviceMonitor.enabled=true", "--set", "podMonitor.enabled=true"}},
	{"without the aggregator and auth", []string{"--set", "aggregator.enabled=false", "--set", "auth.enabled=false", "--set", "serviceMonitor.enabled=true"}},
	{"aggregator certificate", []string{"--set", "aggregator.tls.secretName=endpointlag-aggregate-tls"}},
	{"monitoring objects elsewhere", []string{
		"--set", "serviceMonitor.enabled=true", "--set", "serviceMonitor.namespace=monitoring",
		"--set", "podMonitor.enabled=true", "--set", "podMonitor.namespace=monitoring",
		"--set", "prometheusRule.enabled=true", "--set", "prometheusRule.namespace=monitoring",
		"--set", "dashboards.enabled=true", "--set", "dashboards.namespace=grafana",
	}},
	{"servicemonitor with the scraper's token", []string{"--set", "serviceMonitor.enabled=true", "--set", "serviceMonitor.bearerTokenFile=",
		"--set", "podMonitor.enabled=true", "--set", "serviceMonitor.namespace=monitoring", "--set", "podMonitor.namespace=monitoring"}},
	{"otlp headers from a secret", []string{"--set", "otlp.enabled=true", "--set", "otlp.endpoint=https://otlp.example:4318",
		"--set", "otlp.protocol=http/protobuf", "--set", "otlp.headersSecret.name=otlp", "--set", "otlp.headersSecret.key=headers"}},
	{"kube probe only", []string{"--set-json", `probes={"kube":true,"nftables":false,"iptables":false,"ipvs":false,"packets":false,"ingress":false}`,
		"--set-json", "capabilities=[]", "--set", "fullnameOverride=el"}},
}

func TestHelmLint(t *testing.T) {
	helm := helmBin(t)
	for _, v := range variants {
		t.Run(v.name, func(t *testing.T) {
			args := append([]string{"lint", "--strict", chartDir, "--namespace", manifests.Namespace}, v.args...)
			out, err := exec.Command(helm, args...).CombinedOutput()
			if err != nil {
				t.Fatalf("helm %s: %v\n%s", strings.Join(args, " "), err, out)
			}
		})
	}
}

func TestTemplate(t *testing.T) {
	helm := helmBin(t)
	for _, v := range variants {
		t.Run(v.name, func(t *testing.T) {
			objs := decode(t, v.name, helmDocs(t, helm, v.args...))
			values := valuesOf(t, helm, v.args)
			checkObjects(t, objs, values)
		})
	}
}

// Wrong values fail the rendering with a message that names them.
func TestTemplateRefuses(t *testing.T) {
	helm := helmBin(t)
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"--set", "image.digest=latest"}, "image.digest"},
		{[]string{"--set", "otlp.enabled=true"}, "otlp.endpoint"},
		{[]string{"--set", "otlp.enabled=true", "--set", "otlp.endpoint=http://x:4317", "--set", "otlp.protocol=http"}, "otlp.protocol"},
		{[]string{"--set", "serviceMonitor.enabled=true", "--set", "service.enabled=false"}, "service.enabled"},
		{[]string{"--set", "serviceAccount.create=false"}, "serviceAccount.name"},
		{[]string{"--set", "serviceMonitor.enabled=true", "--set", "serviceMonitor.bearerTokenFile=", "--set", "podMonitor.enabled=true",
			"--set", "podMonitor.namespace=monitoring"}, "podMonitor.namespace"},
	} {
		_, err := manifests.Template(helm, chartDir, c.args...)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("helm template %q: %v, want an error naming %s", c.args, err, c.want)
		}
	}
}

// values are the settings checkObjects needs, as helm computed them for a rendering.
type values struct {
	Auth       struct{ Enabled bool }
	Image      struct{ Repository, Tag, Digest string }
	Aggregator struct {
		Enabled bool
		Port    int32
		TLS     struct {
			SecretName string `json:"secretName"`
		} `json:"tls"`
	}
	OTLP struct {
		Enabled  bool
		Endpoint string
	} `json:"otlp"`
	ServiceMonitor struct {
		Enabled         bool
		BearerTokenFile string `json:"bearerTokenFile"`
	} `json:"serviceMonitor"`
	PodMonitor     struct{ Enabled bool } `json:"podMonitor"`
	PrometheusRule struct{ Enabled bool } `json:"prometheusRule"`
	Dashboards     struct{ Enabled bool }
	Namespace      struct{ Create bool }
	Ingress        struct {
		EnterPods bool `json:"enterPods"`
	}
	Prometheus struct {
		ServiceAccount struct {
			Name, Namespace string
			Bind            bool
		} `json:"serviceAccount"`
	}
	Port int32
}

// valuesOf returns the values a rendering used, as helm merged the chart's defaults and args: it
// renders valuesChart, a copy of the chart with one more template, which prints .Values.
func valuesOf(t *testing.T, helm string, args []string) values {
	t.Helper()
	out, err := manifests.Template(helm, valuesChart(t), append([]string{"--show-only", "templates/zz-values.yaml"}, args...)...)
	if err != nil {
		t.Fatal(err)
	}
	var doc struct{ Values json.RawMessage }
	if err := yaml.Unmarshal(out, &doc); err != nil {
		t.Fatal(err)
	}
	var v values
	if err := json.Unmarshal(doc.Values, &v); err != nil {
		t.Fatal(err)
	}
	return v
}

var (
	valuesChartOnce sync.Once
	valuesChartDir  string // the copy's directory; TestMain removes it
	valuesChartErr  error
)

// valuesChart copies the chart once (links followed) and adds templates/zz-values.yaml to the copy.
func valuesChart(t *testing.T) string {
	t.Helper()
	valuesChartOnce.Do(func() {
		if valuesChartDir, valuesChartErr = os.MkdirTemp("", "endpointlag-chart-values"); valuesChartErr != nil {
			return
		}
		if out, err := exec.Command("cp", "-rL", chartDir, valuesChartDir).CombinedOutput(); err != nil {
			valuesChartErr = fmt.Errorf("cp: %v %s", err, out)
			return
		}
		valuesChartErr = os.WriteFile(filepath.Join(valuesChartDir, filepath.Base(chartDir), "templates", "zz-values.yaml"),
			[]byte("values: {{ toJson .Values }}\n"), 0o644)
	})
	if valuesChartErr != nil {
		t.Fatal(valuesChartErr)
	}
	return filepath.Join(valuesChartDir, filepath.Base(chartDir))
}

func checkObjects(t *testing.T, o *Objects, v values) {
	t.Helper()
	if len(o.DaemonSets) != 1 {
		t.Fatalf("%d DaemonSets", len(o.DaemonSets))
	}
	ds := o.DaemonSets[0]
	ns := ds.Namespace
	pod := ds.Spec.Template.Spec
	daemon := pod.Containers[0]

	// Images: no registry host (users set theirs), by digest when one is given.
	containers := map[string]corev1.Container{"DaemonSet": daemon}
	for _, d := range o.Deployments {
		containers["Deployment "+d.Name] = d.Spec.Template.Spec.Containers[0]
	}
	for where, c := range containers {
		first, _, _ := strings.Cut(c.Image, "/")
		if strings.ContainsAny(first, ".:") || first == "localhost" {
			t.Errorf("%s: image %s names a registry host", where, c.Image)
		}
		if v.Image.Digest != "" && c.Image != v.Image.Repository+"@"+v.Image.Digest {
			t.Errorf("%s: image %s, want %s@%s", where, c.Image, v.Image.Repository, v.Image.Digest)
		}
		if v.Image.Digest == "" && !strings.HasPrefix(c.Image, v.Image.Repository+":") {
			t.Errorf("%s: image %s, want %s:<tag>", where, c.Image, v.Image.Repository)
		}
	}

	// The daemon: its flags, the node's name, the host network, its probes.
	checkFlags(t, "DaemonSet", daemon.Args)
	if !pod.HostNetwork {
		t.Error("the DaemonSet is not on the host network")
	}
	if pod.HostPID != v.Ingress.EnterPods || slices.Contains(daemon.Args, "--ingress.enter-pods") != v.Ingress.EnterPods {
		t.Errorf("ingress.enterPods %v: hostPID %v, args %q", v.Ingress.EnterPods, pod.HostPID, daemon.Args)
	}
	if e := envVar(daemon, "NODE_NAME"); e == nil || e.ValueFrom == nil || e.ValueFrom.FieldRef == nil || e.ValueFrom.FieldRef.FieldPath != "spec.nodeName" {
		t.Error("the DaemonSet does not set NODE_NAME from spec.nodeName")
	}
	if daemon.Ports[0].ContainerPort != v.Port || !slices.Contains(daemon.Args, fmt.Sprintf("--web.listen-address=:%d", v.Port)) {
		t.Errorf("the daemon's port %d and args %q disagree with port %d", daemon.Ports[0].ContainerPort, daemon.Args, v.Port)
	}
	scheme := corev1.URISchemeHTTP
	if v.Auth.Enabled {
		scheme = corev1.URISchemeHTTPS
	}
	for _, p := range []*corev1.Probe{daemon.ReadinessProbe, daemon.LivenessProbe} {
		if p == nil || p.HTTPGet == nil || p.HTTPGet.Scheme != scheme {
			t.Errorf("the daemon's probe %+v is not %s", p, scheme)
		}
	}
	if sc := daemon.SecurityContext; sc == nil || sc.Privileged != nil || sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation ||
		sc.Capabilities == nil || !slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) {
		t.Errorf("the daemon's securityContext %+v: want all capabilities dropped (some added back), no privilege", sc)
	}
	if v.Namespace.Create {
		if len(o.Namespaces) != 1 || o.Namespaces[0].Name != ns || o.Namespaces[0].Labels["pod-security.kubernetes.io/enforce"] != "privileged" {
			t.Errorf("namespace.create: want the namespace %s enforcing privileged, got %+v", ns, o.Namespaces)
		}
	} else if len(o.Namespaces) != 0 {
		t.Error("a Namespace without namespace.create")
	}

	// Authentication: --web.auth=kubernetes, delegated to the API server, for both.
	delegators := map[string]bool{}
	for _, b := range o.ClusterRoleBindings {
		if b.RoleRef.Name == "system:auth-delegator" {
			for _, s := range b.Subjects {
				delegators[s.Namespace+"/"+s.Name] = true
			}
		}
	}
	if got := slices.Contains(daemon.Args, "--web.auth=kubernetes"); got != v.Auth.Enabled {
		t.Errorf("auth.enabled %v, the daemon's args %q", v.Auth.Enabled, daemon.Args)
	}
	if delegators[ns+"/"+pod.ServiceAccountName] != v.Auth.Enabled {
		t.Errorf("auth.enabled %v: the daemon's ServiceAccount bound to system:auth-delegator: %v", v.Auth.Enabled, delegators)
	}
	if v.Auth.Enabled {
		reader := clusterRole(o, ds.Name+"-metrics-reader")
		if reader == nil || !reflect.DeepEqual(reader.Rules, []rbacv1.PolicyRule{{NonResourceURLs: []string{"/metrics"}, Verbs: []string{"get"}}}) {
			t.Errorf("the metrics-reader ClusterRole: %+v", reader)
		}
		api := clusterRole(o, ds.Name+"-api-reader")
		if api == nil || !reflect.DeepEqual(api.Rules, []rbacv1.PolicyRule{{APIGroups: []string{"endpointlag.dev"}, Resources: []string{"*"}, Verbs: []string{"get"}}}) {
			t.Errorf("the api-reader ClusterRole: %+v", api)
		}
	} else if len(delegators) > 0 {
		t.Errorf("auth off, yet bindings to system:auth-delegator: %v", delegators)
	}

	// The aggregator: its Deployment and Service, the daemons push to them.
	checkAggregator(t, o, v, ds)

	// OTLP on both.
	for where, c := range containers {
		if e := envVar(c, "OTEL_EXPORTER_OTLP_ENDPOINT"); (e != nil) != v.OTLP.Enabled || (e != nil && e.Value != v.OTLP.Endpoint) {
			t.Errorf("%s: otlp.enabled %v, OTEL_EXPORTER_OTLP_ENDPOINT %+v", where, v.OTLP.Enabled, e)
		}
	}

	checkRBACReferences(t, o, v)
	checkMonitors(t, o, v, ds)
	checkRules(t, o, v)
	checkDashboards(t, o, v)
}

func checkAggregator(t *testing.T, o *Objects, v values, ds appsv1.DaemonSet) {
	t.Helper()
	daemon := ds.Spec.Template.Spec.Containers[0]
	urls := argsWithPrefix(daemon.Args, "--aggregator.")
	if !v.Aggregator.Enabled {
		if len(o.Deployments) != 0 || len(urls) != 0 {
			t.Errorf("aggregator.enabled false, yet %d Deployments and args %q", len(o.Deployments), urls)
		}
		return
	}
	if len(o.Deployments) != 1 {
		t.Fatalf("%d Deployments, want the aggregator's", len(o.Deployments))
	}
	dep := o.Deployments[0]
	c := dep.Spec.Template.Spec.Containers[0]
	if len(c.Args) == 0 || c.Args[0] != "aggregate" {
		t.Fatalf("the aggregator runs %q", c.Args)
	}
	checkFlags(t, "the aggregator", c.Args)
	svc := service(o, dep.Name)
	if svc == nil || !selects(svc.Spec.Selector, dep.Spec.Template.Labels) || selects(svc.Spec.Selector, ds.Spec.Template.Labels) {
		t.Fatalf("no Service %s that selects the aggregator's pods and only them", dep.Name)
	}
	if selects(ds.Spec.Selector.MatchLabels, dep.Spec.Template.Labels) || selects(dep.Spec.Selector.MatchLabels, ds.Spec.Template.Labels) {
		t.Error("the DaemonSet's and the Deployment's selectors overlap")
	}
	scheme := "http"
	if v.Auth.Enabled {
		scheme = "https"
	}
	want := fmt.Sprintf("--aggregator.urls=%s://%s.%s.svc:%d", scheme, svc.Name, svc.Namespace, svc.Spec.Ports[0].Port)
	if !slices.Contains(daemon.Args, want) {
		t.Errorf("the daemon's args %q lack %s", daemon.Args, want)
	}
	role := clusterRole(o, dep.Name)
	if role == nil || !reflect.DeepEqual(role.Rules, []rbacv1.PolicyRule{{APIGroups: []string{""}, Resources: []string{"events"}, Verbs: []string{"create"}}}) {
		t.Errorf("the aggregator's ClusterRole %+v: want events: create only", role)
	}
	push := clusterRole(o, dep.Name+"-push")
	if !v.Auth.Enabled {
		if push != nil || len(urls) != 1 || slices.Contains(c.Args, "--web.auth=kubernetes") {
			t.Errorf("auth off, yet the push role %v, daemon args %q, aggregator args %q", push != nil, urls, c.Args)
		}
		return
	}
	if !slices.Contains(c.Args, "--web.auth=kubernetes") {
		t.Errorf("the aggregator's args %q lack --web.auth=kubernetes", c.Args)
	}
	if push == nil || !reflect.DeepEqual(push.Rules, []rbacv1.PolicyRule{{APIGroups: []string{"endpointlag.dev"}, Resources: []string{"push"}, Verbs: []string{"create"}}}) {
		t.Errorf("the push ClusterRole %+v: want create push.endpointlag.dev", push)
	}
	if !boundTo(o, dep.Name+"-push", ds.Namespace, ds.Spec.Template.Spec.ServiceAccountName) {
		t.Error("the daemons' ServiceAccount is not bound to the push ClusterRole")
	}
	if !slices.Contains(daemon.Args, "--aggregator.token-file=/var/run/secrets/kubernetes.io/serviceaccount/token") {
		t.Errorf("the daemon's args %q send no token", daemon.Args)
	}
	insecure := slices.Contains(daemon.Args, "--aggregator.insecure-skip-tls-verify")
	ca := len(argsWithPrefix(daemon.Args, "--aggregator.ca-file=")) == 1
	if insecure == ca || ca != (v.Aggregator.TLS.SecretName != "") {
		t.Errorf("aggregator.tls.secretName %q: the daemon's args %q", v.Aggregator.TLS.SecretName, daemon.Args)
	}
	if ca != (len(argsWithPrefix(c.Args, "--web.tls-cert-file=")) == 1) {
		t.Errorf("the daemons verify a CA, the aggregator serves no certificate (or the reverse): %q", c.Args)
	}
	if p := c.ReadinessProbe; p == nil || p.HTTPGet == nil || p.HTTPGet.Scheme != corev1.URISchemeHTTPS {
		t.Errorf("the aggregator's readiness probe %+v is not HTTPS", p)
	}
}

// checkRBACReferences: every binding names a role that is rendered (or built in) and
// ServiceAccounts that are rendered (or Prometheus's).
func checkRBACReferences(t *testing.T, o *Objects, v values) {
	t.Helper()
	prom := v.Prometheus.ServiceAccount.Namespace + "/" + v.Prometheus.ServiceAccount.Name
	promBound := false
	for _, b := range o.ClusterRoleBindings {
		if b.RoleRef.Name != "system:auth-delegator" && clusterRole(o, b.RoleRef.Name) == nil {
			t.Errorf("ClusterRoleBinding %s: no ClusterRole %s", b.Name, b.RoleRef.Name)
		}
		for _, s := range b.Subjects {
			if s.Namespace+"/"+s.Name == prom {
				promBound = true
				continue
			}
			if s.Kind != "ServiceAccount" || serviceAccount(o, s.Namespace, s.Name) == nil {
				t.Errorf("ClusterRoleBinding %s: no ServiceAccount %s/%s", b.Name, s.Namespace, s.Name)
			}
		}
	}
	if want := v.Auth.Enabled && ((v.ServiceMonitor.Enabled && v.ServiceMonitor.BearerTokenFile != "") || v.Prometheus.ServiceAccount.Bind); promBound != want {
		t.Errorf("Prometheus's ServiceAccount %s bound: %v, want %v", prom, promBound, want)
	}
}

func checkMonitors(t *testing.T, o *Objects, v values, ds appsv1.DaemonSet) {
	t.Helper()
	wantN := 0
	if v.ServiceMonitor.Enabled {
		wantN = 1 + len(o.Deployments)
	}
	if len(o.ServiceMonitors) != wantN {
		t.Errorf("%d ServiceMonitors, want %d", len(o.ServiceMonitors), wantN)
	}
	for _, sm := range o.ServiceMonitors {
		job, pods := jobOf(t, o, sm.Name, ds)
		svc := service(o, sm.Name)
		if svc == nil || !selects(sm.Spec.Selector.MatchLabels, svc.Labels) || !selects(svc.Spec.Selector, pods) {
			t.Errorf("ServiceMonitor %s does not select a Service of its pods", sm.Name)
		}
		if sm.Namespace != svc.Namespace && !slices.Contains(sm.Spec.NamespaceSelector.MatchNames, svc.Namespace) {
			t.Errorf("ServiceMonitor %s in %s does not look in %s", sm.Name, sm.Namespace, svc.Namespace)
		}
		if len(sm.Spec.Endpoints) != 1 {
			t.Fatalf("ServiceMonitor %s: %d endpoints", sm.Name, len(sm.Spec.Endpoints))
		}
		e := sm.Spec.Endpoints[0]
		if !slices.ContainsFunc(svc.Spec.Ports, func(p corev1.ServicePort) bool { return p.Name == e.Port }) {
			t.Errorf("ServiceMonitor %s scrapes port %q, which its Service lacks", sm.Name, e.Port)
		}
		checkRelabelings(t, "ServiceMonitor "+sm.Name, e.RelabelConfigs, job)
		checkHonorLabels(t, "ServiceMonitor "+sm.Name, job, e.HonorLabels)
		//lint:ignore SA1019 bearerTokenFile is the only way to send Prometheus's own token (authorization takes a Secret)
		tokenFile := e.BearerTokenFile
		if !v.Auth.Enabled {
			if e.Scheme == nil || *e.Scheme != "http" || tokenFile != "" || e.Authorization != nil {
				t.Errorf("ServiceMonitor %s without auth: want plain http, no token: %+v", sm.Name, e)
			}
			continue
		}
		if e.Scheme == nil || *e.Scheme != "https" || e.TLSConfig == nil || e.TLSConfig.InsecureSkipVerify == nil || !*e.TLSConfig.InsecureSkipVerify {
			t.Errorf("ServiceMonitor %s: want https, not verifying the self-signed certificate: %+v", sm.Name, e)
		}
		if v.ServiceMonitor.BearerTokenFile != "" {
			if tokenFile != v.ServiceMonitor.BearerTokenFile || e.Authorization != nil {
				t.Errorf("ServiceMonitor %s: want Prometheus's token file %s: %+v", sm.Name, v.ServiceMonitor.BearerTokenFile, e)
			}
			continue
		}
		if tokenFile != "" || e.Authorization == nil || e.Authorization.Credentials == nil {
			t.Errorf("ServiceMonitor %s: want the scraper's token (authorization): %+v", sm.Name, e)
			continue
		}
		checkScraperToken(t, o, "ServiceMonitor "+sm.Name, sm.Namespace, e.Authorization.Credentials.Name, e.Authorization.Credentials.Key, ds)
	}

	wantN = 0
	if v.PodMonitor.Enabled {
		wantN = 1 + len(o.Deployments)
	}
	if len(o.PodMonitors) != wantN {
		t.Errorf("%d PodMonitors, want %d", len(o.PodMonitors), wantN)
	}
	for _, pm := range o.PodMonitors {
		job, pods := jobOf(t, o, pm.Name, ds)
		if !selects(pm.Spec.Selector.MatchLabels, pods) {
			t.Errorf("PodMonitor %s does not select its pods", pm.Name)
		}
		if pm.Namespace != ds.Namespace && !slices.Contains(pm.Spec.NamespaceSelector.MatchNames, ds.Namespace) {
			t.Errorf("PodMonitor %s in %s does not look in %s", pm.Name, pm.Namespace, ds.Namespace)
		}
		e := pm.Spec.PodMetricsEndpoints[0]
		checkRelabelings(t, "PodMonitor "+pm.Name, e.RelabelConfigs, job)
		checkHonorLabels(t, "PodMonitor "+pm.Name, job, e.HonorLabels)
		if !v.Auth.Enabled {
			if e.Scheme == nil || *e.Scheme != "http" || e.Authorization != nil {
				t.Errorf("PodMonitor %s without auth: want plain http, no token: %+v", pm.Name, e)
			}
			continue
		}
		if e.Scheme == nil || *e.Scheme != "https" || e.Authorization == nil || e.Authorization.Credentials == nil ||
			e.TLSConfig == nil || e.TLSConfig.InsecureSkipVerify == nil || !*e.TLSConfig.InsecureSkipVerify {
			t.Errorf("PodMonitor %s: want https with a token, not verifying the self-signed certificate: %+v", pm.Name, e)
			continue
		}
		checkScraperToken(t, o, "PodMonitor "+pm.Name, pm.Namespace, e.Authorization.Credentials.Name, e.Authorization.Credentials.Key, ds)
	}
}

// checkScraperToken: a monitor's token is a ServiceAccount token Secret of its namespace whose
// ServiceAccount is rendered and bound to the metrics reader.
func checkScraperToken(t *testing.T, o *Objects, where, ns, secret, key string, ds appsv1.DaemonSet) {
	t.Helper()
	var sec *corev1.Secret
	for i := range o.Secrets {
		if o.Secrets[i].Name == secret && o.Secrets[i].Namespace == ns {
			sec = &o.Secrets[i]
		}
	}
	if sec == nil || sec.Type != corev1.SecretTypeServiceAccountToken || key != "token" {
		t.Errorf("%s sends %s/%s: want the token of a ServiceAccount token Secret in %s", where, secret, key, ns)
		return
	}
	sa := sec.Annotations["kubernetes.io/service-account.name"]
	if serviceAccount(o, sec.Namespace, sa) == nil || !boundTo(o, ds.Name+"-metrics-reader", sec.Namespace, sa) {
		t.Errorf("%s: the token's ServiceAccount %s/%s is not rendered or not bound to the metrics reader", where, sec.Namespace, sa)
	}
}

// jobOf tells the job label a monitor named name should set and the labels of the pods it scrapes.
func jobOf(t *testing.T, o *Objects, name string, ds appsv1.DaemonSet) (string, map[string]string) {
	t.Helper()
	if name == ds.Name {
		return "endpointlag", ds.Spec.Template.Labels
	}
	for _, d := range o.Deployments {
		if d.Name == name {
			return "endpointlag-aggregate", d.Spec.Template.Labels
		}
	}
	t.Fatalf("a monitor %s of neither the DaemonSet nor the aggregator", name)
	return "", nil
}

// checkRelabelings: node from the pod's node, the job the rules expect (deploy/rules).
func checkRelabelings(t *testing.T, where string, rc []monitoringv1.RelabelConfig, job string) {
	t.Helper()
	var node, jobSet bool
	for _, r := range rc {
		action := strings.ToLower(r.Action)
		if (action == "" || action == "replace") && r.TargetLabel == "node" && len(r.SourceLabels) == 1 && r.SourceLabels[0] == "__meta_kubernetes_pod_node_name" {
			node = true
		}
		if (action == "" || action == "replace") && r.TargetLabel == "job" && len(r.SourceLabels) == 0 && r.Replacement != nil && *r.Replacement == job {
			jobSet = true
		}
	}
	if !node || !jobSet {
		t.Errorf("%s: relabelings %+v: want node from __meta_kubernetes_pod_node_name (%v) and job=%s (%v)", where, rc, node, job, jobSet)
	}
}

// The aggregator's workload metrics carry the workload's namespace: the rules read them with
// honor_labels (deploy/rules/endpointlag.rules.yaml).
func checkHonorLabels(t *testing.T, where, job string, honor bool) {
	t.Helper()
	if honor != (job == "endpointlag-aggregate") {
		t.Errorf("%s: honorLabels %v", where, honor)
	}
}

// The PrometheusRule holds deploy/rules/endpointlag.rules.yaml as it is.
func checkRules(t *testing.T, o *Objects, v values) {
	t.Helper()
	if !v.PrometheusRule.Enabled {
		if len(o.PrometheusRules) != 0 {
			t.Error("a PrometheusRule without prometheusRule.enabled")
		}
		return
	}
	if len(o.PrometheusRules) != 1 {
		t.Fatalf("%d PrometheusRules", len(o.PrometheusRules))
	}
	b, err := os.ReadFile(rulesFile)
	if err != nil {
		t.Fatal(err)
	}
	var file struct {
		Groups []monitoringv1.RuleGroup `json:"groups"`
	}
	if err := yaml.UnmarshalStrict(b, &file); err != nil {
		t.Fatalf("%s: %v", rulesFile, err)
	}
	if len(file.Groups) == 0 {
		t.Errorf("%s has no groups", rulesFile)
	}
	if got := o.PrometheusRules[0].Spec.Groups; !reflect.DeepEqual(got, file.Groups) {
		t.Errorf("the PrometheusRule's groups differ from %s", rulesFile)
	}
}

// One ConfigMap per dashboards/*.json, holding it as it is, labelled for Grafana's sidecar.
func checkDashboards(t *testing.T, o *Objects, v values) {
	t.Helper()
	if !v.Dashboards.Enabled {
		if len(o.ConfigMaps) != 0 {
			t.Error("ConfigMaps without dashboards.enabled")
		}
		return
	}
	files, _ := filepath.Glob(filepath.Join(dashboardsDir, "*.json"))
	if len(o.ConfigMaps) != len(files) {
		t.Errorf("%d dashboard ConfigMaps for %d dashboards/*.json", len(o.ConfigMaps), len(files))
	}
	for _, f := range files {
		want, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		key := filepath.Base(f)
		found := false
		for _, cm := range o.ConfigMaps {
			if got, ok := cm.Data[key]; ok {
				found = true
				if got != strings.TrimSpace(string(want)) {
					t.Errorf("ConfigMap %s: %s differs from %s", cm.Name, key, f)
				}
				if cm.Labels["grafana_dashboard"] != "1" {
					t.Errorf("ConfigMap %s lacks the label grafana_dashboard: \"1\"", cm.Name)
				}
				if !json.Valid([]byte(got)) {
					t.Errorf("ConfigMap %s: %s is not JSON", cm.Name, key)
				}
			}
		}
		if !found {
			t.Errorf("no ConfigMap holds %s", key)
		}
	}
}

// The chart links each of dashboards/*.json and deploy/rules' file, and nothing else: a dashboard
// added to dashboards/ needs its link (ln -s ../../../../../dashboards/NAME.json
// deploy/helm/endpointlag/files/dashboards/).
func TestChartFilesLinkTheSources(t *testing.T) {
	want := map[string]string{"endpointlag.rules.yaml": "../../../rules/endpointlag.rules.yaml"}
	files, _ := filepath.Glob(filepath.Join(dashboardsDir, "*.json"))
	for _, f := range files {
		want["dashboards/"+filepath.Base(f)] = "../../../../../dashboards/" + filepath.Base(f)
	}
	got := map[string]string{}
	err := filepath.WalkDir(filepath.Join(chartDir, "files"), func(path string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		rel, _ := filepath.Rel(filepath.Join(chartDir, "files"), path)
		target, err := os.Readlink(path)
		if err != nil {
			target = "(not a link)"
		}
		got[rel] = target
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("the chart's files/ are %v, want the links %v", got, want)
	}
	for rel := range got {
		if _, err := os.Stat(filepath.Join(chartDir, "files", rel)); err != nil {
			t.Errorf("files/%s: %v", rel, err)
		}
	}
}

// helm package follows the links: the packaged chart holds the rules and the dashboards.
func TestPackage(t *testing.T) {
	helm := helmBin(t)
	dir := t.TempDir()
	if out, err := exec.Command(helm, "package", chartDir, "-d", dir).CombinedOutput(); err != nil {
		t.Fatalf("helm package: %v\n%s", err, out)
	}
	tgz, _ := filepath.Glob(filepath.Join(dir, "*.tgz"))
	if len(tgz) != 1 {
		t.Fatalf("helm package made %v", tgz)
	}
	objs := decode(t, "the packaged chart", renderDocs(t, helm, tgz[0], "--set", "prometheusRule.enabled=true", "--set", "dashboards.enabled=true"))
	files, _ := filepath.Glob(filepath.Join(dashboardsDir, "*.json"))
	if len(objs.PrometheusRules) != 1 || len(objs.ConfigMaps) != len(files) {
		t.Errorf("the packaged chart renders %d PrometheusRules and %d dashboards, want 1 and %d", len(objs.PrometheusRules), len(objs.ConfigMaps), len(files))
	}
}

func envVar(c corev1.Container, name string) *corev1.EnvVar {
	for i := range c.Env {
		if c.Env[i].Name == name {
			return &c.Env[i]
		}
	}
	return nil
}

func argsWithPrefix(args []string, prefix string) []string {
	var out []string
	for _, a := range args {
		if strings.HasPrefix(a, prefix) {
			out = append(out, a)
		}
	}
	return out
}

func clusterRole(o *Objects, name string) *rbacv1.ClusterRole {
	for i := range o.ClusterRoles {
		if o.ClusterRoles[i].Name == name {
			return &o.ClusterRoles[i]
		}
	}
	return nil
}

func service(o *Objects, name string) *corev1.Service {
	for i := range o.Services {
		if o.Services[i].Name == name {
			return &o.Services[i]
		}
	}
	return nil
}

func serviceAccount(o *Objects, ns, name string) *corev1.ServiceAccount {
	for i := range o.ServiceAccounts {
		if o.ServiceAccounts[i].Name == name && o.ServiceAccounts[i].Namespace == ns {
			return &o.ServiceAccounts[i]
		}
	}
	return nil
}

func boundTo(o *Objects, role, ns, sa string) bool {
	for _, b := range o.ClusterRoleBindings {
		if b.RoleRef.Kind == "ClusterRole" && b.RoleRef.Name == role {
			for _, s := range b.Subjects {
				if s.Kind == "ServiceAccount" && s.Namespace == ns && s.Name == sa {
					return true
				}
			}
		}
	}
	return false
}

// selects tells whether a selector's labels are all among labels (an empty selector selects none).
func selects(selector, labels map[string]string) bool {
	if len(selector) == 0 {
		return false
	}
	for k, v := range selector {
		if labels[k] != v {
			return false
		}
	}
	return true
}
