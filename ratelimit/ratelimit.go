// Package ratelimit meters API keys: a rate limit per key and a quota of
// accepted requests per UTC day or calendar month, with daily counts of
// accepted and refused requests kept for 90 days (HistoryDays).
//
// # Rate limit: GCRA
//
// The rate limit is GCRA, the generic cell rate algorithm (ITU-T I.371),
// with emission interval T = ceil(Window/Limit) and a capacity of Limit
// requests: a fresh key is admitted exactly Limit requests at once, then
// one per T. The worst case for any half-open interval of one Window is
// 2×Limit−1 admitted requests (a full burst at its start, then one per T),
// and over any longer span at most Limit plus one per T. T is rounded up
// to the nanosecond, so the steady rate never exceeds Limit per Window.
//
// # Quota
//
// A quota counts accepted requests per UTC day or calendar month (UTC);
// a request refused by the rate limit is not counted, and one refused by
// the quota uses no rate. Counts of a period end with it. A subject keeps
// one count per period kind: a request is counted in the period of the
// policy it is decided under, so a policy that changes between a daily
// and a monthly quota, to another number, or to no quota and back, finds
// its period's count where it was (a lower quota refuses at once).
// Decision carries what the RateLimit and RateLimit-Policy fields need.
//
// # One instance (the file store, NewBoltBackend)
//
// The Limiter decides in memory, exactly, and writes the quota and daily
// counts to the bbolt file of the keys in one transaction per
// SyncInterval (default 1s). A crash loses at most the counts of the last
// interval (those requests are then not counted against the quota); Close
// writes everything. Rate limit buckets are not persisted: after a
// restart every key starts with a full burst.
//
// # Instances sharing Redis (NewRedisBackend)
//
// Redis keeps each key's GCRA state (its theoretical arrival time, TAT)
// and the quota counter; instances lease tokens from them with a Lua
// script and spend them in memory, so a request costs no round trip at
// steady state. Leasing n tokens is GCRA's admission of n requests at
// once, and a quota lease adds n to the counter only while it stays at or
// below the quota: leasing alone never over-admits, and the quota never
// overshoots across instances (except after an outage, below).
//
// Batching is what makes it cheap. Every SyncInterval each instance sends,
// in one script call per 500 keys (per hash-tagged group on a cluster),
// for each key it saw: the tokens it holds (all returned) and the tokens
// it wants for the next interval (twice the last interval's demand, at
// most Limit/5 and Quota/20), plus its daily counts every 10 syncs. A key
// not seen keeps its tokens until they would lapse, then returns them all
// but one, which it renews (granted afresh, so the bound below holds)
// until the key has been unseen for 2 minutes; then it returns that one
// too and forgets the key. So a key that pauses for longer than a lease
// and comes back finds a token (measured: 10,000 keys in rounds of 13 s
// of use and 13 s of rest, 0.019 commands per request; 1.30 before a
// token was kept). A request that finds no token leases synchronously (bounded by
// Options.Timeout), asking for twice the previous lease, so a burst of
// Limit takes about log2(Limit/5)+Limit/(Limit/5) calls; when Redis says
// the bucket is empty the instance refuses locally until it holds a few
// tokens again and not before the next sync, so a key hammered far above
// its limit makes no call of its own. Measured: 10,000 keys round-robin
// at 6,000 req/s, limit 100/min and a quota: 0.011 Redis commands per
// request with one instance, 0.012 with three (INFO commandstats, which
// counts the commands scripts run).
//
// The bound: over-admission comes only from the time between a token's
// grant and its spending, since the shared bucket refills meanwhile. A
// lease lapses H = Window/10 after it is granted (the sync loop runs at
// least every H, at least every 50ms, and renews held tokens by returning
// and leasing them again), so a token admitted at t was granted after t−H
// and N instances admit at most Limit×(1+H/Window) + N = Limit×1.1 + N in
// a window at steady state (N: rounding, one token per instance); the
// worst case for any window is 2×Limit−1 + Limit/10 + N. Each instance
// also keeps its own exact GCRA with the full limit, so one instance alone
// never exceeds the single-instance bounds. Measured with three instances
// hammering one key at 100/min on standalone Redis and on a Cluster: 100
// admitted in every window after the first (bound 113), at most 198 in
// any window including the first burst (bound 212). Instances use their
// own clocks for the shared state: a clock skew of d between instances
// adds up to d/T admissions.
//
// Near the end of a quota, tokens leased by one instance and not yet
// spent make another refuse a request early, for at most one sync
// interval (they are returned at the next sync). Usage reports the shared
// counter minus the instance's own unspent tokens, so it includes other
// instances' unspent tokens.
//
// Durability: counts are in Redis as soon as leased. A crash (no Close)
// counts the quota tokens leased and not spent as used (at most twice the
// last interval's demand per key, or Quota/20) and loses the daily counts
// of up to 10 sync intervals; Close returns every token and sends every
// count.
//
// # Outage
//
// When a Redis call fails or times out (Options.Timeout, default 250ms),
// the Limiter is Degraded: each instance decides alone, with its own GCRA
// and the full limit (so N instances admit up to N×Limit), and counts
// quotas locally from the last shared count it knew, so the quota may
// overshoot by what the other instances admit meanwhile. The sync loop
// keeps trying every interval; the first sync that succeeds adds the
// local counts to the shared counters (unconditionally: an overshoot is
// recorded, not lost) and leasing resumes. No request waits longer than
// Timeout for Redis; Options.Logger gets one warning when the outage
// starts and one message when it ends.
//
// Redis keys and the commands they need are listed in redis.go.
//
// The package has no Caddy imports; the caddy-apikeys handler wires it in.
package ratelimit

