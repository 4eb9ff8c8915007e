package keystore

// This file implements CachedStore, an in-process cache of key records in
// front of a Store, so that validating a known key costs no store round trip.
//
// Every cached record remembers when it was read from the store (loadedAt).
// A lookup then takes one of these paths:
//
//	age < Refresh            hit: served as is
//	Refresh <= age < TTL     stale: served as is, until the background loop
//	                         re-reads it
//
// The background loop re-reads every record used in the last WarmFor (5
// minutes) once it is Refresh old, in batches (one MGET for up to 128 keys
// on Redis). A store that keeps a records version (Redis, not on a
// Cluster: see RedisStore.RecordsVersion) spares most of that: while the
// version does not move, one read of it confirms every record read since it
// last moved, and records are re-read only after it moved, and every 5
// minutes regardless. So a key in use, even one used once a minute, is always
// answered from the cache, and the store sees a handful of commands per
// second however many requests there are; and such a key keeps working
// through a store outage (its record was read moments before).
//
//	age >= TTL               re-read from the store before it is served (one
//	                         read per digest, however many requests wait)
//	not cached               read from the store (one read per digest); an
//	                         unknown digest is remembered as unknown for TTL
//
// Writes made through the CachedStore (Create, Revoke, Update) invalidate the
// record locally at once and publish the digest through the Invalidator, so
// that every other instance drops it too. An Invalidator calls reset
// whenever it (re)subscribes, because messages sent while it was
// disconnected are lost: the whole cache is flushed then. If all of that
// fails, TTL still bounds how long a changed record can be served while the
// store is reachable.
//
// When a store read fails, the store is marked unreachable and probed in
// the background until it answers again. Until then no request waits for
// it: records read from the store less than OutageWindow ago keep being
// served, digests remembered as unknown stay unknown for TTL, and every
// other lookup fails at once with ErrUnavailable.

import (
	"context"
	"errors"
	"fmt"
	"hash/maphash"
	"math"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/maypok86/otter/v2"
)

// Defaults of [CacheOptions].
const (
	// DefaultCacheSize is how many key records the cache holds (and,
	// separately, how many unknown digests).
	DefaultCacheSize = 100_000
	// DefaultCacheTTL is the longest a record is served after it was read
	// from a reachable store.
	DefaultCacheTTL = 10 * time.Second
	// DefaultCacheRefresh is the age at which a record in use is re-read in
	// the background.
	DefaultCacheRefresh = 5 * time.Second
	// DefaultOutageWindow is how long after it was last read from the store
	// a record keeps being served while the store is unreachable.
	DefaultOutageWindow = 5 * time.Minute
	// DefaultCacheStoreTimeout bounds each store read the cache makes.
	DefaultCacheStoreTimeout = 2 * time.Second
)

const (
	// refreshBatch is how many records one background refresh reads at
	// once. Decoding them takes well under a millisecond, and the loop
	// yields between batches, so a refresh of many records does not hold
	// up requests on a server with a single CPU.
	refreshBatch = 128
	// probeInterval is how often an unreachable store is pinged.
	probeInterval = 250 * time.Millisecond
	// WarmFor is how long after its last use a record keeps being re-read
	// in the background; after that it is left to expire.
	WarmFor = 5 * time.Minute
	// usedResolution is how precisely a record's last use is recorded: a
	// hit writes the time only if the recorded one is older than this.
	usedResolution = int64(time.Second)
)

// coarseResolution is how often the shared coarse clock reads the time.
const coarseResolution = 10 * time.Millisecond

// sharedCoarseClock is the clock of every cache: of otter's expiry and,
// unless CacheOptions.Now is set, of the freshness decisions. It parks
// after a second without reads (see idleClock).
var sharedCoarseClock = sync.OnceValue(func() *idleClock {
	return newIdleClock(coarseResolution, int(time.Second/coarseResolution))
})

// ErrUnavailable is returned by [CachedStore.Lookup] when the store cannot
// be read and the cache cannot answer on its own: the store is known to be
// unreachable, or a read just failed (the error then wraps the cause).
var ErrUnavailable = errors.New("keystore: store unavailable")

// CacheOptions configures a [CachedStore]. Zero values mean the documented
// default.
type CacheOptions struct {
	// Size bounds the number of key records kept, and, separately, the
	// number of digests remembered as unknown; default 100000
	// ([DefaultCacheSize]). Eviction is by frequency and recency
	// (W-TinyLFU), so a flood of one-off digests does not push out keys in
	// use.
	Size int
	// TTL is the longest a record (or an unknown digest) is served after it
	// was read from the store, while the store is reachable; default 10s
	// ([DefaultCacheTTL]). It bounds staleness when an invalidation message
	// is lost.
	TTL time.Duration
	// Refresh is the age at which a record used in the last WarmFor is
	// re-read in the background (stale-while-revalidate); default 5s
	// ([DefaultCacheRefresh]) or TTL/2, whichever is less. It must be less
	// than TTL.
	Refresh time.Duration
	// OutageWindow is how long after it was last read from the store a
	// record keeps being served while the store is unreachable; default 5m
	// ([DefaultOutageWindow]). A negative value disables it: then no record
	// is served past TTL.
	OutageWindow time.Duration
	// StoreTimeout bounds each store read the cache makes (loads,
	// refreshes, probes); default 2s ([DefaultCacheStoreTimeout]).
	StoreTimeout time.Duration
	// Disabled turns caching off: every lookup reads the store. Writes
	// still publish invalidations, for the instances that do cache.
	Disabled bool

	// The fields below are fixed when the CachedStore is created;
	// Configure ignores them.

	// Invalidator carries invalidations to and from other instances; nil
	// means this process is the only writer (the bbolt store).
	Invalidator Invalidator
	// Observer receives counts, timings and failures; nil discards them.
	Observer CacheObserver
	// Now is the clock of the cache's freshness decisions. For tests; by
	// default a coarse clock shared by all caches, which a goroutine reads
	// every 10ms: reading it costs an atomic load instead of a clock read on
	// every lookup, and ages are off by at most 10ms.
	Now func() time.Time
}

