package keystore

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/caddy-apikeys/caddy-apikeys/internal/testredis"
)

// newRedisStoreURLs returns a RedisStore on urls in a fresh namespace.
func newRedisStoreURLs(t *testing.T, urls []string, opts RedisOptions) *RedisStore {
	t.Helper()
	opts.URLs = urls
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

// TestRedisClusterKeysSpanNodes checks that the cluster tests exercise what
// they claim: the records of one key live on different primaries, so
// Create's single-key writes really cross nodes.
func TestRedisClusterKeysSpanNodes(t *testing.T) {
	c := testredis.StartCluster(t)
	// Seeding with one node is enough: the client discovers the others.
	s := newRedisStoreURLs(t, c.URLs()[:1], RedisOptions{})
	if _, ok := s.c.(*redis.ClusterClient); ok {
		t.Fatal("one URL gave a cluster client")
	}
	s = newRedisStoreURLs(t, []string{c.URLs()[2], c.URLs()[0]}, RedisOptions{Namespace: "span"})
	cc := s.c.(*redis.ClusterClient)
	ctx := ctxT(t)
	crossing := 0
	for range 10 {
		k := newKey(t, "alice", time.Now())
		mustCreate(t, s, k)
		nodes := map[string]bool{}
		for _, key := range []string{s.idKey(k.ID), s.digestKey(k.Digest.String()), s.ownerKey(k.Owner)} {
			m, err := cc.MasterForKey(ctx, key)
			if err != nil {
				t.Fatal(err)
			}
			nodes[m.Options().Addr] = true
		}
		if len(nodes) > 1 {
			crossing++
		}
	}
	if crossing == 0 {
		t.Fatal("no key had its records on different nodes; the cluster tests prove nothing about cross-slot writes")
	}
	if got := listAll(t, s, "alice", 3); len(got) != 10 {
		t.Errorf("listed %d keys, want 10", len(got))
	}
}

// TestRedisClusterCreateInterruptedAtEachStep fails each of Create's writes
// in turn on a cluster client: invariant 1 (what validates is listed and
// revocable) holds, and a retry completes the key.
func TestRedisClusterCreateInterruptedAtEachStep(t *testing.T) {
	c := testredis.StartCluster(t)
	testCreateInterruptedAtEachStep(t, func() redis.UniversalClient {
		return redis.NewClusterClient(&redis.ClusterOptions{Addrs: c.Addrs()})
	})
}

// TestRedisClusterNodeKilledDuringCreates kills one primary of a persistent
// cluster (SIGKILL) while four writers create keys, then restarts it. Every
// Create that returned nil is found, and every key that validates (whatever
// its Create returned) is listed under its owner and can be revoked.
func TestRedisClusterNodeKilledDuringCreates(t *testing.T) {
	c := testredis.StartCluster(t, "--appendonly", "yes", "--appendfsync", "always")
	s := newRedisStoreURLs(t, c.URLs(), RedisOptions{
		DialTimeout: 300 * time.Millisecond, ReadTimeout: 300 * time.Millisecond, WriteTimeout: 300 * time.Millisecond,
	})
	const owner = "crash-owner"
	var (
		mu        sync.Mutex
		attempted []*Key
		acked     = map[string]bool{}
		failed    int
		wg        sync.WaitGroup
	)
	stop := make(chan struct{})
	for range 4 {
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				k := newKey(t, owner, time.Now())
				ctx, cancel := context.WithTimeout(context.Background(), time.Second)
				err := s.Create(ctx, k)
				cancel()
				mu.Lock()
				attempted = append(attempted, k)
				if err == nil {
					acked[k.ID] = true
				} else {
					failed++
				}
				mu.Unlock()
				if err != nil {
					time.Sleep(20 * time.Millisecond)
				}
			}
		})
	}
	time.Sleep(300 * time.Millisecond)
	victim := c.Nodes[1]
	victim.Stop()
	time.Sleep(1500 * time.Millisecond)
	victim.Restart()
	c.WaitHealthy(20 * time.Second)
	time.Sleep(300 * time.Millisecond) // some creates after recovery
	close(stop)
	wg.Wait()

	deadline := time.Now().Add(10 * time.Second)
	for s.Ping(ctxT(t)) != nil {
		if time.Now().After(deadline) {
			t.Fatal("cluster store did not recover")
		}
		time.Sleep(50 * time.Millisecond)
	}
	// The client may still route by a stale slot map for a moment.
	var listed []string
	for {
		var err error
		listed, err = listAllErr(s, owner)
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("List after recovery: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if failed == 0 || len(acked) == 0 {
		t.Fatalf("%d creates failed, %d succeeded: the outage did not hit the stream", failed, len(acked))
	}
	ctx := ctxT(t)
	validating := 0
	for _, k := range attempted {
		_, err := s.ByDigest(ctx, k.Digest)
		switch {
		case errors.Is(err, ErrNotFound):
			if acked[k.ID] {
				t.Errorf("key %s: Create returned nil but the key is gone", k.ID)
			}
			continue
		case err != nil:
			t.Fatalf("ByDigest: %v", err)
		}
		validating++
		if !slices.Contains(listed, k.ID) {
			t.Errorf("key %s validates but is not listed (acked %v)", k.ID, acked[k.ID])
		}
		if _, err := s.Revoke(ctx, k.ID, time.Now()); err != nil {
			t.Errorf("key %s validates but cannot be revoked: %v", k.ID, err)
		}
	}
	if len(listed) != validating {
		t.Errorf("%d keys listed, %d validate: a listed key must validate until revoked", len(listed), validating)
	}
	t.Logf("%d creates: %d acknowledged, %d failed during the outage; %d keys validate, all listed and revoked",
		len(attempted), len(acked), failed, validating)
}

// listAllErr is listAll returning errors instead of failing the test.
func listAllErr(s Store, owner string) ([]string, error) {
	var out []string
	cursor := ""
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		keys, next, err := s.List(ctx, owner, cursor, 100)
		cancel()
		if err != nil {
			return nil, err
		}
		out = append(out, ids(keys)...)
		if next == "" {
			return out, nil
		}
		cursor = next
	}
}
