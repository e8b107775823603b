package collector

import "github.com/endpointlag/endpointlag/probes"

// Why a terminating endpoint was not tracked: the label reason of records_dropped_total.
const (
	// dropMax: trusted records (or, for pod timelines, deleting pods) already filled MaxRecords.
	dropMax = "max"
	// dropUntrusted: records started by untrusted slices already filled MaxUntrustedRecords.
	dropUntrusted = "untrusted"
	// dropNamespace: the namespace already held MaxRecordsPerNamespace records.
	dropNamespace = "namespace"
)

var dropReasons = []string{dropMax, dropNamespace, dropUntrusted}

// budgets count the records held against the caps, kept as records start, change trust and
// expire, so that admitting one never scans the store.
//
// A record started by an untrusted observation (a slice no trusted controller manages: anyone
// allowed to write EndpointSlices in a namespace can make one up, with made-up pods) is held
// within MaxUntrustedRecords, and trusted records within MaxRecords: forged slices can fill only
// their own budget, never take a place a real termination needs. Both kinds count towards their
// namespace's MaxRecordsPerNamespace, so that one namespace's burst, forged or not, leaves room
// for the others. The pod timelines untrusted records start are held with them, apart from the
// MaxRecords that caps the other timelines (records.go, timeline).
type budgets struct {
	trusted, untrusted int
	// untrustedPods counts the pod timelines records of untrusted observations created (records.go,
	// timeline): MaxRecords caps the others.
	untrustedPods int
	// byNamespace counts the records of each namespace; a namespace without records has no entry.
	byNamespace map[string]int
}

// recordNamespace is the namespace a record counts towards: its Service's, which is the namespace
// of the EndpointSlice that started it. For the slices the endpointslice controller writes it is
// the pod's namespace too; a made-up slice may name pods of any namespace, but it can only be
// written in a namespace its writer may write to, and so can only crowd that one.
func recordNamespace(k recordKey) string {
	return k.service.Namespace
}

// admit tells whether a record that o would start fits its budgets, and if not, why.
func (c *Collector) admit(o probes.Observation, k recordKey) (reason string, ok bool) {
	switch {
	case o.Untrusted && c.budgets.untrusted >= c.opts.MaxUntrustedRecords:
		return dropUntrusted, false
	case !o.Untrusted && c.budgets.trusted >= c.opts.MaxRecords:
		return dropMax, false
	case c.opts.MaxRecordsPerNamespace > 0 && c.budgets.byNamespace[recordNamespace(k)] >= c.opts.MaxRecordsPerNamespace:
		return dropNamespace, false
	}
	return "", true
}

// hold counts a record that starts.
func (c *Collector) hold(r *record) {
	if r.untrusted {
		c.budgets.untrusted++
	} else {
		c.budgets.trusted++
	}
	c.budgets.byNamespace[recordNamespace(r.key)]++
}

// release uncounts a record that is removed.
func (c *Collector) release(r *record) {
	if r.untrusted {
		c.budgets.untrusted--
	} else {
		c.budgets.trusted--
	}
	ns := recordNamespace(r.key)
	if n := c.budgets.byNamespace[ns] - 1; n > 0 {
		c.budgets.byNamespace[ns] = n
	} else {
		delete(c.budgets.byNamespace, ns)
	}
}

// trust moves a record an untrusted observation started into the trusted budget, now that a
// trusted slice shows the same endpoint of the same pod terminating: the endpoint is real, and
// a forged slice that got there first must not leave it exposed to the untrusted cap (nor keep
// holding a place there). When trusted records already fill MaxRecords it stays where it is,
// untrusted: it is tracked either way, and moving it would take a place trusted records fill.
// Its namespace's count does not change. The pod timeline it started, if any, is trusted too.
func (c *Collector) trust(r *record) {
	if c.budgets.trusted >= c.opts.MaxRecords {
		return
	}
	r.untrusted = false
	c.budgets.untrusted--
	c.budgets.trusted++
	if r.timeline != nil && r.timeline.untrusted {
		c.trustTimeline(r.timeline)
	}
}

// trustTimeline counts a pod timeline a record of an untrusted observation created against
// MaxRecords, now that the pod's deletion or a trusted record shows the pod; while trusted
// timelines fill MaxRecords it stays as it is, held (as trust does with records).
func (c *Collector) trustTimeline(t *podTimeline) {
	if len(c.pods)-c.budgets.untrustedPods >= c.opts.MaxRecords {
		return
	}
	t.untrusted = false
	c.budgets.untrustedPods--
}

// rebuildNamespaces reallocates the namespace counts, which Go maps never shrink, when the sweep
// rebuilds the records map.
func (b *budgets) rebuildNamespaces() {
	fresh := make(map[string]int, len(b.byNamespace))
	for ns, n := range b.byNamespace {
		fresh[ns] = n
	}
	b.byNamespace = fresh
}
