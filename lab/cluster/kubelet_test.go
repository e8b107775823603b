package cluster

import (
	"encoding/json"
	"errors"
	"log/slog"
	"net/netip"
	"reflect"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/apimachinery/pkg/util/strategicpatch"

	"github.com/endpointlag/endpointlag/lab/pod"
)

func TestPreStopSeconds(t *testing.T) {
	for _, tc := range []struct {
		name string
		hook *corev1.LifecycleHandler
		want time.Duration
	}{
		{"none", nil, 0},
		{"sleep action", &corev1.LifecycleHandler{Sleep: &corev1.SleepAction{Seconds: 7}}, 7 * time.Second},
		{"exec sleep", &corev1.LifecycleHandler{Exec: &corev1.ExecAction{Command: []string{"sleep", "15"}}}, 15 * time.Second},
		{"exec sh -c", &corev1.LifecycleHandler{Exec: &corev1.ExecAction{Command: []string{"/bin/sh", "-c", "sleep 2.5"}}}, 2500 * time.Millisecond},
		{"exec other", &corev1.LifecycleHandler{Exec: &corev1.ExecAction{Command: []string{"nginx", "-s", "quit"}}}, 0},
	} {
		p := &corev1.Pod{Spec: corev1.PodSpec{Containers: []corev1.Container{{Name: "c"}}}}
		if tc.hook != nil {
			p.Spec.Containers[0].Lifecycle = &corev1.Lifecycle{PreStop: tc.hook}
		}
		if got := preStopSeconds(p); got != tc.want {
			t.Errorf("%s: %s, want %s", tc.name, got, tc.want)
		}
	}
}

func webContainer(probe *corev1.Probe) *corev1.Container {
	return &corev1.Container{
		Name:           "web",
		Ports:          []corev1.ContainerPort{{Name: "http", ContainerPort: 8080}, {Name: "admin", ContainerPort: 9090}},
		ReadinessProbe: probe,
	}
}

func TestReadinessProbe(t *testing.T) {
	httpProbe := func(port intstr.IntOrString) *corev1.Probe {
		return &corev1.Probe{ProbeHandler: corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: "/healthz", Port: port}}}
	}
	for _, tc := range []struct {
		name    string
		probe   *corev1.Probe
		want    *probeSpec
		wantErr string
	}{
		{"none", nil, nil, ""},
		{"httpGet by name, the kubelet's defaults", httpProbe(intstr.FromString("admin")),
			&probeSpec{container: "web", http: &httpGet{scheme: "http", path: "/healthz"}, port: 9090,
				period: 10 * time.Second, timeout: time.Second, success: 1, failure: 3}, ""},
		{"httpGet by number, the probe's own numbers", &corev1.Probe{
			ProbeHandler:        corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Port: intstr.FromInt32(8080), Scheme: corev1.URISchemeHTTPS, Host: "example.test"}},
			InitialDelaySeconds: 3, PeriodSeconds: 1, TimeoutSeconds: 2, SuccessThreshold: 2, FailureThreshold: 1,
		}, &probeSpec{container: "web", http: &httpGet{scheme: "https", host: "example.test"}, port: 8080,
			initialDelay: 3 * time.Second, period: time.Second, timeout: 2 * time.Second, success: 2, failure: 1}, ""},
		{"tcpSocket by name", &corev1.Probe{ProbeHandler: corev1.ProbeHandler{TCPSocket: &corev1.TCPSocketAction{Port: intstr.FromString("http")}}, PeriodSeconds: 5},
			&probeSpec{container: "web", port: 8080, period: 5 * time.Second, timeout: time.Second, success: 1, failure: 3}, ""},
		{"a port name the container lacks", httpProbe(intstr.FromString("metrics")), nil, `port "metrics" is not among the container's ports`},
		{"a port number out of range", httpProbe(intstr.FromInt32(70000)), nil, "port 70000 is not a port number"},
		{"an odd scheme", &corev1.Probe{ProbeHandler: corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Port: intstr.FromInt32(8080), Scheme: "FTP"}}}, nil, `scheme "FTP"`},
		{"exec", &corev1.Probe{ProbeHandler: corev1.ProbeHandler{Exec: &corev1.ExecAction{Command: []string{"true"}}}}, nil, errUnsupportedProbe.Error()},
	} {
		got, err := readinessProbe(webContainer(tc.probe))
		switch {
		case tc.wantErr != "":
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) || !strings.Contains(err.Error(), "container web") {
				t.Errorf("%s: error %v, want one naming container web and saying %q", tc.name, err, tc.wantErr)
			}
		case err != nil:
			t.Errorf("%s: %v", tc.name, err)
		case tc.want == nil && got != nil:
			t.Errorf("%s: %+v, want no probe", tc.name, got)
		case tc.want != nil:
			if got.http != nil && len(got.http.header) == 0 {
				got.http.header = nil
			}
			if !reflect.DeepEqual(got, tc.want) {
				t.Errorf("%s: %+v (http %+v), want %+v (http %+v)", tc.name, *got, got.http, *tc.want, tc.want.http)
			}
		}
	}
	if _, err := readinessProbe(webContainer(&corev1.Probe{ProbeHandler: corev1.ProbeHandler{GRPC: &corev1.GRPCAction{Port: 8080}}})); !errors.Is(err, errUnsupportedProbe) {
		t.Errorf("grpc probe: %v, want errUnsupportedProbe", err)
	}
}