// Invalidation tells caches that the record of Digest changed.
type Invalidation struct {
	// Digest is the key whose record changed.
	Digest Digest
	// Created says that the key was just created: only a cached "unknown"
	// for the digest is dropped (the creating instance has cached the
	// record itself). Otherwise the record is dropped.
	Created bool
}

// Invalidator carries [Invalidation]s between the instances that share a
// store.
type Invalidator interface {
	// Publish sends inv to every subscribed instance, this one included.
	Publish(ctx context.Context, inv Invalidation) error
	// Subscribe delivers invalidations to apply until ctx ends. It calls
	// reset each time it has (re)subscribed, before delivering anything
	// sent after that: whatever was sent while it was not subscribed is
	// lost, so the caller must forget everything it cached. flushAll
	// messages (sent by an operator) call reset too.
	Subscribe(ctx context.Context, apply func(Invalidation), reset func())
}

// LookupResult is how the cache answered one lookup, for metrics.
type LookupResult string

// Lookup results, as reported to [CacheObserver.CacheLookup].
const (
	// LookupHit: a record younger than Refresh.
	LookupHit LookupResult = "hit"
	// LookupStale: a record older than Refresh (but younger than TTL),
	// served while it is re-read in the background.
	LookupStale LookupResult = "stale"
	// LookupNegativeHit: a digest remembered as unknown.
	LookupNegativeHit LookupResult = "negative_hit"
	// LookupMiss: not cached (or older than TTL): read from the store.
	LookupMiss LookupResult = "miss"
	// LookupOutage: a record older than TTL served because the store is
	// unreachable (within OutageWindow).
	LookupOutage LookupResult = "outage"
	// LookupUnavailable: the store is unreachable and the cache had no
	// usable answer.
	LookupUnavailable LookupResult = "unavailable"
	// LookupBypass: the cache is disabled; the store was read.
	LookupBypass LookupResult = "bypass"
)

// CacheObserver receives what a [CachedStore] does. Its methods are called
// on the request path and must be quick and safe for concurrent use.
type CacheObserver interface {
	// CacheLookup counts the outcome of one lookup.
	CacheLookup(LookupResult)
	// StoreCall reports one call of the underlying store: op is its method
	// in snake case ("by_digest", "by_digests" for a batch, "create", ...),
	// err its result (ErrNotFound included).
	StoreCall(op string, took time.Duration, err error)
	// StoreHealth reports that the store was marked unreachable (up false,
	// err the failure) or answered again (up true).
	StoreHealth(up bool, err error)
	// Invalidated counts dropped cache entries by source: "local" (a write
	// through this instance), "remote" (an invalidation message) or
	// "flush" (everything, on (re)subscribe).
	Invalidated(source string)
	// KeyMinted and KeyRevoked count successful creates and revocations.
	KeyMinted()
	KeyRevoked()
	// Error reports a failure that no caller sees, such as a failed publish.
	Error(msg string, err error)
}

// CachedStore is a [Store] with an in-process cache of key records by
// digest, fleet-wide invalidation and outage handling; see the file
// comment. Create it with [NewCachedStore]. Lookup and Peek answer from
// the cache, in the compact form of [CachedKey]; the writes go to the
// store and invalidate; every other method, ByDigest included, goes
// straight to the underlying store.
type CachedStore struct {
	inner       Store
	bulk        bulkReader      // inner, if it reads many digests at once
	ver         versionReader   // inner, if it keeps a records version
	versions    []versionSample // of the refresh loop's passes, oldest first
	lastFull    atomic.Int64    // when the refresh last ignored the version (preciseNano)
	walkedSince int64           // the coverage the refresh last walked the records for
	conf        atomic.Pointer[confirmation]
	preciseNano func() int64
	raw         rawReader    // inner, if it can also hand records undecoded
	seed        maphash.Seed // of the records' checksums
	pos         *otter.Cache[Digest, CachedKey]
	neg         *otter.Cache[Digest, negEntry]
	loader      otter.Loader[Digest, CachedKey]
	inval       Invalidator
	obs         CacheObserver
	nowNano     func() int64
	ttl         atomic.Int64 // nanoseconds
	refresh     atomic.Int64
	window      atomic.Int64 // <= 0: disabled
	timeout     atomic.Int64
	disabled    atomic.Bool
	gen         atomic.Uint64 // bumped by every flush
	seq         atomic.Uint64 // bumped by every invalidation and flush
	down        atomic.Bool   // the store is known to be unreachable
	probing     atomic.Bool
	ctx         context.Context // ends with Close
	cancel      context.CancelFunc
	wg          sync.WaitGroup
	closeOnce   sync.Once
	closeResult error

	usesMu   sync.Mutex
	leftUses map[string]int64 // key ID: uncollected use of a record that left the cache (see uses.go)
}

// negEntry remembers that a digest was not in the store.
type negEntry struct {
	loadedAt int64
	gen      uint64
}

// bulkReader is implemented by stores that read many digests in one round
// trip.
type bulkReader interface {
	// ByDigests returns the records of ds, in order, with nil for a digest
	// that has no record.
	ByDigests(ctx context.Context, ds []Digest) ([]*Key, error)
}

// versionReader is implemented by stores that keep a version of their key
// records (see [RedisStore.RecordsVersion]).
type versionReader interface {
	RecordsVersion(ctx context.Context) (v int64, ok bool, err error)
}

