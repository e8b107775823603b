package main

import (
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/spf13/pflag"
	jsonpatch "gopkg.in/evanphx/json-patch.v4"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	"sigs.k8s.io/yaml"
)

// The DaemonSet in deploy/ passes only flags the daemon has, with values it accepts.
func TestDeployedArgsAreValid(t *testing.T) {
	b, err := os.ReadFile("../../deploy/base/daemonset.yaml")
	if err != nil {
		t.Fatal(err)
	}
	ds := checkDaemonSet(t, "deploy/base", b)
	if ds.Spec.Template.Spec.HostPID {
		t.Error("deploy/base shares the host's PID namespace")
	}
}

// deploy/overlays/enter-pods adds --ingress.enter-pods and exactly what it needs: hostPID,
// SYS_ADMIN and SYS_PTRACE.
func TestEnterPodsOverlay(t *testing.T) {
	ds := checkDaemonSet(t, "deploy/overlays/enter-pods", patchedDaemonSet(t, "../../deploy/overlays/enter-pods/enter-pods.yaml"))
	c := ds.Spec.Template.Spec.Containers[0]
	if !ds.Spec.Template.Spec.HostPID || !slices.Contains(c.Args, "--ingress.enter-pods") {
		t.Errorf("the overlay lacks hostPID or --ingress.enter-pods: hostPID %v, args %q", ds.Spec.Template.Spec.HostPID, c.Args)
	}
	caps := c.SecurityContext.Capabilities.Add
	for _, want := range []corev1.Capability{"SYS_ADMIN", "SYS_PTRACE", "NET_ADMIN", "BPF"} {
		if !slices.Contains(caps, want) {
			t.Errorf("the overlay's capabilities %v lack %s", caps, want)
		}
	}
}

// deploy/overlays/no-auth serves and pushes plain HTTP: no --web.auth, no token, HTTP probes.
// (deploy/tools' tests compare the whole overlay with the chart's auth.enabled=false.)
func TestNoAuthOverlay(t *testing.T) {
	ds := checkDaemonSet(t, "deploy/overlays/no-auth", patchedDaemonSet(t, "../../deploy/overlays/no-auth/daemonset.yaml"))
	c := ds.Spec.Template.Spec.Containers[0]
	for _, a := range c.Args {
		if strings.HasPrefix(a, "--web.auth") || strings.HasPrefix(a, "--aggregator.token-file") || strings.HasPrefix(a, "--aggregator.insecure") {
			t.Errorf("the overlay keeps %s", a)
		}
	}
	if !slices.Contains(c.Args, "--aggregator.urls=http://endpointlag-aggregate.endpointlag.svc:9870") {
		t.Errorf("the overlay does not push over HTTP: %q", c.Args)
	}
	if c.ReadinessProbe.HTTPGet.Scheme != corev1.URISchemeHTTP || c.LivenessProbe.HTTPGet.Scheme != corev1.URISchemeHTTP {
		t.Error("the overlay's probes are not HTTP")
	}
}

// patchedDaemonSet applies an overlay's JSON patch (RFC 6902) to the base DaemonSet.
func patchedDaemonSet(t *testing.T, patchFile string) []byte {
	t.Helper()
	base, err := os.ReadFile("../../deploy/base/daemonset.yaml")
	if err != nil {
		t.Fatal(err)
	}
	patchYAML, err := os.ReadFile(patchFile)
	if err != nil {
		t.Fatal(err)
	}
	baseJSON, err := yaml.YAMLToJSON(base)
	if err != nil {
		t.Fatal(err)
	}
	patchJSON, err := yaml.YAMLToJSON(patchYAML)
	if err != nil {
		t.Fatal(err)
	}
	patch, err := jsonpatch.DecodePatch(patchJSON)
	if err != nil {
		t.Fatalf("%s: %v", patchFile, err)
	}
	patched, err := patch.Apply(baseJSON)
	if err != nil {
		t.Fatalf("%s does not apply to the base DaemonSet: %v", patchFile, err)
	}
	return patched
}

