package cluster

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	utilnet "k8s.io/apimachinery/pkg/util/net"

	"github.com/endpointlag/endpointlag/lab/internal/ns"
)

// podRun is one pod on its node. Its goroutine (live) owns the lifecycle: the sandbox, the
// process, restarts, completion and termination; its probers report readiness into state.
type podRun struct {
	// pod is the object as first seen; the lab uses only what cannot change (spec, annotations
	// read at start).
	pod *corev1.Pod
	// ctx ends when the pod's object is gone or the lab stops; lab only when the lab stops: the
	// pod's own deletion of its object must not cancel itself when the informer sees it gone.
	ctx, lab context.Context
	cancel   context.CancelFunc
	// deletion receives the pod once its deletion is requested.
	deletion     chan *corev1.Pod
	deletionOnce sync.Once

	// Only the pod's goroutine touches these.
	opts  podOptions
	netns string
	// kubeEnv and mounts are, for a pod of one of the lab's images, the API server's address
	// every container gets and the bind mounts of its volumes (volumes.go).
	kubeEnv []string
	mounts  []mount
	proc    *proc
	probes  []*probeSpec
	probers []*prober
	// stopProbes ends the probers, probing waits for them.
	stopProbes context.CancelFunc
	probing    sync.WaitGroup

	// writeMu orders the status writes; mu guards state.
	writeMu sync.Mutex
	mu      sync.Mutex
	state   *podState
}

func newPodRun(ctx context.Context, pod *corev1.Pod) *podRun {
	r := &podRun{pod: pod, lab: ctx, deletion: make(chan *corev1.Pod, 1), state: newPodState(), stopProbes: func() {}}
	r.ctx, r.cancel = context.WithCancel(ctx)
	return r
}

func (r *podRun) requestDeletion(pod *corev1.Pod) {
	r.deletionOnce.Do(func() { r.deletion <- pod })
}

const (
	// sandboxRetry is how long the kubelet backs off after a failed pod sync before the next.
	sandboxRetry = 10 * time.Second
	// listenTimeout bounds how long a started process may take to listen.
	listenTimeout = 10 * time.Second
)

// live runs the pod until it is deleted, or its object is gone, or the lab stops.
func (k *kubelet) live(r *podRun) {
	defer k.teardown(r)
	pod := r.pod
	var err error
	if r.opts, err = parsePodOptions(pod.Annotations); err != nil {
		k.event(r.ctx, pod, corev1.EventTypeWarning, "Failed", err.Error())
		k.awaitDeletion(r)
		return
	}
	k.readProbes(r)
	if !k.startSandbox(r) || !k.setUpVolumes(r) {
		return
	}
	for {
		if err := k.startProcess(r); err != nil {
			k.event(r.ctx, pod, corev1.EventTypeWarning, "Failed", err.Error())
			k.awaitDeletion(r)
			return
		}
		if !until(k, r, r.proc.done) {
			return
		}
		code := exitCode(r.proc)
		r.mu.Lock()
		r.state.exit(code, time.Now())
		runs := r.state.runs
		r.mu.Unlock()
		if !restarts(pod.Spec.RestartPolicy, code) {
			k.complete(r)
			return
		}
		k.writeStatusOrLog(r)
		if delay := restartDelay(runs); delay > 0 {
			r.mu.Lock()
			r.state.backOff(fmt.Sprintf("back-off %s restarting failed container", delay))
			r.mu.Unlock()
			k.writeStatusOrLog(r)
			if !until(k, r, time.After(delay)) {
				return
			}
		}
	}
}

// until waits for ch and reports whether it came before the pod's end: its deletion (the pod is
// then terminated) or its object gone or the lab stopping.
func until[T any](k *kubelet, r *podRun, ch <-chan T) bool {
	select {
	case <-ch:
		return true
	case <-r.ctx.Done():
	case del := <-r.deletion:
		k.terminate(r, del)
	}
	return false
}

// readProbes reads the containers' readiness probes. A container with one is not ready until
// it succeeds; one whose probe cannot run (a port name it does not declare) never is, as with
// the kubelet; exec and grpc probes, which the lab cannot run, count as absent.
func (k *kubelet) readProbes(r *podRun) {
	for i := range r.pod.Spec.Containers {
		c := &r.pod.Spec.Containers[i]
		spec, err := readinessProbe(c)
		switch {
		case errors.Is(err, errUnsupportedProbe):
			k.event(r.ctx, r.pod, corev1.EventTypeWarning, "UnsupportedProbe", err.Error()+"; counting the container as ready")
			continue
		case err != nil:
			k.event(r.ctx, r.pod, corev1.EventTypeWarning, "Unhealthy", "Readiness probe errored: "+err.Error())
		case spec != nil:
			r.probes = append(r.probes, spec)
		default:
			continue
		}
		r.state.probeReady[c.Name] = false
	}
}

