package keystore

// This file holds the Redis store's last-use times: RecordUsage and the
// reads that fill in Key.LastUsedAt.
//
// A busy gateway records the last use of every key in use once a minute
// (see the caller's last_used_interval), so with 10,000 keys in use this is
// the store's largest stream of writes. One command per key (or a script
// per key, whose inner commands Redis counts too) would cost more Redis
// work than every key validation together. So the times are kept in 16
// hashes, <ns>:lastused:<b>, field = key ID, and RecordUsage writes each
// bucket with one script call per usageChunk keys (an HMGET and an HSET
// inside), after one read of the id keys that drops unknown IDs: a flush of
// 10,000 keys is about 50 commands, not 60,000.
//
// A hash field has no expiry of its own (Redis 7.0), so the field of a key
// that retention deleted stays behind until List walks past the key's
// owner-index member and removes both. It is never read: Get and List find
// no key to attach it to.
//
// Times written before the buckets, one string key per ID (<ns>:used:<id>,
// with the key's retention expiry), are still read, and the later of the
// two is reported; they are never written again.

import (
	"context"
	"errors"
	"fmt"
	"hash/crc32"
	"strconv"
	"time"

	"github.com/redis/go-redis/v9"
)

// usageBuckets is the number of last-use hashes. 16 spreads the writes of
// a flush over the nodes of a cluster and keeps each hash small enough to
// be written in a few script calls.
const usageBuckets = 16

// usageChunk is how many IDs one script call writes; it bounds how long the
// script holds Redis (about 0.2 ms) and stays far below Lua's stack limit
// for unpack.
const usageChunk = 500

// usedHashKey returns the last-use hash of key id.
func (s *RedisStore) usedHashKey(id string) string {
	const hexDigits = "0123456789abcdef"
	b := crc32.ChecksumIEEE([]byte(id)) % usageBuckets
	return s.ns + ":lastused:" + hexDigits[b:b+1]
}

// recordUsageScript keeps, in the hash KEYS[1], the later of the stored and
// the given last-use time of each ID: ARGV is id1, ms1, id2, ms2, ... It is
// two commands inside Redis (HMGET, HSET) whatever the number of IDs, and
// returns how many fields it wrote.
var recordUsageScript = redis.NewScript(`
local n = #ARGV / 2
local ids = {}
for i = 1, n do ids[i] = ARGV[2 * i - 1] end
local cur = redis.call('HMGET', KEYS[1], unpack(ids))
local set = {}
for i = 1, n do
	local have = tonumber(cur[i])
	local want = ARGV[2 * i]
	if not have or have < tonumber(want) then
		set[#set + 1] = ids[i]
		set[#set + 1] = want
	end
end
if #set > 0 then redis.call('HSET', KEYS[1], unpack(set)) end
return #set / 2
`)

// RecordUsage implements [Store.RecordUsage]: it drops IDs that name no key
// (one MGET of their id keys per usageChunk IDs; on a cluster, one pipeline
// of GETs), then writes each bucket's times with recordUsageScript, keeping
// the later of the stored and the given time. The script is sent by SHA;
// a server that does not have it yet gets it once per call (EVAL), not once
// per key.
func (s *RedisStore) RecordUsage(ctx context.Context, used map[string]time.Time) error {
	ids := make([]string, 0, len(used))
	for id, t := range used {
		if id != "" && !t.IsZero() && t.UnixMilli() > 0 {
			ids = append(ids, id)
		}
	}
	if len(ids) == 0 {
		return nil
	}
	known, err := s.knownIDs(ctx, ids)
	if err != nil {
		return fmt.Errorf("keystore: redis record usage (ids): %w", err)
	}
	buckets := make(map[string][]any)
	for _, id := range known {
		key := s.usedHashKey(id)
		buckets[key] = append(buckets[key], id, used[id].UnixMilli())
	}
	type call struct {
		key  string
		args []any
	}
	var calls []call
	for key, args := range buckets {
		for len(args) > 0 {
			n := min(len(args), 2*usageChunk)
			calls = append(calls, call{key, args[:n]})
			args = args[n:]
		}
	}

	pending := calls
	for _, useSha := range []bool{true, false} {
		if len(pending) == 0 {
			return nil
		}
		cmds := make([]*redis.Cmd, len(pending))
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("keystore: redis record usage: %w", err)
		}
		_, _ = s.c.Pipelined(ctx, func(p redis.Pipeliner) error {
			for i, c := range pending {
				if useSha {
					cmds[i] = recordUsageScript.EvalSha(ctx, p, []string{c.key}, c.args...)
				} else {
					cmds[i] = recordUsageScript.Eval(ctx, p, []string{c.key}, c.args...)
				}
			}
			return nil
		})
		var retry []call
		for i, cmd := range cmds {
			err := cmd.Err()
			switch {
			case err == nil:
			case useSha && redis.HasErrorPrefix(err, "NOSCRIPT"):
				retry = append(retry, pending[i])
			default:
				return fmt.Errorf("keystore: redis record usage: %w", err)
			}
		}
		pending = retry
	}
	return nil
}

