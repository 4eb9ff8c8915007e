package keystore

import (
	"context"
	"errors"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
	"unsafe"

	"github.com/redis/go-redis/v9"

	"github.com/caddy-apikeys/caddy-apikeys/internal/testredis"
)

// fakeClock is a settable clock for the cache's freshness decisions. The
// background refresh loop still ticks in real time; only ages come from
// this clock.
type fakeClock struct{ ns atomic.Int64 }

func newFakeClock() *fakeClock {
	c := &fakeClock{}
	c.ns.Store(time.Now().UnixNano())
	return c
}

func (c *fakeClock) Now() time.Time          { return time.Unix(0, c.ns.Load()) }
func (c *fakeClock) Advance(d time.Duration) { c.ns.Add(int64(d)) }

// countingObserver counts what a CachedStore reports.
type countingObserver struct {
	mu      sync.Mutex
	lookups map[LookupResult]int
	calls   map[string]int
	health  []bool
	minted  int
	revoked int
	flushes int
	errors  []string
}

func newCountingObserver() *countingObserver {
	return &countingObserver{lookups: map[LookupResult]int{}, calls: map[string]int{}}
}

func (o *countingObserver) CacheLookup(r LookupResult) {
	o.mu.Lock()
	o.lookups[r]++
	o.mu.Unlock()
}
func (o *countingObserver) StoreCall(op string, _ time.Duration, _ error) {
	o.mu.Lock()
	o.calls[op]++
	o.mu.Unlock()
}
func (o *countingObserver) StoreHealth(up bool, _ error) {
	o.mu.Lock()
	o.health = append(o.health, up)
	o.mu.Unlock()
}
func (o *countingObserver) Invalidated(source string) {
	o.mu.Lock()
	if source == "flush" {
		o.flushes++
	}
	o.mu.Unlock()
}
func (o *countingObserver) KeyMinted()  { o.mu.Lock(); o.minted++; o.mu.Unlock() }
func (o *countingObserver) KeyRevoked() { o.mu.Lock(); o.revoked++; o.mu.Unlock() }
func (o *countingObserver) Error(msg string, _ error) {
	o.mu.Lock()
	o.errors = append(o.errors, msg)
	o.mu.Unlock()
}

func (o *countingObserver) lookup(r LookupResult) int {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.lookups[r]
}

// cacheFixture is a CachedStore on a real redis-server, plus an uncached
// store on the same data for writes that bypass the cache.
type cacheFixture struct {
	srv    *testredis.Server
	rdb    *redis.Client
	raw    *RedisStore // same namespace, no cache, publishes nothing
	cache  *CachedStore
	obs    *countingObserver
	clock  *fakeClock
	caches int // subscribed caches
}

// newCacheFixture starts redis-server and a CachedStore with opts (pub/sub
// invalidation unless noPubSub).
func newCacheFixture(t *testing.T, opts CacheOptions, noPubSub bool) *cacheFixture {
	t.Helper()
	srv := testredis.Start(t)
	f := &cacheFixture{srv: srv, rdb: srv.Client(t), obs: newCountingObserver(), clock: newFakeClock()}
	f.raw = newRedisStore(t, srv, RedisOptions{Namespace: "c"})
	f.cache = f.newCache(t, opts, noPubSub)
	return f
}

