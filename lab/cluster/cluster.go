// Package cluster starts and stops the lab: a real Kubernetes control plane (etcd,
// kube-apiserver, kube-controller-manager) and, per node, kube-proxy and endpointlag, each node a
// network namespace on a shared underlay bridge, with a kubelet stand-in and a binder running in
// this process. Nothing is routed from the root namespace: the API server and the daemons'
// endpoints are reached through forwarders on loopback.
package cluster

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/validation"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/endpointlag/endpointlag/lab/internal/ns"
	"github.com/endpointlag/endpointlag/lab/load"
	"github.com/endpointlag/endpointlag/lab/report"
)

// Config chooses the lab's shape.
type Config struct {
	// Nodes is the number of nodes (1 to 9).
	Nodes int
	// ProxyMode is kube-proxy's mode: nftables or iptables.
	ProxyMode string
	// Zones are the nodes' zones, one per node in order (empty: no zones): each Node gets the
	// topology.kubernetes.io/zone label, and the region label Region, before its kube-proxy
	// starts, so that kube-proxy knows its zone and the endpointslice controller sets zone hints.
	Zones []string
	// MaxEndpointsPerSlice is kube-controller-manager's --max-endpoints-per-slice (1 to 1000;
	// 0 leaves its default of 100).
	MaxEndpointsPerSlice int
	// BinDir holds etcd, kube-apiserver, kube-controller-manager and kube-proxy.
	BinDir string
	// Endpointlag is the endpointlag binary run on every node.
	Endpointlag string
	// Tool is the lab binary: pods run `Tool serve`, the load generator `Tool load`.
	Tool string
	// Traefik and HAProxy are the binaries that pods of the images ImageTraefik and ImageHAProxy
	// run; empty when the lab has none (such a pod then fails to start).
	Traefik string
	HAProxy string
	// Otelcol is the OpenTelemetry Collector binary (lab/otelcol) the daemons export their traces
	// to; empty: no traces.
	Otelcol string
	// DaemonArgs are added to the arguments of every node's endpointlag (without Install).
	DaemonArgs []string
	// Install: the lab starts no endpointlag of its own. The test installs it as users do (the
	// Helm chart or the kustomize base), and the kubelets run the DaemonSet's and the
	// aggregator's pods (image ImageEndpointlag runs Endpointlag) with the ServiceAccount, the
	// RBAC and the capabilities the manifests give them. Node.DaemonURL then reaches port
	// DaemonPort of the node's address (hostNetwork), in whatever scheme the manifests serve.
	Install bool
	// StateDir holds keys, kubeconfigs, logs and the PID records.
	StateDir string
	// APIPort is the loopback port of the API server's forwarder; node i's daemon is reachable
	// on loopback port DaemonPortBase+i.
	APIPort        int
	DaemonPortBase int
	// AggregatorPort is the loopback port of the aggregator's forwarder, PrometheusPort that of
	// Prometheus's (StartPrometheus).
	AggregatorPort, PrometheusPort int
	Log                            *slog.Logger
}

// otelcolConfig is the lab collector's configuration: OTLP over gRPC in, a file out.
const otelcolConfig = `receivers:
  otlp:
    protocols:
      grpc:
        endpoint: %s
exporters:
  file:
    path: %s
    flush_interval: 100ms
service:
  pipelines:
    traces:
      receivers: [otlp]
      exporters: [file]
  telemetry:
    metrics:
      level: none
`

// aggregatorPort is the aggregator's port on the control plane's address, otlpPort the
// collector's.
const (
	aggregatorPort = 9870
	otlpPort       = 4317
)

