package kube

import (
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/endpointlag/endpointlag/probes"
)

func TestDeclared(t *testing.T) {
	yes := true
	grace := int64(45)
	exec := func(cmd ...string) *corev1.Lifecycle {
		return &corev1.Lifecycle{PreStop: &corev1.LifecycleHandler{Exec: &corev1.ExecAction{Command: cmd}}}
	}
	for _, tc := range []struct {
		name string
		pod  corev1.Pod
		want probes.Declared
	}{
		{"a Deployment's pod, sleep action", corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Labels: map[string]string{"pod-template-hash": "7bb4b948c5"},
				OwnerReferences: []metav1.OwnerReference{{Kind: "ReplicaSet", Name: "web-7bb4b948c5", Controller: &yes}}},
			Spec: corev1.PodSpec{TerminationGracePeriodSeconds: &grace, Containers: []corev1.Container{
				{Lifecycle: &corev1.Lifecycle{PreStop: &corev1.LifecycleHandler{Sleep: &corev1.SleepAction{Seconds: 5}}}}}},
		}, probes.Declared{Workload: probes.WorkloadRef{Kind: "Deployment", Name: "web"}, PreStopSeconds: 5, PreStopKnown: true, GraceSeconds: 45}},
		{"a StatefulSet's pod, sh -c sleep, the longest of two containers", corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{OwnerReferences: []metav1.OwnerReference{{Kind: "StatefulSet", Name: "db", Controller: &yes}}},
			Spec: corev1.PodSpec{Containers: []corev1.Container{
				{Lifecycle: exec("/bin/sh", "-c", "sleep 15")}, {Lifecycle: exec("sleep", "2m")}}},
		}, probes.Declared{Workload: probes.WorkloadRef{Kind: "StatefulSet", Name: "db"}, PreStopSeconds: 120, PreStopKnown: true, GraceSeconds: 30}},
		{"a ReplicaSet of its own, no hook", corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{OwnerReferences: []metav1.OwnerReference{{Kind: "ReplicaSet", Name: "solo", Controller: &yes}}},
			Spec:       corev1.PodSpec{Containers: []corev1.Container{{}}},
		}, probes.Declared{Workload: probes.WorkloadRef{Kind: "ReplicaSet", Name: "solo"}, PreStopKnown: true, GraceSeconds: 30}},
		{"a bare pod whose hook is an HTTP call", corev1.Pod{
			Spec: corev1.PodSpec{Containers: []corev1.Container{
				{Lifecycle: &corev1.Lifecycle{PreStop: &corev1.LifecycleHandler{HTTPGet: &corev1.HTTPGetAction{Path: "/drain"}}}}}},
		}, probes.Declared{PreStopKnown: false, GraceSeconds: 30}},
		{"a command that is not sleep", corev1.Pod{
			Spec: corev1.PodSpec{Containers: []corev1.Container{{Lifecycle: exec("nginx", "-s", "quit")}}},
		}, probes.Declared{PreStopKnown: false, GraceSeconds: 30}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := declared(&tc.pod); *got != tc.want {
				t.Errorf("declared = %+v, want %+v", *got, tc.want)
			}
		})
	}
}
