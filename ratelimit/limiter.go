package ratelimit

import (
	"context"
	"errors"
	"fmt"
	"hash/maphash"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
)

// Defaults of [Options].
const (
	DefaultSyncInterval = time.Second
	DefaultTimeout      = 250 * time.Millisecond
)

// MaxWindow is the longest rate limit window: the shared backend keeps a
// bucket's state in a hash of the UTC day, read on the day after too.
const MaxWindow = 24 * time.Hour

// histEvery is how many syncs apart a shared backend gets daily counts.
const histEvery = 10

// quotaLease is how long quota tokens leased for a subject with no rate
// limit are kept while the subject is idle.
const quotaLease = 10 * time.Second

// minSyncInterval bounds how often the sync loop runs for short windows.
const minSyncInterval = 50 * time.Millisecond

// HistoryDays is the most days History returns; daily counts are kept as
// long.
const HistoryDays = 90

// idleEvict is how long a subject goes unseen before its state may be
// dropped (see evictIdle); sweepEvery is how many syncs apart the table is
// swept.
const (
	idleEvict  = 2 * time.Minute
	sweepEvery = 10
)

// nShards is the number of independently locked parts of the subject
// table; a power of two.
const nShards = 64

// Validate checks p's numbers: Limit and Quota not negative; a Window in
// (0, MaxWindow] and at least 1µs per request when Limit > 0; a Period
// when Quota > 0.
func (p *Policy) Validate() error {
	switch {
	case p.Limit < 0:
		return fmt.Errorf("ratelimit: plan %q: rate limit must not be negative", p.Name)
	case p.Limit > 0 && (p.Window <= 0 || p.Window > MaxWindow):
		return fmt.Errorf("ratelimit: plan %q: rate limit window must be in (0, %s], got %s", p.Name, MaxWindow, p.Window)
	case p.Limit > 0 && p.Window/time.Duration(p.Limit) < time.Microsecond:
		return fmt.Errorf("ratelimit: plan %q: at most one request per microsecond (%d per %s is more)", p.Name, p.Limit, p.Window)
	case p.Quota < 0:
		return fmt.Errorf("ratelimit: plan %q: quota must not be negative", p.Name)
	case p.Quota > 0 && p.Period != Day && p.Period != Month:
		return fmt.Errorf("ratelimit: plan %q: quota needs a period (day or month)", p.Name)
	}
	return nil
}

// quotaSlot is a subject's quota count of one period kind (day or
// month). A subject keeps one slot per kind, whichever its policy uses
// now: a policy that switches between quotas of different periods, or to
// no quota and back, moves between slots and loses no count. Times are
// Unix nanoseconds. 64 bytes: one cache line.
type quotaSlot struct {
	// The period [start, end); end is 0 while the slot is unused. base is
	// the count the backend had (file: accepted requests; shared: the
	// shared counter, which includes every instance's unspent leases);
	// held the tokens leased and not spent; local the requests counted
	// here that the backend has not seen yet.
	start, end        int64
	base, held, local int64
	quota             int64 // the quota the slot was last used with
	lastWant          int64 // the last lease's want (shared)
	loaded, empty     bool
	seen              bool // a request used the slot since the last sync
}

// used is the count the instance knows of.
func (q *quotaSlot) used() int64 { return q.base + q.local - q.held }

