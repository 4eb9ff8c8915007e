package keystore

// This file lets a CachedStore re-read many records from Redis in one round
// trip (see rawBulkReader in cache.go).

import (
	"context"
	"errors"
	"fmt"

	"github.com/redis/go-redis/v9"
)

// ByDigests returns the records of ds, in order, with nil for a digest that
// has no record (see [RedisStore.RawByDigests]).
func (s *RedisStore) ByDigests(ctx context.Context, ds []Digest) ([]*Key, error) {
	raws, err := s.RawByDigests(ctx, ds)
	if err != nil {
		return nil, err
	}
	out := make([]*Key, len(ds))
	for i, raw := range raws {
		if raw == "" {
			continue
		}
		if out[i], err = s.DecodeRecord(ds[i], raw); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// RawByDigest returns the stored record of d, undecoded (one GET), or
// ErrNotFound.
func (s *RedisStore) RawByDigest(ctx context.Context, d Digest) (string, error) {
	raw, err := s.c.Get(ctx, s.digestKey(d.String())).Result()
	if errors.Is(err, redis.Nil) {
		return "", ErrNotFound
	}
	if err != nil {
		return "", fmt.Errorf("keystore: redis get key: %w", err)
	}
	return raw, nil
}

// RawByDigests returns the stored records of ds, undecoded, in order, with
// "" for a digest that has no record. On a standalone server it is one
// MGET; on a cluster, where MGET needs every key in one hash slot, it is one
// pipeline of GETs (sent to each node in one batch). A caller that already
// holds a record can compare the raw forms and skip decoding an unchanged
// one.
func (s *RedisStore) RawByDigests(ctx context.Context, ds []Digest) ([]string, error) {
	out := make([]string, len(ds))
	if len(ds) == 0 {
		return out, nil
	}
	names := make([]string, len(ds))
	for i, d := range ds {
		names[i] = s.digestKey(d.String())
	}
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
				out[i] = v
			}
		}
		return out, nil
	}
	res, err := s.c.MGet(ctx, names...).Result()
	if err != nil {
		return nil, fmt.Errorf("keystore: redis get keys: %w", err)
	}
	for i, v := range res {
		if str, ok := v.(string); ok {
			out[i] = str
		}
	}
	return out, nil
}

// DecodeRecord decodes a record returned by RawByDigests for digest d.
func (s *RedisStore) DecodeRecord(d Digest, raw string) (*Key, error) {
	k, err := decodeKey([]byte(raw))
	if err != nil {
		return nil, err
	}
	if !k.Digest.Equal(d) {
		return nil, errors.New("keystore: stored key record does not match its digest")
	}
	return k, nil
}
