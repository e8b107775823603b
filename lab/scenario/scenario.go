// Package scenario deploys the lab's test application and rolls it: a Deployment of small HTTP
// servers behind a ClusterIP Service.
package scenario

import (
	"context"
	"fmt"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"
	"k8s.io/utils/ptr"

	"github.com/endpointlag/endpointlag/lab/cluster"
	"github.com/endpointlag/endpointlag/lab/load"
	"github.com/endpointlag/endpointlag/lab/pod"
)

// App is the Deployment and Service of one scenario.
type App struct {
	Client    kubernetes.Interface
	Namespace string
	Name      string
	Replicas  int32
	// Probe is the readiness probe of the pods' container; nil for none.
	Probe *corev1.Probe
	// TrafficDistribution is the Service's spec.trafficDistribution ("PreferSameZone", …); ""
	// for none. It is set when the Service is created.
	TrafficDistribution string
	// Via are the paths to the app besides its ClusterIP that the load takes: the ingress
	// proxies in front of it (DeployIngress sets them).
	Via []load.Target
}

// Behaviour is what the app's pods do when deleted.
type Behaviour struct {
	// PreStop is the preStop sleep; 0 for none.
	PreStop time.Duration
	// Drain keeps serving this long after "SIGTERM"; 0 exits at once.
	Drain time.Duration
	// Unready fails the kubelet's HTTP readiness probes (503) while draining.
	Unready bool
}

func (b Behaviour) annotation() string {
	return pod.OnSIGTERM{Drain: b.Drain, Unready: b.Unready}.String()
}

// HTTPProbe is a readiness probe of the lab server's "http" port (any path answers 200 while it
// serves), every period, failing after failures failed probes in a row.
func HTTPProbe(period time.Duration, failures int32) *corev1.Probe {
	return &corev1.Probe{
		ProbeHandler:     corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: "/ready", Port: intstr.FromString("http")}},
		PeriodSeconds:    int32(max(period/time.Second, 1)),
		FailureThreshold: failures,
	}
}

// container is the lab server's container: port 8080 named "http".
func container(b Behaviour, probe *corev1.Probe) corev1.Container {
	c := corev1.Container{
		Name:           "web",
		Image:          "lab/web", // never pulled: the lab's kubelet runs an HTTP server itself
		Ports:          []corev1.ContainerPort{{Name: "http", ContainerPort: 8080, Protocol: corev1.ProtocolTCP}},
		ReadinessProbe: probe,
	}
	if b.PreStop > 0 {
		c.Lifecycle = &corev1.Lifecycle{PreStop: &corev1.LifecycleHandler{Sleep: &corev1.SleepAction{Seconds: int64((b.PreStop + time.Second - 1) / time.Second)}}}
	}
	return c
}

// EnsureNamespace creates namespace name unless it exists.
func EnsureNamespace(ctx context.Context, client kubernetes.Interface, name string) error {
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}}
	if _, err := client.CoreV1().Namespaces().Create(ctx, ns, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		return err
	}
	return nil
}

func (a *App) labels() map[string]string { return map[string]string{"app": a.Name} }

// Apply creates or updates the namespace, Service and Deployment with behaviour b.
func (a *App) Apply(ctx context.Context, b Behaviour) error {
	if err := EnsureNamespace(ctx, a.Client, a.Namespace); err != nil {
		return err
	}
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: a.Namespace, Name: a.Name},
		Spec: corev1.ServiceSpec{
			Selector: a.labels(),
			Ports:    []corev1.ServicePort{{Name: "http", Port: 80, TargetPort: intstr.FromInt32(8080), Protocol: corev1.ProtocolTCP}},
		},
	}
	if a.TrafficDistribution != "" {
		svc.Spec.TrafficDistribution = &a.TrafficDistribution
	}
	if _, err := a.Client.CoreV1().Services(a.Namespace).Create(ctx, svc, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		return err
	}
	d := &appsv1.Deployment{
		ObjectMeta: metav1.ObjectMeta{Namespace: a.Namespace, Name: a.Name},
		Spec: appsv1.DeploymentSpec{
			Replicas: ptr.To(a.Replicas),
			Selector: &metav1.LabelSelector{MatchLabels: a.labels()},
			Template: corev1.PodTemplateSpec{
				ObjectMeta: metav1.ObjectMeta{Labels: a.labels(), Annotations: map[string]string{cluster.OnSIGTERM: b.annotation()}},
				Spec: corev1.PodSpec{
					Containers:                    []corev1.Container{container(b, a.Probe)},
					TerminationGracePeriodSeconds: ptr.To[int64](30),
				},
			},
		},
	}
	cur, err := a.Client.AppsV1().Deployments(a.Namespace).Get(ctx, a.Name, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		_, err = a.Client.AppsV1().Deployments(a.Namespace).Create(ctx, d, metav1.CreateOptions{})
	case err == nil:
		cur.Spec = d.Spec
		_, err = a.Client.AppsV1().Deployments(a.Namespace).Update(ctx, cur, metav1.UpdateOptions{})
	}
	return err
}