// rawReader is implemented by stores that can hand records undecoded: the
// cache keeps a checksum of each, and a background refresh decodes only
// the records that changed.
type rawReader interface {
	// RawByDigest returns the stored record of d, or ErrNotFound.
	RawByDigest(ctx context.Context, d Digest) (string, error)
	// RawByDigests returns the stored records of ds, in order, with "" for
	// a digest that has no record.
	RawByDigests(ctx context.Context, ds []Digest) ([]string, error)
	// DecodeRecord decodes a record RawByDigests returned for d.
	DecodeRecord(d Digest, raw string) (*Key, error)
}

var _ Store = (*CachedStore)(nil)

// NewCachedStore returns a CachedStore in front of inner and starts its
// background work (refreshing records in use, and receiving invalidations
// when opts.Invalidator is set). Close stops it and closes inner.
func NewCachedStore(inner Store, opts CacheOptions) (*CachedStore, error) {
	c := &CachedStore{inner: inner, inval: opts.Invalidator, obs: opts.Observer}
	if c.obs == nil {
		c.obs = nopObserver{}
	}
	if opts.Now != nil {
		c.nowNano = func() int64 { return opts.Now().UnixNano() }
		c.preciseNano = c.nowNano
	} else {
		c.nowNano = sharedCoarseClock().NowNano
		c.preciseNano = func() int64 { return time.Now().UnixNano() }
	}
	c.bulk, _ = inner.(bulkReader)
	c.raw, _ = inner.(rawReader)
	c.ver, _ = inner.(versionReader)
	c.seed = maphash.MakeSeed()
	if err := c.Configure(opts); err != nil {
		return nil, err
	}
	size := c.size(opts)
	var err error
	c.pos, err = otter.New(&otter.Options[Digest, CachedKey]{
		MaximumSize: size,
		// Otter only reclaims memory here; freshness is decided by Lookup
		// with loadedAt, on the cache's own clock.
		ExpiryCalculator: otter.ExpiryWritingFunc(func(otter.Entry[Digest, CachedKey]) time.Duration {
			return c.expiry()
		}),
		// Never refreshes by itself; Refresh is called explicitly for
		// records past TTL, to re-read them with one read per digest while
		// keeping the old record for the outage window if the read fails.
		RefreshCalculator: otter.RefreshWriting[Digest, CachedKey](100 * 365 * 24 * time.Hour),
		OnAtomicDeletion:  c.onDeletion,
		Logger:            otterLogger{c.obs},
		Clock:             sharedCoarseClock(),
	})
	if err != nil {
		return nil, fmt.Errorf("keystore: cache: %w", err)
	}
	c.neg, err = otter.New(&otter.Options[Digest, negEntry]{
		MaximumSize: size,
		ExpiryCalculator: otter.ExpiryWritingFunc(func(otter.Entry[Digest, negEntry]) time.Duration {
			return time.Duration(c.ttl.Load())
		}),
		Logger: otterLogger{c.obs},
		Clock:  sharedCoarseClock(),
	})
	if err != nil {
		return nil, fmt.Errorf("keystore: cache: %w", err)
	}
	c.loader = otter.LoaderFunc[Digest, CachedKey](c.load)

	c.ctx, c.cancel = context.WithCancel(context.Background())
	c.wg.Add(1)
	go c.refreshLoop()
	if c.inval != nil {
		c.wg.Add(1)
		go func() {
			defer c.wg.Done()
			c.inval.Subscribe(c.ctx, c.applyRemote, func() { c.flush() })
		}()
	}
	return c, nil
}

// Configure changes the cache's settings (all but the fields documented as
// fixed). A shared store is reconfigured on every config reload.
func (c *CachedStore) Configure(opts CacheOptions) error {
	ttl := opts.TTL
	if ttl == 0 {
		ttl = DefaultCacheTTL
	}
	refresh := opts.Refresh
	if refresh == 0 {
		refresh = min(DefaultCacheRefresh, ttl/2)
	}
	window := opts.OutageWindow
	if window == 0 {
		window = DefaultOutageWindow
	}
	timeout := opts.StoreTimeout
	if timeout == 0 {
		timeout = DefaultCacheStoreTimeout
	}
	switch {
	case opts.Size < 0:
		return fmt.Errorf("keystore: cache size must not be negative, got %d", opts.Size)
	case ttl < 0 || refresh < 0 || timeout < 0:
		return errors.New("keystore: cache durations must not be negative")
	case refresh >= ttl:
		return fmt.Errorf("keystore: cache refresh (%s) must be less than its TTL (%s)", refresh, ttl)
	}
	c.ttl.Store(int64(ttl))
	c.refresh.Store(int64(refresh))
	c.window.Store(int64(window))
	c.timeout.Store(int64(timeout))
	c.disabled.Store(opts.Disabled)
	if c.pos != nil {
		size := uint64(c.size(opts))
		if c.pos.GetMaximum() != size {
			c.pos.SetMaximum(size)
			c.neg.SetMaximum(size)
		}
	}
	return nil
}

func (c *CachedStore) size(opts CacheOptions) int {
	if opts.Size == 0 {
		return DefaultCacheSize
	}
	return opts.Size
}

// Inner returns the underlying store.
func (c *CachedStore) Inner() Store { return c.inner }

