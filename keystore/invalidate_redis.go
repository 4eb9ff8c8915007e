package keystore

// This file carries cache invalidations between the Caddy instances that
// share a Redis, over Redis pub/sub.
//
// The channel is <ns>:invalidate. A message is one of
//
//	u:<hex digest>   the key's record changed (revoked, updated): drop it
//	c:<hex digest>   the key was just created: drop a cached "unknown"
//	*                drop everything (for operators, e.g. after editing
//	                 records by hand: PUBLISH apikeys:invalidate '*')
//
// Pub/sub delivers a message only to the subscribers connected when it is
// published. The subscriber therefore tells its cache to flush every time it
// (re)subscribes, and pings an idle connection every few seconds so that a
// dead one is noticed and replaced instead of silently missing messages.

import (
	"context"
	"errors"
	"net"
	"time"

	"github.com/redis/go-redis/v9"
)

// Default of the RedisInvalidator's health check.
const (
	// DefaultInvalidationPing is how long the subscription may be idle
	// before it is pinged; with no answer for as long again it is replaced.
	DefaultInvalidationPing = 2 * time.Second
)

// RedisInvalidator is an [Invalidator] on Redis pub/sub (standalone or
// Cluster, where PUBLISH reaches every node). Create it with
// [NewRedisInvalidator].
type RedisInvalidator struct {
	c       redis.UniversalClient
	channel string
	ping    time.Duration
}

var _ Invalidator = (*RedisInvalidator)(nil)

// NewRedisInvalidator returns an Invalidator on the client and namespace of
// s; its channel is "<namespace>:invalidate".
func NewRedisInvalidator(s *RedisStore) *RedisInvalidator {
	return &RedisInvalidator{c: s.c, channel: s.ns + ":invalidate", ping: DefaultInvalidationPing}
}

// Channel returns the pub/sub channel name.
func (r *RedisInvalidator) Channel() string { return r.channel }

// Publish implements [Invalidator.Publish].
func (r *RedisInvalidator) Publish(ctx context.Context, inv Invalidation) error {
	msg := "u:" + inv.Digest.String()
	if inv.Created {
		msg = "c:" + inv.Digest.String()
	}
	return r.c.Publish(ctx, r.channel, msg).Err()
}

// Subscribe implements [Invalidator.Subscribe]. It keeps one subscription
// open until ctx ends, replacing it when it breaks.
func (r *RedisInvalidator) Subscribe(ctx context.Context, apply func(Invalidation), reset func()) {
	backoff := 50 * time.Millisecond
	for ctx.Err() == nil {
		ps := r.c.Subscribe(ctx, r.channel)
		// Closing ps ends a receive that is waiting for a message.
		stop := context.AfterFunc(ctx, func() { _ = ps.Close() })
		if r.receive(ctx, ps, apply, reset) {
			backoff = 50 * time.Millisecond
		}
		stop()
		_ = ps.Close()
		select {
		case <-ctx.Done():
			return
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, time.Second)
	}
}

// receive reads from ps until ctx ends or the connection is found dead.
// It reports whether anything was received.
func (r *RedisInvalidator) receive(ctx context.Context, ps *redis.PubSub, apply func(Invalidation), reset func()) (received bool) {
	pinged := false
	failures := 0
	for {
		msg, err := ps.ReceiveTimeout(ctx, r.ping)
		if ctx.Err() != nil {
			return received
		}
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				// Idle: ping; if the last ping went unanswered, the
				// connection is dead (no RST came), so start over.
				if pinged || ps.Ping(ctx) != nil {
					return received
				}
				pinged = true
				continue
			}
			// go-redis reconnects and resubscribes on the next receive;
			// do not spin while Redis is down.
			failures++
			select {
			case <-ctx.Done():
				return received
			case <-time.After(min(time.Duration(failures)*50*time.Millisecond, time.Second)):
			}
			continue
		}
		received, pinged, failures = true, false, 0
		switch m := msg.(type) {
		case *redis.Subscription:
			if m.Kind == "subscribe" && m.Channel == r.channel {
				reset()
			}
		case *redis.Message:
			if m.Payload == "*" {
				reset()
			} else if inv, ok := parseInvalidation(m.Payload); ok {
				apply(inv)
			}
		}
	}
}

// parseInvalidation decodes "u:<hex>" or "c:<hex>".
func parseInvalidation(s string) (Invalidation, bool) {
	if len(s) < 2 || s[1] != ':' || (s[0] != 'u' && s[0] != 'c') {
		return Invalidation{}, false
	}
	d, err := ParseDigest(s[2:])
	if err != nil {
		return Invalidation{}, false
	}
	return Invalidation{Digest: d, Created: s[0] == 'c'}, true
}
