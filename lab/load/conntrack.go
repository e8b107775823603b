package load

import (
	"net"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/endpointlag/endpointlag/lab/internal/ns"
)

// resolver finds, in the client node's conntrack table, where kube-proxy sent each failed
// connection to a Service. Entries of refused connections live 10 s, so it looks every 250 ms
// while failures wait.
type resolver struct {
	ns      string
	mu      sync.Mutex
	pending []pendingResult
}

type pendingResult struct {
	res *Result
	// host is the address the request was sent to.
	host string
}

// add queues a failed request sent to target (host:port).
func (r *resolver) add(res *Result, target string) {
	host, _, err := net.SplitHostPort(target)
	if r.ns == "" || err != nil {
		return
	}
	r.mu.Lock()
	r.pending = append(r.pending, pendingResult{res, host})
	r.mu.Unlock()
}

// start resolves in the background; the returned function stops it after a last pass.
func (r *resolver) start() func() {
	if r.ns == "" {
		return func() {}
	}
	stop, done := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(done)
		t := time.NewTicker(250 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-stop:
				r.pass()
				return
			case <-t.C:
				r.pass()
			}
		}
	}()
	return func() {
		close(stop)
		<-done
	}
}

func (r *resolver) pass() {
	r.mu.Lock()
	pending := r.pending
	r.pending = nil
	r.mu.Unlock()
	if len(pending) == 0 {
		return
	}
	h, err := ns.Handle(r.ns)
	if err != nil {
		return
	}
	defer h.Close()
	flows, err := h.ConntrackTableList(netlink.ConntrackTable, unix.AF_INET)
	if err != nil {
		return
	}
	type key struct {
		host string
		port uint16
	}
	byKey := map[key]*netlink.ConntrackFlow{}
	for _, f := range flows {
		// Only translated flows: a connection straight to a pod (a proxy's) has no backend
		// here to find.
		if f.Forward.Protocol == unix.IPPROTO_TCP && !f.Reverse.SrcIP.Equal(f.Forward.DstIP) {
			byKey[key{f.Forward.DstIP.String(), f.Forward.SrcPort}] = f
		}
	}
	for _, p := range pending {
		if f := byKey[key{p.host, uint16(p.res.SrcPort)}]; f != nil {
			p.res.BackendIP = f.Reverse.SrcIP.String()
			if tcp, ok := f.ProtoInfo.(*netlink.ProtoInfoTCP); ok {
				p.res.TCPState = tcpStates[tcp.State]
			}
		}
	}
}

// tcpStates names conntrack's TCP states (include/uapi/linux/netfilter/nf_conntrack_tcp.h).
var tcpStates = []string{"NONE", "SYN_SENT", "SYN_RECV", "ESTABLISHED", "FIN_WAIT", "CLOSE_WAIT", "LAST_ACK", "TIME_WAIT", "CLOSE", "SYN_SENT2", "", "", "", "", "", ""}
