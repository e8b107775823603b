package nfmon_test

import (
	"fmt"
	"os/exec"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/endpointlag/endpointlag/probes/internal/nfmon"
	"github.com/endpointlag/endpointlag/probes/internal/probetest"
)

// BenchmarkSyncNotifications measures what one kube-proxy iptables-mode sync costs any reader of
// the nftables monitor: with 10,000 KUBE-SERVICES rules loaded, a restore that writes the chain
// whole again (as every sync does) notifies every rule deleted and added. Reported: the changes
// per sync, and the time the raw monitor takes from handing over the first part of the
// generation to its end, over 5 syncs (median and slowest).
//
// Run: sudo go test ./probes/internal/nfmon -run '^$' -bench SyncNotifications -benchtime 1x
func BenchmarkSyncNotifications(b *testing.B) {
	const services, syncs = 10000, 5
	ns, fd := probetest.Netns(b, "eltest-nfmon-bench-", "iptables-nft-restore")
	var rules strings.Builder
	rules.WriteString("*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n")
	for i := range services {
		fmt.Fprintf(&rules, "-A KUBE-SERVICES -d 10.96.%d.%d/32 -p tcp -m comment --comment \"bench/svc-%d:http cluster IP\" -m tcp --dport 80 -j KUBE-MARK-MASQ\n", i/256, i%256, i)
	}
	rules.WriteString("COMMIT\n")
	restore := func() error {
		cmd := exec.Command("ip", "netns", "exec", ns, "iptables-nft-restore", "--noflush")
		cmd.Stdin = strings.NewReader(rules.String())
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("iptables-nft-restore: %v: %s", err, out)
		}
		return nil
	}
	if err := restore(); err != nil {
		b.Fatal(err)
	}
	mon, err := nfmon.OpenRaw(int(fd.Fd()))
	if err != nil {
		b.Fatal(err)
	}
	defer mon.Close()
	var drains []time.Duration
	changes := 0
	for range syncs {
		done := make(chan error, 1)
		go func() { done <- restore() }()
		var first time.Time
		n := 0
		for gen := range mon.Generations {
			if gen.Err != nil {
				b.Fatal(gen.Err)
			}
			if first.IsZero() {
				first = time.Now()
			}
			n += len(gen.Changes)
			if !gen.Partial {
				break
			}
		}
		drains = append(drains, time.Since(first))
		changes = n
		if err := <-done; err != nil {
			b.Fatal(err)
		}
	}
	sort.Slice(drains, func(i, j int) bool { return drains[i] < drains[j] })
	b.ReportMetric(float64(changes), "changes/sync")
	b.ReportMetric(drains[len(drains)/2].Seconds()*1000, "drain-p50-ms")
	b.ReportMetric(drains[len(drains)-1].Seconds()*1000, "drain-max-ms")
	b.Logf("%d services: %d changes per sync; first part → generation end %v", services, changes, drains)
}
