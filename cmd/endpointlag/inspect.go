package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/pflag"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/endpointlag/endpointlag/collector"
	"github.com/endpointlag/endpointlag/probes"
	"github.com/endpointlag/endpointlag/probes/kube"
)

const inspectUsage = `Usage: endpointlag inspect [flags]
       endpointlag inspect rules [flags]     (see endpointlag inspect rules --help)
       endpointlag inspect ingress [flags]   (see endpointlag inspect ingress --help)

Prints the terminating endpoints and each one's timeline so far, as a table or as JSON.

By default it asks a running daemon (its /api/v1/records): every stage that daemon saw, with the
lag since the pod's deletion (+N s, pods on the daemon's node) or since the daemon saw the slice
change (~N s). With --api it asks the Kubernetes API instead: the endpoints its EndpointSlices
list as terminating now, and their pods' deletion time as the API recorded it (1 s precision).

Flags:
`

type inspectOptions struct {
	daemon     string
	api        bool
	kubeconfig string
	namespace  string
	output     string
	timeout    time.Duration
	auth       clientAuth
}

func runInspect(args []string, stdout, stderr io.Writer) int {
	if len(args) > 0 {
		switch args[0] {
		case "rules":
			return runInspectRules(args[1:], stdout, stderr)
		case "ingress":
			return runInspectIngress(args[1:], stdout, stderr)
		}
	}
	fs := pflag.NewFlagSet("endpointlag inspect", pflag.ContinueOnError)
	fs.SetOutput(stderr)
	var o inspectOptions
	fs.StringVar(&o.daemon, "daemon", "http://127.0.0.1:9860", "base URL of the daemon to ask")
	fs.BoolVar(&o.api, "api", false, "ask the Kubernetes API instead of a daemon")
	fs.StringVar(&o.kubeconfig, "kubeconfig", defaultKubeconfig(), "kubeconfig for --api (default $KUBECONFIG, else ~/.kube/config)")
	fs.StringVarP(&o.namespace, "namespace", "n", "", "only this namespace (default all)")
	fs.StringVarP(&o.output, "output", "o", "table", "output format: table or json")
	fs.DurationVar(&o.timeout, "timeout", 10*time.Second, "how long to wait for an answer")
	o.auth.bind(fs, "", "the daemon")
	fs.Usage = func() {
		fmt.Fprint(stderr, inspectUsage)
		fs.PrintDefaults()
	}
	if code, ok := parseFlags(fs, args, stderr); !ok {
		return code
	}
	if o.output != "table" && o.output != "json" {
		fmt.Fprintf(stderr, "endpointlag inspect: -o %q: use table or json\n", o.output)
		return 2
	}
	if !o.api {
		if err := o.auth.validate(o.daemon); err != nil {
			fmt.Fprintf(stderr, "endpointlag inspect: %v\n", err)
			return 2
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), o.timeout)
	defer cancel()
	var (
		resp RecordsResponse
		err  error
	)
	if o.api {
		resp, err = recordsFromAPI(ctx, o, stderr)
	} else {
		resp, err = recordsFromDaemon(ctx, o.auth, o.daemon)
	}
	if err != nil {
		fmt.Fprintf(stderr, "endpointlag inspect: %v\n", err)
		return 1
	}
	if o.namespace != "" {
		resp.Records = slices.DeleteFunc(resp.Records, func(r collector.RecordView) bool { return r.Pod.Namespace != o.namespace })
	}
	if o.output == "json" {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(resp); err != nil {
			fmt.Fprintf(stderr, "endpointlag inspect: %v\n", err)
			return 1
		}
		return 0
	}
	writeTable(stdout, resp, time.Now())
	return 0
}

func defaultKubeconfig() string {
	if k := os.Getenv("KUBECONFIG"); k != "" {
		return k
	}
	return clientcmd.RecommendedHomeFile
}

func recordsFromDaemon(ctx context.Context, auth clientAuth, base string) (RecordsResponse, error) {
	var resp RecordsResponse
	client, err := auth.client()
	if err != nil {
		return resp, err
	}
	s := daemonServer
	s.unreachable = "asking the daemon: %w (is it running? --daemon sets its address, --api asks the API instead)"
	return resp, s.getJSON(ctx, client, base, "api/v1/records", &resp)
}