// Defaults fills unset fields.
func (c *Config) Defaults() {
	if c.Nodes == 0 {
		c.Nodes = 2
	}
	if c.ProxyMode == "" {
		c.ProxyMode = "nftables"
	}
	if c.StateDir == "" {
		c.StateDir = "/run/endpointlag-lab"
	}
	if c.APIPort == 0 {
		c.APIPort = 16443
	}
	if c.DaemonPortBase == 0 {
		c.DaemonPortBase = 19860
	}
	if c.AggregatorPort == 0 {
		c.AggregatorPort = 19870
	}
	if c.PrometheusPort == 0 {
		c.PrometheusPort = 19090
	}
	if c.Log == nil {
		c.Log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
}

func (c *Config) validate() error {
	var errs []error
	if c.Nodes < 1 || c.Nodes > 9 {
		errs = append(errs, fmt.Errorf("nodes: %d is not between 1 and 9", c.Nodes))
	}
	if c.ProxyMode != "nftables" && c.ProxyMode != "iptables" {
		errs = append(errs, fmt.Errorf("proxy mode %q is neither nftables nor iptables", c.ProxyMode))
	}
	if len(c.Zones) > 0 && len(c.Zones) != c.Nodes {
		errs = append(errs, fmt.Errorf("zones: %d given (%s) for %d nodes; give one per node", len(c.Zones), strings.Join(c.Zones, ","), c.Nodes))
	}
	for i, z := range c.Zones {
		for _, msg := range validation.IsValidLabelValue(z) {
			errs = append(errs, fmt.Errorf("zone %q of node%d: %s", z, i+1, msg))
		}
		if z == "" {
			errs = append(errs, fmt.Errorf("zone of node%d is empty", i+1))
		}
	}
	if c.MaxEndpointsPerSlice < 0 || c.MaxEndpointsPerSlice > 1000 {
		errs = append(errs, fmt.Errorf("max endpoints per slice: %d is not between 1 and 1000 (0 for the default)", c.MaxEndpointsPerSlice))
	}
	if c.BinDir == "" {
		errs = append(errs, errors.New("no directory of Kubernetes binaries: set --bin-dir or $LAB_BIN_DIR (make demo and make lab-up do; make lab-bins builds them)"))
	} else {
		for _, b := range []string{"etcd", "kube-apiserver", "kube-controller-manager", "kube-proxy"} {
			if _, err := os.Stat(filepath.Join(c.BinDir, b)); err != nil {
				errs = append(errs, fmt.Errorf("%w (make lab-bins builds it)", err))
			}
		}
	}
	if _, err := os.Stat(c.Endpointlag); err != nil {
		errs = append(errs, fmt.Errorf("endpointlag binary: %w (build it with `make build`)", err))
	}
	if _, err := os.Stat(c.Tool); err != nil {
		errs = append(errs, fmt.Errorf("lab binary: %w (build it with `make lab-tool`)", err))
	}
	for name, path := range map[string]string{"traefik": c.Traefik, "haproxy": c.HAProxy} {
		if _, err := os.Stat(path); path != "" && err != nil {
			errs = append(errs, fmt.Errorf("%s binary: %w (make lab-bins builds Traefik; make deps installs Debian's haproxy)", name, err))
		}
	}
	if os.Geteuid() != 0 {
		errs = append(errs, errors.New("the lab needs root (network namespaces, nftables)"))
	}
	return errors.Join(errs...)
}

// Region is the topology.kubernetes.io/region label of every node that has a zone.
const Region = "lab"

// Node is one lab node.
type Node struct {
	Name    string
	NS      string
	Addr    netip.Addr
	PodCIDR netip.Prefix
	// Zone is the node's topology.kubernetes.io/zone label; empty for none.
	Zone string
	// DaemonURL reaches this node's endpointlag from the root namespace.
	DaemonURL string
	kubelet   *kubelet
	kubeProxy *proc
	// daemon is the node's endpointlag; nil with Config.Install.
	daemon *proc
}

// Cluster is a running lab.
type Cluster struct {
	cfg Config
	// daemonToken is what Records sends (SetDaemonToken).
	daemonMu    sync.Mutex
	daemonToken string
	// Kubeconfig is for users in the root namespace: kubectl works with it.
	Kubeconfig string
	// AggregatorURL reaches the aggregator (endpointlag aggregate) from the root namespace.
	AggregatorURL string
	// TracesFile is where the lab's OpenTelemetry Collector writes the daemons' spans (its file
	// exporter: an OTLP JSON request per line); empty without Config.Otelcol.
	TracesFile string
	Client     kubernetes.Interface
	Nodes      []*Node

	procs *procs
	// api is the API server's process.
	api *proc
	// probeAgent is the User-Agent of the kubelets' HTTP probes.
	probeAgent string
	// runCtx ends when the lab stops.
	runCtx    context.Context
	cancel    context.CancelFunc
	wg        sync.WaitGroup
	listeners []net.Listener
	client    struct {
		netns string
		ip    netip.Addr
	}
}

// PIDFile names the running lab's process. There is one lab per machine: the namespace names
// and loopback ports are fixed.
const PIDFile = "/run/endpointlag-lab.pid"

// Cleanup removes what an earlier lab left behind in stateDir and in the kernel: its processes (by
// recorded PID) and every namespace carrying the lab prefix. It refuses while another lab runs.
func Cleanup(stateDir string, log *slog.Logger) error {
	if pid, alive := RunningPID(); alive && pid != os.Getpid() {
		return fmt.Errorf("a lab is running (pid %d); stop it with `make lab-down`", pid)
	}
	killed, err := killLeftovers(stateDir)
	if err != nil {
		return fmt.Errorf("ending leftover processes: %w", err)
	}
	if err := removeMountPoints(stateDir); err != nil {
		return fmt.Errorf("removing leftover mount points: %w", err)
	}
	names, err := ns.List()
	if err != nil {
		return err
	}
	var errs []error
	for _, n := range names {
		errs = append(errs, ns.Delete(n))
	}
	if killed > 0 || len(names) > 0 {
		log.Info("removed leftovers of an earlier lab", "processes", killed, "namespaces", len(names))
	}
	return errors.Join(errs...)
}

// RunningPID returns the PID in PIDFile and whether that process is alive.
func RunningPID() (int, bool) {
	b, err := os.ReadFile(PIDFile)
	if err != nil {
		return 0, false
	}
	pid, err := strconv.Atoi(string(b))
	if err != nil || pid <= 1 {
		return 0, false
	}
	return pid, syscall.Kill(pid, 0) == nil
}

// Up starts a lab. On error it removes whatever it had started.
func Up(ctx context.Context, cfg Config) (c *Cluster, err error) {
	cfg.Defaults()
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	log := cfg.Log
	if err := Cleanup(cfg.StateDir, log); err != nil {
		return nil, err
	}
	if err := os.RemoveAll(cfg.StateDir); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(filepath.Join(cfg.StateDir, "logs"), 0o755); err != nil {
		return nil, err
	}
	if err := os.WriteFile(PIDFile, []byte(strconv.Itoa(os.Getpid())), 0o644); err != nil {
		return nil, err
	}
	runCtx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	c = &Cluster{cfg: cfg, procs: &procs{dir: cfg.StateDir}, runCtx: runCtx, cancel: cancel}
	defer func() {
		if err != nil {
			c.Down()
			c = nil
		}
	}()
	start := time.Now()
	if err := c.network(); err != nil {
		return c, fmt.Errorf("network: %w", err)
	}
	log.Info("lab: network namespaces ready", "nodes", cfg.Nodes)
	if err := c.controlPlane(ctx); err != nil {
		return c, fmt.Errorf("control plane: %w", err)
	}
	log.Info("lab: control plane ready", "kubeconfig", c.Kubeconfig, "took", time.Since(start).Round(time.Millisecond))
	if err := c.startNodes(ctx, runCtx); err != nil {
		return c, fmt.Errorf("nodes: %w", err)
	}
	log.Info("lab: up", "took", time.Since(start).Round(time.Millisecond))
	return c, nil
}

func (c *Cluster) network() error {
	if err := makeUnderlay(); err != nil {
		return err
	}
	if err := plugUnderlay(cpNS, "cp", cpAddr); err != nil {
		return err
	}
	if err := routePodCIDRs(cpNS, 0, c.cfg.Nodes); err != nil {
		return err
	}
	for i := 1; i <= c.cfg.Nodes; i++ {
		n := &Node{Name: fmt.Sprintf("node%d", i), NS: nodeNS(i), Addr: nodeAddr(i), PodCIDR: podCIDR(i)}
		if len(c.cfg.Zones) > 0 {
			n.Zone = c.cfg.Zones[i-1]
		}
		if err := plugUnderlay(n.NS, fmt.Sprintf("n%d", i), n.Addr); err != nil {
			return err
		}
		if err := routeNodes(n.NS, i, c.cfg.Nodes); err != nil {
			return err
		}
		c.Nodes = append(c.Nodes, n)
	}
	return nil
}

func (c *Cluster) path(name string) string { return filepath.Join(c.cfg.StateDir, name) }

func (c *Cluster) bin(name string) string { return filepath.Join(c.cfg.BinDir, name) }

func (c *Cluster) controlPlane(ctx context.Context) error {
	saKey, saPub, err := writeServiceAccountKeys(c.cfg.StateDir)
	if err != nil {
		return err
	}
	token, err := newToken()
	if err != nil {
		return err
	}
	if err := os.WriteFile(c.path("tokens.csv"), []byte(token+",admin,admin,system:masters\n"), 0o600); err != nil {
		return err
	}
	c.Kubeconfig = c.path("kubeconfig")
	for path, server := range map[string]string{
		c.Kubeconfig:              fmt.Sprintf("https://127.0.0.1:%d", c.cfg.APIPort),
		c.path("cp.kubeconfig"):   "https://127.0.0.1:6443",
		c.path("node.kubeconfig"): fmt.Sprintf("https://%s:6443", cpAddr),
	} {
		if err := writeKubeconfig(path, server, token); err != nil {
			return err
		}
	}
	if _, err := c.procs.start("etcd", cpNS, c.bin("etcd"),
		"--name=lab", "--data-dir="+c.path("etcd"),
		"--listen-client-urls=http://127.0.0.1:2379", "--advertise-client-urls=http://127.0.0.1:2379",
		"--listen-peer-urls=http://127.0.0.1:2380", "--initial-advertise-peer-urls=http://127.0.0.1:2380",
		"--initial-cluster=lab=http://127.0.0.1:2380", "--unsafe-no-fsync", "--log-level=warn"); err != nil {
		return err
	}
	api, err := c.procs.start("kube-apiserver", cpNS, c.bin("kube-apiserver"),
		"--etcd-servers=http://127.0.0.1:2379",
		"--bind-address=0.0.0.0", "--secure-port=6443", "--advertise-address="+cpAddr.String(),
		"--cert-dir="+c.path("pki"), "--token-auth-file="+c.path("tokens.csv"),
		"--authorization-mode=RBAC", "--service-cluster-ip-range="+serviceCIDR,
		"--service-account-issuer=https://kubernetes.default.svc",
		"--service-account-key-file="+saPub, "--service-account-signing-key-file="+saKey)
	if err != nil {
		return err
	}
	c.api = api
	if err := c.forward(c.cfg.APIPort, cpNS, "127.0.0.1:6443"); err != nil {
		return err
	}
	rc, err := clientcmd.BuildConfigFromFlags("", c.Kubeconfig)
	if err != nil {
		return err
	}
	rc.QPS, rc.Burst = 100, 200
	if c.Client, err = kubernetes.NewForConfig(rc); err != nil {
		return err
	}
	if err := waitFor(ctx, 90*time.Second, "the API server", func() error {
		if done, perr := api.exited(); done {
			return &fatal{fmt.Errorf("kube-apiserver exited (%v); see %s", perr, c.path("logs/kube-apiserver.log"))}
		}
		_, err := c.Client.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(ctx)
		return err
	}); err != nil {
		return err
	}
	kcm := []string{"--kubeconfig=" + c.path("cp.kubeconfig"),
		"--controllers=endpointslice,endpointslicemirroring,serviceaccount,serviceaccount-token,namespace,garbagecollector,deployment,replicaset,daemonset,root-ca-cert-publisher",
		"--service-account-private-key-file=" + saKey, "--root-ca-file=" + c.path("pki/apiserver.crt"), "--use-service-account-credentials=false",
		"--leader-elect=false", "--secure-port=0"}
	if c.cfg.MaxEndpointsPerSlice > 0 {
		kcm = append(kcm, fmt.Sprintf("--max-endpoints-per-slice=%d", c.cfg.MaxEndpointsPerSlice))
	}
	if _, err = c.procs.start("kube-controller-manager", cpNS, c.bin("kube-controller-manager"), kcm...); err != nil {
		return err
	}
	if c.cfg.Install {
		return c.controlPlaneTools(ctx)
	}
	// The aggregator, as its Deployment would run: on the control plane's address, which every
	// node reaches. Settle and daemon timeout are short for the lab's short runs.
	if _, err = c.procs.start("aggregate", cpNS, c.cfg.Endpointlag, "aggregate",
		"--web.listen-address="+netip.AddrPortFrom(cpAddr, aggregatorPort).String(), "--settle=20s", "--daemon-timeout=15s", "--log.level=debug",
		"--kubeconfig="+c.path("cp.kubeconfig")); err != nil {
		return err
	}
	if err := c.forward(c.cfg.AggregatorPort, cpNS, netip.AddrPortFrom(cpAddr, aggregatorPort).String()); err != nil {
		return err
	}
	c.AggregatorURL = fmt.Sprintf("http://127.0.0.1:%d", c.cfg.AggregatorPort)
	return c.controlPlaneTools(ctx)
}

// controlPlaneTools starts the OpenTelemetry Collector (when the lab has one) and waits for what
// pods need of the control plane.
func (c *Cluster) controlPlaneTools(ctx context.Context) error {
	// A real OpenTelemetry Collector for the daemons' traces, writing what it receives to a file.
	if c.cfg.Otelcol != "" {
		c.TracesFile = c.path("traces.json")
		conf := c.path("otelcol.yaml")
		if err := os.WriteFile(conf, fmt.Appendf(nil, otelcolConfig, netip.AddrPortFrom(cpAddr, otlpPort), c.TracesFile), 0o600); err != nil {
			return err
		}
		if _, err := c.procs.start("otelcol", cpNS, c.cfg.Otelcol, "--config="+conf); err != nil {
			return err
		}
	}
	v, err := c.Client.Discovery().ServerVersion()
	if err != nil {
		return fmt.Errorf("the API server's version: %w", err)
	}
	// The kubelet's HTTP probes say which version sent them: "kube-probe/1.37".
	c.probeAgent = fmt.Sprintf("kube-probe/%s.%s", v.Major, strings.TrimRight(v.Minor, "+"))
	return waitFor(ctx, 60*time.Second, "the default service account", func() error {
		_, err := c.Client.CoreV1().ServiceAccounts("default").Get(ctx, "default", metav1.GetOptions{})
		return err
	})
}

func (c *Cluster) startNodes(ctx, runCtx context.Context) error {
	for i, n := range c.Nodes {
		node := &corev1.Node{
			// The labels every kubelet sets on its node.
			ObjectMeta: metav1.ObjectMeta{Name: n.Name, Labels: map[string]string{corev1.LabelHostname: n.Name, corev1.LabelOSStable: "linux", corev1.LabelArchStable: runtime.GOARCH}},
			Spec:       corev1.NodeSpec{PodCIDR: n.PodCIDR.String(), PodCIDRs: []string{n.PodCIDR.String()}},
		}
		if n.Zone != "" {
			node.Labels[corev1.LabelTopologyZone], node.Labels[corev1.LabelTopologyRegion] = n.Zone, Region
		}
		created, err := c.Client.CoreV1().Nodes().Create(ctx, node, metav1.CreateOptions{})
		if err != nil {
			return err
		}
		created.Status = corev1.NodeStatus{
			Addresses:  []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: n.Addr.String()}, {Type: corev1.NodeHostName, Address: n.Name}},
			Conditions: []corev1.NodeCondition{{Type: corev1.NodeReady, Status: corev1.ConditionTrue, LastHeartbeatTime: metav1.Now(), LastTransitionTime: metav1.Now()}},
		}
		if _, err := c.Client.CoreV1().Nodes().UpdateStatus(ctx, created, metav1.UpdateOptions{}); err != nil {
			return err
		}
		cfgPath := c.path(n.Name + "-kube-proxy.yaml")
		if err := writeKubeProxyConfig(cfgPath, c.cfg.ProxyMode, n.Name, c.path("node.kubeconfig"), clusterCIDR.String()); err != nil {
			return err
		}
		proxy, err := c.procs.start(n.Name+"-kube-proxy", n.NS, c.bin("kube-proxy"), "--config="+cfgPath)
		if err != nil {
			return err
		}
		n.kubeProxy = proxy
		if err := waitFor(ctx, 60*time.Second, n.Name+"'s kube-proxy to sync", func() error {
			if done, perr := proxy.exited(); done {
				return &fatal{fmt.Errorf("%s's kube-proxy exited (%v); see %s", n.Name, perr, c.path("logs/"+n.Name+"-kube-proxy.log"))}
			}
			return httpOK(ctx, n.NS, "http://127.0.0.1:10256/healthz")
		}); err != nil {
			return err
		}
		port := c.cfg.DaemonPortBase + i + 1
		images := map[string]string{ImageTraefik: c.cfg.Traefik, ImageHAProxy: c.cfg.HAProxy, ImageEndpointlag: c.cfg.Endpointlag}
		n.kubelet = newKubelet(n.Name, i+1, c.Client, c.procs, c.cfg.Tool, images, c.probeAgent, c.cfg.Log)
		if c.cfg.Install {
			if err := c.forward(port, n.NS, netip.AddrPortFrom(n.Addr, DaemonPort).String()); err != nil {
				return err
			}
			n.DaemonURL = fmt.Sprintf("https://127.0.0.1:%d", port)
			c.wg.Go(func() { n.kubelet.run(runCtx) })
			continue
		}
		var env []string
		if c.TracesFile != "" {
			env = append(os.Environ(), "OTEL_EXPORTER_OTLP_ENDPOINT=http://"+netip.AddrPortFrom(cpAddr, otlpPort).String(),
				"OTEL_EXPORTER_OTLP_PROTOCOL=grpc", "OTEL_EXPORTER_OTLP_INSECURE=true", "OTEL_BSP_SCHEDULE_DELAY=500")
		}
		args := append([]string{"--kubeconfig=" + c.path("node.kubeconfig"), "--node-name=" + n.Name,
			fmt.Sprintf("--web.listen-address=127.0.0.1:%d", DaemonPort), "--log.level=debug", "--packets.uplinks=eth0",
			"--aggregator.urls=" + fmt.Sprintf("http://%s", netip.AddrPortFrom(cpAddr, aggregatorPort)), "--aggregator.interval=500ms", "--aggregator.heartbeat=5s"},
			c.cfg.DaemonArgs...)
		if n.daemon, err = c.procs.startEnv(n.Name+"-endpointlag", n.NS, env, c.cfg.Endpointlag, args...); err != nil {
			return err
		}
		if err := c.forward(port, n.NS, fmt.Sprintf("127.0.0.1:%d", DaemonPort)); err != nil {
			return err
		}
		n.DaemonURL = fmt.Sprintf("http://127.0.0.1:%d", port)
		c.wg.Go(func() { n.kubelet.run(runCtx) })
	}
	b := &binder{client: c.Client, nodes: c.Nodes, log: c.cfg.Log}
	c.wg.Go(func() { b.run(runCtx) })
	var err error
	if c.client.netns, c.client.ip, err = c.Nodes[0].kubelet.attach(); err != nil {
		return fmt.Errorf("client pod: %w", err)
	}
	for _, n := range c.Nodes {
		if c.cfg.Install {
			break
		}
		if err := waitFor(ctx, 60*time.Second, n.Name+"'s endpointlag to be ready", func() error {
			return httpOK(ctx, "", n.DaemonURL+"/readyz")
		}); err != nil {
			return err
		}
	}
	return nil
}

