package cluster

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"strings"
	"sync"

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

// kubelet is the lab's stand-in for one node's kubelet. It runs the pods bound to its node, one
// goroutine each (see podrun.go): a network namespace with a veth and an address from the
// node's pod CIDR, and a process running `lab serve` or the binary of one of the lab's images
// (images.go), whose readiness probes it runs and whose status it reports; it restarts or
// completes pods whose process exits, and terminates deleted ones as the kubelet does.
type kubelet struct {
	node   string
	idx    int
	nodeNS string
	client kubernetes.Interface
	log    *slog.Logger
	procs  *procs
	// tool is the lab binary; pods run `tool serve`.
	tool string
	// images maps the lab's own images to the binaries their pods run.
	images map[string]string
	// agent is the User-Agent of HTTP readiness probes.
	agent string

	mu    sync.Mutex
	pods  map[types.UID]*podRun
	inUse map[netip.Addr]bool
	// ips is every address a pod got on this node, kept after the pod is gone.
	ips map[types.UID]netip.Addr
	// netns is the network namespace of each pod whose sandbox exists.
	netns  map[types.UID]string
	nextIP int
	seq    int
	wg     sync.WaitGroup
}

func newKubelet(node string, idx int, client kubernetes.Interface, p *procs, tool string, images map[string]string, agent string, log *slog.Logger) *kubelet {
	return &kubelet{
		node: node, idx: idx, nodeNS: nodeNS(idx), client: client, log: log.With("kubelet", node), procs: p, tool: tool, images: images, agent: agent,
		pods: map[types.UID]*podRun{}, inUse: map[netip.Addr]bool{}, ips: map[types.UID]netip.Addr{}, netns: map[types.UID]string{}, nextIP: 2,
	}
}

func nodeNS(i int) string { return fmt.Sprintf("%sn%d", ns.Prefix, i) }

// run handles this node's pods until ctx is done; each pod's goroutine then removes what it made.
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
				k.forget(p.UID)
			}
		},
	})
	f.Start(ctx.Done())
	<-ctx.Done()
	f.Shutdown()
	k.wg.Wait()
}

// sync starts a goroutine for each new pod and hands deletions to the pod's goroutine. A pod
// this kubelet does not run (never started here, or already finished) is deleted at once.
func (k *kubelet) sync(ctx context.Context, pod *corev1.Pod) {
	k.mu.Lock()
	r := k.pods[pod.UID]
	if r == nil && pod.DeletionTimestamp == nil && !podTerminal(pod) {
		r = newPodRun(ctx, pod)
		k.pods[pod.UID] = r
		k.wg.Go(func() { k.live(r) })
	}
	k.mu.Unlock()
	switch {
	case pod.DeletionTimestamp == nil:
	case r == nil:
		k.deleteObject(ctx, pod)
	default:
		r.requestDeletion(pod)
	}
}

func podTerminal(p *corev1.Pod) bool {
	return p.Status.Phase == corev1.PodSucceeded || p.Status.Phase == corev1.PodFailed
}

// forget ends the goroutine of a pod whose object is gone: deleted by this kubelet after its
// termination, or force-deleted by someone else, in which case its process is killed.
func (k *kubelet) forget(uid types.UID) {
	k.mu.Lock()
	r := k.pods[uid]
	delete(k.pods, uid)
	k.mu.Unlock()
	if r != nil {
		r.cancel()
	}
}

