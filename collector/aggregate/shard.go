package aggregate

import "hash/fnv"

// Shard picks, among aggregator replicas, the one that holds a pod: rendezvous hashing of the pod
// UID with each replica's name (highest random weight). Every daemon picks the same replica for a
// pod without talking to the others, and adding or removing a replica moves only the pods it gains
// or held. It returns -1 for no replica.
func Shard(uid string, replicas []string) int {
	best, bestW := -1, uint64(0)
	for i, r := range replicas {
		h := fnv.New64a()
		h.Write([]byte(r))
		h.Write([]byte{0})
		h.Write([]byte(uid))
		if w := mix(h.Sum64()); best < 0 || w > bestW {
			best, bestW = i, w
		}
	}
	return best
}

// mix spreads FNV's output over all 64 bits (the finalizer of SplitMix64), so that replicas whose
// names differ in one character do not weigh alike.
func mix(x uint64) uint64 {
	x ^= x >> 30
	x *= 0xbf58476d1ce4e5b9
	x ^= x >> 27
	x *= 0x94d049bb133111eb
	x ^= x >> 31
	return x
}