// startSandbox makes the pod's network namespace and address, retrying as the kubelet does
// until it works, the pod is deleted (its object then goes at once) or the lab stops.
func (k *kubelet) startSandbox(r *podRun) bool {
	return k.retry(r, "FailedCreatePodSandBox", func() error { return k.sandbox(r) })
}

// setUpVolumes writes the volumes and the environment of a pod that runs one of the lab's
// images (volumes.go), retrying as the kubelet does — a ConfigMap the pod mounts may not be
// published yet — until it works, the pod is deleted or the lab stops.
func (k *kubelet) setUpVolumes(r *podRun) bool {
	c := &r.pod.Spec.Containers[0]
	if k.images[imageRepo(c.Image)] == "" {
		return true
	}
	return k.retry(r, "FailedMount", func() error {
		env, err := k.kubernetesEnv(r.ctx)
		if err != nil {
			return err
		}
		mounts, err := k.podMounts(r.ctx, r.pod, c)
		if err != nil {
			return err
		}
		r.kubeEnv, r.mounts = env, mounts
		return nil
	})
}

// retry runs f until it succeeds (true), the pod is deleted (its object then goes at once) or
// the lab stops, with an event of reason after each failure.
func (k *kubelet) retry(r *podRun, reason string, f func() error) bool {
	for {
		err := f()
		if err == nil {
			return true
		}
		k.event(r.ctx, r.pod, corev1.EventTypeWarning, reason, fmt.Sprintf("%v; retrying in %s", err, sandboxRetry))
		select {
		case <-r.ctx.Done():
			return false
		case del := <-r.deletion:
			k.deleteObject(r.lab, del)
			return false
		case <-time.After(sandboxRetry):
		}
	}
}

func (k *kubelet) sandbox(r *podRun) error {
	if r.pod.Spec.HostNetwork {
		// The node's own namespace and address: nothing to make, nothing to free.
		r.netns = k.nodeNS
		r.mu.Lock()
		r.state.ip, r.state.sandbox = nodeAddr(k.idx), true
		r.mu.Unlock()
		return nil
	}
	ip, netns, err := k.allocate(r.pod.UID, r.opts.ip)
	if err != nil {
		return err
	}
	if err := plugPod(k.nodeNS, netns, hostLinkName(netns), ip); err != nil {
		k.release(ip, netns)
		return err
	}
	r.netns = netns
	k.mu.Lock()
	k.netns[r.pod.UID] = netns
	k.mu.Unlock()
	r.mu.Lock()
	r.state.ip, r.state.sandbox = ip, true
	r.mu.Unlock()
	k.log.Debug("pod sandbox ready", "pod", r.pod.Namespace+"/"+r.pod.Name, "ip", ip, "netns", netns)
	return nil
}

// removeSandbox removes the pod's namespace and frees its address, as a CNI DEL does; the
// address stays in the pod's status.
func (k *kubelet) removeSandbox(r *podRun) {
	if r.netns == "" {
		return
	}
	r.mu.Lock()
	ip := r.state.ip
	r.state.sandbox = false
	r.mu.Unlock()
	if r.pod.Spec.HostNetwork {
		r.netns = ""
		return
	}
	k.mu.Lock()
	delete(k.netns, r.pod.UID)
	k.mu.Unlock()
	k.release(ip, r.netns)
	r.netns = ""
}

// errExited ends the wait for a process to listen when it has exited instead.
var errExited = errors.New("the process exited")