// ClientNS is the network namespace of the client pod on the first node, for load generators.
func (c *Cluster) ClientNS() string { return c.client.netns }

// Log is the lab's logger.
func (c *Cluster) Log() *slog.Logger { return c.cfg.Log }

// StateDir is the lab's state directory (Config.StateDir): keys, kubeconfigs, logs, and files
// the lab's pods read (they share the machine's file system).
func (c *Cluster) StateDir() string { return c.cfg.StateDir }

// Tool is the lab binary the cluster runs in pods (Config.Tool).
func (c *Cluster) Tool() string { return c.cfg.Tool }

// Background runs f in a goroutine until the lab stops: f's context ends then, and Down waits
// for f to return. For stand-ins of cluster components that tests start (the HAProxy ingress
// controller's).
func (c *Cluster) Background(f func(ctx context.Context)) {
	c.wg.Go(func() { f(c.runCtx) })
}

// PodNS is the network namespace of a running pod; false when the pod has none (not started
// yet, or gone).
func (c *Cluster) PodNS(uid types.UID) (string, bool) {
	for _, n := range c.Nodes {
		if netns, ok := n.kubelet.podNS(uid); ok {
			return netns, true
		}
	}
	return "", false
}

// Node returns the node called name.
func (c *Cluster) Node(name string) (*Node, error) {
	for _, n := range c.Nodes {
		if n.Name == name {
			return n, nil
		}
	}
	return nil, fmt.Errorf("no node %q in the lab (it has node1 to node%d)", name, len(c.Nodes))
}