// Lookup returns the record with digest d in its cached form, from the
// cache when it can (see the file comment), or ErrNotFound, or an error
// wrapping ErrUnavailable. Like ByDigest it returns revoked and expired
// records too.
//
// ctx only bounds how long the caller waits; each store read is bounded by
// StoreTimeout and is not cancelled when one of the callers waiting for it
// goes away.
func (c *CachedStore) Lookup(ctx context.Context, d Digest) (CachedKey, error) {
	if c.disabled.Load() {
		return c.lookupUncached(ctx, d)
	}
	now := c.nowNano()
	gen := c.gen.Load()
	if e, ok := c.pos.GetIfPresent(d); ok {
		if c.servable(e, now, gen) {
			return e, nil
		}
		// Too old to be served while the store is reachable.
		age := now - c.confirmedAt(e.st)
		if !c.down.Load() {
			c.obs.CacheLookup(LookupMiss)
			fresh, err := c.reload(ctx, d)
			if err == nil || errors.Is(err, ErrNotFound) {
				return fresh, err
			}
		}
		if w := c.window.Load(); w > 0 && e.st.gen.Load() == gen && age < w {
			c.obs.CacheLookup(LookupOutage)
			return e, nil
		}
		c.obs.CacheLookup(LookupUnavailable)
		return CachedKey{}, ErrUnavailable
	}
	if n, ok := c.neg.GetIfPresent(d); ok && n.gen == gen && now-n.loadedAt < c.ttl.Load() {
		c.obs.CacheLookup(LookupNegativeHit)
		return CachedKey{}, ErrNotFound
	}
	if c.down.Load() {
		c.obs.CacheLookup(LookupUnavailable)
		return CachedKey{}, ErrUnavailable
	}
	c.obs.CacheLookup(LookupMiss)
	e, err := c.pos.Get(ctx, d, c.loader)
	if errors.Is(err, otter.ErrNotFound) {
		err = ErrNotFound
	}
	return e, err
}

// Peek returns the record with digest d if the cache can serve it as it
// is (a hit, or a stale record being refreshed), without reading the
// store; ok is false otherwise. It counts as a lookup (records the use,
// reports a hit) when it finds one.
func (c *CachedStore) Peek(d Digest) (k CachedKey, ok bool) {
	if c.disabled.Load() {
		return CachedKey{}, false
	}
	e, ok := c.pos.GetIfPresent(d)
	if !ok || !c.servable(e, c.nowNano(), c.gen.Load()) {
		return CachedKey{}, false
	}
	return e, true
}

// servable reports whether e may be served without reading the store, and
// if so records the use and counts the lookup.
func (c *CachedStore) servable(e CachedKey, now int64, gen uint64) bool {
	st := e.st
	if st.gen.Load() != gen {
		return false
	}
	if now-st.lastUsed.Load() >= usedResolution {
		st.lastUsed.Store(now)
	}
	age := now - c.confirmedAt(st)
	if age < c.refresh.Load() {
		c.obs.CacheLookup(LookupHit)
		return true
	}
	if age < c.ttl.Load() {
		c.obs.CacheLookup(LookupStale)
		return true
	}
	return false
}

// reload re-reads a cached record that is too old, joining a read of it
// that is already running. On failure the old record stays cached.
func (c *CachedStore) reload(ctx context.Context, d Digest) (CachedKey, error) {
	ch := c.pos.Refresh(ctx, d, c.loader)
	select {
	case res := <-ch:
		switch {
		case res.Err == nil:
			return res.Value, nil
		case errors.Is(res.Err, otter.ErrNotFound):
			return CachedKey{}, ErrNotFound
		default:
			return CachedKey{}, res.Err
		}
	case <-ctx.Done():
		return CachedKey{}, fmt.Errorf("%w: %w", ErrUnavailable, ctx.Err())
	}
}

// lookupUncached reads d from the store, for a disabled cache.
func (c *CachedStore) lookupUncached(ctx context.Context, d Digest) (CachedKey, error) {
	c.obs.CacheLookup(LookupBypass)
	ctx, cancel := context.WithTimeout(ctx, time.Duration(c.timeout.Load()))
	defer cancel()
	loadedAt := c.nowNano()
	start := time.Now()
	k, err := c.inner.ByDigest(ctx, d)
	c.obs.StoreCall("by_digest", time.Since(start), err)
	if err == nil && !c.matches(k, d) {
		err = ErrNotFound
	}
	if err != nil {
		return CachedKey{}, err
	}
	e := newCachedKey(k, loadedAt, c.gen.Load())
	e.st.reported.Store(detachedUse) // not cached: its uses are not collected
	return e, nil
}

// load reads one record for the cache (otter calls it on a miss and for
// Refresh, once per digest however many lookups wait for it).
func (c *CachedStore) load(ctx context.Context, d Digest) (CachedKey, error) {
	gen, seq := c.gen.Load(), c.seq.Load()
	loadedAt := c.nowNano()
	// A load of d that found nothing may have finished between the
	// caller's look at the unknown digests and this load.
	if n, ok := c.neg.GetIfPresent(d); ok && n.gen == gen && loadedAt-n.loadedAt < c.ttl.Load() {
		return CachedKey{}, otter.ErrNotFound
	}
	// Not cancelled with the first caller: others may be waiting for it.
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Duration(c.timeout.Load()))
	defer cancel()
	start := time.Now()
	k, sum, err := c.readOne(ctx, d)
	c.obs.StoreCall("by_digest", time.Since(start), err)
	if err == nil && !c.matches(k, d) {
		err = ErrNotFound
	}
	switch {
	case err == nil:
		c.markUp()
		c.neg.Invalidate(d)
		e := newCachedKey(k, loadedAt, gen)
		e.st.sum = sum
		e.st.lastUsed.Store(loadedAt) // read for a request
		return e, nil
	case errors.Is(err, ErrNotFound):
		c.markUp()
		// Not remembered if an invalidation (such as the key's creation)
		// arrived meanwhile.
		if c.seq.Load() == seq {
			c.neg.Set(d, negEntry{loadedAt: loadedAt, gen: gen})
		}
		return CachedKey{}, otter.ErrNotFound
	default:
		c.markDown(err)
		return CachedKey{}, fmt.Errorf("%w: %w", ErrUnavailable, err)
	}
}

