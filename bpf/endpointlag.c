//go:build ignore

// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//
// TC classifiers that count traffic still reaching this node's pods after their deletion began,
// and traffic to pods already gone. They never drop or change a packet: every program returns
// TC_ACT_UNSPEC (TCX_NEXT), so the packet goes on as if the program were not there.
//
//   to_pod     host side of a pod's veth, egress (towards the pod): packets, bytes, new TCP
//              connections (SYN without ACK) and new UDP flows to terminating pods.
//   from_pod   host side of a pod's veth, ingress (from the pod): TCP resets (refused
//              connections apart) and ICMP unreachables a terminating pod sends back; packets and
//              new connections a pod sends to the address of a deleted pod of the same node.
//   uplink_in  the node's uplinks, ingress: packets and new connections to deleted pods.
//   uplink_out the node's uplinks, egress: resets and ICMP unreachables sent for deleted pods;
//              an unreachable about a terminating pod (its network already gone) is a new
//              connection to a dead pod.
//
// New connections count only to ports the pod's endpoints serve (once user space knows them), and
// those from the node's own addresses (the kubelet's probes, host processes) apart from clients'.
// The pod veth programs also count, per interface and for every pod, SYNs towards the pod and
// SYN-ACKs from it: a pod that answers SYNs the veth never carried towards it is reached another
// way (bpf_redirect_peer), and the probe is blind to its traffic.
//
// Addresses are keys of 16 bytes, IPv4 mapped into IPv6 (::ffff:a.b.c.d).

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

char LICENSE[] SEC("license") = "Dual BSD/GPL";

// icmp_hdr is the common start of ICMP and ICMPv6 messages (linux/icmp.h pulls in libc headers).
struct icmp_hdr {
	__u8 type;
	__u8 code;
	__u16 checksum;
	__u32 rest;
};

#define ICMP_DEST_UNREACH 3
#define ICMP_FRAG_NEEDED 4
#define ICMPV6_DEST_UNREACH 1

struct addr {
	__u8 b[16];
};

// counters are kept per pod address; the fields are added to atomically, last_* stored.
struct counters {
	__u64 packets;
	__u64 bytes;
	// New connections from clients, and from the node's own addresses.
	__u64 tcp_conns;
	__u64 udp_flows;
	__u64 node_tcp_conns;
	__u64 node_udp_flows;
	// Errors sent to clients: resets ending a connection, resets refusing one (answering a SYN
	// the pod never accepted), ICMP destination unreachables.
	__u64 resets;
	__u64 refused;
	__u64 unreachables;
	__u64 last_packet_ns;
	// last_conn_ns is the last new connection from a client.
	__u64 last_conn_ns;
};

struct flow {
	struct addr saddr;
	struct addr daddr;
	__u16 sport;
	__u16 dport;
	__u32 pad;
};

enum event_kind {
	EVENT_TERMINATING = 1,
	EVENT_DELETED = 2,
};

// event is one new connection (TCP SYN or new UDP flow) to a terminating or deleted pod.
struct event {
	struct addr saddr;
	struct addr daddr;
	__u64 time_ns;
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 kind;
	__u8 from_node;
	__u8 pad;
};

// service is a port a pod address serves; port 0 stands for every port of the protocol.
struct service {
	struct addr addr;
	__u16 port;
	__u8 proto;
	__u8 pad;
};

// iface_stats counts, on one pod veth, SYNs towards the pod and SYN-ACKs from it, both from and
// to other addresses than the node's.
struct iface_stats {
	__u64 syns;
	__u64 syn_acks;
};

// recent_syn is a client's SYN to a pod address no map tracks yet, kept in a per-CPU ring: when
// user space starts tracking a terminating pod, it takes from the rings the SYNs that reached the
// pod between its deletion and that moment, which no event could report.
struct recent_syn {
	struct addr saddr;
	struct addr daddr;
	__u64 time_ns;
	__u16 sport;
	__u16 dport;
	__u32 pad;
};

