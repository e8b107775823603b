package poll

import (
	"slices"
	"testing"
	"time"
)

// While what a probe reads is absent, it reads less and less often: at the poll interval first,
// then twice as long each time, up to AbsentPolls intervals; once it is there, at every interval
// again, and the growth starts over when it goes.
func TestBackoffGrowsToItsCapWhileAbsent(t *testing.T) {
	b := Backoff{Interval: time.Second}
	var got []time.Duration
	for _, absent := range []bool{true, true, true, true, true, true, false, false, true, true} {
		got = append(got, b.Next(absent))
	}
	s := time.Second
	want := []time.Duration{s, 2 * s, 4 * s, 8 * s, 10 * s, 10 * s, s, s, s, 2 * s}
	if !slices.Equal(got, want) {
		t.Errorf("waits %v, want %v", got, want)
	}
}

func TestJitterStaysWithinATenth(t *testing.T) {
	for range 1000 {
		if d := Jitter(time.Second); d < 900*time.Millisecond || d > 1100*time.Millisecond {
			t.Fatalf("Jitter(1s) = %s, want 0.9–1.1 s", d)
		}
	}
}
