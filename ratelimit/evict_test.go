package ratelimit

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/caddy-apikeys/caddy-apikeys/internal/testredis"
)

// syncN runs n syncs, so that at least one sweeps (sweepEvery).
func syncN(t *testing.T, l *Limiter, n int) {
	t.Helper()
	for range n {
		if err := l.Sync(false); err != nil {
			t.Fatal(err)
		}
	}
}

// TestEvictIdle: the table holds the subjects in use, not every subject
// ever seen; a subject dropped and seen again keeps its quota count (read
// back from the backend) and, its bucket having refilled, its full burst.
func TestEvictIdle(t *testing.T) {
	c := newClock(date("2026-03-10T12:00:00Z"))
	l, _ := newBoltLimiter(t, c)
	p := &Policy{Name: "p", Limit: 3, Window: time.Minute, Quota: 10, Period: Day}
	for i := range 1000 {
		l.Allow(fmt.Sprintf("s%d", i), p)
	}
	for range 3 {
		l.Allow("busy", p)
	}
	syncN(t, l, sweepEvery)
	if n := l.subjects(); n != 1001 {
		t.Fatalf("just used: %d subjects held, want 1001", n)
	}
	// Past idleEvict every subject may go; "busy" is seen again first.
	c.Add(idleEvict + time.Second)
	if d := l.Allow("busy", p); d.Result != Allowed || d.QuotaUsed != 4 {
		t.Fatalf("busy after the idle time: %+v", d)
	}
	syncN(t, l, sweepEvery)
	if n := l.subjects(); n != 1 {
		t.Fatalf("after the sweep: %d subjects held, want 1 (the one in use)", n)
	}
	// s7 comes back: its quota count is the backend's (1 used), its
	// bucket full (3 then refused).
	admitted := 0
	var last Decision
	for range 4 {
		if last = l.Allow("s7", p); last.Result == Allowed {
			admitted++
		}
	}
	if admitted != 3 || last.Result != RateLimited || last.QuotaUsed != 4 {
		t.Fatalf("s7 after eviction: admitted %d, last %+v; want 3 admitted, then rate limited with 4 used", admitted, last)
	}
	u, err := l.Usage(context.Background(), "s7", p)
	if err != nil || u.Used != 4 {
		t.Fatalf("s7 usage %+v, %v; want 4 used", u, err)
	}
	// A subject whose bucket has not refilled stays (its TAT is ahead).
	for range 3 {
		l.Allow("hot", &Policy{Name: "slow", Limit: 3, Window: time.Hour})
	}
	c.Add(idleEvict + time.Second)
	syncN(t, l, sweepEvery)
	sh, h := l.shardOf("hot")
	if _, ok := sh.find(h); !ok {
		t.Fatal("a subject whose bucket is not full again was dropped: its next burst would be too big")
	}
}

// TestEvictIdleShared: on a shared backend a subject holding leased
// tokens is kept until they are returned, and one dropped leases afresh.
func TestEvictIdleShared(t *testing.T) {
	srv := testredis.Start(t)
	c := newClock(date("2026-03-10T12:00:00Z"))
	ls, _ := redisLimiters(t, srv.Client(t), c, 1)
	l := ls[0]
	p := &Policy{Name: "p", Limit: 100, Window: time.Minute, Quota: 1000, Period: Day}
	for i := range 200 {
		l.Allow(fmt.Sprintf("s%d", i%50), p)
	}
	syncN(t, l, 1) // leases renewed for the demand seen
	// Unseen, the subjects return their tokens before the lease lapses
	// (a sync a second) and are dropped once idle for idleEvict.
	for range int(idleEvict/time.Second) + 2*sweepEvery {
		c.Add(time.Second)
		syncN(t, l, 1)
	}
	if n := l.subjects(); n != 0 {
		t.Fatalf("%d subjects held after the idle time, want 0", n)
	}
	for range 4 {
		if d := l.Allow("s3", p); d.Result != Allowed || d.QuotaUsed < 4 {
			t.Fatalf("s3 after eviction: %+v", d)
		}
	}
	syncN(t, l, 1)
	u, err := l.Usage(context.Background(), "s3", p)
	if err != nil || u.Used < 8 {
		t.Fatalf("s3 usage %+v, %v; want at least the 8 accepted", u, err)
	}
}