// recordsFromAPI builds timelines from what the API shows now: each terminating endpoint, and its
// pod's deletion time.
func recordsFromAPI(ctx context.Context, o inspectOptions, stderr io.Writer) (RecordsResponse, error) {
	resp := RecordsResponse{Node: "(api)"}
	cfg, err := restConfig(o.kubeconfig)
	if err != nil {
		return resp, err
	}
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return resp, err
	}
	list, err := client.DiscoveryV1().EndpointSlices(o.namespace).List(ctx, metav1.ListOptions{})
	if err != nil {
		return resp, fmt.Errorf("listing EndpointSlices: %w", err)
	}
	now := time.Now()
	eps, errs := kube.Terminating(list.Items)
	for _, err := range errs {
		fmt.Fprintf(stderr, "warning: %v\n", err)
	}
	type podInfo struct {
		t0   time.Time
		gone bool
	}
	pods := map[string]podInfo{}
	for _, ep := range eps {
		info, ok := pods[ep.Pod.UID]
		if !ok {
			pod, err := client.CoreV1().Pods(ep.Pod.Namespace).Get(ctx, ep.Pod.Name, metav1.GetOptions{})
			switch {
			case apierrors.IsNotFound(err):
				info.gone = true
			case err != nil:
				return resp, fmt.Errorf("getting pod %s: %w", ep.Pod, err)
			case string(pod.UID) != ep.Pod.UID:
				info.gone = true // the name now belongs to a successor
			default:
				info.t0 = kube.APIDeletionTime(pod)
			}
			pods[ep.Pod.UID] = info
		}
		rec := collector.RecordView{Pod: ep.Pod, Service: ep.Service, Endpoint: ep.Endpoint, Local: false}
		if !info.t0.IsZero() {
			t0 := info.t0
			rec.T0API = &t0
			rec.Stages = append(rec.Stages, collector.StageView{Stage: string(probes.StageDeleted), Source: "api", Time: t0, Precision: 1})
		}
		rec.Stages = append(rec.Stages, collector.StageView{Stage: string(probes.StageEndpointSlice), Source: "api", Time: now, Initial: true})
		if info.gone {
			rec.Stages = append(rec.Stages, collector.StageView{Stage: string(probes.StageGone), Source: "api", Time: now, Initial: true})
		}
		rec.Pending = []string{string(probes.StageEndpointSliceRemoved)}
		resp.Records = append(resp.Records, rec)
	}
	return resp, nil
}

// stageOrder puts the timeline's stages in the order they happen; stages it does not name come
// after endpointslice_removed, in order of first appearance.
var stageOrder = []string{string(probes.StageDeleted), string(probes.StageEndpointSlice), string(probes.StageEndpointSliceRemoved)}

// column names a stage's column: the stage, or stage/path for a path other than the ClusterIP's;
// the ingress stage has a column per proxy kind, ingress/<kind>.
func column(stage, path string) string {
	if path == "" || path == string(probes.PathCluster) {
		return stage
	}
	return stage + "/" + path
}

func stageColumn(s collector.StageView) string {
	if s.Stage == string(probes.StageIngress) {
		return column(s.Stage, s.Kind)
	}
	return column(s.Stage, s.Path)
}

// awaitedColumn names the column of an awaited entry: stage/path, or ingress@<instance>, whose
// instance name starts with its kind ("traefik:ns/pod", "haproxy=tcp://…").
func awaitedColumn(a string) string {
	if stage, instance, ok := strings.Cut(a, "@"); ok {
		return column(stage, instanceKind(instance))
	}
	stage, path, _ := strings.Cut(a, "/")
	return column(stage, path)
}

func instanceKind(instance string) string {
	if i := strings.IndexAny(instance, ":="); i >= 0 {
		return instance[:i]
	}
	return instance
}

