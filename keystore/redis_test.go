package keystore

import (
	"context"
	"errors"
	"fmt"
	"net"
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

// redisNamespaces makes every test store's namespace unique, so parallel
// subtests share one redis-server without seeing each other's keys.
var redisNamespaces atomic.Int64

// newRedisStore returns a RedisStore on srv in a fresh namespace.
func newRedisStore(t *testing.T, srv *testredis.Server, opts RedisOptions) *RedisStore {
	t.Helper()
	opts.URLs = []string{srv.URL()}
	if opts.Namespace == "" {
		opts.Namespace = fmt.Sprintf("test%d", redisNamespaces.Add(1))
	}
	s, err := NewRedis(opts)
	if err != nil {
		t.Fatalf("NewRedis: %v", err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s
}

// redisTestRetention is the retention of the Redis conformance suite's
// retention test: Redis expires keys on its own clock, so the test waits it
// out.
const redisTestRetention = 2 * time.Second

func TestRedisConformance(t *testing.T) {
	srv := testredis.Start(t)
	runConformance(t, backend{
		newStore: func(t *testing.T) Store {
			return newRedisStore(t, srv, RedisOptions{})
		},
		newRetentionStore: func(t *testing.T) (Store, func(time.Time)) {
			s := newRedisStore(t, srv, RedisOptions{Retention: redisTestRetention})
			return s, func(end time.Time) {
				time.Sleep(time.Until(end.Add(redisTestRetention + 100*time.Millisecond)))
			}
		},
		open: func(t *testing.T, retention time.Duration) (Store, error) {
			s, err := NewRedis(RedisOptions{URLs: []string{srv.URL()}, Retention: retention})
			if err != nil {
				return nil, err
			}
			return s, nil
		},
	})
}

// TestRedisClusterConformance runs the suite on a three-node Redis Cluster,
// where the keys of one API key live in different hash slots: every command
// must touch a single key (or be a pipeline the client splits by node).
func TestRedisClusterConformance(t *testing.T) {
	cluster := testredis.StartCluster(t)
	open := func(t *testing.T, retention time.Duration) (*RedisStore, error) {
		s, err := NewRedis(RedisOptions{
			URLs:      cluster.URLs(),
			Namespace: fmt.Sprintf("test%d", redisNamespaces.Add(1)),
			Retention: retention,
		})
		if err != nil {
			return nil, err
		}
		t.Cleanup(func() { _ = s.Close() })
		return s, nil
	}
	mustOpen := func(t *testing.T, retention time.Duration) *RedisStore {
		s, err := open(t, retention)
		if err != nil {
			t.Fatal(err)
		}
		if _, ok := s.c.(*redis.ClusterClient); !ok {
			t.Fatalf("store on %T, want a cluster client", s.c)
		}
		return s
	}
	runConformance(t, backend{
		newStore: func(t *testing.T) Store { return mustOpen(t, 0) },
		newRetentionStore: func(t *testing.T) (Store, func(time.Time)) {
			return mustOpen(t, redisTestRetention), func(end time.Time) {
				time.Sleep(time.Until(end.Add(redisTestRetention + 100*time.Millisecond)))
			}
		},
		open: func(t *testing.T, retention time.Duration) (Store, error) {
			s, err := open(t, retention)
			if err != nil {
				return nil, err
			}
			return s, nil
		},
	})
}

// TestRedisKeyLayout pins the documented Redis key layout: other tools
// (and future versions) rely on it.
func TestRedisKeyLayout(t *testing.T) {
	srv := testredis.Start(t)
	rdb := srv.Client(t)
	s := newRedisStore(t, srv, RedisOptions{Namespace: "ns"})
	ctx := ctxT(t)

	k := newKey(t, "alice@example.com", time.UnixMilli(1754827200123).UTC())
	k.ExpiresAt = nil // else retention may have deleted it already
	mustCreate(t, s, k)

	if got := rdb.Get(ctx, "ns:id:"+k.ID).Val(); got != k.Digest.String() {
		t.Errorf("ns:id:<id> = %q, want the hex digest", got)
	}
	if n := rdb.Exists(ctx, "ns:digest:"+k.Digest.String()).Val(); n != 1 {
		t.Errorf("ns:digest:<hex> missing")
	}
	members := rdb.ZRangeWithScores(ctx, "ns:owner:"+ownerHash("alice@example.com"), 0, -1).Val()
	want := "0001754827200123:" + k.ID
	if len(members) != 1 || members[0].Member != want || members[0].Score != 0 {
		t.Errorf("owner index = %+v, want one member %q with score 0", members, want)
	}

	if _, err := s.ReserveIdempotency(ctx, "idem-1", newIdem("tok"), time.Minute); err != nil {
		t.Fatal(err)
	}
	v := rdb.Get(ctx, "ns:idem:idem-1").Val()
	if !strings.HasPrefix(v, "tok\n{") {
		t.Errorf("ns:idem:<id> = %q, want \"<token>\\n<json>\"", v)
	}
	if ttl := rdb.PTTL(ctx, "ns:idem:idem-1").Val(); ttl <= 0 || ttl > time.Minute {
		t.Errorf("idempotency TTL = %s, want (0, 1m]", ttl)
	}

	// Nothing stored under the raw key or outside the namespace.
	keys := rdb.Keys(ctx, "*").Val()
	for _, key := range keys {
		if !strings.HasPrefix(key, "ns:") {
			t.Errorf("key %q outside the namespace", key)
		}
	}
}

// TestRedisExpiryLayout pins how retention and last use show in Redis: the
// expiry of the id and digest keys of a key with an end, and the last-use
// bucket field.
func TestRedisExpiryLayout(t *testing.T) {
	srv := testredis.Start(t)
	rdb := srv.Client(t)
	const retention = time.Hour
	s := newRedisStore(t, srv, RedisOptions{Namespace: "exp", Retention: retention})
	ctx := ctxT(t)

	k := newKey(t, "user-1", time.Now())
	k.ExpiresAt = nil
	mustCreate(t, s, k)
	keys := []string{"exp:id:" + k.ID, "exp:digest:" + k.Digest.String()}
	// wantExpiry checks that each of keys expires at at (zero: never).
	wantExpiry := func(step string, at time.Time) {
		t.Helper()
		for _, key := range keys {
			ttl := rdb.PTTL(ctx, key).Val()
			switch {
			case at.IsZero() && ttl != -1:
				t.Errorf("%s: %s has TTL %s, want none", step, key, ttl)
			case !at.IsZero() && (ttl < 0 || time.Until(at)-ttl > time.Second || ttl-time.Until(at) > time.Second):
				t.Errorf("%s: %s has TTL %s, want about %s", step, key, ttl, time.Until(at))
			}
		}
	}

	used := time.UnixMilli(1754827200123)
	if err := s.RecordUsage(ctx, map[string]time.Time{k.ID: used}); err != nil {
		t.Fatal(err)
	}
	if got := rdb.HGet(ctx, s.usedHashKey(k.ID), k.ID).Val(); got != "1754827200123" {
		t.Errorf("%s[%s] = %q, want unix ms", s.usedHashKey(k.ID), k.ID, got)
	}
	if !strings.HasPrefix(s.usedHashKey(k.ID), "exp:lastused:") || len(s.usedHashKey(k.ID)) != len("exp:lastused:")+1 {
		t.Errorf("last-use hash %q, want exp:lastused:<hex digit>", s.usedHashKey(k.ID))
	}
	if n := rdb.Exists(ctx, "exp:used:"+k.ID).Val(); n != 0 {
		t.Error("RecordUsage wrote a per-key used key")
	}
	wantExpiry("created without an end", time.Time{})

	revokedAt := time.Now().Add(time.Minute).Truncate(time.Millisecond)
	if _, err := s.Revoke(ctx, k.ID, revokedAt); err != nil {
		t.Fatal(err)
	}
	wantExpiry("revoked", revokedAt.Add(retention))

	// An earlier expiry brings it forward.
	expires := revokedAt.Add(-30 * time.Second)
	if _, err := s.Update(ctx, k.ID, func(k *Key) error { k.ExpiresAt = &expires; return nil }); err != nil {
		t.Fatal(err)
	}
	wantExpiry("expiry before revocation", expires.Add(retention))

	// No end, no expiry.
	if _, err := s.Update(ctx, k.ID, func(k *Key) error { k.ExpiresAt, k.RevokedAt = nil, nil; return nil }); err != nil {
		t.Fatal(err)
	}
	wantExpiry("end removed", time.Time{})

	// A key created with an end expires from the start.
	e := newKey(t, "user-1", time.Now())
	mustCreate(t, s, e)
	keys = []string{"exp:id:" + e.ID, "exp:digest:" + e.Digest.String()}
	wantExpiry("created with an end", e.ExpiresAt.Add(retention))

	// RecordUsage of an unknown ID writes nothing.
	if err := s.RecordUsage(ctx, map[string]time.Time{"key_unknown": time.Now()}); err != nil {
		t.Fatal(err)
	}
	if rdb.HExists(ctx, s.usedHashKey("key_unknown"), "key_unknown").Val() {
		t.Error("RecordUsage wrote a last-use field for an unknown ID")
	}
}

// TestRedisLegacyUsedKey: a last-use time written by an earlier version (a
// per-key string with the key's expiry) is still read, the later of it and
// the bucket field wins, and Update still moves its expiry with the key's.
func TestRedisLegacyUsedKey(t *testing.T) {
	srv := testredis.Start(t)
	rdb := srv.Client(t)
	s := newRedisStore(t, srv, RedisOptions{Namespace: "legacy", Retention: time.Hour})
	ctx := ctxT(t)
	k := newKey(t, "user-1", time.Now())
	k.ExpiresAt = nil
	mustCreate(t, s, k)

	old := time.UnixMilli(1754827200123).UTC()
	if err := rdb.Set(ctx, "legacy:used:"+k.ID, old.UnixMilli(), 0).Err(); err != nil {
		t.Fatal(err)
	}
	if got := getKey(t, s, k.ID).LastUsedAt; !sameTimePtr(got, &old) {
		t.Errorf("Get: last used %v, want the legacy %v", got, old)
	}
	earlier := old.Add(-time.Hour)
	if err := s.RecordUsage(ctx, map[string]time.Time{k.ID: earlier}); err != nil {
		t.Fatal(err)
	}
	if got := getKey(t, s, k.ID).LastUsedAt; !sameTimePtr(got, &old) {
		t.Errorf("after an earlier RecordUsage: last used %v, want the legacy %v", got, old)
	}
	later := old.Add(time.Hour)
	if err := s.RecordUsage(ctx, map[string]time.Time{k.ID: later}); err != nil {
		t.Fatal(err)
	}
	keys, _, err := s.List(ctx, "user-1", "", 10)
	if err != nil || len(keys) != 1 || !sameTimePtr(keys[0].LastUsedAt, &later) {
		t.Fatalf("List: %v, %v; want last used %v", keys, err, later)
	}
	revoked, err := s.Revoke(ctx, k.ID, time.Now())
	if err != nil || !sameTimePtr(revoked.LastUsedAt, &later) {
		t.Fatalf("Revoke: %v, %v; want last used %v", revoked, err, later)
	}
	if ttl := rdb.PTTL(ctx, "legacy:used:"+k.ID).Val(); ttl <= 0 {
		t.Errorf("legacy used key has TTL %s after revocation, want the key's retention", ttl)
	}
}

// TestRedisRecordUsageCommands: recording the last use of 10,000 keys costs
// Redis a few commands per bucket, not a few per key, counted by the
// server itself (INFO commandstats counts the commands a script runs), on a
// server that has never seen the script (the first call loads it once per
// bucket, not once per key) and again once it has.
func TestRedisRecordUsageCommands(t *testing.T) {
	srv := testredis.Start(t)
	rdb := srv.Client(t)
	s := newRedisStore(t, srv, RedisOptions{Namespace: "flush"})
	ctx := ctxT(t)
	const n = 10_000
	ids := make([]string, n)
	for i := range ids {
		ids[i] = fmt.Sprintf("key_%05d", i)
	}
	// The id keys only (RecordUsage reads nothing else), written directly.
	for i := 0; i < n; i += 1000 {
		var pairs []any
		for _, id := range ids[i : i+1000] {
			pairs = append(pairs, "flush:id:"+id, "00")
		}
		if err := rdb.MSet(ctx, pairs...).Err(); err != nil {
			t.Fatal(err)
		}
	}
	if err := rdb.ScriptFlush(ctx).Err(); err != nil {
		t.Fatal(err)
	}
	commands := func() map[string]int64 {
		info := rdb.Info(ctx, "commandstats").Val()
		out := map[string]int64{}
		for _, line := range strings.Split(info, "\n") {
			name, rest, ok := strings.Cut(strings.TrimPrefix(strings.TrimSpace(line), "cmdstat_"), ":calls=")
			if !ok || name == "info" || name == "config|resetstat" {
				continue
			}
			var calls int64
			fmt.Sscan(strings.SplitN(rest, ",", 2)[0], &calls)
			out[name] = calls
			out[""] += calls
		}
		return out
	}
	// Bound: per usageChunk IDs one MGET, and per bucket chunk one
	// EVALSHA with its HMGET and HSET (plus an EVAL the first time).
	chunks := n/usageChunk + 1
	bound := int64(chunks + 4*(chunks+usageBuckets))
	for _, round := range []string{"fresh server", "script cached"} {
		at := time.Now().Truncate(time.Millisecond)
		used := make(map[string]time.Time, n)
		for _, id := range ids {
			used[id] = at
		}
		if err := rdb.ConfigResetStat(ctx).Err(); err != nil {
			t.Fatal(err)
		}
		if err := s.RecordUsage(ctx, used); err != nil {
			t.Fatal(err)
		}
		got := commands()
		t.Logf("%s: %d commands for %d keys: %v", round, got[""], n, got)
		if got[""] > bound {
			t.Errorf("%s: %d Redis commands to record %d keys' last use, want at most %d", round, got[""], n, bound)
		}
		if round == "script cached" && got["eval"] > 0 {
			t.Errorf("%s: %d EVALs; the script should be sent by SHA", round, got["eval"])
		}
		for _, id := range []string{ids[0], ids[n/2], ids[n-1]} {
			if v := rdb.HGet(ctx, s.usedHashKey(id), id).Val(); v != strconv.FormatInt(at.UnixMilli(), 10) {
				t.Errorf("%s: %s last used %q, want %d", round, id, v, at.UnixMilli())
			}
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// TestRedisConcurrentEndChanges races Updates that give a key an end with
// Updates that take it away: none may fail for contention, and the id and
// used keys must end up with the record's expiry, so that the key is never
// left findable by digest but not by ID. (TestRedisUpdateRepairsStaleExpiry
// forces the interleaving that needs syncExpiry's repair; here it is only
// likely.)
func TestRedisConcurrentEndChanges(t *testing.T) {
	srv := testredis.Start(t)
	rdb := srv.Client(t)
	s := newRedisStore(t, srv, RedisOptions{Namespace: "race"})
	ctx := ctxT(t)

	for round := range 5 {
		k := newKey(t, "user-1", time.Now())
		mustCreate(t, s, k)
		if err := s.RecordUsage(ctx, map[string]time.Time{k.ID: time.Now()}); err != nil {
			t.Fatal(err)
		}
		var wg sync.WaitGroup
		for i := range 8 {
			wg.Go(func() {
				for j := range 5 {
					_, err := s.Update(context.Background(), k.ID, func(k *Key) error {
						if (i+j)%2 == 0 {
							k.ExpiresAt = nil
						} else {
							at := time.Now().Add(time.Duration(i*5+j) * time.Minute)
							k.ExpiresAt = &at
						}
						return nil
					})
					if err != nil {
						t.Errorf("Update: %v", err)
					}
				}
			})
		}
		wg.Wait()

		recTTL := rdb.PTTL(ctx, "race:digest:"+k.Digest.String()).Val()
		for _, key := range []string{"race:id:" + k.ID} {
			ttl := rdb.PTTL(ctx, key).Val()
			if (ttl < 0) != (recTTL < 0) || (ttl-recTTL).Abs() > time.Second {
				t.Errorf("round %d: %s has TTL %s, its record %s", round, key, ttl, recTTL)
			}
		}
	}
}

// pauseExpiry is a go-redis hook that, once armed, holds the first pipeline
// that sets an expiry (PEXPIREAT) until released.
type pauseExpiry struct {
	mu      sync.Mutex
	armed   bool
	paused  chan struct{} // closed when a pipeline is held
	release chan struct{} // close to let it go on
}

func (h *pauseExpiry) DialHook(next redis.DialHook) redis.DialHook          { return next }
func (h *pauseExpiry) ProcessHook(next redis.ProcessHook) redis.ProcessHook { return next }

func (h *pauseExpiry) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		h.mu.Lock()
		hold := h.armed && slices.ContainsFunc(cmds, func(c redis.Cmder) bool { return c.Name() == "pexpireat" })
		if hold {
			h.armed = false
		}
		h.mu.Unlock()
		if hold {
			close(h.paused)
			<-h.release
		}
		return next(ctx, cmds)
	}
}

// TestRedisUpdateRepairsStaleExpiry makes the race that syncExpiry repairs
// happen: an Update that gives a key an end writes its record, then stalls
// before setting the id and used keys' expiry; meanwhile another Update
// removes the end again and completes. When the first one goes on, its
// stale expiry must not stick, or the key (which no longer ends) would lose
// its id key and become unlisted and unrevocable while it still validates.
func TestRedisUpdateRepairsStaleExpiry(t *testing.T) {
	srv := testredis.Start(t)
	rdb := srv.Client(t)
	hooked := redis.NewClient(&redis.Options{Addr: srv.Addr()})
	defer hooked.Close()
	hook := &pauseExpiry{paused: make(chan struct{}), release: make(chan struct{})}
	hooked.AddHook(hook)
	s := NewRedisFromClient(hooked, "stale")
	ctx := ctxT(t)

	k := newKey(t, "user-1", time.Now())
	k.ExpiresAt = nil
	mustCreate(t, s, k)
	if err := s.RecordUsage(ctx, map[string]time.Time{k.ID: time.Now()}); err != nil {
		t.Fatal(err)
	}

	hook.mu.Lock()
	hook.armed = true
	hook.mu.Unlock()
	done := make(chan error, 1)
	go func() {
		_, err := s.Update(ctx, k.ID, func(k *Key) error {
			at := time.Now()
			k.RevokedAt = &at
			return nil
		})
		done <- err
	}()
	<-hook.paused
	if _, err := s.Update(ctx, k.ID, func(k *Key) error { k.RevokedAt = nil; return nil }); err != nil {
		t.Fatal(err)
	}
	close(hook.release)
	if err := <-done; err != nil {
		t.Fatal(err)
	}

	got := getKey(t, s, k.ID)
	if got.RevokedAt != nil {
		t.Fatalf("the later Update was lost: revoked at %v", got.RevokedAt)
	}
	for _, key := range []string{"stale:id:" + k.ID, "stale:digest:" + k.Digest.String()} {
		if ttl := rdb.PTTL(ctx, key).Val(); ttl != -1 {
			t.Errorf("%s has TTL %s; the key has no end and must be kept", key, ttl)
		}
	}
}

// TestRedisInterruptedCreate simulates a crash after steps 1 and 2 of
// Create: the key must not validate, must not be listed, and a retry of the
// same Create must complete it.
func TestRedisInterruptedCreate(t *testing.T) {
	srv := testredis.Start(t)
	rdb := srv.Client(t)
	s := newRedisStore(t, srv, RedisOptions{Namespace: "crash"})
	ctx := ctxT(t)

	keys := createSeries(t, s, "user-1", 4)
	want := newestFirst(keys)

	// Interrupted creates, written by hand: newest of all, and one in the
	// middle of the series (so it sits on page boundaries).
	var orphans []*Key
	for _, created := range []time.Time{time.Now(), keys[1].CreatedAt.Add(200 * time.Microsecond)} {
		o := newKey(t, "user-1", created)
		orphans = append(orphans, o)
		if err := rdb.Set(ctx, "crash:id:"+o.ID, o.Digest.String(), 0).Err(); err != nil {
			t.Fatal(err)
		}
		if err := rdb.ZAdd(ctx, "crash:owner:"+ownerHash("user-1"), redis.Z{Member: indexMember(o)}).Err(); err != nil {
			t.Fatal(err)
		}
	}

	for _, o := range orphans {
		if _, err := s.ByDigest(ctx, o.Digest); !errors.Is(err, ErrNotFound) {
			t.Errorf("ByDigest(interrupted): got %v, want ErrNotFound", err)
		}
		if _, err := s.Get(ctx, o.ID); !errors.Is(err, ErrNotFound) {
			t.Errorf("Get(interrupted): got %v, want ErrNotFound", err)
		}
		if _, err := s.Revoke(ctx, o.ID, time.Now()); !errors.Is(err, ErrNotFound) {
			t.Errorf("Revoke(interrupted): got %v, want ErrNotFound", err)
		}
	}
	for limit := 1; limit <= len(want)+1; limit++ {
		if got := listAll(t, s, "user-1", limit); !slices.Equal(got, want) {
			t.Errorf("limit %d: listed %v, want %v", limit, got, want)
		}
	}

	// The retried Create completes the interrupted one.
	mustCreate(t, s, orphans[0])
	got, err := s.ByDigest(ctx, orphans[0].Digest)
	if err != nil {
		t.Fatal(err)
	}
	assertKey(t, orphans[0], got)
	page, _, err := s.List(ctx, "user-1", "", 1)
	if err != nil || len(page) != 1 || page[0].ID != orphans[0].ID {
		t.Errorf("completed key is not listed first: %v %v", ids(page), err)
	}
}

// assertUnavailable fails unless err is a plain failure: not nil, not a
// sentinel, and without the secret.
func assertUnavailable(t *testing.T, op string, err error) {
	t.Helper()
	if err == nil {
		t.Errorf("%s: succeeded on an unavailable store", op)
		return
	}
	if errors.Is(err, ErrNotFound) || errors.Is(err, ErrConflict) {
		t.Errorf("%s: got %v, a sentinel; want a store failure", op, err)
	}
	if !strings.HasPrefix(err.Error(), "keystore: ") {
		t.Errorf("%s: error %q lacks context", op, err)
	}
}

// exerciseUnavailable calls every Store method and checks each fails as
// unavailable within limit.
func exerciseUnavailable(t *testing.T, s Store, limit time.Duration) {
	t.Helper()
	k := newKey(t, "user-1", time.Now())
	ops := map[string]func(ctx context.Context) error{
		"Ping":   func(ctx context.Context) error { return s.Ping(ctx) },
		"Create": func(ctx context.Context) error { return s.Create(ctx, k) },
		"ByDigest": func(ctx context.Context) error {
			_, err := s.ByDigest(ctx, k.Digest)
			return err
		},
		"Get": func(ctx context.Context) error {
			_, err := s.Get(ctx, k.ID)
			return err
		},
		"List": func(ctx context.Context) error {
			_, _, err := s.List(ctx, "user-1", "", 10)
			return err
		},
		"Revoke": func(ctx context.Context) error {
			_, err := s.Revoke(ctx, k.ID, time.Now())
			return err
		},
		"Update": func(ctx context.Context) error {
			_, err := s.Update(ctx, k.ID, func(*Key) error { return nil })
			return err
		},
		"RecordUsage": func(ctx context.Context) error {
			return s.RecordUsage(ctx, map[string]time.Time{k.ID: time.Now()})
		},
		"CountOwner": func(ctx context.Context) error {
			_, err := s.CountOwner(ctx, "user-1")
			return err
		},
		"ReserveIdempotency": func(ctx context.Context) error {
			_, err := s.ReserveIdempotency(ctx, "i", newIdem("t"), time.Minute)
			return err
		},
		"GetIdempotency": func(ctx context.Context) error {
			_, err := s.GetIdempotency(ctx, "i")
			return err
		},
		"ReplaceIdempotency": func(ctx context.Context) error {
			return s.ReplaceIdempotency(ctx, "i", "t", newIdem("t"), time.Minute)
		},
		"DeleteIdempotency": func(ctx context.Context) error {
			return s.DeleteIdempotency(ctx, "i", "t")
		},
	}
	for name, op := range ops {
		start := time.Now()
		err := op(context.Background())
		if elapsed := time.Since(start); elapsed > limit {
			t.Errorf("%s took %s on an unavailable store, want <= %s", name, elapsed, limit)
		}
		assertUnavailable(t, name, err)
	}
}

// TestRedisStopped checks that a stopped server gives prompt, non-sentinel
// errors from every method, and that the store recovers when it is back.
func TestRedisStopped(t *testing.T) {
	srv := testredis.Start(t)
	s := newRedisStore(t, srv, RedisOptions{
		DialTimeout: 500 * time.Millisecond, ReadTimeout: 500 * time.Millisecond, WriteTimeout: 500 * time.Millisecond,
	})
	if err := s.Ping(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	srv.Stop()
	exerciseUnavailable(t, s, 2*time.Second)

	srv.Restart()
	deadline := time.Now().Add(5 * time.Second)
	for {
		err := s.Ping(ctxT(t))
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("store did not recover after restart: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	k := newKey(t, "user-1", time.Now())
	mustCreate(t, s, k)
	if _, err := s.ByDigest(ctxT(t), k.Digest); err != nil {
		t.Fatalf("ByDigest after restart: %v", err)
	}
}

// TestRedisNeverReachable checks a store whose server never existed.
func TestRedisNeverReachable(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close() // nothing listens here now

	s, err := NewRedis(RedisOptions{URLs: []string{"redis://" + addr}, DialTimeout: 500 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	exerciseUnavailable(t, s, 2*time.Second)
}

// TestRedisHungServer checks that a server that accepts connections but
// never answers fails within the configured read timeout (times the one
// retry), not forever.
func TestRedisHungServer(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var (
		mu    sync.Mutex
		conns []net.Conn
	)
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c) // hold it open, never reply
			mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		l.Close()
		mu.Lock()
		defer mu.Unlock()
		for _, c := range conns {
			c.Close()
		}
	})

	s, err := NewRedis(RedisOptions{
		URLs:        []string{"redis://" + l.Addr().String()},
		DialTimeout: 300 * time.Millisecond, ReadTimeout: 300 * time.Millisecond, WriteTimeout: 300 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()

	start := time.Now()
	err = s.Ping(context.Background())
	assertUnavailable(t, "Ping", err)
	if elapsed := time.Since(start); elapsed > 3*time.Second {
		t.Errorf("Ping on a hung server took %s", elapsed)
	}

	// A caller's deadline bounds a call too.
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	start = time.Now()
	_, err = s.ByDigest(ctx, newKey(t, "u", time.Now()).Digest)
	assertUnavailable(t, "ByDigest", err)
	if elapsed := time.Since(start); elapsed > time.Second {
		t.Errorf("ByDigest with a 100ms deadline took %s", elapsed)
	}
}

// TestRedisAuth checks that credentials in the URL are used, and that a
// wrong password neither works nor shows up in errors.
func TestRedisAuth(t *testing.T) {
	const password = "s3cret-pass-phrase"
	srv := testredis.Start(t, "--requirepass", password)

	good, err := NewRedis(RedisOptions{URLs: []string{"redis://:" + password + "@" + srv.Addr() + "/0"}})
	if err != nil {
		t.Fatal(err)
	}
	defer good.Close()
	if err := good.Ping(ctxT(t)); err != nil {
		t.Fatalf("Ping with the right password: %v", err)
	}
	mustCreate(t, good, newKey(t, "u", time.Now()))

	const wrong = "wrong-pass-phrase"
	bad, err := NewRedis(RedisOptions{URLs: []string{"redis://default:" + wrong + "@" + srv.Addr()}})
	if err != nil {
		t.Fatal(err)
	}
	defer bad.Close()
	err = bad.Ping(ctxT(t))
	assertUnavailable(t, "Ping with a wrong password", err)
	if err != nil && strings.Contains(err.Error(), wrong) {
		t.Errorf("error reveals the password: %v", err)
	}
}

func TestRedisCloseOwnership(t *testing.T) {
	srv := testredis.Start(t)
	rdb := srv.Client(t)

	borrowed := NewRedisFromClient(rdb, "")
	if borrowed.ns != DefaultRedisNamespace {
		t.Errorf("namespace %q, want default %q", borrowed.ns, DefaultRedisNamespace)
	}
	if err := borrowed.Close(); err != nil {
		t.Fatal(err)
	}
	if err := rdb.Ping(ctxT(t)).Err(); err != nil {
		t.Errorf("Close closed a borrowed client: %v", err)
	}

	owned := newRedisStore(t, srv, RedisOptions{})
	if err := owned.Close(); err != nil {
		t.Fatal(err)
	}
	assertUnavailable(t, "Ping after Close", owned.Ping(ctxT(t)))
}

func TestParseRedisOptions(t *testing.T) {
	t.Run("standalone", func(t *testing.T) {
		o, err := ParseRedisOptions(RedisOptions{URLs: []string{"redis://user:pw@cache.internal:6380/3?pool_size=7"}})
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(o.Addrs, []string{"cache.internal:6380"}) || o.Username != "user" || o.Password != "pw" ||
			o.DB != 3 || o.PoolSize != 7 || o.TLSConfig != nil || o.IsClusterMode {
			t.Errorf("got %+v", o)
		}
		if o.DialTimeout != 2*time.Second || o.ReadTimeout != time.Second || o.WriteTimeout != time.Second {
			t.Errorf("timeouts %s/%s/%s, want the defaults 2s/1s/1s", o.DialTimeout, o.ReadTimeout, o.WriteTimeout)
		}
		if o.MaxRetries != DefaultRedisMaxRetries || o.DialerRetries != 1 || !o.ContextTimeoutEnabled {
			t.Errorf("retries %d/%d, context timeouts %v", o.MaxRetries, o.DialerRetries, o.ContextTimeoutEnabled)
		}
		if _, ok := redis.NewUniversalClient(o).(*redis.Client); !ok {
			t.Error("one URL did not give a standalone client")
		}
	})
	t.Run("tls", func(t *testing.T) {
		o, err := ParseRedisOptions(RedisOptions{URLs: []string{"rediss://cache.example.com"}})
		if err != nil {
			t.Fatal(err)
		}
		if o.TLSConfig == nil || o.TLSConfig.ServerName != "cache.example.com" || o.Addrs[0] != "cache.example.com:6379" {
			t.Errorf("got %+v", o)
		}
	})
	t.Run("timeouts", func(t *testing.T) {
		o, err := ParseRedisOptions(RedisOptions{
			URLs:        []string{"redis://h?dial_timeout=5s&read_timeout=3s&max_retries=4"},
			ReadTimeout: 250 * time.Millisecond,
		})
		if err != nil {
			t.Fatal(err)
		}
		if o.DialTimeout != 5*time.Second || o.ReadTimeout != 250*time.Millisecond || o.WriteTimeout != time.Second || o.MaxRetries != 4 {
			t.Errorf("dial %s read %s write %s retries %d", o.DialTimeout, o.ReadTimeout, o.WriteTimeout, o.MaxRetries)
		}
	})
	t.Run("cluster", func(t *testing.T) {
		o, err := ParseRedisOptions(RedisOptions{URLs: []string{
			"rediss://u:pw@n1:7000?pool_size=9", "rediss://n2:7001", "rediss://u:pw@n3:7002/0",
		}})
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(o.Addrs, []string{"n1:7000", "n2:7001", "n3:7002"}) || !o.IsClusterMode ||
			o.Username != "u" || o.Password != "pw" || o.TLSConfig == nil || o.PoolSize != 9 {
			t.Errorf("got %+v", o)
		}
		c := redis.NewUniversalClient(o)
		defer c.Close()
		if _, ok := c.(*redis.ClusterClient); !ok {
			t.Errorf("several URLs gave a %T, want a cluster client", c)
		}
	})

	const secret = "hunter2-very-secret"
	for name, urls := range map[string][]string{
		"none":               nil,
		"bad scheme":         {"http://u:" + secret + "@h"},
		"unix":               {"unix:///tmp/redis.sock"},
		"unparsable":         {"redis://u:" + secret + "@h:port"},
		"unknown option":     {"redis://u:" + secret + "@h?bogus=1"},
		"bad db":             {"redis://u:" + secret + "@h/x"},
		"cluster db":         {"redis://h1/0", "redis://u:" + secret + "@h2/2"},
		"cluster mixed tls":  {"redis://h1", "rediss://h2"},
		"cluster creds":      {"redis://u:" + secret + "@h1", "redis://u:other@h2"},
		"unparsable escape":  {"redis://u:" + secret + "%zz@h"},
		"unparsable control": {"redis://u:" + secret + "\x7f@h"},
	} {
		t.Run("error "+name, func(t *testing.T) {
			_, err := ParseRedisOptions(RedisOptions{URLs: urls})
			if err == nil {
				t.Fatalf("%v accepted", urls)
			}
			if strings.Contains(err.Error(), secret) {
				t.Errorf("error reveals the password: %v", err)
			}
			if _, err := NewRedis(RedisOptions{URLs: urls}); err == nil {
				t.Error("NewRedis accepted it")
			}
		})
	}
}

// failNth is a go-redis hook that fails the n-th write command (SET or
// ZADD, counting from 0) it sees. If after is set the command still runs and only its reply is
// lost, as when a connection drops mid-request.
type failNth struct {
	mu    sync.Mutex
	n     int
	after bool
	seen  int
}

func (h *failNth) DialHook(next redis.DialHook) redis.DialHook { return next }

func (h *failNth) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return next
}

func (h *failNth) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		if name := cmd.Name(); name != "set" && name != "zadd" {
			return next(ctx, cmd) // connection setup (HELLO...) and reads
		}
		h.mu.Lock()
		fail := h.seen == h.n
		h.seen++
		h.mu.Unlock()
		if !fail {
			return next(ctx, cmd)
		}
		if h.after {
			_ = next(ctx, cmd)
		}
		err := errors.New("injected failure")
		cmd.SetErr(err)
		return err
	}
}

// TestRedisCreateInterruptedAtEachStep fails each of Create's three writes
// in turn, before or after it reaches Redis, and checks the durability
// contract: whatever validates is listed and revocable, and a retry
// completes the key.
func TestRedisCreateInterruptedAtEachStep(t *testing.T) {
	srv := testredis.Start(t)
	testCreateInterruptedAtEachStep(t, func() redis.UniversalClient {
		return redis.NewClient(&redis.Options{Addr: srv.Addr()})
	})
}

// testCreateInterruptedAtEachStep is TestRedisCreateInterruptedAtEachStep
// on clients from newClient (standalone or cluster).
func testCreateInterruptedAtEachStep(t *testing.T, newClient func() redis.UniversalClient) {
	for step := range 3 {
		for _, after := range []bool{false, true} {
			t.Run(fmt.Sprintf("step%d/after=%v", step+1, after), func(t *testing.T) {
				ctx := ctxT(t)
				rdb := newClient()
				defer rdb.Close()
				hook := &failNth{n: step, after: after}
				rdb.AddHook(hook)
				ns := fmt.Sprintf("step%d%v", step, after)
				s := NewRedisFromClient(rdb, ns)
				if err := s.Ping(ctx); err != nil {
					t.Fatal(err)
				}

				k := newKey(t, "user-1", time.Now())
				if err := s.Create(ctx, k); err == nil {
					t.Fatal("Create succeeded despite the injected failure")
				} else if errors.Is(err, ErrConflict) || errors.Is(err, ErrNotFound) {
					t.Fatalf("Create failed with a sentinel: %v", err)
				}
				hook.mu.Lock()
				hook.n = -1 // no more failures
				hook.mu.Unlock()

				found, err := s.ByDigest(ctx, k.Digest)
				switch {
				case errors.Is(err, ErrNotFound):
					if listed := listAll(t, s, "user-1", 10); len(listed) != 0 {
						t.Errorf("a key that does not validate is listed: %v", listed)
					}
				case err != nil:
					t.Fatal(err)
				default:
					// It validates (only possible when the last write landed):
					// then it must be listed and revocable.
					if step != 2 || !after {
						t.Errorf("key validates after a failure at step %d", step+1)
					}
					assertKey(t, k, found)
					if listed := listAll(t, s, "user-1", 10); !slices.Equal(listed, []string{k.ID}) {
						t.Errorf("validating key not listed: %v", listed)
					}
				}

				// The retried Create completes the key.
				mustCreate(t, s, k)
				got, err := s.ByDigest(ctx, k.Digest)
				if err != nil {
					t.Fatal(err)
				}
				assertKey(t, k, got)
				if listed := listAll(t, s, "user-1", 10); !slices.Equal(listed, []string{k.ID}) {
					t.Errorf("after retry listed %v", listed)
				}
				// Its place under the limit is confirmed, not pending.
				countLive(t, s, "user-1", time.Now().Add(2*livePending), 1)
				if _, err := s.Revoke(ctx, k.ID, time.Now()); err != nil {
					t.Errorf("Revoke after retry: %v", err)
				}
				countLive(t, s, "user-1", time.Now().Add(time.Millisecond), 0)
			})
		}
	}
}
