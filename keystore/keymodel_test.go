package keystore

import (
	"encoding/json"
	"testing"
	"time"
)

// testDisabledAndMeta: Disabled and Meta round-trip through Create, Update
// and every read; a disabled key stays live (CountLive) with status
// disabled; Meta keeps its bytes and can be cleared.
func testDisabledAndMeta(t *testing.T, s Store) {
	ctx := ctxT(t)
	now := time.Now()
	k := newKey(t, "user-meta", now)
	k.Meta = json.RawMessage(`{"plan":"pro","n":1,"o":{"\u00fc":[true]}}`)
	mustCreate(t, s, k)
	check := func(what string, disabled bool, meta string) {
		t.Helper()
		reads := map[string]*Key{"Get": getKey(t, s, k.ID)}
		var err error
		if reads["ByDigest"], err = s.ByDigest(ctx, k.Digest); err != nil {
			t.Fatal(err)
		}
		keys, _, err := s.List(ctx, k.Owner, "", 10)
		if err != nil || len(keys) != 1 {
			t.Fatalf("List: %v, %d keys", err, len(keys))
		}
		reads["List"] = keys[0]
		for op, got := range reads {
			if got.Disabled != disabled || string(got.Meta) != meta {
				t.Errorf("%s, %s: disabled %v meta %s; want %v %s", what, op, got.Disabled, got.Meta, disabled, meta)
			}
		}
	}
	check("created", false, string(k.Meta))

	got, err := s.Update(ctx, k.ID, func(k *Key) error { k.Disabled = true; return nil })
	if err != nil || !got.Disabled || got.Status(now) != StatusDisabled || !got.Active(now) {
		t.Fatalf("disable: %v, %+v", err, got)
	}
	check("disabled", true, string(k.Meta))
	if n, err := s.CountLive(ctx, k.Owner, now); err != nil || n != 1 {
		t.Errorf("CountLive of a disabled key: %d, %v; want 1", n, err)
	}
	if _, err := s.Update(ctx, k.ID, func(k *Key) error { k.Meta = nil; return nil }); err != nil {
		t.Fatal(err)
	}
	check("meta cleared", true, "")
	if _, err := s.Update(ctx, k.ID, func(k *Key) error { k.Disabled = false; return nil }); err != nil {
		t.Fatal(err)
	}
	check("enabled", false, "")
	if got := getKey(t, s, k.ID); got.Status(now) != StatusActive {
		t.Errorf("enabled key status %s", got.Status(now))
	}
}

// TestCachedKeyMeta: the cached form of a key with metadata carries the
// header value and one placeholder per top-level scalar member; a key
// without has none, and disabled shows in Status.
func TestCachedKeyMeta(t *testing.T) {
	k := &Key{ID: "key_a", Owner: "o", Meta: json.RawMessage(`{"s":"x\u00fc","n":-1.5e3,"b":false,"z":null,"o":{"a":1},"l":[1]}`), Disabled: true}
	ck := newCachedKey(k, 0, 0)
	if ck.Meta() != string(k.Meta) || ck.MetaValue() != string(k.Meta) || !ck.Disabled() || ck.Status(time.Now()) != StatusDisabled {
		t.Fatalf("cached: meta %q disabled %v status %s", ck.Meta(), ck.Disabled(), ck.Status(time.Now()))
	}
	vars := map[string]any{}
	for _, v := range ck.MetaVars() {
		vars[v.Name] = v.Value
	}
	want := map[string]any{"http.auth.apikey.meta.s": "xü", "http.auth.apikey.meta.n": "-1.5e3", "http.auth.apikey.meta.b": false}
	if len(vars) != len(want) {
		t.Errorf("placeholders %v, want %v", vars, want)
	}
	for name, v := range want {
		if vars[name] != v {
			t.Errorf("%s = %#v, want %#v", name, vars[name], v)
		}
	}
	plain := newCachedKey(&Key{ID: "key_b", Owner: "o"}, 0, 0)
	if plain.Meta() != "" || plain.MetaValue() != nil || plain.MetaVars() != nil || plain.Disabled() {
		t.Errorf("a key without metadata: %q %v %v", plain.Meta(), plain.MetaVars(), plain.Disabled())
	}
}