// checkDaemonSet decodes a DaemonSet strictly and checks that its container's args parse and
// validate as the daemon's flags, and that NODE_NAME comes from the downward API.
func checkDaemonSet(t *testing.T, where string, b []byte) appsv1.DaemonSet {
	t.Helper()
	var ds appsv1.DaemonSet
	if err := yaml.UnmarshalStrict(b, &ds); err != nil {
		t.Fatalf("%s: %v", where, err)
	}
	c := ds.Spec.Template.Spec.Containers[0]
	var nodeFromDownwardAPI bool
	for _, e := range c.Env {
		nodeFromDownwardAPI = nodeFromDownwardAPI ||
			(e.Name == "NODE_NAME" && e.ValueFrom != nil && e.ValueFrom.FieldRef != nil && e.ValueFrom.FieldRef.FieldPath == "spec.nodeName")
	}
	if !nodeFromDownwardAPI {
		t.Errorf("%s: the DaemonSet does not set NODE_NAME from spec.nodeName", where)
	}
	t.Setenv("NODE_NAME", "node-a")
	fs := pflag.NewFlagSet("endpointlag", pflag.ContinueOnError)
	var opts Options
	bindFlags(fs, &opts)
	if err := fs.Parse(inPodFiles(t, c.Args)); err != nil {
		t.Fatalf("%s args %q: %v", where, c.Args, err)
	}
	if err := opts.Validate(); err != nil {
		t.Errorf("%s args %q: %v", where, c.Args, err)
	}
	return ds
}

// inPodFiles replaces the paths of the files the kubelet mounts into the pod (the ServiceAccount's
// token) with files of the same kind, so that Validate, which reads them, can run here.
func inPodFiles(t *testing.T, args []string) []string {
	t.Helper()
	const token = "/var/run/secrets/kubernetes.io/serviceaccount/token"
	out := slices.Clone(args)
	for i, a := range out {
		if name, path, ok := strings.Cut(a, "="); ok && path == token {
			f := filepath.Join(t.TempDir(), "token")
			if err := os.WriteFile(f, []byte("a-token"), 0o600); err != nil {
				t.Fatal(err)
			}
			out[i] = name + "=" + f
		}
	}
	return out
}

// The aggregator's own ClusterRole is events: create, nothing more; its Deployment runs the
// aggregate command, and the DaemonSet pushes to its Service (over HTTPS: --web.auth=kubernetes).
func TestAggregateManifest(t *testing.T) {
	b, err := os.ReadFile("../../deploy/base/aggregate.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var role rbacv1.ClusterRole
	var dep appsv1.Deployment
	var svc corev1.Service
	for _, doc := range strings.Split(string(b), "\n---\n") {
		var meta struct{ Kind string }
		if err := yaml.Unmarshal([]byte(doc), &meta); err != nil {
			t.Fatal(err)
		}
		switch meta.Kind {
		case "ClusterRole":
			var r rbacv1.ClusterRole
			if err = yaml.UnmarshalStrict([]byte(doc), &r); err == nil && r.Name == "endpointlag-aggregate" {
				role = r
			}
		case "Deployment":
			err = yaml.UnmarshalStrict([]byte(doc), &dep)
		case "Service":
			err = yaml.UnmarshalStrict([]byte(doc), &svc)
		}
		if err != nil {
			t.Fatalf("%s: %v", meta.Kind, err)
		}
	}
	want := []rbacv1.PolicyRule{{APIGroups: []string{""}, Resources: []string{"events"}, Verbs: []string{"create"}}}
	if !reflect.DeepEqual(role.Rules, want) {
		t.Errorf("the aggregator's ClusterRole grants %+v, want events: create only", role.Rules)
	}
	if args := dep.Spec.Template.Spec.Containers[0].Args; len(args) == 0 || args[0] != "aggregate" {
		t.Errorf("the aggregator's Deployment runs %q", args)
	}
	ds, err := os.ReadFile("../../deploy/base/daemonset.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if want := fmt.Sprintf("--aggregator.urls=https://%s.endpointlag.svc:%d", svc.Name, svc.Spec.Ports[0].Port); !strings.Contains(string(ds), want) {
		t.Errorf("the DaemonSet does not push to the aggregator's Service (%s)", want)
	}
}
