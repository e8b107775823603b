package scenario

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	netv1 "k8s.io/api/networking/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"
	"k8s.io/utils/ptr"

	"github.com/endpointlag/endpointlag/lab/cluster"
	"github.com/endpointlag/endpointlag/lab/haproxy"
	"github.com/endpointlag/endpointlag/lab/internal/ns"
	"github.com/endpointlag/endpointlag/lab/load"
)

// The ingress proxies' ports, on their pods' addresses.
const (
	// TraefikWebPort is Traefik's entrypoint "web"; TraefikAdminPort its entrypoint "traefik",
	// which serves the API (--api.insecure) and /ping.
	TraefikWebPort   = 8000
	TraefikAdminPort = 9000
	// HAProxyHTTPPort is HAProxy's frontend, HAProxyHealthzPort its /healthz (the controller's
	// 1042), HAProxyUserPort its runtime API at level user (read-only, for endpointlag), and
	// HAProxyAdminPort its runtime API at level admin, on the pod's loopback (for the
	// controller's stand-in).
	HAProxyHTTPPort    = 80
	HAProxyHealthzPort = 1042
	HAProxyUserPort    = 9999
	HAProxyAdminPort   = 9998
)

// The annotations that make a pod a proxy instance endpointlag reads (probes/ingress).
const (
	annotationProxy = "endpointlag.dev/proxy"
	annotationAdmin = "endpointlag.dev/proxy-admin"
)

// IngressNamespace holds the proxies' pods.
const IngressNamespace = "ingress"

// Ingress is an app behind the lab's two real ingress proxies, each a pod the lab's kubelet
// runs: Traefik (its Kubernetes Ingress provider, against the lab's API server) and HAProxy
// (driven by the lab's stand-in for the HAProxy Kubernetes Ingress Controller, in this process).
type Ingress struct {
	c   *cluster.Cluster
	app *App
	// Host is the Host header of the Traefik Ingress's rule.
	Host string
	// Traefik and HAProxy are the proxies' pods, running and ready.
	Traefik, HAProxy *corev1.Pod
	// TraefikService is Traefik's name for the app's service in its API
	// ("<namespace>-<service>-<port>@kubernetes"); HAProxyBackend HAProxy's backend.
	TraefikService string
	HAProxyBackend string
	// Controller is the stand-in driving HAProxy's slots.
	Controller *haproxy.Controller
}

// IngressOptions tune DeployIngress.
type IngressOptions struct {
	// Slots per HAProxy backend (haproxy.DefaultSlots when 0).
	Slots int
	// SyncDelay of the HAProxy controller's stand-in (haproxy.DefaultSyncDelay when 0).
	SyncDelay time.Duration
}

