package main

import (
	"os"
	"path/filepath"
	"runtime/debug"
	"strings"
	"testing"
)

func writeFiles(t *testing.T, files map[string]string) string {
	t.Helper()
	dir := t.TempDir()
	for name, content := range files {
		p := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

func TestCgroupMemoryLimit(t *testing.T) {
	for _, tc := range []struct {
		name  string
		files map[string]string
		limit int64
		ok    bool
	}{
		{"v2, a container's own cgroup namespace", map[string]string{
			"proc": "0::/\n", "cg/memory.max": "268435456\n"}, 268435456, true},
		{"v2, the limit on the pod's cgroup above the container's", map[string]string{
			"proc": "0::/kubepods/pod1/ctr\n", "cg/kubepods/pod1/ctr/memory.max": "max\n",
			"cg/kubepods/pod1/memory.max": "536870912\n", "cg/kubepods/memory.max": "max\n"}, 536870912, true},
		{"v2, the smaller of two limits", map[string]string{
			"proc": "0::/a/b\n", "cg/a/b/memory.max": "1000\n", "cg/a/memory.max": "2000\n"}, 1000, true},
		{"v2, no limit", map[string]string{"proc": "0::/a\n", "cg/a/memory.max": "max\n"}, 0, false},
		{"v1, memory among other controllers", map[string]string{
			"proc": "12:pids:/x\n4:cpuacct,memory:/kubepods/pod1\n", "cg/memory/kubepods/pod1/memory.limit_in_bytes": "134217728\n"}, 134217728, true},
		{"v1, the page-rounded maximum is no limit", map[string]string{
			"proc": "4:memory:/\n", "cg/memory/memory.limit_in_bytes": "9223372036854771712\n"}, 0, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := writeFiles(t, tc.files)
			limit, ok, err := cgroupMemoryLimit(filepath.Join(dir, "cg"), filepath.Join(dir, "proc"))
			if err != nil || limit != tc.limit && tc.ok || ok != tc.ok {
				t.Errorf("got %d, %v, %v; want %d, %v", limit, ok, err, tc.limit, tc.ok)
			}
		})
	}
	dir := writeFiles(t, map[string]string{"proc": "0::/\n", "cg/memory.max": "lots\n"})
	if _, _, err := cgroupMemoryLimit(filepath.Join(dir, "cg"), filepath.Join(dir, "proc")); err == nil || !strings.Contains(err.Error(), `"lots"`) {
		t.Errorf("a broken memory.max: %v, want an error quoting it", err)
	}
}

func TestSetMemoryLimit(t *testing.T) {
	before := debug.SetMemoryLimit(-1)
	t.Cleanup(func() { debug.SetMemoryLimit(before) })
	t.Setenv("GOMEMLIMIT", "")
	dir := writeFiles(t, map[string]string{"proc": "0::/\n", "cg/memory.max": "1000000000\n"})
	msg := setMemoryLimit(filepath.Join(dir, "cg"), filepath.Join(dir, "proc"))
	if got := debug.SetMemoryLimit(-1); got != 900000000 {
		t.Errorf("limit %d after %q, want 90%% of 1000000000", got, msg)
	}
	t.Setenv("GOMEMLIMIT", "200MiB")
	debug.SetMemoryLimit(before)
	if msg := setMemoryLimit(filepath.Join(dir, "cg"), filepath.Join(dir, "proc")); !strings.Contains(msg, "from the environment") || debug.SetMemoryLimit(-1) != before {
		t.Errorf("with GOMEMLIMIT set: %q and the limit changed", msg)
	}
}