// newCache returns another CachedStore on the fixture's Redis, as another
// instance would have.
func (f *cacheFixture) newCache(t *testing.T, opts CacheOptions, noPubSub bool) *CachedStore {
	t.Helper()
	inner := newRedisStore(t, f.srv, RedisOptions{Namespace: "c"})
	if !noPubSub {
		opts.Invalidator = NewRedisInvalidator(inner)
	}
	if opts.Observer == nil {
		opts.Observer = f.obs
	}
	if opts.Now == nil {
		opts.Now = f.clock.Now
	}
	c, err := NewCachedStore(inner, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	if !noPubSub {
		// Subscribing flushes the cache; wait for that before using it.
		f.caches++
		waitFor(t, "the subscription", func() bool {
			f.obs.mu.Lock()
			defer f.obs.mu.Unlock()
			return f.obs.flushes >= f.caches
		})
	}
	return c
}

// commandCalls returns how often Redis ran the command (INFO commandstats).
func commandCalls(t testing.TB, rdb *redis.Client, cmd string) int {
	t.Helper()
	info, err := rdb.Info(context.Background(), "commandstats").Result()
	if err != nil {
		t.Fatal(err)
	}
	prefix := "cmdstat_" + cmd + ":calls="
	for _, line := range strings.Split(info, "\n") {
		if rest, ok := strings.CutPrefix(line, prefix); ok {
			n, _ := strconv.Atoi(strings.SplitN(rest, ",", 2)[0])
			return n
		}
	}
	return 0
}

// storeRaw creates a key through the uncached store (the cache sees no
// write) and returns it.
func (f *cacheFixture) storeRaw(t *testing.T) *Key {
	t.Helper()
	k := newKey(t, "owner", time.Now().UTC().Truncate(time.Millisecond))
	mustCreate(t, f.raw, k)
	return k
}

func lookupOK(t *testing.T, c *CachedStore, d Digest) CachedKey {
	t.Helper()
	k, err := c.Lookup(context.Background(), d)
	if err != nil {
		t.Fatalf("Lookup: %v", err)
	}
	return k
}

func TestCacheHitMissNegative(t *testing.T) {
	f := newCacheFixture(t, CacheOptions{}, false)
	k := f.storeRaw(t)
	gets := commandCalls(t, f.rdb, "get")

	for i := range 20 {
		got := lookupOK(t, f.cache, k.Digest)
		if got.ID() != k.ID {
			t.Fatalf("lookup %d: got %s, want %s", i, got.ID(), k.ID)
		}
	}
	if n := commandCalls(t, f.rdb, "get") - gets; n != 1 {
		t.Errorf("20 lookups of one key made %d GETs, want 1", n)
	}
	if f.obs.lookup(LookupMiss) != 1 || f.obs.lookup(LookupHit) != 19 {
		t.Errorf("lookups: %v", f.obs.lookups)
	}

	// Unknown digests are remembered as unknown.
	gets = commandCalls(t, f.rdb, "get")
	unknown := newKey(t, "x", time.Now()).Digest
	for range 20 {
		if _, err := f.cache.Lookup(context.Background(), unknown); !errors.Is(err, ErrNotFound) {
			t.Fatalf("unknown digest: %v", err)
		}
	}
	if n := commandCalls(t, f.rdb, "get") - gets; n != 1 {
		t.Errorf("20 lookups of an unknown digest made %d GETs, want 1", n)
	}
	if f.obs.lookup(LookupNegativeHit) != 19 {
		t.Errorf("negative hits: %v", f.obs.lookups)
	}

	// Peek answers from the cache alone.
	if got, ok := f.cache.Peek(k.Digest); !ok || got.ID() != k.ID {
		t.Errorf("Peek(cached) = %v, %v", got, ok)
	}
	if _, ok := f.cache.Peek(unknown); ok {
		t.Error("Peek found an unknown digest")
	}
	f.clock.Advance(DefaultCacheTTL)
	if _, ok := f.cache.Peek(k.Digest); ok {
		t.Error("Peek served a record older than TTL")
	}

	// ByDigest reads the store, for the whole record.
	gets = commandCalls(t, f.rdb, "get")
	full, err := f.cache.ByDigest(context.Background(), k.Digest)
	if err != nil || full.Name != k.Name || !full.CreatedAt.Equal(k.CreatedAt) {
		t.Errorf("ByDigest = %+v, %v", full, err)
	}
	if n := commandCalls(t, f.rdb, "get") - gets; n != 1 {
		t.Errorf("ByDigest made %d GETs, want 1", n)
	}
}

// revoked reports whether ck is revoked now.
func revoked(ck CachedKey) bool { return ck.Status(time.Now()) == StatusRevoked }

// TestCacheUnusableRecord: a stored record that cannot be decoded, or that
// belongs to another digest (a corrupted or tampered store), is reported
// and refused as unknown; it does not mark the store unreachable, which
// would put every other key into outage mode.
func TestCacheUnusableRecord(t *testing.T) {
	f := newCacheFixture(t, CacheOptions{}, false)
	other := f.storeRaw(t)
	record, err := f.rdb.Get(context.Background(), f.raw.digestKey(other.Digest.String())).Result()
	if err != nil {
		t.Fatal(err)
	}
	for name, body := range map[string]string{"another key's record": record, "not JSON": "{garbage"} {
		d := newKey(t, "x", time.Now()).Digest
		if err := f.rdb.Set(context.Background(), f.raw.digestKey(d.String()), body, 0).Err(); err != nil {
			t.Fatal(err)
		}
		if _, err := f.cache.Lookup(context.Background(), d); !errors.Is(err, ErrNotFound) {
			t.Errorf("%s: Lookup = %v, want ErrNotFound", name, err)
		}
		if !f.cache.StoreUp() {
			t.Errorf("%s: the store was marked unreachable", name)
		}
	}
	f.obs.mu.Lock()
	defer f.obs.mu.Unlock()
	if len(f.obs.errors) != 2 {
		t.Errorf("reported errors %q, want 2", f.obs.errors)
	}
}

// TestCacheNegativeFlood sends many lookups of a few fake digests at once:
// the store sees one GET per digest.
func TestCacheNegativeFlood(t *testing.T) {
	f := newCacheFixture(t, CacheOptions{}, false)
	gets := commandCalls(t, f.rdb, "get")
	const fakes, each = 10, 50
	var digests []Digest
	for range fakes {
		digests = append(digests, newKey(t, "x", time.Now()).Digest)
	}
	var wg sync.WaitGroup
	var wrong atomic.Int64
	for i := range fakes * each {
		wg.Go(func() {
			if _, err := f.cache.Lookup(context.Background(), digests[i%fakes]); !errors.Is(err, ErrNotFound) {
				wrong.Add(1)
			}
		})
	}
	wg.Wait()
	if wrong.Load() != 0 {
		t.Fatalf("%d lookups did not answer ErrNotFound", wrong.Load())
	}
	if n := commandCalls(t, f.rdb, "get") - gets; n != fakes {
		t.Errorf("%d lookups of %d fake digests made %d GETs, want %d", fakes*each, fakes, n, fakes)
	}
}

// TestCacheDedup holds Redis still while 50 lookups of one uncached key
// pile up: they share one GET.
func TestCacheDedup(t *testing.T) {
	f := newCacheFixture(t, CacheOptions{}, false)
	k := f.storeRaw(t)
	gets := commandCalls(t, f.rdb, "get")

	if err := f.rdb.Do(context.Background(), "CLIENT", "PAUSE", "300", "ALL").Err(); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	var bad atomic.Int64
	for range 50 {
		wg.Go(func() {
			got, err := f.cache.Lookup(context.Background(), k.Digest)
			if err != nil || got.ID() != k.ID {
				bad.Add(1)
			}
		})
	}
	wg.Wait()
	if bad.Load() != 0 {
		t.Fatalf("%d of 50 lookups failed", bad.Load())
	}
	if n := commandCalls(t, f.rdb, "get") - gets; n != 1 {
		t.Errorf("50 concurrent lookups made %d GETs, want 1", n)
	}
}

// TestCacheStaleWhileRevalidate ages a record past Refresh: it is served
// at once while the background loop re-reads it (one MGET), and it is
// re-read before it is served once past TTL.
func TestCacheStaleWhileRevalidate(t *testing.T) {
	f := newCacheFixture(t, CacheOptions{TTL: 10 * time.Second, Refresh: 100 * time.Millisecond}, false)
	k := f.storeRaw(t)
	lookupOK(t, f.cache, k.Digest)
	mgets := commandCalls(t, f.rdb, "mget")

	// Pause Redis, then let the record age: it must still be served, at
	// once, while the background re-read waits for Redis.
	if err := f.rdb.Do(context.Background(), "CLIENT", "PAUSE", "500", "ALL").Err(); err != nil {
		t.Fatal(err)
	}
	f.clock.Advance(time.Second)
	start := time.Now()
	for range 10 {
		lookupOK(t, f.cache, k.Digest)
	}
	if d := time.Since(start); d > 50*time.Millisecond {
		t.Errorf("10 stale lookups took %v while Redis was paused", d)
	}
	if f.obs.lookup(LookupStale) != 10 {
		t.Errorf("stale serves = %d, want 10", f.obs.lookup(LookupStale))
	}

	// The loop refreshes it after the pause (re-read, or renewed when the
	// records version shows it unchanged); it is a hit again.
	_ = mgets
	waitFor(t, "a fresh hit", func() bool {
		hits := f.obs.lookup(LookupHit)
		lookupOK(t, f.cache, k.Digest)
		return f.obs.lookup(LookupHit) > hits
	})

	// A record revoked behind the cache's back (no message) is seen within
	// TTL: past TTL it is read again before it is served.
	if _, err := f.raw.Revoke(context.Background(), k.ID, time.Now()); err != nil {
		t.Fatal(err)
	}
	if got := lookupOK(t, f.cache, k.Digest); revoked(got) {
		t.Fatal("revocation seen without a message before TTL: the test proves nothing")
	}
	f.clock.Advance(11 * time.Second)
	if got := lookupOK(t, f.cache, k.Digest); !revoked(got) {
		t.Error("a record older than TTL was served without being read again")
	}
}

// TestCacheKeepsUsedRecordsWarm: a record used in the last WarmFor is
// re-read in the background every Refresh, however rarely it is used; one
// never used, or not used for WarmFor, is left to age out.
func TestCacheKeepsUsedRecordsWarm(t *testing.T) {
	f := newCacheFixture(t, CacheOptions{TTL: 10 * time.Second, Refresh: 100 * time.Millisecond}, false)
	k := f.storeRaw(t)
	unused := newKey(t, "o", time.Now().UTC().Truncate(time.Millisecond))
	if err := f.cache.Create(context.Background(), unused); err != nil {
		t.Fatal(err)
	}
	created, _ := f.cache.pos.GetIfPresent(unused.Digest)
	createdLoaded := created.st.loadedAt.Load()
	lookupOK(t, f.cache, k.Digest) // read for a request: in use

	e, _ := f.cache.pos.GetIfPresent(k.Digest)
	for range 3 {
		f.clock.Advance(time.Second)
		from := f.cache.confirmedAt(e.st)
		waitFor(t, "a background refresh", func() bool { return f.cache.confirmedAt(e.st) > from })
	}
	waitFor(t, "the record in use to be kept fresh", func() bool {
		return f.clock.Now().UnixNano()-f.cache.confirmedAt(e.st) < int64(time.Second)
	})

	// An unchanged record is not decoded again: its entry is renewed in
	// place. A changed one is replaced.
	f.clock.Advance(time.Second)
	renewedFrom := f.cache.confirmedAt(e.st)
	waitFor(t, "the entry to be renewed", func() bool { return f.cache.confirmedAt(e.st) > renewedFrom })
	if e2, _ := f.cache.pos.GetIfPresent(k.Digest); e2.st != e.st || unsafe.StringData(e2.text) != unsafe.StringData(e.text) {
		t.Error("an unchanged record was decoded again")
	}
	if _, err := f.raw.Revoke(context.Background(), k.ID, time.Now()); err != nil {
		t.Fatal(err)
	}
	f.clock.Advance(time.Second)
	waitFor(t, "the background refresh to pick up the change", func() bool {
		e2, _ := f.cache.pos.GetIfPresent(k.Digest)
		return revoked(e2) && e2.st != e.st
	})
	if e, _ := f.cache.pos.GetIfPresent(unused.Digest); e.st != created.st || e.st.loadedAt.Load() != createdLoaded {
		t.Error("a record never used was re-read")
	}

	f.clock.Advance(WarmFor)
	time.Sleep(300 * time.Millisecond) // a refresh already under way ends
	mgets := commandCalls(t, f.rdb, "mget")
	time.Sleep(300 * time.Millisecond) // several loop ticks
	if n := commandCalls(t, f.rdb, "mget") - mgets; n != 0 {
		t.Errorf("%d MGETs for records unused for %v, want 0", n, WarmFor)
	}
}

// TestCacheRefreshByVersion: while no record changes, the background
// refresh keeps 500 records in use fresh with one read of the store's
// records version a pass, no record reads; once a record changes behind the
// cache's back (no invalidation message), the next pass reads the records
// again and serves the change within TTL.
func TestCacheRefreshByVersion(t *testing.T) {
	f := newCacheFixture(t, CacheOptions{TTL: 10 * time.Second, Refresh: 200 * time.Millisecond}, true)
	keys := make([]*Key, 500)
	for i := range keys {
		keys[i] = f.storeRaw(t)
		lookupOK(t, f.cache, keys[i].Digest)
	}
	// A few passes to build the version history, each seeing the records
	// past Refresh.
	pass := func() {
		t.Helper()
		f.clock.Advance(300 * time.Millisecond)
		e, _ := f.cache.pos.GetIfPresent(keys[0].Digest)
		from := f.cache.confirmedAt(e.st)
		waitFor(t, "a refresh pass", func() bool {
			e, _ := f.cache.pos.GetIfPresent(keys[0].Digest)
			return e.st != nil && f.cache.confirmedAt(e.st) > from
		})
		time.Sleep(150 * time.Millisecond) // the pass ends
	}
	for range 3 {
		pass()
	}
	mgets, gets := commandCalls(t, f.rdb, "mget"), commandCalls(t, f.rdb, "get")
	for range 5 {
		pass()
		for _, k := range keys {
			hits := f.obs.lookup(LookupHit)
			if got := lookupOK(t, f.cache, k.Digest); got.ID() != k.ID || f.obs.lookup(LookupHit) != hits+1 {
				t.Fatal("a record kept fresh by version was not a hit")
			}
		}
	}
	if n := commandCalls(t, f.rdb, "mget") - mgets; n != 0 {
		t.Errorf("%d MGETs in 5 refresh passes with no record changed, want 0", n)
	}
	if n := commandCalls(t, f.rdb, "get") - gets; n < 5 || n > 12 {
		t.Errorf("%d GETs in 5 refresh passes, want one (the version) a pass", n)
	}

	if _, err := f.raw.Revoke(context.Background(), keys[7].ID, time.Now()); err != nil {
		t.Fatal(err)
	}
	pass()
	pass()
	if n := commandCalls(t, f.rdb, "mget") - mgets; n < 1 {
		t.Error("no MGET after a record changed")
	}
	if got := lookupOK(t, f.cache, keys[7].Digest); got.Active(time.Now().Add(time.Second)) {
		t.Error("a record revoked behind the cache's back is still served as active two passes later")
	}

	// A hand edit does not move the version: it is served until the next
	// full pass, at most fullRefreshEvery later.
	k := keys[9]
	k.RevokedAt = new(time.Time)
	*k.RevokedAt = time.Now().UTC().Truncate(time.Millisecond)
	rec, err := encodeKey(k)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.rdb.Set(context.Background(), "c:digest:"+k.Digest.String(), rec, 0).Err(); err != nil {
		t.Fatal(err)
	}
	pass()
	pass()
	if got := lookupOK(t, f.cache, k.Digest); !got.Active(time.Now().Add(time.Second)) {
		t.Log("the hand edit was seen before a full pass (a full pass fell in; fine)")
	}
	// As if the last full pass were fullRefreshEvery ago (advancing the
	// clock that far would also age the records out of use).
	f.cache.lastFull.Add(-int64(fullRefreshEvery))
	pass()
	pass()
	if got := lookupOK(t, f.cache, k.Digest); got.Active(time.Now().Add(time.Second)) {
		t.Error("a hand edit that did not move the version is still served after a full refresh pass")
	}
}

func TestCacheMintedKeyCached(t *testing.T) {
	f := newCacheFixture(t, CacheOptions{}, false)
	k := newKey(t, "o", time.Now().UTC().Truncate(time.Millisecond))
	gets := commandCalls(t, f.rdb, "get")
	if err := f.cache.Create(context.Background(), k); err != nil {
		t.Fatal(err)
	}
	// Give our own "created" message time to come back: it must not drop
	// the record.
	time.Sleep(100 * time.Millisecond)
	if got := lookupOK(t, f.cache, k.Digest); got.ID() != k.ID {
		t.Fatalf("got %s", got.ID())
	}
	if n := commandCalls(t, f.rdb, "get") - gets; n != 0 {
		t.Errorf("looking up a key this instance created made %d GETs, want 0", n)
	}
	if f.obs.minted != 1 {
		t.Errorf("minted = %d", f.obs.minted)
	}
}

// TestCacheInvalidation: a revoke through one instance is seen by itself at
// once and by another instance as soon as the message arrives; a create
// drops the other instance's "unknown".
func TestCacheInvalidation(t *testing.T) {
	f := newCacheFixture(t, CacheOptions{}, false)
	other := f.newCache(t, CacheOptions{}, false)

	k := newKey(t, "o", time.Now().UTC().Truncate(time.Millisecond))
	// The other instance has looked the digest up before it existed.
	if _, err := other.Lookup(context.Background(), k.Digest); !errors.Is(err, ErrNotFound) {
		t.Fatalf("before create: %v", err)
	}
	if err := f.cache.Create(context.Background(), k); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the other instance to see the new key", func() bool {
		_, err := other.Lookup(context.Background(), k.Digest)
		return err == nil
	})

	if _, err := f.cache.Revoke(context.Background(), k.ID, time.Now()); err != nil {
		t.Fatal(err)
	}
	if got := lookupOK(t, f.cache, k.Digest); !revoked(got) {
		t.Error("the revoking instance still serves the key as not revoked")
	}
	waitFor(t, "the other instance to see the revocation", func() bool {
		return revoked(lookupOK(t, other, k.Digest))
	})
	if f.obs.revoked != 1 {
		t.Errorf("revoked = %d", f.obs.revoked)
	}
}

