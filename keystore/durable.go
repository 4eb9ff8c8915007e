package keystore

// This file holds the replica acknowledgement of Create's writes
// ([RedisOptions.WaitReplicas]).

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/redis/go-redis/v9"
)

// DefaultRedisWaitTimeout bounds how long a write waits for replica
// acknowledgements when [RedisOptions.WaitReplicas] is set.
const DefaultRedisWaitTimeout = time.Second

// write runs one single-key write command built by cmd. With waitReplicas
// set it runs it followed by WAIT on the same connection to the primary
// that owns key, and fails unless enough replicas acknowledged it.
func (s *RedisStore) write(ctx context.Context, key string, cmd func(p redis.Cmdable) redis.Cmder) error {
	if s.waitReplicas <= 0 {
		return cmd(s.c).Err()
	}
	var c redis.Cmdable = s.c
	if cc, ok := s.c.(*redis.ClusterClient); ok {
		// WAIT counts the replicas of the connection's own primary, so it
		// must follow the write on that node's connection.
		node, err := cc.MasterForKey(ctx, key)
		if err != nil {
			return err
		}
		c = node
	}
	// Leave time for the reply before the read deadline: the caller's
	// deadline or the client's read timeout.
	timeout := min(s.waitTimeout, s.readTimeout*3/4)
	if dl, ok := ctx.Deadline(); ok {
		timeout = min(timeout, time.Until(dl)*3/4)
	}
	var (
		write redis.Cmder
		wait  *redis.Cmd
	)
	_, err := c.Pipelined(ctx, func(p redis.Pipeliner) error {
		write = cmd(p)
		wait = p.Do(ctx, "WAIT", s.waitReplicas, max(timeout.Milliseconds(), 1))
		return nil
	})
	if err := write.Err(); err != nil {
		return err
	}
	if err != nil {
		return err
	}
	if n, _ := wait.Int(); n < s.waitReplicas {
		return fmt.Errorf("keystore: redis: %d of %d replicas acknowledged the write within %s", n, s.waitReplicas, timeout)
	}
	return nil
}

// setNX sets key to value if it does not exist, expiring at expireAt (unix
// ms; 0 means never), through write, and reports whether it did.
func (s *RedisStore) setNX(ctx context.Context, key string, value any, expireAt int64) (bool, error) {
	err := s.write(ctx, key, func(p redis.Cmdable) redis.Cmder {
		return p.SetArgs(ctx, key, value, expireArgs("NX", expireAt))
	})
	if errors.Is(err, redis.Nil) {
		return false, nil
	}
	return err == nil, err
}
