package cluster

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/endpointlag/endpointlag/lab/internal/ns"
)

// procs starts the lab's processes inside namespaces and records each PID in a file of the state
// directory, so that a later run can end what a crashed one left, by PID and only after checking
// that the PID still runs one of the lab's binaries.
type procs struct {
	dir  string
	mu   sync.Mutex
	list []*proc
}

type proc struct {
	name string
	cmd  *exec.Cmd
	done chan struct{}
	err  error
	// spec is how it was started, for restart.
	spec procSpec
}

type procSpec struct {
	netns, binary string
	env, args     []string
}

const pidFile = "pids"

// start runs binary in namespace netns with its output in logs/<name>.log.
func (p *procs) start(name, netns, binary string, args ...string) (*proc, error) {
	return p.startEnv(name, netns, nil, binary, args...)
}

// startEnv is start with the environment env (nil: this process's).
func (p *procs) startEnv(name, netns string, env []string, binary string, args ...string) (*proc, error) {
	return p.run(name, procSpec{netns: netns, binary: binary, env: env, args: args}, os.O_TRUNC)
}

// restart ends pr with sig (SIGKILL when it has not ended after grace) and starts it again as it
// was started, its output appended to the same log.
func (p *procs) restart(pr *proc, sig syscall.Signal, grace time.Duration) (*proc, error) {
	if done, _ := pr.exited(); !done {
		_ = pr.cmd.Process.Signal(sig)
		_ = pr.cmd.Process.Signal(syscall.SIGCONT)
		select {
		case <-pr.done:
		case <-time.After(grace):
			pr.kill()
		}
	}
	p.mu.Lock()
	p.list = slices.DeleteFunc(p.list, func(q *proc) bool { return q == pr })
	p.mu.Unlock()
	return p.run(pr.name, pr.spec, os.O_APPEND)
}

// pid is the process's PID.
func (pr *proc) pid() int { return pr.cmd.Process.Pid }

func (p *procs) run(name string, spec procSpec, mode int) (*proc, error) {
	logf, err := os.OpenFile(filepath.Join(p.dir, "logs", name+".log"), os.O_CREATE|os.O_WRONLY|mode, 0o644)
	if err != nil {
		return nil, err
	}
	if mode == os.O_APPEND {
		fmt.Fprintf(logf, "--- lab: restarted at %s\n", time.Now().Format(time.RFC3339Nano))
	}
	binary := spec.binary
	cmd := ns.Command(spec.netns, append([]string{binary}, spec.args...)...)
	cmd.Env = spec.env
	cmd.Stdout, cmd.Stderr = logf, logf
	// The child dies with the lab process; `ip netns exec` execs the binary, which keeps it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return nil, fmt.Errorf("starting %s: %w", name, err)
	}
	pr := &proc{name: name, cmd: cmd, done: make(chan struct{}), spec: spec}
	go func() {
		pr.err = cmd.Wait()
		logf.Close()
		close(pr.done)
	}()
	p.mu.Lock()
	defer p.mu.Unlock()
	p.list = append(p.list, pr)
	f, err := os.OpenFile(filepath.Join(p.dir, pidFile), os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o600)
	if err != nil {
		return pr, err
	}
	defer f.Close()
	_, err = fmt.Fprintf(f, "%d %s\n", cmd.Process.Pid, binary)
	return pr, err
}

// exited reports whether the process has ended, and how.
func (pr *proc) exited() (bool, error) {
	select {
	case <-pr.done:
		return true, pr.err
	default:
		return false, nil
	}
}

// kill ends the process at once and waits for it.
func (pr *proc) kill() {
	if done, _ := pr.exited(); done {
		return
	}
	_ = pr.cmd.Process.Kill()
	<-pr.done
}

// stopAll ends the processes, newest first: SIGTERM, then SIGKILL after the grace period.
func (p *procs) stopAll(grace time.Duration) {
	p.mu.Lock()
	list := p.list
	p.list = nil
	p.mu.Unlock()
	for i := len(list) - 1; i >= 0; i-- {
		pr := list[i]
		if done, _ := pr.exited(); done {
			continue
		}
		_ = pr.cmd.Process.Signal(syscall.SIGTERM)
		// A stopped process (a paused kube-proxy) acts on SIGTERM only once continued.
		_ = pr.cmd.Process.Signal(syscall.SIGCONT)
		select {
		case <-pr.done:
		case <-time.After(grace):
			_ = pr.cmd.Process.Kill()
			<-pr.done
		}
	}
	_ = os.Remove(filepath.Join(p.dir, pidFile))
}

// killLeftovers ends the processes a previous run recorded in dir and that still run the binary
// it recorded. It returns how many it killed.
func killLeftovers(dir string) (int, error) {
	f, err := os.Open(filepath.Join(dir, pidFile))
	if errors.Is(err, os.ErrNotExist) {
		return 0, nil
	}
	if err != nil {
		return 0, err
	}
	defer f.Close()
	killed := 0
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		pidText, binary, ok := strings.Cut(sc.Text(), " ")
		pid, err := strconv.Atoi(pidText)
		if !ok || err != nil || pid <= 1 {
			continue
		}
		exe, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid))
		if err != nil || exe != binary {
			continue // gone, or the PID now belongs to something else
		}
		if syscall.Kill(pid, syscall.SIGKILL) == nil {
			killed++
			waitGone(pid, 5*time.Second)
		}
	}
	if err := sc.Err(); err != nil {
		return killed, err
	}
	return killed, os.Remove(filepath.Join(dir, pidFile))
}

func waitGone(pid int, timeout time.Duration) {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if err := syscall.Kill(pid, 0); errors.Is(err, syscall.ESRCH) {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
}
