// Package nfmon opens the nftables netlink monitor through which the nftables and iptables probes
// follow rule changes, sized for large nodes and reopened when the kernel drops messages. It reads
// the notifications itself and decodes only what the probes look at.
package nfmon

import (
	"context"
	"time"

	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// ReceiveBuffer is the monitor socket's receive buffer in bytes. One kube-proxy sync on a node
// with 10,000 Services notifies tens of thousands of rule changes at once (iptables mode rewrites
// KUBE-SERVICES whole); the default buffer (net.core.rmem_default, 208 KiB) overflows and the
// kernel drops them. Memory is only used while messages wait to be read. Tests shrink it to make
// the kernel drop messages.
var ReceiveBuffer = 64 << 20

// setReceiveBuffer forces the buffer size (CAP_NET_ADMIN), or asks for it within
// net.core.rmem_max without the capability.
func setReceiveBuffer(c *netlink.Conn) error {
	raw, err := c.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := raw.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, ReceiveBuffer)
	}); err != nil {
		return err
	}
	if serr != nil {
		return c.SetReadBuffer(ReceiveBuffer)
	}
	return nil
}

// ReopenRaw opens a new raw monitor after the last one closed, trying once a second until it
// succeeds or ctx is done (nil). Each failure goes to report.
func ReopenRaw(ctx context.Context, report func(error), nsfd int) *RawMonitor {
	m, _ := retry(ctx, report, func() (*RawMonitor, error) { return OpenRaw(nsfd) })
	return m
}

func retry[M any](ctx context.Context, report func(error), open func() (M, error)) (M, bool) {
	for {
		m, err := open()
		if err == nil {
			return m, true
		}
		report(err)
		select {
		case <-ctx.Done():
			var zero M
			return zero, false
		case <-time.After(time.Second):
		}
	}
}