// readOne reads the record of d and, when the store hands records
// undecoded, its checksum (else 0). A record that cannot be decoded, or
// that is another digest's, is reported and treated as missing, as in a
// background refresh.
func (c *CachedStore) readOne(ctx context.Context, d Digest) (*Key, uint64, error) {
	if c.raw == nil {
		k, err := c.inner.ByDigest(ctx, d)
		return k, 0, err
	}
	raw, err := c.raw.RawByDigest(ctx, d)
	if err != nil {
		return nil, 0, err
	}
	k, err := c.raw.DecodeRecord(d, raw)
	if err != nil {
		// The store answered: the record itself is unusable.
		c.obs.Error("key cache: a stored key record cannot be decoded; treated as missing", err)
		return nil, 0, ErrNotFound
	}
	return k, maphash.String(c.seed, raw), nil
}

// matches reports whether k, read from the store for digest d, is the
// record of d. Stores check this themselves; a record that fails it (a
// corrupted store) is reported and treated as missing.
func (c *CachedStore) matches(k *Key, d Digest) bool {
	if k.Digest.Equal(d) {
		return true
	}
	c.obs.Error("key cache: the store returned a record under another digest; treated as missing", fmt.Errorf("key %s", k.ID))
	return false
}

// expiry is how long otter keeps an entry after it was written (or
// renewed): memory is reclaimed then. Freshness is decided by Lookup.
func (c *CachedStore) expiry() time.Duration {
	return time.Duration(max(c.ttl.Load(), c.window.Load()) + c.refresh.Load())
}

// refreshLoop re-reads, in batches, the records used in the last WarmFor
// that are older than Refresh, until Close.
func (c *CachedStore) refreshLoop() {
	defer c.wg.Done()
	t := time.NewTimer(0)
	defer t.Stop()
	for {
		select {
		case <-c.ctx.Done():
			return
		case <-t.C:
		}
		if !c.disabled.Load() && !c.down.Load() {
			c.refreshDue()
		}
		t.Reset(c.refreshTick())
	}
}

// refreshTick is the pause of the refresh loop: short enough that a record
// due at Refresh is refreshed before TTL, long enough that a cache of many
// records is not walked more often than it needs to be.
func (c *CachedStore) refreshTick() time.Duration {
	refresh, ttl := c.refresh.Load(), c.ttl.Load()
	return max(time.Duration(min(refresh/2, (ttl-refresh)/2)), 10*time.Millisecond)
}

// versionSample is a records version (see [RedisStore.RecordsVersion]) and
// the precise time its read returned.
type versionSample struct{ at, v int64 }

// fullRefreshEvery is how often the refresh re-reads every record in use
// even though the records version says nothing changed.
const fullRefreshEvery = 5 * time.Minute

// maxVersionSamples bounds the history of versions the refresh keeps:
// a few minutes of refresh passes, far more than a record waits to be
// refreshed.
const maxVersionSamples = 64

// unchangedSince reads the store's records version and returns the time
// (cache clock) from which no record has changed: records read since then
// are still current. It returns math.MaxInt64 when it cannot tell (no
// version on this store, or it just changed), and ok false when the store
// failed.
func (c *CachedStore) unchangedSince() (since int64, ok bool) {
	since = math.MaxInt64
	if c.ver == nil {
		return since, true
	}
	ctx, cancel := context.WithTimeout(c.ctx, time.Duration(c.timeout.Load()))
	start := time.Now()
	v, supported, err := c.ver.RecordsVersion(ctx)
	cancel()
	c.obs.StoreCall("records_version", time.Since(start), err)
	if err != nil {
		if c.ctx.Err() == nil {
			c.markDown(err)
		}
		return since, false
	}
	if !supported {
		return since, true
	}
	c.markUp()
	if now := c.preciseNano(); now-c.lastFull.Load() >= int64(fullRefreshEvery) {
		// A full pass now and then, whatever the version says: a change
		// that did not move it (a hand edit, an instance of an earlier
		// version) is served for at most fullRefreshEvery plus TTL.
		c.lastFull.Store(now)
		c.versions = c.versions[:0]
	}
	// The earliest pass that saw the same version: nothing changed between
	// the end of its read and now. A record whose read started after that
	// is current. (The version read of that pass ended at a precise time;
	// records are stamped with the cache's clock, which may lag.)
	for i := len(c.versions) - 1; i >= 0 && c.versions[i].v == v; i-- {
		since = c.versions[i].at
	}
	sample := versionSample{at: c.preciseNano(), v: v}
	if n := len(c.versions); n >= 2 && c.versions[n-1].v == v && c.versions[n-2].v == v {
		// A run of one version needs only its first sample (since) and
		// its latest (see refreshBatch). Kept at two, the run's first
		// sample is never trimmed below: since stays put for as long as
		// nothing changes, and the records are not walked again.
		c.versions[n-1] = sample
	} else {
		c.versions = append(c.versions, sample)
	}
	if n := len(c.versions); n > maxVersionSamples {
		c.versions = append(c.versions[:0], c.versions[n-maxVersionSamples:]...)
	}
	return since, true
}

// confirmation says that every record read from the store at or after
// since (cache clock) was still current at at: the store's records version
// had not moved (see unchangedSince).
// prev is the last confirmation of the previous since, which stays true
// for the records it covered until they are read again.
type confirmation struct {
	since, at int64
	prev      *confirmation
}

// confirmedAt returns the latest time at which the record of st is known to
// have been current: when it was read, or the last confirmation that covers
// it.
func (c *CachedStore) confirmedAt(st *entryState) int64 {
	best := st.loadedAt.Load()
	loaded := best
	for cf := c.conf.Load(); cf != nil; cf = cf.prev {
		if loaded >= cf.since && cf.at > best {
			best = cf.at
		}
	}
	return best
}