// DeployIngress puts app behind Traefik and HAProxy: IngressClasses traefik and haproxy, one
// Ingress of each class routing to the app's Service (Traefik's by Host), the two proxy pods in
// namespace IngressNamespace, and the HAProxy controller's stand-in. It waits until both pods
// are ready, and adds both paths to the app's load targets (App.Via).
func DeployIngress(ctx context.Context, c *cluster.Cluster, app *App, o IngressOptions) (*Ingress, error) {
	in := &Ingress{c: c, app: app, Host: app.Name + "." + app.Namespace + ".lab"}
	if o.Slots == 0 {
		o.Slots = haproxy.DefaultSlots
	}
	svc, err := app.Client.CoreV1().Services(app.Namespace).Get(ctx, app.Name, metav1.GetOptions{})
	if err != nil {
		return nil, err
	}
	port := svc.Spec.Ports[0]
	in.TraefikService = traefikServiceName(app.Namespace, app.Name, port)
	backend := haproxy.Backend{Namespace: app.Namespace, Service: app.Name, Port: haproxy.PortKey(port), Path: "/"}
	in.HAProxyBackend = backend.Name()
	if err := EnsureNamespace(ctx, app.Client, IngressNamespace); err != nil {
		return nil, err
	}
	for class, controller := range map[string]string{"traefik": "traefik.io/ingress-controller", "haproxy": "haproxy.org/ingress-controller/haproxy"} {
		ic := &netv1.IngressClass{ObjectMeta: metav1.ObjectMeta{Name: class}, Spec: netv1.IngressClassSpec{Controller: controller}}
		if _, err := app.Client.NetworkingV1().IngressClasses().Create(ctx, ic, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
			return nil, err
		}
	}
	for class, host := range map[string]string{"traefik": in.Host, "haproxy": ""} {
		if err := createIngress(ctx, app, class, host, port); err != nil {
			return nil, err
		}
	}
	cfg := haproxy.Config{HTTPPort: HAProxyHTTPPort, HealthzPort: HAProxyHealthzPort, AdminPort: HAProxyAdminPort, UserPort: HAProxyUserPort,
		Slots: o.Slots, Backends: []haproxy.Backend{backend}}
	cfgPath := filepath.Join(c.StateDir(), fmt.Sprintf("haproxy-%s-%s.cfg", app.Namespace, app.Name))
	if err := os.WriteFile(cfgPath, []byte(cfg.Render()), 0o644); err != nil {
		return nil, err
	}
	if err := traefikRBAC(ctx, app.Client); err != nil {
		return nil, fmt.Errorf("the RBAC of Traefik: %w", err)
	}
	pods := []*corev1.Pod{traefikPod(app.Name + "-traefik"), haproxyPod(app.Name+"-haproxy", cfgPath)}
	for _, p := range pods {
		if _, err := app.Client.CoreV1().Pods(IngressNamespace).Create(ctx, p, metav1.CreateOptions{}); err != nil {
			return nil, fmt.Errorf("creating pod %s/%s: %w", IngressNamespace, p.Name, err)
		}
	}
	ready := make([]*corev1.Pod, len(pods))
	for i, p := range pods {
		if ready[i], err = WaitPodReady(ctx, app.Client, IngressNamespace, p.Name, true, 90*time.Second); err != nil {
			return nil, fmt.Errorf("%w (its log: %s)", err, strings.Join(c.PodLogs(p.Name), ", "))
		}
	}
	in.Traefik, in.HAProxy = ready[0], ready[1]
	in.Controller = &haproxy.Controller{
		Client: app.Client, Namespace: IngressNamespace, Pod: in.HAProxy.Name,
		Runtime:  &haproxy.Runtime{Dial: in.dialPodLoopback(in.HAProxy, HAProxyAdminPort)},
		Backends: cfg.Backends, Slots: o.Slots, SyncDelay: o.SyncDelay,
		Log: c.Log(),
	}
	c.Background(in.Controller.Run)
	app.Via = in.Targets()
	return in, nil
}

// traefikServiceName is the name Traefik's Kubernetes Ingress provider gives the service of an
// Ingress backend (namespace, Service, port name or else number), in its API.
func traefikServiceName(namespace, service string, port corev1.ServicePort) string {
	p := port.Name
	if p == "" {
		p = strconv.Itoa(int(port.Port))
	}
	return fmt.Sprintf("%s-%s-%s@kubernetes", namespace, service, p)
}

func createIngress(ctx context.Context, app *App, class, host string, port corev1.ServicePort) error {
	backend := netv1.IngressBackend{Service: &netv1.IngressServiceBackend{Name: app.Name, Port: netv1.ServiceBackendPort{Name: port.Name}}}
	if port.Name == "" {
		backend.Service.Port = netv1.ServiceBackendPort{Number: port.Port}
	}
	ing := &netv1.Ingress{
		ObjectMeta: metav1.ObjectMeta{Namespace: app.Namespace, Name: app.Name + "-" + class},
		Spec: netv1.IngressSpec{
			IngressClassName: ptr.To(class),
			Rules: []netv1.IngressRule{{Host: host, IngressRuleValue: netv1.IngressRuleValue{HTTP: &netv1.HTTPIngressRuleValue{
				Paths: []netv1.HTTPIngressPath{{Path: "/", PathType: ptr.To(netv1.PathTypePrefix), Backend: backend}},
			}}}},
		},
	}
	if _, err := app.Client.NetworkingV1().Ingresses(app.Namespace).Create(ctx, ing, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		return err
	}
	return nil
}

