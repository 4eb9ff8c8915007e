package ratelimit

import (
	"context"
	"fmt"
	"hash/maphash"
	"time"
)

// loop runs syncs until Close.
func (l *Limiter) loop() {
	defer close(l.done)
	timer := time.NewTimer(l.nextInterval())
	defer timer.Stop()
	for {
		select {
		case <-l.stop:
			return
		case <-timer.C:
			_ = l.Sync(false)
			timer.Reset(l.nextInterval())
		}
	}
}

// nextInterval is SyncInterval, or shorter when a shared lease lapses
// sooner.
func (l *Limiter) nextInterval() time.Duration {
	d := l.interval
	if h := time.Duration(l.minH.Load()); h > 0 && h < d {
		d = max(h, minSyncInterval)
	}
	return d
}

// Sync sends what the Limiter has counted since the last sync to the
// Backend and, with a shared Backend, renews the leases of the subjects
// seen since (returning the tokens of the others). The sync loop calls it
// every SyncInterval; final (Close) returns every token. It returns the
// Backend's error, if any; the counts are then kept for the next sync.
func (l *Limiter) Sync(final bool) error {
	l.syncMu.Lock()
	defer l.syncMu.Unlock()
	now := l.now().UnixNano()
	shared := l.shared && !l.degraded.Load()
	// A shared backend gets daily counts every histEvery syncs: they are
	// reports, and two fewer commands per script call matter more.
	l.syncs++
	flushHist := !l.shared || final || l.syncs%histEvery == 0
	var items []syncItem
	var hist []histDelta
	if flushHist {
		hist, l.retryHist = l.retryHist, nil
	}
	minH := int64(0)
	for si := range l.shards {
		sh := &l.shards[si]
		sh.mu.Lock()
		if flushHist {
			hist = append(hist, sh.spill...)
			sh.spill = sh.spill[:0]
		}
		keep := sh.dirty[:0] // filtered in place
		for _, i := range sh.dirty {
			st := &sh.st[i]
			sh.rollDay(i, now)
			if flushHist {
				hist = append(hist, histDelta{sh.names[i], st.day, st.accepted, st.limited, st.refused})
				st.accepted, st.limited, st.refused = 0, 0, 0
			}
			first := len(items)
			items = l.buildItems(items, st, now, shared, final)
			st.demand = 0
			if len(items) == first {
				if st.held > 0 || st.quotaPending() || st.accepted|st.limited|st.refused != 0 {
					keep = append(keep, i) // leases kept or counts pending: looked at again next time
				} else {
					st.dirty = false
				}
				continue
			}
			st.dirty = false
			for k := first; k < len(items); k++ {
				it := &items[k]
				it.subject, it.shard, it.idx = sh.names[i], int32(si), i
				if h := st.window / 10; it.rate && it.want > 0 && (minH == 0 || h < minH) {
					minH = h
				}
			}
		}
		sh.dirty = keep
		sh.mu.Unlock()
	}
	l.minH.Store(minH)
	hist = dropEmpty(hist)
	if len(items) == 0 && len(hist) == 0 {
		if l.syncs%sweepEvery == 0 {
			l.evictIdle(now)
		}
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), l.syncTimeout(len(items)+len(hist)))
	err := l.be.sync(ctx, now, items, hist)
	cancel()
	l.setDegraded(err)
	if err != nil {
		l.retryHist = hist
	}
	for k := range items {
		it := &items[k]
		sh := &l.shards[it.shard]
		sh.mu.Lock()
		st := &sh.st[it.idx]
		if err != nil {
			// Nothing was returned or counted: the tokens are still held
			// (quota tokens only while their slot is in the same period).
			st.held += it.ret - it.heldKept
			if it.quota {
				if q := &st.q[it.period-1]; q.start == it.qStart {
					q.held += it.qRet - it.qHeldKep
				}
			}
		} else {
			if it.rate {
				st.applyRate(it, it.heldKept, now, int64(l.nextInterval()))
			}
			if it.quota {
				st.applyQuota(it, it.qHeldKep, now)
			}
		}
		if st.held > 0 || st.quotaPending() || st.accepted|st.limited|st.refused != 0 {
			sh.markDirty(it.idx) // renewed or returned at the next sync
		}
		sh.mu.Unlock()
	}
	if err == nil && l.syncs%sweepEvery == 0 {
		l.evictIdle(now)
	}
	if err != nil {
		return fmt.Errorf("ratelimit: sync: %w", err)
	}
	return nil
}