// PauseKubeProxy stops node's kube-proxy with SIGSTOP: it keeps its rules but applies no change
// until ResumeKubeProxy, as a kube-proxy stuck on a lock or starved of CPU.
func (c *Cluster) PauseKubeProxy(node string) error {
	return c.signalKubeProxy(node, syscall.SIGSTOP)
}

// ResumeKubeProxy continues node's kube-proxy after PauseKubeProxy.
func (c *Cluster) ResumeKubeProxy(node string) error {
	return c.signalKubeProxy(node, syscall.SIGCONT)
}

// RestartKubeProxy ends node's kube-proxy with SIGTERM and starts it again, waiting until it
// serves its health check.
func (c *Cluster) RestartKubeProxy(ctx context.Context, node string) error {
	n, err := c.Node(node)
	if err != nil {
		return err
	}
	if n.kubeProxy, err = c.procs.restart(n.kubeProxy, syscall.SIGTERM, 30*time.Second); err != nil {
		return err
	}
	return waitFor(ctx, 2*time.Minute, node+"'s kube-proxy to sync again", func() error {
		if done, perr := n.kubeProxy.exited(); done {
			return &fatal{fmt.Errorf("%s's kube-proxy exited (%v); see %s", node, perr, c.path("logs/"+node+"-kube-proxy.log"))}
		}
		return httpOK(ctx, n.NS, "http://127.0.0.1:10256/healthz")
	})
}