func TestProbeRequest(t *testing.T) {
	c := webContainer(&corev1.Probe{ProbeHandler: corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{
		Path: "/ready?full=1", Port: intstr.FromString("http"),
		HTTPHeaders: []corev1.HTTPHeader{{Name: "Host", Value: "web.local"}, {Name: "X-Probe", Value: "yes"}},
	}}})
	spec, err := readinessProbe(c)
	if err != nil {
		t.Fatal(err)
	}
	p := newProber(spec, netip.MustParseAddr("10.244.1.7"), "elab-n1", "kube-probe/1.37")
	req, err := p.request(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if got := req.URL.String(); got != "http://10.244.1.7:8080/ready?full=1" {
		t.Errorf("URL %s", got)
	}
	if req.Host != "web.local" || req.UserAgent() != "kube-probe/1.37" || req.Header.Get("Accept") != "*/*" || req.Header.Get("X-Probe") != "yes" {
		t.Errorf("host %q, headers %v", req.Host, req.Header)
	}
}

func TestStreak(t *testing.T) {
	for _, tc := range []struct {
		name             string
		success, failure int
		results          string // s: success, f: failure
		want             string // at each result: - undecided, R ready, U unready
	}{
		{"thresholds of 1 decide every result", 1, 1, "sffs", "RUUR"},
		{"three failures in a row", 1, 3, "sffsfff", "R--R--U"},
		{"two successes in a row", 2, 1, "sfssf", "-U-RU"},
	} {
		s := streak{success: tc.success, failure: tc.failure}
		var got strings.Builder
		for _, r := range tc.results {
			ok := r == 's'
			switch {
			case !s.observe(ok):
				got.WriteByte('-')
			case ok:
				got.WriteByte('R')
			default:
				got.WriteByte('U')
			}
		}
		if got.String() != tc.want {
			t.Errorf("%s: %s gives %s, want %s", tc.name, tc.results, got.String(), tc.want)
		}
	}
}

func TestParsePodOptions(t *testing.T) {
	for _, tc := range []struct {
		name    string
		ann     map[string]string
		want    podOptions
		wantErr []string
	}{
		{"none", nil, podOptions{}, nil},
		{"all", map[string]string{OnSIGTERM: "drain-unready=3s", ExitAfter: "2s", ExitCode: "3", PodIP: "10.244.1.7"},
			podOptions{onSIGTERM: pod.OnSIGTERM{Drain: 3 * time.Second, Unready: true}, exitAfter: 2 * time.Second, exitCode: 3, ip: netip.MustParseAddr("10.244.1.7")}, nil},
		{"every mistake named", map[string]string{OnSIGTERM: "linger", ExitAfter: "soon", ExitCode: "300", PodIP: "fe80::1"}, podOptions{},
			[]string{OnSIGTERM + `: "linger"`, ExitAfter + `: "soon"`, ExitCode + `: "300"`, PodIP + `: "fe80::1"`}},
		{"an exit code alone", map[string]string{ExitCode: "1"}, podOptions{}, []string{ExitCode + " needs " + ExitAfter}},
	} {
		got, err := parsePodOptions(tc.ann)
		if len(tc.wantErr) == 0 {
			if err != nil || got != tc.want {
				t.Errorf("%s: %+v, %v; want %+v", tc.name, got, err, tc.want)
			}
			continue
		}
		for _, w := range tc.wantErr {
			if err == nil || !strings.Contains(err.Error(), w) {
				t.Errorf("%s: error %v lacks %q", tc.name, err, w)
			}
		}
	}
}