// TestCacheFlushOnResubscribe kills the subscription's connection: the
// cache forgets what it held, since messages may have been lost meanwhile.
func TestCacheFlushOnResubscribe(t *testing.T) {
	f := newCacheFixture(t, CacheOptions{}, false)
	k := f.storeRaw(t)
	lookupOK(t, f.cache, k.Digest)

	// Revoked behind the cache's back: no message.
	if _, err := f.raw.Revoke(context.Background(), k.ID, time.Now()); err != nil {
		t.Fatal(err)
	}
	if revoked(lookupOK(t, f.cache, k.Digest)) {
		t.Fatal("the cache saw a revocation nobody told it about: the test proves nothing")
	}
	if err := f.rdb.Do(context.Background(), "CLIENT", "KILL", "TYPE", "pubsub").Err(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the flush after resubscribing", func() bool {
		return revoked(lookupOK(t, f.cache, k.Digest))
	})
}

// TestCacheFlushMessage: PUBLISH <ns>:invalidate '*' flushes every cache.
func TestCacheFlushMessage(t *testing.T) {
	f := newCacheFixture(t, CacheOptions{}, false)
	k := f.storeRaw(t)
	lookupOK(t, f.cache, k.Digest)
	if _, err := f.raw.Revoke(context.Background(), k.ID, time.Now()); err != nil {
		t.Fatal(err)
	}
	if err := f.rdb.Publish(context.Background(), "c:invalidate", "*").Err(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the flush", func() bool {
		return revoked(lookupOK(t, f.cache, k.Digest))
	})
}

