package keystore

import (
	"testing"
	"time"
)

// TestCachedKeyMatchesKey: the compact form answers every question the
// guard asks exactly as the record it was made from.
func TestCachedKeyMatchesKey(t *testing.T) {
	base := time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC)
	at := func(d time.Duration) *time.Time { t := base.Add(d); return &t }
	far := time.Date(3000, 1, 1, 0, 0, 0, 0, time.UTC)
	early := time.Date(1600, 1, 1, 0, 0, 0, 0, time.UTC)
	keys := map[string]*Key{
		"full access":       {ID: "key_a", Owner: "user_1"},
		"no scopes":         {ID: "key_b", Owner: "user_1", Scopes: []string{}},
		"scoped":            {ID: "key_c", Owner: "org:42/team", Scopes: []string{"analytics:read", "events:write", "a"}},
		"revoked":           {ID: "key_d", Owner: "o", RevokedAt: at(-time.Second)},
		"revoked later":     {ID: "key_e", Owner: "o", RevokedAt: at(time.Second)},
		"expires":           {ID: "key_f", Owner: "o", ExpiresAt: at(time.Nanosecond)},
		"expired":           {ID: "key_g", Owner: "o", ExpiresAt: at(0)},
		"rotating":          {ID: "key_h", Owner: "o", ReplacedBy: "key_i", ExpiresAt: at(time.Hour)},
		"revoked, expired":  {ID: "key_j", Owner: "o", RevokedAt: at(-2 * time.Hour), ExpiresAt: at(-time.Hour)},
		"after year 2262":   {ID: "key_k", Owner: "o", ExpiresAt: &far},
		"before year 1678":  {ID: "key_l", Owner: "o", RevokedAt: &early},
		"empty owner":       {ID: "key_m", Owner: ""},
		"scope prefix only": {ID: "key_n", Owner: "o", Scopes: []string{"analytics:readwrite"}},
	}
	times := []time.Time{base.Add(-3 * time.Hour), base.Add(-time.Second), base, base.Add(time.Nanosecond),
		base.Add(time.Second), base.Add(2 * time.Hour), far.Add(time.Hour)}
	probes := []string{"analytics:read", "events:write", "a", "", "analytics", "read", "events:write ", "*"}
	for name, k := range keys {
		ck := newCachedKey(k, 0, 0)
		if ck.ID() != k.ID || ck.Owner() != k.Owner || ck.FullAccess() != k.FullAccess() {
			t.Errorf("%s: ID %q owner %q full %v", name, ck.ID(), ck.Owner(), ck.FullAccess())
		}
		wantScopes := "*"
		if !k.FullAccess() {
			wantScopes = ""
			for i, s := range k.Scopes {
				if i > 0 {
					wantScopes += " "
				}
				wantScopes += s
			}
		}
		if ck.Scopes() != wantScopes {
			t.Errorf("%s: Scopes() = %q, want %q", name, ck.Scopes(), wantScopes)
		}
		if ck.IDValue() != any(k.ID) || ck.OwnerValue() != any(k.Owner) || ck.ScopesValue() != any(wantScopes) {
			t.Errorf("%s: boxed values %v %v %v", name, ck.IDValue(), ck.OwnerValue(), ck.ScopesValue())
		}
		for _, p := range probes {
			if ck.HasScope(p) != k.HasScope(p) {
				t.Errorf("%s: HasScope(%q) = %v, want %v", name, p, ck.HasScope(p), k.HasScope(p))
			}
		}
		for _, now := range times {
			if ck.Active(now) != k.Active(now) || ck.Status(now) != k.Status(now) {
				t.Errorf("%s at %s: Active %v Status %s, want %v %s", name, now, ck.Active(now), ck.Status(now), k.Active(now), k.Status(now))
			}
		}
	}
}

func TestCachedKeyNoteUse(t *testing.T) {
	ck := newCachedKey(&Key{ID: "key_a", Owner: "o"}, 0, 0)
	cp := ck // copies share the state
	t0 := time.Unix(1_800_000_000, 0)
	steps := []struct {
		at   time.Duration
		want bool
	}{{0, true}, {100 * time.Millisecond, false}, {999 * time.Millisecond, false}, {time.Second, true}, {1500 * time.Millisecond, false}, {5 * time.Second, true}}
	for _, s := range steps {
		use := ck.NoteUse
		if s.at >= time.Second {
			use = cp.NoteUse
		}
		if got := use(t0.Add(s.at)); got != s.want {
			t.Errorf("NoteUse at +%s = %v, want %v", s.at, got, s.want)
		}
	}
}

// TestCachedKeyAllocs: caching a record allocates its text, its state and
// its boxed ID (its owner and scopes are interned); handing the values on
// allocates nothing.
func TestCachedKeyAllocs(t *testing.T) {
	k := &Key{ID: "key_0123456789abcdef", Owner: "user_1", Scopes: []string{"analytics:read", "events:write"}}
	newCachedKey(k, 0, 0) // interns the owner and scopes
	// The text, the state and the boxed ID; then, for each of owner and
	// scopes, the clone and box that unique.Make compares (garbage once
	// the value is interned).
	if n := testing.AllocsPerRun(100, func() { newCachedKey(k, 0, 0) }); n != 3+2*2 {
		t.Errorf("newCachedKey: %v allocations", n)
	}
	ck := newCachedKey(k, 0, 0)
	var sink any
	if n := testing.AllocsPerRun(100, func() {
		sink = ck.IDValue()
		sink = ck.OwnerValue()
		sink = ck.ScopesValue()
		_ = ck.HasScope("events:write")
	}); n != 0 {
		t.Errorf("reading a cached key: %v allocations, want 0", n)
	}
	_ = sink
	// Interned: one shared value per distinct owner.
	other := newCachedKey(&Key{ID: "key_other", Owner: "user_1"}, 0, 0)
	if other.owner != ck.owner || other.scopes == ck.scopes {
		t.Error("owners or scopes are not interned")
	}
}
