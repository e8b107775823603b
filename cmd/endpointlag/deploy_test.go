package main

import (
	"fmt"
	"os"
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
	base, err := os.ReadFile("../../deploy/base/daemonset.yaml")
	if err != nil {
		t.Fatal(err)
	}
	patchYAML, err := os.ReadFile("../../deploy/overlays/enter-pods/enter-pods.yaml")
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
		t.Fatalf("enter-pods.yaml: %v", err)
	}
	patched, err := patch.Apply(baseJSON)
	if err != nil {
		t.Fatalf("enter-pods.yaml does not apply to the base DaemonSet: %v", err)
	}
	ds := checkDaemonSet(t, "deploy/overlays/enter-pods", patched)
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
	if err := fs.Parse(c.Args); err != nil {
		t.Fatalf("%s args %q: %v", where, c.Args, err)
	}
	if err := opts.Validate(); err != nil {
		t.Errorf("%s args %q: %v", where, c.Args, err)
	}
	return ds
}

// The aggregator's RBAC is events: create, nothing more; its Deployment runs the aggregate
// command, and the DaemonSet pushes to its Service.
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
			err = yaml.UnmarshalStrict([]byte(doc), &role)
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
	if want := fmt.Sprintf("--aggregator.urls=http://%s.endpointlag.svc:%d", svc.Name, svc.Spec.Ports[0].Port); !strings.Contains(string(ds), want) {
		t.Errorf("the DaemonSet does not push to the aggregator's Service (%s)", want)
	}
}