// confirm records that the records read at or after since were current at
// at.
func (c *CachedStore) confirm(since, at int64) {
	next := &confirmation{since: since, at: at}
	if cur := c.conf.Load(); cur != nil {
		if cur.since == since {
			next.prev = cur.prev
		} else {
			next.prev = &confirmation{since: cur.since, at: cur.at}
		}
	}
	c.conf.Store(next)
}

// refreshDue re-reads every record in use that is older than Refresh,
// except those the store's records version shows unchanged since they were
// read: one confirmation covers those, without a read and without a visit.
// The records are walked only when there may be records to re-read: when
// the version moved, after a full pass (see unchangedSince), and when
// there is no version.
func (c *CachedStore) refreshDue() {
	now, refresh, gen := c.nowNano(), c.refresh.Load(), c.gen.Load()
	since, ok := c.unchangedSince()
	if !ok {
		return
	}
	// A full pass (since unknown) keeps the last confirmation: it is still
	// true, and the records it covers stay servable while they are read.
	if since != math.MaxInt64 {
		// now was read before the version: the records were current then.
		c.confirm(since, now)
		if since == c.walkedSince {
			// Walked already for this coverage: records read before since
			// and due were re-read then; those read since are covered.
			return
		}
	}
	c.walkedSince = since
	var (
		due   []Digest
		olds  []CachedKey
		renew []Digest
	)
	for d, e := range c.pos.All() {
		st := e.st
		loaded := st.loadedAt.Load()
		if used := st.lastUsed.Load(); st.gen.Load() == gen && used != 0 && now-used < int64(WarmFor) {
			if loaded >= since {
				// Covered by the confirmation. Keep it in memory.
				if c.memoryDue(st, now) {
					renew = append(renew, d)
				}
				continue
			}
			if now-loaded >= refresh {
				due = append(due, d)
				olds = append(olds, e)
			}
		}
	}
	for _, d := range renew {
		c.pos.SetExpiresAfter(d, c.expiry())
	}
	for i := 0; i < len(due) && c.ctx.Err() == nil && !c.down.Load(); i += refreshBatch {
		j := min(i+refreshBatch, len(due))
		c.refreshBatch(due[i:j], olds[i:j])
		runtime.Gosched()
	}
}

// memoryDue reports whether the memory of a renewed record (otter's expiry,
// see expiry) should be renewed too: once half of it has passed, rather
// than on every refresh, which would cost a write to otter's timer wheel per
// record every Refresh.
func (c *CachedStore) memoryDue(st *entryState, now int64) bool {
	set := st.expirySet.Load()
	return now-set >= int64(c.expiry())/2 && st.expirySet.CompareAndSwap(set, now)
}

// refreshBatch re-reads the records of ds and updates each cached entry
// that is still the one it was read for (olds); an entry invalidated or
// replaced meanwhile is left alone. A record that has not changed since it
// was last read raw (same checksum) is not decoded again: its entry is
// renewed in place, which costs no allocation.
func (c *CachedStore) refreshBatch(ds []Digest, olds []CachedKey) {
	gen := c.gen.Load()
	loadedAt := c.nowNano()
	if n := len(c.versions); n > 0 {
		// The read starts after the last version read ended: stamping it
		// with that precise time (the cache's clock may lag) keeps it
		// covered by the confirmations that follow.
		loadedAt = max(loadedAt, c.versions[n-1].at)
	}
	ctx, cancel := context.WithTimeout(c.ctx, time.Duration(c.timeout.Load()))
	nexts, err := c.readBatch(ctx, ds, olds, loadedAt, gen)
	cancel()
	if err != nil {
		if c.ctx.Err() == nil {
			c.markDown(err)
		}
		return
	}
	c.markUp()
	for i, d := range ds {
		old, next := olds[i], nexts[i]
		renewed := false
		c.pos.ComputeIfPresent(d, func(cur CachedKey) (CachedKey, otter.ComputeOp) {
			switch {
			case cur.st != old.st: // invalidated or replaced meanwhile
				return cur, otter.CancelOp
			case next.st == nil: // gone from the store, or unreadable
				return cur, otter.InvalidateOp
			case next.st == old.st: // unchanged
				cur.st.loadedAt.Store(loadedAt)
				cur.st.gen.Store(gen)
				renewed = true
				return cur, otter.CancelOp
			default:
				next.st.lastUsed.Store(old.st.lastUsed.Load())
				return next, otter.WriteOp
			}
		})
		if renewed && c.memoryDue(old.st, loadedAt) {
			// Not inside the function above: it holds otter's lock.
			c.pos.SetExpiresAfter(d, c.expiry())
		}
	}
}

// readBatch reads the records of ds from the store and returns what to
// replace olds with: a new entry for a changed record, the old entry for
// an unchanged one, and a zero CachedKey where a record is gone or cannot
// be decoded.
func (c *CachedStore) readBatch(ctx context.Context, ds []Digest, olds []CachedKey, loadedAt int64, gen uint64) ([]CachedKey, error) {
	nexts := make([]CachedKey, len(ds))
	if c.raw == nil {
		keys, err := c.readMany(ctx, ds)
		if err != nil {
			return nil, err
		}
		for i, k := range keys {
			if k != nil && c.matches(k, ds[i]) {
				nexts[i] = newCachedKey(k, loadedAt, gen)
			}
		}
		return nexts, nil
	}
	start := time.Now()
	raws, err := c.raw.RawByDigests(ctx, ds)
	c.obs.StoreCall("by_digests", time.Since(start), err)
	if err != nil {
		return nil, err
	}
	for i, raw := range raws {
		if raw == "" {
			continue
		}
		sum := maphash.String(c.seed, raw)
		if olds[i].st.sum == sum {
			nexts[i] = olds[i]
			continue
		}
		k, err := c.raw.DecodeRecord(ds[i], raw)
		if err != nil {
			c.obs.Error("key cache: a stored key record cannot be decoded; dropped from the cache", err)
			continue
		}
		nexts[i] = newCachedKey(k, loadedAt, gen)
		nexts[i].st.sum = sum
	}
	return nexts, nil
}