// state is one subject's limiter state. It holds no pointers, so a table
// of 100,000 subjects costs the garbage collector nothing to scan but the
// map of names. Times are Unix nanoseconds. The fields every request
// touches come first; the state is 256 bytes, so in a table of states
// each quota slot is one cache line and a request touches three.
type state struct {
	// The policy's rate numbers, as last seen.
	limit, window int64
	t, b          int64 // GCRA emission interval (ceil(Window/Limit)) and capacity (Limit×t); 0: no rate limit
	tat           int64 // local GCRA: theoretical arrival time
	demand        int64 // requests seen since the last sync
	lastSeen      int64 // the last request's time
	accepted      int64 // daily count of day not yet sent to the backend

	day      int32  // the day of the daily counts
	period   Period // the policy's quota period; NoPeriod: no quota
	leasing  bool   // a request is leasing for this subject
	dirty    bool   // listed in the shard's dirty list
	limited  int64  // daily counts of day not yet sent to the backend
	refused  int64
	lastWant int64 // the last rate lease's want (shared)

	// Shared backend: rate tokens leased and not yet spent, the time they
	// lapse, the time until which the shared bucket is known empty, and
	// the shared TAT at the last lease.
	held, leaseEnd, emptyUntil, sharedTAT int64

	// Quota counts per period kind: q[Day-1], q[Month-1].
	q [2]quotaSlot
}

// slot is the quota slot of the policy's period; st.period is not
// NoPeriod.
func (st *state) slot() *quotaSlot { return &st.q[st.period-1] }

// quotaPending reports whether any slot holds leased tokens or counts the
// backend has not seen.
func (st *state) quotaPending() bool {
	return st.q[0].held|st.q[0].local|st.q[1].held|st.q[1].local != 0
}

// shard is a locked part of the subject table.
type shard struct {
	mu    sync.Mutex
	cond  sync.Cond        // signalled when a lease completes
	idx   map[uint64]int32 // subject's 64-bit hash (maphash, random seed) -> index in st
	st    []state
	names []string
	dirty []int32     // subjects to sync
	spill []histDelta // daily counts of days already over
	_     [64]byte
}

// syncItem is one subject's part of a sync: a rate lease renewal (shared
// backends), quota lease or counts, and where to put the reply. Rate
// numbers are in microseconds, the unit shared state is kept in.
type syncItem struct {
	subject string

	rate      bool
	t, b      int64 // µs
	ret, want int64 // tokens returned (every token held) and wanted

	quota       bool
	period      Period
	qStart      int64 // Unix ns
	qEnd        int64
	q           int64
	qRet, qWant int64
	qAdd        int64 // counted without a lease: added unconditionally

	// Replies.
	grant, tatUS  int64
	qGrant, count int64

	// Bookkeeping of the Limiter.
	shard, idx         int32
	heldKept, qHeldKep int64
}

// histDelta is counts to add to a subject's day.
type histDelta struct {
	subject                    string
	day                        int32
	accepted, limited, refused int64
}

// Limiter decides requests against policies. Its methods are safe for
// concurrent use.
type Limiter struct {
	be       Backend
	shared   bool
	now      func() time.Time
	interval time.Duration
	timeout  time.Duration
	log      *zap.Logger
	seed     maphash.Seed

	shards [nShards]shard

	degraded atomic.Bool
	minH     atomic.Int64 // shortest lease lifetime seen, ns (shared)

	syncMu    sync.Mutex  // one sync at a time
	syncs     int64       // syncs run
	retryHist []histDelta // daily counts a failed sync did not send

	stop      chan struct{}
	done      chan struct{}
	closeOnce sync.Once
	closeErr  error
}

// New returns a Limiter running its sync loop until Close.
func New(opts Options) (*Limiter, error) { return newLimiterLoop(opts, true) }

// newLimiterLoop is New; without loop, Sync runs only when called (tests
// that step a clock).
func newLimiterLoop(opts Options, loop bool) (*Limiter, error) {
	if opts.Backend == nil {
		return nil, errors.New("ratelimit: Options.Backend is required")
	}
	l := &Limiter{
		be:       opts.Backend,
		shared:   opts.Backend.Shared(),
		now:      opts.Now,
		interval: opts.SyncInterval,
		timeout:  opts.Timeout,
		log:      opts.Logger,
		seed:     maphash.MakeSeed(),
		stop:     make(chan struct{}),
		done:     make(chan struct{}),
	}
	if l.now == nil {
		l.now = time.Now
	}
	if l.interval <= 0 {
		l.interval = DefaultSyncInterval
	}
	if l.timeout <= 0 {
		l.timeout = DefaultTimeout
	}
	if l.log == nil {
		l.log = zap.NewNop()
	}
	for i := range l.shards {
		sh := &l.shards[i]
		sh.idx = make(map[uint64]int32)
		sh.cond.L = &sh.mu
	}
	if loop {
		go l.loop()
	} else {
		close(l.done)
	}
	return l, nil
}