// evictIdle drops the state of subjects that carry nothing the backend
// does not have: unseen for idleEvict, their local bucket full again, no
// token held, no count pending, not listed for the next sync and not
// leasing. A subject seen again starts afresh from the backend (its quota
// count is read or leased again), so the table holds the subjects in use,
// not every subject ever seen. syncMu is held, so no sync holds an index;
// a subject leasing keeps its index (requests waiting on it hold it).
func (l *Limiter) evictIdle(now int64) {
	for si := range l.shards {
		sh := &l.shards[si]
		sh.mu.Lock()
		for i := int32(0); i < int32(len(sh.st)); {
			st := &sh.st[i]
			if st.dirty || st.leasing || now-st.lastSeen < int64(idleEvict) || st.tat > now ||
				st.emptyUntil > now || st.held != 0 || st.quotaPending() ||
				st.accepted|st.limited|st.refused != 0 {
				i++
				continue
			}
			last := int32(len(sh.st)) - 1
			if last != i && sh.st[last].leasing {
				i++ // the last subject's index is in use; try next sweep
				continue
			}
			delete(sh.idx, maphash.String(l.seed, sh.names[i]))
			if last != i {
				sh.st[i], sh.names[i] = sh.st[last], sh.names[last]
				sh.idx[maphash.String(l.seed, sh.names[i])] = i
				if sh.st[i].dirty {
					for k, d := range sh.dirty {
						if d == last {
							sh.dirty[k] = i
						}
					}
				}
			}
			sh.st[last], sh.names[last] = state{}, ""
			sh.st, sh.names = sh.st[:last], sh.names[:last]
		}
		sh.mu.Unlock()
	}
}

// subjects returns how many subjects the Limiter holds state for.
func (l *Limiter) subjects() int {
	n := 0
	for si := range l.shards {
		sh := &l.shards[si]
		sh.mu.Lock()
		n += len(sh.st)
		sh.mu.Unlock()
	}
	return n
}

// syncTimeout allows a large sync more than one call's timeout.
func (l *Limiter) syncTimeout(n int) time.Duration {
	return l.timeout * time.Duration(1+n/5000)
}

// buildItems appends st's sync items to items: the rate lease renewal
// (shared backends) with the quota part of one slot, and the quota part
// of the other slot in an item of its own when both have something to
// send. With a shared backend, every token held is returned and want
// granted again in the same script, so no token is held longer than one
// interval without being charged afresh; the tokens beyond want are
// surrendered now, the rest (kept) stay spendable during the call. It
// appends nothing when there is nothing to send.
func (l *Limiter) buildItems(items []syncItem, st *state, now int64, shared, final bool) []syncItem {
	var it, extra syncItem
	// A subject seen in the interval renews its leases; one not seen
	// keeps them until they would lapse before the next sync, then
	// returns them but one, which it renews (a fresh grant, so the bound
	// on the time between grant and spending holds) until it has been
	// unseen for idleEvict: a key that comes back after a pause longer
	// than a lease finds a token, and its request costs no round trip.
	active := st.demand > 0 && !final
	lapsing := st.leaseEnd-now <= int64(l.interval)
	renew := active || final || lapsing
	keepOne := !final && now-st.lastSeen < int64(idleEvict)
	if shared && st.t > 0 && renew && (st.held > 0 || active) {
		it.rate, it.t, it.b = true, ceilUS(st.t), ceilUS(st.t)*st.limit
		it.ret = st.held
		switch {
		case active:
			it.want = clampWant(2*st.demand, st.limit/5)
		case keepOne:
			it.want = 1
		}
		if st.held > it.want {
			st.held = it.want
		}
		it.heldKept = st.held
	}
	for k := range st.q {
		q := &st.q[k]
		if q.end == 0 {
			continue // never used
		}
		if now < q.start || now >= q.end {
			// The period is over: its count is no longer read (the
			// Redis hash expires, the file record is replaced with the
			// next period's), nor are tokens leased for it.
			*q = quotaSlot{}
			continue
		}
		dst := &it
		if it.quota {
			dst = &extra
		}
		l.quotaPart(dst, q, Period(k+1), Period(k+1) == st.period, st.demand, lapsing, keepOne, shared, final)
	}
	if it.rate || it.quota {
		items = append(items, it)
	}
	if extra.quota {
		items = append(items, extra)
	}
	return items
}