func TestServeArgs(t *testing.T) {
	p := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "web-1"}, Spec: corev1.PodSpec{Containers: []corev1.Container{
		{Name: "web", Ports: []corev1.ContainerPort{{ContainerPort: 8080}, {ContainerPort: 53, Protocol: corev1.ProtocolUDP}}},
		{Name: "side", Ports: []corev1.ContainerPort{{ContainerPort: 9090}, {ContainerPort: 8080}}},
	}}}
	o := podOptions{onSIGTERM: pod.OnSIGTERM{Drain: time.Second}, exitAfter: 2 * time.Second, exitCode: 1}
	want := "serve --name=web-1 --ports=8080,9090 --on-sigterm=drain=1s --exit-after=2s --exit-code=1"
	if got := strings.Join(o.serveArgs(p), " "); got != want {
		t.Errorf("serve args %q, want %q", got, want)
	}
	if got := servePorts(&corev1.Pod{Spec: corev1.PodSpec{Containers: []corev1.Container{{Name: "web"}}}}); len(got) != 1 || got[0] != 8080 {
		t.Errorf("ports of a pod declaring none: %v, want [8080]", got)
	}
}

func TestRestarts(t *testing.T) {
	for _, tc := range []struct {
		policy corev1.RestartPolicy
		code   int32
		want   bool
	}{
		{corev1.RestartPolicyAlways, 0, true},
		{"", 1, true},
		{corev1.RestartPolicyOnFailure, 0, false},
		{corev1.RestartPolicyOnFailure, 137, true},
		{corev1.RestartPolicyNever, 1, false},
	} {
		if got := restarts(tc.policy, tc.code); got != tc.want {
			t.Errorf("restartPolicy %q, exit code %d: restart %t, want %t", tc.policy, tc.code, got, tc.want)
		}
	}
	for runs, want := range map[int32]time.Duration{1: 0, 2: 10 * time.Second, 3: 20 * time.Second, 6: 160 * time.Second, 7: 5 * time.Minute, 30: 5 * time.Minute} {
		if got := restartDelay(runs); got != want {
			t.Errorf("after %d runs: back-off %s, want %s", runs, got, want)
		}
	}
}

