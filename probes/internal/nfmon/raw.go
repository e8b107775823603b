package nfmon

import (
	"errors"
	"fmt"
	"net"

	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// RawMonitor reports that a transaction was committed (NFT_MSG_NEWGEN) without decoding any of
// its messages: a cheap timing reference. google/nftables' monitor hands a generation over only
// after decoding every expression of it, which for a large transaction takes milliseconds.
type RawMonitor struct {
	// Generations delivers nil per committed transaction, then the error after which it closes.
	Generations <-chan error
	conn        *netlink.Conn
}

// OpenRaw starts a raw monitor in the network namespace open as nsfd (-1: the current one).
func OpenRaw(nsfd int) (*RawMonitor, error) {
	cfg := &netlink.Config{}
	if nsfd >= 0 {
		cfg.NetNS = nsfd
	}
	conn, err := netlink.Dial(unix.NETLINK_NETFILTER, cfg)
	if err != nil {
		return nil, fmt.Errorf("nftables monitor: %w", err)
	}
	err = setReceiveBuffer(conn)
	if err == nil {
		err = conn.JoinGroup(unix.NFNLGRP_NFTABLES)
	}
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("nftables monitor: %w", err)
	}
	ch := make(chan error, 64)
	m := &RawMonitor{Generations: ch, conn: conn}
	go func() {
		defer close(ch)
		for {
			msgs, err := conn.Receive()
			if err != nil {
				if !errors.Is(err, net.ErrClosed) {
					ch <- fmt.Errorf("nftables monitor: %w", err)
				}
				return
			}
			for _, msg := range msgs {
				if uint16(msg.Header.Type) == unix.NFNL_SUBSYS_NFTABLES<<8|unix.NFT_MSG_NEWGEN {
					ch <- nil
				}
			}
		}
	}()
	return m, nil
}

// Close stops the monitor.
func (m *RawMonitor) Close() { _ = m.conn.Close() }
