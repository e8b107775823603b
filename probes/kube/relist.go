package kube

import (
	"context"
	"sync"
	"time"

	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/tools/cache"
	"k8s.io/utils/clock"
)

// relists tells the changes an informer delivers from a relist — the list (or a watch's initial
// events) it makes again after its watch broke: an API server restart, a watch expired with 410
// Gone — from those a live watch delivers. A change first seen on a relist happened somewhere in
// the gap since the broken watch last delivered anything, not when the relist saw it.
//
// It wraps the informer's ListerWatcher: every object a relist returns is noted with its resource
// version, and the handler asks about each object it is given. The first list is not a relist
// (the handler's "initial list" flag covers it).
type relists struct {
	clock clock.PassiveClock

	mu    sync.Mutex
	lists int
	// last is when a list returned or a watch last delivered an event (a bookmark counts: the
	// stream was alive; an error does not); gap is what the last relist closed.
	last time.Time
	gap  time.Duration
	// listed holds the objects of the current relist, by namespace/name, with their resource
	// version and the gap the relist closes.
	listed map[string]listed
}

type listed struct {
	resourceVersion string
	gap             time.Duration
}

func newRelists(clk clock.PassiveClock) *relists {
	return &relists{clock: clk, last: clk.Now(), listed: map[string]listed{}}
}

// seen reports whether obj comes from a relist, and the gap it closes. A tombstone
// (DeletedFinalStateUnknown) always does: only a relist finds an object gone that way.
func (r *relists) seen(obj any) (bool, time.Duration) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if _, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		return true, r.gap
	}
	m, err := meta.Accessor(obj)
	if err != nil {
		return false, 0
	}
	key := m.GetNamespace() + "/" + m.GetName()
	l, ok := r.listed[key]
	if !ok || l.resourceVersion != m.GetResourceVersion() {
		return false, 0
	}
	delete(r.listed, key)
	return true, l.gap
}

// listing starts a list: after the first, a relist, whose objects are then noted.
func (r *relists) listing() (relist bool, gap time.Duration) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.lists++
	clear(r.listed)
	if r.lists == 1 {
		return false, 0
	}
	r.gap = r.clock.Since(r.last)
	return true, r.gap
}

func (r *relists) note(obj runtime.Object, gap time.Duration) {
	m, err := meta.Accessor(obj)
	if err != nil {
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.listed[m.GetNamespace()+"/"+m.GetName()] = listed{resourceVersion: m.GetResourceVersion(), gap: gap}
}

func (r *relists) alive() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.last = r.clock.Now()
}

// wrap returns lw noting what its relists return. client tells whether the API client supports
// watch-list (a watch that starts with the current state), as client-go's own informers ask.
func (r *relists) wrap(lw *cache.ListWatch, client any) cache.ListerWatcher {
	inner := cache.ToListWatcherWithWatchListSemantics(lw, client)
	return &noting{r: r, lw: cache.ToListerWatcherWithContext(inner), inner: inner}
}

type noting struct {
	r     *relists
	lw    cache.ListerWatcherWithContext
	inner cache.ListerWatcher
}

// IsWatchListSemanticsUnSupported passes on whether the client supports watch-list.
func (n *noting) IsWatchListSemanticsUnSupported() bool {
	u, ok := n.inner.(interface{ IsWatchListSemanticsUnSupported() bool })
	return ok && u.IsWatchListSemanticsUnSupported()
}

func (n *noting) List(opts metav1.ListOptions) (runtime.Object, error) {
	return n.ListWithContext(context.Background(), opts)
}

func (n *noting) Watch(opts metav1.ListOptions) (watch.Interface, error) {
	return n.WatchWithContext(context.Background(), opts)
}

func (n *noting) ListWithContext(ctx context.Context, opts metav1.ListOptions) (runtime.Object, error) {
	relist, gap := n.r.listing()
	list, err := n.lw.ListWithContext(ctx, opts)
	if err != nil {
		return list, err
	}
	n.r.alive()
	if !relist {
		return list, nil
	}
	_ = meta.EachListItem(list, func(obj runtime.Object) error {
		n.r.note(obj, gap)
		return nil
	})
	return list, nil
}

func (n *noting) WatchWithContext(ctx context.Context, opts metav1.ListOptions) (watch.Interface, error) {
	initial := opts.SendInitialEvents != nil && *opts.SendInitialEvents
	relist, gap := false, time.Duration(0)
	if initial {
		// A watch that starts with the current state is a list (client-go's watch-list).
		relist, gap = n.r.listing()
	}
	w, err := n.lw.WatchWithContext(ctx, opts)
	if err != nil {
		return nil, err
	}
	return newNotingWatch(n.r, w, relist, gap), nil
}

// notingWatch passes a watch's events on, noting the objects of its initial events when they
// make a relist, and when the stream was last alive.
type notingWatch struct {
	inner watch.Interface
	out   chan watch.Event
	stop  chan struct{}
	once  sync.Once
}

func newNotingWatch(r *relists, inner watch.Interface, relist bool, gap time.Duration) *notingWatch {
	w := &notingWatch{inner: inner, out: make(chan watch.Event), stop: make(chan struct{})}
	go func() {
		defer close(w.out)
		initial := relist
		for ev := range inner.ResultChan() {
			if ev.Type != watch.Error {
				r.alive()
			}
			if initial {
				if ev.Type == watch.Bookmark {
					if m, err := meta.Accessor(ev.Object); err == nil && m.GetAnnotations()[metav1.InitialEventsAnnotationKey] == "true" {
						initial = false
					}
				} else if ev.Object != nil {
					r.note(ev.Object, gap)
				}
			}
			select {
			case w.out <- ev:
			case <-w.stop:
				return
			}
		}
	}()
	return w
}

func (w *notingWatch) Stop() {
	w.once.Do(func() { close(w.stop) })
	w.inner.Stop()
}

func (w *notingWatch) ResultChan() <-chan watch.Event { return w.out }
