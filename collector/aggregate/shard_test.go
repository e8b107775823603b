package aggregate

import (
	"fmt"
	"testing"
)

// Pods spread evenly over the replicas, and a replica added or removed moves only the pods it
// gains or held.
func TestShard(t *testing.T) {
	const pods = 30000
	uid := func(i int) string { return fmt.Sprintf("6f1c2a9e-%04x-4b7d-9c3e-%012x", i%65536, i) }
	three := []string{"http://endpointlag-aggregate-0:9870", "http://endpointlag-aggregate-1:9870", "http://endpointlag-aggregate-2:9870"}
	four := append(append([]string(nil), three...), "http://endpointlag-aggregate-3:9870")
	per := make([]int, len(three))
	moved, movedElsewhere, gone := 0, 0, 0
	for i := range pods {
		a := Shard(uid(i), three)
		per[a]++
		if b := Shard(uid(i), four); b != a {
			moved++
			if b != 3 {
				movedElsewhere++
			}
		}
		// Replica 1 removed: only its pods move.
		if c := Shard(uid(i), []string{three[0], three[2]}); a != 1 && three[a] != []string{three[0], three[2]}[c] {
			gone++
		}
	}
	for i, n := range per {
		if share := float64(n) / pods; share < 0.31 || share > 0.36 {
			t.Errorf("replica %d holds %.1f %% of the pods, want a third", i, 100*share)
		}
	}
	if share := float64(moved) / pods; share < 0.22 || share > 0.28 || movedElsewhere > 0 {
		t.Errorf("adding a fourth replica moved %.1f %% of the pods (%d not to it); want a quarter, all to it", 100*share, movedElsewhere)
	}
	if gone > 0 {
		t.Errorf("removing replica 1 moved %d pods it did not hold", gone)
	}
	if Shard("x", nil) != -1 {
		t.Error("a replica picked among none")
	}
}
