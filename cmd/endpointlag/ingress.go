package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/pflag"

	"github.com/endpointlag/endpointlag/probes/ingress"
)

const ingressUsage = `Usage: endpointlag inspect ingress [flags]

Prints the ingress and gateway proxy instances a running daemon reads for the ingress stage (its
/api/v1/ingress): each instance's kind, admin address, when it was last read and whether that
worked, and how many of its backends' servers take new requests. With -o wide, one row per server:
the backend, the Service it stands for, the endpoint, and the proxy's own word for a server that
takes none (fenced, DRAINING, MAINT, …). A daemon reads the pods of its node annotated
endpointlag.dev/proxy=<kind> and the instances of its --ingress.instances flag.

Flags:
`

func runInspectIngress(args []string, stdout, stderr io.Writer) int {
	fs := pflag.NewFlagSet("endpointlag inspect ingress", pflag.ContinueOnError)
	fs.SetOutput(stderr)
	daemon := fs.String("daemon", "http://127.0.0.1:9860", "base URL of the daemon to ask")
	output := fs.StringP("output", "o", "table", "output format: table, wide (one row per server) or json")
	service := fs.String("service", "", "only the backends of this Service (namespace/name)")
	timeout := fs.Duration("timeout", 10*time.Second, "how long to wait for an answer")
	var auth clientAuth
	auth.bind(fs, "", "the daemon")
	fs.Usage = func() {
		fmt.Fprint(stderr, ingressUsage)
		fs.PrintDefaults()
	}
	if code, ok := parseFlags(fs, args, stderr); !ok {
		return code
	}
	if *output != "table" && *output != "wide" && *output != "json" {
		fmt.Fprintf(stderr, "endpointlag inspect ingress: -o %q: use table, wide or json\n", *output)
		return 2
	}
	if *service != "" && strings.Count(*service, "/") != 1 {
		fmt.Fprintf(stderr, "endpointlag inspect ingress: --service %q: use namespace/name\n", *service)
		return 2
	}
	if err := auth.validate(*daemon); err != nil {
		fmt.Fprintf(stderr, "endpointlag inspect ingress: %v\n", err)
		return 2
	}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	resp, err := ingressFromDaemon(ctx, auth, *daemon)
	if err != nil {
		fmt.Fprintf(stderr, "endpointlag inspect ingress: %v\n", err)
		return 1
	}
	if *service != "" {
		for i := range resp.Instances {
			var keep []ingress.Backend
			for _, b := range resp.Instances[i].Backends {
				if b.Service.String() == *service {
					keep = append(keep, b)
				}
			}
			resp.Instances[i].Backends = keep
		}
	}
	switch *output {
	case "json":
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(resp); err != nil {
			fmt.Fprintf(stderr, "endpointlag inspect ingress: %v\n", err)
			return 1
		}
	case "wide":
		writeIngressServers(stdout, resp)
	default:
		writeIngressInstances(stdout, resp, time.Now())
	}
	return 0
}

func ingressFromDaemon(ctx context.Context, auth clientAuth, base string) (IngressResponse, error) {
	var resp IngressResponse
	client, err := auth.client()
	if err != nil {
		return resp, err
	}
	return resp, daemonServer.getJSON(ctx, client, base, "api/v1/ingress", &resp)
}

func writeIngressInstances(w io.Writer, resp IngressResponse, now time.Time) {
	if len(resp.Instances) == 0 {
		fmt.Fprintf(w, "no proxy instance is read on %s: annotate proxy pods %s=<kind> or pass --ingress.instances\n", resp.Node, ingress.AnnotationProxy)
		return
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "INSTANCE\tKIND\tADDRESS\tLAST READ\tBACKENDS\tSERVERS\tTAKING NONE\tERROR")
	for _, in := range resp.Instances {
		servers, none := 0, 0
		for _, b := range in.Backends {
			for _, s := range b.Servers {
				servers++
				if !s.Routable {
					none++
				}
			}
		}
		last := "never"
		if !in.LastRead.IsZero() {
			last = fmt.Sprintf("%.3fs ago", now.Sub(in.LastRead).Seconds())
		}
		errText := "-"
		if in.Error != "" {
			errText = in.Error
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t%d\t%d\t%s\n", in.Name, in.Kind, in.Address, last, len(in.Backends), servers, none, errText)
	}
	tw.Flush()
	fmt.Fprintf(w, "\n%d instance(s) on %s. SERVERS: the upstreams of all backends; TAKING NONE: those the proxy\n"+
		"sends no new request to (their removal is the ingress stage); -o wide lists them.\n", len(resp.Instances), resp.Node)
}

func writeIngressServers(w io.Writer, resp IngressResponse) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "INSTANCE\tBACKEND\tSERVICE\tENDPOINT\tROUTABLE\tSTATE")
	for _, in := range resp.Instances {
		for _, b := range in.Backends {
			svc := "-"
			if b.Service.Name != "" {
				svc = b.Service.String()
			}
			for _, s := range b.Servers {
				state := "-"
				if s.State != "" {
					state = s.State
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", in.Name, b.Name, svc, s.Endpoint, yesNo(s.Routable), state)
			}
		}
	}
	tw.Flush()
}
