package main

import (
	"os"
	"testing"

	"github.com/spf13/pflag"
	appsv1 "k8s.io/api/apps/v1"
	"sigs.k8s.io/yaml"
)

// The DaemonSet in deploy/ passes only flags the daemon has, with values it accepts.
func TestDeployedArgsAreValid(t *testing.T) {
	b, err := os.ReadFile("../../deploy/base/daemonset.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var ds appsv1.DaemonSet
	if err := yaml.UnmarshalStrict(b, &ds); err != nil {
		t.Fatal(err)
	}
	c := ds.Spec.Template.Spec.Containers[0]
	var nodeFromDownwardAPI bool
	for _, e := range c.Env {
		nodeFromDownwardAPI = nodeFromDownwardAPI ||
			(e.Name == "NODE_NAME" && e.ValueFrom != nil && e.ValueFrom.FieldRef != nil && e.ValueFrom.FieldRef.FieldPath == "spec.nodeName")
	}
	if !nodeFromDownwardAPI {
		t.Error("the DaemonSet does not set NODE_NAME from spec.nodeName")
	}
	t.Setenv("NODE_NAME", "node-a")
	fs := pflag.NewFlagSet("endpointlag", pflag.ContinueOnError)
	var opts Options
	bindFlags(fs, &opts)
	if err := fs.Parse(c.Args); err != nil {
		t.Fatalf("deploy/base/daemonset.yaml args %q: %v", c.Args, err)
	}
	if err := opts.Validate(); err != nil {
		t.Errorf("deploy/base/daemonset.yaml args %q: %v", c.Args, err)
	}
}
