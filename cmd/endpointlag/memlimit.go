package main

import (
	"bufio"
	"errors"
	"fmt"
	"io/fs"
	"math"
	"os"
	"path/filepath"
	"runtime/debug"
	"strconv"
	"strings"
)

// memoryLimitShare is the part of the container's memory limit the Go heap aims to stay under:
// the rest is for the runtime's own overhead, stacks and the eBPF maps' user-space copies.
const memoryLimitShare = 0.9

// cgroupMemoryLimit returns the memory limit of the cgroup the process runs in, read below root
// (normally /sys/fs/cgroup) after procCgroup (/proc/self/cgroup); the smallest limit of the
// cgroup and its parents counts. ok is false when no limit is set.
func cgroupMemoryLimit(root, procCgroup string) (limit int64, ok bool, err error) {
	f, err := os.Open(procCgroup)
	if err != nil {
		return 0, false, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// hierarchy-ID:controllers:path; cgroup v2 is "0::path", v1's memory controller
		// "N:memory:path" (possibly with other controllers in the list).
		id, rest, _ := strings.Cut(sc.Text(), ":")
		controllers, path, found := strings.Cut(rest, ":")
		switch {
		case !found:
			continue
		case id == "0" && controllers == "":
			return smallestLimit(root, path, "memory.max")
		case hasController(controllers, "memory"):
			return smallestLimit(filepath.Join(root, "memory"), path, "memory.limit_in_bytes")
		}
	}
	if err := sc.Err(); err != nil {
		return 0, false, err
	}
	return 0, false, nil
}

func hasController(list, name string) bool {
	for c := range strings.SplitSeq(list, ",") {
		if c == name {
			return true
		}
	}
	return false
}

// smallestLimit reads file in dir/path and each parent up to dir. "max" (v2) and cgroup v1's
// page-rounded maximum mean no limit.
func smallestLimit(dir, path, file string) (int64, bool, error) {
	limit, ok := int64(math.MaxInt64), false
	for p := filepath.Clean("/" + path); ; p = filepath.Dir(p) {
		b, err := os.ReadFile(filepath.Join(dir, p, file))
		switch {
		case errors.Is(err, fs.ErrNotExist):
		case err != nil:
			return 0, false, err
		default:
			s := strings.TrimSpace(string(b))
			if s != "max" {
				n, err := strconv.ParseInt(s, 10, 64)
				if err != nil {
					return 0, false, fmt.Errorf("%s: %q is not a byte count", filepath.Join(dir, p, file), s)
				}
				if n > 0 && n < 1<<62 && n < limit {
					limit, ok = n, true
				}
			}
		}
		if p == "/" {
			return limit, ok, nil
		}
	}
}

// setMemoryLimit gives the Go runtime a soft memory limit of memoryLimitShare of the container's
// limit, so that it collects harder before the kernel's OOM killer would act, and says what it
// set. GOMEMLIMIT, when set, wins: the runtime has read it already.
func setMemoryLimit(root, procCgroup string) string {
	if v := os.Getenv("GOMEMLIMIT"); v != "" {
		return "GOMEMLIMIT=" + v + " (from the environment)"
	}
	limit, ok, err := cgroupMemoryLimit(root, procCgroup)
	switch {
	case err != nil:
		return "not set: reading the cgroup's memory limit: " + err.Error()
	case !ok:
		return "not set: the cgroup has no memory limit"
	}
	soft := int64(float64(limit) * memoryLimitShare)
	debug.SetMemoryLimit(soft)
	return fmt.Sprintf("%d bytes, %.0f%% of the cgroup's %d", soft, 100*memoryLimitShare, limit)
}
