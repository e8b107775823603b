package cluster

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/strategicpatch"
	"k8s.io/utils/ptr"
)

// podState is what the lab's kubelet knows of one pod and reports as its status. The lab runs
// one process per pod, so every container shares that process's state; only readiness is per
// container.
type podState struct {
	phase corev1.PodPhase
	// ip stays in the status after the sandbox is gone, as the kubelet leaves it.
	ip netip.Addr
	// sandbox is whether the pod's network namespace exists.
	sandbox   bool
	startTime time.Time
	// The process runs since started (pid), or has ended (terminated), or waits to start again
	// (waiting is the reason).
	pid            int
	started        time.Time
	terminated     *corev1.ContainerStateTerminated
	waiting        string
	waitingMessage string
	lastTerminated *corev1.ContainerStateTerminated
	// runs counts the processes started: restartCount is runs-1.
	runs int32
	// probeReady is the verdict of each container's readiness probe; containers without one
	// are absent, and ready whenever the process runs.
	probeReady map[string]bool
	since      map[corev1.PodConditionType]condSince
}

type condSince struct {
	status corev1.ConditionStatus
	at     metav1.Time
}

func newPodState() *podState {
	return &podState{phase: corev1.PodPending, probeReady: map[string]bool{}, since: map[corev1.PodConditionType]condSince{}}
}

func (s *podState) running() bool { return !s.started.IsZero() }

func (s *podState) containerID() string { return "lab://" + strconv.Itoa(s.pid) }

// start records a process starting: a new container, not ready until its probe says so.
func (s *podState) start(pid int, at time.Time) {
	if s.terminated != nil {
		s.lastTerminated, s.terminated = s.terminated, nil
	}
	s.waiting, s.waitingMessage = "", ""
	s.pid, s.started = pid, at
	s.runs++
	for c := range s.probeReady {
		s.probeReady[c] = false
	}
	if s.startTime.IsZero() {
		s.startTime = at
	}
	s.phase = corev1.PodRunning
}

// exit records the process's end.
func (s *podState) exit(code int32, at time.Time) {
	reason := "Completed"
	if code != 0 {
		reason = "Error"
	}
	s.terminated = &corev1.ContainerStateTerminated{
		ExitCode: code, Reason: reason, ContainerID: s.containerID(),
		StartedAt: metav1.NewTime(s.started), FinishedAt: metav1.NewTime(at),
	}
	s.pid, s.started = 0, time.Time{}
}

// backOff records that the ended process will be restarted after a delay.
func (s *podState) backOff(message string) {
	if s.terminated != nil {
		s.lastTerminated, s.terminated = s.terminated, nil
	}
	s.waiting, s.waitingMessage = "CrashLoopBackOff", message
}

// lastExitCode is the exit code of the process that ended last (0 when none has).
func (s *podState) lastExitCode() int32 {
	for _, t := range []*corev1.ContainerStateTerminated{s.terminated, s.lastTerminated} {
		if t != nil {
			return t.ExitCode
		}
	}
	return 0
}

// finish records that the pod will not run again: its phase is Succeeded or Failed by the last
// exit code, as the kubelet's is (also for a deleted pod whose restartPolicy is Always).
func (s *podState) finish() {
	s.phase = corev1.PodSucceeded
	if s.lastExitCode() != 0 {
		s.phase = corev1.PodFailed
	}
}

func (s *podState) terminal() bool {
	return s.phase == corev1.PodSucceeded || s.phase == corev1.PodFailed
}

