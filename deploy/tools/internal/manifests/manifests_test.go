package manifests

import (
	"os"
	"path/filepath"
	"reflect"
	"testing"
)

func TestSplitBySource(t *testing.T) {
	out := []byte(`---
# Source: endpointlag/templates/rbac.yaml
apiVersion: v1
kind: ServiceAccount
metadata:
  name: a
---
# Source: endpointlag/templates/rbac.yaml
# a comment kept with its object
apiVersion: v1
kind: ServiceAccount
metadata:
  name: b
---
# Source: endpointlag/templates/empty.yaml
# only a comment: no object
`)
	docs, err := SplitBySource(out)
	if err != nil {
		t.Fatal(err)
	}
	want := []Doc{
		{"endpointlag/templates/rbac.yaml", []byte("apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: a\n")},
		{"endpointlag/templates/rbac.yaml", []byte("# a comment kept with its object\napiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: b\n")},
	}
	if !reflect.DeepEqual(docs, want) {
		t.Errorf("got %q, want %q", docs, want)
	}
	if _, err := SplitBySource([]byte("---\napiVersion: v1\nkind: ServiceAccount\n")); err == nil {
		t.Error("a document without # Source: was accepted")
	}
}

func TestStaleAndWrite(t *testing.T) {
	dir := t.TempDir()
	files := map[string][]byte{"a.yaml": []byte("a\n"), "kustomization.yaml": []byte("k\n")}
	if got := Stale(dir, files); !reflect.DeepEqual(got, []string{"a.yaml", "kustomization.yaml"}) {
		t.Errorf("an empty directory: stale %v", got)
	}
	if err := os.WriteFile(filepath.Join(dir, "old.yaml"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	if got := Stale(dir, files); !reflect.DeepEqual(got, []string{"a.yaml", "kustomization.yaml", "old.yaml (not generated)"}) {
		t.Errorf("stale %v", got)
	}
	if err := Write(dir, files); err != nil {
		t.Fatal(err)
	}
	if got := Stale(dir, files); len(got) != 0 {
		t.Errorf("after Write: stale %v", got)
	}
	if _, err := os.Stat(filepath.Join(dir, "old.yaml")); !os.IsNotExist(err) {
		t.Error("Write kept a YAML file it does not generate")
	}
}
