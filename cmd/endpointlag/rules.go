package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/pflag"
	"k8s.io/utils/clock"

	"github.com/endpointlag/endpointlag/probes"
	"github.com/endpointlag/endpointlag/probes/iptables"
	"github.com/endpointlag/endpointlag/probes/ipvs"
	"github.com/endpointlag/endpointlag/probes/nftables"
)

const rulesUsage = `Usage: endpointlag inspect rules [flags]

Prints, for the network namespace it runs in (a node's, with hostNetwork), what each dataplane
probe reads from kube-proxy's rules: per Service and path, the endpoints new connections can
still reach. PATH "cluster" is traffic to the ClusterIP (kube-proxy's service-/local- chains,
KUBE-SVC-/KUBE-SVL-), "external" is NodePort, external-IP and load-balancer traffic (external-
chains, KUBE-EXT-/KUBE-FW-): with externalTrafficPolicy Local the two can differ. Compare with
"nft list table ip kube-proxy", "iptables-save -t nat" or "ipvsadm -Ln" (IPVS names no Services:
its rows are virtual servers). Needs CAP_NET_ADMIN.

Flags:
`

// RulesResponse is inspect rules' JSON: per probe, what the rules send each Service to.
type RulesResponse map[string][]probes.ServiceEndpoints

func runInspectRules(args []string, stdout, stderr io.Writer) int {
	fs := pflag.NewFlagSet("endpointlag inspect rules", pflag.ContinueOnError)
	fs.SetOutput(stderr)
	output := fs.StringP("output", "o", "table", "output format: table or json")
	timeout := fs.Duration("timeout", 30*time.Second, "how long reading the rules may take")
	fs.Usage = func() {
		fmt.Fprint(stderr, rulesUsage)
		fs.PrintDefaults()
	}
	if code, ok := parseFlags(fs, args, stderr); !ok {
		return code
	}
	if *output != "table" && *output != "json" {
		fmt.Fprintf(stderr, "endpointlag inspect rules: -o %q: use table or json\n", *output)
		return 2
	}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	resp := RulesResponse{}
	var failed []string
	nft, err := nftables.New(clock.RealClock{}, log).Snapshot()
	if err != nil {
		failed = append(failed, fmt.Sprintf("nftables: %v", err))
	}
	resp[nftables.Name] = nft
	ipt, err := iptables.New(iptables.Options{}, clock.RealClock{}, log).Snapshot(ctx)
	if err != nil {
		failed = append(failed, fmt.Sprintf("iptables: %v", err))
	}
	resp[iptables.Name] = ipt
	vs, err := ipvs.Snapshot()
	if err != nil {
		failed = append(failed, fmt.Sprintf("ipvs: %v", err))
	}
	resp[ipvs.Name] = vs
	for _, f := range failed {
		fmt.Fprintf(stderr, "warning: %s\n", f)
	}
	if *output == "json" {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(resp); err != nil {
			fmt.Fprintf(stderr, "endpointlag inspect rules: %v\n", err)
			return 1
		}
		return 0
	}
	tw := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "PROBE\tSERVICE\tPATH\tENDPOINTS")
	rows := 0
	for _, probe := range []string{nftables.Name, iptables.Name, ipvs.Name} {
		for _, se := range resp[probe] {
			svc := se.Service.String()
			if svc == "" {
				svc = "(" + se.Chain + ")"
			}
			eps := make([]string, len(se.Endpoints))
			for i, ep := range se.Endpoints {
				eps[i] = ep.String()
			}
			path := string(se.Path)
			if path == "" {
				path = "-"
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", probe, svc, path, strings.Join(eps, " "))
			rows++
		}
	}
	tw.Flush()
	if rows == 0 {
		fmt.Fprintln(stdout, "no kube-proxy rules in this network namespace (no table kube-proxy, no KUBE-SERVICES in the nat table, no IPVS virtual server)")
	}
	if len(failed) > 0 {
		return 1
	}
	return 0
}