// readMany reads the records of ds, nil where there is none.
func (c *CachedStore) readMany(ctx context.Context, ds []Digest) ([]*Key, error) {
	start := time.Now()
	if c.bulk != nil {
		keys, err := c.bulk.ByDigests(ctx, ds)
		c.obs.StoreCall("by_digests", time.Since(start), err)
		return keys, err
	}
	keys := make([]*Key, len(ds))
	for i, d := range ds {
		k, err := c.inner.ByDigest(ctx, d)
		switch {
		case err == nil:
			keys[i] = k
		case !errors.Is(err, ErrNotFound):
			c.obs.StoreCall("by_digests", time.Since(start), err)
			return nil, err
		}
	}
	c.obs.StoreCall("by_digests", time.Since(start), nil)
	return keys, nil
}

// markDown records that the store failed, and starts probing it.
func (c *CachedStore) markDown(err error) {
	if c.down.CompareAndSwap(false, true) {
		c.obs.StoreHealth(false, err)
	}
	if c.probing.CompareAndSwap(false, true) {
		c.wg.Add(1)
		go c.probe()
	}
}

// observe reports a call of the underlying store; a call that worked also
// ends an outage at once, without waiting for the probe.
func (c *CachedStore) observe(op string, start time.Time, err error) {
	c.obs.StoreCall(op, time.Since(start), err)
	if Outcome(err) {
		c.markUp()
	}
}

// markUp records that the store answered.
func (c *CachedStore) markUp() {
	if c.down.Load() && c.down.CompareAndSwap(true, false) {
		c.obs.StoreHealth(true, nil)
	}
}

// probe pings the store every probeInterval until it answers (or Close).
func (c *CachedStore) probe() {
	defer c.wg.Done()
	for {
		c.probeUntilUp()
		c.probing.Store(false)
		// A markDown between the last ping and the line above saw probing
		// set and left the probing to this goroutine.
		if !c.down.Load() || c.ctx.Err() != nil || !c.probing.CompareAndSwap(false, true) {
			return
		}
	}
}

func (c *CachedStore) probeUntilUp() {
	t := time.NewTicker(probeInterval)
	defer t.Stop()
	for c.down.Load() {
		select {
		case <-c.ctx.Done():
			return
		case <-t.C:
		}
		ctx, cancel := context.WithTimeout(c.ctx, min(time.Duration(c.timeout.Load()), 4*probeInterval))
		err := c.inner.Ping(ctx)
		cancel()
		if err == nil {
			c.markUp()
		}
	}
}

// StoreUp reports whether the store is believed to be reachable.
func (c *CachedStore) StoreUp() bool { return !c.down.Load() }

// applyRemote applies an invalidation received from the Invalidator.
func (c *CachedStore) applyRemote(inv Invalidation) {
	c.seq.Add(1)
	if inv.Created {
		if _, ok := c.neg.Invalidate(inv.Digest); ok {
			c.obs.Invalidated("remote")
		}
		return
	}
	_, p := c.pos.Invalidate(inv.Digest)
	_, n := c.neg.Invalidate(inv.Digest)
	if p || n {
		c.obs.Invalidated("remote")
	}
}

// flush forgets everything: entries read before it are no longer served.
func (c *CachedStore) flush() {
	c.gen.Add(1)
	c.seq.Add(1)
	c.pos.InvalidateAll()
	c.neg.InvalidateAll()
	c.obs.Invalidated("flush")
}

// Flush drops every cached record and unknown digest.
func (c *CachedStore) Flush() { c.flush() }

// invalidate drops d locally and tells the other instances.
func (c *CachedStore) invalidate(ctx context.Context, d Digest) {
	c.seq.Add(1)
	c.pos.Invalidate(d)
	c.neg.Invalidate(d)
	c.obs.Invalidated("local")
	c.publish(ctx, Invalidation{Digest: d})
}

func (c *CachedStore) publish(ctx context.Context, inv Invalidation) {
	if c.inval == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Duration(c.timeout.Load()))
	defer cancel()
	start := time.Now()
	err := c.inval.Publish(ctx, inv)
	c.obs.StoreCall("publish", time.Since(start), err)
	if err != nil {
		c.obs.Error("publishing a key invalidation failed; other instances may serve the old record until their cache TTL passes", err)
	}
}

// ByDigest implements [Store.ByDigest]; it reads the store (the cache
// keeps only the compact form of records, which Lookup returns).
func (c *CachedStore) ByDigest(ctx context.Context, d Digest) (*Key, error) {
	start := time.Now()
	k, err := c.inner.ByDigest(ctx, d)
	c.observe("by_digest", start, err)
	return k, err
}

// Create implements [Store.Create]. The new record is cached at once, and
// the other instances drop any "unknown" they remember for its digest.
func (c *CachedStore) Create(ctx context.Context, k *Key) error {
	return c.create(ctx, k, func() error { return c.inner.Create(ctx, k) })
}

// CreateLimited implements [Store.CreateLimited] like Create.
func (c *CachedStore) CreateLimited(ctx context.Context, k *Key, limit int, now time.Time) error {
	return c.create(ctx, k, func() error { return c.inner.CreateLimited(ctx, k, limit, now) })
}

// create runs the inner store's create of k and caches k if it succeeded.
func (c *CachedStore) create(ctx context.Context, k *Key, inner func() error) error {
	start := time.Now()
	loadedAt := c.nowNano()
	gen := c.gen.Load()
	err := inner()
	c.observe("create", start, err)
	if err != nil {
		return err
	}
	c.obs.KeyMinted()
	c.seq.Add(1)
	c.neg.Invalidate(k.Digest)
	if !c.disabled.Load() {
		c.pos.Set(k.Digest, newCachedKey(k, loadedAt, gen))
	}
	c.publish(ctx, Invalidation{Digest: k.Digest, Created: true})
	return nil
}

