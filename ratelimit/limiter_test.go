package ratelimit

import (
	"context"
	"fmt"
	"math/rand/v2"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"
)

// clock is a settable clock for Options.Now.
type clock struct{ ns atomic.Int64 }

func newClock(t time.Time) *clock {
	c := &clock{}
	c.ns.Store(t.UnixNano())
	return c
}

func (c *clock) Now() time.Time                 { return time.Unix(0, c.ns.Load()) }
func (c *clock) Add(d time.Duration)            { c.ns.Add(int64(d)) }
func (c *clock) Set(t time.Time)                { c.ns.Store(t.UnixNano()) }
func date(s string) time.Time                   { t, _ := time.Parse(time.RFC3339Nano, s); return t }
func plan(limit int64, w time.Duration) *Policy { return &Policy{Name: "p", Limit: limit, Window: w} }

// openBolt opens a bbolt file in dir.
func openBolt(t testing.TB, dir string) *bolt.DB {
	t.Helper()
	db, err := bolt.Open(filepath.Join(dir, "keys.db"), 0o600, &bolt.Options{Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	return db
}

// newBoltLimiter returns a Limiter on a fresh bbolt file, its sync loop
// effectively off (tests call Sync), and the backend.
func newBoltLimiter(t testing.TB, c *clock) (*Limiter, *BoltBackend) {
	t.Helper()
	db := openBolt(t, t.TempDir())
	t.Cleanup(func() { _ = db.Close() })
	be, err := NewBoltBackend(db)
	if err != nil {
		t.Fatal(err)
	}
	return newLimiter(t, be, c), be
}

func newLimiter(t testing.TB, be Backend, c *clock) *Limiter {
	t.Helper()
	opts := Options{Backend: be}
	if c != nil {
		opts.Now = c.Now
	}
	l, err := newLimiterLoop(opts, false) // the tests call Sync
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = l.Close() })
	return l
}

func TestPolicyValidate(t *testing.T) {
	for _, tc := range []struct {
		p  Policy
		ok bool
	}{
		{Policy{Limit: 100, Window: time.Minute}, true},
		{Policy{Quota: 10, Period: Month}, true},
		{Policy{Limit: 100, Window: time.Minute, Quota: 10, Period: Day}, true},
		{Policy{Limit: -1, Window: time.Minute}, false},
		{Policy{Limit: 1}, false},
		{Policy{Limit: 1, Window: 25 * time.Hour}, false},
		{Policy{Limit: 2_000_000, Window: time.Second}, false},
		{Policy{Quota: 10}, false},
		{Policy{Quota: -1, Period: Day}, false},
	} {
		if err := tc.p.Validate(); (err == nil) != tc.ok {
			t.Errorf("%+v: Validate = %v, want ok=%v", tc.p, err, tc.ok)
		}
	}
}

// TestBurstExact: a fresh subject is admitted exactly Limit requests at
// one instant, then one per Window/Limit.
func TestBurstExact(t *testing.T) {
	c := newClock(date("2026-03-10T12:00:00Z"))
	l, _ := newBoltLimiter(t, c)
	p := plan(10, time.Minute)
	for i := range 10 {
		d := l.Allow("s", p)
		if d.Result != Allowed || d.RateRemaining != int64(9-i) {
			t.Fatalf("request %d: %+v, want Allowed with %d remaining", i+1, d, 9-i)
		}
	}
	d := l.Allow("s", p)
	if d.Result != RateLimited || d.RetryAfter != 6*time.Second || d.RateReset != time.Minute {
		t.Fatalf("11th: %+v, want RateLimited, RetryAfter 6s, Reset 1m", d)
	}
	c.Add(6*time.Second - 1)
	if d := l.Allow("s", p); d.Result != RateLimited || d.RetryAfter != 1 {
		t.Fatalf("1ns early: %+v", d)
	}
	c.Add(1)
	if d := l.Allow("s", p); d.Result != Allowed || d.RateRemaining != 0 {
		t.Fatalf("after one interval: %+v", d)
	}
	if d := l.Allow("s", p); d.Result != RateLimited {
		t.Fatalf("then: %+v", d)
	}
	// Another subject is independent.
	if d := l.Allow("other", p); d.Result != Allowed {
		t.Fatalf("other subject: %+v", d)
	}
}

