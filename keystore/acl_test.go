package keystore

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/caddy-apikeys/caddy-apikeys/internal/testredis"
)

// aclRules is the Redis ACL that SECURITY.md recommends for the gateway's
// user, namespace "apikeys". Keep the two in step.
var aclRules = strings.Fields(`on >acl-test-password resetkeys ~apikeys:* resetchannels &apikeys:* -@all
	+hello +ping +get +set +del +zadd +zrange
	+eval +evalsha +watch +unwatch +multi +exec +wait
	+zrem +zcard +pexpireat +pexpire +persist
	+exists +zscore +zremrangebyscore +zcount +incr
	+mget +hget +hmget +hset +hdel
	+publish +subscribe +unsubscribe`)

// aclClusterRules are added on a Redis Cluster.
var aclClusterRules = []string{"+cluster|slots", "+command"}

// TestRedisClusterACLConformance runs the Store contract on a cluster as a
// user restricted by aclRules and aclClusterRules.
func TestRedisClusterACLConformance(t *testing.T) {
	c := testredis.StartCluster(t)
	args := []any{"ACL", "SETUSER", "apikeys"}
	for _, r := range append(aclRules, aclClusterRules...) {
		args = append(args, r)
	}
	var urls []string
	for _, n := range c.Nodes {
		if err := n.Client(t).Do(ctxT(t), args...).Err(); err != nil {
			t.Fatalf("ACL SETUSER: %v", err)
		}
		urls = append(urls, "redis://apikeys:acl-test-password@"+n.Addr())
	}
	runConformance(t, backend{newStore: func(t *testing.T) Store {
		return newRedisStoreURLs(t, urls, RedisOptions{
			Namespace: fmt.Sprintf("apikeys:t%d", redisNamespaces.Add(1)),
		})
	}})
}

// TestRedisACLConformance runs the whole Store contract as a Redis user
// restricted by aclRules: the documented ACL is enough, and the store
// touches nothing outside its namespace.
func TestRedisACLConformance(t *testing.T) {
	srv := testredis.Start(t)
	args := []any{"ACL", "SETUSER", "apikeys"}
	for _, r := range aclRules {
		args = append(args, r)
	}
	if err := srv.Client(t).Do(ctxT(t), args...).Err(); err != nil {
		t.Fatalf("ACL SETUSER: %v", err)
	}
	url := "redis://apikeys:acl-test-password@" + srv.Addr() + "/0"
	runConformance(t, backend{newStore: func(t *testing.T) Store {
		return newRedisStoreURLs(t, []string{url}, RedisOptions{
			Namespace: fmt.Sprintf("apikeys:t%d", redisNamespaces.Add(1)),
		})
	}})
	// The cache's pub/sub works as this user: a revocation through one
	// cached store reaches another at once.
	t.Run("invalidation", func(t *testing.T) {
		ns := fmt.Sprintf("apikeys:t%d", redisNamespaces.Add(1))
		cached := func() *CachedStore {
			inner := newRedisStoreURLs(t, []string{url}, RedisOptions{Namespace: ns})
			c, err := NewCachedStore(inner, CacheOptions{Invalidator: NewRedisInvalidator(inner), TTL: time.Minute, Refresh: 30 * time.Second})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = c.Close() })
			return c
		}
		a, b := cached(), cached()
		k := newKey(t, "alice", time.Now())
		if err := a.Create(ctxT(t), k); err != nil {
			t.Fatal(err)
		}
		time.Sleep(200 * time.Millisecond) // let both subscriptions settle
		if got, err := b.ByDigest(ctxT(t), k.Digest); err != nil || !got.Active(time.Now()) {
			t.Fatalf("b does not see the key: %v", err)
		}
		if _, err := a.Revoke(ctxT(t), k.ID, time.Now()); err != nil {
			t.Fatal(err)
		}
		deadline := time.Now().Add(2 * time.Second)
		for {
			got, err := b.ByDigest(ctxT(t), k.Digest)
			if err == nil && !got.Active(time.Now()) {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("b still serves the revoked key after 2s (TTL is 1m): the invalidation did not arrive (%v)", err)
			}
			time.Sleep(20 * time.Millisecond)
		}
	})
	t.Run("outside the namespace", func(t *testing.T) {
		s := newRedisStoreURLs(t, []string{url}, RedisOptions{Namespace: "other"})
		if err := s.Create(ctxT(t), newKey(t, "alice", time.Now())); err == nil || !strings.Contains(err.Error(), "NOPERM") {
			t.Errorf("Create outside the allowed keys: %v, want NOPERM", err)
		}
	})
	if testing.Verbose() {
		t.Logf("ACL: %s", strings.Join(aclRules, " "))
	}
}