// startProcess starts the pod's process — `lab serve`, or the binary of a lab image (see
// images.go) — and reports the pod running once it listens. A process
// that exits before, or does not listen in time (it is killed), ends like any other exit: the
// caller sees r.proc.done. It fails only when the process cannot be started at all.
func (k *kubelet) startProcess(r *podRun) error {
	pod := r.pod
	r.mu.Lock()
	runs := r.state.runs
	r.mu.Unlock()
	name := "pod-" + pod.Name
	if runs > 0 {
		name += "." + strconv.Itoa(int(runs))
	}
	spec, image, err := imageProcess(pod, k.images, r.state.ip, nodeAddr(k.idx), r.kubeEnv...)
	if err != nil {
		return err
	}
	switch {
	case !image:
		spec = processSpec{binary: k.tool, args: r.opts.serveArgs(pod), listen: servePorts(pod)[0]}
	case len(r.mounts) > 0 || dropsAll(&pod.Spec.Containers[0]):
		args := []string{"exec-mounted"}
		if c := &pod.Spec.Containers[0]; dropsAll(c) {
			var add []string
			for _, a := range c.SecurityContext.Capabilities.Add {
				add = append(add, string(a))
			}
			args = append(args, "--caps="+strings.Join(add, ","))
		}
		for _, m := range r.mounts {
			args = append(args, "--bind="+m.src+":"+m.dst)
		}
		spec.args = append(append(append(args, "--"), spec.binary), spec.args...)
		spec.binary = k.tool
	}
	pr, err := k.procs.startEnv(name, r.netns, spec.env, spec.binary, spec.args...)
	if err != nil {
		return err
	}
	r.proc = pr
	r.mu.Lock()
	r.state.start(pr.cmd.Process.Pid, time.Now())
	r.mu.Unlock()
	if spec.listen > 0 {
		addr := netip.AddrPortFrom(r.state.ip, uint16(spec.listen)).String()
		err = waitFor(r.ctx, listenTimeout, pod.Name+" to listen on "+addr, func() error {
			if done, _ := pr.exited(); done {
				return &fatal{errExited}
			}
			c, err := ns.Dial(r.ctx, k.nodeNS, nil, "tcp", addr)
			if err == nil {
				c.Close()
			}
			return err
		})
	}
	switch {
	case r.ctx.Err() != nil || errors.Is(err, errExited):
		return nil
	case err != nil:
		k.event(r.ctx, pod, corev1.EventTypeWarning, "Failed", err.Error()+"; killing it")
		pr.kill()
		return nil
	}
	k.log.Debug("pod started", "pod", pod.Namespace+"/"+pod.Name, "ip", r.state.ip, "netns", r.netns, "pid", pr.cmd.Process.Pid)
	k.writeStatusOrLog(r)
	if r.probers == nil {
		k.startProbers(r)
		return nil
	}
	for _, p := range r.probers {
		select {
		case p.wake <- struct{}{}:
		default:
		}
	}
	return nil
}

// restarts is whether a process that exited with code is restarted under policy.
func restarts(policy corev1.RestartPolicy, code int32) bool {
	switch policy {
	case corev1.RestartPolicyNever:
		return false
	case corev1.RestartPolicyOnFailure:
		return code != 0
	}
	return true
}

// restartDelay is the kubelet's crash-loop back-off before the next start, after runs
// processes have ended: none before the first restart, then 10 s doubling up to 5 minutes.
func restartDelay(runs int32) time.Duration {
	if runs <= 1 {
		return 0
	}
	d := 10 * time.Second
	for i := int32(2); i < runs && d < 5*time.Minute; i++ {
		d *= 2
	}
	return min(d, 5*time.Minute)
}

// complete finishes a pod whose process exited for good: as the kubelet, it stops probing,
// tears the sandbox down and reports the terminal phase; the object stays until deleted.
func (k *kubelet) complete(r *podRun) {
	r.stopProbes()
	r.probing.Wait()
	k.removeSandbox(r)
	r.mu.Lock()
	r.state.finish()
	phase, code := r.state.phase, r.state.lastExitCode()
	r.mu.Unlock()
	k.writeStatusOrLog(r)
	k.log.Debug("pod completed", "pod", r.pod.Namespace+"/"+r.pod.Name, "phase", phase, "exitCode", code)
	k.awaitDeletion(r)
}

// awaitDeletion waits until the pod's deletion is requested, then deletes its object at once:
// nothing of it runs any more.
func (k *kubelet) awaitDeletion(r *podRun) {
	select {
	case <-r.ctx.Done():
	case del := <-r.deletion:
		k.deleteObject(r.lab, del)
	}
}

