package ratelimit

import (
	"context"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/caddy-apikeys/caddy-apikeys/internal/testredis"
)

var namespaces atomic.Int64

// redisLimiters returns n Limiters (n instances) on client in one fresh
// namespace, their sync loops off (tests call Sync), sharing clock c.
func redisLimiters(t testing.TB, client redis.UniversalClient, c *clock, n int) ([]*Limiter, *RedisBackend) {
	t.Helper()
	be := NewRedisBackend(client, fmt.Sprintf("rltest%d", namespaces.Add(1)))
	out := make([]*Limiter, n)
	for i := range out {
		out[i] = newLimiter(t, be, c)
	}
	return out, be
}

// commandCount returns the number of commands the servers have run, the
// commands scripts run included (INFO commandstats).
func commandCount(t testing.TB, nodes ...*redis.Client) int64 {
	t.Helper()
	var n int64
	for _, c := range nodes {
		info, err := c.Info(context.Background(), "commandstats").Result()
		if err != nil {
			t.Fatal(err)
		}
		for _, line := range strings.Split(info, "\n") {
			if !strings.HasPrefix(line, "cmdstat_") {
				continue
			}
			_, rest, _ := strings.Cut(line, ":calls=")
			v, _ := strconv.ParseInt(strings.SplitN(rest, ",", 2)[0], 10, 64)
			n += v
		}
	}
	return n - int64(len(nodes)) // this INFO
}

func TestRedisBurstExact(t *testing.T) {
	srv := testredis.Start(t)
	c := newClock(date("2026-03-10T12:00:00Z"))
	ls, _ := redisLimiters(t, srv.Client(t), c, 1)
	l := ls[0]
	p := plan(100, time.Minute)
	admitted := 0
	for range 150 {
		if l.Allow("s", p).Result == Allowed {
			admitted++
		}
	}
	if admitted != 100 || l.Degraded() {
		t.Fatalf("burst admitted %d, want 100 (degraded %v)", admitted, l.Degraded())
	}
	d := l.Allow("s", p)
	if d.Result != RateLimited || d.RetryAfter <= 0 {
		t.Fatalf("after the burst: %+v", d)
	}
	// The instance's own GCRA keeps it exact over any window: a second
	// instance state (after a sync) admits no more than 2L-1.
	var ts []int64
	for range 100 {
		for l.Allow("s", p).Result == Allowed {
			ts = append(ts, c.ns.Load())
		}
		c.Add(600 * time.Millisecond)
		if c.ns.Load()%int64(time.Second) < int64(600*time.Millisecond) {
			if err := l.Sync(false); err != nil {
				t.Fatal(err)
			}
		}
	}
	if got := maxInWindow(append(make([]int64, 100), ts...), int64(time.Minute)); got > 2*100-1 {
		t.Fatalf("%d in one window", got)
	}
}

// TestRedisQuotaNeverOvershoots: three instances hammering one subject
// concurrently never admit more than the quota.
func TestRedisQuotaNeverOvershoots(t *testing.T) {
	srv := testredis.Start(t)
	c := newClock(date("2026-03-10T12:00:00Z"))
	ls, be := redisLimiters(t, srv.Client(t), c, 3)
	p := &Policy{Name: "p", Quota: 500, Period: Month}
	var admitted atomic.Int64
	var wg sync.WaitGroup
	for _, l := range ls {
		for range 4 {
			wg.Go(func() {
				for k := range 300 {
					if l.Allow("s", p).Result == Allowed {
						admitted.Add(1)
					}
					if k%50 == 0 {
						_ = l.Sync(false)
					}
				}
			})
		}
	}
	wg.Wait()
	if admitted.Load() != 500 {
		t.Fatalf("admitted %d, want exactly the quota, 500", admitted.Load())
	}
	for _, l := range ls {
		if err := l.Sync(true); err != nil { // every lease returned, every count sent
			t.Fatal(err)
		}
	}
	start, _ := periodBounds(Month, c.ns.Load())
	if n, err := be.quotaCount(context.Background(), "s", Month, start); err != nil || n != 500 {
		t.Fatalf("shared count %d, %v", n, err)
	}
	u, err := ls[0].Usage(context.Background(), "s", p)
	if err != nil || u.Used != 500 {
		t.Fatalf("Usage = %+v, %v", u, err)
	}
	h, err := ls[1].History(context.Background(), "s", 1)
	if err != nil || h[0].Accepted != 500 || h[0].QuotaExceeded != 3*4*300-500 {
		t.Fatalf("History = %+v, %v", h, err)
	}
}