// RestartDaemon ends node's endpointlag with sig (SIGTERM: a graceful stop; SIGKILL: a crash)
// and starts it again, waiting until it is ready, at most timeout.
func (c *Cluster) RestartDaemon(ctx context.Context, node string, sig syscall.Signal, timeout time.Duration) error {
	n, err := c.Node(node)
	if err != nil {
		return err
	}
	if n.daemon == nil {
		return fmt.Errorf("%s runs no endpointlag of the lab's (Config.Install)", node)
	}
	if n.daemon, err = c.procs.restart(n.daemon, sig, 30*time.Second); err != nil {
		return err
	}
	return waitFor(ctx, timeout, node+"'s endpointlag to be ready again", func() error {
		if done, perr := n.daemon.exited(); done {
			return &fatal{fmt.Errorf("%s's endpointlag exited (%v); see %s", node, perr, c.path("logs/"+node+"-endpointlag.log"))}
		}
		return httpOK(ctx, "", n.DaemonURL+"/readyz")
	})
}

// RestartAPIServer stops the API server (SIGTERM), keeps it down for down, and starts it again,
// waiting until it is ready. Watches break; a client that comes back after changes were made
// without it relists (the new server's watch cache starts after them: 410 Gone).
func (c *Cluster) RestartAPIServer(ctx context.Context, down time.Duration) error {
	if err := c.api.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		return fmt.Errorf("SIGTERM to kube-apiserver: %w", err)
	}
	// It drains its watches first; a crash-like stop is as good a fault and quicker.
	select {
	case <-c.api.done:
	case <-time.After(10 * time.Second):
		c.api.kill()
	}
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(down):
	}
	var err error
	if c.api, err = c.procs.restart(c.api, syscall.SIGTERM, 0); err != nil {
		return err
	}
	return waitFor(ctx, 2*time.Minute, "the API server to be ready again", func() error {
		if done, perr := c.api.exited(); done {
			return &fatal{fmt.Errorf("kube-apiserver exited (%v); see %s", perr, c.path("logs/kube-apiserver.log"))}
		}
		_, err := c.Client.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(ctx)
		return err
	})
}

