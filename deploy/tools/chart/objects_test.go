package chart_test

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
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

// Paths from this package's directory.
const (
	chartDir      = "../../helm/endpointlag"
	baseDir       = "../../base"
	overlaysDir   = "../../overlays"
	rulesFile     = "../../rules/endpointlag.rules.yaml"
	dashboardsDir = "../../../dashboards"
	repoRoot      = "../../.."
)

// helmBin returns the helm that make builds (deploy/tools/build-helm.sh), or skips the test.
func helmBin(t *testing.T) string {
	t.Helper()
	h := os.Getenv("HELM")
	if h == "" {
		t.Skip("HELM is not set: make generate (or deploy/tools/build-helm.sh DIR) builds helm; run with HELM=DIR/helm")
	}
	if _, err := os.Stat(h); err != nil {
		t.Fatalf("HELM=%s: %v", h, err)
	}
	return h
}

// Objects are a rendering's objects, strictly decoded into their API types.
type Objects struct {
	Namespaces          []corev1.Namespace
	ServiceAccounts     []corev1.ServiceAccount
	Secrets             []corev1.Secret
	Services            []corev1.Service
	ConfigMaps          []corev1.ConfigMap
	DaemonSets          []appsv1.DaemonSet
	Deployments         []appsv1.Deployment
	ClusterRoles        []rbacv1.ClusterRole
	ClusterRoleBindings []rbacv1.ClusterRoleBinding
	ServiceMonitors     []monitoringv1.ServiceMonitor
	PodMonitors         []monitoringv1.PodMonitor
	PrometheusRules     []monitoringv1.PrometheusRule
	// Raw holds every object as generic maps, by "Kind namespace/name".
	Raw map[string]map[string]any
}

// decode strictly decodes each document (unknown fields, duplicate keys and unknown kinds fail)
// and checks that no two objects share a kind, namespace and name.
func decode(t *testing.T, where string, docs [][]byte) *Objects {
	t.Helper()
	o := &Objects{Raw: map[string]map[string]any{}}
	for _, doc := range docs {
		var meta struct {
			APIVersion string `json:"apiVersion"`
			Kind       string `json:"kind"`
			Metadata   struct {
				Name      string `json:"name"`
				Namespace string `json:"namespace"`
			} `json:"metadata"`
		}
		if err := yaml.Unmarshal(doc, &meta); err != nil {
			t.Fatalf("%s: %v\n%s", where, err, doc)
		}
		var err error
		switch meta.Kind {
		case "Namespace":
			err = strictAppend(doc, &o.Namespaces)
		case "ServiceAccount":
			err = strictAppend(doc, &o.ServiceAccounts)
		case "Secret":
			err = strictAppend(doc, &o.Secrets)
		case "Service":
			err = strictAppend(doc, &o.Services)
		case "ConfigMap":
			err = strictAppend(doc, &o.ConfigMaps)
		case "DaemonSet":
			err = strictAppend(doc, &o.DaemonSets)
		case "Deployment":
			err = strictAppend(doc, &o.Deployments)
		case "ClusterRole":
			err = strictAppend(doc, &o.ClusterRoles)
		case "ClusterRoleBinding":
			err = strictAppend(doc, &o.ClusterRoleBindings)
		case "ServiceMonitor":
			err = strictAppend(doc, &o.ServiceMonitors)
		case "PodMonitor":
			err = strictAppend(doc, &o.PodMonitors)
		case "PrometheusRule":
			err = strictAppend(doc, &o.PrometheusRules)
		default:
			err = fmt.Errorf("unexpected kind %q", meta.Kind)
		}
		if err != nil {
			t.Fatalf("%s: %s %s: %v", where, meta.Kind, meta.Metadata.Name, err)
		}
		if want := apiVersions[meta.Kind]; meta.APIVersion != want {
			t.Errorf("%s: %s %s has apiVersion %s, want %s", where, meta.Kind, meta.Metadata.Name, meta.APIVersion, want)
		}
		if meta.Metadata.Name == "" {
			t.Errorf("%s: a %s without a name", where, meta.Kind)
		}
		if namespaced[meta.Kind] != (meta.Metadata.Namespace != "") {
			t.Errorf("%s: %s %s has namespace %q", where, meta.Kind, meta.Metadata.Name, meta.Metadata.Namespace)
		}
		key := fmt.Sprintf("%s %s/%s", meta.Kind, meta.Metadata.Namespace, meta.Metadata.Name)
		if _, dup := o.Raw[key]; dup {
			t.Errorf("%s: two objects %s", where, key)
		}
		var raw map[string]any
		if err := yaml.Unmarshal(doc, &raw); err != nil {
			t.Fatal(err)
		}
		o.Raw[key] = raw
	}
	return o
}