import (
	"context"
	"errors"
	"time"

	"go.uber.org/zap"
)

// Period is the length of a quota period, in UTC.
type Period uint8

const (
	// NoPeriod: the policy has no quota.
	NoPeriod Period = iota
	// Day: from 00:00:00 UTC to the next.
	Day
	// Month: from the first of a calendar month, 00:00:00 UTC, to the next.
	Month
)

// String returns "day", "month" or "".
func (p Period) String() string {
	switch p {
	case Day:
		return "day"
	case Month:
		return "month"
	}
	return ""
}

// Policy is a plan's numbers. A zero Limit means no rate limit; a zero
// Quota means no quota. Policies are values compiled once per
// configuration; the Limiter keeps no pointer to one between calls, so a
// reload that changes a plan's numbers applies to every key at once.
type Policy struct {
	// Name is the plan's name, as configured.
	Name string
	// Limit is the burst size and the number of requests per Window.
	Limit int64
	// Window is the rate limit's window; > 0 when Limit > 0.
	Window time.Duration
	// Quota is the number of accepted requests per Period.
	Quota int64
	// Period is the quota's period; not NoPeriod when Quota > 0.
	Period Period
}

// Result is what a Decision says of a request.
type Result uint8

const (
	// Allowed: the request is admitted and counted.
	Allowed Result = iota
	// RateLimited: over the rate limit; nothing was counted against the quota.
	RateLimited
	// QuotaExceeded: the period's quota is used up.
	QuotaExceeded
)

// Decision is the answer to one request, with what the RateLimit and
// RateLimit-Policy fields of the IETF httpapi rate-limit-headers draft
// need. Durations are rounded up to whole seconds by the caller.
type Decision struct {
	Result Result
	// RetryAfter is when a refused request may succeed; 0 when Allowed.
	RetryAfter time.Duration
	// Rate limit state after this request (zero when the policy has none):
	// Remaining requests that would be admitted now, and Reset, the time
	// until the bucket is full again.
	RateRemaining int64
	RateReset     time.Duration
	// Quota state after this request (zero when the policy has none):
	// requests Used in the current period and the time until it resets.
	QuotaUsed  int64
	QuotaReset time.Duration
}

// Usage is a subject's quota use in the current period.
type Usage struct {
	Used     int64
	Limit    int64
	Period   Period
	ResetsAt time.Time // start of the next period, UTC
}

// DayCount is one UTC day of a subject's traffic.
type DayCount struct {
	Day           time.Time // 00:00:00 UTC of the day
	Accepted      int64
	RateLimited   int64
	QuotaExceeded int64
}

// ErrUnavailable wraps a Backend failure that a caller may retry.
var ErrUnavailable = errors.New("ratelimit: backend unavailable")

// Backend keeps the state that instances share and that outlives a
// process: quota counts, daily counts and, for a shared backend, the rate
// limit buckets instances lease from. Implementations: NewRedisBackend
// (shared), NewBoltBackend (one instance, the file store). Only this
// package implements it.
type Backend interface {
	// Shared reports whether other instances use the same state: then
	// rate limits are leased from it; otherwise they are decided locally.
	Shared() bool
	// History returns a subject's daily counts for the days from, to
	// (inclusive, UTC), oldest first, days without traffic included.
	History(ctx context.Context, subject string, from, to time.Time) ([]DayCount, error)

	// sync sends one sync interval's leases and counts (see syncItem) and
	// fills in the replies; now is Unix nanoseconds.
	sync(ctx context.Context, now int64, items []syncItem, hist []histDelta) error
	// quotaCount returns the count kept for subject's quota period of kind
	// p starting at start (Unix ns): the file store's accepted requests,
	// or the shared counter (accepted requests plus unspent leases).
	quotaCount(ctx context.Context, subject string, p Period, start int64) (int64, error)
}

// Options configure a Limiter.
type Options struct {
	// Backend keeps shared and durable state; required.
	Backend Backend
	// Now is the clock; default time.Now. Tests inject one to cross
	// window and period boundaries.
	Now func() time.Time
	// SyncInterval is how often counts are flushed to the Backend and
	// leases renewed; default 1s. Quota counts lost in a crash are at most
	// one interval's. With a shared Backend the loop runs more often when
	// a rate limit's window is shorter than 10 intervals (every Window/10,
	// at least every 50ms), so leases are renewed before they lapse.
	SyncInterval time.Duration
	// Timeout bounds each call to the Backend: the lease a request makes
	// when it finds no token, and each sync. Default 250ms. A request
	// never waits longer than this for the Backend.
	Timeout time.Duration
	// Logger receives a warning when a shared Backend becomes unreachable
	// (the Limiter then decides locally) and a message when it is back;
	// default: no logging.
	Logger *zap.Logger
}
