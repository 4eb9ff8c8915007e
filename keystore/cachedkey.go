package keystore

import (
	"strings"
	"sync/atomic"
	"time"
)

// CachedKey is the compact, read-only form in which a [CachedStore] keeps a
// key record: only what validating a request needs. A cache of many keys
// lives in the heap of a busy server, where every object is marked by the
// garbage collector on every cycle; so a CachedKey keeps its strings in one
// allocation (ID, owner and scopes back to back), its times without a Location,
// and boxes the values a caller hands on as interface values once, when it
// is cached, not on every request. Together with its cache entry, a record
// costs five or six heap objects (BenchmarkCacheFootprint measures it).
//
// A CachedKey is shared by every request that presents the key. Its methods
// are safe for concurrent use.
type CachedKey struct {
	text      string // ID, owner and Scopes(), back to back
	idEnd     int
	ownerEnd  int
	revokedAt time.Time // in UTC (no Location pointer); if revoked
	expiresAt time.Time // in UTC; if expires
	revoked   bool
	expires   bool
	full      bool // full access: no scope allowlist
	rotating  bool // replaced by a newer key, within its grace period

	// The ID, owner and scopes boxed once (see IDValue).
	idValue, ownerValue, scopesValue any

	noted atomic.Int64 // unix second of the last NoteUse that said true
}

// fullAccessValue is the boxed scopes value of every full-access key.
var fullAccessValue any = FullAccessScopes

// FullAccessScopes is what [CachedKey.Scopes] returns for a full-access key.
const FullAccessScopes = "*"

// fill sets ck (a zero CachedKey) from the record k.
func (ck *CachedKey) fill(k *Key) {
	var b strings.Builder
	n := len(k.ID) + len(k.Owner)
	for _, s := range k.Scopes {
		n += len(s) + 1
	}
	b.Grow(n)
	b.WriteString(k.ID)
	b.WriteString(k.Owner)
	for i, s := range k.Scopes {
		if i > 0 {
			b.WriteByte(' ')
		}
		b.WriteString(s)
	}
	ck.text = b.String()
	ck.idEnd = len(k.ID)
	ck.ownerEnd = len(k.ID) + len(k.Owner)
	if k.RevokedAt != nil {
		ck.revoked, ck.revokedAt = true, k.RevokedAt.UTC()
	}
	if k.ExpiresAt != nil {
		ck.expires, ck.expiresAt = true, k.ExpiresAt.UTC()
	}
	ck.full = k.FullAccess()
	ck.rotating = k.ReplacedBy != ""
	ck.idValue = ck.ID()
	ck.ownerValue = ck.Owner()
	if ck.full {
		ck.scopesValue = fullAccessValue
	} else {
		ck.scopesValue = ck.Scopes()
	}
}

// copyFrom sets ck (a zero CachedKey) to the same record as src, sharing
// its strings and boxed values.
func (ck *CachedKey) copyFrom(src *CachedKey) {
	ck.text, ck.idEnd, ck.ownerEnd = src.text, src.idEnd, src.ownerEnd
	ck.revokedAt, ck.expiresAt = src.revokedAt, src.expiresAt
	ck.revoked, ck.expires = src.revoked, src.expires
	ck.full, ck.rotating = src.full, src.rotating
	ck.idValue, ck.ownerValue, ck.scopesValue = src.idValue, src.ownerValue, src.scopesValue
	ck.noted.Store(src.noted.Load())
}

// ID returns the key's public ID.
func (ck *CachedKey) ID() string { return ck.text[:ck.idEnd] }

// Owner returns the key's owner.
func (ck *CachedKey) Owner() string { return ck.text[ck.idEnd:ck.ownerEnd] }

// Scopes returns the key's scopes separated by single spaces (scope names
// have none), or [FullAccessScopes] for a full-access key.
func (ck *CachedKey) Scopes() string {
	if ck.full {
		return FullAccessScopes
	}
	return ck.text[ck.ownerEnd:]
}

// IDValue, OwnerValue and ScopesValue return ID(), Owner() and Scopes() as
// interface values that were boxed when the record was cached, so handing
// them on as `any` (a Caddy placeholder, say) costs no allocation.
func (ck *CachedKey) IDValue() any { return ck.idValue }

// OwnerValue returns Owner() boxed once; see IDValue.
func (ck *CachedKey) OwnerValue() any { return ck.ownerValue }

// ScopesValue returns Scopes() boxed once; see IDValue.
func (ck *CachedKey) ScopesValue() any { return ck.scopesValue }

// FullAccess reports whether the key carries no scope allowlist.
func (ck *CachedKey) FullAccess() bool { return ck.full }

// HasScope reports whether the key may act under scope s, as
// [Key.HasScope] does.
func (ck *CachedKey) HasScope(s string) bool {
	if ck.full {
		return true
	}
	rest := ck.text[ck.ownerEnd:]
	for rest != "" {
		have, after, _ := strings.Cut(rest, " ")
		if have == s {
			return true
		}
		rest = after
	}
	return false
}

// Active reports whether the key validates at time now, as [Key.Active]
// does.
func (ck *CachedKey) Active(now time.Time) bool {
	return !ck.revokedBy(now) && !ck.expiredBy(now)
}

func (ck *CachedKey) revokedBy(now time.Time) bool { return ck.revoked && !now.Before(ck.revokedAt) }
func (ck *CachedKey) expiredBy(now time.Time) bool { return ck.expires && !now.Before(ck.expiresAt) }

// Status reports the key's state at time now, as [Key.Status] does.
func (ck *CachedKey) Status(now time.Time) string {
	switch {
	case ck.revokedBy(now):
		return StatusRevoked
	case ck.expiredBy(now):
		return StatusExpired
	case ck.rotating:
		return StatusRotating
	}
	return StatusActive
}

// NoteUse reports whether a use of the key at now is the first one that
// NoteUse has seen in now's second (on this cached copy of the record).
// A caller that records last-used times, which have second precision, can
// so skip all but one use a second of a busy key.
func (ck *CachedKey) NoteUse(now time.Time) bool {
	sec := now.Unix()
	last := ck.noted.Load()
	return sec != last && ck.noted.CompareAndSwap(last, sec)
}