// PIDs returns the process IDs of node's kube-proxy and endpointlag (0 without the lab's own).
func (c *Cluster) PIDs(node string) (kubeProxy, daemon int, err error) {
	n, err := c.Node(node)
	if err != nil {
		return 0, 0, err
	}
	if n.daemon != nil {
		daemon = n.daemon.pid()
	}
	return n.kubeProxy.pid(), daemon, nil
}

// APIServerAddr is the API server's address as the nodes reach it.
func APIServerAddr() netip.AddrPort { return netip.AddrPortFrom(cpAddr, 6443) }

func (c *Cluster) signalKubeProxy(node string, sig syscall.Signal) error {
	n, err := c.Node(node)
	if err != nil {
		return err
	}
	if done, perr := n.kubeProxy.exited(); done {
		return fmt.Errorf("%s's kube-proxy has exited (%v); see %s", node, perr, c.path("logs/"+node+"-kube-proxy.log"))
	}
	if err := n.kubeProxy.cmd.Process.Signal(sig); err != nil {
		return fmt.Errorf("%s to %s's kube-proxy (pid %d): %w", sig, node, n.kubeProxy.cmd.Process.Pid, err)
	}
	return nil
}

// PodIP returns the address the lab's kubelets gave pod uid; it stays known after the pod and
// its status are gone.
func (c *Cluster) PodIP(uid types.UID) (netip.Addr, bool) {
	for _, n := range c.Nodes {
		if ip, ok := n.kubelet.podIP(uid); ok {
			return ip, true
		}
	}
	return netip.Addr{}, false
}