// RECENT_SLOTS is each CPU's ring of recent SYNs: at 10,000 SYNs a second on a CPU it holds the
// last 100 ms.
#define RECENT_SLOTS 1024

// The event and recent_syn types are kept in the object's BTF for bpf2go to generate their Go
// twins.
const struct event *unused_event __attribute__((unused));
const struct recent_syn *unused_recent_syn __attribute__((unused));

// ratelimit is one CPU's event budget in the current second, and the events it refused.
struct ratelimit {
	__u64 window_ns;
	__u64 sent;
	__u64 dropped;
};

// Sizes of the address maps are set by the loader before the programs load.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct addr);
	__type(value, struct counters);
	__uint(max_entries, 4096);
} terminating SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct addr);
	__type(value, struct counters);
	__uint(max_entries, 4096);
} deleted SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct flow);
	__type(value, __u8);
	__uint(max_entries, 16384);
} udp_flows SEC(".maps");

// served holds the ports the endpoints of tracked pod addresses serve; filtered marks the
// addresses whose endpoints are known (an address not in it is not filtered). User space writes
// an address's ports before its mark.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct service);
	__type(value, __u8);
	__uint(max_entries, 32768);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} served SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct addr);
	__type(value, __u8);
	__uint(max_entries, 8192);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} filtered SEC(".maps");

// node_addrs are the addresses of the network namespace the programs run in: the node's own (with
// IPVS, every ClusterIP too: room for many, allocated as they come).
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct addr);
	__type(value, __u8);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} node_addrs SEC(".maps");

// syns are clients' SYNs to terminating pods not answered by a SYN-ACK yet (client → pod), so
// that the pod's reset to one is told apart as a refused connection.
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct flow);
	__type(value, __u8);
	__uint(max_entries, 16384);
} syns SEC(".maps");

// ifaces holds each pod veth's iface_stats, by interface index.
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, __u32);
	__type(value, struct iface_stats);
	__uint(max_entries, 16384);
} ifaces SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} events SEC(".maps");

// recent is each CPU's ring of recent_syn, recent_next the number each CPU wrote so far (the
// next slot is that modulo RECENT_SLOTS).
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct recent_syn);
	__uint(max_entries, RECENT_SLOTS);
} recent SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, 1);
} recent_next SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct ratelimit);
	__uint(max_entries, 1);
} limits SEC(".maps");

// events_per_second is each CPU's budget of ring buffer events; set by the loader.
volatile const __u64 events_per_second = 1000;

// pkt is what the programs need of a packet.
struct pkt {
	struct addr saddr;
	struct addr daddr;
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 tcp_flags;
	__u8 icmp_unreach;
	// inner is the destination of the packet an ICMP error quotes; quoted its source, ports,
	// protocol and TCP flags.
	struct addr inner;
	struct pkt_quoted {
		struct addr saddr;
		__u16 sport;
		__u16 dport;
		__u8 proto;
		__u8 tcp_flags;
	} quoted;
};

#define TCP_FLAG_RST 0x04
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_ACK 0x10

static __always_inline void map4(struct addr *a, __be32 v4)
{
	__builtin_memset(a, 0, sizeof(*a));
	a->b[10] = 0xff;
	a->b[11] = 0xff;
	__builtin_memcpy(&a->b[12], &v4, 4);
}

// parse_l3 reads the addresses and protocol with direct packet access and returns the offset of
// the transport header: 0 for packets that are neither IPv4 nor IPv6 (or too short), -1 for a
// later fragment, which has none.
static __always_inline int parse_l3(struct __sk_buff *skb, struct pkt *p)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;

	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = data + sizeof(struct ethhdr);
		if ((void *)(ip + 1) > end)
			return 0;
		map4(&p->saddr, ip->saddr);
		map4(&p->daddr, ip->daddr);
		p->proto = ip->protocol;
		if (ip->frag_off & bpf_htons(0x1fff))
			return -1;
		return sizeof(struct ethhdr) + ip->ihl * 4;
	}
	if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = data + sizeof(struct ethhdr);
		if ((void *)(ip6 + 1) > end)
			return 0;
		__builtin_memcpy(&p->saddr, &ip6->saddr, 16);
		__builtin_memcpy(&p->daddr, &ip6->daddr, 16);
		p->proto = ip6->nexthdr; // extension headers are not followed
		return sizeof(struct ethhdr) + sizeof(struct ipv6hdr);
	}
	return 0;
}

