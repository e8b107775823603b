// Package load sends HTTP requests at a fixed rate from inside a network namespace (the lab's
// client pod) and records every outcome: when, which backend answered, or how it failed.
package load

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/endpointlag/endpointlag/lab/internal/ns"
)

// Config of one load run. Runs are bounded: Duration, and at most Rate × Duration requests.
type Config struct {
	// NS is the network namespace requests are sent from.
	NS string
	// Target is host:port, e.g. a Service's ClusterIP and port.
	Target string
	// Rate is requests per second.
	Rate int
	// Duration bounds the run.
	Duration time.Duration
	// KeepAlive reuses connections; otherwise every request opens a new one.
	KeepAlive bool
	// Timeout bounds each request.
	Timeout time.Duration
}

// Failure kinds.
const (
	Refused = "refused"
	Reset   = "reset"
	Timeout = "timeout"
	Other   = "other"
)

// Result is one request.
type Result struct {
	Start   time.Time
	Latency time.Duration
	// Backend is the pod that answered, empty on failure.
	Backend string
	// Failure is one of the kinds above, empty on success.
	Failure string
	Err     string
}

// Run sends requests until cfg.Duration has passed or ctx is done, and returns every result in
// start order.
func Run(ctx context.Context, cfg Config) ([]Result, error) {
	if cfg.Rate <= 0 || cfg.Rate > 2000 {
		return nil, fmt.Errorf("rate %d/s is not between 1 and 2000", cfg.Rate)
	}
	if cfg.Duration <= 0 || cfg.Duration > 30*time.Minute {
		return nil, fmt.Errorf("duration %s is not between 0 and 30m", cfg.Duration)
	}
	if cfg.Timeout == 0 {
		cfg.Timeout = time.Second
	}
	tr := &http.Transport{
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			return ns.Dial(ctx, cfg.NS, network, addr)
		},
		DisableKeepAlives:   !cfg.KeepAlive,
		MaxIdleConnsPerHost: 64,
	}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr, Timeout: cfg.Timeout}
	url := "http://" + cfg.Target + "/"

	ctx, cancel := context.WithTimeout(ctx, cfg.Duration)
	defer cancel()
	tick := time.NewTicker(time.Second / time.Duration(cfg.Rate))
	defer tick.Stop()
	var (
		mu      sync.Mutex
		results []Result
		wg      sync.WaitGroup
	)
	limit := int(cfg.Duration.Seconds()*float64(cfg.Rate)) + 1
	for sent := 0; sent < limit; sent++ {
		select {
		case <-ctx.Done():
			sent = limit
			continue
		case <-tick.C:
		}
		wg.Go(func() {
			r := do(client, url)
			mu.Lock()
			results = append(results, r)
			mu.Unlock()
		})
	}
	wg.Wait()
	sort.Slice(results, func(i, j int) bool { return results[i].Start.Before(results[j].Start) })
	return results, nil
}

func do(client *http.Client, url string) Result {
	r := Result{Start: time.Now()}
	resp, err := client.Get(url)
	if err == nil {
		var body []byte
		body, err = io.ReadAll(io.LimitReader(resp.Body, 256))
		resp.Body.Close()
		if err == nil && resp.StatusCode != http.StatusOK {
			err = fmt.Errorf("status %s", resp.Status)
		}
		r.Backend = strings.TrimSpace(string(body))
	}
	r.Latency = time.Since(r.Start)
	if err != nil {
		r.Backend = ""
		r.Failure, r.Err = classify(err), err.Error()
	}
	return r
}

func classify(err error) string {
	var ne net.Error
	switch {
	case errors.Is(err, syscall.ECONNREFUSED):
		return Refused
	case errors.Is(err, syscall.ECONNRESET), errors.Is(err, syscall.EPIPE), errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		return Reset
	case errors.Is(err, os.ErrDeadlineExceeded), errors.As(err, &ne) && ne.Timeout():
		return Timeout
	}
	return Other
}

// Summary counts results.
type Summary struct {
	Requests int
	Failed   int
	ByKind   map[string]int
	Backends int
}

// Summarize counts the results.
func Summarize(rs []Result) Summary {
	s := Summary{Requests: len(rs), ByKind: map[string]int{}}
	backends := map[string]bool{}
	for _, r := range rs {
		if r.Failure != "" {
			s.Failed++
			s.ByKind[r.Failure]++
		} else {
			backends[r.Backend] = true
		}
	}
	s.Backends = len(backends)
	return s
}

// WriteLog writes one line per failure: time, kind and error.
func WriteLog(w io.Writer, rs []Result) error {
	bw := bufio.NewWriter(w)
	for _, r := range rs {
		if r.Failure != "" {
			fmt.Fprintf(bw, "%s %s %s\n", r.Start.Format(time.RFC3339Nano), r.Failure, r.Err)
		}
	}
	return bw.Flush()
}
