package apikeys

import (
	"context"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/caddy-apikeys/caddy-apikeys/internal/testredis"
	"github.com/caddy-apikeys/caddy-apikeys/keystore"
)

// These tests run the guard's cache against a real Caddy and redis-server;
// the cache itself is tested in package keystore.

// redisCalls returns how often Redis ran cmd (INFO commandstats).
func redisCalls(t testing.TB, rdb *redis.Client, cmd string) int {
	t.Helper()
	ctx, cancel := testCtx()
	defer cancel()
	info, err := rdb.Info(ctx, "commandstats").Result()
	if err != nil {
		t.Fatal(err)
	}
	prefix := "cmdstat_" + cmd + ":calls="
	for _, line := range strings.Split(info, "\n") {
		if rest, ok := strings.CutPrefix(line, prefix); ok {
			n, _ := strconv.Atoi(strings.SplitN(rest, ",", 2)[0])
			return n
		}
	}
	return 0
}

// rawStore opens the gateway's Redis data without a cache: writes through
// it publish no invalidation, as if made by hand.
func (g *gateway) rawStore() keystore.Store {
	g.t.Helper()
	s, err := keystore.NewRedis(keystore.RedisOptions{URLs: []string{g.redis.URL()}})
	if err != nil {
		g.t.Fatal(err)
	}
	g.t.Cleanup(func() { _ = s.Close() })
	return s
}

// rawKey stores a key behind the cache's back and returns it and its ID.
func (g *gateway) rawKey(s keystore.Store) (raw, id string) {
	g.t.Helper()
	raw = storeKeyDirectly(g.t, s, "carol", time.Now().Add(time.Hour))
	d, _ := keystore.NewHasher([]byte(testSecret))
	ctx, cancel := testCtx()
	defer cancel()
	k, err := s.ByDigest(ctx, d.Digest(raw))
	if err != nil {
		g.t.Fatal(err)
	}
	return raw, k.ID
}

// waitSubscribed waits until the gateway's cache has subscribed to
// invalidations (subscribing flushes the cache; tests that count reads
// start after that).
func (g *gateway) waitSubscribed() {
	g.t.Helper()
	waitCacheSubscribed(g.t, g.redis)
}

func waitCacheSubscribed(t *testing.T, srv *testredis.Server) {
	t.Helper()
	rdb := srv.Client(t)
	deadline := time.Now().Add(5 * time.Second)
	for rdb.PubSubNumSub(context.Background(), "apikeys:invalidate").Val()["apikeys:invalidate"] < 1 {
		if time.Now().After(deadline) {
			t.Fatal("the cache did not subscribe to apikeys:invalidate")
		}
		time.Sleep(10 * time.Millisecond)
	}
	time.Sleep(50 * time.Millisecond) // for the flush that follows the confirmation
}

func (g *gateway) status(bearer string) int {
	g.t.Helper()
	return g.do(request{method: "GET", path: "/v1/anything", bearer: bearer}).status
}

// TestGuardMintedKeyCached: a key minted through this gateway validates
// without a store read.
func TestGuardMintedKeyCached(t *testing.T) {
	g := startGateway(t, "redis", "")
	g.waitSubscribed()
	rdb := g.redis.Client(t)
	k := g.create("alice", `{"name":"cached"}`)
	gets := redisCalls(t, rdb, "get")
	for range 10 {
		if s := g.status(k.Key); s != 200 {
			t.Fatalf("status %d", s)
		}
	}
	if n := redisCalls(t, rdb, "get") - gets; n != 0 {
		t.Errorf("10 requests with a key this gateway minted made %d GETs, want 0", n)
	}
}