// TestRedisPeriodBoundaries: on Redis, quotas reset at the UTC day, month
// and year boundary, and the rate limit's state crosses midnight.
func TestRedisPeriodBoundaries(t *testing.T) {
	srv := testredis.Start(t)
	client := srv.Client(t)
	for _, tc := range []struct {
		period      Period
		before, end string
	}{
		{Day, "2026-03-10T23:59:59.999Z", "2026-03-11T00:00:00Z"},
		{Month, "2026-02-28T23:59:59.999Z", "2026-03-01T00:00:00Z"},
		{Month, "2026-12-31T23:59:59.999Z", "2027-01-01T00:00:00Z"},
	} {
		c := newClock(date(tc.before))
		ls, _ := redisLimiters(t, client, c, 2)
		p := &Policy{Name: "p", Limit: 5, Window: time.Hour, Quota: 3, Period: tc.period}
		for k := range 4 {
			want := Allowed
			if k == 3 {
				want = QuotaExceeded
			}
			if d := ls[k%2].Allow("s", p); d.Result != want {
				t.Fatalf("%s: request %d: %+v", tc.end, k, d)
			}
		}
		c.Set(date(tc.end))
		for _, l := range ls {
			_ = l.Sync(false)
		}
		// A new quota period, the same rate bucket: 2 of 5 left.
		var got []Result
		for k := range 4 {
			got = append(got, ls[k%2].Allow("s", p).Result)
		}
		if !slices.Equal(got, []Result{Allowed, Allowed, RateLimited, RateLimited}) {
			t.Fatalf("%s: after the boundary: %v", tc.end, got)
		}
	}
}

// hammer runs instances on one subject: each hammers from its own
// goroutines while the clock moves in steps and every instance syncs once
// a (simulated) second. It returns the admission times.
func hammer(t *testing.T, ls []*Limiter, c *clock, p *Policy, d time.Duration) []int64 {
	var mu sync.Mutex
	var ts []int64
	const step = 50 * time.Millisecond
	for k := range int(d / step) {
		// Each instance's two goroutines send 10 requests each in the
		// step, concurrently: 1,200 requests per second in all.
		var wg sync.WaitGroup
		for _, l := range ls {
			for range 2 {
				wg.Go(func() {
					for range 10 {
						if l.Allow("s", p).Result == Allowed {
							now := c.ns.Load()
							mu.Lock()
							ts = append(ts, now)
							mu.Unlock()
						}
					}
				})
			}
		}
		wg.Wait()
		c.Add(step)
		if k%int(time.Second/step) == 0 {
			for _, l := range ls {
				if err := l.Sync(false); err != nil {
					t.Error(err)
				}
			}
		}
	}
	slices.Sort(ts)
	return ts
}

// checkInstances hammers with three instances and checks the bounds: at
// most Limit×1.1+N in every window after the first, at most the
// single-instance worst case 2L-1 plus L/10+N in any window.
func checkInstances(t *testing.T, client redis.UniversalClient, name string) {
	const limit, n = 100, 3
	start := date("2026-03-10T12:00:00Z")
	c := newClock(start)
	ls, _ := redisLimiters(t, client, c, n)
	p := plan(limit, time.Minute)
	ts := hammer(t, ls, c, p, 5*time.Minute)
	for _, l := range ls {
		if l.Degraded() {
			t.Fatal("degraded")
		}
	}
	w := int64(time.Minute)
	worst := 0
	var per []int
	for k := int64(1); k < 5; k++ {
		from, to := start.UnixNano()+k*w, start.UnixNano()+(k+1)*w
		cnt := 0
		for _, x := range ts {
			if x >= from && x < to {
				cnt++
			}
		}
		per = append(per, cnt)
		worst = max(worst, cnt)
	}
	var steady []int64
	for _, x := range ts {
		if x >= start.UnixNano()+w {
			steady = append(steady, x)
		}
	}
	sliding := maxInWindow(steady, w)
	any := maxInWindow(ts, w)
	t.Logf("%s: %d instances, limit %d/min, hammered 5 min: admitted per window after the first %v (bound %d); most in any sliding window after the first %d; most in any window %d (bound %d)",
		name, n, limit, per, limit*11/10+n, sliding, any, 2*limit-1+limit/10+n)
	if sliding > limit*11/10+n {
		t.Fatalf("%d admitted in one window at steady state, bound %d", sliding, limit*11/10+n)
	}
	if any > 2*limit-1+limit/10+n {
		t.Fatalf("%d admitted in one window, bound %d", any, 2*limit-1+limit/10+n)
	}
	if worst < limit*9/10 {
		t.Fatalf("only %d admitted in a window: the instances starve", worst)
	}
}

