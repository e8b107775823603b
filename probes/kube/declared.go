package kube

import (
	"path"
	"strconv"
	"strings"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"

	"github.com/endpointlag/endpointlag/probes"
)

// defaultGrace is terminationGracePeriodSeconds when a pod leaves it unset.
const defaultGrace = 30

// declared reads what a pod declares about its termination: its workload, its preStop sleep and
// its grace period.
func declared(pod *corev1.Pod) *probes.Declared {
	d := &probes.Declared{Workload: workloadOf(pod), PreStopKnown: true, GraceSeconds: defaultGrace}
	if g := pod.Spec.TerminationGracePeriodSeconds; g != nil {
		d.GraceSeconds = float64(*g)
	}
	for _, c := range pod.Spec.Containers {
		if c.Lifecycle == nil || c.Lifecycle.PreStop == nil {
			continue
		}
		secs, ok := preStopSleep(c.Lifecycle.PreStop)
		if !ok {
			d.PreStopKnown = false
			continue
		}
		d.PreStopSeconds = max(d.PreStopSeconds, secs)
	}
	return d
}

// workloadOf names the pod's controlling owner; a ReplicaSet named after a Deployment (its name
// the pod-template-hash label away from another) stands for that Deployment.
func workloadOf(pod *corev1.Pod) probes.WorkloadRef {
	for _, o := range pod.OwnerReferences {
		if o.Controller == nil || !*o.Controller {
			continue
		}
		if o.Kind == "ReplicaSet" {
			if hash := pod.Labels[appsv1.DefaultDeploymentUniqueLabelKey]; hash != "" {
				if name, ok := strings.CutSuffix(o.Name, "-"+hash); ok && name != "" {
					return probes.WorkloadRef{Kind: "Deployment", Name: name}
				}
			}
		}
		return probes.WorkloadRef{Kind: o.Kind, Name: o.Name}
	}
	return probes.WorkloadRef{}
}

// preStopSleep tells how long a preStop hook sleeps: a sleep action, or an exec of sleep
// (sleep N, or sh -c "sleep N"). ok is false for any other hook.
func preStopSleep(h *corev1.LifecycleHandler) (seconds float64, ok bool) {
	switch {
	case h.Sleep != nil:
		return float64(h.Sleep.Seconds), true
	case h.Exec != nil:
		cmd := h.Exec.Command
		if len(cmd) == 3 && (path.Base(cmd[0]) == "sh" || path.Base(cmd[0]) == "bash") && cmd[1] == "-c" {
			cmd = strings.Fields(cmd[2])
		}
		if len(cmd) == 2 && path.Base(cmd[0]) == "sleep" {
			return sleepArg(cmd[1])
		}
	}
	return 0, false
}

// sleepArg reads sleep(1)'s argument: a number of seconds with an optional s, m, h or d suffix.
func sleepArg(s string) (float64, bool) {
	unit := 1.0
	switch {
	case strings.HasSuffix(s, "s"):
		s = strings.TrimSuffix(s, "s")
	case strings.HasSuffix(s, "m"):
		s, unit = strings.TrimSuffix(s, "m"), 60
	case strings.HasSuffix(s, "h"):
		s, unit = strings.TrimSuffix(s, "h"), 3600
	case strings.HasSuffix(s, "d"):
		s, unit = strings.TrimSuffix(s, "d"), 86400
	}
	v, err := strconv.ParseFloat(s, 64)
	if err != nil || v < 0 {
		return 0, false
	}
	return v * unit, true
}
