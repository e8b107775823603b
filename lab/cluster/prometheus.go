package cluster

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"time"
)

// prometheusPort is Prometheus's port on the control plane's address; Config.PrometheusPort
// forwards loopback to it.
const prometheusPort = 9090

// PrometheusConfig is what StartPrometheus runs.
type PrometheusConfig struct {
	// Binary is the prometheus binary (Debian's package prometheus).
	Binary string
	// Token is the bearer token Prometheus sends to the targets: a ServiceAccount's, so that
	// what it may read is what RBAC grants.
	Token string
	// Jobs are the scrape jobs.
	Jobs []ScrapeJob
	// RuleFiles are evaluated every EvaluationInterval; ScrapeInterval is how often each target
	// is scraped.
	RuleFiles                          []string
	ScrapeInterval, EvaluationInterval time.Duration
}

// ScrapeJob is one job: its targets (host:port, scraped over HTTPS with the token, their
// self-signed certificates not verified), each with its target labels.
type ScrapeJob struct {
	Name string
	// HonorLabels keeps the scraped series' own labels over the target's (the aggregator's
	// per-workload namespace label).
	HonorLabels bool
	Targets     []ScrapeTarget
}

// ScrapeTarget is a target's address and labels.
type ScrapeTarget struct {
	Addr   string
	Labels map[string]string
}

// prometheusConfig writes the configuration: Debian's Prometheus is built without Kubernetes
// service discovery, so the targets are listed with the labels the chart's PodMonitor and
// ServiceMonitor relabelings give them (node, namespace, pod, job).
func prometheusConfig(cfg PrometheusConfig, tokenFile string) ([]byte, error) {
	type static struct {
		Targets []string          `json:"targets"`
		Labels  map[string]string `json:"labels"`
	}
	type job struct {
		Name          string         `json:"job_name"`
		Scheme        string         `json:"scheme"`
		HonorLabels   bool           `json:"honor_labels"`
		Authorization map[string]any `json:"authorization"`
		TLS           map[string]any `json:"tls_config"`
		Static        []static       `json:"static_configs"`
	}
	type global struct {
		Scrape string `json:"scrape_interval"`
		Eval   string `json:"evaluation_interval"`
	}
	conf := struct {
		Global global   `json:"global"`
		Rules  []string `json:"rule_files"`
		Jobs   []job    `json:"scrape_configs"`
	}{Global: global{cfg.ScrapeInterval.String(), cfg.EvaluationInterval.String()}, Rules: cfg.RuleFiles}
	for _, j := range cfg.Jobs {
		pj := job{Name: j.Name, Scheme: "https", HonorLabels: j.HonorLabels,
			Authorization: map[string]any{"credentials_file": tokenFile}, TLS: map[string]any{"insecure_skip_verify": true}}
		for _, t := range j.Targets {
			pj.Static = append(pj.Static, static{Targets: []string{t.Addr}, Labels: t.Labels})
		}
		conf.Jobs = append(conf.Jobs, pj)
	}
	// JSON is YAML.
	return json.MarshalIndent(conf, "", "  ")
}

// StartPrometheus runs a real Prometheus in the control plane's namespace and returns the
// loopback URL of its API.
func (c *Cluster) StartPrometheus(ctx context.Context, cfg PrometheusConfig) (string, error) {
	tokenFile := c.path("prometheus.token")
	if err := os.WriteFile(tokenFile, []byte(cfg.Token), 0o600); err != nil {
		return "", err
	}
	body, err := prometheusConfig(cfg, tokenFile)
	if err != nil {
		return "", err
	}
	conf := c.path("prometheus.yml")
	if err := os.WriteFile(conf, body, 0o600); err != nil {
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
		return httpOK(ctx, "", url+"/-/ready")
	})
	return url, err
}