func writeTable(w io.Writer, resp RecordsResponse, now time.Time) {
	if len(resp.Records) == 0 {
		fmt.Fprintf(w, "no terminating endpoints known to %s\n", resp.Node)
		return
	}
	cols := slices.Clone(stageOrder)
	add := func(c string) {
		if !slices.Contains(cols, c) && c != string(probes.StageGone) {
			cols = append(cols, c)
		}
	}
	for _, r := range resp.Records {
		for _, s := range r.Stages {
			add(stageColumn(s))
		}
		for _, a := range r.Awaited {
			add(awaitedColumn(a))
		}
		for _, s := range r.NotApplicable {
			add(s)
		}
	}
	// Ingress has a column per proxy kind; a bare one only when no record has any.
	if slices.ContainsFunc(cols, func(c string) bool { return strings.HasPrefix(c, string(probes.StageIngress)+"/") }) {
		cols = slices.DeleteFunc(cols, func(c string) bool { return c == string(probes.StageIngress) })
	}
	cols = append(cols, string(probes.StageGone))

	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	header := []string{"POD", "SERVICE", "ENDPOINT", "LOCAL"}
	for _, c := range cols {
		header = append(header, strings.ToUpper(c))
	}
	header = append(header, "PENDING", "CONNECTIONS")
	fmt.Fprintln(tw, strings.Join(header, "\t"))
	for _, r := range resp.Records {
		row := []string{r.Pod.String(), r.Service.String(), r.Endpoint.String(), yesNo(r.Local)}
		for _, c := range cols {
			row = append(row, stageCell(r, c))
		}
		pending := "-"
		if len(r.Pending) > 0 {
			pending = strings.Join(r.Pending, ",")
		}
		row = append(row, pending, connectionsCell(r))
		fmt.Fprintln(tw, strings.Join(row, "\t"))
	}
	tw.Flush()
	fmt.Fprintf(w, "\n%d endpoint(s) on %s at %s. +N: seconds since the pod's deletion; ~N: seconds since this\n"+
		"node saw the slice change; a clock time: seen, no reference; *: already so when first looked;\n"+
		"?: first seen on a re-read after a gap (watch relisted, kernel messages lost), not a lag sample;\n"+
		"!: removed after kube-proxy's fallback to it ended (no ready endpoint was left), not a lag sample;\n"+
		"held: kube-proxy still routes to it on purpose, no ready endpoint left (KEP-1669);\n"+
		"n/a: this node's rules never sent to it (node-local Service, topology, never ready): not awaited.\n"+
		"/external: NodePort, external and load-balancer IP traffic, apart from the ClusterIP's.\n"+
		"ingress/<kind>: the last of this node's proxy instances of that kind to stop sending it new\n"+
		"requests; (n/m): n of the m instances that routed to it have stopped.\n"+
		"CONNECTIONS: new connections that still reached the pod after T0 (late) or its address after it\n"+
		"was gone (dead), with the last one; -o json lists each with its client.\n",
		len(resp.Records), resp.Node, now.Format(time.TimeOnly))
}

func stageCell(r collector.RecordView, col string) string {
	if strings.HasPrefix(col, string(probes.StageIngress)+"/") {
		return ingressCell(r, col)
	}
	for _, s := range r.Stages {
		if stageColumn(s) != col {
			continue
		}
		return stageText(s)
	}
	stage, path, _ := strings.Cut(col, "/")
	if path == "" {
		path = string(probes.PathCluster)
	}
	switch {
	case slices.Contains(r.Held, stage+"/"+path):
		return "held"
	case slices.Contains(r.NotApplicable, stage):
		return "n/a"
	}
	return "-"
}

// ingressCell shows the ingress stage of one proxy kind: the last instance of that kind to stop
// routing to the endpoint, and how many of the awaited ones have; n/a when no instance of the
// kind routed to it.
func ingressCell(r collector.RecordView, col string) string {
	var last *collector.StageView
	removedAt := map[string]bool{}
	for i, s := range r.Stages {
		if stageColumn(s) != col {
			continue
		}
		removedAt[s.Source] = true
		if last == nil || s.Time.After(last.Time) {
			last = &r.Stages[i]
		}
	}
	awaited, arrived := 0, 0
	for _, a := range r.Awaited {
		if awaitedColumn(a) != col {
			continue
		}
		awaited++
		if _, instance, _ := strings.Cut(a, "@"); removedAt[instance] {
			arrived++
		}
	}
	count := ""
	if awaited > 1 || arrived < awaited {
		count = fmt.Sprintf("(%d/%d)", arrived, awaited)
	}
	switch {
	case last != nil:
		return stageText(*last) + count
	case awaited == 0:
		return "n/a"
	}
	return "-" + count
}

func stageText(s collector.StageView) string {
	mark := ""
	switch {
	case s.Initial:
		return "*"
	case s.Relist:
		mark = "?"
	case s.Fallback:
		mark = "!"
	}
	switch {
	case s.Propagation != nil:
		return fmt.Sprintf("+%.3fs%s", *s.Propagation, mark)
	case s.Programming != nil:
		return fmt.Sprintf("~%.3fs%s", *s.Programming, mark)
	}
	return s.Time.Local().Format("15:04:05.000") + mark
}

// connectionsCell counts a record's late and dead connections and says when the last came.
func connectionsCell(r collector.RecordView) string {
	if len(r.Connections) == 0 {
		return "-"
	}
	n := map[string]int{}
	last := r.Connections[0]
	for _, c := range r.Connections {
		n[c.Kind]++
		if c.Time.After(last.Time) {
			last = c
		}
	}
	var parts []string
	for _, k := range []string{"late", "dead"} {
		if n[k] > 0 {
			parts = append(parts, fmt.Sprintf("%d %s", n[k], k))
		}
	}
	at := last.Time.Local().Format("15:04:05.000")
	if r.T0 != nil {
		at = fmt.Sprintf("+%.3fs", last.Time.Sub(*r.T0).Seconds())
	}
	return fmt.Sprintf("%s, last %s from %s", strings.Join(parts, " "), at, last.Client)
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}
