package scenario

import (
	"context"
	"net/netip"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/endpointlag/endpointlag/lab/cluster"
)

func TestPodObject(t *testing.T) {
	p := Pod{
		Namespace: "t", Name: "job", Node: "node1", RestartPolicy: corev1.RestartPolicyNever,
		ExitAfter: 2 * time.Second, ExitCode: 3, IP: netip.MustParseAddr("10.244.1.7"),
		Behaviour: Behaviour{Drain: time.Second, Unready: true}, Probe: HTTPProbe(time.Second, 1), GracePeriod: 5 * time.Second,
	}.Object()
	for k, want := range map[string]string{cluster.ExitAfter: "2s", cluster.ExitCode: "3", cluster.PodIP: "10.244.1.7", cluster.OnSIGTERM: "drain-unready=1s"} {
		if got := p.Annotations[k]; got != want {
			t.Errorf("annotation %s = %q, want %q", k, got, want)
		}
	}
	c := p.Spec.Containers[0]
	if p.Spec.NodeName != "node1" || p.Spec.RestartPolicy != corev1.RestartPolicyNever || *p.Spec.TerminationGracePeriodSeconds != 5 ||
		c.ReadinessProbe.HTTPGet.Port.StrVal != "http" || c.ReadinessProbe.PeriodSeconds != 1 || c.Ports[0].Name != "http" {
		t.Errorf("pod %+v", p.Spec)
	}
	if bare := (Pod{Namespace: "t", Name: "web"}).Object(); len(bare.Annotations) != 1 || bare.Annotations[cluster.OnSIGTERM] != "exit" || bare.Spec.TerminationGracePeriodSeconds != nil {
		t.Errorf("a pod with nothing set: %+v %+v", bare.Annotations, bare.Spec)
	}
}

func TestWaitPod(t *testing.T) {
	ctx := context.Background()
	client := fake.NewClientset()
	created, err := CreatePod(ctx, client, Pod{Namespace: "t", Name: "job"})
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		p := created.DeepCopy()
		p.Status.Phase = corev1.PodRunning
		p.Status.Conditions = []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue}}
		_, _ = client.CoreV1().Pods("t").UpdateStatus(ctx, p, metav1.UpdateOptions{})
	}()
	if p, err := WaitPodReady(ctx, client, "t", "job", true, 5*time.Second); err != nil || p.Status.Phase != corev1.PodRunning {
		t.Fatalf("WaitPodReady: %v", err)
	}
	_, err = WaitPodPhase(ctx, client, "t", "job", corev1.PodSucceeded, 300*time.Millisecond)
	if err == nil || !strings.Contains(err.Error(), `waiting 300ms for pod t/job: phase "Running", want "Succeeded"`) {
		t.Errorf("WaitPodPhase past its deadline: %v", err)
	}
	if err := client.CoreV1().Pods("t").Delete(ctx, "job", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := WaitPodGone(ctx, client, "t", "job", time.Second); err != nil {
		t.Error(err)
	}
}
