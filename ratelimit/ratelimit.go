// Package ratelimit meters API keys: a rate limit per key (GCRA, the
// generic cell rate algorithm of ITU-T I.371: a burst of at most Limit
// requests, then Limit per Window) and a quota of accepted requests per UTC
// day or calendar month, with daily counts of accepted and refused
// requests kept for reporting.
//
// A Limiter decides in memory. On one instance (no shared Backend, or the
// file store's) it is exact. Instances that share a Backend (Redis) lease
// tokens from a bucket kept in the Backend, in batches, so a request costs
// no round trip at steady state; see Backend for the bound this gives.
//
// The package has no Caddy imports; the caddy-apikeys handler wires it in.
//
// STATUS: interface skeleton for issue 11. The types and signatures below
// are the contract between the limiter (this package) and the handler; the
// implementation lands with the issue.
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
