package keystore

// This file lets a CachedStore re-read many records from Redis in one round
// trip (see bulkReader in cache.go).

import (
	"context"
	"errors"
	"fmt"

	"github.com/redis/go-redis/v9"
)

// ByDigests returns the records of ds, in order, with nil for a digest that
// has no record. On a standalone server it is one MGET; on a cluster, where
// MGET needs every key in one hash slot, it is one pipeline of GETs (sent
// to each node in one batch).
func (s *RedisStore) ByDigests(ctx context.Context, ds []Digest) ([]*Key, error) {
	out := make([]*Key, len(ds))
	if len(ds) == 0 {
		return out, nil
	}
	names := make([]string, len(ds))
	for i, d := range ds {
		names[i] = s.digestKey(d.String())
	}
	vals := make([]string, len(ds))
	found := make([]bool, len(ds))
	if _, cluster := s.c.(*redis.ClusterClient); cluster {
		cmds := make([]*redis.StringCmd, len(names))
		_, err := s.c.Pipelined(ctx, func(p redis.Pipeliner) error {
			for i, name := range names {
				cmds[i] = p.Get(ctx, name)
			}
			return nil
		})
		if err != nil && !errors.Is(err, redis.Nil) {
			return nil, fmt.Errorf("keystore: redis get keys: %w", err)
		}
		for i, cmd := range cmds {
			v, err := cmd.Result()
			switch {
			case errors.Is(err, redis.Nil):
			case err != nil:
				return nil, fmt.Errorf("keystore: redis get keys: %w", err)
			default:
				vals[i], found[i] = v, true
			}
		}
	} else {
		res, err := s.c.MGet(ctx, names...).Result()
		if err != nil {
			return nil, fmt.Errorf("keystore: redis get keys: %w", err)
		}
		for i, v := range res {
			if str, ok := v.(string); ok {
				vals[i], found[i] = str, true
			}
		}
	}
	for i := range ds {
		if !found[i] {
			continue
		}
		k, err := decodeKey([]byte(vals[i]))
		if err != nil {
			return nil, err
		}
		if !k.Digest.Equal(ds[i]) {
			return nil, errors.New("keystore: stored key record does not match its digest")
		}
		out[i] = k
	}
	return out, nil
}