// quotaPart fills in it's quota part for slot q of period kind per,
// current when the policy uses it now; demand is the subject's requests
// since the last sync, which size a renewed lease. A slot the policy
// does not use and that saw no request in the interval returns every
// token it holds (the current slot keeps one while keepOne, see
// buildItems): a subject whose policy moved to another period, or to
// no quota, holds no tokens of the old one past the next sync. Local
// counts are always sent.
func (l *Limiter) quotaPart(it *syncItem, q *quotaSlot, per Period, current bool, demand int64, lapsing, keepOne, shared, final bool) {
	active := q.seen && !final
	q.seen = false
	switch {
	case shared:
		renew := active || final || lapsing || !current
		if !(renew && (q.held > 0 || active) || q.local > 0) {
			return
		}
		it.qRet = q.held
		switch {
		case !renew:
			it.qWant = q.held // only local to send
		case active && q.empty:
			it.qWant = 1 // has anyone returned tokens?
		case active:
			it.qWant = clampWant(2*demand, q.quota/20)
		case current && keepOne && q.held > 0 && !q.empty:
			it.qWant = 1 // as the rate limit's one token (see buildItems)
		}
		if q.held > it.qWant {
			q.held = it.qWant
		}
		it.qHeldKep = q.held
	case q.local == 0:
		return
	}
	it.quota, it.qAdd = true, q.local
	it.period, it.qStart, it.qEnd, it.q = per, q.start, q.end, q.quota
}

// dropEmpty removes deltas that add nothing.
func dropEmpty(h []histDelta) []histDelta {
	out := h[:0]
	for _, d := range h {
		if d.accepted|d.limited|d.refused != 0 {
			out = append(out, d)
		}
	}
	return out
}

// Close sends the counts to the Backend (returning every leased token)
// and stops the sync loop. It does not close the Backend's client or file.
func (l *Limiter) Close() error {
	l.closeOnce.Do(func() {
		close(l.stop)
		<-l.done
		l.closeErr = l.Sync(true)
	})
	return l.closeErr
}

// Usage returns subject's quota use in the current period under p; the
// zero Usage when p has no quota. With a shared backend Used is the
// shared count, which includes the tokens other instances have leased and
// not yet spent (at most their demand of one sync interval).
func (l *Limiter) Usage(ctx context.Context, subject string, p *Policy) (Usage, error) {
	if p == nil || p.Quota <= 0 || (p.Period != Day && p.Period != Month) {
		return Usage{}, nil
	}
	now := l.now().UnixNano()
	start, end := periodBounds(p.Period, now)
	u := Usage{Limit: p.Quota, Period: p.Period, ResetsAt: time.Unix(0, end).UTC()}
	var held, local int64
	known := false
	sh, h := l.shardOf(subject)
	sh.mu.Lock()
	if i, ok := sh.find(h); ok {
		// The slot of p's period, whatever policy the subject used last.
		if q := &sh.st[i].q[p.Period-1]; q.start == start {
			held, local = q.held, q.local
			if q.loaded && (!l.shared || l.degraded.Load()) {
				u.Used, known = q.used(), true
			}
		}
	}
	sh.mu.Unlock()
	if known {
		return u, nil
	}
	n, err := l.be.quotaCount(ctx, subject, p.Period, start)
	if err != nil {
		return Usage{}, err
	}
	u.Used = n - held + local
	return u, nil
}

// History returns subject's daily counts for the last days days (1 to 90),
// today (UTC) included, oldest first, with the counts not yet synced.
func (l *Limiter) History(ctx context.Context, subject string, days int) ([]DayCount, error) {
	if days < 1 || days > HistoryDays {
		return nil, fmt.Errorf("ratelimit: history covers 1 to %d days, not %d", HistoryDays, days)
	}
	now := l.now().UnixNano()
	today := dayOf(now)
	first := today - int32(days) + 1
	out, err := l.be.History(ctx, subject, dayTime(first), dayTime(today))
	if err != nil {
		return nil, err
	}
	add := func(d histDelta) {
		if d.subject != subject || d.day < first || d.day > today {
			return
		}
		c := &out[d.day-first]
		c.Accepted += d.accepted
		c.RateLimited += d.limited
		c.QuotaExceeded += d.refused
	}
	sh, h := l.shardOf(subject)
	sh.mu.Lock()
	for _, d := range sh.spill {
		add(d)
	}
	if i, ok := sh.find(h); ok {
		st := &sh.st[i]
		add(histDelta{subject, st.day, st.accepted, st.limited, st.refused})
	}
	sh.mu.Unlock()
	l.syncMu.Lock()
	for _, d := range l.retryHist {
		add(d)
	}
	l.syncMu.Unlock()
	return out, nil
}

// emptyHistory returns a DayCount per day from first to last.
func emptyHistory(first, last int32) []DayCount {
	if last < first {
		return nil
	}
	out := make([]DayCount, last-first+1)
	for k := range out {
		out[k].Day = dayTime(first + int32(k))
	}
	return out
}
