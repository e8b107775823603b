package cluster

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
	"k8s.io/utils/ptr"

	"github.com/endpointlag/endpointlag/lab/internal/ns"
)

// OnSIGTERM is the pod annotation that chooses what a lab pod does on "SIGTERM", after its
// preStop hook: "exit" (the default) closes the listener and every connection at once, so late
// traffic is refused; "drain=5s" keeps serving for that long first.
const OnSIGTERM = "lab.endpointlag.dev/on-sigterm"

// kubelet is the lab's stand-in for one node's kubelet. It runs the pods bound to its node: a
// network namespace with a veth and an address from the node's pod CIDR, and an HTTP server that
// answers with the pod's name. On deletion it honours the preStop hook (sleep action or
// `exec: sleep N`), the SIGTERM behaviour of the OnSIGTERM annotation and the grace period, then
// removes the namespace and the pod object.
type kubelet struct {
	node   string
	idx    int
	nodeNS string
	client kubernetes.Interface
	log    *slog.Logger
	procs  *procs
	// tool is the lab binary; pods run `tool serve`.
	tool string

	mu     sync.Mutex
	pods   map[types.UID]*podRun
	inUse  map[netip.Addr]bool
	nextIP int
	seq    int
	wg     sync.WaitGroup
}

type podRun struct {
	namespace, name string
	uid             types.UID
	netns           string
	ip              netip.Addr
	proc            *proc
	terminating     bool
	removed         bool
}

func newKubelet(node string, idx int, client kubernetes.Interface, p *procs, tool string, log *slog.Logger) *kubelet {
	return &kubelet{
		node: node, idx: idx, nodeNS: nodeNS(idx), client: client, log: log.With("kubelet", node), procs: p, tool: tool,
		pods: map[types.UID]*podRun{}, inUse: map[netip.Addr]bool{}, nextIP: 2,
	}
}

func nodeNS(i int) string { return fmt.Sprintf("%sn%d", ns.Prefix, i) }

// run handles this node's pods until ctx is done, then removes every pod namespace it made.
func (k *kubelet) run(ctx context.Context) {
	f := informers.NewSharedInformerFactoryWithOptions(k.client, 0, informers.WithTweakListOptions(func(o *metav1.ListOptions) {
		o.FieldSelector = fields.OneTermEqualSelector("spec.nodeName", k.node).String()
	}))
	inf := f.Core().V1().Pods().Informer()
	_, _ = inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(obj any) { k.sync(ctx, obj.(*corev1.Pod)) },
		UpdateFunc: func(_, obj any) { k.sync(ctx, obj.(*corev1.Pod)) },
		DeleteFunc: func(obj any) {
			if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
				obj = t.Obj
			}
			if p, ok := obj.(*corev1.Pod); ok {
				k.remove(p.UID)
			}
		},
	})
	f.Start(ctx.Done())
	<-ctx.Done()
	f.Shutdown()
	k.wg.Wait()
	k.mu.Lock()
	uids := make([]types.UID, 0, len(k.pods))
	for uid := range k.pods {
		uids = append(uids, uid)
	}
	k.mu.Unlock()
	for _, uid := range uids {
		k.remove(uid)
	}
}

func (k *kubelet) sync(ctx context.Context, pod *corev1.Pod) {
	k.mu.Lock()
	run := k.pods[pod.UID]
	k.mu.Unlock()
	switch {
	case pod.DeletionTimestamp != nil && run == nil:
		k.deleteObject(ctx, pod)
	case pod.DeletionTimestamp != nil && !run.terminating:
		k.mu.Lock()
		run.terminating = true
		k.mu.Unlock()
		k.wg.Go(func() { k.terminate(ctx, pod, run) })
	case pod.DeletionTimestamp == nil && run == nil:
		if err := k.start(ctx, pod); err != nil {
			k.log.Error("starting pod", "pod", pod.Name, "err", err)
		}
	}
}

// allocate takes the next free address of the node's pod CIDR, round robin, so that a deleted
// pod's address is not reused at once.
func (k *kubelet) allocate() (netip.Addr, string, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	base := podCIDR(k.idx).Addr().As4()
	for range 253 {
		n := k.nextIP
		k.nextIP = k.nextIP%254 + 1
		if n < 2 {
			continue
		}
		base[3] = byte(n)
		ip := netip.AddrFrom4(base)
		if !k.inUse[ip] {
			k.inUse[ip] = true
			k.seq++
			return ip, fmt.Sprintf("%sp%d-%d", ns.Prefix, k.idx, k.seq), nil
		}
	}
	return netip.Addr{}, "", fmt.Errorf("node %s: pod CIDR %s is full", k.node, podCIDR(k.idx))
}

func (k *kubelet) release(ip netip.Addr, netns string) {
	if err := ns.Delete(netns); err != nil {
		k.log.Warn("removing pod namespace", "netns", netns, "err", err)
	}
	k.mu.Lock()
	delete(k.inUse, ip)
	k.mu.Unlock()
}

// attach creates a pod network namespace on this node that runs nothing: the load generator's
// client pod.
func (k *kubelet) attach() (string, netip.Addr, error) {
	ip, netns, err := k.allocate()
	if err != nil {
		return "", ip, err
	}
	if err := plugPod(k.nodeNS, netns, hostLinkName(netns), ip); err != nil {
		k.release(ip, netns)
		return "", ip, err
	}
	return netns, ip, nil
}

func hostLinkName(netns string) string {
	// "elab-p1-17" → "pv1-17": unique on the node, within the 15 bytes of a link name.
	return "pv" + strings.TrimPrefix(netns, ns.Prefix+"p")
}

