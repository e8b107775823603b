package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
	"time"

	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/clientcmd"
)

// SliceEvent is one EndpointSlice event as watchSlices prints it, a JSON object per line.
type SliceEvent struct {
	// At is when this process's informer handler ran.
	At      time.Time `json:"at"`
	Service string    `json:"service"`
	Slice   string    `json:"slice"`
	// Change is the slice's namespace/name@resourceVersion, as the daemon's records name a
	// slice change.
	Change  string `json:"change"`
	Deleted bool   `json:"deleted,omitempty"`
	// Pods are the UIDs of the pods the slice lists, Terminating those listed terminating.
	Pods        []string `json:"pods"`
	Terminating []string `json:"terminating,omitempty"`
}

// watchSlices prints every EndpointSlice event of a namespace, stamped when it arrived, until
// SIGTERM or stdin closes. The e2e tests take it as their ground truth of slice changes: a process
// of its own, as each daemon is, so that the test process's own load does not delay it.
func watchSlices(args []string) error {
	fs := flag.NewFlagSet("lab watch-slices", flag.ContinueOnError)
	kubeconfig := fs.String("kubeconfig", "", "the lab's kubeconfig")
	namespace := fs.String("namespace", "", "the namespace whose slices to watch")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *kubeconfig == "" || *namespace == "" {
		return fmt.Errorf("--kubeconfig and --namespace are required")
	}
	rc, err := clientcmd.BuildConfigFromFlags("", *kubeconfig)
	if err != nil {
		return err
	}
	client, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		_, _ = io.Copy(io.Discard, os.Stdin)
		cancel()
	}()
	out := json.NewEncoder(os.Stdout)
	events := make(chan SliceEvent, 1024)
	note := func(obj any, deleted bool) {
		now := time.Now()
		if tomb, ok := obj.(cache.DeletedFinalStateUnknown); ok {
			obj, deleted = tomb.Obj, true
		}
		s, ok := obj.(*discoveryv1.EndpointSlice)
		if !ok {
			return
		}
		ev := SliceEvent{At: now, Service: s.Labels[discoveryv1.LabelServiceName], Slice: s.Name, Change: s.Namespace + "/" + s.Name + "@" + s.ResourceVersion,
			Deleted: deleted, Pods: []string{}}
		if !deleted {
			for _, ep := range s.Endpoints {
				if ep.TargetRef == nil {
					continue
				}
				ev.Pods = append(ev.Pods, string(ep.TargetRef.UID))
				if ep.Conditions.Terminating != nil && *ep.Conditions.Terminating {
					ev.Terminating = append(ev.Terminating, string(ep.TargetRef.UID))
				}
			}
		}
		events <- ev
	}
	f := informers.NewSharedInformerFactoryWithOptions(client, 0, informers.WithNamespace(*namespace))
	inf := f.Discovery().V1().EndpointSlices().Informer()
	if _, err := inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(o any) { note(o, false) },
		UpdateFunc: func(_, o any) { note(o, false) },
		DeleteFunc: func(o any) { note(o, true) },
	}); err != nil {
		return err
	}
	f.Start(ctx.Done())
	defer f.Shutdown()
	if !cache.WaitForCacheSync(ctx.Done(), inf.HasSynced) {
		return ctx.Err()
	}
	// The line that says the initial list is in: the caller waits for it.
	if err := out.Encode(SliceEvent{At: time.Now(), Pods: []string{}}); err != nil {
		return err
	}
	for {
		select {
		case <-ctx.Done():
			return nil
		case ev := <-events:
			if err := out.Encode(ev); err != nil {
				return err
			}
		}
	}
}