func TestPodStatus(t *testing.T) {
	p := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{UID: "u1"},
		Spec: corev1.PodSpec{
			Containers:     []corev1.Container{{Name: "web", Image: "lab/web"}, {Name: "side", Image: "lab/side"}},
			ReadinessGates: []corev1.PodReadinessGate{{ConditionType: "example.test/lb"}},
		},
		Status: corev1.PodStatus{Conditions: []corev1.PodCondition{
			{Type: corev1.PodScheduled, Status: corev1.ConditionTrue},
			{Type: "example.test/lb", Status: corev1.ConditionTrue},
		}},
	}
	host := netip.MustParseAddr("10.99.0.11")
	t0 := time.Date(2026, 11, 29, 10, 0, 0, 0, time.UTC)
	s := newPodState()
	s.probeReady["web"] = false
	s.ip, s.sandbox = netip.MustParseAddr("10.244.1.7"), true
	s.start(4242, t0)

	st := p.Status.DeepCopy()
	s.apply(st, p, host, t0)
	if st.Phase != corev1.PodRunning || st.PodIP != "10.244.1.7" || st.HostIP != "10.99.0.11" || st.StartTime == nil {
		t.Errorf("running: %+v", st)
	}
	if c := cond(st, corev1.PodReady); c.Status != corev1.ConditionFalse || c.Message != "containers with unready status: [web]" {
		t.Errorf("Ready before web's probe succeeded: %+v", c)
	}
	if !st.ContainerStatuses[1].Ready || st.ContainerStatuses[0].Ready || st.ContainerStatuses[0].State.Running == nil || st.ContainerStatuses[0].ContainerID != "lab://4242" {
		t.Errorf("container statuses %+v", st.ContainerStatuses)
	}

	s.probeReady["web"] = true
	st1 := st.DeepCopy()
	s.apply(st1, p, host, t0.Add(time.Second))
	if c := cond(st1, corev1.PodReady); c.Status != corev1.ConditionTrue || !c.LastTransitionTime.Time.Equal(t0.Add(time.Second)) {
		t.Errorf("Ready once the probe succeeded: %+v", c)
	}
	if c := cond(st1, corev1.PodScheduled); c.Status != corev1.ConditionTrue {
		t.Errorf("the kubelet touched PodScheduled: %+v", c)
	}
	patch, unchanged, err := statusPatch("u1", *st, *st1)
	if err != nil || unchanged {
		t.Fatalf("patch %s, unchanged %t, %v", patch, unchanged, err)
	}

	p.Status.Conditions[1].Status = corev1.ConditionFalse
	st2 := st1.DeepCopy()
	st2.Conditions[1].Status = corev1.ConditionFalse
	s.apply(st2, p, host, t0.Add(2*time.Second))
	if c := cond(st2, corev1.PodReady); c.Status != corev1.ConditionFalse || c.Reason != "ReadinessGatesNotReady" {
		t.Errorf("Ready with a readiness gate False: %+v", c)
	}
	if c := cond(st2, corev1.ContainersReady); c.Status != corev1.ConditionTrue {
		t.Errorf("ContainersReady with a readiness gate False: %+v", c)
	}

	s.exit(3, t0.Add(3*time.Second))
	s.sandbox = false
	s.finish()
	st3 := st1.DeepCopy()
	s.apply(st3, p, host, t0.Add(3*time.Second))
	term := st3.ContainerStatuses[0].State.Terminated
	if st3.Phase != corev1.PodFailed || term == nil || term.ExitCode != 3 || term.Reason != "Error" || st3.ContainerStatuses[0].State.Running != nil {
		t.Errorf("after exit code 3: phase %s, state %+v", st3.Phase, st3.ContainerStatuses[0].State)
	}
	if st3.PodIP != "10.244.1.7" {
		t.Errorf("podIP %q after the sandbox is gone, want it kept", st3.PodIP)
	}
	if c := cond(st3, corev1.PodReady); c.Status != corev1.ConditionFalse || c.Reason != "PodCompleted" {
		t.Errorf("Ready of a finished pod: %+v", c)
	}
	if c := cond(st3, corev1.PodReadyToStartContainers); c.Status != corev1.ConditionFalse {
		t.Errorf("PodReadyToStartContainers without a sandbox: %+v", c)
	}
	// The API server applying the patch from running to terminated must end up with the
	// terminated state alone, and check the UID.
	patch, _, err = statusPatch("u1", *st1, *st3)
	if err != nil || !strings.Contains(string(patch), `"metadata":{"uid":"u1"}`) {
		t.Fatalf("patch %s, %v", patch, err)
	}
	before, _ := json.Marshal(corev1.Pod{Status: *st1})
	after, err := strategicpatch.StrategicMergePatch(before, patch, corev1.Pod{})
	if err != nil {
		t.Fatal(err)
	}
	var patched corev1.Pod
	if err := json.Unmarshal(after, &patched); err != nil {
		t.Fatal(err)
	}
	if cs := patched.Status.ContainerStatuses[0]; cs.State.Running != nil || cs.State.Terminated == nil || patched.Status.Phase != corev1.PodFailed || len(patched.Status.Conditions) != 6 {
		t.Errorf("patched status: phase %s, conditions %d, state %+v", patched.Status.Phase, len(patched.Status.Conditions), cs.State)
	}
	if _, unchanged, _ := statusPatch("u1", *st3, *st3); !unchanged {
		t.Error("the same status twice is a change")
	}
}

func cond(st *corev1.PodStatus, t corev1.PodConditionType) corev1.PodCondition {
	for _, c := range st.Conditions {
		if c.Type == t {
			return c
		}
	}
	return corev1.PodCondition{}
}

func TestRestartState(t *testing.T) {
	t0 := time.Date(2026, 11, 29, 10, 0, 0, 0, time.UTC)
	s := newPodState()
	s.start(1, t0)
	s.exit(1, t0.Add(time.Second))
	s.backOff("back-off 10s restarting failed container")
	p := &corev1.Pod{Spec: corev1.PodSpec{Containers: []corev1.Container{{Name: "web"}}}}
	var st corev1.PodStatus
	s.apply(&st, p, netip.MustParseAddr("10.99.0.11"), t0.Add(2*time.Second))
	cs := st.ContainerStatuses[0]
	if cs.State.Waiting == nil || cs.State.Waiting.Reason != "CrashLoopBackOff" || cs.LastTerminationState.Terminated == nil || cs.RestartCount != 0 || st.Phase != corev1.PodRunning {
		t.Errorf("in back-off: phase %s, %+v", st.Phase, cs)
	}
	s.start(2, t0.Add(12*time.Second))
	st = corev1.PodStatus{}
	s.apply(&st, p, netip.MustParseAddr("10.99.0.11"), t0.Add(12*time.Second))
	if cs := st.ContainerStatuses[0]; cs.State.Running == nil || cs.RestartCount != 1 || cs.LastTerminationState.Terminated.ExitCode != 1 || !cs.Ready {
		t.Errorf("restarted: %+v", cs)
	}
}

