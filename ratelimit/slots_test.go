package ratelimit

import (
	"context"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	bolt "go.etcd.io/bbolt"

	"github.com/caddy-apikeys/caddy-apikeys/internal/testredis"
)

// alternatingPolicies: quotas of both periods, of different numbers for
// one period, with and without a rate limit, and a plan without a quota.
var alternatingPolicies = []*Policy{
	{Name: "day40", Quota: 40, Period: Day},
	{Name: "day25", Quota: 25, Period: Day},
	{Name: "month60", Quota: 60, Period: Month},
	{Name: "month90", Limit: 1000, Window: time.Minute, Quota: 90, Period: Month},
	{Name: "rate", Limit: 1000, Window: time.Minute},
}

// TestPolicyAlternation: a subject whose policy changes request by
// request between day and month quotas, quotas of different numbers and
// no quota, with syncs in between, a day and a month boundary, and Close
// and New twice, is admitted exactly while the count of the current
// policy's period is below its quota: a count is neither lost nor reset
// by a policy change, and the quota never overshoots (one instance, so
// exactly, on the file store and on Redis alike).
func TestPolicyAlternation(t *testing.T) {
	t.Run("file", func(t *testing.T) {
		db := openBolt(t, t.TempDir())
		t.Cleanup(func() { _ = db.Close() })
		be, err := NewBoltBackend(db)
		if err != nil {
			t.Fatal(err)
		}
		testPolicyAlternation(t, be)
	})
	t.Run("redis", func(t *testing.T) {
		srv := testredis.Start(t)
		testPolicyAlternation(t, NewRedisBackend(srv.Client(t), fmt.Sprintf("rltest%d", namespaces.Add(1))))
	})
}