// Revoke implements [Store.Revoke] and invalidates the key everywhere.
func (c *CachedStore) Revoke(ctx context.Context, id string, at time.Time) (*Key, error) {
	start := time.Now()
	k, err := c.inner.Revoke(ctx, id, at)
	c.observe("revoke", start, err)
	if err != nil {
		return nil, err
	}
	if k.RevokedAt != nil && k.RevokedAt.Equal(at) {
		c.obs.KeyRevoked()
	}
	c.invalidate(ctx, k.Digest)
	return k, nil
}

// Update implements [Store.Update] and invalidates the key everywhere.
func (c *CachedStore) Update(ctx context.Context, id string, fn func(*Key) error) (*Key, error) {
	var (
		wasRevoked bool
		fnErr      error
	)
	start := time.Now()
	k, err := c.inner.Update(ctx, id, func(k *Key) error {
		wasRevoked = k.RevokedAt != nil
		fnErr = fn(k)
		return fnErr
	})
	if err != nil && err == fnErr {
		// The caller's function refused the change (a conflict of its
		// own, such as a revoked key): the store answered, it did not fail.
		c.observe("update", start, nil)
	} else {
		c.observe("update", start, err)
	}
	if err != nil {
		return nil, err
	}
	if !wasRevoked && k.RevokedAt != nil {
		c.obs.KeyRevoked()
	}
	c.invalidate(ctx, k.Digest)
	return k, nil
}

// Get implements [Store.Get] (not cached).
func (c *CachedStore) Get(ctx context.Context, id string) (*Key, error) {
	start := time.Now()
	k, err := c.inner.Get(ctx, id)
	c.observe("get", start, err)
	return k, err
}

// List implements [Store.List] (not cached).
func (c *CachedStore) List(ctx context.Context, owner, cursor string, limit int) ([]*Key, string, error) {
	start := time.Now()
	keys, next, err := c.inner.List(ctx, owner, cursor, limit)
	c.observe("list", start, err)
	return keys, next, err
}

// RecordUsage implements [Store.RecordUsage].
func (c *CachedStore) RecordUsage(ctx context.Context, used map[string]time.Time) error {
	start := time.Now()
	err := c.inner.RecordUsage(ctx, used)
	c.observe("record_usage", start, err)
	return err
}

// CountOwner implements [Store.CountOwner].
func (c *CachedStore) CountOwner(ctx context.Context, owner string) (int, error) {
	start := time.Now()
	n, err := c.inner.CountOwner(ctx, owner)
	c.observe("count_owner", start, err)
	return n, err
}

// CountLive implements [Store.CountLive].
func (c *CachedStore) CountLive(ctx context.Context, owner string, now time.Time) (int, error) {
	start := time.Now()
	n, err := c.inner.CountLive(ctx, owner, now)
	c.observe("count_live", start, err)
	return n, err
}

// ReserveIdempotency implements [Store.ReserveIdempotency].
func (c *CachedStore) ReserveIdempotency(ctx context.Context, id string, rec *IdempotencyRecord, ttl time.Duration) (*IdempotencyRecord, error) {
	start := time.Now()
	got, err := c.inner.ReserveIdempotency(ctx, id, rec, ttl)
	c.observe("reserve_idempotency", start, err)
	return got, err
}

// GetIdempotency implements [Store.GetIdempotency].
func (c *CachedStore) GetIdempotency(ctx context.Context, id string) (*IdempotencyRecord, error) {
	start := time.Now()
	rec, err := c.inner.GetIdempotency(ctx, id)
	c.observe("get_idempotency", start, err)
	return rec, err
}

// ReplaceIdempotency implements [Store.ReplaceIdempotency].
func (c *CachedStore) ReplaceIdempotency(ctx context.Context, id, token string, rec *IdempotencyRecord, ttl time.Duration) error {
	start := time.Now()
	err := c.inner.ReplaceIdempotency(ctx, id, token, rec, ttl)
	c.observe("replace_idempotency", start, err)
	return err
}

// DeleteIdempotency implements [Store.DeleteIdempotency].
func (c *CachedStore) DeleteIdempotency(ctx context.Context, id, token string) error {
	start := time.Now()
	err := c.inner.DeleteIdempotency(ctx, id, token)
	c.observe("delete_idempotency", start, err)
	return err
}

// Ping implements [Store.Ping]; a successful ping also ends an outage.
func (c *CachedStore) Ping(ctx context.Context) error {
	err := c.inner.Ping(ctx)
	if err == nil {
		c.markUp()
	}
	return err
}

// Close stops the background work and closes the underlying store.
func (c *CachedStore) Close() error {
	c.closeOnce.Do(func() {
		c.cancel()
		c.wg.Wait()
		c.pos.StopAllGoroutines()
		c.neg.StopAllGoroutines()
		c.closeResult = c.inner.Close()
	})
	return c.closeResult
}

// nopObserver discards everything.
type nopObserver struct{}

func (nopObserver) CacheLookup(LookupResult)               {}
func (nopObserver) StoreCall(string, time.Duration, error) {}
func (nopObserver) StoreHealth(bool, error)                {}
func (nopObserver) Invalidated(string)                     {}
func (nopObserver) KeyMinted()                             {}
func (nopObserver) KeyRevoked()                            {}
func (nopObserver) Error(string, error)                    {}

// otterLogger passes otter's errors (not its warnings, which repeat the
// store errors the cache reports itself) to the observer.
type otterLogger struct{ obs CacheObserver }

func (otterLogger) Warn(context.Context, string, error) {}
func (l otterLogger) Error(_ context.Context, msg string, err error) {
	l.obs.Error("key cache: "+msg, err)
}
