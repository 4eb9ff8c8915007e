// Package keystore provides the storage side of caddy-apikeys: the API key
// model, the key format (minting, parsing, checksum), keyed hashing of keys,
// and a [Store] interface with a Redis and an embedded bbolt implementation.
//
// The package has no Caddy imports, so it can be used and tested on its own.
// Raw keys never reach a Store: only their [Digest], an HMAC-SHA256 under a
// pepper derived from the operator's secret, is stored.
package keystore

import (
	"context"
	"encoding/json"
	"errors"
	"time"
)

// Sentinel errors returned by every [Store] implementation. Any other error
// from a Store means the store could not be reached or failed, and callers
// should treat it as "store unavailable".
var (
	// ErrNotFound is returned when a key or idempotency record does not exist.
	ErrNotFound = errors.New("keystore: not found")
	// ErrConflict is returned when a write would overwrite a different
	// record: a key ID or digest that belongs to another key, or an
	// idempotency record whose token no longer matches.
	ErrConflict = errors.New("keystore: conflict")
)

// Key is the stored record of an API key. It never holds the raw key.
type Key struct {
	// ID is the public identifier, "key_" followed by random characters.
	ID string `json:"id"`
	// Owner is the dashboard identity (the JWT owner claim) that created it.
	Owner string `json:"owner"`
	// Name is the human-readable name given at creation.
	Name string `json:"name"`
	// Prefix is the displayable start of the raw key, e.g. "wbk_ce03e701".
	Prefix string `json:"prefix"`
	// Digest is the keyed hash of the raw key; the lookup handle.
	Digest Digest `json:"digest"`
	// Scopes is the allowlist of scopes; nil means full access.
	Scopes []string `json:"scopes"`
	// CreatedAt is when the key was minted (UTC, millisecond precision).
	CreatedAt time.Time `json:"created_at"`
	// ExpiresAt is when the key stops validating; nil means never.
	ExpiresAt *time.Time `json:"expires_at,omitempty"`
	// RevokedAt is when the key was revoked; nil means not revoked.
	RevokedAt *time.Time `json:"revoked_at,omitempty"`
	// Replaces is the ID of the key this one replaced in a rotation.
	Replaces string `json:"replaces,omitempty"`
	// ReplacedBy is the ID of the key that replaced this one in a
	// rotation; the rotation also brought ExpiresAt forward to the end of
	// the grace period.
	ReplacedBy string `json:"replaced_by,omitempty"`
	// Disabled suspends the key without ending it: it is refused while
	// set, but stays live (it counts towards an owner's live keys, see
	// CountLive) and can be enabled again.
	Disabled bool `json:"disabled,omitempty"`
	// Meta is the operator's metadata for the key: a compact JSON object,
	// opaque to the store; nil means none.
	Meta json.RawMessage `json:"meta,omitempty"`
	// Plan names the key's plan: the rate limit and quota the guard
	// applies to it, as the operator configured them under that name; ""
	// means none (no limits).
	Plan string `json:"plan,omitempty"`
	// Meter is the ID of the key whose usage this key's requests count
	// towards: the first key of its rotation chain, so that a rotated key
	// keeps its quota usage. "" means the key's own ID (see MeterID). It
	// is set when the key is created and never changes.
	Meter string `json:"meter,omitempty"`
	// LastUsedAt is when the key last passed the guard, as recorded with
	// [Store.RecordUsage] (so it lags by the caller's flush interval), at
	// millisecond precision; nil means never recorded. Get, List and Update
	// fill it in; ByDigest leaves it nil, to keep key validation at one
	// store round trip. It is kept apart from the stored record: Create and
	// Update ignore it.
	LastUsedAt *time.Time `json:"last_used_at,omitempty"`
}

// End returns when k stopped or stops validating: the earlier of RevokedAt
// and ExpiresAt, or nil if it has neither. Retention is counted from it.
func (k *Key) End() *time.Time {
	switch {
	case k.RevokedAt == nil:
		return k.ExpiresAt
	case k.ExpiresAt == nil || k.RevokedAt.Before(*k.ExpiresAt):
		return k.RevokedAt
	default:
		return k.ExpiresAt
	}
}

// DefaultRetention is how long a store keeps a revoked or expired key after
// it stopped validating (see [Key.End]), so that it can still be listed and
// inspected, before deleting it.
const DefaultRetention = 30 * 24 * time.Hour

