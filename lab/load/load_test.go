package load

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"syscall"
	"testing"
	"time"
)

func TestClassify(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want string
	}{
		{&net.OpError{Op: "dial", Err: os.NewSyscallError("connect", syscall.ECONNREFUSED)}, Refused},
		{&net.OpError{Op: "read", Err: os.NewSyscallError("read", syscall.ECONNRESET)}, Reset},
		{fmt.Errorf("get: %w", io.EOF), Reset},
		{&net.OpError{Op: "dial", Err: os.NewSyscallError("connect", syscall.ENETUNREACH)}, Unreachable},
		{&net.OpError{Op: "dial", Err: os.NewSyscallError("connect", syscall.EHOSTUNREACH)}, Unreachable},
		{fmt.Errorf("wrapped: %w", os.ErrDeadlineExceeded), Timeout},
		{errors.New("something else"), Other},
	} {
		if got := classify(tc.err); got != tc.want {
			t.Errorf("classify(%v) = %s, want %s", tc.err, got, tc.want)
		}
	}
}

// Against a local server: every request is counted, successes name the backend, and a server that
// stops answering shows up as failures of the right kind.
func TestRunAgainstLoopback(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprintln(w, "pod-a")
	}))
	addr := srv.Listener.Addr().String()
	rs, err := Run(context.Background(), Config{Target: addr, Rate: 100, Duration: 300 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	s := Summarize(rs)
	if s.Requests < 20 || s.Failed != 0 || s.Backends != 1 || rs[0].Backend != "pod-a" {
		t.Errorf("summary %+v, first %+v", s, rs[0])
	}
	srv.Close()
	rs, err = Run(context.Background(), Config{Target: addr, Rate: 100, Duration: 100 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	if s := Summarize(rs); s.Failed != s.Requests || s.ByKind[Refused] != s.Requests {
		t.Errorf("against a closed port: %+v", s)
	}
}

func TestRunBounds(t *testing.T) {
	for _, c := range []Config{{Target: "x:1", Rate: 0, Duration: time.Second}, {Target: "x:1", Rate: 10, Duration: time.Hour}} {
		if _, err := Run(context.Background(), c); err == nil {
			t.Errorf("%+v: no error", c)
		}
	}
}
