package cluster

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/endpointlag/endpointlag/lab/internal/ns"
)

// errUnsupportedProbe marks readiness probes the lab's kubelet cannot run: it has no container
// to exec into, and its pods speak no gRPC.
var errUnsupportedProbe = errors.New("the lab's kubelet runs only httpGet and tcpSocket readiness probes")

// probeSpec is one container's readiness probe with its defaults applied and its port resolved.
type probeSpec struct {
	container string
	// http is nil for a tcpSocket probe.
	http *httpGet
	port int
	// initialDelay, period and timeout are the probe's *Seconds fields.
	initialDelay, period, timeout time.Duration
	success, failure              int
}

type httpGet struct {
	scheme string
	// host is empty for the pod's address.
	host   string
	path   string
	header http.Header
}

// readinessProbe reads container c's readiness probe: nil when it has none, errUnsupportedProbe
// for an exec or grpc probe. The API server defaults the numbers; the kubelet's defaults apply
// here too, for objects that did not pass through it.
func readinessProbe(c *corev1.Container) (*probeSpec, error) {
	p := c.ReadinessProbe
	if p == nil {
		return nil, nil
	}
	s := &probeSpec{
		container:    c.Name,
		initialDelay: time.Duration(p.InitialDelaySeconds) * time.Second,
		period:       seconds(p.PeriodSeconds, 10),
		timeout:      seconds(p.TimeoutSeconds, 1),
		success:      orDefault(p.SuccessThreshold, 1),
		failure:      orDefault(p.FailureThreshold, 3),
	}
	var port intstr.IntOrString
	switch {
	case p.HTTPGet != nil:
		h := p.HTTPGet
		s.http = &httpGet{scheme: strings.ToLower(string(h.Scheme)), host: h.Host, path: h.Path, header: http.Header{}}
		if s.http.scheme == "" {
			s.http.scheme = "http"
		}
		if s.http.scheme != "http" && s.http.scheme != "https" {
			return nil, fmt.Errorf("container %s: readiness probe scheme %q is neither HTTP nor HTTPS", c.Name, h.Scheme)
		}
		for _, hd := range h.HTTPHeaders {
			s.http.header.Add(hd.Name, hd.Value)
		}
		port = h.Port
	case p.TCPSocket != nil:
		port = p.TCPSocket.Port
	default:
		return nil, fmt.Errorf("container %s: %w", c.Name, errUnsupportedProbe)
	}
	var err error
	if s.port, err = resolvePort(c, port); err != nil {
		return nil, fmt.Errorf("container %s: readiness probe: %w", c.Name, err)
	}
	return s, nil
}

func seconds(v, def int32) time.Duration {
	return time.Duration(orDefault(v, def)) * time.Second
}

func orDefault(v, def int32) int {
	if v <= 0 {
		return int(def)
	}
	return int(v)
}

// resolvePort turns a probe's port into a number; a name is looked up in the container's own
// ports, as the kubelet does.
func resolvePort(c *corev1.Container, port intstr.IntOrString) (int, error) {
	n := port.IntValue()
	if port.Type == intstr.String {
		i := slices.IndexFunc(c.Ports, func(cp corev1.ContainerPort) bool { return cp.Name == port.StrVal })
		if i < 0 {
			return 0, fmt.Errorf("port %q is not among the container's ports", port.StrVal)
		}
		n = int(c.Ports[i].ContainerPort)
	}
	if n < 1 || n > 65535 {
		return 0, fmt.Errorf("port %d is not a port number", n)
	}
	return n, nil
}

// prober runs one container's readiness probe against the pod's address from the node's
// network namespace, as the kubelet does from the node: the source address is the node's (in
// the lab, 169.254.1.1 on each pod veth's node end).
type prober struct {
	spec   *probeSpec
	target netip.Addr
	nodeNS string
	// agent is the User-Agent of HTTP probes, "kube-probe/<major>.<minor>" like the kubelet's.
	agent  string
	client *http.Client
	streak streak
	// wake runs a probe now: the container has (re)started.
	wake chan struct{}
}

func newProber(spec *probeSpec, target netip.Addr, nodeNS, agent string) *prober {
	p := &prober{
		spec: spec, target: target, nodeNS: nodeNS, agent: agent,
		streak: streak{success: spec.success, failure: spec.failure},
		wake:   make(chan struct{}, 1),
	}
	if spec.http != nil {
		p.client = &http.Client{
			Timeout: spec.timeout,
			Transport: &http.Transport{
				// The kubelet opens a connection per probe and does not check certificates.
				DisableKeepAlives: true,
				TLSClientConfig:   &tls.Config{InsecureSkipVerify: true},
				DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
					return ns.Dial(ctx, nodeNS, nil, network, addr)
				},
			},
			// The kubelet counts a redirect it does not follow as success, as 3xx is here.
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
		}
	}
	return p
}