// TestBurstConcurrent: 20 goroutines hammering one subject get exactly
// Limit admissions at a fixed instant.
func TestBurstConcurrent(t *testing.T) {
	c := newClock(date("2026-03-10T12:00:00Z"))
	l, _ := newBoltLimiter(t, c)
	p := plan(500, time.Minute)
	var admitted atomic.Int64
	var wg sync.WaitGroup
	for range 20 {
		wg.Go(func() {
			for range 100 {
				if l.Allow("s", p).Result == Allowed {
					admitted.Add(1)
				}
			}
		})
	}
	wg.Wait()
	if admitted.Load() != 500 {
		t.Fatalf("admitted %d, want exactly 500", admitted.Load())
	}
}

// maxInWindow returns the most of the sorted times that fall in any
// half-open interval of length w.
func maxInWindow(ts []int64, w int64) int {
	best, j := 0, 0
	for i := range ts {
		for ts[i]-ts[j] >= w {
			j++
		}
		best = max(best, i-j+1)
	}
	return best
}

// TestWorstCaseWindow: for random arrival sequences, no half-open interval
// of one window holds more than 2×Limit-1 admissions (the GCRA bound the
// package documents), and a full burst followed by requests at the
// emission interval reaches it.
func TestWorstCaseWindow(t *testing.T) {
	const limit, w = 20, int64(time.Minute)
	p := plan(limit, time.Minute)
	start := date("2026-03-10T12:00:00Z")
	for seed := range 50 {
		c := newClock(start)
		l, _ := newBoltLimiter(t, c)
		r := rand.New(rand.NewPCG(uint64(seed), 1))
		var ts []int64
		for range 2000 {
			// Bursts, pauses and steady runs.
			switch r.IntN(4) {
			case 0:
				c.Add(time.Duration(r.Int64N(w)))
			case 1:
				c.Add(time.Duration(r.Int64N(w / limit * 2)))
			}
			if l.Allow("s", p).Result == Allowed {
				ts = append(ts, c.ns.Load())
			}
		}
		if got := maxInWindow(ts, w); got > 2*limit-1 {
			t.Fatalf("seed %d: %d admitted in one window, bound %d", seed, got, 2*limit-1)
		}
		// Long run: at most the burst plus one per emission interval.
		if span := ts[len(ts)-1] - ts[0]; int64(len(ts)) > limit+span/(w/limit)+1 {
			t.Fatalf("seed %d: %d admitted over %s", seed, len(ts), time.Duration(span))
		}
	}
	// The bound is reached.
	c := newClock(start)
	l, _ := newBoltLimiter(t, c)
	var ts []int64
	for range 3 * limit {
		for l.Allow("s", p).Result == Allowed {
			ts = append(ts, c.ns.Load())
		}
		c.Add(time.Duration(w / limit))
	}
	if got := maxInWindow(ts, w); got != 2*limit-1 {
		t.Fatalf("burst then steady: %d in one window, want %d", got, 2*limit-1)
	}
}

// TestQuota: the quota admits exactly Quota requests in a period; a
// request over the rate limit is not counted.
func TestQuota(t *testing.T) {
	c := newClock(date("2026-03-10T12:00:00Z"))
	l, _ := newBoltLimiter(t, c)
	p := &Policy{Name: "p", Limit: 2, Window: time.Minute, Quota: 5, Period: Day}
	var got []Result
	for range 12 {
		got = append(got, l.Allow("s", p).Result)
		got = append(got, l.Allow("s", p).Result)
		got = append(got, l.Allow("s", p).Result)
		c.Add(time.Minute)
	}
	accepted, limited, refused := 0, 0, 0
	for _, r := range got {
		switch r {
		case Allowed:
			accepted++
		case RateLimited:
			limited++
		case QuotaExceeded:
			refused++
		}
	}
	if accepted != 5 {
		t.Fatalf("accepted %d, want the quota, 5 (%v)", accepted, got)
	}
	// Minutes 1 and 2 each refuse their third request by the rate limit;
	// a request the quota refuses uses no rate, so from then on every
	// request is refused by the quota.
	if limited != 2 || refused != 36-5-2 {
		t.Fatalf("rate limited %d, quota exceeded %d (%v)", limited, refused, got)
	}
	d := l.Allow("s", p)
	wantReset := date("2026-03-11T00:00:00Z").Sub(c.Now())
	if d.Result != QuotaExceeded || d.QuotaUsed != 5 || d.QuotaReset != wantReset || d.RetryAfter != wantReset {
		t.Fatalf("%+v; want QuotaExceeded, used 5, reset and retry in %s", d, wantReset)
	}
	u, err := l.Usage(context.Background(), "s", p)
	if err != nil || u.Used != 5 || u.Limit != 5 || u.Period != Day || !u.ResetsAt.Equal(date("2026-03-11T00:00:00Z")) {
		t.Fatalf("Usage = %+v, %v", u, err)
	}
}