// TestGuardNegativeCache floods the guard with well-formed keys that were
// never minted: one store read per distinct key.
func TestGuardNegativeCache(t *testing.T) {
	g := startGateway(t, "redis", "")
	g.waitSubscribed()
	rdb := g.redis.Client(t)
	const fakes, each = 5, 20
	var keys []string
	for range fakes {
		k, err := keystore.Mint("wbk_")
		if err != nil {
			t.Fatal(err)
		}
		keys = append(keys, k)
	}
	gets := redisCalls(t, rdb, "get")
	var wg sync.WaitGroup
	statuses := make([]int, fakes*each)
	for i := range statuses {
		wg.Go(func() { statuses[i] = g.status(keys[i%fakes]) })
	}
	wg.Wait()
	for i, s := range statuses {
		if s != 401 {
			t.Fatalf("request %d: status %d, want 401", i, s)
		}
	}
	if n := redisCalls(t, rdb, "get") - gets; n > fakes {
		t.Errorf("%d requests with %d fake keys made %d GETs, want at most %d", fakes*each, fakes, n, fakes)
	}
}

// TestGuardDedup holds Redis still while 30 requests with one uncached key
// arrive: they share one GET.
func TestGuardDedup(t *testing.T) {
	g := startGateway(t, "redis", "")
	g.waitSubscribed()
	rdb := g.redis.Client(t)
	raw, _ := g.rawKey(g.rawStore())
	gets := redisCalls(t, rdb, "get")
	if err := rdb.Do(context.Background(), "CLIENT", "PAUSE", "300", "ALL").Err(); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	statuses := make([]int, 30)
	for i := range statuses {
		wg.Go(func() { statuses[i] = g.status(raw) })
	}
	wg.Wait()
	for i, s := range statuses {
		if s != 200 {
			t.Fatalf("request %d: status %d", i, s)
		}
	}
	if n := redisCalls(t, rdb, "get") - gets; n != 1 {
		t.Errorf("30 concurrent requests with one uncached key made %d GETs, want 1", n)
	}
}

