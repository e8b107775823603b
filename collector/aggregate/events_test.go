package aggregate

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"
)

// A termination that outlasts its workload's preStop posts a Warning Event on the workload, at
// most one per workload per interval; one within its preStop posts none. Only creates are made.
func TestEventsOnWorkloads(t *testing.T) {
	a, clk, reg := newTest(t, DefaultOptions())
	client := fake.NewClientset()
	ev := NewEventer(client, 10*time.Minute, clk, slog.New(slog.DiscardHandler))
	a.SetEventer(ev)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go ev.Run(ctx)
	push(t, a, "node1")
	push(t, a, "node2")
	events := func() []corev1.Event {
		l, err := client.CoreV1().Events("shop").List(context.Background(), metav1.ListOptions{})
		if err != nil {
			t.Fatal(err)
		}
		return l.Items
	}
	wait := func(n int) {
		t.Helper()
		deadline := time.Now().Add(5 * time.Second)
		for len(events()) != n && time.Now().Before(deadline) {
			time.Sleep(5 * time.Millisecond)
		}
		if got := len(events()); got != n {
			t.Fatalf("%d Events, want %d", got, n)
		}
	}
	for i, conv := range []float64{1.5, 2.4, 3.1} { // preStop 2 s: the first is within it
		h, r := podRecords(fmt.Sprint("u", i), "web", 2, conv)
		push(t, a, "node1", h)
		push(t, a, "node2", r)
	}
	wait(1)
	e := events()[0]
	if e.InvolvedObject.Kind != "Deployment" || e.InvolvedObject.Name != "web" || e.InvolvedObject.APIVersion != "apps/v1" ||
		e.Reason != ReasonOutlastedPreStop || e.Type != corev1.EventTypeWarning || !strings.Contains(e.Message, "web-u1") || !strings.Contains(e.Message, "2.40s") {
		t.Errorf("Event %+v", e)
	}
	t.Logf("Event: %s: %s", e.Reason, e.Message)
	if got := count(t, reg, "endpointlag_events_total", "outcome=rate_limited"); got != 1 {
		t.Errorf("rate-limited Events: %v, want 1 (the third pod's)", got)
	}
	clk.Step(11 * time.Minute)
	push(t, a, "node1")
	push(t, a, "node2")
	h, r := podRecords("u9", "web", 2, 2.2)
	push(t, a, "node1", h)
	push(t, a, "node2", r)
	wait(2)
	for _, act := range client.Actions() {
		if act.GetVerb() != "create" && act.GetVerb() != "list" {
			t.Errorf("the eventer made a %s request; RBAC grants it events: create only", act.GetVerb())
		}
	}
}