// Degraded reports whether the shared Backend was unreachable at the last
// attempt: requests are then decided by each instance alone (rate limits
// with the full limit per instance, quotas counted locally and added to
// the shared count when it is back).
func (l *Limiter) Degraded() bool { return l.degraded.Load() }

// shardOf returns subject's shard and hash. Subjects are told apart by a
// 64-bit hash under a per-process random seed: the table then holds no
// pointer for the garbage collector to follow and a lookup reads no
// string. Two subjects of 100,000 share a hash with probability about
// 3e-10 (and then share their limits); subjects are IDs the server mints,
// and the seed is secret, so no client can aim for a collision.
func (l *Limiter) shardOf(subject string) (*shard, uint64) {
	h := maphash.String(l.seed, subject)
	return &l.shards[h>>58], h
}

// lookup returns the index of the subject of hash h in sh, adding it if
// new. sh.mu is held.
func (l *Limiter) lookup(sh *shard, subject string, h uint64, now int64) int32 {
	if i, ok := sh.idx[h]; ok {
		return i
	}
	i := int32(len(sh.st))
	sh.st = append(sh.st, state{day: dayOf(now)})
	sh.names = append(sh.names, strings.Clone(subject))
	sh.idx[h] = i
	return i
}

// find returns the index of subject in sh, if seen. sh.mu is held.
func (sh *shard) find(h uint64) (int32, bool) {
	i, ok := sh.idx[h]
	return i, ok
}

// setPolicy brings st up to date with p at now. sh.mu is held.
func (st *state) setPolicy(p *Policy, now int64) {
	if p.Limit != st.limit || int64(p.Window) != st.window {
		oldT := st.t
		st.limit, st.window = p.Limit, int64(p.Window)
		st.t, st.b = 0, 0
		if p.Limit > 0 && p.Window > 0 {
			st.t = (int64(p.Window) + p.Limit - 1) / p.Limit
			st.b = st.t * p.Limit
			if st.tat > now && oldT > 0 {
				// Keep the number of tokens used, at the new interval.
				used := (st.tat - now + oldT - 1) / oldT
				st.tat = now + min(used*st.t, st.b)
			}
		}
		// Tokens leased under the old numbers are not spent under the
		// new ones: a lower limit would otherwise admit every instance's
		// old lease on top of the new burst. They are dropped, not
		// returned (the shared bucket keeps them as used: never more
		// admitted than the bound, at worst a little less), and the next
		// request leases at the new interval.
		st.held, st.leaseEnd, st.emptyUntil = 0, 0, 0
		st.lastWant = 0
	}
	if p.Quota <= 0 || (p.Period != Day && p.Period != Month) {
		st.period = NoPeriod // the slots keep their counts
		return
	}
	st.period = p.Period
	q := &st.q[p.Period-1]
	if now < q.start || now >= q.end {
		// A new period: counts of the old one no longer matter (the daily
		// counts are kept apart).
		*q = quotaSlot{}
		q.start, q.end = periodBounds(p.Period, now)
	}
	if q.quota != p.Quota {
		q.quota, q.empty = p.Quota, false
	}
}

// rollDay moves subject i's pending daily counts aside when the day has
// changed.
func (sh *shard) rollDay(i int32, now int64) {
	st := &sh.st[i]
	d := dayOf(now)
	if d == st.day {
		return
	}
	if st.accepted|st.limited|st.refused != 0 {
		sh.spill = append(sh.spill, histDelta{sh.names[i], st.day, st.accepted, st.limited, st.refused})
	}
	st.day, st.accepted, st.limited, st.refused = d, 0, 0, 0
}