// apply writes the state into st, the status the API server holds for pod p, leaving alone
// what others own there (the PodScheduled condition, readiness gates' conditions).
func (s *podState) apply(st *corev1.PodStatus, p *corev1.Pod, hostIP netip.Addr, now time.Time) {
	st.Phase = s.phase
	st.HostIP, st.HostIPs = hostIP.String(), []corev1.HostIP{{IP: hostIP.String()}}
	if s.ip.IsValid() {
		st.PodIP, st.PodIPs = s.ip.String(), []corev1.PodIP{{IP: s.ip.String()}}
	}
	if !s.startTime.IsZero() {
		st.StartTime = ptr.To(metav1.NewTime(s.startTime))
	}
	st.ContainerStatuses = st.ContainerStatuses[:0]
	var unready []string
	for _, c := range p.Spec.Containers {
		ready, probed := s.probeReady[c.Name]
		ready = s.running() && (ready || !probed)
		if !ready {
			unready = append(unready, c.Name)
		}
		cs := corev1.ContainerStatus{Name: c.Name, Image: c.Image, Ready: ready, RestartCount: max(s.runs-1, 0), Started: ptr.To(s.running())}
		switch {
		case s.running():
			cs.ContainerID = s.containerID()
			cs.State.Running = &corev1.ContainerStateRunning{StartedAt: metav1.NewTime(s.started)}
		case s.terminated != nil:
			cs.ContainerID = s.terminated.ContainerID
			cs.State.Terminated = s.terminated.DeepCopy()
		default:
			cs.State.Waiting = &corev1.ContainerStateWaiting{Reason: s.waiting, Message: s.waitingMessage}
		}
		if s.lastTerminated != nil {
			cs.LastTerminationState.Terminated = s.lastTerminated.DeepCopy()
		}
		st.ContainerStatuses = append(st.ContainerStatuses, cs)
	}
	reason, message := "", ""
	switch {
	case s.terminal():
		reason = "PodCompleted"
	case len(unready) > 0:
		reason, message = "ContainersNotReady", fmt.Sprintf("containers with unready status: [%s]", strings.Join(unready, " "))
	}
	s.condition(st, corev1.PodReadyToStartContainers, s.sandbox, "", "", now)
	s.condition(st, corev1.PodInitialized, true, "", "", now)
	s.condition(st, corev1.ContainersReady, len(unready) == 0, reason, message, now)
	var gates []string
	for _, g := range p.Spec.ReadinessGates {
		if !conditionTrue(st.Conditions, g.ConditionType) {
			gates = append(gates, string(g.ConditionType))
		}
	}
	if len(unready) == 0 && len(gates) > 0 {
		reason, message = "ReadinessGatesNotReady", fmt.Sprintf("readiness gates not True: [%s]", strings.Join(gates, " "))
	}
	s.condition(st, corev1.PodReady, len(unready) == 0 && len(gates) == 0, reason, message, now)
}

// condition sets condition t in st, its transition time the moment its status last changed.
func (s *podState) condition(st *corev1.PodStatus, t corev1.PodConditionType, ok bool, reason, message string, now time.Time) {
	status := corev1.ConditionFalse
	if ok {
		status = corev1.ConditionTrue
	}
	since, seen := s.since[t]
	if !seen || since.status != status {
		since = condSince{status: status, at: metav1.NewTime(now)}
		s.since[t] = since
	}
	c := corev1.PodCondition{Type: t, Status: status, Reason: reason, Message: message, LastTransitionTime: since.at}
	for i := range st.Conditions {
		if st.Conditions[i].Type == t {
			st.Conditions[i] = c
			return
		}
	}
	st.Conditions = append(st.Conditions, c)
}

func conditionTrue(conds []corev1.PodCondition, t corev1.PodConditionType) bool {
	for _, c := range conds {
		if c.Type == t {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

// statusPatch is the strategic merge patch from status old to status new, with the pod's UID as
// precondition, as the kubelet's status manager sends it; unchanged when there is nothing to
// send.
func statusPatch(uid types.UID, old, new corev1.PodStatus) (patch []byte, unchanged bool, err error) {
	oldJSON, err := json.Marshal(corev1.Pod{Status: old})
	if err != nil {
		return nil, false, err
	}
	newJSON, err := json.Marshal(corev1.Pod{ObjectMeta: metav1.ObjectMeta{UID: uid}, Status: new})
	if err != nil {
		return nil, false, err
	}
	patch, err = strategicpatch.CreateTwoWayMergePatch(oldJSON, newJSON, corev1.Pod{})
	if err != nil {
		return nil, false, err
	}
	return patch, bytes.Equal(patch, fmt.Appendf(nil, `{"metadata":{"uid":%q}}`, uid)), nil
}

// writeStatus brings the API server's status of the pod in line with the run's state: it reads
// the pod and patches the difference, as the kubelet's status manager does. Writes of one pod
// happen one at a time, in order.
func (k *kubelet) writeStatus(ctx context.Context, r *podRun) error {
	r.writeMu.Lock()
	defer r.writeMu.Unlock()
	pods := k.client.CoreV1().Pods(r.pod.Namespace)
	cur, err := pods.Get(ctx, r.pod.Name, metav1.GetOptions{})
	if err != nil {
		return fmt.Errorf("reading pod %s/%s for its status: %w", r.pod.Namespace, r.pod.Name, err)
	}
	if cur.UID != r.pod.UID {
		return fmt.Errorf("pod %s/%s is now another pod (uid %s, was %s)", r.pod.Namespace, r.pod.Name, cur.UID, r.pod.UID)
	}
	next := cur.Status.DeepCopy()
	r.mu.Lock()
	r.state.apply(next, cur, nodeAddr(k.idx), time.Now())
	r.mu.Unlock()
	patch, unchanged, err := statusPatch(cur.UID, cur.Status, *next)
	if err != nil || unchanged {
		return err
	}
	if _, err := pods.Patch(ctx, cur.Name, types.StrategicMergePatchType, patch, metav1.PatchOptions{}, "status"); err != nil {
		return fmt.Errorf("patching pod %s/%s's status: %w", cur.Namespace, cur.Name, err)
	}
	return nil
}
