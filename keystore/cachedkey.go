package keystore

import (
	"encoding/json"
	"strings"
	"sync/atomic"
	"time"
	"unique"
)

// CachedKey is the compact form in which a [CachedStore] keeps a key record:
// only what validating a request needs. A cache of many keys lives in the
// heap of a busy server, where the garbage collector marks every object on
// every cycle, and scans those that hold pointers; so a record costs four
// heap objects, two of them pointer-free:
//
//   - the CachedKey itself, held by value inside the cache's node;
//   - one string with the ID, owner, plan, meter and scopes back to back
//     (no pointers);
//   - the ID boxed as an interface value, once, so that handing it on as
//     `any` (a Caddy placeholder) costs no allocation per request; the
//     owner and scopes are boxed once per distinct value and shared
//     (interned with package unique);
//   - its mutable state (times of loading and use), pointer-free.
//
// Times are kept without a Location. BenchmarkCacheFootprint, in the
// caddy-apikeys package, measures the bytes and objects per record.
//
// A CachedKey is a value: copies share its state, and its methods are safe
// for concurrent use.
type CachedKey struct {
	text      string // ID, owner, plan, meter (if not the ID) and Scopes(), back to back
	idEnd     uint32
	ownerEnd  uint32
	planEnd   uint32
	meterEnd  uint32
	revokedAt time.Time // in UTC (no Location pointer); if revoked
	expiresAt time.Time // in UTC; if expires
	revoked   bool
	expires   bool
	full      bool // full access: no scope allowlist
	rotating  bool // replaced by a newer key, within its grace period
	disabled  bool // suspended (Key.Disabled)

	// The ID, owner and scopes as interface values (see IDValue). (The
	// plan's value for its placeholder is the handler's, per configured
	// plan: the plan in effect may not be the key's.)
	idValue       any
	owner, scopes unique.Handle[any]

	meta *cachedMeta // nil when the key has no metadata

	st *entryState // shared by every copy
}

// cachedMeta is a key's metadata as the guard hands it on, prepared once
// when the record is cached.
type cachedMeta struct {
	text  string    // the compact JSON, as stored
	value any       // text boxed
	vars  []MetaVar // placeholders of its top-level scalar members
}

// MetaVar is a placeholder name and value derived from a key's metadata
// (see [CachedKey.MetaVars]).
type MetaVar struct {
	// Name is MetaPlaceholderPrefix followed by the member's name.
	Name string
	// Value is a string member's string, a number's JSON text or a
	// boolean, boxed once.
	Value any
}

// MetaPlaceholderPrefix starts the name of every placeholder that
// [CachedKey.MetaVars] returns.
const MetaPlaceholderPrefix = "http.auth.apikey.meta."

// entryState is the mutable part of a cached record, shared by every copy
// of its CachedKey. It holds no pointer, so the garbage collector does not
// scan it.
type entryState struct {
	loadedAt atomic.Int64  // unix nanoseconds when the store read started
	gen      atomic.Uint64 // the cache's flush generation it was read in
	lastUsed atomic.Int64  // unix nanoseconds, to usedResolution; 0: never
	noted    atomic.Int64  // unix nanoseconds of the last NoteUse that said true; 0: none
	// reported is the noted time CollectUses last handed on, or
	// detachedUse once the record has left the cache (see uses.go).
	reported atomic.Int64
	// expirySet is when otter's expiry of the entry was last set (unix
	// nanoseconds): on its write, then by the refresh (see memoryDue).
	expirySet atomic.Int64
	sum       uint64 // maphash of the stored record if read raw, else 0; set before it is cached
}

// FullAccessScopes is what [CachedKey.Scopes] returns for a full-access key.
const FullAccessScopes = "*"

// newCachedKey returns the cached form of record k, read from the store at
// loadedAt (unix nanoseconds) in flush generation gen.
func newCachedKey(k *Key, loadedAt int64, gen uint64) CachedKey {
	var ck CachedKey
	ck.fill(k)
	ck.st = new(entryState)
	ck.st.loadedAt.Store(loadedAt)
	ck.st.gen.Store(gen)
	ck.st.expirySet.Store(loadedAt)
	return ck
}

// fill sets ck's record fields (not its state) from k.
func (ck *CachedKey) fill(k *Key) {
	var b strings.Builder
	meter := k.Meter
	if meter == k.ID {
		meter = ""
	}
	n := len(k.ID) + len(k.Owner) + len(k.Plan) + len(meter)
	for _, s := range k.Scopes {
		n += len(s) + 1
	}
	b.Grow(n)
	b.WriteString(k.ID)
	b.WriteString(k.Owner)
	b.WriteString(k.Plan)
	b.WriteString(meter)
	for i, s := range k.Scopes {
		if i > 0 {
			b.WriteByte(' ')
		}
		b.WriteString(s)
	}
	ck.text = b.String()
	// Record fields are bounded far below 4 GiB (IDs, owners, plan names
	// and scopes are validated short strings).
	ck.idEnd = uint32(len(k.ID))
	ck.ownerEnd = ck.idEnd + uint32(len(k.Owner))
	ck.planEnd = ck.ownerEnd + uint32(len(k.Plan))
	ck.meterEnd = ck.planEnd + uint32(len(meter))
	if k.RevokedAt != nil {
		ck.revoked, ck.revokedAt = true, k.RevokedAt.UTC()
	}
	if k.ExpiresAt != nil {
		ck.expires, ck.expiresAt = true, k.ExpiresAt.UTC()
	}
	ck.full = k.FullAccess()
	ck.rotating = k.ReplacedBy != ""
	ck.disabled = k.Disabled
	ck.meta = newCachedMeta(k.Meta)
	ck.idValue = ck.ID()
	ck.owner = intern(ck.Owner())
	ck.scopes = intern(ck.Scopes())
}