// Key statuses, as reported by [Key.Status].
const (
	StatusActive   = "active"
	StatusRotating = "rotating"
	StatusExpired  = "expired"
	StatusRevoked  = "revoked"
	StatusDisabled = "disabled"
)

// Status reports k's state at time now: revoked, expired, disabled
// (suspended, see Disabled), rotating (replaced by a newer key but still
// inside its grace period) or active.
func (k *Key) Status(now time.Time) string {
	switch {
	case k.RevokedAt != nil && !now.Before(*k.RevokedAt):
		return StatusRevoked
	case k.ExpiresAt != nil && !now.Before(*k.ExpiresAt):
		return StatusExpired
	case k.Disabled:
		return StatusDisabled
	case k.ReplacedBy != "":
		return StatusRotating
	}
	return StatusActive
}

// Active reports whether k is live at time now: not revoked and not
// expired. A live key validates unless it is Disabled.
func (k *Key) Active(now time.Time) bool {
	if k.RevokedAt != nil && !now.Before(*k.RevokedAt) {
		return false
	}
	if k.ExpiresAt != nil && !now.Before(*k.ExpiresAt) {
		return false
	}
	return true
}

// MeterID returns the subject under which k's usage is metered: Meter, or
// k's own ID when Meter is empty.
func (k *Key) MeterID() string {
	if k.Meter != "" {
		return k.Meter
	}
	return k.ID
}

// FullAccess reports whether k carries no scope allowlist.
func (k *Key) FullAccess() bool { return k.Scopes == nil }

// HasScope reports whether k may act under scope s. A full-access key has
// every scope.
func (k *Key) HasScope(s string) bool {
	if k.Scopes == nil {
		return true
	}
	for _, have := range k.Scopes {
		if have == s {
			return true
		}
	}
	return false
}

// Idempotency record states.
const (
	// IdempotencyPending marks a request that is being executed. Its Body
	// already holds the sealed response it will answer with, so a takeover
	// after a crash finishes the same work instead of minting anew.
	IdempotencyPending = "pending"
	// IdempotencyDone marks a request whose response can be replayed.
	IdempotencyDone = "done"
)

// IdempotencyRecord is what the store keeps for one Idempotency-Key, scoped
// by the caller to an owner and endpoint. Body is opaque to the store (the
// caller encrypts it).
type IdempotencyRecord struct {
	// Token identifies the holder of a pending record; writes that replace
	// or delete a record must present it.
	Token string `json:"token"`
	// Fingerprint identifies the request (hash of method, path and body).
	Fingerprint string `json:"fingerprint"`
	// State is IdempotencyPending or IdempotencyDone.
	State string `json:"state"`
	// LockedUntil is when a pending record may be taken over by a retry.
	LockedUntil time.Time `json:"locked_until"`
	// KeyID is the key the request mints (known before it is stored).
	KeyID string `json:"key_id,omitempty"`
	// Status is the HTTP status to replay.
	Status int `json:"status,omitempty"`
	// Body is the sealed response body.
	Body []byte `json:"body,omitempty"`
}

