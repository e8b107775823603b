package ingress

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"sync"
	"syscall"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// insidePod tells whether an admin address can only be reached from inside the proxy's pod: a
// loopback address, or a unix socket (a path in the pod's filesystem).
func insidePod(address string) bool {
	u, err := url.Parse(address)
	if err != nil {
		return false
	}
	if u.Scheme == "unix" {
		return true
	}
	host := u.Hostname()
	if host == "localhost" {
		return true
	}
	ip, err := netip.ParseAddr(host)
	return err == nil && ip.IsLoopback()
}

// podDialer reaches an admin interface that listens only inside one pod. A TCP connection is
// opened from a thread that entered the pod's network namespace; a unix socket is reached through
// /proc/<pid>/root of a process of the pod. The pod is found by its IP: the network namespace
// holding that address. It takes the host's PID namespace (hostPID), CAP_SYS_ADMIN to enter a
// network namespace and CAP_SYS_PTRACE to open another user's /proc/<pid>/ns/net and root.
type podDialer struct {
	procRoot string
	podIP    netip.Addr

	mu sync.Mutex
	// pids are the processes found in the pod's network namespace at the last lookup.
	pids []int
}

func newPodDialer(procRoot string, podIP netip.Addr) *podDialer {
	return &podDialer{procRoot: procRoot, podIP: podIP}
}

// DialContext dials address inside the pod: network "unix" for a socket path in the pod's
// filesystem, else TCP in its network namespace. A failure looks the pod up again once (its
// processes restarted).
func (d *podDialer) DialContext(ctx context.Context, network, address string) (net.Conn, error) {
	conn, err := d.dial(ctx, network, address, false)
	if err == nil || ctx.Err() != nil {
		return conn, err
	}
	return d.dial(ctx, network, address, true)
}

func (d *podDialer) dial(ctx context.Context, network, address string, relook bool) (net.Conn, error) {
	pids, err := d.processes(relook)
	if err != nil {
		return nil, err
	}
	if network == "unix" {
		var errs []error
		for _, pid := range pids {
			path := filepath.Join(d.procRoot, strconv.Itoa(pid), "root", address)
			if _, err := os.Stat(path); err != nil {
				errs = append(errs, err)
				continue
			}
			var nd net.Dialer
			return nd.DialContext(ctx, "unix", path)
		}
		return nil, fmt.Errorf("no process of the pod with IP %s has %s: %w", d.podIP, address, errors.Join(errs...))
	}
	var lastErr error
	for _, pid := range pids {
		conn, err := dialInNetns(ctx, filepath.Join(d.procRoot, strconv.Itoa(pid), "ns", "net"), network, address)
		if err == nil {
			return conn, nil
		}
		lastErr = err
		if !errors.Is(err, errNetnsGone) {
			break
		}
	}
	return nil, lastErr
}

// processes returns the processes in the pod's network namespace, looking them up when asked to
// or when none is known.
func (d *podDialer) processes(relook bool) ([]int, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if len(d.pids) > 0 && !relook {
		return d.pids, nil
	}
	pids, err := findNetns(d.procRoot, d.podIP)
	if err != nil {
		return nil, err
	}
	d.pids = pids
	return pids, nil
}

var errNetnsGone = errors.New("the process's network namespace is gone")

// dialInNetns opens the connection from a locked thread that entered the namespace at nsPath: the
// socket is created there and stays there. The thread goes back to its own namespace after; if it
// cannot, it is never unlocked, and the runtime ends it with its goroutine.
func dialInNetns(ctx context.Context, nsPath, network, address string) (net.Conn, error) {
	type result struct {
		conn net.Conn
		err  error
	}
	done := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		own, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			done <- result{err: fmt.Errorf("reading this thread's network namespace: %w", err)}
			return
		}
		defer own.Close()
		target, err := netns.GetFromPath(nsPath)
		if err != nil {
			runtime.UnlockOSThread()
			done <- result{err: fmt.Errorf("%w: %s: %w", errNetnsGone, nsPath, err)}
			return
		}
		defer target.Close()
		if err := netns.Set(target); err != nil {
			runtime.UnlockOSThread()
			done <- result{err: fmt.Errorf("entering the pod's network namespace (needs CAP_SYS_ADMIN): %w", err)}
			return
		}
		var nd net.Dialer
		conn, err := nd.DialContext(ctx, network, address)
		if netns.Set(own) == nil {
			runtime.UnlockOSThread()
		}
		done <- result{conn: conn, err: err}
	}()
	r := <-done
	return r.conn, r.err
}

// findNetns finds the network namespace that holds ip on one of its links, and the processes in
// it, by walking procRoot. Each namespace is looked at once, whatever the number of its
// processes.
func findNetns(procRoot string, ip netip.Addr) ([]int, error) {
	entries, err := os.ReadDir(procRoot)
	if err != nil {
		return nil, fmt.Errorf("listing processes: %w", err)
	}
	byIno := map[uint64][]int{}
	var order []uint64
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		var st syscall.Stat_t
		if syscall.Stat(filepath.Join(procRoot, e.Name(), "ns", "net"), &st) != nil {
			continue // gone, or not ours to see
		}
		if _, seen := byIno[st.Ino]; !seen {
			order = append(order, st.Ino)
		}
		byIno[st.Ino] = append(byIno[st.Ino], pid)
	}
	var denied int
	for _, ino := range order {
		pids := byIno[ino]
		has, err := holds(filepath.Join(procRoot, strconv.Itoa(pids[0]), "ns", "net"), ip)
		if err != nil {
			denied++
			continue
		}
		if has {
			return pids, nil
		}
	}
	if denied > 0 {
		return nil, fmt.Errorf("no network namespace holds the pod IP %s (%d could not be read: the daemon needs hostPID, CAP_SYS_ADMIN and CAP_SYS_PTRACE)", ip, denied)
	}
	return nil, fmt.Errorf("no network namespace holds the pod IP %s (the daemon needs hostPID to see the pod's processes)", ip)
}

// holds tells whether the namespace at nsPath has ip on one of its links.
func holds(nsPath string, ip netip.Addr) (bool, error) {
	ns, err := netns.GetFromPath(nsPath)
	if err != nil {
		return false, err
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		return false, err
	}
	defer h.Close()
	family := netlink.FAMILY_V4
	if ip.Is6() && !ip.Is4In6() {
		family = netlink.FAMILY_V6
	}
	addrs, err := h.AddrList(nil, family)
	if err != nil {
		return false, err
	}
	for _, a := range addrs {
		if got, ok := netip.AddrFromSlice(a.IP); ok && got.Unmap() == ip.Unmap() {
			return true, nil
		}
	}
	return false, nil
}
