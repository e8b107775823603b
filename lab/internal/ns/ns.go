// Package ns creates, enters and removes the lab's network namespaces. Every namespace the lab
// makes is named with Prefix, so that a later run can remove what a crashed one left behind
// without touching anything else.
package ns

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"runtime"
	"strings"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// Prefix starts the name of every network namespace, and of every link in the root namespace,
// that the lab creates.
const Prefix = "elab-"

// Create makes a named network namespace (as `ip netns add` does) with its loopback up.
func Create(name string) error {
	if !strings.HasPrefix(name, Prefix) {
		return fmt.Errorf("namespace %q lacks the lab prefix %q", name, Prefix)
	}
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		return fmt.Errorf("ip netns add %s: %v: %s", name, err, strings.TrimSpace(string(out)))
	}
	h, err := Handle(name)
	if err != nil {
		return err
	}
	defer h.Close()
	lo, err := h.LinkByName("lo")
	if err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	if err := h.LinkSetUp(lo); err != nil {
		return fmt.Errorf("%s: lo up: %w", name, err)
	}
	return nil
}

// Delete removes a named network namespace; a missing one is not an error.
func Delete(name string) error {
	if _, err := os.Stat("/run/netns/" + name); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if out, err := exec.Command("ip", "netns", "delete", name).CombinedOutput(); err != nil {
		return fmt.Errorf("ip netns delete %s: %v: %s", name, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// List returns the named network namespaces that carry the lab prefix.
func List() ([]string, error) {
	entries, err := os.ReadDir("/run/netns")
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []string
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), Prefix) {
			out = append(out, e.Name())
		}
	}
	return out, nil
}

// Handle returns a netlink handle working in the named namespace.
func Handle(name string) (*netlink.Handle, error) {
	h, err := netns.GetFromName(name)
	if err != nil {
		return nil, fmt.Errorf("namespace %s: %w", name, err)
	}
	defer h.Close()
	nh, err := netlink.NewHandleAt(h)
	if err != nil {
		return nil, fmt.Errorf("netlink in %s: %w", name, err)
	}
	return nh, nil
}

// Do runs fn on an OS thread that is in the named namespace. Sockets fn creates belong to that
// namespace and can be used from any goroutine afterwards.
func Do(name string, fn func() error) error {
	target, err := netns.GetFromName(name)
	if err != nil {
		return fmt.Errorf("namespace %s: %w", name, err)
	}
	defer target.Close()
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			errc <- err
			return
		}
		defer orig.Close()
		if err := netns.Set(target); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("entering %s: %w", name, err)
			return
		}
		ferr := fn()
		// A thread that cannot go back stays locked, and Go ends it with the goroutine.
		if err := netns.Set(orig); err == nil {
			runtime.UnlockOSThread()
		}
		errc <- ferr
	}()
	return <-errc
}

// Dial connects from inside the named namespace, with d (nil for the defaults).
func Dial(ctx context.Context, name string, d *net.Dialer, network, addr string) (net.Conn, error) {
	if d == nil {
		d = &net.Dialer{}
	}
	var c net.Conn
	err := Do(name, func() error {
		var err error
		c, err = d.DialContext(ctx, network, addr)
		return err
	})
	return c, err
}

// Command returns a command that runs in the named namespace.
func Command(name string, args ...string) *exec.Cmd {
	return exec.Command("ip", append([]string{"netns", "exec", name}, args...)...)
}

// Sysctl sets a sysctl of the named namespace (net.* sysctls are per namespace: /proc/sys/net
// shows the namespace of the thread that opens it).
func Sysctl(name, key, value string) error {
	path := "/proc/sys/" + strings.ReplaceAll(key, ".", "/")
	return Do(name, func() error {
		if err := os.WriteFile(path, []byte(value), 0o644); err != nil {
			return fmt.Errorf("%s: sysctl %s=%s: %w", name, key, value, err)
		}
		return nil
	})
}
