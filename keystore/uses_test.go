package keystore

import (
	"sync"
	"testing"
	"time"
)

// collected returns what one CollectUses hands on, the latest time per ID.
func collected(c *CachedStore) map[string]time.Time {
	out := map[string]time.Time{}
	c.CollectUses(func(id string, at time.Time) {
		if cur, ok := out[id]; !ok || at.After(cur) {
			out[id] = at
		}
	})
	return out
}

// TestCollectUses: a use noted in a cached record is handed on by the next
// CollectUses, once, with its time; one a second per key is noted; a record
// that leaves the cache (invalidated, or evicted for size) still hands on
// its use, and says that later uses are not collected; a disabled cache's
// records say so too.
func TestCollectUses(t *testing.T) {
	f := newCacheFixture(t, CacheOptions{}, true)
	a, b := f.storeRaw(t), f.storeRaw(t)
	ka, kb := lookupOK(t, f.cache, a.Digest), lookupOK(t, f.cache, b.Digest)
	if !ka.UseCollected() {
		t.Fatal("a cached record says its uses are not collected")
	}
	if got := collected(f.cache); len(got) != 0 {
		t.Fatalf("nothing noted yet, collected %v", got)
	}

	t0 := time.Unix(1_900_000_000, 123_000_000)
	if !ka.NoteUse(t0) || ka.NoteUse(t0.Add(500*time.Millisecond)) {
		t.Fatal("NoteUse: want true for the first use in a second, false for the next in the same second")
	}
	got := collected(f.cache)
	if len(got) != 1 || !got[a.ID].Equal(t0) {
		t.Fatalf("collected %v, want %s at %v", got, a.ID, t0)
	}
	if got := collected(f.cache); len(got) != 0 {
		t.Fatalf("collected again: %v", got)
	}

	// The next second's use, of both keys; then a is invalidated before
	// the collection: its use survives the record.
	t1 := t0.Add(time.Second)
	ka.NoteUse(t1)
	kb.NoteUse(t1)
	f.cache.Flush()
	if ka.UseCollected() || kb.UseCollected() {
		t.Error("records that left the cache say their uses are collected")
	}
	got = collected(f.cache)
	if len(got) != 2 || !got[a.ID].Equal(t1) || !got[b.ID].Equal(t1) {
		t.Fatalf("after a flush, collected %v, want both keys at %v", got, t1)
	}
	// A use noted in a detached record is for the caller to record.
	t2 := t1.Add(time.Second)
	if !ka.NoteUse(t2) {
		t.Fatal("NoteUse on a detached record")
	}
	if got := collected(f.cache); len(got) != 0 {
		t.Fatalf("collected a detached record's use: %v", got)
	}

	// Evicted for size: a cache of one record, and a second key read.
	small := f.newCache(t, CacheOptions{Size: 1}, true)
	first := lookupOK(t, small, a.Digest)
	first.NoteUse(t2)
	for i := 0; first.UseCollected(); i++ {
		if i == 200 {
			t.Fatal("the first record was never evicted")
		}
		lookupOK(t, small, f.storeRaw(t).Digest)
	}
	if got := collected(small); !got[a.ID].Equal(t2) {
		t.Errorf("evicted record's use: collected %v, want %s at %v", got, a.ID, t2)
	}

	off := f.newCache(t, CacheOptions{Disabled: true}, true)
	if k := lookupOK(t, off, a.Digest); k.UseCollected() {
		t.Error("a disabled cache's record says its uses are collected")
	}
}

// TestCollectUsesRace: uses noted while records are collected and leave
// the cache are each handed on or reported as not collected; none is lost.
func TestCollectUsesRace(t *testing.T) {
	f := newCacheFixture(t, CacheOptions{}, true)
	const keys, rounds = 20, 200
	var ks []*Key
	for range keys {
		ks = append(ks, f.storeRaw(t))
	}
	var (
		mu     sync.Mutex
		latest = map[string]time.Time{} // collected or recorded by the caller
		want   = map[string]time.Time{}
	)
	keep := func(m map[string]time.Time, id string, at time.Time) {
		if at.After(m[id]) {
			m[id] = at
		}
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			select {
			case <-stop:
				return
			default:
			}
			f.cache.CollectUses(func(id string, at time.Time) { mu.Lock(); keep(latest, id, at); mu.Unlock() })
			f.cache.Flush()
		}
	})
	base := time.Unix(1_900_000_000, 0)
	for r := range rounds {
		at := base.Add(time.Duration(r) * time.Second)
		for _, k := range ks {
			ck := lookupOK(t, f.cache, k.Digest)
			if !ck.NoteUse(at) {
				continue
			}
			mu.Lock()
			keep(want, ck.ID(), at)
			if !ck.UseCollected() {
				keep(latest, ck.ID(), at)
			}
			mu.Unlock()
		}
	}
	close(stop)
	wg.Wait()
	f.cache.CollectUses(func(id string, at time.Time) { keep(latest, id, at) })
	for id, at := range want {
		if !latest[id].Equal(at) {
			t.Errorf("%s: last use %v, collected %v", id, at, latest[id])
		}
	}
}
