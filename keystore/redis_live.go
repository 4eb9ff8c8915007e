package keystore

// This file holds the Redis store's live-key index (see live.go):
//
//	<ns>:live:{<sha256 owner>}        zset    key IDs scored by their end (unix ms, +inf: never)
//	<ns>:live:{<sha256 owner>}:ready  string  "1" once the index holds every live key of the owner
//
// The two keys share a hash tag, so on a cluster they live in one slot and
// one script can use both. CreateLimited reserves the key's place with
// reserveLiveScript (prune the members that ended, compare the count with
// the limit, add) before it writes anything else, so that the count and the
// insert are one atomic step. Update moves a key's member to its new end
// (ZADD) along with the expiry of its id key (see syncExpiry). CountLive
// counts the members whose end is after now.
//
// The record lives in another slot than the index, so a Create cannot
// publish it and confirm its place in one step. The reservation is
// therefore pending at first: its score is at most livePending after now,
// so a Create that fails after reserving (a timeout, a crash) holds its
// place only that long, however the failure looks from here. Once the
// record is written, Create confirms the place with the key's real end.
// A retry of the Create confirms it again.
//
// An owner whose index is not ready yet (keys written by an older version)
// has it built once from List, then marked ready; until it is, the scripts
// answer -1 and the caller builds it.

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/redis/go-redis/v9"
)

func (s *RedisStore) liveKey(owner string) string { return s.ns + ":live:{" + ownerHash(owner) + "}" }
func (s *RedisStore) liveReadyKey(owner string) string {
	return s.liveKey(owner) + ":ready"
}

// reserveLiveScript reserves the place of key ARGV[1] (score ARGV[2]) in the
// live index KEYS[1] unless the members live at ARGV[3] (unix ms) number
// ARGV[4] or more (0: no limit). It returns 2 when it reserved the place,
// 1 when the key had it already (a retry), 0 when the limit is reached, and
// -1 when the index is not ready (KEYS[2] missing).
var reserveLiveScript = redis.NewScript(`
if redis.call('EXISTS', KEYS[2]) == 0 then return -1 end
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 1 end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[3])
local limit = tonumber(ARGV[4])
if limit > 0 and redis.call('ZCARD', KEYS[1]) >= limit then return 0 end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
return 2
`)

// countLiveScript counts the members of the live index KEYS[1] whose end is
// after ARGV[1] (unix ms), or answers -1 if the index is not ready.
var countLiveScript = redis.NewScript(`
if redis.call('EXISTS', KEYS[2]) == 0 then return -1 end
return redis.call('ZCOUNT', KEYS[1], '(' .. ARGV[1], '+inf')
`)

// initLiveScript fills the live index KEYS[1] with the pairs (score,
// member) in ARGV, leaving members that are there already as they are, and
// marks it ready (KEYS[2]), unless it is ready already.
var initLiveScript = redis.NewScript(`
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
for i = 1, #ARGV, 2 do
	redis.call('ZADD', KEYS[1], 'NX', ARGV[i], ARGV[i + 1])
end
redis.call('SET', KEYS[2], '1')
return 1
`)

// livePending bounds how long the reservation of a Create that never
// finished holds a place under the owner's limit.
const livePending = time.Minute

// pendingScore returns the score of k's reservation made at now: its end,
// but at most livePending after now.
func pendingScore(k *Key, now time.Time) string {
	pending := nowMillis(now.Add(livePending))
	if ms, ok := liveEndMillis(k); ok && ms < pending {
		pending = ms
	}
	return strconv.FormatInt(pending, 10)
}

// confirmLive gives k's member in the live index its real end, once k's
// record is stored. It retries once with a fresh deadline, as ctx may be
// spent by then.
func (s *RedisStore) confirmLive(ctx context.Context, k *Key) error {
	key := s.liveKey(k.Owner)
	zadd := func(ctx context.Context) error {
		return s.write(ctx, key, func(p redis.Cmdable) redis.Cmder {
			return p.ZAdd(ctx, key, redis.Z{Score: liveScoreFloat(k), Member: k.ID})
		})
	}
	if zadd(ctx) == nil {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), s.readTimeoutOrDefault())
	defer cancel()
	if err := zadd(ctx); err != nil {
		return fmt.Errorf("keystore: redis create key (confirm live index): %w", err)
	}
	return nil
}

