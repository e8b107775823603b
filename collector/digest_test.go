package collector

import (
	"math/rand/v2"
	"net/netip"
	"testing"
	"time"

	"github.com/endpointlag/endpointlag/probes"
)

// Digests tell what views tell through every kind of change a record sees: random sequences of
// slice changes on two ports of each pod's address, dataplane removals on both paths, fallbacks
// and their ends, deletions, gone pods, connections to either port, a probe syncing late, going
// inactive and back, time passing and sweeps. checkDigests runs after every step.
func TestDigestsTellWhatViewsTell(t *testing.T) {
	for seed := range uint64(100) {
		rng := rand.New(rand.NewPCG(seed, 7))
		dp := newFakeDataplane()
		f := newFixture(t, Options{Stages: withDataplane, Probes: []string{"kube", "nftables", "packets"},
			StageProbe: map[probes.Stage]string{probes.StageNftables: "nftables", probes.StageEndpointSliceRemoved: "kube", probes.StageLateConnection: "packets"}})
		f.c.SetDataplane(probes.StageNftables, dp)
		for _, p := range []string{"kube", "nftables", "packets"} {
			// Half the runs start before the nftables probe read its rules: the records
			// started until then are undetermined for it.
			f.c.SetStatus(p, probes.Status{Up: true, Synced: p != "nftables" || seed%2 == 0})
		}
		ep := func(i, port int) probes.Endpoint {
			e := endpoint(i)
			e.Port = uint16(8080 + port)
			return e
		}
		for i := range 4 {
			for port := range 2 {
				dp.set(ep(i, port), clusterPath, localExt)
			}
		}
		for range 60 {
			i, port, now := rng.IntN(4), rng.IntN(2), f.clock.Now()
			local := i < 2
			o := obs(probes.StageEndpointSlice, i, now, local)
			o.Endpoint = ep(i, port)
			switch rng.IntN(10) {
			case 0:
				o.Serving = rng.IntN(2) == 0
				if o.Serving {
					o.Fallback = probes.Fallback{Cluster: rng.IntN(2) == 0, Local: rng.IntN(2) == 0}
				}
			case 1:
				o.Stage = probes.StageEndpointSliceRemoved
			case 2:
				o = dataplane(i, now)
				o.Endpoint = ep(i, port)
				if rng.IntN(2) == 0 {
					o.Path = probes.PathExternal
				}
			case 3:
				o.Stage, o.Fallback = probes.StageFallbackEnded, probes.Fallback{Cluster: rng.IntN(2) == 0, Local: rng.IntN(2) == 0}
			case 4:
				o = obs(probes.StageDeleted, i, now, local)
				o.Addrs = []netip.Addr{endpoint(i).Addr}
			case 5:
				o = obs(probes.StageGone, i, now, local)
			case 6:
				o = probes.Observation{Stage: probes.StageLateConnection, Time: now, Source: "packets", Endpoint: ep(i, port),
					Peer: netip.AddrPortFrom(netip.MustParseAddr("10.99.0.1"), uint16(40000+rng.IntN(100))), FromNode: rng.IntN(4) == 0}
			case 7:
				// The rules read, or not yet readable (the records started meanwhile stay
				// undetermined until a status report finds them readable).
				dp.mu.Lock()
				dp.synced = rng.IntN(3) > 0
				dp.mu.Unlock()
				f.c.SetStatus("nftables", probes.Status{Up: true, Synced: true, Inactive: rng.IntN(4) == 0})
				o.Stage = ""
			case 8:
				f.clock.Step(time.Duration(rng.IntN(5000)) * time.Millisecond)
				o.Stage = ""
			case 9:
				f.clock.Step(time.Duration(rng.IntN(20)) * time.Minute)
				f.c.Sweep()
				o.Stage = ""
			}
			if o.Stage != "" {
				f.c.Observe(o)
			}
			f.checkDigests()
			if t.Failed() {
				t.Fatalf("seed %d: the last observation: %+v", seed, o)
			}
		}
	}
}
