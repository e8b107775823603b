// Package pod is the program every lab pod runs: an HTTP server that answers with the pod's name
// and reacts to SIGTERM the way the pod's spec asks.
package pod

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strings"
	"sync/atomic"
	"time"
)

// OnSIGTERM is what the server does when asked to stop, after the pod's preStop hook.
type OnSIGTERM struct {
	// Drain keeps serving this long before exiting; 0 exits at once.
	Drain time.Duration
	// Unready answers the kubelet's probes with 503 from the SIGTERM on while it drains, as
	// servers do that fail their readiness endpoint before they stop.
	Unready bool
}

// ParseOnSIGTERM reads "exit" (or ""), "drain=DURATION" or "drain-unready=DURATION".
func ParseOnSIGTERM(s string) (OnSIGTERM, error) {
	if s == "" || s == "exit" {
		return OnSIGTERM{}, nil
	}
	kind, v, ok := strings.Cut(s, "=")
	if !ok || (kind != "drain" && kind != "drain-unready") {
		return OnSIGTERM{}, fmt.Errorf("%q: want exit, drain=DURATION or drain-unready=DURATION", s)
	}
	d, err := time.ParseDuration(v)
	if err != nil || d <= 0 {
		return OnSIGTERM{}, fmt.Errorf("%q: the drain %q is not a positive duration", s, v)
	}
	return OnSIGTERM{Drain: d, Unready: kind == "drain-unready"}, nil
}

func (o OnSIGTERM) String() string {
	switch {
	case o.Drain == 0:
		return "exit"
	case o.Unready:
		return "drain-unready=" + o.Drain.String()
	default:
		return "drain=" + o.Drain.String()
	}
}

// Server is one pod's server.
type Server struct {
	// Name is the body of every answer.
	Name string
	// Ports are the TCP ports it listens on, all answering alike.
	Ports     []int
	OnSIGTERM OnSIGTERM
	// ExitAfter ends the server on its own this long after it started, a pod that runs to
	// completion; 0 runs until stopped.
	ExitAfter time.Duration
}

// ErrCompleted is what Serve returns once ExitAfter has passed.
var ErrCompleted = errors.New("ran to completion")

// probeAgent starts the User-Agent of the kubelet's HTTP probes ("kube-probe/1.37").
const probeAgent = "kube-probe/"

// Serve listens on every port and answers every request with the server's name until stop is
// done and the OnSIGTERM behaviour has run its course (then it returns nil), or ExitAfter has
// passed (ErrCompleted). The caller then exits, and the kernel closes the listeners and every
// connection.
func (s Server) Serve(stop context.Context) error {
	if len(s.Ports) == 0 {
		return errors.New("no port to listen on")
	}
	var unready atomic.Bool
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if unready.Load() && strings.HasPrefix(r.UserAgent(), probeAgent) {
			http.Error(w, "draining", http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, s.Name)
	})
	errc := make(chan error, len(s.Ports))
	for _, port := range s.Ports {
		l, err := net.Listen("tcp", fmt.Sprintf(":%d", port))
		if err != nil {
			return err
		}
		srv := &http.Server{Handler: handler, ReadHeaderTimeout: 5 * time.Second}
		go func() { errc <- srv.Serve(l) }()
	}
	var completed <-chan time.Time
	if s.ExitAfter > 0 {
		completed = time.After(s.ExitAfter)
	}
	select {
	case err := <-errc:
		return err
	case <-completed:
		return ErrCompleted
	case <-stop.Done():
	}
	unready.Store(s.OnSIGTERM.Unready)
	if s.OnSIGTERM.Drain > 0 {
		time.Sleep(s.OnSIGTERM.Drain)
	}
	return nil
}