func TestRedisInstances(t *testing.T) {
	srv := testredis.Start(t)
	checkInstances(t, srv.Client(t), "standalone")
}

func TestRedisClusterInstances(t *testing.T) {
	cl := testredis.StartCluster(t)
	checkInstances(t, cl.Client(t), "cluster")
}

// TestRedisCommandsPerRequest: 10,000 subjects used round-robin, each
// well below its limit of 100/min, cost at most 0.05 Redis commands per
// admitted request at steady state, counted by INFO commandstats.
func TestRedisCommandsPerRequest(t *testing.T) {
	srv := testredis.Start(t)
	client := srv.Client(t)
	for _, n := range []int{1, 3} {
		c := newClock(date("2026-03-10T12:00:00Z"))
		ls, _ := redisLimiters(t, client, c, n)
		p := &Policy{Name: "p", Limit: 100, Window: time.Minute, Quota: 100_000, Period: Month}
		const subjects, perSecond = 10_000, 6_000
		names := make([]string, subjects)
		for i := range names {
			names[i] = fmt.Sprintf("key_%08x", i)
		}
		next := 0
		var admitted, before int64
		for sec := range 40 {
			if sec == 10 {
				before, admitted = commandCount(t, client), 0
			}
			for k := range perSecond {
				if ls[k%n].Allow(names[next], p).Result == Allowed {
					admitted++
				}
				next = (next + 1) % subjects
				if k%(perSecond/20) == 0 {
					c.Add(50 * time.Millisecond)
				}
			}
			for _, l := range ls {
				if err := l.Sync(false); err != nil {
					t.Fatal(err)
				}
			}
		}
		cmds := commandCount(t, client) - before
		perReq := float64(cmds) / float64(admitted)
		t.Logf("%d instance(s), 10,000 subjects round-robin at 6,000 req/s (limit 100/min, quota): %d commands for %d admitted: %.4f per request", n, cmds, admitted, perReq)
		if admitted != 30*perSecond {
			t.Fatalf("admitted %d of %d", admitted, 30*perSecond)
		}
		if perReq > 0.05 {
			t.Fatalf("%.4f commands per request, bound 0.05", perReq)
		}
	}
}

