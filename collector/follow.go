package collector

import "time"

// Follower tells a reader of settled records (the pusher, the tracer) which records are due:
// settled and not sent yet or, with again, sent with another print since. It walks the source
// only when something may be due: its Rev moved on, a record reached its settle-after age, or a
// send failed (Retry); and views only the records due.
type Follower struct {
	src         Source
	settleAfter time.Duration
	again       bool

	// sent is what was sent of each record (by Digest.ID), with the walk (walks counts them) at
	// which the record was last held: an entry not held at a walk is dropped.
	sent  map[uint64]followed
	walks uint64
	// Nothing can be due while the source's Rev is still rev (walked: since the last walk) and
	// before settles (the first record to settle by age; zero: none).
	rev     uint64
	walked  bool
	settles time.Time
}

type followed struct {
	print Print
	held  uint64
}

// NewFollower returns a follower of src's records, settled after settleAfter at the latest; again:
// a record is due again whenever its print changed since it was sent.
func NewFollower(src Source, settleAfter time.Duration, again bool) *Follower {
	return &Follower{src: src, settleAfter: settleAfter, again: again, sent: map[uint64]followed{}}
}

// Due returns the views of the records due now, with their digests.
func (f *Follower) Due(now time.Time) ([]RecordView, []Digest) {
	rev := f.src.Rev()
	if f.walked && rev == f.rev && (f.settles.IsZero() || now.Before(f.settles)) {
		return nil, nil
	}
	f.rev, f.walked, f.settles = rev, true, time.Time{}
	f.walks++
	var digests []Digest
	views := f.src.ViewsWhere(now, f.settleAfter, func(d Digest) bool {
		if !d.SettlesAt.IsZero() && (f.settles.IsZero() || d.SettlesAt.Before(f.settles)) {
			f.settles = d.SettlesAt
		}
		s, sent := f.sent[d.ID]
		if sent {
			s.held = f.walks
			f.sent[d.ID] = s
		}
		if !d.Settled || sent && (!f.again || s.print == d.Print) {
			return false
		}
		digests = append(digests, d)
		return true
	})
	for id, s := range f.sent {
		if s.held != f.walks {
			delete(f.sent, id) // expired from the source: never due again
		}
	}
	return views, digests
}

// Sent notes that the record of d was sent as d tells it.
func (f *Follower) Sent(d Digest) {
	f.sent[d.ID] = followed{print: d.Print, held: f.walks}
}

// Retry has the next Due walk the records again: a send failed.
func (f *Follower) Retry() { f.walked = false }
