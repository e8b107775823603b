package kube

import (
	"fmt"
	"slices"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/tools/cache"
	"k8s.io/utils/clock"
)

// Options are the probe's settings.
type Options struct {
	// SliceSelector selects the EndpointSlices the probe watches, as a label selector. The
	// default is kube-proxy's: no headless Services, no Services of another proxy.
	SliceSelector string
	// TrustedManagers are the endpointslice.kubernetes.io/managed-by values of the slices whose
	// endpoints are trusted; the others' observations are marked Untrusted.
	TrustedManagers []string
}

// KubeProxySliceSelector is the label selector kube-proxy watches EndpointSlices with.
const KubeProxySliceSelector = "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless"

// DefaultOptions watches what kube-proxy watches and trusts the slices of Kubernetes' own
// endpointslice and endpointslice-mirroring controllers.
func DefaultOptions() Options {
	return Options{
		SliceSelector:   KubeProxySliceSelector,
		TrustedManagers: []string{endpointSliceController, "endpointslicemirroring-controller.k8s.io"},
	}
}

// Validate reports a selector that does not parse, naming its flag.
func (o Options) Validate() error {
	if _, err := labels.Parse(o.SliceSelector); err != nil {
		return fmt.Errorf("--kube.endpointslice-selector %q: %w", o.SliceSelector, err)
	}
	for _, m := range o.TrustedManagers {
		if strings.TrimSpace(m) == "" {
			return fmt.Errorf("--kube.trusted-managers %q: an empty manager name", strings.Join(o.TrustedManagers, ","))
		}
	}
	return nil
}

// sliceObject is all the slice informer keeps of an EndpointSlice, made by its transform: the
// metadata the informer's store and the relist bookkeeping read, and the parsed endpoints. The
// tracker holds the same entry, so each endpoint is kept once, in the form the probe reads.
//
// seen is when the watch event (or list) that brought it arrived: transforms run in the
// informer's reflector goroutine as each event is received, before the informer's queue, so a
// handler held up downstream (a busy collector) does not make the next changes late.
type sliceObject struct {
	metav1.TypeMeta
	metav1.ObjectMeta
	seen time.Time
	// entry is nil for a slice the probe does not track (FQDN, not selected, no Service); errs
	// are the input errors found parsing it. Neither changes after the transform.
	entry *sliceEntry
	errs  []error
}

// DeepCopyObject implements runtime.Object; the parsed entry is never changed, so it is shared.
func (o *sliceObject) DeepCopyObject() runtime.Object {
	c := *o
	o.ObjectMeta.DeepCopyInto(&c.ObjectMeta)
	return &c
}

// sliceTransform turns the informer's EndpointSlices into sliceObjects. An object that is one
// already (the informer may hand it back) is returned as it is.
type sliceTransform struct {
	selector labels.Selector
	trusted  []string
	clock    clock.PassiveClock
}

func newSliceTransform(o Options, clk clock.PassiveClock) (*sliceTransform, error) {
	sel, err := labels.Parse(o.SliceSelector)
	if err != nil {
		return nil, err
	}
	return &sliceTransform{selector: sel, trusted: o.TrustedManagers, clock: clk}, nil
}

func (t *sliceTransform) transform(obj any) (any, error) {
	s, ok := obj.(*discoveryv1.EndpointSlice)
	if !ok {
		return obj, nil
	}
	o := &sliceObject{ObjectMeta: metav1.ObjectMeta{Namespace: intern(s.Namespace), Name: s.Name, ResourceVersion: s.ResourceVersion}, seen: t.clock.Now()}
	// The server selects too; this guards against one (or a fake) that does not.
	if t.selector.Matches(labels.Set(s.Labels)) {
		o.entry, o.errs = parseSlice(s, slices.Contains(t.trusted, s.Labels[discoveryv1.LabelManagedBy]))
	}
	return o, nil
}

// podObject is a pod as the pod informer keeps it: without managed fields, with the moment its
// event arrived (as sliceObject's seen).
type podObject struct {
	*corev1.Pod
	seen time.Time
}

// podTransform makes podObjects of the informer's pods.
func podTransform(clk clock.PassiveClock) cache.TransformFunc {
	return func(obj any) (any, error) {
		pod, ok := obj.(*corev1.Pod)
		if !ok {
			return obj, nil
		}
		pod.SetManagedFields(nil)
		return &podObject{Pod: pod, seen: clk.Now()}, nil
	}
}