// intern returns s boxed as an interface value shared by every record with
// the same value: keys of one owner, keys with the same scopes. The handle
// keeps the value alive; it is dropped when no record holds it.
func intern(s string) unique.Handle[any] {
	// Cloned, so that the shared value does not hold a record's text.
	return unique.Make[any](strings.Clone(s))
}

// newCachedMeta prepares stored metadata for the guard; nil for none.
// Members that are objects, arrays or null give no placeholder.
func newCachedMeta(raw json.RawMessage) *cachedMeta {
	if len(raw) == 0 {
		return nil
	}
	m := &cachedMeta{text: string(raw)}
	m.value = m.text
	var members map[string]json.RawMessage
	if json.Unmarshal(raw, &members) != nil {
		return m
	}
	for name, v := range members {
		var val any
		switch {
		case len(v) == 0:
			continue
		case v[0] == '"':
			var s string
			if json.Unmarshal(v, &s) != nil {
				continue
			}
			val = s
		case string(v) == "true", string(v) == "false":
			val = string(v) == "true"
		case v[0] == '-' || v[0] >= '0' && v[0] <= '9':
			val = string(v)
		default:
			continue
		}
		m.vars = append(m.vars, MetaVar{Name: MetaPlaceholderPrefix + name, Value: val})
	}
	return m
}

// ID returns the key's public ID.
func (ck *CachedKey) ID() string { return ck.text[:ck.idEnd] }

// Owner returns the key's owner.
func (ck *CachedKey) Owner() string { return ck.text[ck.idEnd:ck.ownerEnd] }

// Plan returns the name of the key's plan, or "" if it has none.
func (ck *CachedKey) Plan() string { return ck.text[ck.ownerEnd:ck.planEnd] }

// Meter returns the subject the key's usage is metered under, as
// [Key.MeterID] does: the first key of its rotation chain, or its own ID.
func (ck *CachedKey) Meter() string {
	if ck.meterEnd == ck.planEnd {
		return ck.ID()
	}
	return ck.text[ck.planEnd:ck.meterEnd]
}

// Scopes returns the key's scopes separated by single spaces (scope names
// have none), or [FullAccessScopes] for a full-access key.
func (ck *CachedKey) Scopes() string {
	if ck.full {
		return FullAccessScopes
	}
	return ck.text[ck.meterEnd:]
}

// IDValue, OwnerValue and ScopesValue return ID(), Owner() and Scopes() as
// interface values that were boxed when the record was cached, so handing
// them on as `any` (a Caddy placeholder, say) costs no allocation.
func (ck *CachedKey) IDValue() any { return ck.idValue }

// OwnerValue returns Owner() boxed once; see IDValue.
func (ck *CachedKey) OwnerValue() any { return ck.owner.Value() }

// ScopesValue returns Scopes() boxed once; see IDValue.
func (ck *CachedKey) ScopesValue() any { return ck.scopes.Value() }

// FullAccess reports whether the key carries no scope allowlist.
func (ck *CachedKey) FullAccess() bool { return ck.full }

// Disabled reports whether the key is suspended (see [Key.Disabled]).
func (ck *CachedKey) Disabled() bool { return ck.disabled }

// Meta returns the key's metadata as compact JSON, or "" if it has none.
func (ck *CachedKey) Meta() string {
	if ck.meta == nil {
		return ""
	}
	return ck.meta.text
}

// MetaValue returns Meta() boxed once (nil without metadata); see IDValue.
func (ck *CachedKey) MetaValue() any {
	if ck.meta == nil {
		return nil
	}
	return ck.meta.value
}

// MetaVars returns the placeholders of the metadata's top-level string,
// number and boolean members, prepared when the record was cached; the
// caller must not change the slice.
func (ck *CachedKey) MetaVars() []MetaVar {
	if ck.meta == nil {
		return nil
	}
	return ck.meta.vars
}

// HasScope reports whether the key may act under scope s, as
// [Key.HasScope] does.
func (ck *CachedKey) HasScope(s string) bool {
	if ck.full {
		return true
	}
	rest := ck.text[ck.meterEnd:]
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
	case ck.disabled:
		return StatusDisabled
	case ck.rotating:
		return StatusRotating
	}
	return StatusActive
}

// NoteUse reports whether a use of the key at now is the first one that
// NoteUse has seen in now's second (for this cached record; a record read
// again starts afresh).
// A caller that records last-used times, which have second precision, can
// so skip all but one use a second of a busy key.
//
// The time of a use it says true for is kept in the record: a
// [CachedStore] hands it on in [CachedStore.CollectUses] (see
// [CachedKey.UseCollected]).
func (ck *CachedKey) NoteUse(now time.Time) bool {
	ns := now.UnixNano()
	last := ck.st.noted.Load()
	return (last == 0 || last/int64(time.Second) != ns/int64(time.Second)) && ck.st.noted.CompareAndSwap(last, ns)
}