// TestPeriodBoundaries: quotas reset at the start of the UTC day, month
// and year, and not a nanosecond before.
func TestPeriodBoundaries(t *testing.T) {
	for _, tc := range []struct {
		period      Period
		before, end string
	}{
		{Day, "2026-03-10T23:59:59.999999999Z", "2026-03-11T00:00:00Z"},
		{Month, "2026-02-28T23:59:59.999999999Z", "2026-03-01T00:00:00Z"},
		{Month, "2024-02-29T23:00:00Z", "2024-03-01T00:00:00Z"},
		{Month, "2026-12-31T23:59:59.999999999Z", "2027-01-01T00:00:00Z"},
		{Day, "2026-12-31T23:59:59.999999999Z", "2027-01-01T00:00:00Z"},
	} {
		t.Run(fmt.Sprintf("%s/%s", tc.period, tc.end), func(t *testing.T) {
			c := newClock(date(tc.before))
			l, _ := newBoltLimiter(t, c)
			p := &Policy{Name: "p", Quota: 3, Period: tc.period}
			for range 3 {
				if d := l.Allow("s", p); d.Result != Allowed {
					t.Fatalf("%+v", d)
				}
			}
			d := l.Allow("s", p)
			if d.Result != QuotaExceeded || d.RetryAfter != date(tc.end).Sub(date(tc.before)) {
				t.Fatalf("over quota before the end: %+v", d)
			}
			c.Set(date(tc.end))
			for i := range 3 {
				if d := l.Allow("s", p); d.Result != Allowed || d.QuotaUsed != int64(i+1) {
					t.Fatalf("new period, request %d: %+v", i+1, d)
				}
			}
			if d := l.Allow("s", p); d.Result != QuotaExceeded {
				t.Fatalf("%+v", d)
			}
		})
	}
}

// TestPolicyChange: a plan's new numbers apply on the next request.
func TestPolicyChange(t *testing.T) {
	c := newClock(date("2026-03-10T12:00:00Z"))
	l, _ := newBoltLimiter(t, c)
	for range 5 {
		l.Allow("s", plan(5, time.Minute))
	}
	if d := l.Allow("s", plan(5, time.Minute)); d.Result != RateLimited {
		t.Fatalf("%+v", d)
	}
	if d := l.Allow("s", plan(10, time.Minute)); d.Result != Allowed {
		t.Fatalf("after raising the limit: %+v", d)
	}
	q := &Policy{Name: "p", Quota: 3, Period: Day}
	for range 3 {
		l.Allow("q", q)
	}
	if d := l.Allow("q", &Policy{Name: "p", Quota: 4, Period: Day}); d.Result != Allowed || d.QuotaUsed != 4 {
		t.Fatalf("after raising the quota: %+v", d)
	}
	if d := l.Allow("q", &Policy{Name: "p"}); d.Result != Allowed {
		t.Fatalf("no limits: %+v", d)
	}
}

