package keystore

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/caddy-apikeys/caddy-apikeys/internal/testredis"
)

// BenchmarkCacheBackground measures what a cache with 100,000 records in
// use costs in the background, with no lookups: the refresh loop's pass
// when the records version has not moved ("quiet": one GET), the full pass
// that re-reads every record in use ("full": every fullRefreshEvery, 5
// minutes), the pass after it ("after-full"), and the walk that collects
// last uses (CollectUses, once per last_used_interval). Each reports the
// process's CPU time per pass (cpu-ns/op, getrusage), which a shared
// machine disturbs less than wall time; the records live in a real
// redis-server.
//
//	go test -run '^$' -bench CacheBackground -benchtime 5x ./keystore
func BenchmarkCacheBackground(b *testing.B) {
	const n = 100_000
	srv := testredis.Start(b)
	inner, err := NewRedis(RedisOptions{URLs: []string{srv.URL()}, Namespace: "c"})
	if err != nil {
		b.Fatal(err)
	}
	clock := newFakeClock()
	c, err := NewCachedStore(inner, CacheOptions{Now: clock.Now})
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	ds := make([]Digest, n)
	var wg sync.WaitGroup
	for w := range 32 {
		wg.Go(func() {
			for i := w; i < n; i += 32 {
				k := newKey(b, "owner", time.Now().UTC().Truncate(time.Millisecond))
				mustCreate(b, inner, k)
				ds[i] = k.Digest
			}
		})
	}
	wg.Wait()
	for _, d := range ds {
		if _, err := c.Lookup(context.Background(), d); err != nil {
			b.Fatal(err)
		}
	}
	// The passes below are called directly: park the refresh loop (a
	// disabled cache skips them) and let a pass it is in finish. (Not
	// synchronised for the race detector; benchmarks do not run under it.)
	c.disabled.Store(true)
	time.Sleep(time.Second)
	// Each full pass finds every record past Refresh, so re-reads them all
	// (still in use: -benchtime 5x keeps the clock within WarmFor).
	stale := func() { clock.Advance(time.Duration(c.refresh.Load()) + time.Second) }

	pass := func(b *testing.B, before, measured func()) {
		var cpu time.Duration
		for b.Loop() {
			before()
			c0 := processCPU()
			measured()
			cpu += processCPU() - c0
		}
		b.ReportMetric(float64(cpu.Nanoseconds())/float64(b.N), "cpu-ns/op")
	}
	nothing := func() {}
	full := func() { c.lastFull.Store(0); c.refreshDue() }
	b.Run("quiet", func(b *testing.B) { c.refreshDue(); c.refreshDue(); pass(b, nothing, c.refreshDue) })
	b.Run("full", func(b *testing.B) { pass(b, stale, full) })
	b.Run("after-full", func(b *testing.B) { pass(b, func() { stale(); full() }, c.refreshDue) })
	b.Run("collect-uses", func(b *testing.B) { pass(b, nothing, func() { c.CollectUses(func(string, time.Time) {}) }) })
}
