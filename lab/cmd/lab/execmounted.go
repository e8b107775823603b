package main

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// execMounted bind-mounts each --bind=SRC:DST read-only in a mount namespace of its own, keeps only
// the capabilities --caps names (when given) and then executes the command that follows `--`:
// how the lab's kubelet gives a pod's process its volumes (the ServiceAccount token at the path
// client-go's in-cluster configuration reads) and its container's capabilities.
func execMounted(args []string) error {
	var binds [][2]string
	var caps []string
	limitCaps := false
	for len(args) > 0 && args[0] != "--" {
		if list, ok := strings.CutPrefix(args[0], "--caps="); ok {
			limitCaps = true
			if list != "" {
				caps = strings.Split(list, ",")
			}
			args = args[1:]
			continue
		}
		spec, ok := strings.CutPrefix(args[0], "--bind=")
		if !ok {
			return fmt.Errorf("unknown argument %q (want [--caps=NAME,...] --bind=SRC:DST ... -- COMMAND ...)", args[0])
		}
		src, dst, ok := strings.Cut(spec, ":")
		if !ok || src == "" || dst == "" {
			return fmt.Errorf("--bind=%s: want SRC:DST", spec)
		}
		binds = append(binds, [2]string{src, dst})
		args = args[1:]
	}
	if len(args) < 2 {
		return errors.New("no command after --")
	}
	args = args[1:]
	// Mount namespaces and capabilities belong to a thread: this one makes them and executes the
	// command, which keeps them.
	runtime.LockOSThread()
	if len(binds) > 0 {
		// A mount namespace of its own, whose mounts nothing else sees.
		if err := unix.Unshare(unix.CLONE_NEWNS); err != nil {
			return fmt.Errorf("a mount namespace: %w", err)
		}
		if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
			return fmt.Errorf("making the mount namespace private: %w", err)
		}
	}
	for _, b := range binds {
		if err := unix.Mount(b[0], b[1], "", unix.MS_BIND, ""); err != nil {
			return fmt.Errorf("bind-mounting %s on %s: %w", b[0], b[1], err)
		}
		if err := unix.Mount("", b[1], "", unix.MS_BIND|unix.MS_REMOUNT|unix.MS_RDONLY, ""); err != nil {
			return fmt.Errorf("making %s read-only: %w", b[1], err)
		}
	}
	if limitCaps {
		if err := keepCapabilities(caps); err != nil {
			return err
		}
	}
	path, err := exec.LookPath(args[0])
	if err != nil {
		return err
	}
	return syscall.Exec(path, args, os.Environ())
}

// capabilityNumbers are the capabilities a container's securityContext may name, by the name
// Kubernetes uses (without CAP_), as linux/capability.h numbers them.
var capabilityNumbers = map[string]uintptr{
	"CHOWN": 0, "DAC_OVERRIDE": 1, "DAC_READ_SEARCH": 2, "FOWNER": 3, "FSETID": 4, "KILL": 5, "SETGID": 6, "SETUID": 7,
	"SETPCAP": 8, "LINUX_IMMUTABLE": 9, "NET_BIND_SERVICE": 10, "NET_BROADCAST": 11, "NET_ADMIN": 12, "NET_RAW": 13,
	"IPC_LOCK": 14, "IPC_OWNER": 15, "SYS_MODULE": 16, "SYS_RAWIO": 17, "SYS_CHROOT": 18, "SYS_PTRACE": 19, "SYS_PACCT": 20,
	"SYS_ADMIN": 21, "SYS_BOOT": 22, "SYS_NICE": 23, "SYS_RESOURCE": 24, "SYS_TIME": 25, "SYS_TTY_CONFIG": 26, "MKNOD": 27,
	"LEASE": 28, "AUDIT_WRITE": 29, "AUDIT_CONTROL": 30, "SETFCAP": 31, "MAC_OVERRIDE": 32, "MAC_ADMIN": 33, "SYSLOG": 34,
	"WAKE_ALARM": 35, "BLOCK_SUSPEND": 36, "AUDIT_READ": 37, "PERFMON": 38, "BPF": 39, "CHECKPOINT_RESTORE": 40,
}

// keepCapabilities drops every capability but names from the bounding and inheritable sets, so
// that the command executed next — run as root — starts with exactly those, as a container
// runtime starts a container whose securityContext drops ALL and adds names.
func keepCapabilities(names []string) error {
	keep := map[uintptr]bool{}
	for _, n := range names {
		c, ok := capabilityNumbers[strings.TrimPrefix(n, "CAP_")]
		if !ok {
			return fmt.Errorf("--caps: unknown capability %q", n)
		}
		keep[c] = true
	}
	b, err := os.ReadFile("/proc/sys/kernel/cap_last_cap")
	if err != nil {
		return err
	}
	last, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		return fmt.Errorf("/proc/sys/kernel/cap_last_cap: %w", err)
	}
	for c := uintptr(0); c <= uintptr(last); c++ {
		if !keep[c] {
			if err := unix.Prctl(unix.PR_CAPBSET_DROP, c, 0, 0, 0); err != nil {
				return fmt.Errorf("dropping capability %d from the bounding set: %w", c, err)
			}
		}
	}
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		return err
	}
	var inh [2]uint32
	for c := range keep {
		inh[c/32] |= 1 << (c % 32)
	}
	data[0].Inheritable, data[1].Inheritable = data[0].Inheritable&inh[0], data[1].Inheritable&inh[1]
	return unix.Capset(&hdr, &data[0])
}
