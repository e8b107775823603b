package haproxy

import (
	"fmt"
	"net/netip"
	"strconv"
	"strings"

	"github.com/endpointlag/endpointlag/probes"
	"github.com/endpointlag/endpointlag/probes/ingress"
	"github.com/endpointlag/endpointlag/probes/ingress/internal/svcname"
)

// Server states of include/haproxy/server-t.h (srv_op_state, srv_admin_state).
const (
	stStopped  = 0 // SRV_ST_STOPPED: down
	stStopping = 3 // SRV_ST_STOPPING: up, soft-stopping (a 404 to a check with disable-on-404)

	// SRV_ADMF_MAINT: forced, inherited from a tracked server, or for a failed address
	// resolution. SRV_ADMF_CMAINT (0x04) only remembers that the configuration said "disabled";
	// a server enabled since keeps it and is ready.
	admfMaint = 0x23
	// SRV_ADMF_DRAIN: forced or inherited drain.
	admfDrain = 0x18
)

// stateVersion is the only format of "show servers state" there is (SRV_STATE_FILE_VERSION).
const stateVersion = "1"

// noBackend is HAProxy's answer to "show servers state <name>" for a backend it does not have.
const noBackend = "Can't find backend."

// splitAnswers cuts what the runtime API answers to a line of commands into one answer per
// command: each is its output, whole lines, followed by an empty line (just "\n" for a command
// that prints nothing). An answer without its empty line was cut short (the connection closed
// early): an error rather than a backend that silently lacks servers.
func splitAnswers(out []byte) ([]string, error) {
	var answers []string
	var cur strings.Builder
	for _, line := range strings.SplitAfter(string(out), "\n") {
		switch line {
		case "":
		case "\n":
			answers = append(answers, cur.String())
			cur.Reset()
		default:
			cur.WriteString(line)
		}
	}
	if cur.Len() > 0 {
		return nil, fmt.Errorf("an answer cut short: %q", excerpt(cur.String()))
	}
	return answers, nil
}

// The columns of "show servers state" this reader needs; they are found by their header, not
// their position.
var stateColumns = []string{"be_name", "srv_name", "srv_addr", "srv_op_state", "srv_admin_state", "srv_uweight", "srv_port"}

// parseState parses one answer of "show servers state [<backend>]": the format version, the
// column header ("# be_id be_name srv_id …") and a line per server. A backend's servers are its
// slots, each with the address it has now: a slot given to another pod shows that pod's address
// only, so the old endpoint is gone from it.
func parseState(text string) (backends []ingress.Backend, err error) {
	defer probes.Recover(&err)
	lines := strings.Split(text, "\n")
	if len(lines) < 2 || strings.TrimSpace(lines[0]) != stateVersion || !strings.HasPrefix(lines[1], "# ") {
		return nil, fmt.Errorf("not an answer of show servers state version %s: %q", stateVersion, excerpt(text))
	}
	header := strings.Fields(strings.TrimPrefix(lines[1], "# "))
	col := map[string]int{}
	for i, name := range header {
		col[name] = i
	}
	for _, name := range stateColumns {
		if _, ok := col[name]; !ok {
			return nil, fmt.Errorf("show servers state: no column %s in %q", name, lines[1])
		}
	}
	index := map[string]int{}
	for n, line := range lines[2:] {
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		f := strings.Fields(line)
		if len(f) != len(header) {
			return nil, fmt.Errorf("show servers state line %d: %d fields, the header has %d: %q", n+3, len(f), len(header), line)
		}
		srv, ok, err := serverOf(f, col)
		if err != nil {
			return nil, fmt.Errorf("show servers state line %d: %w: %q", n+3, err, line)
		}
		name := f[col["be_name"]]
		i, seen := index[name]
		if !seen {
			i = len(backends)
			index[name] = i
			backends = append(backends, ingress.Backend{Name: name, Service: serviceOf(name), Servers: []ingress.Server{}})
		}
		if ok {
			backends[i].Servers = append(backends[i].Servers, srv)
		}
	}
	return backends, nil
}

// serverOf reads one server line; ok is false for a server without an address ("-": not resolved
// yet), which is no endpoint.
func serverOf(f []string, col map[string]int) (ingress.Server, bool, error) {
	num := func(name string, bits int) (uint64, error) {
		n, err := strconv.ParseUint(f[col[name]], 10, bits)
		if err != nil {
			return 0, fmt.Errorf("%s: %w", name, err)
		}
		return n, nil
	}
	op, err := num("srv_op_state", 8)
	if err != nil {
		return ingress.Server{}, false, err
	}
	admin, err := num("srv_admin_state", 8)
	if err != nil {
		return ingress.Server{}, false, err
	}
	weight, err := num("srv_uweight", 32)
	if err != nil {
		return ingress.Server{}, false, err
	}
	// A server without a port (0) connects to the port the client reached HAProxy on.
	port, err := num("srv_port", 16)
	if err != nil {
		return ingress.Server{}, false, err
	}
	if f[col["srv_addr"]] == "-" {
		return ingress.Server{}, false, nil
	}
	addr, err := netip.ParseAddr(f[col["srv_addr"]])
	if err != nil {
		return ingress.Server{}, false, fmt.Errorf("srv_addr: %w", err)
	}
	state := stateOf(op, admin, weight)
	return ingress.Server{
		Endpoint: probes.Endpoint{Addr: addr.Unmap(), Port: uint16(port), Protocol: "TCP"},
		Routable: state == "",
		State:    state,
	}, true, nil
}

// stateOf names, in the words of HAProxy's stats page, why a server takes no new connection:
// maintenance first and drain next (the order of server-t.h's "state_str"), then the operational
// state, then a weight of 0 (which, like drain, leaves it out of load balancing). A client whose
// persistence cookie names a draining server still reaches it.
func stateOf(op, admin, weight uint64) string {
	switch {
	case admin&admfMaint != 0:
		return "MAINT"
	case admin&admfDrain != 0:
		return "DRAIN"
	case op == stStopped:
		return "DOWN"
	case op == stStopping:
		return "NOLB"
	case weight == 0:
		return "weight 0"
	}
	return ""
}

// serviceOf reads the Kubernetes Service from the backend names of the HAProxy Kubernetes
// Ingress Controller (pkg/service GetBackendName): "<namespace>_svc_<service>_<port>" since
// v3.2, "<namespace>_<ingress>_svc_<service>_<port>" for a standalone Ingress's backend, and
// "<namespace>_<service>_<port>" from v1.7 to v3.1. Kubernetes names hold no underscore, so
// these split for certain. Other names tell none.
func serviceOf(name string) probes.ServiceRef {
	p := strings.Split(name, "_")
	var ref probes.ServiceRef
	var ok bool
	switch {
	case len(p) == 4 && p[1] == "svc" && svcname.Port(p[3]):
		ref, ok = svcname.Ref(p[0], p[2])
	case len(p) == 5 && p[2] == "svc" && svcname.Port(p[4]):
		ref, ok = svcname.Ref(p[0], p[3])
	case len(p) == 3 && svcname.Port(p[2]):
		ref, ok = svcname.Ref(p[0], p[1])
	}
	if !ok {
		return probes.ServiceRef{}
	}
	return ref
}

// excerpt is the start of an unexpected answer, for an error.
func excerpt(s string) string {
	const n = 200
	s = strings.TrimSpace(s)
	if len(s) > n {
		return s[:n] + "…"
	}
	return s
}