// TestGuardStaleWhileRevalidate pauses Redis while a hot key's record is
// older than refresh: requests keep passing without waiting, and the
// record is confirmed (or re-read) in the background once Redis answers.
func TestGuardStaleWhileRevalidate(t *testing.T) {
	g := startGateway(t, "redis", "cache {\n ttl 5s\n refresh 200ms\n}")
	g.waitSubscribed()
	rdb := g.redis.Client(t)
	k := g.create("alice", `{"name":"hot"}`)
	g.status(k.Key)
	time.Sleep(300 * time.Millisecond) // older than refresh
	// A background refresh reads the records version (GET) and re-reads
	// the record (MGET) if it moved.
	reads := func() int { return redisCalls(t, rdb, "get") + redisCalls(t, rdb, "mget") }
	before := reads()
	if err := rdb.Do(context.Background(), "CLIENT", "PAUSE", "1500", "ALL").Err(); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	for time.Since(start) < time.Second {
		t0 := time.Now()
		if s := g.status(k.Key); s != 200 {
			t.Fatalf("status %d while Redis is paused", s)
		}
		if d := time.Since(t0); d > 100*time.Millisecond {
			t.Errorf("a request took %v while Redis was paused: it waited for the store", d)
		}
		time.Sleep(20 * time.Millisecond)
	}
	deadline := time.Now().Add(5 * time.Second)
	for reads() == before {
		if time.Now().After(deadline) {
			t.Fatal("the record was not confirmed or re-read in the background after the pause")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestGuardRevokeInvalidates: a revocation through the gateway's store is
// refused on the very next request.
func TestGuardRevokeInvalidates(t *testing.T) {
	for _, kind := range storeKinds {
		t.Run(kind, func(t *testing.T) {
			g := startGateway(t, kind, "")
			k := g.create("alice", `{"name":"r"}`)
			if s := g.status(k.Key); s != 200 {
				t.Fatalf("before revoke: %d", s)
			}
			ctx, cancel := testCtx()
			defer cancel()
			if _, err := g.store.Revoke(ctx, k.KeyID, time.Now()); err != nil {
				t.Fatal(err)
			}
			if s := g.status(k.Key); s != 401 {
				t.Errorf("right after revoke: %d, want 401", s)
			}
		})
	}
}

// TestGuardFlushOnResubscribe revokes a key behind the cache's back, then
// breaks the gateway's subscription: on resubscribing it flushes the cache
// (messages may have been lost), so the revocation is seen.
func TestGuardFlushOnResubscribe(t *testing.T) {
	g := startGateway(t, "redis", "")
	g.waitSubscribed()
	rdb := g.redis.Client(t)
	raw := g.rawStore()
	key, id := g.rawKey(raw)
	if s := g.status(key); s != 200 {
		t.Fatalf("before: %d", s)
	}
	ctx, cancel := testCtx()
	defer cancel()
	if _, err := raw.Revoke(ctx, id, time.Now()); err != nil {
		t.Fatal(err)
	}
	if s := g.status(key); s != 200 {
		t.Fatalf("the cache saw an unannounced revocation (%d): the test proves nothing", s)
	}
	if err := rdb.Do(ctx, "CLIENT", "KILL", "TYPE", "pubsub").Err(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(3 * time.Second)
	for g.status(key) != 401 {
		if time.Now().After(deadline) {
			t.Fatal("still accepted 3s after the subscription was replaced")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestGuardOutageWindow stops Redis: a key validated recently keeps
// working past ttl (unless outage_window is 0), an unknown key gets 503
// within 100ms, and everything recovers when Redis is back.
func TestGuardOutageWindow(t *testing.T) {
	for _, tc := range []struct {
		name, extra string
		during      int
	}{
		{"default window", "cache {\n ttl 1s\n refresh 500ms\n}", 200},
		{"window 0", "cache {\n ttl 1s\n refresh 500ms\n outage_window 0\n}", 503},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g := startGateway(t, "redis", tc.extra)
			g.waitSubscribed()
			k := g.create("alice", `{"name":"known"}`)
			if s := g.status(k.Key); s != 200 {
				t.Fatalf("before: %d", s)
			}
			g.redis.Stop()
			time.Sleep(1200 * time.Millisecond) // past ttl
			for i := range 3 {
				unknown, _ := keystore.Mint("wbk_")
				start := time.Now()
				resp := g.do(request{method: "GET", path: "/v1/anything", bearer: unknown})
				if resp.status != 503 || resp.errCode() != "store_unavailable" || resp.header.Get("Retry-After") == "" {
					t.Errorf("unknown key %d during outage: %d %s", i, resp.status, resp.body)
				}
				// The first read finds Redis gone (connection refused); later
				// ones do not even try.
				if d := time.Since(start); d > 100*time.Millisecond {
					t.Errorf("unknown key %d: 503 after %v, want within 100ms", i, d)
				}
			}
			if s := g.status(k.Key); s != tc.during {
				t.Errorf("recently validated key during outage: %d, want %d", s, tc.during)
			}

			g.redis.Restart() // appendonly: the key survives
			deadline := time.Now().Add(5 * time.Second)
			for {
				unknown, _ := keystore.Mint("wbk_")
				if g.status(k.Key) == 200 && g.status(unknown) == 401 {
					break
				}
				if time.Now().After(deadline) {
					t.Fatal("no recovery within 5s of Redis coming back")
				}
				time.Sleep(50 * time.Millisecond)
			}
		})
	}
}

// TestGuardCacheOff: with `cache off` every request reads the store.
func TestGuardCacheOff(t *testing.T) {
	g := startGateway(t, "redis", "cache off")
	rdb := g.redis.Client(t)
	k := g.create("alice", `{"name":"uncached"}`)
	gets := redisCalls(t, rdb, "get")
	for range 5 {
		if s := g.status(k.Key); s != 200 {
			t.Fatalf("status %d", s)
		}
	}
	if n := redisCalls(t, rdb, "get") - gets; n != 5 {
		t.Errorf("5 requests with the cache off made %d GETs, want 5", n)
	}
}
