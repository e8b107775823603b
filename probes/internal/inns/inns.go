// Package inns runs code in the network namespace a probe watches: directly in the daemon's own,
// or on an OS thread moved into another (the probes' tests give each probe a namespace of its
// own).
package inns

import (
	"fmt"
	"runtime"

	"golang.org/x/sys/unix"
)

// Do runs f in the network namespace open as fd, or in the current one when fd is negative.
func Do(fd int, f func() error) error {
	if fd < 0 {
		return f()
	}
	errc := make(chan error, 1)
	go func() {
		// The thread is never unlocked, so it ends with this goroutine and no other code runs
		// in the namespace.
		runtime.LockOSThread()
		if err := unix.Setns(fd, unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("entering the network namespace: %w", err)
			return
		}
		errc <- f()
	}()
	return <-errc
}