// terminate stops a deleted pod as the kubelet does: the preStop hook while its readiness
// probes go on, SIGTERM, SIGKILL when the grace period is over; then it stops probing, tears
// the sandbox down, reports the terminal phase and deletes the object with grace period 0.
func (k *kubelet) terminate(r *podRun, pod *corev1.Pod) {
	grace := 30 * time.Second
	if pod.DeletionGracePeriodSeconds != nil {
		grace = time.Duration(*pod.DeletionGracePeriodSeconds) * time.Second
	}
	deadline := time.Now().Add(grace)
	r.mu.Lock()
	running := r.state.running()
	r.mu.Unlock()
	preStop := preStopSeconds(pod)
	k.log.Debug("pod terminating", "pod", pod.Namespace+"/"+pod.Name, "preStop", preStop, "on-sigterm", r.opts.onSIGTERM, "grace", grace, "running", running)
	if running {
		if !r.waitExit(min(preStop, time.Until(deadline))) {
			_ = r.proc.cmd.Process.Signal(syscall.SIGTERM)
			if !r.waitExit(time.Until(deadline)) && r.ctx.Err() == nil {
				k.log.Debug("grace period over, killing", "pod", pod.Namespace+"/"+pod.Name)
				r.proc.kill()
			}
		}
		if r.ctx.Err() != nil {
			return
		}
		r.mu.Lock()
		r.state.exit(exitCode(r.proc), time.Now())
		r.mu.Unlock()
	}
	r.stopProbes()
	r.probing.Wait()
	k.removeSandbox(r)
	r.mu.Lock()
	r.state.finish()
	r.mu.Unlock()
	k.writeStatusOrLog(r)
	k.deleteObject(r.lab, pod)
}

// waitExit waits up to d for the process to exit, and reports whether it did; it gives up when
// the pod's context ends.
func (r *podRun) waitExit(d time.Duration) bool {
	if d <= 0 {
		done, _ := r.proc.exited()
		return done
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-r.proc.done:
		return true
	case <-r.ctx.Done():
	case <-t.C:
	}
	return false
}

// teardown removes whatever the pod still has when its goroutine ends.
func (k *kubelet) teardown(r *podRun) {
	r.stopProbes()
	r.probing.Wait()
	if r.proc != nil {
		r.proc.kill()
	}
	k.removeSandbox(r)
}

func (k *kubelet) writeStatusOrLog(r *podRun) {
	if err := retryUnavailable(r.ctx, func() error { return k.writeStatus(r.ctx, r) }); err != nil && r.ctx.Err() == nil {
		k.log.Warn("writing pod status", "pod", r.pod.Namespace+"/"+r.pod.Name, "err", err)
	}
}

// retryUnavailable runs f until it returns no error or one that retrying cannot mend, backing off
// while the API server cannot be reached or is not ready (restarted, as the faults tests do): a
// real kubelet retries its writes on its next sync.
func retryUnavailable(ctx context.Context, f func() error) error {
	delay := 100 * time.Millisecond
	for deadline := time.Now().Add(2 * time.Minute); ; {
		err := f()
		if err == nil || !unavailable(err) || time.Now().After(deadline) {
			return err
		}
		select {
		case <-ctx.Done():
			return err
		case <-time.After(delay):
		}
		delay = min(2*delay, 2*time.Second)
	}
}

func unavailable(err error) bool {
	return utilnet.IsConnectionRefused(err) || utilnet.IsConnectionReset(err) || utilnet.IsProbableEOF(err) ||
		apierrors.IsServiceUnavailable(err) || apierrors.IsServerTimeout(err) || apierrors.IsTimeout(err) ||
		apierrors.IsTooManyRequests(err) || apierrors.IsInternalError(err)
}

// exitCode is a finished process's exit code; a process killed by a signal gets 128 plus the
// signal's number, as a container runtime reports it.
func exitCode(pr *proc) int32 {
	if ws, ok := pr.cmd.ProcessState.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		return 128 + int32(ws.Signal())
	}
	return int32(pr.cmd.ProcessState.ExitCode())
}

// preStopSeconds reads the first container's preStop hook: a sleep action or `exec: sleep N`.
func preStopSeconds(pod *corev1.Pod) time.Duration {
	if len(pod.Spec.Containers) == 0 || pod.Spec.Containers[0].Lifecycle == nil || pod.Spec.Containers[0].Lifecycle.PreStop == nil {
		return 0
	}
	h := pod.Spec.Containers[0].Lifecycle.PreStop
	if h.Sleep != nil {
		return time.Duration(h.Sleep.Seconds) * time.Second
	}
	if h.Exec != nil {
		cmd := strings.Join(h.Exec.Command, " ")
		if i := strings.LastIndex(cmd, "sleep "); i >= 0 {
			if f, err := strconv.ParseFloat(strings.Fields(cmd[i+len("sleep "):])[0], 64); err == nil {
				return time.Duration(f * float64(time.Second))
			}
		}
	}
	return 0
}

// dropsAll is whether container c drops every capability (and adds back the ones it names): the
// lab then runs its process with exactly those, so that a manifest missing one fails here too.
// Other securityContexts run with the lab's own capabilities.
func dropsAll(c *corev1.Container) bool {
	sc := c.SecurityContext
	return sc != nil && sc.Capabilities != nil && slices.Contains(sc.Capabilities.Drop, "ALL")
}