// forward listens on loopback port and connects each connection to addr inside namespace netns.
func (c *Cluster) forward(port int, netns, addr string) error {
	l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", port))
	if err != nil {
		return fmt.Errorf("forwarder to %s %s: %w", netns, addr, err)
	}
	c.listeners = append(c.listeners, l)
	c.wg.Go(func() {
		for {
			in, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer in.Close()
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				out, err := ns.Dial(ctx, netns, nil, "tcp", addr)
				cancel()
				if err != nil {
					return
				}
				defer out.Close()
				done := make(chan struct{}, 2)
				go func() { _, _ = io.Copy(out, in); done <- struct{}{} }()
				go func() { _, _ = io.Copy(in, out); done <- struct{}{} }()
				<-done
			}()
		}
	})
	return nil
}

// Down stops everything the lab started and removes its namespaces.
func (c *Cluster) Down() {
	if c.cancel != nil {
		c.cancel()
	}
	for _, l := range c.listeners {
		l.Close()
	}
	c.wg.Wait()
	c.procs.stopAll(5 * time.Second)
	if err := removeMountPoints(c.cfg.StateDir); err != nil {
		c.cfg.Log.Warn("removing mount points", "err", err)
	}
	names, _ := ns.List()
	for _, n := range names {
		if err := ns.Delete(n); err != nil {
			c.cfg.Log.Warn("removing namespace", "netns", n, "err", err)
		}
	}
	_ = os.Remove(PIDFile)
}

