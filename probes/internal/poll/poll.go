// Package poll spaces the reads of the probes that poll the kernel.
package poll

import (
	"math/rand/v2"
	"time"
)

// AbsentPolls is how many poll intervals apart a probe reads once what kube-proxy writes has
// been absent for a while (kube-proxy runs another mode on this node, or the kernel lacks the
// feature): each read wakes the daemon, and on an idle node such reads were most of its CPU at
// rest (docs/benchmarks.md). kube-proxy writes its rules when it starts, so on a node that
// switches mode the probe finds them at most this many intervals late; kube-proxy's restart and
// first sync take longer.
const AbsentPolls = 10

// Backoff is the wait between a probe's reads: the poll interval while what it reads is there;
// while it is absent, the interval after the first read that misses it, then twice as long
// after each read, up to AbsentPolls intervals.
type Backoff struct {
	Interval time.Duration
	absent   time.Duration // the last wait while absent; 0 while present
}

// Next is the wait after a read that found what it reads absent, or not.
func (b *Backoff) Next(absent bool) time.Duration {
	switch {
	case !absent:
		b.absent = 0
		return b.Interval
	case b.absent == 0:
		b.absent = b.Interval
	default:
		b.absent = min(2*b.absent, AbsentPolls*b.Interval)
	}
	return b.absent
}

// Jitter spreads the polls of many nodes: d ± 10 %.
func Jitter(d time.Duration) time.Duration {
	return d - d/10 + rand.N(d/5+1)
}