// TestCacheOutage stops Redis: records read recently keep being served for
// the outage window, unknown digests fail at once, and the cache recovers
// when Redis is back.
func TestCacheOutage(t *testing.T) {
	for _, tc := range []struct {
		name   string
		window time.Duration
	}{{"default window", 0}, {"window disabled", -1}} {
		t.Run(tc.name, func(t *testing.T) {
			f := newCacheFixture(t, CacheOptions{OutageWindow: tc.window, StoreTimeout: 500 * time.Millisecond}, false)
			k := f.storeRaw(t)
			lookupOK(t, f.cache, k.Digest)
			unknown := newKey(t, "x", time.Now()).Digest

			f.srv.Stop()
			// Within TTL the record is served whatever the store's state.
			lookupOK(t, f.cache, k.Digest)
			f.clock.Advance(DefaultCacheTTL + time.Second)

			// The first read notices the outage.
			_, err := f.cache.Lookup(context.Background(), unknown)
			if !errors.Is(err, ErrUnavailable) {
				t.Fatalf("unknown digest during outage: %v, want ErrUnavailable", err)
			}
			for i := range 5 {
				start := time.Now()
				_, err := f.cache.Lookup(context.Background(), newKey(t, "x", time.Now()).Digest)
				if d := time.Since(start); !errors.Is(err, ErrUnavailable) || d > 100*time.Millisecond {
					t.Errorf("unknown digest %d during outage: %v after %v, want ErrUnavailable within 100ms", i, err, d)
				}
			}
			_, err = f.cache.Lookup(context.Background(), k.Digest)
			if tc.window < 0 {
				if !errors.Is(err, ErrUnavailable) {
					t.Errorf("window disabled: record past TTL: %v, want ErrUnavailable", err)
				}
			} else {
				if err != nil {
					t.Errorf("record past TTL within the outage window: %v", err)
				}
				if f.obs.lookup(LookupOutage) == 0 {
					t.Error("no outage serve counted")
				}
				f.clock.Advance(DefaultOutageWindow)
				if _, err := f.cache.Lookup(context.Background(), k.Digest); !errors.Is(err, ErrUnavailable) {
					t.Errorf("record past the outage window: %v, want ErrUnavailable", err)
				}
			}

			f.srv.Restart() // no persistence: the key is gone
			mustCreate(t, f.raw, k)
			waitFor(t, "recovery", func() bool { return f.cache.StoreUp() })
			if got := lookupOK(t, f.cache, k.Digest); got.ID() != k.ID {
				t.Errorf("after recovery: %s", got.ID())
			}
			if _, err := f.cache.Lookup(context.Background(), unknown); !errors.Is(err, ErrNotFound) {
				t.Errorf("unknown digest after recovery: %v", err)
			}
		})
	}
}