// TestRedisHammeredCommands: a subject hammered far above its limit
// makes no Redis call of its own: it is leased in the sync's script calls
// that other subjects make anyway. Three instances, 1,000 subjects
// round-robin at 1,000 req/s, plus one subject hammered at 1,200 req/s
// with a limit of 100/min: at most 0.05 commands per admitted request,
// and the hammered subject adds at most 0.05 commands per request it
// gets admitted.
func TestRedisHammeredCommands(t *testing.T) {
	srv := testredis.Start(t)
	client := srv.Client(t)
	run := func(hammered bool) (cmds, admitted, hot int64) {
		c := newClock(date("2026-03-10T12:00:00Z"))
		ls, _ := redisLimiters(t, client, c, 3)
		p := plan(100, time.Minute)
		next := 0
		for step := range 2400 { // 2 min in steps of 50 ms
			if step == 400 {
				cmds, admitted, hot = commandCount(t, client), 0, 0
			}
			for k := range 50 {
				if ls[k%3].Allow(fmt.Sprintf("bg%04d", next), p).Result == Allowed {
					admitted++
				}
				next = (next + 1) % 1000
				if hammered {
					if ls[k%3].Allow("hot", p).Result == Allowed {
						admitted++
						hot++
					}
				}
			}
			c.Add(50 * time.Millisecond)
			if step%20 == 0 {
				for _, l := range ls {
					if err := l.Sync(false); err != nil {
						t.Fatal(err)
					}
				}
			}
		}
		return commandCount(t, client) - cmds, admitted, hot
	}
	baseCmds, baseAdmitted, _ := run(false)
	cmds, admitted, hot := run(true)
	marginal := float64(cmds-baseCmds) / float64(hot)
	t.Logf("3 instances, 1,000 subjects at 1,000 req/s: %d commands for %d admitted (%.4f); with one subject hammered at 1,000 req/s (limit 100/min): %d commands for %d admitted (%.4f), the hammered subject %d admitted for %d more commands (%.3f per admitted request)",
		baseCmds, baseAdmitted, float64(baseCmds)/float64(baseAdmitted), cmds, admitted, float64(cmds)/float64(admitted), hot, cmds-baseCmds, marginal)
	if hot < 150 || hot > 180 {
		t.Fatalf("hammered subject admitted %d in 100 s, want about 167", hot)
	}
	if float64(cmds)/float64(admitted) > 0.05 || marginal > 0.05 {
		t.Fatal("over 0.05 commands per admitted request")
	}
}

// TestRedisOutage: with Redis hung (SIGSTOP) or down, requests are decided
// locally within the timeout, quotas counted locally, and the counts are
// added to the shared ones when Redis is back.
func TestRedisOutage(t *testing.T) {
	srv := testredis.Start(t)
	c := newClock(date("2026-03-10T12:00:00Z"))
	// As keystore builds its clients: context deadlines bound every call.
	client := redis.NewClient(&redis.Options{Addr: srv.Addr(), ContextTimeoutEnabled: true, MaxRetries: 1, DialTimeout: time.Second})
	defer client.Close()
	be := NewRedisBackend(client, fmt.Sprintf("rltest%d", namespaces.Add(1)))
	l, err := newLimiterLoop(Options{Backend: be, Now: c.Now, Timeout: 100 * time.Millisecond}, false)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	p := &Policy{Name: "p", Limit: 10, Window: time.Minute, Quota: 25, Period: Day}
	for range 5 {
		if d := l.Allow("s", p); d.Result != Allowed {
			t.Fatalf("%+v", d)
		}
	}
	if err := l.Sync(false); err != nil {
		t.Fatal(err)
	}
	for _, outage := range []struct {
		name      string
		down, up  func()
		recovered int64 // shared count after reconciling
	}{
		{"hung", srv.Pause, srv.Resume, 15},
		{"down", srv.Stop, srv.Restart, 10}, // the restarted server lost its data
	} {
		c.Add(time.Hour) // a fresh bucket
		outage.down()
		counted := 0
		for range 12 {
			start := time.Now()
			d := l.Allow("s", p)
			if el := time.Since(start); el > time.Second {
				t.Fatalf("%s: Allow took %s", outage.name, el)
			}
			if d.Result == Allowed {
				counted++
			}
		}
		if !l.Degraded() {
			t.Fatalf("%s: not degraded", outage.name)
		}
		// Local limiting, the full limit: 10 of 12; the quota counted
		// locally (5 + 10 of 25 after the first outage, 25 after the second).
		if want := min(10, 25-5-10*boolInt(outage.name == "down")); counted != want {
			t.Fatalf("%s: %d admitted during the outage, want %d", outage.name, counted, want)
		}
		if err := l.Sync(false); err == nil {
			t.Fatalf("%s: Sync succeeded during the outage", outage.name)
		}
		outage.up()
		if err := l.Sync(true); err != nil {
			t.Fatalf("%s: Sync after the outage: %v", outage.name, err)
		}
		if l.Degraded() {
			t.Fatalf("%s: still degraded", outage.name)
		}
		start, _ := periodBounds(Day, c.ns.Load())
		n, err := be.quotaCount(context.Background(), "s", Day, start)
		if err != nil || n != outage.recovered {
			t.Fatalf("%s: shared count %d (%v), want %d", outage.name, n, err, outage.recovered)
		}
	}
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}

