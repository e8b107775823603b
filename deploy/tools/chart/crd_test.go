package chart_test

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"k8s.io/apiextensions-apiserver/pkg/apis/apiextensions"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	"k8s.io/apiextensions-apiserver/pkg/apiserver/validation"
	"sigs.k8s.io/yaml"
)

// The chart's Prometheus Operator objects pass the OpenAPI schemas of the operator's CRDs (the
// version deploy/tools/crds.sh copies), as an API server's validation would (its CEL rules aside:
// the lab's server-side dry run covers those).
func TestMonitoringObjectsMatchTheCRDs(t *testing.T) {
	helm := helmBin(t)
	dir := t.TempDir()
	if out, err := exec.Command("./../crds.sh", dir).CombinedOutput(); err != nil {
		t.Skipf("deploy/tools/crds.sh could not fetch the CRDs from the Go module proxy: %v\n%s", err, out)
	}
	validators := map[string]validation.SchemaValidator{}
	files, _ := filepath.Glob(filepath.Join(dir, "*.yaml"))
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		var crd apiextensionsv1.CustomResourceDefinition
		if err := yaml.Unmarshal(b, &crd); err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		for _, v := range crd.Spec.Versions {
			if v.Name != "v1" || v.Schema == nil {
				continue
			}
			var internal apiextensions.JSONSchemaProps
			if err := apiextensionsv1.Convert_v1_JSONSchemaProps_To_apiextensions_JSONSchemaProps(v.Schema.OpenAPIV3Schema, &internal, nil); err != nil {
				t.Fatal(err)
			}
			val, _, err := validation.NewSchemaValidator(&internal)
			if err != nil {
				t.Fatal(err)
			}
			validators[crd.Spec.Names.Kind] = val
		}
	}
	for _, kind := range []string{"ServiceMonitor", "PodMonitor", "PrometheusRule"} {
		if validators[kind] == nil {
			t.Fatalf("no v1 schema of %s in the CRDs", kind)
		}
	}
	// The validators do reject: a scrape interval that is no duration, an unknown scheme.
	bad := map[string]any{"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor", "metadata": map[string]any{"name": "x"},
		"spec": map[string]any{"selector": map[string]any{}, "endpoints": []any{map[string]any{"interval": "thirty", "scheme": "ftp"}}}}
	if errs := validation.ValidateCustomResource(nil, bad, validators["ServiceMonitor"]); len(errs) < 2 {
		t.Errorf("the ServiceMonitor schema accepts a bad endpoint: %v", errs)
	}
	for _, v := range variants {
		objs := decode(t, v.name, helmDocs(t, helm, v.args...))
		for key, obj := range objs.Raw {
			kind, _, _ := strings.Cut(key, " ")
			val := validators[kind]
			if val == nil {
				continue
			}
			if errs := validation.ValidateCustomResource(nil, obj, val); len(errs) > 0 {
				t.Errorf("%s: %s: %v", v.name, key, errs.ToAggregate())
			}
		}
	}
}