// TestCacheHungStoreFailsFast pauses Redis (it accepts connections but does
// not answer): the first read waits for StoreTimeout, later ones fail at
// once, and stale records are served from the outage window.
func TestCacheHungStoreFailsFast(t *testing.T) {
	f := newCacheFixture(t, CacheOptions{StoreTimeout: 300 * time.Millisecond}, false)
	k := f.storeRaw(t)
	lookupOK(t, f.cache, k.Digest)
	f.clock.Advance(DefaultCacheTTL + time.Second)
	if err := f.rdb.Do(context.Background(), "CLIENT", "PAUSE", "2000", "ALL").Err(); err != nil {
		t.Fatal(err)
	}
	// Past TTL: the re-read times out, then the record is served anyway.
	start := time.Now()
	if _, err := f.cache.Lookup(context.Background(), k.Digest); err != nil {
		t.Fatalf("record during a hung store: %v", err)
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("first lookup took %v; StoreTimeout is 300ms", d)
	}
	for range 5 {
		start := time.Now()
		if _, err := f.cache.Lookup(context.Background(), newKey(t, "x", time.Now()).Digest); !errors.Is(err, ErrUnavailable) {
			t.Errorf("unknown digest: %v", err)
		}
		if d := time.Since(start); d > 100*time.Millisecond {
			t.Errorf("unknown digest took %v with the store known down", d)
		}
		if _, err := f.cache.Lookup(context.Background(), k.Digest); err != nil {
			t.Errorf("record: %v", err)
		}
	}
	waitFor(t, "recovery after the pause", func() bool { return f.cache.StoreUp() })
}