func (sh *shard) markDirty(i int32) {
	if st := &sh.st[i]; !st.dirty {
		st.dirty = true
		sh.dirty = append(sh.dirty, i)
	}
}

// Allow decides one request of subject (the key's meter ID: the first key
// of its rotation chain) under p, and counts it. It never blocks on the
// Backend at steady state and never allocates on the hit path. A request
// refused by the rate limit is not counted against the quota.
func (l *Limiter) Allow(subject string, p *Policy) Decision {
	if p == nil || (p.Limit <= 0 && p.Quota <= 0) {
		return Decision{}
	}
	return l.AllowAt(subject, p, l.now())
}

// AllowAt is Allow with the time of the request given by a caller that
// has already read the clock (reading it costs tens of nanoseconds; the
// Limiter's sync loop still reads Options.Now). now must come from the
// same clock as Options.Now.
func (l *Limiter) AllowAt(subject string, p *Policy, at time.Time) Decision {
	if p == nil || (p.Limit <= 0 && p.Quota <= 0) {
		return Decision{}
	}
	now := at.UnixNano()
	sh, h := l.shardOf(subject)
	sh.mu.Lock()
	i := l.lookup(sh, subject, h, now)
	st := &sh.st[i]
	st.setPolicy(p, now)
	sh.rollDay(i, now)
	sh.markDirty(i)
	st.demand++
	if st.period != NoPeriod {
		st.slot().seen = true
	}
	st.lastSeen = now
	var d Decision
	if !l.shared || l.degraded.Load() {
		d = l.decideLocal(sh, i, now)
	} else {
		d = l.decideShared(sh, h, i, now)
	}
	sh.mu.Unlock()
	return d
}

// rateCheck is the local GCRA's verdict at now: ok, the TAT after
// admitting, and when refused the wait until a request conforms.
func (st *state) rateCheck(now int64) (ok bool, next, wait int64) {
	tat := max(st.tat, now)
	next = tat + st.t
	if next-now > st.b {
		return false, tat, next - now - st.b
	}
	return true, next, 0
}

// refuseRate returns the decision for a request over the rate limit.
func (st *state) refuseRate(now, wait int64) Decision {
	st.limited++
	d := Decision{Result: RateLimited, RetryAfter: time.Duration(wait), RateReset: time.Duration(max(st.tat, now) - now)}
	if st.period != NoPeriod {
		q := st.slot()
		d.QuotaUsed, d.QuotaReset = q.used(), time.Duration(q.end-now)
	}
	return d
}

// refuseQuota returns the decision for a request over the quota.
func (st *state) refuseQuota(now int64) Decision {
	st.refused++
	q := st.slot()
	d := Decision{Result: QuotaExceeded, RetryAfter: time.Duration(q.end - now), QuotaUsed: q.used(), QuotaReset: time.Duration(q.end - now)}
	if st.t > 0 {
		tat := max(st.tat, now)
		d.RateRemaining = (st.b - (tat - now)) / st.t
		d.RateReset = time.Duration(tat - now)
	}
	return d
}

// accept commits an admitted request whose local TAT becomes next.
func (st *state) accept(now, next int64) Decision {
	st.accepted++
	var d Decision
	if st.t > 0 {
		st.tat = next
		d.RateRemaining = (st.b - (next - now)) / st.t
		d.RateReset = time.Duration(next - now)
	}
	if st.period != NoPeriod {
		q := st.slot()
		d.QuotaUsed, d.QuotaReset = q.used(), time.Duration(q.end-now)
	}
	return d
}

