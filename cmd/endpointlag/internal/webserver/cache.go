package webserver

import (
	"sync"
	"time"

	"k8s.io/utils/clock"
)

// ttlCache remembers answers for a while, keyed by a digest; it holds at most limit entries.
type ttlCache[V any] struct {
	clock clock.PassiveClock
	ttl   time.Duration
	limit int

	mu      sync.Mutex
	entries map[string]cached[V]
}

type cached[V any] struct {
	v       V
	expires time.Time
}

func newTTLCache[V any](clk clock.PassiveClock, ttl time.Duration, limit int) *ttlCache[V] {
	return &ttlCache[V]{clock: clk, ttl: ttl, limit: limit, entries: map[string]cached[V]{}}
}

// get returns the value kept for key, unless it expired.
func (c *ttlCache[V]) get(key string) (V, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.entries[key]
	if !ok || !c.clock.Now().Before(e.expires) {
		var zero V
		return zero, false
	}
	return e.v, true
}

// set keeps v for key for the cache's TTL. When the cache is full, expired entries go first, then
// an arbitrary one: a flood of distinct keys costs the API server calls, never memory.
func (c *ttlCache[V]) set(key string, v V) {
	c.mu.Lock()
	defer c.mu.Unlock()
	now := c.clock.Now()
	if _, ok := c.entries[key]; !ok && len(c.entries) >= c.limit {
		for k, e := range c.entries {
			if !now.Before(e.expires) {
				delete(c.entries, k)
			}
		}
		for k := range c.entries {
			if len(c.entries) < c.limit {
				break
			}
			delete(c.entries, k)
		}
	}
	c.entries[key] = cached[V]{v: v, expires: now.Add(c.ttl)}
}

// size is how many entries are held, expired ones included.
func (c *ttlCache[V]) size() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.entries)
}