// Restart does what `kubectl rollout restart` does.
func (a *App) Restart(ctx context.Context) error {
	patch := fmt.Sprintf(`{"spec":{"template":{"metadata":{"annotations":{"kubectl.kubernetes.io/restartedAt":%q}}}}}`, time.Now().Format(time.RFC3339Nano))
	_, err := a.Client.AppsV1().Deployments(a.Namespace).Patch(ctx, a.Name, types.StrategicMergePatchType, []byte(patch), metav1.PatchOptions{})
	return err
}

// Pods returns the app's pods by UID.
func (a *App) Pods(ctx context.Context) (map[types.UID]corev1.Pod, error) {
	list, err := a.Client.CoreV1().Pods(a.Namespace).List(ctx, metav1.ListOptions{LabelSelector: labels.SelectorFromSet(a.labels()).String()})
	if err != nil {
		return nil, err
	}
	out := map[types.UID]corev1.Pod{}
	for _, p := range list.Items {
		out[p.UID] = p
	}
	return out, nil
}

// WaitSettled waits until the Deployment is rolled out and only its current pods exist, all
// running and ready.
func (a *App) WaitSettled(ctx context.Context, timeout time.Duration) error {
	return Poll(ctx, timeout, fmt.Sprintf("%s/%s to settle", a.Namespace, a.Name), func() error { return a.settled(ctx) })
}

func (a *App) settled(ctx context.Context) error {
	d, err := a.Client.AppsV1().Deployments(a.Namespace).Get(ctx, a.Name, metav1.GetOptions{})
	if err != nil {
		return err
	}
	s := d.Status
	if s.ObservedGeneration < d.Generation || s.UpdatedReplicas != a.Replicas || s.AvailableReplicas != a.Replicas || s.Replicas != a.Replicas {
		return fmt.Errorf("deployment status %+v", s)
	}
	pods, err := a.Pods(ctx)
	if err != nil {
		return err
	}
	ready := 0
	for _, p := range pods {
		if p.DeletionTimestamp != nil {
			return fmt.Errorf("pod %s still terminating", p.Name)
		}
		for _, c := range p.Status.Conditions {
			if c.Type == corev1.PodReady && c.Status == corev1.ConditionTrue {
				ready++
			}
		}
	}
	if ready != int(a.Replicas) || len(pods) != int(a.Replicas) {
		return fmt.Errorf("%d pods, %d ready", len(pods), ready)
	}
	return nil
}

// WaitServing waits until requests from namespace clientNS along each of the app's paths (its
// ClusterIP, and Via) reach every current pod and the last 100 in a row on each succeed: the
// dataplane of every node on the way, and every proxy, have caught up with the app's current
// pods.
func (a *App) WaitServing(ctx context.Context, clientNS string, timeout time.Duration) error {
	targets, err := a.Targets(ctx)
	if err != nil {
		return err
	}
	pods, err := a.Pods(ctx)
	if err != nil {
		return err
	}
	want := map[string]bool{}
	for _, p := range pods {
		want[p.Name] = true
	}
	deadline := time.Now().Add(timeout)
	for _, t := range targets {
		seen, streak := map[string]bool{}, 0
		for len(seen) < len(want) || streak < 100 {
			if time.Now().After(deadline) {
				return fmt.Errorf("%s/%s through %s: after %s, %d of %d pods answered, last %d requests in a row succeeded", a.Namespace, a.Name, t.Path, timeout, len(seen), len(want), streak)
			}
			rs, err := load.Run(ctx, load.Config{NS: clientNS, Targets: []load.Target{t}, Rate: 500, Duration: 100 * time.Millisecond, Timeout: 500 * time.Millisecond})
			if err != nil {
				return err
			}
			for _, r := range rs {
				if r.Failure != "" || !want[r.Backend] {
					streak = 0
					continue
				}
				seen[r.Backend] = true
				streak++
			}
		}
	}
	return nil
}

// Targets are the app's paths for the load: its ClusterIP first, then Via.
func (a *App) Targets(ctx context.Context) ([]load.Target, error) {
	addr, err := a.ClusterIP(ctx)
	if err != nil {
		return nil, err
	}
	return append([]load.Target{{Path: load.PathClusterIP, Addr: addr}}, a.Via...), nil
}

// ClusterIP returns the Service's ClusterIP:port.
func (a *App) ClusterIP(ctx context.Context) (string, error) {
	svc, err := a.Client.CoreV1().Services(a.Namespace).Get(ctx, a.Name, metav1.GetOptions{})
	if err != nil {
		return "", err
	}
	return fmt.Sprintf("%s:%d", svc.Spec.ClusterIP, svc.Spec.Ports[0].Port), nil
}
