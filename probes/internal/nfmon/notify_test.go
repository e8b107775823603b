package nfmon_test

import (
	"fmt"
	"os/exec"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/endpointlag/endpointlag/probes/internal/nfmon"
	"github.com/endpointlag/endpointlag/probes/internal/probetest"
)

// The reference's socket filter passes one datagram per transaction, the generation's end, also
// after a transaction whose notifications take thousands of datagrams; the raw monitor, without
// the filter, sees every rule.
func TestNotificationsOnePerTransaction(t *testing.T) {
	ns, fd := probetest.Netns(t, "eltest-nfmon-", "nft")
	notes, err := nfmon.OpenNotifications(int(fd.Fd()))
	if err != nil {
		t.Fatal(err)
	}
	defer notes.Close()
	mon, err := nfmon.OpenRaw(int(fd.Fd()))
	if err != nil {
		t.Fatal(err)
	}
	defer mon.Close()

	var big strings.Builder
	big.WriteString("add table ip eltest\nadd chain ip eltest c\n")
	for i := range 3000 {
		fmt.Fprintf(&big, "add rule ip eltest c ip daddr 10.0.%d.%d counter accept comment \"rule %d\"\n", i/256, i%256, i)
	}
	for i, script := range []string{big.String(), "add chain ip eltest d\n", "delete table ip eltest\n"} {
		cmd := exec.Command("ip", "netns", "exec", ns, "nft", "-f", "-")
		cmd.Stdin = strings.NewReader(script)
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("transaction %d: %v: %s", i, err, out)
		}
	}
	for i := range 3 {
		select {
		case <-notes.Times:
		case <-time.After(10 * time.Second):
			t.Fatalf("notification %d of 3 did not come (err %v)", i+1, notes.Err())
		}
	}
	select {
	case at := <-notes.Times:
		t.Errorf("a fourth notification at %s", at)
	case <-time.After(200 * time.Millisecond):
	}
	rules, gens := 0, 0
	for gens < 3 {
		select {
		case gen := <-mon.Generations:
			if gen.Err != nil {
				t.Fatal(gen.Err)
			}
			for _, c := range gen.Changes {
				if c.Table == "eltest" && c.Exprs != nil {
					rules++
				}
			}
			if !gen.Partial {
				gens++
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("generation %d of 3 did not come", gens+1)
		}
	}
	if rules != 3000 {
		t.Errorf("the raw monitor saw %d new rules, want 3000", rules)
	}
}

// A monitor whose reader stopped taking generations, with its channel full, still ends its
// goroutine when closed, without anyone reading: nothing leaks at shutdown.
func TestRawMonitorEndsWhenClosedWhileFull(t *testing.T) {
	ns, fd := probetest.Netns(t, "eltest-nfmon-", "nft")
	before := runtime.NumGoroutine()
	mon, err := nfmon.OpenRaw(int(fd.Fd()))
	if err != nil {
		t.Fatal(err)
	}
	// More generations than the channel holds (64), none read.
	for i := range 100 {
		if out, err := exec.Command("ip", "netns", "exec", ns, "nft", fmt.Sprintf("add table ip eltest%d", i)).CombinedOutput(); err != nil {
			t.Fatalf("%v: %s", err, out)
		}
	}
	time.Sleep(100 * time.Millisecond) // the monitor has read what fits and blocks on the channel
	mon.Close()
	deadline := time.Now().Add(5 * time.Second)
	for runtime.NumGoroutine() > before {
		if time.Now().After(deadline) {
			t.Fatalf("%d goroutines after Close, %d before the monitor: its goroutine did not end", runtime.NumGoroutine(), before)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