func TestCacheDisabled(t *testing.T) {
	f := newCacheFixture(t, CacheOptions{Disabled: true}, false)
	k := f.storeRaw(t)
	gets := commandCalls(t, f.rdb, "get")
	for range 5 {
		lookupOK(t, f.cache, k.Digest)
	}
	if n := commandCalls(t, f.rdb, "get") - gets; n != 5 {
		t.Errorf("5 lookups with the cache disabled made %d GETs, want 5", n)
	}
	// Configure turns it on.
	if err := f.cache.Configure(CacheOptions{}); err != nil {
		t.Fatal(err)
	}
	gets = commandCalls(t, f.rdb, "get")
	for range 5 {
		lookupOK(t, f.cache, k.Digest)
	}
	if n := commandCalls(t, f.rdb, "get") - gets; n != 1 {
		t.Errorf("5 lookups with the cache enabled made %d GETs, want 1", n)
	}
}

func TestCacheOptionsInvalid(t *testing.T) {
	for _, opts := range []CacheOptions{
		{Size: -1},
		{TTL: time.Second, Refresh: time.Second},
		{TTL: -time.Second},
	} {
		if _, err := NewCachedStore(nopStore{}, opts); err == nil {
			t.Errorf("%+v accepted", opts)
		}
	}
}