func testPolicyAlternation(t *testing.T, be Backend) {
	// 20:00 on the last day of March: the day and the month end after
	// 240 requests, a minute apart.
	c := newClock(date("2026-03-31T20:00:00Z"))
	ctx := context.Background()
	open := func() *Limiter {
		l, err := newLimiterLoop(Options{Backend: be, Now: c.Now}, false)
		if err != nil {
			t.Fatal(err)
		}
		return l
	}
	l := open()
	type periodKey struct {
		p     Period
		start int64
	}
	count := map[periodKey]int64{} // the model: accepted per period
	rng := rand.New(rand.NewPCG(11, 14))
	accepted, refused := 0, 0
	for n := range 600 {
		p := alternatingPolicies[rng.IntN(len(alternatingPolicies))]
		now := c.Now().UnixNano()
		d := l.Allow("s", p)
		if p.Quota == 0 {
			if d.Result != Allowed {
				t.Fatalf("request %d under %s: %+v", n, p.Name, d)
			}
		} else {
			start, _ := periodBounds(p.Period, now)
			k := periodKey{p.Period, start}
			if count[k] < p.Quota {
				count[k]++
				accepted++
				if d.Result != Allowed || d.QuotaUsed != count[k] {
					t.Fatalf("request %d under %s: %+v, want Allowed with %d used", n, p.Name, d, count[k])
				}
			} else {
				refused++
				if d.Result != QuotaExceeded {
					t.Fatalf("request %d under %s with %d used: %+v, want QuotaExceeded", n, p.Name, count[k], d)
				}
			}
		}
		if n%7 == 6 {
			if err := l.Sync(false); err != nil {
				t.Fatal(err)
			}
		}
		if n == 150 || n == 450 {
			if err := l.Close(); err != nil {
				t.Fatal(err)
			}
			l = open()
			// Every period's count is back, whatever policy came last.
			for _, p := range alternatingPolicies[:4] {
				start, _ := periodBounds(p.Period, c.Now().UnixNano())
				u, err := l.Usage(ctx, "s", p)
				if err != nil || u.Used != count[periodKey{p.Period, start}] {
					t.Fatalf("after Close and New at request %d: %s used %d, %v; want %d", n, p.Name, u.Used, err, count[periodKey{p.Period, start}])
				}
			}
		}
		c.Add(time.Minute)
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	// Both periods saw their quotas reached before and after the
	// boundary, so both admitting and refusing were tested.
	for _, k := range []periodKey{
		{Day, date("2026-03-31T00:00:00Z").UnixNano()}, {Day, date("2026-04-01T00:00:00Z").UnixNano()},
		{Month, date("2026-03-01T00:00:00Z").UnixNano()}, {Month, date("2026-04-01T00:00:00Z").UnixNano()},
	} {
		if count[k] < 25 {
			t.Errorf("period %s %s: %d accepted, want the quota reached", k.p, time.Unix(0, k.start).UTC(), count[k])
		}
	}
	t.Logf("%d accepted, %d refused by the quota", accepted, refused)
}

// TestSlotTokensReturned: on Redis, a subject whose policy moves from a
// day quota to a month quota, or to no quota, returns the day tokens it
// leased at the second sync after it stops using them (the first renews
// them: it was active), so the shared count is the accepted requests; its
// local count, made while Redis was down, is sent although no policy uses
// the slot any more.
func TestSlotTokensReturned(t *testing.T) {
	srv := testredis.Start(t)
	client := redis.NewClient(&redis.Options{Addr: srv.Addr(), ContextTimeoutEnabled: true, MaxRetries: 1})
	defer client.Close()
	c := newClock(date("2026-03-10T12:00:00Z"))
	be := NewRedisBackend(client, fmt.Sprintf("rltest%d", namespaces.Add(1)))
	l, err := newLimiterLoop(Options{Backend: be, Now: c.Now, Timeout: 100 * time.Millisecond}, false)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	ctx := context.Background()
	day := &Policy{Name: "day", Quota: 1000, Period: Day}
	rateOnly := &Policy{Name: "rate", Limit: 100, Window: time.Minute}
	start, _ := periodBounds(Day, c.Now().UnixNano())
	dayCount := func() int64 {
		t.Helper()
		n, err := be.quotaCount(ctx, "s", Day, start)
		if err != nil {
			t.Fatal(err)
		}
		return n
	}
	for round, next := range []*Policy{{Name: "month", Quota: 1000, Period: Month}, rateOnly} {
		for range 10 {
			l.Allow("s", day)
		}
		syncN(t, l, 1) // renewed: the subject was active
		if n := dayCount(); n <= int64(10*(round+1)) {
			t.Fatalf("round %d: no day tokens held beyond the accepted requests (counter %d): nothing to return", round, n)
		}
		l.Allow("s", next)
		syncN(t, l, 2)
		if n, want := dayCount(), int64(10*(round+1)); n != want {
			t.Fatalf("after moving to %s: the day counter is %d, want %d (the accepted requests, no token held)", next.Name, n, want)
		}
	}
	// A local count: Redis is down while the subject is on the day quota,
	// the policy moves to no quota, Redis comes back (empty: persistence
	// is off), and the 5 are sent.
	srv.Stop()
	for range 5 {
		l.Allow("s", day)
	}
	if !l.Degraded() {
		t.Fatal("not degraded with Redis down")
	}
	l.Allow("s", rateOnly)
	srv.Restart()
	syncN(t, l, 1)
	if n := dayCount(); n != 5 {
		t.Fatalf("after the outage: the day counter is %d, want the 5 counted locally", n)
	}
}

// TestBoltQuotaMigration: a file with the former one-record-per-subject
// bucket "quota" keeps its counts under the per-kind layout, and the old
// bucket is gone.
func TestBoltQuotaMigration(t *testing.T) {
	dir := t.TempDir()
	c := newClock(date("2026-03-10T12:00:00Z"))
	db := openBolt(t, dir)
	t.Cleanup(func() { _ = db.Close() })
	dayStart, _ := periodBounds(Day, c.Now().UnixNano())
	monthStart, _ := periodBounds(Month, c.Now().UnixNano())
	err := db.Update(func(tx *bolt.Tx) error {
		rl, err := tx.CreateBucketIfNotExists(bucketRatelimit)
		if err != nil {
			return err
		}
		old, err := rl.CreateBucket(bucketQuotaV1)
		if err != nil {
			return err
		}
		put := func(subject string, p Period, start, n int64) error {
			v := make([]byte, 17)
			v[0] = byte(p)
			binary.BigEndian.PutUint64(v[1:], uint64(start))
			binary.BigEndian.PutUint64(v[9:], uint64(n))
			return old.Put([]byte(subject), v)
		}
		if err := put("a", Day, dayStart, 7); err != nil {
			return err
		}
		return put("b", Month, monthStart, 9)
	})
	if err != nil {
		t.Fatal(err)
	}
	be, err := NewBoltBackend(db)
	if err != nil {
		t.Fatal(err)
	}
	l := newLimiter(t, be, c)
	if d := l.Allow("a", &Policy{Name: "d", Quota: 8, Period: Day}); d.Result != Allowed || d.QuotaUsed != 8 {
		t.Fatalf("a: %+v, want Allowed with 8 used (7 migrated)", d)
	}
	if d := l.Allow("a", &Policy{Name: "d", Quota: 8, Period: Day}); d.Result != QuotaExceeded {
		t.Fatalf("a: %+v, want QuotaExceeded", d)
	}
	if u, err := l.Usage(context.Background(), "b", &Policy{Name: "m", Quota: 100, Period: Month}); err != nil || u.Used != 9 {
		t.Fatalf("b: %+v, %v; want 9 used (migrated)", u, err)
	}
	_ = db.View(func(tx *bolt.Tx) error {
		if tx.Bucket(bucketRatelimit).Bucket(bucketQuotaV1) != nil {
			t.Error("the old bucket is still there")
		}
		return nil
	})
}

// TestBoltSubjectsOneSync: subjects synced in one transaction keep their
// own counts (bbolt keeps a value slice until commit, so each record
// needs a slice of its own).
func TestBoltSubjectsOneSync(t *testing.T) {
	c := newClock(date("2026-03-10T12:00:00Z"))
	l, be := newBoltLimiter(t, c)
	p := &Policy{Name: "p", Quota: 100, Period: Day}
	for i := range 5 {
		for range i + 1 {
			l.Allow(fmt.Sprintf("s%d", i), p)
		}
	}
	if err := l.Sync(false); err != nil {
		t.Fatal(err)
	}
	start, _ := periodBounds(Day, c.Now().UnixNano())
	for i := range 5 {
		if n, err := be.quotaCount(context.Background(), fmt.Sprintf("s%d", i), Day, start); err != nil || n != int64(i+1) {
			t.Errorf("s%d: %d in the file, %v; want %d", i, n, err, i+1)
		}
	}
}