// allocate takes an address of the node's pod CIDR: want when it is valid, else the next free
// one, round robin, so that a deleted pod's address is not reused at once.
func (k *kubelet) allocate(uid types.UID, want netip.Addr) (netip.Addr, string, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	cidr := podCIDR(k.idx)
	take := func(ip netip.Addr) (netip.Addr, string, error) {
		k.inUse[ip] = true
		if uid != "" {
			k.ips[uid] = ip
		}
		k.seq++
		return ip, fmt.Sprintf("%sp%d-%d", ns.Prefix, k.idx, k.seq), nil
	}
	if want.IsValid() {
		last := cidr.Addr().As4()
		last[3] = 255
		switch {
		case !cidr.Contains(want) || want == cidr.Addr() || want == netip.AddrFrom4(last):
			return netip.Addr{}, "", fmt.Errorf("address %s (annotation %s) is not a pod address of node %s, whose pod CIDR is %s", want, PodIP, k.node, cidr)
		case k.inUse[want]:
			return netip.Addr{}, "", fmt.Errorf("address %s (annotation %s) is in use on node %s", want, PodIP, k.node)
		}
		return take(want)
	}
	base := cidr.Addr().As4()
	for range 253 {
		n := k.nextIP
		k.nextIP = k.nextIP%254 + 1
		if n < 2 {
			continue
		}
		base[3] = byte(n)
		if ip := netip.AddrFrom4(base); !k.inUse[ip] {
			return take(ip)
		}
	}
	return netip.Addr{}, "", fmt.Errorf("node %s: pod CIDR %s is full", k.node, cidr)
}

// release removes a pod's namespace and frees its address, as a CNI DEL does.
func (k *kubelet) release(ip netip.Addr, netns string) {
	if err := ns.Delete(netns); err != nil {
		k.log.Warn("removing pod namespace", "netns", netns, "err", err)
	}
	k.mu.Lock()
	delete(k.inUse, ip)
	k.mu.Unlock()
}

// podIP is the address pod uid got on this node, also after the pod is gone.
func (k *kubelet) podIP(uid types.UID) (netip.Addr, bool) {
	k.mu.Lock()
	defer k.mu.Unlock()
	ip, ok := k.ips[uid]
	return ip, ok
}

// podNS is the network namespace of pod uid while its sandbox exists.
func (k *kubelet) podNS(uid types.UID) (string, bool) {
	k.mu.Lock()
	defer k.mu.Unlock()
	netns, ok := k.netns[uid]
	return netns, ok
}

// attach creates a pod network namespace on this node that runs nothing: the load generator's
// client pod.
func (k *kubelet) attach() (string, netip.Addr, error) {
	ip, netns, err := k.allocate("", netip.Addr{})
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

// event records an event about pod p, as the kubelet's event recorder does, and logs it.
func (k *kubelet) event(ctx context.Context, p *corev1.Pod, typ, reason, message string) {
	level := slog.LevelInfo
	if typ == corev1.EventTypeWarning {
		level = slog.LevelWarn
	}
	k.log.Log(ctx, level, message, "pod", p.Namespace+"/"+p.Name, "reason", reason)
	now := metav1.Now()
	ev := &corev1.Event{
		ObjectMeta:     metav1.ObjectMeta{GenerateName: p.Name + ".", Namespace: p.Namespace},
		InvolvedObject: corev1.ObjectReference{APIVersion: "v1", Kind: "Pod", Namespace: p.Namespace, Name: p.Name, UID: p.UID},
		Reason:         reason, Message: message, Type: typ,
		Source:         corev1.EventSource{Component: "kubelet", Host: k.node},
		FirstTimestamp: now, LastTimestamp: now, Count: 1,
	}
	if _, err := k.client.CoreV1().Events(p.Namespace).Create(ctx, ev, metav1.CreateOptions{}); err != nil && ctx.Err() == nil {
		k.log.Warn("recording event", "pod", p.Namespace+"/"+p.Name, "reason", reason, "err", err)
	}
}

// deleteObject deletes the pod object for good, as the kubelet does once the containers are gone.
func (k *kubelet) deleteObject(ctx context.Context, pod *corev1.Pod) {
	err := retryUnavailable(ctx, func() error {
		return k.client.CoreV1().Pods(pod.Namespace).Delete(ctx, pod.Name, metav1.DeleteOptions{
			GracePeriodSeconds: ptr.To[int64](0),
			Preconditions:      &metav1.Preconditions{UID: &pod.UID},
		})
	})
	if err != nil && !apierrors.IsNotFound(err) && !apierrors.IsConflict(err) && !errors.Is(err, context.Canceled) {
		k.log.Warn("deleting pod object", "pod", pod.Name, "err", err)
	}
}
