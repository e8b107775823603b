// Package pod is the program every lab pod runs: an HTTP server that answers with the pod's name
// and reacts to SIGTERM the way the pod's spec asks.
package pod

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"time"
)

// Serve listens on port, answers every request with name, and returns once stop is done and
// drain has passed: "exit at once" is a drain of 0. The caller then exits, and the kernel closes
// the listener and every connection.
func Serve(stop context.Context, name string, port int, drain time.Duration) error {
	l, err := net.Listen("tcp", fmt.Sprintf(":%d", port))
	if err != nil {
		return err
	}
	srv := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
			fmt.Fprintln(w, name)
		}),
		ReadHeaderTimeout: 5 * time.Second,
	}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(l) }()
	select {
	case err := <-errc:
		return err
	case <-stop.Done():
	}
	if drain > 0 {
		time.Sleep(drain)
	}
	return nil
}