// Store keeps keys and idempotency records. Implementations are safe for
// concurrent use by many goroutines and, for Redis, by many processes.
//
// Durability contract: when Create returns nil, the key is durably stored,
// findable by digest and by ID, listed under its owner and revocable. A
// failed or interrupted Create never leaves a key that validates (is found by
// digest) without also being listed and revocable.
//
// Retention: a key that has an end ([Key.End], the earlier of RevokedAt and
// ExpiresAt) is deleted once end plus the store's retention (default
// [DefaultRetention]) has passed: it is then missing from every read, as if
// it never existed, along with its last-used time. Keys without an end are
// kept for ever. Deletion is not instant: the bbolt store sweeps every
// minute, and the Redis store relies on key expiry on the server (its owner
// index is pruned when List walks past the dead entries).
type Store interface {
	// Create stores k. Creating a key whose ID and Digest are both already
	// stored with the same values is a no-op success (so a retried write is
	// safe). An ID or digest that belongs to another key gives ErrConflict.
	// It is CreateLimited without a limit.
	Create(ctx context.Context, k *Key) error
	// CreateLimited is Create that refuses to store k, with
	// ErrLimitReached, when k.Owner already holds limit or more keys that
	// are live at now (neither revoked nor expired; see CountLive). The
	// count and the insert are one atomic step: however many CreateLimited
	// calls for one owner run at once, on however many processes, the
	// owner never ends up with more than limit live keys through them.
	// limit 0 means no limit. A retry of a Create that already stored k is
	// a no-op success whatever the count.
	CreateLimited(ctx context.Context, k *Key, limit int, now time.Time) error
	// CountLive returns how many of owner's keys are live at now: neither
	// revoked nor expired. Every write keeps a per-owner index of live
	// keys ordered by their end (Key.End), so this costs O(log n) on Redis
	// and O(1) plus the keys that ended since the last sweep on bbolt,
	// whatever the length of owner's history. A Redis Create that failed
	// after reserving its place counts for up to a minute after it began.
	CountLive(ctx context.Context, owner string, now time.Time) (int, error)
	// ByDigest returns the key with digest d, or ErrNotFound. Revoked and
	// expired keys are returned too; callers check [Key.Active]. It leaves
	// LastUsedAt nil (this is the hot path of key validation).
	ByDigest(ctx context.Context, d Digest) (*Key, error)
	// Get returns the key with the given ID, with LastUsedAt filled in, or
	// ErrNotFound.
	Get(ctx context.Context, id string) (*Key, error)
	// List returns up to limit of owner's keys, newest first (by CreatedAt,
	// then ID), starting after the opaque cursor ("" starts at the newest),
	// and the cursor of the next page ("" when there is none). Pages are
	// stable under concurrent inserts: no duplicates, no gaps. LastUsedAt is
	// filled in.
	List(ctx context.Context, owner, cursor string, limit int) ([]*Key, string, error)
	// Revoke marks the key revoked at time at and returns the updated key,
	// or ErrNotFound. Revoking a revoked key returns it unchanged. It is
	// Update with a function that sets RevokedAt if it is nil.
	Revoke(ctx context.Context, id string, at time.Time) (*Key, error)
	// Update loads the key with the given ID, applies fn to it and stores
	// the result, atomically with respect to other writers of that key (fn
	// may run more than once under contention, so it must be free of side
	// effects). An error from fn aborts the update and is returned as is.
	// fn may change Name, Scopes, ExpiresAt, RevokedAt, Replaces,
	// ReplacedBy, Disabled, Meta and Plan; a change to ID, Owner, Digest,
	// Prefix, CreatedAt or Meter gives ErrConflict, and nothing is stored either way (changes to LastUsedAt
	// are ignored). Returns the updated key, with LastUsedAt filled in, or
	// ErrNotFound. Giving a key an end, or moving its end, moves its
	// deletion under retention accordingly; removing the end keeps it for
	// ever again.
	Update(ctx context.Context, id string, fn func(*Key) error) (*Key, error)
	// RecordUsage stores when keys were last used, by key ID, keeping the
	// later of the stored and the given time (at millisecond precision).
	// It is stored apart from the key records, so it never contends with
	// Update. Unknown IDs and zero times are ignored.
	RecordUsage(ctx context.Context, used map[string]time.Time) error
	// CountOwner returns how many keys are stored under owner, including
	// revoked and expired keys that retention has not removed yet. The
	// Redis store counts its owner index as is: it also counts keys whose
	// Create was interrupted, and keys already deleted by retention until a
	// List walks past them, so it may count high, never low.
	CountOwner(ctx context.Context, owner string) (int, error)

	// ReserveIdempotency stores rec under id if no record exists there,
	// kept for ttl, and returns (nil, nil). If a record exists it is
	// returned unchanged, with a nil error.
	ReserveIdempotency(ctx context.Context, id string, rec *IdempotencyRecord, ttl time.Duration) (*IdempotencyRecord, error)
	// GetIdempotency returns the record under id, or ErrNotFound.
	GetIdempotency(ctx context.Context, id string) (*IdempotencyRecord, error)
	// ReplaceIdempotency atomically replaces the record under id with rec
	// (kept for ttl) if the stored record's Token equals token; otherwise
	// (missing, or another token) it returns ErrConflict.
	ReplaceIdempotency(ctx context.Context, id, token string, rec *IdempotencyRecord, ttl time.Duration) error
	// DeleteIdempotency deletes the record under id if its Token equals
	// token. A missing record or another token is not an error.
	DeleteIdempotency(ctx context.Context, id, token string) error

	// Ping checks that the store is reachable.
	Ping(ctx context.Context) error
	// Close releases connections and file handles.
	Close() error
}