// loadQuota reads the count of st's current slot from the backend once
// (file store). sh.mu is held: a bbolt read takes microseconds.
func (l *Limiter) loadQuota(st *state, subject string) {
	if st.period == NoPeriod {
		return
	}
	q := st.slot()
	if q.loaded {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), l.timeout)
	n, err := l.be.quotaCount(ctx, subject, st.period, q.start)
	cancel()
	if err != nil {
		if c := l.log.Check(zap.WarnLevel, "ratelimit: reading a quota count failed; counting from zero"); c != nil {
			c.Write(zap.Error(err))
		}
	}
	q.base, q.loaded = n, true
}

// decideLocal decides with the instance's own state: exact GCRA and quota
// count (the file store, or a shared backend that is unreachable).
func (l *Limiter) decideLocal(sh *shard, i int32, now int64) Decision {
	st := &sh.st[i]
	if !l.shared {
		l.loadQuota(st, sh.names[i])
	}
	next := st.tat
	if st.t > 0 {
		ok, n, wait := st.rateCheck(now)
		if !ok {
			return st.refuseRate(now, wait)
		}
		next = n
	}
	if st.period != NoPeriod {
		q := st.slot()
		if q.used() >= q.quota {
			return st.refuseQuota(now)
		}
		if q.held > 0 {
			q.held-- // a token leased before the outage: already counted
		} else {
			q.local++
		}
	}
	return st.accept(now, next)
}

// decideShared decides against leased tokens, leasing synchronously when
// the instance has none and does not know the shared bucket to be empty.
func (l *Limiter) decideShared(sh *shard, h uint64, i int32, now int64) Decision {
	for attempt := 0; ; attempt++ {
		st := &sh.st[i]
		next := st.tat
		if st.t > 0 {
			// The instance alone never admits more than the limit.
			ok, n, wait := st.rateCheck(now)
			if !ok {
				return st.refuseRate(now, wait)
			}
			next = n
		}
		needRate := st.t > 0 && (st.held <= 0 || now >= st.leaseEnd)
		if needRate && now < st.emptyUntil {
			return st.refuseRate(now, st.emptyUntil-now)
		}
		var q *quotaSlot
		if st.period != NoPeriod {
			q = st.slot()
		}
		needQuota := q != nil && q.held <= 0
		if needQuota && q.empty || !needQuota && q != nil && q.used() >= q.quota {
			// Known used up; or tokens are held that were leased under a
			// larger quota of the same period (the policy changed since):
			// they are returned at the next sync.
			return st.refuseQuota(now)
		}
		if !needRate && !needQuota {
			if st.t > 0 {
				st.held--
			}
			if q != nil {
				q.held--
			}
			d := st.accept(now, next)
			if st.t > 0 {
				d.RateRemaining = min(d.RateRemaining, st.held+max(0, (now+st.b-st.sharedTAT)/st.t))
			}
			return d
		}
		if attempt > 0 {
			// Leased and still nothing: the lease came back short.
			if needRate {
				return st.refuseRate(now, max(st.emptyUntil-now, st.t))
			}
			return st.refuseQuota(now)
		}
		var ok bool
		if i, ok = l.lease(sh, h, i, now, needRate, needQuota); !ok {
			return l.decideLocal(sh, i, now)
		}
	}
}

