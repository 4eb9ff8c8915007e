package apikeys

import (
	"context"
	"fmt"
	"net/http"
	"slices"
	"testing"
	"time"

	"github.com/caddy-apikeys/caddy-apikeys/internal/testcaddy"
)

// startPeer runs a second Caddy, as a child process, in front of the same
// Redis as g, with the same secret and extra apikeys subdirectives, and
// returns its base URL.
func startPeer(t *testing.T, g *gateway, extra string) string {
	t.Helper()
	port := testcaddy.FreePort(t)
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	cfg := fmt.Sprintf(`{
	admin off
	persist_config off
	auto_https off
}

http://%s {
	apikeys {
		store redis %s
		secret {env.APIKEYS_TEST_SECRET}
		%s
	}
	respond "peer" 200
}
`, addr, g.redis.URL(), extra)
	testcaddy.Start(t, cfg, []string{addr}, "APIKEYS_TEST_SECRET="+testSecret)
	return "http://" + addr
}

// waitSubscribers waits until n caches listen on the invalidation channel.
func waitSubscribers(t *testing.T, g *gateway, n int64) {
	t.Helper()
	rdb := g.redis.Client(t)
	deadline := time.Now().Add(10 * time.Second)
	for rdb.PubSubNumSub(context.Background(), "apikeys:invalidate").Val()["apikeys:invalidate"] < n {
		if time.Now().After(deadline) {
			t.Fatalf("fewer than %d subscribers to apikeys:invalidate", n)
		}
		time.Sleep(10 * time.Millisecond)
	}
	time.Sleep(100 * time.Millisecond) // for the flushes that follow the confirmations
}

// peerStatus sends a guarded request with key to a peer.
func peerStatus(t *testing.T, client *http.Client, base, key string) int {
	t.Helper()
	req, err := http.NewRequest("GET", base+"/v1/anything", nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+key)
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	return resp.StatusCode
}

// measureReach runs trials: mint a key through g, make peer cache it,
// revoke it through g's store (the cached store the handler uses, which
// publishes the invalidation), and time how long until peer refuses it,
// giving up after limit (the trial then counts as limit). It stops early
// once more than maxSlow trials took longer than a second.
func measureReach(t *testing.T, g *gateway, peer string, trials int, limit time.Duration, maxSlow int) []time.Duration {
	t.Helper()
	client := &http.Client{Timeout: 5 * time.Second}
	var reach []time.Duration
	slow := 0
	for i := 0; i < trials && slow <= maxSlow; i++ {
		k := g.create("reach", fmt.Sprintf(`{"name":"reach %d"}`, i))
		for range 2 { // the second request finds it cached
			if s := peerStatus(t, client, peer, k.Key); s != 200 {
				t.Fatalf("trial %d: the peer refused a fresh key: %d", i, s)
			}
		}
		ctx, cancel := testCtx()
		start := time.Now()
		if _, err := g.store.Revoke(ctx, k.KeyID, time.Now()); err != nil {
			t.Fatal(err)
		}
		cancel()
		for {
			if peerStatus(t, client, peer, k.Key) == 401 {
				reach = append(reach, time.Since(start))
				break
			}
			if time.Since(start) >= limit {
				reach = append(reach, limit)
				break
			}
			time.Sleep(time.Millisecond)
		}
		if reach[len(reach)-1] > time.Second {
			slow++
		}
	}
	slices.Sort(reach)
	return reach
}

// percentile returns the nearest-rank p-th percentile of sorted durations.
func percentile(sorted []time.Duration, p int) time.Duration {
	i := (p*len(sorted)+99)/100 - 1
	return sorted[max(i, 0)]
}

// TestRevocationReach: with two Caddy instances sharing one Redis, a key
// revoked through one is refused by the other within 1s at p99 over 100
// trials. The control runs the same trials against a peer with pub/sub
// off, and must not meet the bound: that shows the test depends on the
// invalidation messages, not on luck or the TTL.
func TestRevocationReach(t *testing.T) {
	g := startGateway(t, "redis", "")
	t.Run("pubsub", func(t *testing.T) {
		peer := startPeer(t, g, "")
		waitSubscribers(t, g, 2)
		// p99 of 100 is the 99th fastest: one trial may be slow.
		reach := measureReach(t, g, peer, 100, 2*time.Second, 1)
		if len(reach) < 100 {
			t.Fatalf("stopped after %d trials: two took over 1s (sorted: %v), so p99 over 100 cannot be within 1s", len(reach), reach)
		}
		p50, p99 := percentile(reach, 50), percentile(reach, 99)
		t.Logf("revocation reach over %d trials: p50 %v, p99 %v, max %v", len(reach), p50, p99, reach[len(reach)-1])
		if p99 > time.Second {
			t.Errorf("p99 reach %v, want at most 1s", p99)
		}
	})
	t.Run("control without pubsub", func(t *testing.T) {
		peer := startPeer(t, g, "cache {\n\t\t\tpubsub off\n\t\t}")
		reach := measureReach(t, g, peer, 3, 1200*time.Millisecond, 3)
		t.Logf("without pub/sub: %v", reach)
		if p99 := percentile(reach, 99); p99 <= time.Second {
			t.Errorf("without pub/sub the peer refused the revoked key within %v: the bound is not measuring invalidation", p99)
		}
	})
}
