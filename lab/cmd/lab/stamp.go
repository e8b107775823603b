package main

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"syscall"
	"time"
)

// stamp runs the command after `--` and prints each line of its standard output prefixed with
// the time it was read (RFC 3339, nanoseconds) and a tab. The e2e tests' rule monitors run
// `nft monitor` under it, real-time scheduled with it, so that a line is timed when nft printed
// it rather than when the busy test process got to read it.
func stamp(args []string) error {
	if len(args) < 2 || args[0] != "--" {
		return errors.New("usage: lab stamp -- COMMAND [ARG...]")
	}
	cmd := exec.Command(args[1], args[2:]...)
	cmd.Stderr = os.Stderr
	// The command ends with this process: whoever stops the monitor stops this one.
	runtime.LockOSThread()
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	out, err := cmd.StdoutPipe()
	if err != nil {
		return err
	}
	if err := cmd.Start(); err != nil {
		return err
	}
	w := bufio.NewWriter(os.Stdout)
	sc := bufio.NewScanner(out)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		fmt.Fprintf(w, "%s\t%s\n", time.Now().Format(time.RFC3339Nano), sc.Bytes())
		if err := w.Flush(); err != nil {
			_ = cmd.Process.Kill()
			return err
		}
	}
	return errors.Join(sc.Err(), cmd.Wait())
}
