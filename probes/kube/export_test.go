package kube

// SliceEvents is how many slice events p has handled, for tests that must know an update was
// seen before they move the clock on.
func SliceEvents(p *Probe) int64 { return p.sliceEvents.Load() }