// downwardEnv is the environment the proxies' pods take from the downward API, as their Helm
// charts set it.
func downwardEnv() []corev1.EnvVar {
	var env []corev1.EnvVar
	for _, v := range [][2]string{{"POD_NAME", "metadata.name"}, {"POD_NAMESPACE", "metadata.namespace"}, {"POD_IP", "status.podIP"}} {
		env = append(env, corev1.EnvVar{Name: v[0], ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: v[1]}}})
	}
	return env
}

func httpReadiness(path string, port string) *corev1.Probe {
	return &corev1.Probe{
		ProbeHandler:  corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: path, Port: intstr.FromString(port)}},
		PeriodSeconds: 2, FailureThreshold: 3,
	}
}

// traefikServiceAccount is the ServiceAccount Traefik's pods run as: its Kubernetes Ingress
// provider talks to the API server in-cluster, with that account's token and RBAC.
const traefikServiceAccount = "traefik"

// traefikRBAC creates Traefik's ServiceAccount and grants it what Traefik's own Helm chart grants
// its Kubernetes Ingress provider: reading Services, EndpointSlices, Secrets, Ingresses and
// IngressClasses, and writing Ingress status.
func traefikRBAC(ctx context.Context, client kubernetes.Interface) error {
	sa := &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Namespace: IngressNamespace, Name: traefikServiceAccount}}
	if _, err := client.CoreV1().ServiceAccounts(IngressNamespace).Create(ctx, sa, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		return err
	}
	read := []string{"get", "list", "watch"}
	role := &rbacv1.ClusterRole{ObjectMeta: metav1.ObjectMeta{Name: "lab-traefik"}, Rules: []rbacv1.PolicyRule{
		{APIGroups: []string{""}, Resources: []string{"services", "secrets", "nodes"}, Verbs: read},
		{APIGroups: []string{"discovery.k8s.io"}, Resources: []string{"endpointslices"}, Verbs: read},
		{APIGroups: []string{"networking.k8s.io"}, Resources: []string{"ingresses", "ingressclasses"}, Verbs: read},
		{APIGroups: []string{"networking.k8s.io"}, Resources: []string{"ingresses/status"}, Verbs: []string{"update"}},
	}}
	if _, err := client.RbacV1().ClusterRoles().Create(ctx, role, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		return err
	}
	binding := &rbacv1.ClusterRoleBinding{ObjectMeta: metav1.ObjectMeta{Name: "lab-traefik"},
		RoleRef:  rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: role.Name},
		Subjects: []rbacv1.Subject{{Kind: rbacv1.ServiceAccountKind, Namespace: IngressNamespace, Name: traefikServiceAccount}}}
	if _, err := client.RbacV1().ClusterRoleBindings().Create(ctx, binding, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		return err
	}
	return nil
}

// traefikPod runs Traefik with its Kubernetes Ingress provider against the lab's API server, in
// the cluster as its Helm chart runs it (the ServiceAccount's token, the kubernetes Service);
// providersThrottleDuration stays at its default, 2 s.
func traefikPod(name string) *corev1.Pod {
	p := proxyPod(name, "traefik", TraefikAdminPort, corev1.Container{
		Name:  "traefik",
		Image: cluster.ImageTraefik,
		Args: []string{
			"--entryPoints.web.address=:" + strconv.Itoa(TraefikWebPort),
			"--entryPoints.traefik.address=:" + strconv.Itoa(TraefikAdminPort),
			"--api.insecure=true",
			"--ping=true",
			"--providers.kubernetesingress=true",
			"--global.checknewversion=false",
			"--global.sendanonymoususage=false",
			"--log.level=INFO",
			"--log.nocolor=true",
		},
		Env: downwardEnv(),
		Ports: []corev1.ContainerPort{
			{Name: "web", ContainerPort: TraefikWebPort, Protocol: corev1.ProtocolTCP},
			{Name: "traefik", ContainerPort: TraefikAdminPort, Protocol: corev1.ProtocolTCP},
		},
		ReadinessProbe: httpReadiness("/ping", "traefik"),
	})
	p.Spec.ServiceAccountName = traefikServiceAccount
	return p
}