var apiVersions = map[string]string{
	"Namespace": "v1", "ServiceAccount": "v1", "Secret": "v1", "Service": "v1", "ConfigMap": "v1",
	"DaemonSet": "apps/v1", "Deployment": "apps/v1",
	"ClusterRole": "rbac.authorization.k8s.io/v1", "ClusterRoleBinding": "rbac.authorization.k8s.io/v1",
	"ServiceMonitor": "monitoring.coreos.com/v1", "PodMonitor": "monitoring.coreos.com/v1", "PrometheusRule": "monitoring.coreos.com/v1",
}

var namespaced = map[string]bool{
	"ServiceAccount": true, "Secret": true, "Service": true, "ConfigMap": true, "DaemonSet": true, "Deployment": true,
	"ServiceMonitor": true, "PodMonitor": true, "PrometheusRule": true,
}

func strictAppend[T any](doc []byte, list *[]T) error {
	var v T
	if err := yaml.UnmarshalStrict(doc, &v); err != nil {
		return err
	}
	*list = append(*list, v)
	return nil
}

// helmDocs renders the chart with helm template and more arguments, and splits its output. Each
// rendering is made once: the tests that check the same variants share it.
func helmDocs(t *testing.T, helm string, args ...string) [][]byte {
	t.Helper()
	key := strings.Join(args, "\x00")
	renderedMu.Lock()
	defer renderedMu.Unlock()
	if docs, ok := rendered[key]; ok {
		return docs
	}
	docs := renderDocs(t, helm, chartDir, args...)
	rendered[key] = docs
	return docs
}

var (
	renderedMu sync.Mutex
	rendered   = map[string][][]byte{}
)

// renderDocs renders chart (a directory or a packaged chart) with helm template and more
// arguments, and returns its objects' documents.
func renderDocs(t *testing.T, helm, chart string, args ...string) [][]byte {
	t.Helper()
	out, err := manifests.Template(helm, chart, args...)
	if err != nil {
		t.Fatal(err)
	}
	docs, err := manifests.SplitBySource(out)
	if err != nil {
		t.Fatal(err)
	}
	var bodies [][]byte
	for _, d := range docs {
		bodies = append(bodies, d.Body)
	}
	return bodies
}

// splitYAML splits a multi-document YAML stream (kubectl kustomize's output, a base file).
func splitYAML(b []byte) [][]byte {
	var docs [][]byte
	for _, d := range bytes.Split(append([]byte("\n"), b...), []byte("\n---\n")) {
		if len(bytes.TrimSpace(d)) > 0 {
			docs = append(docs, d)
		}
	}
	return docs
}

var (
	binOnce sync.Once
	binPath string
	binErr  error
)

// endpointlagBin builds the daemon once ($ENDPOINTLAG names a built one instead).
func endpointlagBin(t *testing.T) string {
	t.Helper()
	if b := os.Getenv("ENDPOINTLAG"); b != "" {
		return b
	}
	binOnce.Do(func() {
		dir, err := os.MkdirTemp("", "endpointlag-chart-test")
		if err != nil {
			binErr = err
			return
		}
		binPath = filepath.Join(dir, "endpointlag")
		cmd := exec.Command("go", "build", "-o", binPath, "./cmd/endpointlag")
		cmd.Dir = repoRoot
		if out, err := cmd.CombinedOutput(); err != nil {
			binErr = fmt.Errorf("go build ./cmd/endpointlag: %v\n%s", err, out)
		}
	})
	if binErr != nil {
		t.Fatal(binErr)
	}
	return binPath
}

// checkFlags checks that endpointlag parses args: every flag exists and takes the value given.
// --help after them makes it exit 0 once they parse, before it validates or starts anything.
func checkFlags(t *testing.T, where string, args []string) {
	t.Helper()
	cmd := exec.Command(endpointlagBin(t), append(append([]string{}, args...), "--help")...)
	cmd.Env = append(os.Environ(), "NODE_NAME=node-a")
	if out, err := cmd.CombinedOutput(); err != nil {
		lines := strings.Split(strings.TrimSpace(string(out)), "\n")
		t.Errorf("%s: endpointlag does not take the args %q: %v: %s", where, args, err, lines[len(lines)-1])
	}
}