// fatal marks an error that waiting will not cure.
type fatal struct{ error }

func waitFor(ctx context.Context, timeout time.Duration, what string, f func() error) error {
	deadline := time.Now().Add(timeout)
	var last error
	for {
		last = f()
		var fe *fatal
		switch {
		case last == nil:
			return nil
		case errors.As(last, &fe):
			return fe.error
		case time.Now().After(deadline):
			return fmt.Errorf("waiting %s for %s: %w", timeout, what, last)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// httpOK gets url from inside namespace netns ("" for this process's own) and wants a 200.
func httpOK(ctx context.Context, netns, url string) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	client := http.DefaultClient
	if netns != "" {
		client = &http.Client{Transport: &http.Transport{
			DisableKeepAlives: true,
			DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
				return ns.Dial(ctx, netns, nil, network, addr)
			},
		}}
	}
	resp, err := client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s: %s", url, resp.Status)
	}
	return nil
}

// LoadRun is a load generator running in the client pod.
type LoadRun struct {
	proc *proc
	out  string
}

// StartLoad runs `Tool load` in the client pod on the first node, sending cfg.Rate requests per
// second to each of cfg.Targets for at most cfg.Duration, and tracing failures in the node's
// conntrack.
func (c *Cluster) StartLoad(name string, cfg load.Config) (*LoadRun, error) {
	out := c.path("load-" + name + ".json")
	args := []string{"load", fmt.Sprintf("--rate=%d", cfg.Rate), fmt.Sprintf("--first-port=%d", load.Ports.Base()),
		"--duration=" + cfg.Duration.String(), "--conntrack-ns=" + c.Nodes[0].NS, "--out=" + out}
	for _, t := range cfg.Targets {
		args = append(args, "--target="+t.String())
	}
	if cfg.KeepAlive {
		args = append(args, "--keep-alive")
	}
	if cfg.Timeout > 0 {
		args = append(args, "--timeout="+cfg.Timeout.String())
	}
	pr, err := c.procs.start("load-"+name, c.client.netns, c.cfg.Tool, args...)
	if err != nil {
		return nil, err
	}
	return &LoadRun{proc: pr, out: out}, nil
}

// Stop ends the run and returns every request's result.
func (l *LoadRun) Stop() ([]load.Result, error) {
	_ = l.proc.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-l.proc.done:
	case <-time.After(30 * time.Second):
		l.proc.kill()
		return nil, errors.New("the load generator did not stop within 30 s of SIGTERM")
	}
	if l.proc.err != nil {
		return nil, fmt.Errorf("load generator: %w", l.proc.err)
	}
	b, err := os.ReadFile(l.out)
	if err != nil {
		return nil, err
	}
	var rs []load.Result
	if err := json.Unmarshal(b, &rs); err != nil {
		return nil, err
	}
	load.Ports.Skip(len(rs))
	return rs, nil
}

// SetDaemonToken makes Records send token, the bearer token of a ServiceAccount allowed to read
// the daemons: with Install, they check their callers as the manifests run them.
func (c *Cluster) SetDaemonToken(token string) {
	c.daemonMu.Lock()
	defer c.daemonMu.Unlock()
	c.daemonToken = token
}

// Records reads the records of node n's daemon. With Install the daemons serve TLS with a
// self-signed certificate, which is not verified, and check the token SetDaemonToken gave.
func (c *Cluster) Records(ctx context.Context, n *Node) (report.Records, error) {
	c.daemonMu.Lock()
	token := c.daemonToken
	c.daemonMu.Unlock()
	return report.FetchWith(ctx, DaemonClient, token, n.DaemonURL)
}

// DaemonClient reaches the daemons: over TLS it accepts their self-signed certificates.
var DaemonClient = &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}}

// PodLogs are the log files of pod name's process, one per start (the kubelet's restarts get
// name.1, name.2, …), in that order.
func (c *Cluster) PodLogs(name string) []string {
	restarts, _ := filepath.Glob(c.path("logs/pod-" + name + ".[0-9]*.log"))
	sort.Slice(restarts, func(i, j int) bool {
		return len(restarts[i]) < len(restarts[j]) || len(restarts[i]) == len(restarts[j]) && restarts[i] < restarts[j]
	})
	first := c.path("logs/pod-" + name + ".log")
	if _, err := os.Stat(first); err != nil {
		return restarts
	}
	return append([]string{first}, restarts...)
}
