package cluster

import (
	"context"
	"log/slog"
	"net/netip"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
)

// binder is the lab's scheduler: it binds each new pod to the node that runs the fewest pods
// that have not finished, or, for a pod asking for an address (annotation PodIP), to the node
// whose pod CIDR holds it.
type binder struct {
	client kubernetes.Interface
	nodes  []*Node
	log    *slog.Logger
}

func (b *binder) run(ctx context.Context) {
	f := informers.NewSharedInformerFactory(b.client, 0)
	inf := f.Core().V1().Pods().Informer()
	bind := func(obj any) {
		pod, ok := obj.(*corev1.Pod)
		if !ok || pod.Spec.NodeName != "" || pod.DeletionTimestamp != nil {
			return
		}
		target := b.owner(pod)
		if target == "" {
			target = requiredNode(pod)
		}
		if target == "" {
			load := map[string]int{}
			for _, o := range inf.GetStore().List() {
				if p := o.(*corev1.Pod); p.Spec.NodeName != "" && p.DeletionTimestamp == nil && !podTerminal(p) {
					load[p.Spec.NodeName]++
				}
			}
			target = b.nodes[0].Name
			for _, n := range b.nodes {
				if load[n.Name] < load[target] {
					target = n.Name
				}
			}
		}
		err := b.client.CoreV1().Pods(pod.Namespace).Bind(ctx, &corev1.Binding{
			ObjectMeta: metav1.ObjectMeta{Namespace: pod.Namespace, Name: pod.Name, UID: pod.UID},
			Target:     corev1.ObjectReference{Kind: "Node", Name: target},
		}, metav1.CreateOptions{})
		if err != nil {
			b.log.Warn("binding pod", "pod", pod.Name, "node", target, "err", err)
		}
	}
	_, _ = inf.AddEventHandler(cache.ResourceEventHandlerFuncs{AddFunc: bind, UpdateFunc: func(_, o any) { bind(o) }})
	f.Start(ctx.Done())
	<-ctx.Done()
	f.Shutdown()
}

// owner is the node whose pod CIDR holds the address pod asks for; "" when it asks for none or
// for one no node owns (its kubelet then reports the error).
func (b *binder) owner(pod *corev1.Pod) string {
	ip, err := netip.ParseAddr(pod.Annotations[PodIP])
	if err != nil {
		return ""
	}
	for _, n := range b.nodes {
		if n.PodCIDR.Contains(ip) {
			return n.Name
		}
	}
	return ""
}

// requiredNode is the node a pod's required node affinity names by its metadata.name field, as
// the DaemonSet controller pins each of its pods to one node; "" when it names none.
func requiredNode(pod *corev1.Pod) string {
	a := pod.Spec.Affinity
	if a == nil || a.NodeAffinity == nil || a.NodeAffinity.RequiredDuringSchedulingIgnoredDuringExecution == nil {
		return ""
	}
	for _, term := range a.NodeAffinity.RequiredDuringSchedulingIgnoredDuringExecution.NodeSelectorTerms {
		for _, f := range term.MatchFields {
			if f.Key == "metadata.name" && f.Operator == corev1.NodeSelectorOpIn && len(f.Values) == 1 {
				return f.Values[0]
			}
		}
	}
	return ""
}