// TestRedisRestart: quota counts survive Close and New; a crash (no
// Close) over-counts at most the tokens leased and not spent.
func TestRedisRestart(t *testing.T) {
	srv := testredis.Start(t)
	client := srv.Client(t)
	c := newClock(date("2026-03-10T12:00:00Z"))
	be := NewRedisBackend(client, fmt.Sprintf("rltest%d", namespaces.Add(1)))
	p := &Policy{Name: "p", Quota: 1000, Period: Month}
	l, _ := newLimiterLoop(Options{Backend: be, Now: c.Now}, false)
	for range 30 {
		l.Allow("s", p)
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	l, _ = newLimiterLoop(Options{Backend: be, Now: c.Now}, false)
	if u, err := l.Usage(context.Background(), "s", p); err != nil || u.Used != 30 {
		t.Fatalf("after Close and New: %+v, %v", u, err)
	}
	for range 10 {
		l.Allow("s", p)
	}
	sh, h := l.shardOf("s")
	i, _ := sh.find(h)
	held := sh.st[i].q[Month-1].held
	// Crash: no Close.
	l2, _ := newLimiterLoop(Options{Backend: be, Now: c.Now}, false)
	defer l2.Close()
	u, err := l2.Usage(context.Background(), "s", p)
	if err != nil || u.Used != 40+held {
		t.Fatalf("after a crash: %+v, %v; want 40 + %d leased, not spent", u, err, held)
	}
	t.Logf("crash with %d quota tokens leased and not spent: counted %d for 40 accepted", held, u.Used)
}

// BenchmarkAllowShared is the hit path with a shared backend: the subject
// holds leased tokens (12 requests first: leases double to 4,096 tokens).
func BenchmarkAllowShared(b *testing.B) {
	client := testredis.Start(b).Client(b)
	benchAllow(b, func(b *testing.B) *Limiter { ls, _ := redisLimiters(b, client, nil, 1); return ls[0] }, 12)
}

// TestRedisCommandsIntermittent: subjects used a few times, then idle for
// longer than a lease lasts (the load benchmark's rounds: 10,000 keys used
// round-robin at 3,000 req/s for 13 s, then 13 s of rest), cost no
// synchronous lease when they come back within idleEvict: each instance
// renews one token per idle subject in its batched syncs, so the first
// request after the pause finds it. At most 0.05 commands per admitted
// request.
func TestRedisCommandsIntermittent(t *testing.T) {
	srv := testredis.Start(t)
	client := srv.Client(t)
	c := newClock(date("2026-03-10T12:00:00Z"))
	ls, _ := redisLimiters(t, client, c, 1)
	l := ls[0]
	p := &Policy{Name: "p", Limit: 100, Window: time.Minute, Quota: 100_000_000, Period: Month}
	const subjects, perSecond, busy, rest = 10_000, 3_000, 13, 13
	names := make([]string, subjects)
	for i := range names {
		names[i] = fmt.Sprintf("key_%08x", i)
	}
	next := 0
	var admitted, sent, before int64
	for round := range 4 {
		if round == 1 {
			before, admitted, sent = commandCount(t, client), 0, 0
		}
		for range busy {
			for k := range perSecond {
				sent++
				if l.Allow(names[next], p).Result == Allowed {
					admitted++
				}
				next = (next + 1) % subjects
				if k%(perSecond/20) == 0 {
					c.Add(50 * time.Millisecond)
				}
			}
			if err := l.Sync(false); err != nil {
				t.Fatal(err)
			}
		}
		for range rest {
			c.Add(time.Second)
			if err := l.Sync(false); err != nil {
				t.Fatal(err)
			}
		}
	}
	cmds := commandCount(t, client) - before
	perReq := float64(cmds) / float64(admitted)
	t.Logf("10,000 subjects, rounds of 13 s at 3,000 req/s and 13 s idle (limit 100/min, quota): %d commands for %d admitted: %.4f per request", cmds, admitted, perReq)
	if admitted != sent {
		t.Fatalf("admitted %d of %d", admitted, sent)
	}
	if perReq > 0.05 {
		t.Fatalf("%.4f Redis commands per request, want at most 0.05", perReq)
	}
}