// nopStore is a Store that is never called (for option checks).
type nopStore struct{ Store }

// TestCachedRedisConformance runs the Store conformance suite through the
// cache, with invalidation on.
func TestCachedRedisConformance(t *testing.T) {
	srv := testredis.Start(t)
	runConformance(t, backend{newStore: func(t *testing.T) Store {
		inner := newRedisStore(t, srv, RedisOptions{})
		c, err := NewCachedStore(inner, CacheOptions{Invalidator: NewRedisInvalidator(inner)})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = c.Close() })
		return c
	}})
}

// TestCachedBoltConformance runs it on bbolt, with no invalidator.
func TestCachedBoltConformance(t *testing.T) {
	runConformance(t, backend{newStore: func(t *testing.T) Store {
		inner, err := NewBolt(BoltOptions{Path: filepath.Join(t.TempDir(), "keys.db")})
		if err != nil {
			t.Fatal(err)
		}
		c, err := NewCachedStore(inner, CacheOptions{})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = c.Close() })
		return c
	}})
}

func TestRedisByDigests(t *testing.T) {
	srv := testredis.Start(t)
	s := newRedisStore(t, srv, RedisOptions{})
	a, b := newKey(t, "o", time.Now().UTC().Truncate(time.Millisecond)), newKey(t, "o", time.Now().UTC().Truncate(time.Millisecond))
	mustCreate(t, s, a)
	mustCreate(t, s, b)
	missing := newKey(t, "o", time.Now()).Digest
	got, err := s.ByDigests(context.Background(), []Digest{b.Digest, missing, a.Digest})
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 3 || got[0] == nil || got[0].ID != b.ID || got[1] != nil || got[2] == nil || got[2].ID != a.ID {
		t.Fatalf("ByDigests = %v", got)
	}
	assertKey(t, a, got[2])
}