func containerPort(pod *corev1.Pod) int32 {
	for _, c := range pod.Spec.Containers {
		for _, p := range c.Ports {
			return p.ContainerPort
		}
	}
	return 8080
}

func (k *kubelet) start(ctx context.Context, pod *corev1.Pod) error {
	ip, netns, err := k.allocate()
	if err != nil {
		return err
	}
	if err := plugPod(k.nodeNS, netns, hostLinkName(netns), ip); err != nil {
		k.release(ip, netns)
		return err
	}
	port := containerPort(pod)
	pr, err := k.procs.start("pod-"+pod.Name, netns, k.tool, "serve", "--name="+pod.Name,
		fmt.Sprintf("--port=%d", port), "--on-sigterm="+pod.Annotations[OnSIGTERM])
	if err != nil {
		k.release(ip, netns)
		return err
	}
	if err := waitFor(ctx, 10*time.Second, pod.Name+" to listen", func() error {
		if done, perr := pr.exited(); done {
			return &fatal{fmt.Errorf("pod %s exited: %v", pod.Name, perr)}
		}
		c, err := ns.Dial(ctx, k.nodeNS, nil, "tcp", netip.AddrPortFrom(ip, uint16(port)).String())
		if err == nil {
			c.Close()
		}
		return err
	}); err != nil {
		pr.kill()
		k.release(ip, netns)
		return err
	}
	run := &podRun{namespace: pod.Namespace, name: pod.Name, uid: pod.UID, netns: netns, ip: ip, proc: pr}
	k.mu.Lock()
	k.pods[pod.UID] = run
	k.mu.Unlock()
	k.log.Debug("pod started", "pod", pod.Namespace+"/"+pod.Name, "ip", ip, "netns", netns)
	return k.reportRunning(ctx, pod, ip)
}

func (k *kubelet) reportRunning(ctx context.Context, pod *corev1.Pod, ip netip.Addr) error {
	now := metav1.Now()
	conds := []corev1.PodCondition{}
	for _, t := range []corev1.PodConditionType{corev1.PodScheduled, corev1.PodInitialized, corev1.ContainersReady, corev1.PodReady} {
		conds = append(conds, corev1.PodCondition{Type: t, Status: corev1.ConditionTrue, LastTransitionTime: now})
	}
	patch, err := json.Marshal(map[string]any{"status": corev1.PodStatus{
		Phase:      corev1.PodRunning,
		Conditions: conds,
		HostIP:     nodeAddr(k.idx).String(),
		HostIPs:    []corev1.HostIP{{IP: nodeAddr(k.idx).String()}},
		PodIP:      ip.String(),
		PodIPs:     []corev1.PodIP{{IP: ip.String()}},
		StartTime:  &now,
		ContainerStatuses: []corev1.ContainerStatus{{
			Name: pod.Spec.Containers[0].Name, Image: pod.Spec.Containers[0].Image, Ready: true, Started: ptr.To(true),
			State: corev1.ContainerState{Running: &corev1.ContainerStateRunning{StartedAt: now}},
		}},
	}})
	if err != nil {
		return err
	}
	_, err = k.client.CoreV1().Pods(pod.Namespace).Patch(ctx, pod.Name, types.StrategicMergePatchType, patch, metav1.PatchOptions{}, "status")
	if err != nil {
		return fmt.Errorf("reporting pod %s running: %w", pod.Name, err)
	}
	return nil
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

func sleepUntil(ctx context.Context, d time.Duration, deadline time.Time) {
	if until := time.Until(deadline); d > until {
		d = until
	}
	if d <= 0 {
		return
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
}

func (k *kubelet) terminate(ctx context.Context, pod *corev1.Pod, run *podRun) {
	grace := 30 * time.Second
	if pod.DeletionGracePeriodSeconds != nil {
		grace = time.Duration(*pod.DeletionGracePeriodSeconds) * time.Second
	}
	deadline := time.Now().Add(grace)
	preStop := preStopSeconds(pod)
	k.log.Debug("pod terminating", "pod", pod.Namespace+"/"+pod.Name, "preStop", preStop, "on-sigterm", pod.Annotations[OnSIGTERM], "grace", grace)
	sleepUntil(ctx, preStop, deadline)
	_ = run.proc.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-run.proc.done:
	case <-ctx.Done():
	case <-time.After(time.Until(deadline)):
		k.log.Debug("grace period over, killing", "pod", pod.Namespace+"/"+pod.Name)
	}
	k.remove(pod.UID)
	k.deleteObject(ctx, pod)
}

// remove kills a pod's process and removes its namespace; it is safe to call twice.
func (k *kubelet) remove(uid types.UID) {
	k.mu.Lock()
	run := k.pods[uid]
	if run == nil || run.removed {
		k.mu.Unlock()
		return
	}
	run.removed = true
	delete(k.pods, uid)
	k.mu.Unlock()
	run.proc.kill()
	k.release(run.ip, run.netns)
	k.log.Debug("pod removed", "pod", run.namespace+"/"+run.name, "ip", run.ip)
}

// deleteObject deletes the pod object for good, as the kubelet does once the containers are gone.
func (k *kubelet) deleteObject(ctx context.Context, pod *corev1.Pod) {
	err := k.client.CoreV1().Pods(pod.Namespace).Delete(ctx, pod.Name, metav1.DeleteOptions{
		GracePeriodSeconds: ptr.To[int64](0),
		Preconditions:      &metav1.Preconditions{UID: &pod.UID},
	})
	if err != nil && !apierrors.IsNotFound(err) && !apierrors.IsConflict(err) && !errors.Is(err, context.Canceled) {
		k.log.Warn("deleting pod object", "pod", pod.Name, "err", err)
	}
}
