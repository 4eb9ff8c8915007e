package keystore

// This file collects the last-use times that callers note in cached
// records (CachedKey.NoteUse), so that noting a use costs the request path
// one atomic compare-and-swap a second per key, and no lock or map write:
// the writer of last-used times walks the cache once per interval instead
// (CollectUses).
//
// A record that leaves the cache (evicted, invalidated, replaced by a newer
// read) hands its uncollected use to a small side map at that moment, and
// is marked detached: a use noted in it afterwards (by a request that found
// it just before) is no longer collected, which CachedKey.UseCollected
// tells the caller, who then records the use itself. Noting writes the use
// time and then reads the mark; detaching writes the mark and then reads
// the use time; both are sequentially consistent atomics, so at least one
// side sees the other and no use is lost (a use may be handed on twice,
// which is harmless: the later time wins).

import (
	"math"
	"time"

	"github.com/maypok86/otter/v2"
)

// detachedUse marks, in entryState.reported, a record no longer in the
// cache: its uses are not collected.
const detachedUse = math.MaxInt64

// UseCollected reports whether the uses noted in ck (NoteUse) are collected
// by the [CachedStore] that returned it ([CachedStore.CollectUses]). It is
// false for a record that has left the cache, and for one a disabled cache
// returned: a caller recording last-used times records those itself.
func (ck *CachedKey) UseCollected() bool {
	return ck.st.reported.Load() != detachedUse
}

// detach marks st as no longer in the cache and returns the time of its
// use not yet collected, if any.
func (st *entryState) detach() (int64, bool) {
	prev := st.reported.Swap(detachedUse)
	n := st.noted.Load()
	return n, prev != detachedUse && n > prev
}

// onDeletion is otter's OnAtomicDeletion of the records cache: it keeps
// the uncollected use of a record that leaves the cache for the next
// CollectUses. It runs under a lock of otter's hash table, so it takes
// only the cache's own lock of the side map.
func (c *CachedStore) onDeletion(e otter.DeletionEvent[Digest, CachedKey]) {
	st := e.Value.st
	if st == nil {
		return
	}
	n, ok := st.detach()
	if !ok {
		return
	}
	id := e.Value.ID()
	c.usesMu.Lock()
	if c.leftUses == nil {
		c.leftUses = make(map[string]int64)
	}
	if n > c.leftUses[id] {
		c.leftUses[id] = n
	}
	c.usesMu.Unlock()
}

// CollectUses calls add with the key ID and time of every use noted in the
// cached records ([CachedKey.NoteUse]) since the previous CollectUses,
// including records that have left the cache since; a key read again
// meanwhile may come twice (keep the later time). It walks every cached
// record: call it once per interval at which last-used times are written
// (a minute, say), not per request. Its callers share what it collects: a
// use is handed to one CollectUses only.
func (c *CachedStore) CollectUses(add func(id string, at time.Time)) {
	for _, e := range c.pos.All() {
		st := e.st
		n, r := st.noted.Load(), st.reported.Load()
		if r == detachedUse || n <= r || !st.reported.CompareAndSwap(r, n) {
			// Nothing new; or detached, or detaching now: then its use
			// went to leftUses.
			continue
		}
		add(e.ID(), time.Unix(0, n))
	}
	c.usesMu.Lock()
	left := c.leftUses
	c.leftUses = nil
	c.usesMu.Unlock()
	for id, n := range left {
		add(id, time.Unix(0, n))
	}
}