func TestParseInvalidation(t *testing.T) {
	d := newKey(t, "o", time.Now()).Digest
	for _, tc := range []struct {
		in      string
		ok      bool
		created bool
	}{
		{"u:" + d.String(), true, false},
		{"c:" + d.String(), true, true},
		{"x:" + d.String(), false, false},
		{"u:" + d.String()[:10], false, false},
		{"", false, false},
		{"u", false, false},
	} {
		inv, ok := parseInvalidation(tc.in)
		if ok != tc.ok || ok && (inv.Digest != d || inv.Created != tc.created) {
			t.Errorf("parseInvalidation(%q) = %+v, %v", tc.in, inv, ok)
		}
	}
}

// waitFor polls cond for up to 5 seconds.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestCacheRefreshSinceStable: while the records version does not move, the
// time from which records are known unchanged stays where the version was
// first seen, however many passes there are (more than the version history
// keeps): otherwise every pass past that would walk every record again.
func TestCacheRefreshSinceStable(t *testing.T) {
	// Disabled from the start, the refresh loop never runs a pass: the
	// passes' version read is called directly.
	f := newCacheFixture(t, CacheOptions{Disabled: true}, true)
	k := f.storeRaw(t)
	var first int64
	for i := range 3 * maxVersionSamples {
		f.clock.Advance(time.Second)
		since, ok := f.cache.unchangedSince()
		if !ok {
			t.Fatal("the version read failed")
		}
		switch {
		case i == 1:
			first = since
		case i > 1 && since != first:
			t.Fatalf("pass %d: unchanged since %v, want %v as from pass 1", i, time.Unix(0, since), time.Unix(0, first))
		}
		if n := len(f.cache.versions); n > maxVersionSamples {
			t.Fatalf("%d version samples kept", n)
		}
	}
	// A change moves it.
	if _, err := f.raw.Revoke(context.Background(), k.ID, time.Now()); err != nil {
		t.Fatal(err)
	}
	f.clock.Advance(time.Second)
	f.cache.unchangedSince()
	f.clock.Advance(time.Second)
	if since, _ := f.cache.unchangedSince(); since == first {
		t.Error("since did not move after a change")
	}
}