// haproxyPod runs HAProxy in the foreground on the configuration at cfgPath.
func haproxyPod(name, cfgPath string) *corev1.Pod {
	return proxyPod(name, "haproxy", HAProxyUserPort, corev1.Container{
		Name:  "haproxy",
		Image: cluster.ImageHAProxy,
		Args:  []string{"-db", "-f", cfgPath},
		Env:   downwardEnv(),
		Ports: []corev1.ContainerPort{
			{Name: "http", ContainerPort: HAProxyHTTPPort, Protocol: corev1.ProtocolTCP},
			{Name: "healthz", ContainerPort: HAProxyHealthzPort, Protocol: corev1.ProtocolTCP},
			{Name: "runtime", ContainerPort: HAProxyUserPort, Protocol: corev1.ProtocolTCP},
		},
		ReadinessProbe: httpReadiness("/healthz", "healthz"),
	})
}

// proxyPod is a pod in IngressNamespace running c, annotated as a proxy of kind whose admin
// interface is on its address at port admin.
func proxyPod(name, kind string, admin int, c corev1.Container) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: IngressNamespace, Name: name, Labels: map[string]string{"app": name},
			Annotations: map[string]string{annotationProxy: kind, annotationAdmin: strconv.Itoa(admin)}},
		Spec: corev1.PodSpec{Containers: []corev1.Container{c}},
	}
}

// Targets are the load's paths through the proxies: Traefik (with the Ingress's Host) and
// HAProxy, at their pods' addresses.
func (in *Ingress) Targets() []load.Target {
	return []load.Target{
		{Path: load.PathTraefik, Addr: net.JoinHostPort(in.Traefik.Status.PodIP, strconv.Itoa(TraefikWebPort)), Host: in.Host},
		{Path: load.PathHAProxy, Addr: net.JoinHostPort(in.HAProxy.Status.PodIP, strconv.Itoa(HAProxyHTTPPort))},
	}
}

// dialPodLoopback connects to port on pod's loopback, inside its network namespace.
func (in *Ingress) dialPodLoopback(pod *corev1.Pod, port int) func(context.Context) (net.Conn, error) {
	return func(ctx context.Context) (net.Conn, error) {
		netns, ok := in.c.PodNS(pod.UID)
		if !ok {
			return nil, fmt.Errorf("pod %s/%s has no network namespace", pod.Namespace, pod.Name)
		}
		return ns.Dial(ctx, netns, nil, "tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
	}
}

// dialFromNode connects to addr from the network namespace of the node pod runs on, as
// endpointlag does. Not from the client pod: its load generator picks its own source ports, and
// a kernel-chosen one in use there would make one of its connections fail to bind.
func (in *Ingress) dialFromNode(ctx context.Context, pod *corev1.Pod, addr string) (net.Conn, error) {
	n, err := in.c.Node(pod.Spec.NodeName)
	if err != nil {
		return nil, err
	}
	return ns.Dial(ctx, n.NS, nil, "tcp", addr)
}

// TraefikServer is one server of a Traefik service, as its API lists it.
type TraefikServer struct {
	URL string `json:"url"`
	// Fenced: a terminating endpoint that still serves (ready=false, serving=true,
	// terminating=true). Traefik keeps it in the service but sends it no new request.
	Fenced bool `json:"fenced"`
}

// TraefikService is one entry of Traefik's GET /api/http/services.
type TraefikService struct {
	Name         string `json:"name"`
	Status       string `json:"status"`
	LoadBalancer *struct {
		Servers []TraefikServer `json:"servers"`
	} `json:"loadBalancer"`
	// ServerStatus is each server's health by URL ("UP").
	ServerStatus map[string]string `json:"serverStatus"`
}

// TraefikServices reads Traefik's API at its pod's address, from its node; raw is the
// answer as it came.
func (in *Ingress) TraefikServices(ctx context.Context) (services []TraefikService, raw []byte, err error) {
	client := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{
		DisableKeepAlives: true,
		DialContext: func(ctx context.Context, _, addr string) (net.Conn, error) {
			return in.dialFromNode(ctx, in.Traefik, addr)
		},
	}}
	u := "http://" + net.JoinHostPort(in.Traefik.Status.PodIP, strconv.Itoa(TraefikAdminPort)) + "/api/http/services"
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return nil, nil, err
	}
	resp, err := client.Do(req)
	if err != nil {
		return nil, nil, err
	}
	defer resp.Body.Close()
	if raw, err = io.ReadAll(resp.Body); err != nil {
		return nil, nil, err
	}
	if resp.StatusCode != http.StatusOK {
		return nil, raw, fmt.Errorf("%s: %s", u, resp.Status)
	}
	return services, raw, json.Unmarshal(raw, &services)
}

