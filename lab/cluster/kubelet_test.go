package cluster

import (
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
)

func TestPreStopSeconds(t *testing.T) {
	for _, tc := range []struct {
		name string
		hook *corev1.LifecycleHandler
		want time.Duration
	}{
		{"none", nil, 0},
		{"sleep action", &corev1.LifecycleHandler{Sleep: &corev1.SleepAction{Seconds: 7}}, 7 * time.Second},
		{"exec sleep", &corev1.LifecycleHandler{Exec: &corev1.ExecAction{Command: []string{"sleep", "15"}}}, 15 * time.Second},
		{"exec sh -c", &corev1.LifecycleHandler{Exec: &corev1.ExecAction{Command: []string{"/bin/sh", "-c", "sleep 2.5"}}}, 2500 * time.Millisecond},
		{"exec other", &corev1.LifecycleHandler{Exec: &corev1.ExecAction{Command: []string{"nginx", "-s", "quit"}}}, 0},
	} {
		p := &corev1.Pod{Spec: corev1.PodSpec{Containers: []corev1.Container{{Name: "c"}}}}
		if tc.hook != nil {
			p.Spec.Containers[0].Lifecycle = &corev1.Lifecycle{PreStop: tc.hook}
		}
		if got := preStopSeconds(p); got != tc.want {
			t.Errorf("%s: %s, want %s", tc.name, got, tc.want)
		}
	}
}