// TestBoltRestart: quota and daily counts survive Close and New on the same
// file; without Close, what the last sync wrote survives.
func TestBoltRestart(t *testing.T) {
	dir := t.TempDir()
	c := newClock(date("2026-03-10T12:00:00Z"))
	p := &Policy{Name: "p", Quota: 100, Period: Month}
	open := func() (*bolt.DB, *Limiter) {
		db := openBolt(t, dir)
		be, err := NewBoltBackend(db)
		if err != nil {
			t.Fatal(err)
		}
		l, err := newLimiterLoop(Options{Backend: be, Now: c.Now}, false)
		if err != nil {
			t.Fatal(err)
		}
		return db, l
	}
	db, l := open()
	for range 30 {
		l.Allow("s", p)
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	_ = db.Close()

	db, l = open()
	if d := l.Allow("s", p); d.QuotaUsed != 31 {
		t.Fatalf("after restart: used %d, want 31", d.QuotaUsed)
	}
	if err := l.Sync(false); err != nil {
		t.Fatal(err)
	}
	for range 9 { // counted, never synced: lost in the crash
		l.Allow("s", p)
	}
	if u, _ := l.Usage(context.Background(), "s", p); u.Used != 40 {
		t.Fatalf("Usage before the crash: %d", u.Used)
	}
	// A crash: the Limiter is dropped without Close (its loop stopped so
	// nothing more is written).
	close(l.stop)
	<-l.done
	_ = db.Close()

	db, l = open()
	defer db.Close()
	defer l.Close()
	if u, _ := l.Usage(context.Background(), "s", p); u.Used != 31 {
		t.Fatalf("after a crash: used %d, want the 31 of the last sync", u.Used)
	}
	h, err := l.History(context.Background(), "s", 1)
	if err != nil || len(h) != 1 || h[0].Accepted != 31 {
		t.Fatalf("History = %+v, %v", h, err)
	}
}

// TestHistory: daily counts per UTC day, 1 to 90 days, old days pruned.
func TestHistory(t *testing.T) {
	c := newClock(date("2026-01-01T10:00:00Z"))
	l, be := newBoltLimiter(t, c)
	p := &Policy{Name: "p", Limit: 3, Window: time.Hour, Quota: 4, Period: Day}
	// 100 days: each day 6 requests: 3 accepted, 3 rate limited; every
	// fifth day the quota is 2, so 2 accepted and 4 refused by the quota
	// (which uses no rate); every tenth day nothing.
	for day := range 100 {
		if day%10 == 9 {
			c.Add(24 * time.Hour)
			continue
		}
		pp := *p
		if day%5 == 4 {
			pp.Quota = 2
		}
		for range 6 {
			l.Allow("s", &pp)
		}
		l.Allow("other", p)
		if day%3 == 0 {
			if err := l.Sync(false); err != nil {
				t.Fatal(err)
			}
		}
		c.Add(24 * time.Hour)
	}
	c.Add(-24 * time.Hour) // the last day with traffic is "today"
	ctx := context.Background()
	if _, err := l.History(ctx, "s", 0); err == nil {
		t.Fatal("History(0 days) succeeded")
	}
	if _, err := l.History(ctx, "s", 91); err == nil {
		t.Fatal("History(91 days) succeeded")
	}
	check := func(h []DayCount) {
		t.Helper()
		for k, d := range h {
			day := 100 - len(h) + k // days since the start
			want := DayCount{Day: date("2026-01-01T00:00:00Z").AddDate(0, 0, day), Accepted: 3, RateLimited: 3}
			switch {
			case day%10 == 9:
				want.Accepted, want.RateLimited = 0, 0
			case day%5 == 4:
				want.Accepted, want.RateLimited, want.QuotaExceeded = 2, 0, 4
			}
			if d != want {
				t.Fatalf("day %d: %+v, want %+v", day, d, want)
			}
		}
	}
	for _, n := range []int{1, 7, 30, 90} {
		h, err := l.History(ctx, "s", n)
		if err != nil || len(h) != n {
			t.Fatalf("History(%d) = %d days, %v", n, len(h), err)
		}
		check(h)
	}
	if err := l.Sync(false); err != nil {
		t.Fatal(err)
	}
	h, _ := l.History(ctx, "s", 90)
	check(h)
	// Pruned: the first days are gone from the file.
	old, err := be.History(ctx, "s", date("2026-01-01T00:00:00Z"), date("2026-01-05T00:00:00Z"))
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range old {
		if d.Accepted != 0 {
			t.Fatalf("day %s kept past %d days: %+v", d.Day, HistoryDays, d)
		}
	}
}

// BenchmarkAllow is the hit path: a subject with a plan, already seen.
func BenchmarkAllow(b *testing.B) {
	p := &Policy{Name: "p", Limit: 1 << 40, Window: MaxWindow / 2, Quota: 1 << 60, Period: Month}
	for _, n := range []int{1, 100_000} {
		b.Run(fmt.Sprintf("subjects=%d", n), func(b *testing.B) {
			l, _ := newBoltLimiter(b, nil)
			names := make([]string, n)
			for i := range names {
				names[i] = fmt.Sprintf("key_%016x", i)
				l.Allow(names[i], p)
			}
			b.ReportAllocs()
			b.ResetTimer()
			i := 0
			for b.Loop() {
				if l.Allow(names[i], p).Result != Allowed {
					b.Fatal("refused")
				}
				if i++; i == n {
					i = 0
				}
			}
		})
	}
}