// lease leases tokens for subject i synchronously: sh.mu is held on entry
// and exit, released during the call. It waits for a lease already in
// flight for the subject instead of making another. It returns the
// subject's index, which a sweep (evictIdle) may have changed while it
// waited, and false when the backend failed (the Limiter is then
// degraded).
func (l *Limiter) lease(sh *shard, h uint64, i int32, now int64, needRate, needQuota bool) (int32, bool) {
	if sh.st[i].leasing {
		for sh.st[i].leasing {
			sh.cond.Wait()
			// While the lock was released the subject may have been
			// moved (never dropped: it was seen just now).
			i, _ = sh.find(h)
		}
		return i, !l.degraded.Load()
	}
	st := &sh.st[i]
	st.leasing = true
	it := syncItem{subject: sh.names[i], shard: -1, idx: i}
	if needRate {
		it.rate, it.t, it.b = true, ceilUS(st.t), ceilUS(st.t)*st.limit
		it.ret = st.held // lapsed tokens go back
		st.held = 0
		it.want = clampWant(max(2*st.lastWant, 2*st.demand), st.limit/5)
		st.lastWant = it.want
	}
	if needQuota {
		q := st.slot()
		it.quota, it.period, it.qStart, it.qEnd, it.q = true, st.period, q.start, q.end, q.quota
		it.qWant = clampWant(max(2*q.lastWant, 2*st.demand), q.quota/20)
		q.lastWant = it.qWant
		it.qAdd = q.local
	}
	sh.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), l.timeout)
	items := [1]syncItem{it}
	err := l.be.sync(ctx, now, items[:], nil)
	cancel()
	sh.mu.Lock()
	st = &sh.st[i]
	st.leasing = false
	sh.cond.Broadcast()
	if err != nil {
		st.held += it.ret // not returned after all
		l.setDegraded(err)
		return i, false
	}
	l.setDegraded(nil)
	r := &items[0]
	if r.rate {
		st.applyRate(r, 0, now, int64(l.nextInterval()))
	}
	if r.quota {
		st.applyQuota(r, 0, now)
	}
	return i, true
}

// applyRate takes a lease reply: kept is the number of tokens the
// instance kept spendable while the call was in flight (returned in the
// call and granted again).
func (st *state) applyRate(r *syncItem, kept, now, interval int64) {
	st.held += r.grant - kept
	if st.held < 0 {
		st.held = 0
	}
	st.sharedTAT = r.tatUS * 1000
	if r.want == 0 {
		return // a return only: what is known of the bucket stands
	}
	st.leaseEnd = now + st.window/10
	if r.grant < r.want {
		// The bucket is empty: ask again when it holds a few tokens, and
		// not before the next sync, which asks for this subject anyway;
		// so a subject hammered above its limit costs no call of its
		// own.
		chunk := min(max(st.limit/20, 1), r.want)
		st.emptyUntil = max(st.sharedTAT+chunk*st.t-st.b, now+interval)
	} else {
		st.emptyUntil = 0
	}
}

// applyQuota takes a quota reply into the slot of its period, unless
// that slot has moved on to a new period since (the reply's tokens and
// counts are then of a period over). kept is the number of tokens the
// instance kept spendable while the call was in flight.
func (st *state) applyQuota(r *syncItem, kept, now int64) {
	q := &st.q[r.period-1]
	if q.start != r.qStart {
		return
	}
	q.held += r.qGrant - kept
	if q.held < 0 {
		q.held = 0
	}
	q.local -= r.qAdd
	q.base = r.count
	q.loaded = true
	if st.t == 0 && r.qWant > 0 {
		st.leaseEnd = now + int64(quotaLease)
	}
	q.empty = r.qGrant < r.qWant && r.count >= r.q
}

// clampWant returns want within [1, max(1, limit)].
func clampWant(want, limit int64) int64 { return min(max(want, 1), max(limit, 1)) }

// ceilUS converts ns to µs, rounding up.
func ceilUS(ns int64) int64 { return (ns + 999) / 1000 }

// setDegraded records the outcome of a backend call.
func (l *Limiter) setDegraded(err error) {
	if err == nil {
		if l.degraded.Swap(false) {
			l.log.Info("ratelimit: shared backend reachable again; leasing resumed, local counts sent")
		}
		return
	}
	if !l.shared {
		if c := l.log.Check(zap.WarnLevel, "ratelimit: writing counts failed; kept for the next sync"); c != nil {
			c.Write(zap.Error(err))
		}
		return
	}
	if !l.degraded.Swap(true) {
		l.log.Warn("ratelimit: shared backend unreachable; limiting per instance (full limit each), counting quotas locally", zap.Error(err))
	}
}
