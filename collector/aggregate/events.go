package aggregate

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/utils/clock"
)

// ReasonOutlastedPreStop is the reason of the Events on a workload whose pods were still sent new
// connections, or reached a routing stage, after their declared preStop had ended.
const ReasonOutlastedPreStop = "TerminationOutlastedPreStop"

// Eventer posts Events on workloads, at most one per workload per Interval; only creates, so the
// aggregator's RBAC needs nothing more than events: create.
type Eventer struct {
	client   kubernetes.Interface
	interval time.Duration
	clock    clock.PassiveClock
	log      *slog.Logger

	mu     sync.Mutex
	last   map[workloadKey]time.Time
	queue  chan *corev1.Event
	posted map[string]uint64 // outcome → count, for the metric
}

// NewEventer returns an eventer that posts through client; Run sends what it queues.
func NewEventer(client kubernetes.Interface, interval time.Duration, clk clock.PassiveClock, log *slog.Logger) *Eventer {
	return &Eventer{client: client, interval: interval, clock: clk, log: log.With("component", "events"),
		last: map[workloadKey]time.Time{}, queue: make(chan *corev1.Event, 100), posted: map[string]uint64{}}
}

// apiVersions of the workload kinds an Event can name.
var apiVersions = map[string]string{"Deployment": "apps/v1", "StatefulSet": "apps/v1", "DaemonSet": "apps/v1", "ReplicaSet": "apps/v1", "Job": "batch/v1"}

// note queues an Event for a pod's termination that outlasted its workload's preStop, unless the
// workload had one within the interval. Called with the aggregator's lock held: it never blocks.
func (e *Eventer) note(c Convergence, all float64, late int) {
	d := c.Declared
	k := workloadKey{c.Pod.Namespace, d.Workload.Kind, d.Workload.Name}
	now := e.clock.Now()
	e.mu.Lock()
	defer e.mu.Unlock()
	if last, ok := e.last[k]; ok && now.Sub(last) < e.interval {
		e.posted["rate_limited"]++
		return
	}
	e.last[k] = now
	if len(e.last) > 10000 {
		for wk, t := range e.last {
			if now.Sub(t) >= e.interval {
				delete(e.last, wk)
			}
		}
	}
	var what []string
	if all > d.PreStopSeconds {
		last := ""
		if s, ok := c.stage(StageAll); ok {
			last = fmt.Sprintf(" (%s on %s)", s.Source, s.Node)
		}
		what = append(what, fmt.Sprintf("the last node or proxy stopped sending it new connections %.2fs after its deletion%s", all, last))
	}
	if late > 0 {
		what = append(what, fmt.Sprintf("%d new client connection(s) reached it after that", late))
	}
	ev := &corev1.Event{
		// Named as client-go's recorder names Events: the object and the time.
		ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("%s.%x", d.Workload.Name, now.UnixNano()), Namespace: c.Pod.Namespace},
		InvolvedObject: corev1.ObjectReference{Kind: d.Workload.Kind, Name: d.Workload.Name, Namespace: c.Pod.Namespace,
			APIVersion: apiVersions[d.Workload.Kind]},
		Reason: ReasonOutlastedPreStop,
		Message: fmt.Sprintf("pod %s outlasted its preStop of %gs: %s; endpointlag advise recommends a preStop from the p99 of such figures",
			c.Pod.Name, d.PreStopSeconds, strings.Join(what, "; ")),
		Type:           corev1.EventTypeWarning,
		Source:         corev1.EventSource{Component: "endpointlag-aggregate"},
		FirstTimestamp: metav1.NewTime(now), LastTimestamp: metav1.NewTime(now), Count: 1,
		ReportingController: "endpointlag.dev/aggregate", ReportingInstance: "endpointlag-aggregate",
	}
	select {
	case e.queue <- ev:
	default:
		e.posted["dropped"]++
	}
}

// Run posts the queued Events until ctx ends.
func (e *Eventer) Run(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case ev := <-e.queue:
			c, cancel := context.WithTimeout(ctx, 10*time.Second)
			_, err := e.client.CoreV1().Events(ev.Namespace).Create(c, ev, metav1.CreateOptions{})
			cancel()
			e.mu.Lock()
			if err != nil {
				e.posted["error"]++
				e.log.Warn("posting an Event failed", "workload", ev.InvolvedObject.Kind+"/"+ev.InvolvedObject.Namespace+"/"+ev.InvolvedObject.Name, "err", err)
			} else {
				e.posted["posted"]++
			}
			e.mu.Unlock()
		}
	}
}

func (e *Eventer) counts() map[string]uint64 {
	e.mu.Lock()
	defer e.mu.Unlock()
	out := map[string]uint64{}
	for _, k := range []string{"posted", "rate_limited", "dropped", "error"} {
		out[k] = e.posted[k]
	}
	return out
}
