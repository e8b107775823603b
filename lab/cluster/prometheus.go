package cluster

import (
	"context"
	"fmt"
	"net/http"
	"net/netip"
	"os"
	"strings"
	"time"
)

// prometheusPort is Prometheus's port on the control plane's address; Config.PrometheusPort
// forwards loopback to it.
const prometheusPort = 9090

// PrometheusConfig is what StartPrometheus runs.
type PrometheusConfig struct {
	// Binary is the prometheus binary (Debian's package prometheus).
	Binary string
	// Token is the bearer token Prometheus sends to the API server (service discovery) and to
	// the daemons it scrapes: a ServiceAccount's, so that what it may do is what RBAC grants.
	Token string
	// Namespace and PodSelector choose the daemons' pods, found with Kubernetes service
	// discovery as the chart's PodMonitor finds them.
	Namespace, PodSelector string
	// Port is the pods' port name to scrape.
	Port string
	// RuleFiles are evaluated every EvaluationInterval; ScrapeInterval is how often each pod is
	// scraped.
	RuleFiles                          []string
	ScrapeInterval, EvaluationInterval time.Duration
}

// prometheusConfig mirrors the chart's PodMonitor: pods of the namespace with the selector's
// labels, the named port over HTTPS with the ServiceAccount's token, the daemon's self-signed
// certificate not verified, and the target labels the dashboards and alerts group by (node,
// namespace, pod, job).
const prometheusConfig = `global:
  scrape_interval: %[1]s
  evaluation_interval: %[2]s
rule_files: [%[3]s]
scrape_configs:
- job_name: endpointlag
  scheme: https
  authorization:
    credentials_file: %[4]s
  tls_config:
    insecure_skip_verify: true
  kubernetes_sd_configs:
  - role: pod
    api_server: https://%[5]s
    authorization:
      credentials_file: %[4]s
    tls_config:
      ca_file: %[6]s
    namespaces:
      names: [%[7]s]
    selectors:
    - role: pod
      label: %[8]q
  relabel_configs:
  - source_labels: [__meta_kubernetes_pod_container_port_name]
    regex: %[9]s
    action: keep
  - source_labels: [__meta_kubernetes_pod_node_name]
    target_label: node
  - source_labels: [__meta_kubernetes_namespace]
    target_label: namespace
  - source_labels: [__meta_kubernetes_pod_name]
    target_label: pod
  - target_label: job
    replacement: endpointlag
`

// StartPrometheus runs a real Prometheus in the control plane's namespace and returns the
// loopback URL of its API.
func (c *Cluster) StartPrometheus(ctx context.Context, cfg PrometheusConfig) (string, error) {
	tokenFile := c.path("prometheus.token")
	if err := os.WriteFile(tokenFile, []byte(cfg.Token), 0o600); err != nil {
		return "", err
	}
	rules := make([]string, len(cfg.RuleFiles))
	for i, f := range cfg.RuleFiles {
		rules[i] = fmt.Sprintf("%q", f)
	}
	conf := c.path("prometheus.yml")
	body := fmt.Sprintf(prometheusConfig, cfg.ScrapeInterval, cfg.EvaluationInterval, strings.Join(rules, ", "), tokenFile,
		netip.AddrPortFrom(cpAddr, 6443), c.path("pki/apiserver.crt"), cfg.Namespace, cfg.PodSelector, cfg.Port)
	if err := os.WriteFile(conf, []byte(body), 0o600); err != nil {
		return "", err
	}
	listen := netip.AddrPortFrom(cpAddr, prometheusPort).String()
	p, err := c.procs.start("prometheus", cpNS, cfg.Binary, "--config.file="+conf, "--storage.tsdb.path="+c.path("prometheus"),
		"--web.listen-address="+listen, "--log.level=warn")
	if err != nil {
		return "", err
	}
	if err := c.forward(c.cfg.PrometheusPort, cpNS, listen); err != nil {
		return "", err
	}
	url := fmt.Sprintf("http://127.0.0.1:%d", c.cfg.PrometheusPort)
	err = waitFor(ctx, 60*time.Second, "Prometheus to be ready", func() error {
		if done, perr := p.exited(); done {
			return &fatal{fmt.Errorf("prometheus exited (%v); see %s", perr, c.path("logs/prometheus.log"))}
		}
		resp, err := http.Get(url + "/-/ready")
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("%s/-/ready: %s", url, resp.Status)
		}
		return nil
	})
	return url, err
}
