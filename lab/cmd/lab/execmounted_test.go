package main

import (
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
)

// The child processes of the tests below: TestKeepCapabilities's keeps what LAB_TEST_CAPS names,
// then runs cat; TestExecMounted's runs `lab exec-mounted` with the arguments in
// LAB_TEST_EXEC_MOUNTED (separated by U+001F).
func init() {
	if a, ok := os.LookupEnv("LAB_TEST_EXEC_MOUNTED"); ok {
		err := execMounted(strings.Split(a, "\x1f"))
		os.Stderr.WriteString(err.Error() + "\n")
		os.Exit(5)
	}
	if caps, ok := os.LookupEnv("LAB_TEST_CAPS"); ok {
		runtime.LockOSThread()
		var names []string
		if caps != "" {
			names = strings.Split(caps, ",")
		}
		if err := keepCapabilities(names); err != nil {
			os.Stderr.WriteString(err.Error() + "\n")
			os.Exit(3)
		}
		if err := syscall.Exec("/bin/cat", []string{"cat", "/proc/self/status"}, os.Environ()); err != nil {
			os.Stderr.WriteString(err.Error() + "\n")
			os.Exit(4)
		}
	}
}

// A process executed after keepCapabilities, as root, has exactly the capabilities named: none
// more in its bounding, permitted or effective sets.
func TestKeepCapabilities(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: only root can be limited to chosen capabilities this way")
	}
	for _, tc := range []struct {
		caps string
		want uint64
	}{
		{"NET_ADMIN,NET_RAW,BPF", 1<<12 | 1<<13 | 1<<39},
		{"BPF,PERFMON", 1<<38 | 1<<39},
		{"", 0},
	} {
		cmd := exec.Command(os.Args[0], "-test.run=^$")
		cmd.Env = append(os.Environ(), "LAB_TEST_CAPS="+tc.caps)
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("caps %q: %v: %s", tc.caps, err, out)
		}
		sets := map[string]uint64{}
		for _, line := range strings.Split(string(out), "\n") {
			if k, v, ok := strings.Cut(line, ":\t"); ok && strings.HasPrefix(k, "Cap") {
				n, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64)
				if err != nil {
					t.Fatalf("%s: %v", line, err)
				}
				sets[k] = n
			}
		}
		for _, set := range []string{"CapBnd", "CapPrm", "CapEff"} {
			if got, ok := sets[set]; !ok || got != tc.want {
				t.Errorf("caps %q: %s = %#x, want %#x", tc.caps, set, got, tc.want)
			}
		}
	}
	if err := keepCapabilities([]string{"NO_SUCH"}); err == nil || !strings.Contains(err.Error(), `unknown capability "NO_SUCH"`) {
		t.Errorf("an unknown capability: %v", err)
	}
}

// exec-mounted shows the command its volumes at their mount points, read-only, and nothing of
// that is seen outside it.
func TestExecMounted(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: mount namespaces and bind mounts")
	}
	src, dst := t.TempDir(), t.TempDir()
	if err := os.WriteFile(src+"/token", []byte("a-token"), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	args := []string{"--bind=" + src + ":" + dst, "--", "sh", "-c", "cat " + dst + "/token; touch " + dst + "/x"}
	cmd.Env = append(os.Environ(), "LAB_TEST_EXEC_MOUNTED="+strings.Join(args, "\x1f"))
	out, _ := cmd.CombinedOutput()
	if !strings.HasPrefix(string(out), "a-token") || !strings.Contains(string(out), "Read-only file system") {
		t.Errorf("the command read %q: want the token, then touch refused on a read-only mount", out)
	}
	if entries, err := os.ReadDir(dst); err != nil || len(entries) != 0 {
		t.Errorf("the mount point outside the command's namespace holds %v (%v), want nothing", entries, err)
	}
	if err := execMounted([]string{"--bind=nocolon", "--", "true"}); err == nil || !strings.Contains(err.Error(), "want SRC:DST") {
		t.Errorf("a bad --bind: %v", err)
	}
}