// TraefikServers returns the servers of the app's Traefik service.
func (in *Ingress) TraefikServers(ctx context.Context) ([]TraefikServer, error) {
	services, _, err := in.TraefikServices(ctx)
	if err != nil {
		return nil, err
	}
	for _, s := range services {
		if s.Name == in.TraefikService && s.LoadBalancer != nil {
			return s.LoadBalancer.Servers, nil
		}
	}
	return nil, fmt.Errorf("traefik has no service %s", in.TraefikService)
}

// HAProxyServers reads `show servers state` of the app's backend through HAProxy's read-only
// runtime socket on its pod's address, from its node, as endpointlag reads it; raw is
// HAProxy's answer.
func (in *Ingress) HAProxyServers(ctx context.Context) (states []haproxy.ServerState, raw string, err error) {
	addr := net.JoinHostPort(in.HAProxy.Status.PodIP, strconv.Itoa(HAProxyUserPort))
	rt := &haproxy.Runtime{Dial: func(ctx context.Context) (net.Conn, error) { return in.dialFromNode(ctx, in.HAProxy, addr) }}
	answers, err := rt.Exec(ctx, "show servers state "+in.HAProxyBackend)
	if err != nil {
		return nil, "", err
	}
	states, err = haproxy.ParseServersState(answers[0])
	return states, answers[0], err
}

// Endpoints lists what each proxy would route to now: Traefik's unfenced servers and HAProxy's
// ready servers, as address:port.
func (in *Ingress) Endpoints(ctx context.Context) (traefik, haproxyReady []netip.AddrPort, err error) {
	servers, err := in.TraefikServers(ctx)
	if err != nil {
		return nil, nil, err
	}
	for _, s := range servers {
		if s.Fenced {
			continue
		}
		ap, err := netip.ParseAddrPort(trimScheme(s.URL))
		if err != nil {
			return nil, nil, fmt.Errorf("traefik server %q: %w", s.URL, err)
		}
		traefik = append(traefik, ap)
	}
	states, _, err := in.HAProxyServers(ctx)
	if err != nil {
		return nil, nil, err
	}
	for _, s := range states {
		if !s.Ready() {
			continue
		}
		ip, err := netip.ParseAddr(s.Addr)
		if err != nil {
			return nil, nil, fmt.Errorf("haproxy server %s: %w", s.Server, err)
		}
		haproxyReady = append(haproxyReady, netip.AddrPortFrom(ip, uint16(s.Port)))
	}
	return traefik, haproxyReady, nil
}

func trimScheme(u string) string {
	if _, rest, ok := strings.Cut(u, "://"); ok {
		return rest
	}
	return u
}