// probe runs the probe once: whether it succeeded, and why not.
func (p *prober) probe(ctx context.Context) (bool, string) {
	ctx, cancel := context.WithTimeout(ctx, p.spec.timeout)
	defer cancel()
	addr := netip.AddrPortFrom(p.target, uint16(p.spec.port)).String()
	if p.spec.http == nil {
		c, err := ns.Dial(ctx, p.nodeNS, nil, "tcp", addr)
		if err != nil {
			return false, "TCP probe: " + err.Error()
		}
		c.Close()
		return true, ""
	}
	req, err := p.request(ctx)
	if err != nil {
		return false, err.Error()
	}
	resp, err := p.client.Do(req)
	if err != nil {
		return false, "HTTP probe: " + err.Error()
	}
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 10<<10))
	if resp.StatusCode < http.StatusOK || resp.StatusCode >= http.StatusBadRequest {
		return false, fmt.Sprintf("HTTP probe failed with statuscode: %d", resp.StatusCode)
	}
	return true, ""
}

func (p *prober) request(ctx context.Context) (*http.Request, error) {
	h := p.spec.http
	host := h.host
	if host == "" {
		host = p.target.String()
	}
	u, err := url.Parse(h.path)
	if err != nil {
		return nil, fmt.Errorf("readiness probe path %q: %w", h.path, err)
	}
	u.Scheme, u.Host = h.scheme, net.JoinHostPort(host, strconv.Itoa(p.spec.port))
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	if err != nil {
		return nil, err
	}
	req.Header = h.header.Clone()
	if _, ok := req.Header["User-Agent"]; !ok {
		req.Header.Set("User-Agent", p.agent)
	}
	if _, ok := req.Header["Accept"]; !ok {
		req.Header.Set("Accept", "*/*")
	}
	req.Host = req.Header.Get("Host")
	return req, nil
}

// streak counts a probe's results in a row, as the kubelet's probe worker does: readiness
// changes only once successThreshold successes or failureThreshold failures follow each other.
type streak struct {
	success, failure int
	last             bool
	// n is how many results equal to last came in a row; 0 before the first result.
	n int
}

// observe counts one result and reports whether it decides readiness now.
func (s *streak) observe(ok bool) bool {
	if s.n > 0 && s.last == ok {
		s.n++
	} else {
		s.last, s.n = ok, 1
	}
	if ok {
		return s.n >= s.success
	}
	return s.n >= s.failure
}

// startProbers starts a prober for each container with a readiness probe the lab can run, once
// a process first listens; they run until the pod's containers have stopped for good.
func (k *kubelet) startProbers(r *podRun) {
	if len(r.probes) == 0 {
		return
	}
	ctx, cancel := context.WithCancel(r.ctx)
	r.stopProbes = cancel
	for _, spec := range r.probes {
		p := newProber(spec, r.state.ip, k.nodeNS, k.agent)
		r.probers = append(r.probers, p)
		r.probing.Go(func() { k.probeLoop(ctx, r, p) })
	}
}

// probeLoop probes while the process runs: the first time once the initial delay after its
// start has passed (the kubelet too triggers a probe of a container not yet ready), then every
// period. A restart wakes it.
func (k *kubelet) probeLoop(ctx context.Context, r *podRun, p *prober) {
	for {
		r.mu.Lock()
		started := r.state.started
		r.mu.Unlock()
		wait := p.spec.period
		if !started.IsZero() {
			if d := time.Until(started.Add(p.spec.initialDelay)); d > 0 {
				wait = d
			} else if ok, why := p.probe(ctx); p.streak.observe(ok) {
				k.setProbeReady(r, p.spec.container, started, ok, why)
			}
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-p.wake:
			t.Stop()
		case <-t.C:
		}
	}
}

// setProbeReady records a container's readiness decided by its probe and reports a change in
// the pod's status; a result about a process that has been replaced meanwhile is dropped.
func (k *kubelet) setProbeReady(r *podRun, container string, started time.Time, ready bool, why string) {
	r.mu.Lock()
	if !r.state.started.Equal(started) || r.state.probeReady[container] == ready {
		r.mu.Unlock()
		return
	}
	r.state.probeReady[container] = ready
	r.mu.Unlock()
	if ready {
		k.log.Debug("readiness probe succeeded", "pod", r.pod.Namespace+"/"+r.pod.Name, "container", container)
	} else {
		k.event(r.ctx, r.pod, corev1.EventTypeWarning, "Unhealthy", "Readiness probe failed: "+why)
	}
	k.writeStatusOrLog(r)
}
