package ratelimit

import (
	"context"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/caddy-apikeys/caddy-apikeys/internal/testredis"
)

// TestRedisACL runs the shared limiter as a Redis user allowed only the
// commands SECURITY.md's ACL grants that the limiter uses (EVALSHA and
// EVAL, the script's HMGET, HSET and PEXPIRE, and HGET for Usage and
// History) on its namespace: leasing, syncing, Usage, History and Close
// all work, and no call falls back to local limiting for want of a
// permission.
func TestRedisACL(t *testing.T) {
	srv := testredis.Start(t)
	admin := srv.Client(t)
	if err := admin.Do(context.Background(), "ACL", "SETUSER", "limiter", "on", ">acl-test-password",
		"resetkeys", "~apikeys:*", "resetchannels", "-@all",
		"+hello", "+ping", "+eval", "+evalsha", "+hmget", "+hset", "+pexpire", "+hget").Err(); err != nil {
		t.Fatal(err)
	}
	client := redis.NewClient(&redis.Options{Addr: srv.Addr(), Username: "limiter", Password: "acl-test-password",
		ContextTimeoutEnabled: true})
	t.Cleanup(func() { _ = client.Close() })
	c := newClock(date("2026-03-10T12:00:00Z"))
	be := NewRedisBackend(client, "apikeys")
	l := newLimiter(t, be, c)
	p := &Policy{Name: "p", Limit: 10, Window: time.Minute, Quota: 15, Period: Day}
	admitted := 0
	for range 12 {
		if l.Allow("s", p).Result == Allowed {
			admitted++
		}
	}
	if admitted != 10 || l.Degraded() {
		t.Fatalf("admitted %d of a burst of 10 (degraded %v)", admitted, l.Degraded())
	}
	c.Add(time.Minute)
	for range 12 {
		l.Allow("s", p)
	}
	for range histEvery {
		if err := l.Sync(false); err != nil {
			t.Fatalf("sync as the ACL user: %v", err)
		}
	}
	u, err := l.Usage(context.Background(), "s", p)
	if err != nil || u.Used < 15 {
		t.Fatalf("Usage as the ACL user: %+v, %v", u, err)
	}
	h, err := l.History(context.Background(), "s", 2)
	if err != nil || h[1].Accepted != 15 || h[1].QuotaExceeded == 0 {
		t.Fatalf("History as the ACL user: %+v, %v", h, err)
	}
	if err := l.Close(); err != nil || l.Degraded() {
		t.Fatalf("Close: %v (degraded %v)", err, l.Degraded())
	}
	// The user reaches nothing outside the namespace.
	if err := client.HGet(context.Background(), "other:x", "f").Err(); err == nil || err == redis.Nil {
		t.Fatalf("a key outside the namespace was readable: %v", err)
	}
}
