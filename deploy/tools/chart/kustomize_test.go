package chart_test

import (
	"bufio"
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"testing"

	"sigs.k8s.io/kustomize/api/krusty"
	"sigs.k8s.io/kustomize/kyaml/filesys"
	"sigs.k8s.io/yaml"

	"github.com/endpointlag/endpointlag/deploy/tools/internal/manifests"
)

// deploy/base is the chart rendered at its defaults (make generate; make lint checks it too).
func TestBaseIsTheChart(t *testing.T) {
	helm := helmBin(t)
	files, err := manifests.Render(helm, chartDir)
	if err != nil {
		t.Fatal(err)
	}
	if stale := manifests.Stale(baseDir, files); len(stale) > 0 {
		t.Errorf("deploy/base is stale (%s): run make generate", strings.Join(stale, ", "))
	}
}

// kustomize renders a kustomization with kustomize's Go API (kubectl kustomize's, at the version
// helm's go.mod takes), and with kubectl kustomize too where kubectl is installed: both must
// render it, the same way.
func kustomize(t *testing.T, dir string) *Objects {
	t.Helper()
	res, err := krusty.MakeKustomizer(krusty.MakeDefaultOptions()).Run(filesys.MakeFsOnDisk(), dir)
	if err != nil {
		t.Fatalf("kustomize build %s: %v", dir, err)
	}
	out, err := res.AsYaml()
	if err != nil {
		t.Fatal(err)
	}
	objs := decode(t, dir, splitYAML(out))
	if k, err := exec.LookPath("kubectl"); err == nil {
		kout, err := exec.Command(k, "kustomize", dir).CombinedOutput()
		if err != nil {
			t.Fatalf("kubectl kustomize %s: %v\n%s", dir, err, kout)
		}
		if kobjs := decode(t, "kubectl kustomize "+dir, splitYAML(kout)); !reflect.DeepEqual(kobjs.Raw, objs.Raw) {
			t.Errorf("kubectl kustomize %s differs from kustomize's Go API", dir)
		}
	}
	return objs
}

// The base and every overlay render, and each overlay is the chart with the matching values.
func TestKustomize(t *testing.T) {
	helm := helmBin(t)
	base := func(more ...string) []string { return append(manifests.BaseArgs(), more...) }
	want := map[string][]string{
		baseDir:                                  base(),
		filepath.Join(overlaysDir, "no-auth"):    base("--set", "auth.enabled=false"),
		filepath.Join(overlaysDir, "enter-pods"): base("--set", "ingress.enterPods=true"),
	}
	overlays, _ := os.ReadDir(overlaysDir)
	for _, o := range overlays {
		if _, ok := want[filepath.Join(overlaysDir, o.Name())]; !ok {
			t.Errorf("deploy/overlays/%s has no chart values to compare with in this test", o.Name())
		}
	}
	for dir, args := range want {
		t.Run(filepath.Base(dir), func(t *testing.T) {
			got := kustomize(t, dir)
			chart := decode(t, "helm template "+strings.Join(args, " "), helmDocs(t, helm, args...))
			checkObjects(t, got, valuesOf(t, helm, args))
			for key, obj := range chart.Raw {
				if !reflect.DeepEqual(got.Raw[key], obj) {
					t.Errorf("%s: %s differs from the chart's with %q:\n%s", dir, key, args, diffYAML(t, obj, got.Raw[key]))
				}
			}
			for key := range got.Raw {
				if _, ok := chart.Raw[key]; !ok {
					t.Errorf("%s: %s is not in the chart's rendering with %q", dir, key, args)
				}
			}
		})
	}
}

func diffYAML(t *testing.T, want, got any) string {
	t.Helper()
	dir := t.TempDir()
	a, b := filepath.Join(dir, "chart.yaml"), filepath.Join(dir, "kustomize.yaml")
	for f, v := range map[string]any{a: want, b: got} {
		y, err := yaml.Marshal(v)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(f, y, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	out, _ := exec.Command("diff", "-u", a, b).CombinedOutput()
	return string(out)
}

// Every value of values.yaml has a "# --" comment there and a row in docs/install.md.
func TestValuesDocumented(t *testing.T) {
	documented, undocumented := valuesKeys(t, filepath.Join(chartDir, "values.yaml"))
	if len(undocumented) > 0 {
		t.Errorf("values.yaml: keys with no \"# --\" comment, on them or on a key above them: %v", undocumented)
	}
	doc, err := os.ReadFile(filepath.Join(repoRoot, "docs", "install.md"))
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range documented {
		if !bytes.Contains(doc, []byte("| `"+k+"` |")) {
			t.Errorf("docs/install.md has no row | `%s` |", k)
		}
	}
	rows := regexp.MustCompile("(?m)^\\| `([a-zA-Z0-9_.]+)` \\|").FindAllSubmatch(doc, -1)
	for _, r := range rows {
		if k := string(r[1]); !slices.Contains(documented, k) {
			t.Errorf("docs/install.md documents %s, which values.yaml does not have (or has no \"# --\" comment)", k)
		}
	}
}

// valuesKeys reads values.yaml's keys by their indentation: those a "# --" comment documents
// (their dotted paths), and those with no such comment on them or on a key above them.
func valuesKeys(t *testing.T, path string) (documented, undocumented []string) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	keyRE := regexp.MustCompile(`^( *)([A-Za-z0-9_-]+):`)
	type level struct {
		indent     int
		key        string
		documented bool
	}
	var stack []level
	pending := false
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := sc.Text()
		trim := strings.TrimSpace(line)
		if strings.HasPrefix(trim, "# --") {
			pending = true
			continue
		}
		if strings.HasPrefix(trim, "#") || trim == "" {
			continue
		}
		m := keyRE.FindStringSubmatch(line)
		if m == nil {
			continue // a list item or a continuation
		}
		indent := len(m[1])
		for len(stack) > 0 && stack[len(stack)-1].indent >= indent {
			stack = stack[:len(stack)-1]
		}
		under := len(stack) > 0 && stack[len(stack)-1].documented
		var path []string
		for _, l := range stack {
			path = append(path, l.key)
		}
		path = append(path, m[2])
		name := strings.Join(path, ".")
		switch {
		case under:
			// part of a documented value's default (resources.requests.cpu, a label)
		case pending:
			documented = append(documented, name)
		case strings.TrimSpace(line[len(m[0]):]) != "":
			undocumented = append(undocumented, name) // a value with no comment
		}
		stack = append(stack, level{indent, m[2], under || pending})
		pending = false
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return documented, undocumented
}
