package keystore

// This file holds what the Redis and bbolt stores share for the live-key
// index: each owner's keys that still validate, ordered by when they stop
// validating (Key.End; never for a key without one). Create adds a key to it
// in the same atomic step that checks the owner's limit (CreateLimited);
// Update and Revoke move a key to its new end. A key whose end has passed
// stays in the index until it is pruned, and counting skips it, so expiry
// needs no write at the moment it happens.

import (
	"errors"
	"math"
	"strconv"
	"strings"
	"time"
)

// ErrLimitReached is returned by [Store.CreateLimited] when the key's owner
// already holds as many live keys as the limit allows. Nothing was stored.
var ErrLimitReached = errors.New("keystore: key limit reached")

// Outcome reports whether err is one of the answers a working store gives
// (nil, ErrNotFound, ErrConflict, ErrLimitReached) rather than a failure of
// the store itself. Metrics and health checks count only failures.
func Outcome(err error) bool {
	return err == nil || errors.Is(err, ErrNotFound) || errors.Is(err, ErrConflict) || errors.Is(err, ErrLimitReached)
}

// liveNever is the end of a key that never stops validating, in the
// fixed-width form of liveEnd: it sorts after every real end.
const liveNever = "9999999999999999"

// liveEndMillis returns k's end in unix milliseconds, clamped to what the
// index can hold, and false if k has no end.
func liveEndMillis(k *Key) (int64, bool) {
	end := k.End()
	if end == nil {
		return 0, false
	}
	return min(max(end.UnixMilli(), 0), maxIndexMillis-1), true
}

// liveEnd returns k's end as msDigits zero-padded unix milliseconds, or
// liveNever: the form the bbolt index sorts by.
func liveEnd(k *Key) string {
	ms, ok := liveEndMillis(k)
	if !ok {
		return liveNever
	}
	return padMillis(ms)
}

// padMillis formats ms (0 <= ms < maxIndexMillis) to msDigits digits.
func padMillis(ms int64) string {
	s := strconv.FormatInt(ms, 10)
	return strings.Repeat("0", msDigits-len(s)) + s
}

// liveScore returns k's end as a Redis sorted-set score: unix milliseconds,
// or "+inf".
func liveScore(k *Key) string {
	ms, ok := liveEndMillis(k)
	if !ok {
		return "+inf"
	}
	return strconv.FormatInt(ms, 10)
}

// liveScoreFloat is liveScore as a number.
func liveScoreFloat(k *Key) float64 {
	ms, ok := liveEndMillis(k)
	if !ok {
		return math.Inf(1)
	}
	return float64(ms)
}

// nowMillis returns now in unix milliseconds, clamped like liveEndMillis.
// A key is live at now when its end is after it.
func nowMillis(now time.Time) int64 {
	return min(max(now.UnixMilli(), 0), maxIndexMillis-1)
}

// checkCreate validates the arguments of CreateLimited and returns the
// stored form of k.
func checkCreate(k *Key, limit int) ([]byte, error) {
	if err := validateKey(k); err != nil {
		return nil, err
	}
	if limit < 0 || limit > math.MaxInt32 {
		return nil, errors.New("keystore: key limit must be between 0 (none) and 2^31-1")
	}
	return encodeKey(k)
}
