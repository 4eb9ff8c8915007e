package ratelimit

import (
	"testing"
	"time"

	"github.com/caddy-apikeys/caddy-apikeys/internal/testredis"
)

// TestAttackDowngradeKeepsLeasedTokens: three instances on Redis hold rate
// tokens leased under a large plan (1000 per hour); the key's plan is then
// lowered to 10 per hour ("new numbers for a plan apply to every key at
// once", README). The README bounds N instances to 2×limit−1+limit/10+N in
// any window including a fresh burst: 10×2−1+1+3 = 23 for the new plan.
// Each instance keeps spending the tokens it leased under the old plan (the
// lease lasts a tenth of the OLD window) while its own bucket, rescaled to
// the new plan, is full: every instance admits a full burst of its own, and
// the shared bucket, whose TAT was counted at the old interval, gives another.
func TestAttackDowngradeKeepsLeasedTokens(t *testing.T) {
	srv := testredis.Start(t)
	c := newClock(date("2026-03-10T12:00:00Z"))
	ls, _ := redisLimiters(t, srv.Client(t), c, 3)
	big := &Policy{Name: "big", Limit: 1000, Window: time.Hour}
	small := &Policy{Name: "small", Limit: 10, Window: time.Hour}
	syncAll := func() {
		for _, l := range ls {
			if err := l.Sync(false); err != nil {
				t.Fatal(err)
			}
		}
	}
	// Some use under the big plan: each instance leases about 20 tokens.
	for range 10 {
		for _, l := range ls {
			if d := l.Allow("k", big); d.Result != Allowed {
				t.Fatalf("big plan: %+v", d)
			}
		}
	}
	syncAll()
	// 40 s later each instance's own bucket has refilled (10 × 3.6 s), its
	// lease (6 min) has not lapsed.
	for range 40 {
		c.Add(time.Second)
		syncAll()
	}
	// Downgrade. Hammer all three instances for 10 s: well inside one
	// window of the small plan.
	admitted := 0
	for range 10 {
		for _, l := range ls {
			for range 20 {
				if l.Allow("k", small).Result == Allowed {
					admitted++
				}
			}
		}
		c.Add(time.Second)
		syncAll()
	}
	bound := int(2*small.Limit - 1 + small.Limit/10 + int64(len(ls)))
	if admitted > bound {
		t.Errorf("after the plan went to %d per hour, %d instances admitted %d in 10 s; the README bounds any window to %d", small.Limit, len(ls), admitted, bound)
	}
	t.Logf("admitted %d (bound %d)", admitted, bound)
}