// parse_quoted reads the ports and TCP flags of the packet an ICMP error quotes, from its
// transport header at off (an ICMP error quotes as much of the packet as fits, 576 bytes in all
// for ICMPv4, so a whole TCP header).
static __always_inline void parse_quoted(struct __sk_buff *skb, struct pkt *p, int off)
{
	__u8 th[14];
	if (p->quoted.proto == IPPROTO_TCP && bpf_skb_load_bytes(skb, off, th, sizeof(th)) == 0) {
		p->quoted.tcp_flags = th[13];
	} else if (p->quoted.proto != IPPROTO_UDP || bpf_skb_load_bytes(skb, off, th, 4) != 0) {
		return;
	}
	p->quoted.sport = ((__u16)th[0] << 8) | th[1];
	p->quoted.dport = ((__u16)th[2] << 8) | th[3];
}

// parse_l4 reads ports and TCP flags, and for an ICMP destination unreachable the packet it
// quotes. Only packets of tracked addresses get this far.
static __always_inline void parse_l4(struct __sk_buff *skb, struct pkt *p, int l4)
{
	if (l4 <= 0)
		return;
	switch (p->proto) {
	case IPPROTO_TCP: {
		struct tcphdr th;
		if (bpf_skb_load_bytes(skb, l4, &th, sizeof(th)) == 0) {
			p->sport = bpf_ntohs(th.source);
			p->dport = bpf_ntohs(th.dest);
			p->tcp_flags = ((__u8 *)&th)[13];
		}
		break;
	}
	case IPPROTO_UDP: {
		struct udphdr uh;
		if (bpf_skb_load_bytes(skb, l4, &uh, sizeof(uh)) == 0) {
			p->sport = bpf_ntohs(uh.source);
			p->dport = bpf_ntohs(uh.dest);
		}
		break;
	}
	case IPPROTO_ICMP: {
		struct icmp_hdr ih;
		struct iphdr inner;
		// "Fragmentation needed" asks the sender for smaller packets (path MTU discovery): no
		// client sees it as a failure.
		if (bpf_skb_load_bytes(skb, l4, &ih, sizeof(ih)) == 0 && ih.type == ICMP_DEST_UNREACH &&
		    ih.code != ICMP_FRAG_NEEDED &&
		    bpf_skb_load_bytes(skb, l4 + sizeof(ih), &inner, sizeof(inner)) == 0) {
			p->icmp_unreach = 1;
			map4(&p->inner, inner.daddr);
			map4(&p->quoted.saddr, inner.saddr);
			p->quoted.proto = inner.protocol;
			parse_quoted(skb, p, l4 + sizeof(ih) + inner.ihl * 4);
		}
		break;
	}
	case IPPROTO_ICMPV6: {
		struct icmp_hdr ih;
		struct ipv6hdr inner;
		if (bpf_skb_load_bytes(skb, l4, &ih, sizeof(ih)) == 0 && ih.type == ICMPV6_DEST_UNREACH &&
		    bpf_skb_load_bytes(skb, l4 + sizeof(ih), &inner, sizeof(inner)) == 0) {
			p->icmp_unreach = 1;
			__builtin_memcpy(&p->inner, &inner.daddr, 16);
			__builtin_memcpy(&p->quoted.saddr, &inner.saddr, 16);
			p->quoted.proto = inner.nexthdr;
			parse_quoted(skb, p, l4 + sizeof(ih) + sizeof(inner));
		}
		break;
	}
	}
}

