// Package haproxy reads HAProxy instances through their runtime API (the "stats socket", over
// TCP or a Unix socket; level user is enough): "show servers state" for all backends, "show
// servers state <backend>" for some (the cheap query while only some endpoints are awaited).
// Each read is one connection in the API's non-interactive mode: one line of commands, the
// answers, and HAProxy closes it.
//
// A server takes no new connection, and is reported not routable, in maintenance (MAINT: the
// HAProxy Kubernetes Ingress Controller puts a slot it frees in maintenance and points it at
// 127.0.0.1:1; a read may catch it in maintenance with the old address still), draining (DRAIN),
// down (DOWN: its health check failed), soft-stopping (NOLB: a 404 to a check with
// disable-on-404) or of weight 0. A slot the controller gives to another pod shows that pod's
// address: the old endpoint is simply gone from it.
//
// A backend's Kubernetes Service is read from the controller's backend names (see serviceOf);
// other names tell none.
//
// There is no standard TCP port for the runtime API: 9999, the default here, is the one of
// HAProxy's management guide. The Kubernetes Ingress Controller serves it on a Unix socket in its
// pod, unix:///var/run/haproxy-runtime-api.sock, which the daemon reaches inside the pod with
// --ingress.enter-pods (Target.Dial), or on a TCP "stats socket" line the operator adds.
package haproxy

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/url"
	"strings"
	"time"

	"github.com/endpointlag/endpointlag/probes/ingress"
)

// Kind is HAProxy's name among the proxy kinds.
const Kind = "haproxy"

func init() {
	ingress.Register(ingress.Kind{Name: Kind, DefaultPort: 9999, Scheme: "tcp", New: New})
}

// maxAnswer is the most read from one connection (as adminhttp.MaxBody for the HTTP kinds).
const maxAnswer = 64 << 20

// maxLine keeps a line of commands well inside HAProxy's CLI buffer (tune.bufsize, 16 kB by
// default); more backends are asked over more connections.
const maxLine = 8 << 10

// Reader reads one HAProxy.
type Reader struct {
	network, addr, where string
	timeout              time.Duration
	dial                 func(ctx context.Context, network, address string) (net.Conn, error)
}

// New returns a reader of the runtime API at t.Address: tcp://host:port or unix:///path, dialed
// by t.Dial when it is set (inside the proxy's pod).
func New(t ingress.Target) (ingress.Reader, error) {
	u, err := url.Parse(t.Address)
	if err != nil {
		return nil, fmt.Errorf("haproxy: runtime API address %q: %w", t.Address, err)
	}
	r := &Reader{where: t.Address, timeout: t.Timeout, dial: t.Dial}
	if r.dial == nil {
		r.dial = (&net.Dialer{}).DialContext
	}
	switch {
	case u.Scheme == "tcp" && u.Host != "" && u.Port() != "" && (u.Path == "" || u.Path == "/"):
		r.network, r.addr = "tcp", u.Host
	case u.Scheme == "unix" && u.Host == "" && u.Path != "":
		r.network, r.addr = "unix", u.Path
	default:
		return nil, fmt.Errorf("haproxy: runtime API address %q: want tcp://host:port or unix:///path", t.Address)
	}
	if t.Timeout <= 0 {
		return nil, fmt.Errorf("haproxy: runtime API address %q: the timeout must be positive, got %s", t.Address, t.Timeout)
	}
	return r, nil
}

// Read returns every backend that has servers.
func (r *Reader) Read(ctx context.Context) ([]ingress.Backend, error) {
	const cmd = "show servers state"
	answers, err := r.ask(ctx, cmd)
	if err != nil {
		return nil, err
	}
	if len(answers) != 1 {
		return nil, fmt.Errorf("haproxy: %s: %s: %d answers to one command", r.where, cmd, len(answers))
	}
	backends, err := parseState(answers[0])
	if err != nil {
		return nil, fmt.Errorf("haproxy: %s: %s: %w", r.where, cmd, err)
	}
	return backends, nil
}

// ReadBackends returns the named backends, asked in one line of commands (or a few, for many
// names). A backend HAProxy does not have, or that has no servers, comes back without servers:
// nothing is routed through it.
func (r *Reader) ReadBackends(ctx context.Context, names []string) ([]ingress.Backend, bool, error) {
	for _, name := range names {
		if !validName(name) {
			return nil, true, fmt.Errorf("haproxy: %s: %q is not a backend name HAProxy accepts", r.where, name)
		}
	}
	out := make([]ingress.Backend, 0, len(names))
	for len(names) > 0 {
		var cmds []string
		size := 0
		for len(names) > 0 && (len(cmds) == 0 || size+len(names[0])+len("show servers state ;") <= maxLine) {
			cmds = append(cmds, "show servers state "+names[0])
			size += len(names[0]) + len("show servers state ;")
			names = names[1:]
		}
		line := strings.Join(cmds, ";")
		answers, err := r.ask(ctx, line)
		if err != nil {
			return nil, true, err
		}
		if len(answers) != len(cmds) {
			return nil, true, fmt.Errorf("haproxy: %s: %d answers to %d commands (%s)", r.where, len(answers), len(cmds), excerpt(line))
		}
		for i, a := range answers {
			name := strings.TrimPrefix(cmds[i], "show servers state ")
			if strings.TrimSpace(a) == noBackend {
				out = append(out, ingress.Backend{Name: name, Service: serviceOf(name), Servers: []ingress.Server{}})
				continue
			}
			backends, err := parseState(a)
			if err != nil {
				return nil, true, fmt.Errorf("haproxy: %s: %s: %w", r.where, cmds[i], err)
			}
			b := ingress.Backend{Name: name, Service: serviceOf(name), Servers: []ingress.Server{}}
			for _, got := range backends {
				if got.Name == name {
					b = got
				}
			}
			out = append(out, b)
		}
	}
	return out, true, nil
}

// validName reports whether HAProxy would accept name for a proxy (its invalid_char: letters,
// digits, '-', '_', '.', ':'), which also keeps it from ending or splitting a command line.
func validName(name string) bool {
	if name == "" {
		return false
	}
	for _, c := range name {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.ContainsRune("-_.:", c)) {
			return false
		}
	}
	return true
}

// ask sends one line of commands over a new connection and returns the answers, one per
// command.
func (r *Reader) ask(ctx context.Context, line string) ([]string, error) {
	fail := func(err error) ([]string, error) {
		return nil, fmt.Errorf("haproxy: %s: %s: %w", r.where, excerpt(line), err)
	}
	deadline := time.Now().Add(r.timeout)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	dialCtx, cancel := context.WithDeadline(ctx, deadline)
	defer cancel()
	conn, err := r.dial(dialCtx, r.network, r.addr)
	if err != nil {
		return fail(err)
	}
	defer conn.Close()
	// A cancelled context ends a read in progress at once.
	stop := context.AfterFunc(ctx, func() { _ = conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	if err := conn.SetDeadline(deadline); err != nil {
		return fail(err)
	}
	if _, err := io.WriteString(conn, line+"\n"); err != nil {
		return fail(err)
	}
	out, err := io.ReadAll(io.LimitReader(conn, maxAnswer+1))
	if err != nil {
		if ctx.Err() != nil {
			err = ctx.Err()
		}
		return fail(err)
	}
	if len(out) > maxAnswer {
		return fail(fmt.Errorf("the answer is larger than %d bytes", maxAnswer))
	}
	answers, err := splitAnswers(out)
	if err != nil {
		return fail(err)
	}
	return answers, nil
}