// knownIDs returns those of ids whose id key exists.
func (s *RedisStore) knownIDs(ctx context.Context, ids []string) ([]string, error) {
	out := ids[:0:0]
	if _, cluster := s.c.(*redis.ClusterClient); cluster {
		// MGET needs every key in one hash slot; a pipeline sends each GET
		// to its node.
		cmds := make([]*redis.StringCmd, len(ids))
		_, _ = s.c.Pipelined(ctx, func(p redis.Pipeliner) error {
			for i, id := range ids {
				cmds[i] = p.Get(ctx, s.idKey(id))
			}
			return nil
		})
		for i, cmd := range cmds {
			switch err := cmd.Err(); {
			case err == nil:
				out = append(out, ids[i])
			case !errors.Is(err, redis.Nil):
				return nil, err
			}
		}
		return out, nil
	}
	for len(ids) > 0 {
		chunk := ids[:min(len(ids), usageChunk)]
		ids = ids[len(chunk):]
		names := make([]string, len(chunk))
		for i, id := range chunk {
			names[i] = s.idKey(id)
		}
		vals, err := s.c.MGet(ctx, names...).Result()
		if err != nil {
			return nil, err
		}
		for i, v := range vals {
			if v != nil {
				out = append(out, chunk[i])
			}
		}
	}
	return out, nil
}

// usedCmds are the queued reads of one key's last-use time: the bucket
// field and the string key written before the buckets.
type usedCmds struct{ field, legacy *redis.StringCmd }

// queueUsed queues on p the reads of key id's last-use time.
func (s *RedisStore) queueUsed(ctx context.Context, p redis.Pipeliner, id string) usedCmds {
	return usedCmds{field: p.HGet(ctx, s.usedHashKey(id), id), legacy: p.Get(ctx, s.usedKey(id))}
}

// time returns the later of the times the reads found, or nil.
func (u usedCmds) time() (*time.Time, error) {
	a, err := parseUsed(u.field)
	if err != nil {
		return nil, err
	}
	b, err := parseUsed(u.legacy)
	if err != nil {
		return nil, err
	}
	if a == nil || b != nil && b.After(*a) {
		return b, nil
	}
	return a, nil
}

// queueForgetUsed queues on p the removal of the last-use fields of ids
// (keys deleted by retention).
func (s *RedisStore) queueForgetUsed(ctx context.Context, p redis.Pipeliner, ids []string) {
	byKey := make(map[string][]string)
	for _, id := range ids {
		key := s.usedHashKey(id)
		byKey[key] = append(byKey[key], id)
	}
	for key, fields := range byKey {
		p.HDel(ctx, key, fields...)
	}
}

// parseUsed returns the time a GET of a used key (or an HGET of its field)
// read: nil if there is none (or it is not a number, which only a foreign
// write could cause).
func parseUsed(cmd *redis.StringCmd) (*time.Time, error) {
	v, err := cmd.Result()
	if errors.Is(err, redis.Nil) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	ms, err := strconv.ParseInt(v, 10, 64)
	if err != nil || ms <= 0 {
		return nil, nil
	}
	t := time.UnixMilli(ms).UTC()
	return &t, nil
}