// tcp_flags reads the flags of the TCP header at l4 (0 when it cannot). Every TCP packet on a pod
// veth is read, so the byte is read in place where it is in the linear data (the usual case), a
// helper call only otherwise.
static __always_inline __u8 tcp_flags(struct __sk_buff *skb, int l4)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	__u32 off = l4;
	__u8 flags = 0;
	// An Ethernet, an IPv4 header with options or an IPv6 header: a bound the verifier sees.
	if (l4 <= 0 || off > sizeof(struct ethhdr) + 60)
		return 0;
	__u8 *p = data + off + 13;
	if ((void *)(p + 1) <= end)
		return *p;
	bpf_skb_load_bytes(skb, l4 + 13, &flags, 1);
	return flags;
}

static __always_inline int is_syn(__u8 flags)
{
	return (flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN;
}

static __always_inline int is_syn_ack(__u8 flags)
{
	return (flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == (TCP_FLAG_SYN | TCP_FLAG_ACK);
}

static __always_inline int from_node(struct addr *a)
{
	return bpf_map_lookup_elem(&node_addrs, a) != NULL;
}

// serves reports whether a pod address serves port over proto: yes when its endpoints are not
// known yet.
static __always_inline int serves(struct addr *a, __u16 port, __u8 proto)
{
	if (!bpf_map_lookup_elem(&filtered, a))
		return 1;
	struct service k = {};
	k.addr = *a;
	k.port = port;
	k.proto = proto;
	if (bpf_map_lookup_elem(&served, &k))
		return 1;
	k.port = 0;
	return bpf_map_lookup_elem(&served, &k) != NULL;
}

// client_error reports whether an error a pod sends to dst about its port is a client's: one of
// a port it serves, to an address not the node's.
static __always_inline int client_error(struct addr *pod, __u16 port, __u8 proto, struct addr *dst)
{
	return serves(pod, port, proto) && !from_node(dst);
}

// count_iface adds a SYN or a SYN-ACK to the statistics of the interface the packet crosses.
static __always_inline void count_iface(struct __sk_buff *skb, int syn_ack)
{
	__u32 idx = skb->ifindex;
	struct iface_stats *st = bpf_map_lookup_elem(&ifaces, &idx);
	if (!st) {
		struct iface_stats zero = {};
		bpf_map_update_elem(&ifaces, &idx, &zero, BPF_NOEXIST);
		st = bpf_map_lookup_elem(&ifaces, &idx);
		if (!st)
			return;
	}
	if (syn_ack)
		__sync_fetch_and_add(&st->syn_acks, 1);
	else
		__sync_fetch_and_add(&st->syns, 1);
}

static __always_inline struct flow flow_of(struct addr *saddr, struct addr *daddr, __u16 sport, __u16 dport)
{
	struct flow f = {};
	f.saddr = *saddr;
	f.daddr = *daddr;
	f.sport = sport;
	f.dport = dport;
	return f;
}

// allow spends one event of this CPU's budget for the current second.
static __always_inline int allow(__u64 now)
{
	__u32 zero = 0;
	struct ratelimit *rl = bpf_map_lookup_elem(&limits, &zero);
	if (!rl)
		return 0;
	if (now - rl->window_ns >= 1000000000ULL) {
		rl->window_ns = now;
		rl->sent = 0;
	}
	if (rl->sent >= events_per_second) {
		rl->dropped++;
		return 0;
	}
	rl->sent++;
	return 1;
}

static __always_inline void emit(struct pkt *p, __u64 now, __u8 kind, __u8 node)
{
	if (!allow(now))
		return;
	struct event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		__u32 zero = 0;
		struct ratelimit *rl = bpf_map_lookup_elem(&limits, &zero);
		if (rl)
			rl->dropped++;
		return;
	}
	e->saddr = p->saddr;
	e->daddr = p->daddr;
	e->time_ns = now;
	e->sport = p->sport;
	e->dport = p->dport;
	e->proto = p->proto;
	e->kind = kind;
	e->from_node = node;
	e->pad = 0;
	bpf_ringbuf_submit(e, 0);
}

// arrive counts a packet to a tracked pod: packets, bytes, and new connections to ports it
// serves. It returns 1 for a new TCP connection from a client.
static __always_inline int arrive(struct __sk_buff *skb, struct pkt *p, struct counters *c, __u8 kind)
{
	__u64 now = bpf_ktime_get_ns();
	__sync_fetch_and_add(&c->packets, 1);
	__sync_fetch_and_add(&c->bytes, skb->len);
	c->last_packet_ns = now;

	if (p->proto == IPPROTO_TCP) {
		if (!is_syn(p->tcp_flags))
			return 0;
	} else if (p->proto == IPPROTO_UDP) {
		struct flow f = flow_of(&p->saddr, &p->daddr, p->sport, p->dport);
		__u8 one = 1;
		if (bpf_map_update_elem(&udp_flows, &f, &one, BPF_NOEXIST) != 0)
			return 0;
	} else {
		return 0;
	}
	if (!serves(&p->daddr, p->dport, p->proto))
		return 0;
	__u8 node = from_node(&p->saddr);
	if (p->proto == IPPROTO_TCP)
		__sync_fetch_and_add(node ? &c->node_tcp_conns : &c->tcp_conns, 1);
	else
		__sync_fetch_and_add(node ? &c->node_udp_flows : &c->udp_flows, 1);
	if (!node)
		c->last_conn_ns = now;
	emit(p, now, kind, node);
	return !node && p->proto == IPPROTO_TCP;
}

// remember_syn writes a client's SYN to an untracked pod address into this CPU's ring.
static __always_inline void remember_syn(struct __sk_buff *skb, struct pkt *p, int l4)
{
	__u32 zero = 0;
	__u64 *next = bpf_map_lookup_elem(&recent_next, &zero);
	if (!next)
		return;
	__u32 slot = *next % RECENT_SLOTS;
	struct recent_syn *r = bpf_map_lookup_elem(&recent, &slot);
	if (!r)
		return;
	parse_l4(skb, p, l4);
	r->saddr = p->saddr;
	r->daddr = p->daddr;
	r->time_ns = bpf_ktime_get_ns();
	r->sport = p->sport;
	r->dport = p->dport;
	r->pad = 0;
	*next += 1;
}

SEC("tc")
int to_pod(struct __sk_buff *skb)
{
	struct pkt p = {};
	int l4 = parse_l3(skb, &p);
	if (!l4)
		return TC_ACT_UNSPEC;
	int client_syn = p.proto == IPPROTO_TCP && is_syn(tcp_flags(skb, l4)) && !from_node(&p.saddr);
	if (client_syn)
		count_iface(skb, 0);
	struct counters *c = bpf_map_lookup_elem(&terminating, &p.daddr);
	if (c) {
		parse_l4(skb, &p, l4);
		if (arrive(skb, &p, c, EVENT_TERMINATING)) {
			struct flow f = flow_of(&p.saddr, &p.daddr, p.sport, p.dport);
			__u8 one = 1;
			bpf_map_update_elem(&syns, &f, &one, BPF_ANY);
		}
	} else if (client_syn) {
		remember_syn(skb, &p, l4);
	}
	return TC_ACT_UNSPEC;
}

// pod_sent counts the errors a terminating pod sends: a reset answering a client's SYN it never
// accepted (refused), other resets, ICMP destination unreachables; and notes the datagrams it
// sends, so that their replies are no new flows.
static __always_inline void pod_sent(struct pkt *p, struct counters *c)
{
	if (p->proto == IPPROTO_TCP) {
		struct flow f = flow_of(&p->daddr, &p->saddr, p->dport, p->sport);
		if (is_syn_ack(p->tcp_flags)) {
			bpf_map_delete_elem(&syns, &f);
		} else if (p->tcp_flags & TCP_FLAG_RST) {
			if (bpf_map_delete_elem(&syns, &f) == 0)
				__sync_fetch_and_add(&c->refused, 1);
			else if (client_error(&p->saddr, p->sport, IPPROTO_TCP, &p->daddr))
				__sync_fetch_and_add(&c->resets, 1);
		}
	} else if (p->proto == IPPROTO_UDP) {
		struct flow f = flow_of(&p->daddr, &p->saddr, p->dport, p->sport);
		__u8 one = 1;
		bpf_map_update_elem(&udp_flows, &f, &one, BPF_ANY);
	} else if (p->icmp_unreach && client_error(&p->inner, p->quoted.dport, p->quoted.proto, &p->daddr)) {
		__sync_fetch_and_add(&c->unreachables, 1);
	}
}

SEC("tc")
int from_pod(struct __sk_buff *skb)
{
	struct pkt p = {};
	int l4 = parse_l3(skb, &p);
	if (!l4)
		return TC_ACT_UNSPEC;
	if (p.proto == IPPROTO_TCP && is_syn_ack(tcp_flags(skb, l4)) && !from_node(&p.daddr))
		count_iface(skb, 1);
	struct counters *c = bpf_map_lookup_elem(&terminating, &p.saddr);
	if (c) {
		parse_l4(skb, &p, l4);
		pod_sent(&p, c);
		return TC_ACT_UNSPEC;
	}
	// A pod of this node sending to the address of another pod of this node that is gone: the
	// packet never crosses an uplink.
	c = bpf_map_lookup_elem(&deleted, &p.daddr);
	if (c) {
		parse_l4(skb, &p, l4);
		arrive(skb, &p, c, EVENT_DELETED);
	}
	return TC_ACT_UNSPEC;
}

SEC("tc")
int uplink_in(struct __sk_buff *skb)
{
	struct pkt p = {};
	int l4 = parse_l3(skb, &p);
	if (!l4)
		return TC_ACT_UNSPEC;
	struct counters *c = bpf_map_lookup_elem(&deleted, &p.daddr);
	if (c) {
		parse_l4(skb, &p, l4);
		arrive(skb, &p, c, EVENT_DELETED);
	}
	return TC_ACT_UNSPEC;
}

SEC("tc")
int uplink_out(struct __sk_buff *skb)
{
	struct pkt p = {};
	int l4 = parse_l3(skb, &p);
	if (!l4)
		return TC_ACT_UNSPEC;
	struct counters *c;
	if (p.proto == IPPROTO_TCP) {
		c = bpf_map_lookup_elem(&deleted, &p.saddr);
		if (c) {
			parse_l4(skb, &p, l4);
			if ((p.tcp_flags & TCP_FLAG_RST) && client_error(&p.saddr, p.sport, IPPROTO_TCP, &p.daddr))
				__sync_fetch_and_add(&c->resets, 1);
		}
	} else if (p.proto == IPPROTO_ICMP || p.proto == IPPROTO_ICMPV6) {
		parse_l4(skb, &p, l4);
		if (!p.icmp_unreach)
			return TC_ACT_UNSPEC;
		c = bpf_map_lookup_elem(&deleted, &p.inner);
		if (c) {
			if (client_error(&p.inner, p.quoted.dport, p.quoted.proto, &p.daddr))
				__sync_fetch_and_add(&c->unreachables, 1);
			return TC_ACT_UNSPEC;
		}
		// The node answers that a terminating pod's address is unreachable: the pod's network
		// went (its veth deleted) before the API said the pod is gone, and the quoted packet,
		// which no veth program saw, is a new connection to a dead pod (TCP SYN; UDP each time).
		if (bpf_map_lookup_elem(&terminating, &p.inner) &&
		    (p.quoted.proto == IPPROTO_UDP || (p.quoted.proto == IPPROTO_TCP && is_syn(p.quoted.tcp_flags))) &&
		    serves(&p.inner, p.quoted.dport, p.quoted.proto)) {
			struct pkt q = {.saddr = p.quoted.saddr, .daddr = p.inner, .sport = p.quoted.sport,
					.dport = p.quoted.dport, .proto = p.quoted.proto};
			emit(&q, bpf_ktime_get_ns(), EVENT_DELETED, from_node(&q.saddr));
		}
	}
	return TC_ACT_UNSPEC;
}
