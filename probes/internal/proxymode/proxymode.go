// Package proxymode asks kube-proxy which mode it runs in: GET /proxyMode on its metrics address
// answers "iptables", "ipvs", "nftables" (or "kernelspace" on Windows). The dataplane probes decide
// whether their mode is the node's from what only that mode leaves in the kernel; where kube-proxy
// can be asked, its answer overrules them (a table left behind by an earlier mode, a virtual server
// keepalived made).
package proxymode

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"
)

// timeout bounds one question; kube-proxy answers from memory.
const timeout = time.Second

// Asker asks one kube-proxy.
type Asker struct {
	// URL is kube-proxy's metrics address; empty: never ask.
	URL    string
	Client *http.Client
}

// Mode returns kube-proxy's mode, or an error when it cannot be asked.
func (a Asker) Mode(ctx context.Context) (string, error) {
	if a.URL == "" {
		return "", fmt.Errorf("no kube-proxy address to ask")
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, strings.TrimSuffix(a.URL, "/")+"/proxyMode", nil)
	if err != nil {
		return "", err
	}
	client := a.Client
	if client == nil {
		client = http.DefaultClient
	}
	resp, err := client.Do(req)
	if err != nil {
		return "", fmt.Errorf("asking kube-proxy its mode: %w", err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 64))
	if err != nil {
		return "", fmt.Errorf("asking kube-proxy its mode: %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("kube-proxy's /proxyMode answered %s", resp.Status)
	}
	return strings.TrimSpace(string(body)), nil
}

// Disagrees asks kube-proxy and returns its mode when it answers with one other than want; ""
// when it answers want or cannot be asked (the kernel's evidence then decides alone).
func (a Asker) Disagrees(ctx context.Context, want string) string {
	mode, err := a.Mode(ctx)
	if err != nil || mode == want {
		return ""
	}
	return mode
}