func TestAllocate(t *testing.T) {
	k := newKubelet("node1", 1, nil, nil, "", nil, "", slog.New(slog.DiscardHandler))
	first, _, err := k.allocate("u1", netip.Addr{})
	if err != nil || first != netip.MustParseAddr("10.244.1.2") {
		t.Fatalf("first address %s, %v", first, err)
	}
	want := netip.MustParseAddr("10.244.1.7")
	if got, _, err := k.allocate("u2", want); err != nil || got != want {
		t.Errorf("requested %s: got %s, %v", want, got, err)
	}
	for _, tc := range []struct{ ip, err string }{
		{"10.244.1.7", "is in use on node node1"},
		{"10.244.2.7", "is not a pod address of node node1, whose pod CIDR is 10.244.1.0/24"},
		{"10.244.1.255", "is not a pod address"},
		{"10.244.1.0", "is not a pod address"},
	} {
		if _, _, err := k.allocate("u3", netip.MustParseAddr(tc.ip)); err == nil || !strings.Contains(err.Error(), tc.err) {
			t.Errorf("requesting %s: %v, want %q", tc.ip, err, tc.err)
		}
	}
	if ip, ok := k.podIP("u2"); !ok || ip != want {
		t.Errorf("podIP(u2) = %s, %t", ip, ok)
	}
	k.mu.Lock()
	delete(k.inUse, want)
	k.mu.Unlock()
	if got, _, err := k.allocate("u4", want); err != nil || got != want {
		t.Errorf("a released address asked for again: %s, %v", got, err)
	}
}

func TestBinderOwner(t *testing.T) {
	b := &binder{nodes: []*Node{{Name: "node1", PodCIDR: podCIDR(1)}, {Name: "node2", PodCIDR: podCIDR(2)}}}
	for ip, want := range map[string]string{"10.244.2.9": "node2", "10.244.7.9": "", "": "", "nonsense": ""} {
		p := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Annotations: map[string]string{PodIP: ip}}}
		if got := b.owner(p); got != want {
			t.Errorf("pod asking for %q: bound to %q, want %q", ip, got, want)
		}
	}
}

// A DaemonSet's pod is bound to the node its required node affinity names, nothing else is.
func TestRequiredNode(t *testing.T) {
	pinned := &corev1.Pod{Spec: corev1.PodSpec{Affinity: &corev1.Affinity{NodeAffinity: &corev1.NodeAffinity{
		RequiredDuringSchedulingIgnoredDuringExecution: &corev1.NodeSelector{NodeSelectorTerms: []corev1.NodeSelectorTerm{{
			MatchFields: []corev1.NodeSelectorRequirement{{Key: "metadata.name", Operator: corev1.NodeSelectorOpIn, Values: []string{"node2"}}},
		}}},
	}}}}
	if got := requiredNode(pinned); got != "node2" {
		t.Errorf("requiredNode(a DaemonSet's pod) = %q, want node2", got)
	}
	labels := &corev1.Pod{Spec: corev1.PodSpec{Affinity: &corev1.Affinity{NodeAffinity: &corev1.NodeAffinity{
		RequiredDuringSchedulingIgnoredDuringExecution: &corev1.NodeSelector{NodeSelectorTerms: []corev1.NodeSelectorTerm{{
			MatchExpressions: []corev1.NodeSelectorRequirement{{Key: "zone", Operator: corev1.NodeSelectorOpIn, Values: []string{"a"}}},
		}}},
	}}}}
	for name, p := range map[string]*corev1.Pod{"no affinity": {}, "a label affinity": labels} {
		if got := requiredNode(p); got != "" {
			t.Errorf("requiredNode(%s) = %q, want none", name, got)
		}
	}
}