// initLive builds owner's live index from its listed keys, once.
func (s *RedisStore) initLive(ctx context.Context, owner string, now time.Time) error {
	var args []any
	cursor := ""
	for {
		keys, next, err := s.List(ctx, owner, cursor, MaxListLimit)
		if err != nil {
			return err
		}
		for _, k := range keys {
			if k.Active(now) {
				args = append(args, liveScore(k), k.ID)
			}
		}
		if next == "" {
			break
		}
		cursor = next
	}
	keys := []string{s.liveKey(owner), s.liveReadyKey(owner)}
	return s.write(ctx, keys[0], func(p redis.Cmdable) redis.Cmder {
		return initLiveScript.Eval(ctx, p, keys, args...)
	})
}

// liveScript runs a live-index script that answers -1 while owner's index
// is not ready, building the index and running it again in that case.
// write says whether it writes (then it runs through s.write, so that
// WaitReplicas applies).
func (s *RedisStore) liveScript(ctx context.Context, script *redis.Script, owner string, now time.Time, write bool, args ...any) (int64, error) {
	keys := []string{s.liveKey(owner), s.liveReadyKey(owner)}
	for attempt := 0; ; attempt++ {
		var (
			n   int64
			err error
		)
		if write {
			var cmd *redis.Cmd
			err = s.write(ctx, keys[0], func(p redis.Cmdable) redis.Cmder {
				cmd = script.Eval(ctx, p, keys, args...)
				return cmd
			})
			if err == nil {
				n, err = cmd.Int64()
			}
		} else {
			n, err = script.Run(ctx, s.c, keys, args...).Int64()
		}
		if err != nil {
			return 0, err
		}
		if n != -1 {
			return n, nil
		}
		if attempt > 0 {
			return 0, errors.New("live key index is not ready after building it")
		}
		if err := s.initLive(ctx, owner, now); err != nil {
			return 0, fmt.Errorf("build live key index: %w", err)
		}
	}
}

// CountLive implements [Store.CountLive] with ZCOUNT on the owner's live
// index.
func (s *RedisStore) CountLive(ctx context.Context, owner string, now time.Time) (int, error) {
	n, err := s.liveScript(ctx, countLiveScript, owner, now, false, nowMillis(now))
	if err != nil {
		return 0, fmt.Errorf("keystore: redis count live keys: %w", err)
	}
	return int(n), nil
}

// reserveLive reserves k's place in its owner's live index, or answers
// ErrLimitReached. added says whether this call made the reservation
// (rather than finding one).
func (s *RedisStore) reserveLive(ctx context.Context, k *Key, limit int, now time.Time) (added bool, err error) {
	n, err := s.liveScript(ctx, reserveLiveScript, k.Owner, now, true, k.ID, pendingScore(k, now), nowMillis(now), limit)
	switch {
	case err != nil:
		return false, fmt.Errorf("keystore: redis create key (live index): %w", err)
	case n == 0:
		return false, ErrLimitReached
	}
	return n == 2, nil
}

// releaseLive gives up k's reserved place after its Create was refused for
// certain (not when a write may or may not have landed: then the pending
// place lapses by itself). Best effort, with a fresh deadline: ctx may be
// spent.
func (s *RedisStore) releaseLive(ctx context.Context, k *Key) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), s.readTimeoutOrDefault())
	defer cancel()
	_ = s.c.ZRem(ctx, s.liveKey(k.Owner), k.ID).Err()
}

func (s *RedisStore) readTimeoutOrDefault() time.Duration {
	if s.readTimeout > 0 {
		return s.readTimeout
	}
	return DefaultRedisReadTimeout
}
