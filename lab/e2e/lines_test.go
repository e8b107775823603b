package e2e

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// lineProcess is a command whose stdout lines, each prefixed by an RFC 3339 time and a tab (as
// `lab stamp` prints them), are handed to a callback as they arrive. The command runs in a
// process group of its own: stopping it kills the group, so that no child it started can hold
// the pipe open and keep the reader waiting.
type lineProcess struct {
	cmd  *exec.Cmd
	out  io.Closer
	done chan struct{}
}

// stopWait bounds how long stop waits for the pipe to close after the kill.
const stopWait = 10 * time.Second

func startLines(cmd *exec.Cmd, line func(at time.Time, line string)) (*lineProcess, error) {
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	p := &lineProcess{cmd: cmd, out: out, done: make(chan struct{})}
	go func() {
		defer close(p.done)
		sc := bufio.NewScanner(out)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		for sc.Scan() {
			ts, l, ok := strings.Cut(sc.Text(), "\t")
			at, err := time.Parse(time.RFC3339Nano, ts)
			if !ok || err != nil {
				continue
			}
			line(at, l)
		}
	}()
	return p, nil
}

// stop kills the command's process group and waits for its output to end. If the pipe is still
// open after stopWait (a process of the group stuck in the kernel), it closes its end and says
// which process was stuck and where.
func (p *lineProcess) stop() error {
	pid := p.cmd.Process.Pid
	killErr := syscall.Kill(-pid, syscall.SIGKILL)
	var stuck error
	select {
	case <-p.done:
	case <-time.After(stopWait):
		stuck = fmt.Errorf("%s: output still open %s after killing process group %d (%v); %s",
			p.cmd, stopWait, pid, killErr, groupState(pid))
		_ = p.out.Close()
		<-p.done
	}
	waitErr := p.cmd.Wait()
	var exit *exec.ExitError
	if errors.As(waitErr, &exit) {
		waitErr = nil // killed, as asked
	}
	return errors.Join(stuck, waitErr)
}

// groupState lists the processes of group pgid with their state and kernel wait channel.
func groupState(pgid int) string {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return err.Error()
	}
	var found []string
	for _, e := range entries {
		stat, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		// pid (comm) state ppid pgrp …; comm may hold spaces and parentheses.
		_, rest, ok := strings.Cut(string(stat), ") ")
		if !ok {
			continue
		}
		f := strings.Fields(rest)
		if len(f) < 3 || f[2] != fmt.Sprint(pgid) {
			continue
		}
		comm, _ := os.ReadFile("/proc/" + e.Name() + "/comm")
		wchan, _ := os.ReadFile("/proc/" + e.Name() + "/wchan")
		found = append(found, fmt.Sprintf("pid %s %s state %s wchan %s", e.Name(), strings.TrimSpace(string(comm)), f[0], wchan))
	}
	if len(found) == 0 {
		return "no process of the group left"
	}
	return strings.Join(found, "; ")
}

// TestLinesStopEndsChildrenHoldingThePipe: a command whose child still holds its stdout (as `lab
// stamp`'s `nft monitor` may) is stopped in whole, and the lines it printed before are kept.
func TestLinesStopEndsChildrenHoldingThePipe(t *testing.T) {
	var (
		mu   sync.Mutex
		seen []string
	)
	cmd := exec.Command("sh", "-c", `printf '2026-11-30T00:00:00Z\tfirst\nno time\n'; sleep 600 & exec sleep 600`)
	p, err := startLines(cmd, func(_ time.Time, line string) {
		mu.Lock()
		seen = append(seen, line)
		mu.Unlock()
	})
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		mu.Lock()
		n := len(seen)
		mu.Unlock()
		if n > 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	start := time.Now()
	if err := p.stop(); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d >= stopWait {
		t.Errorf("stop took %s: it waited out its bound instead of ending the group", d)
	}
	if len(seen) != 1 || seen[0] != "first" {
		t.Errorf("lines %q, want [first]", seen)
	}
}
