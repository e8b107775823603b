package haproxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"time"
)

// Runtime talks to one of HAProxy's runtime API sockets ("stats socket" in the configuration) in
// its non-interactive mode: one line of commands separated by ";", the answers, then HAProxy
// closes the connection.
type Runtime struct {
	// Dial connects to the socket.
	Dial func(ctx context.Context) (net.Conn, error)
	// Timeout bounds one exchange (default 2 s).
	Timeout time.Duration
}

// Exec sends cmds in one line and returns each command's answer. HAProxy ends every answer with
// an empty line.
func (r *Runtime) Exec(ctx context.Context, cmds ...string) ([]string, error) {
	if len(cmds) == 0 {
		return nil, nil
	}
	timeout := r.Timeout
	if timeout == 0 {
		timeout = 2 * time.Second
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	conn, err := r.Dial(ctx)
	if err != nil {
		return nil, fmt.Errorf("runtime API: %w", err)
	}
	defer conn.Close()
	if deadline, ok := ctx.Deadline(); ok {
		_ = conn.SetDeadline(deadline)
	}
	for _, c := range cmds {
		if strings.ContainsAny(c, ";\n") {
			return nil, fmt.Errorf("runtime API: command %q holds a separator", c)
		}
	}
	if _, err := io.WriteString(conn, strings.Join(cmds, ";")+"\n"); err != nil {
		return nil, fmt.Errorf("runtime API: %w", err)
	}
	out, err := io.ReadAll(conn)
	if err != nil {
		return nil, fmt.Errorf("runtime API: %w", err)
	}
	return splitAnswers(string(out), len(cmds)), nil
}

// splitAnswers cuts HAProxy's output into n answers, each ended by an empty line.
func splitAnswers(out string, n int) []string {
	answers := make([]string, 0, n)
	for i := 0; i < n-1; i++ {
		a, rest, ok := strings.Cut(out, "\n\n")
		if !ok {
			break
		}
		answers = append(answers, a)
		out = rest
	}
	answers = append(answers, strings.TrimRight(out, "\n"))
	return answers
}

// ErrCommand is a command HAProxy refused or did not understand.
var ErrCommand = errors.New("HAProxy refused the command")

// setServerOK is whether answer is HAProxy's success for a `set server` command: nothing (state)
// or what changed (addr).
func setServerOK(answer string) bool {
	return answer == "" || strings.Contains(answer, " changed from ") || strings.Contains(answer, "no need to change")
}

// maxLine bounds one exchange's line, well within HAProxy's buffer (tune.bufsize, 16 kB).
const maxLine = 8 << 10

// SetServers sends `set server` commands, as few exchanges as fit, and fails on the first one
// HAProxy refused.
func (r *Runtime) SetServers(ctx context.Context, cmds []string) error {
	for len(cmds) > 0 {
		n, size := 0, 0
		for n < len(cmds) && (n == 0 || size+len(cmds[n])+1 <= maxLine) {
			size += len(cmds[n]) + 1
			n++
		}
		answers, err := r.Exec(ctx, cmds[:n]...)
		if err != nil {
			return err
		}
		for i, a := range answers {
			if !setServerOK(a) {
				return fmt.Errorf("%w: %q: %s", ErrCommand, cmds[i], strings.TrimSpace(a))
			}
		}
		cmds = cmds[n:]
	}
	return nil
}

// ServerState is one line of `show servers state`.
type ServerState struct {
	Backend string
	Server  string
	Addr    string
	Port    int
	// OpState is srv_op_state: 0 stopped, 1 starting, 2 running, 3 stopping.
	OpState int
	// AdminState is srv_admin_state, a bit field (HAProxy's enum srv_admin): 0x01 forced
	// maintenance (FMAINT, `set server … state maint`), 0x02 inherited (IMAINT), 0x04 disabled
	// in the configuration (CMAINT: a mark that stays once the server is set ready, not a
	// maintenance), 0x08 and 0x10 drain, 0x20 maintenance for a failed resolution (RMAINT).
	AdminState int
}

const (
	adminMaint = 0x23 // FMAINT | IMAINT | RMAINT: HAProxy's SRV_ADMF_MAINT
	adminDrain = 0x18 // FDRAIN | IDRAIN
)

// Maint is whether the server is in maintenance.
func (s ServerState) Maint() bool { return s.AdminState&adminMaint != 0 }

// Ready is whether HAProxy would send it a new request: up (starting or running) and neither in
// maintenance nor draining.
func (s ServerState) Ready() bool {
	return (s.OpState == 1 || s.OpState == 2) && s.AdminState&(adminMaint|adminDrain) == 0
}

// ServersState reads `show servers state [backend]`.
func (r *Runtime) ServersState(ctx context.Context, backend string) ([]ServerState, error) {
	cmd := "show servers state"
	if backend != "" {
		cmd += " " + backend
	}
	answers, err := r.Exec(ctx, cmd)
	if err != nil {
		return nil, err
	}
	return ParseServersState(answers[0])
}

// ParseServersState parses the answer to `show servers state` (format version 1): a version
// line, a header naming the columns, then one line per server.
func ParseServersState(text string) ([]ServerState, error) {
	lines := strings.Split(strings.TrimSpace(text), "\n")
	if len(lines) < 2 || strings.TrimSpace(lines[0]) != "1" || !strings.HasPrefix(lines[1], "# ") {
		return nil, fmt.Errorf("show servers state: not format 1: %q", firstLine(text))
	}
	col := map[string]int{}
	for i, name := range strings.Fields(strings.TrimPrefix(lines[1], "# ")) {
		col[name] = i
	}
	for _, name := range []string{"be_name", "srv_name", "srv_addr", "srv_op_state", "srv_admin_state", "srv_port"} {
		if _, ok := col[name]; !ok {
			return nil, fmt.Errorf("show servers state: no column %s", name)
		}
	}
	var out []ServerState
	for _, line := range lines[2:] {
		f := strings.Fields(line)
		if len(f) == 0 {
			continue
		}
		if len(f) < len(col) {
			return nil, fmt.Errorf("show servers state: %d fields in %q, want %d", len(f), line, len(col))
		}
		s := ServerState{Backend: f[col["be_name"]], Server: f[col["srv_name"]], Addr: f[col["srv_addr"]]}
		var errs []error
		for name, dst := range map[string]*int{"srv_op_state": &s.OpState, "srv_admin_state": &s.AdminState, "srv_port": &s.Port} {
			n, err := strconv.Atoi(f[col[name]])
			if err != nil {
				errs = append(errs, fmt.Errorf("show servers state: %s %q in %q", name, f[col[name]], line))
			}
			*dst = n
		}
		if err := errors.Join(errs...); err != nil {
			return nil, err
		}
		out = append(out, s)
	}
	return out, nil
}

func firstLine(s string) string {
	line, _, _ := strings.Cut(s, "\n")
	return line
}
