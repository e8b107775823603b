package nfmon

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"

	"github.com/google/nftables/expr"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// RawChange is one table, chain or rule message of a generation, decoded no further than its
// names and handle: a rule's expressions stay raw until the reader needs them. google/nftables'
// monitor decodes every expression of every message, which for an iptables-mode sync at 10,000
// Services (KUBE-SERVICES rewritten whole: 20,000 rule messages) is most of the cost.
type RawChange struct {
	Type   uint16 // NFT_MSG_*
	Family uint8
	Table  string
	Chain  string // the chain's name for chain messages; the rule's chain for rule messages
	Handle uint64
	// Exprs is a new rule's NFTA_RULE_EXPRESSIONS (nil for deletions).
	Exprs []byte
}

// RawGeneration is the changes of one committed transaction, or Err after which the monitor
// closes (lost messages).
type RawGeneration struct {
	Changes []RawChange
	Err     error
}

// RawMonitor follows table, chain and rule changes.
type RawMonitor struct {
	Generations <-chan RawGeneration
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
	if err := setReceiveBuffer(conn); err != nil {
		conn.Close()
		return nil, fmt.Errorf("nftables monitor: %w", err)
	}
	if err := conn.JoinGroup(unix.NFNLGRP_NFTABLES); err != nil {
		conn.Close()
		return nil, fmt.Errorf("nftables monitor: %w", err)
	}
	ch := make(chan RawGeneration, 64)
	m := &RawMonitor{Generations: ch, conn: conn}
	go m.run(ch)
	return m, nil
}

// Close stops the monitor.
func (m *RawMonitor) Close() { _ = m.conn.Close() }

func (m *RawMonitor) run(ch chan<- RawGeneration) {
	defer close(ch)
	var gen []RawChange
	for {
		msgs, err := m.conn.Receive()
		if err != nil {
			if !errors.Is(err, net.ErrClosed) {
				ch <- RawGeneration{Changes: gen, Err: fmt.Errorf("nftables monitor: %w", err)}
			}
			return
		}
		for _, msg := range msgs {
			if uint16(msg.Header.Type)>>8 != unix.NFNL_SUBSYS_NFTABLES || len(msg.Data) < 4 {
				continue
			}
			typ := uint16(msg.Header.Type) & 0xff
			switch typ {
			case unix.NFT_MSG_NEWGEN:
				ch <- RawGeneration{Changes: gen}
				gen = nil
			case unix.NFT_MSG_NEWTABLE, unix.NFT_MSG_DELTABLE, unix.NFT_MSG_NEWCHAIN, unix.NFT_MSG_DELCHAIN,
				unix.NFT_MSG_NEWRULE, unix.NFT_MSG_DELRULE:
				c, err := decodeRaw(typ, msg.Data)
				if err != nil {
					ch <- RawGeneration{Changes: gen, Err: fmt.Errorf("nftables monitor: %w", err)}
					return
				}
				gen = append(gen, c)
			}
		}
	}
}

// decodeRaw reads a table, chain or rule message: the nfgenmsg header (family first), then its
// attributes.
func decodeRaw(typ uint16, data []byte) (RawChange, error) {
	c := RawChange{Type: typ, Family: data[0]}
	ad, err := netlink.NewAttributeDecoder(data[4:])
	if err != nil {
		return c, err
	}
	ad.ByteOrder = binary.BigEndian
	for ad.Next() {
		switch typ {
		case unix.NFT_MSG_NEWTABLE, unix.NFT_MSG_DELTABLE:
			if ad.Type() == unix.NFTA_TABLE_NAME {
				c.Table = ad.String()
			}
		case unix.NFT_MSG_NEWCHAIN, unix.NFT_MSG_DELCHAIN:
			switch ad.Type() {
			case unix.NFTA_CHAIN_TABLE:
				c.Table = ad.String()
			case unix.NFTA_CHAIN_NAME:
				c.Chain = ad.String()
			}
		default: // rules
			switch ad.Type() {
			case unix.NFTA_RULE_TABLE:
				c.Table = ad.String()
			case unix.NFTA_RULE_CHAIN:
				c.Chain = ad.String()
			case unix.NFTA_RULE_HANDLE:
				c.Handle = ad.Uint64()
			case unix.NFTA_RULE_EXPRESSIONS:
				if typ == unix.NFT_MSG_NEWRULE {
					c.Exprs = append([]byte(nil), ad.Bytes()...)
				}
			}
		}
	}
	return c, ad.Err()
}

// DecodeExprs reads a rule's raw expressions, keeping the kinds that decide where a packet goes
// (meta, cmp, payload, immediate and verdicts, xtables match and target); others are skipped.
func DecodeExprs(family uint8, raw []byte) ([]expr.Any, error) {
	ad, err := netlink.NewAttributeDecoder(raw)
	if err != nil {
		return nil, err
	}
	ad.ByteOrder = binary.BigEndian
	var out []expr.Any
	for ad.Next() {
		if ad.Type() != unix.NFTA_LIST_ELEM {
			continue
		}
		ad.Nested(func(nd *netlink.AttributeDecoder) error {
			var (
				name string
				data []byte
			)
			for nd.Next() {
				switch nd.Type() {
				case unix.NFTA_EXPR_NAME:
					name = nd.String()
				case unix.NFTA_EXPR_DATA:
					data = nd.Bytes()
				}
			}
			var e expr.Any
			switch name {
			case "meta":
				e = &expr.Meta{}
			case "cmp":
				e = &expr.Cmp{}
			case "payload":
				e = &expr.Payload{}
			case "immediate":
				e = &expr.Immediate{}
			case "match":
				e = &expr.Match{}
			case "target":
				e = &expr.Target{}
			default:
				return nil
			}
			if err := expr.Unmarshal(family, data, e); err != nil {
				return fmt.Errorf("%s expression: %w", name, err)
			}
			// A verdict is an immediate into the verdict register.
			if imm, ok := e.(*expr.Immediate); ok && imm.Register == unix.NFT_REG_VERDICT && len(imm.Data) == 0 {
				e = &expr.Verdict{}
				if err := expr.Unmarshal(family, data, e); err != nil {
					return fmt.Errorf("verdict: %w", err)
				}
			}
			out = append(out, e)
			return nil
		})
	}
	return out, ad.Err()
}
