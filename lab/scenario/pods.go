package scenario

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/utils/ptr"

	"github.com/endpointlag/endpointlag/lab/cluster"
)

// Pod is a pod no controller owns, for shapes a Deployment cannot make: a pod that runs to
// completion, or one that takes over an address.
type Pod struct {
	Namespace, Name string
	Labels          map[string]string
	// Node binds the pod to that node; "" leaves it to the lab's binder.
	Node string
	// RestartPolicy is the pod's; "" is the API's default, Always.
	RestartPolicy corev1.RestartPolicy
	// ExitAfter makes the process exit on its own this long after it started, with ExitCode.
	ExitAfter time.Duration
	ExitCode  int
	// IP asks the kubelet for that address; the zero Addr for any.
	IP        netip.Addr
	Behaviour Behaviour
	// Probe is the readiness probe of its container; nil for none.
	Probe *corev1.Probe
	// GracePeriod is terminationGracePeriodSeconds; 0 for the API's default (30 s).
	GracePeriod time.Duration
}

// Object is the pod as the API wants it.
func (p Pod) Object() *corev1.Pod {
	ann := map[string]string{cluster.OnSIGTERM: p.Behaviour.annotation()}
	if p.ExitAfter > 0 {
		ann[cluster.ExitAfter] = p.ExitAfter.String()
		ann[cluster.ExitCode] = strconv.Itoa(p.ExitCode)
	}
	if p.IP.IsValid() {
		ann[cluster.PodIP] = p.IP.String()
	}
	o := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: p.Namespace, Name: p.Name, Labels: p.Labels, Annotations: ann},
		Spec: corev1.PodSpec{
			NodeName:      p.Node,
			RestartPolicy: p.RestartPolicy,
			Containers:    []corev1.Container{container(p.Behaviour, p.Probe)},
		},
	}
	if p.GracePeriod > 0 {
		o.Spec.TerminationGracePeriodSeconds = ptr.To(int64(p.GracePeriod / time.Second))
	}
	return o
}

// CreatePod creates the pod, and its namespace if missing.
func CreatePod(ctx context.Context, client kubernetes.Interface, p Pod) (*corev1.Pod, error) {
	if err := EnsureNamespace(ctx, client, p.Namespace); err != nil {
		return nil, err
	}
	created, err := client.CoreV1().Pods(p.Namespace).Create(ctx, p.Object(), metav1.CreateOptions{})
	if err != nil {
		return nil, fmt.Errorf("creating pod %s/%s: %w", p.Namespace, p.Name, err)
	}
	return created, nil
}

// WaitPod waits until pod namespace/name exists and cond accepts it; cond says what is missing
// when it does not.
func WaitPod(ctx context.Context, client kubernetes.Interface, namespace, name string, timeout time.Duration, cond func(*corev1.Pod) error) (*corev1.Pod, error) {
	var got *corev1.Pod
	err := Poll(ctx, timeout, "pod "+namespace+"/"+name, func() error {
		p, err := client.CoreV1().Pods(namespace).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		got = p
		return cond(p)
	})
	return got, err
}

// WaitPodPhase waits until the pod is in phase.
func WaitPodPhase(ctx context.Context, client kubernetes.Interface, namespace, name string, phase corev1.PodPhase, timeout time.Duration) (*corev1.Pod, error) {
	return WaitPod(ctx, client, namespace, name, timeout, func(p *corev1.Pod) error {
		if p.Status.Phase != phase {
			return fmt.Errorf("phase %q, want %q", p.Status.Phase, phase)
		}
		return nil
	})
}

// WaitPodReady waits until the pod's Ready condition is ready (true or false).
func WaitPodReady(ctx context.Context, client kubernetes.Interface, namespace, name string, ready bool, timeout time.Duration) (*corev1.Pod, error) {
	return WaitPod(ctx, client, namespace, name, timeout, func(p *corev1.Pod) error {
		if got := PodReady(p); got != ready {
			return fmt.Errorf("ready %t, want %t", got, ready)
		}
		return nil
	})
}

// PodReady is whether the pod's Ready condition is True.
func PodReady(p *corev1.Pod) bool {
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

// WaitSlices waits until the EndpointSlices of Service namespace/service satisfy cond, and
// returns them.
func WaitSlices(ctx context.Context, client kubernetes.Interface, namespace, service string, timeout time.Duration, cond func([]discoveryv1.EndpointSlice) error) ([]discoveryv1.EndpointSlice, error) {
	var got []discoveryv1.EndpointSlice
	err := Poll(ctx, timeout, "the EndpointSlices of "+namespace+"/"+service, func() error {
		list, err := client.DiscoveryV1().EndpointSlices(namespace).List(ctx, metav1.ListOptions{LabelSelector: discoveryv1.LabelServiceName + "=" + service})
		if err != nil {
			return err
		}
		got = list.Items
		return cond(got)
	})
	return got, err
}

// pollInterval is how often the waits look again: WaitSettled's pace from before it shared
// Poll, so that the API load the scenarios add (on a 2-core machine, in the latencies the e2e
// tests compare) stays as it was.
const pollInterval = 200 * time.Millisecond

// poll calls f until it returns nil, and fails with f's last error after timeout.
func Poll(ctx context.Context, timeout time.Duration, what string, f func() error) error {
	deadline := time.Now().Add(timeout)
	t := time.NewTicker(pollInterval)
	defer t.Stop()
	for {
		err := f()
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("waiting %s for %s: %w", timeout, what, err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
	}
}

// WaitPodGone waits until pod namespace/name no longer exists.
func WaitPodGone(ctx context.Context, client kubernetes.Interface, namespace, name string, timeout time.Duration) error {
	return Poll(ctx, timeout, "pod "+namespace+"/"+name+" to be gone", func() error {
		_, err := client.CoreV1().Pods(namespace).Get(ctx, name, metav1.GetOptions{})
		switch {
		case apierrors.IsNotFound(err):
			return nil
		case err != nil:
			return err
		}
		return errors.New("it still exists")
	})
}
