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

// testPlanAndMeter: a key's plan and meter survive Create, and every read
// (Get, ByDigest, List); Update changes and clears the plan, and refuses
// to change the meter (see testUpdateRefusesImmutable).
func testPlanAndMeter(t *testing.T, s Store) {
	ctx := ctxT(t)
	now := time.Now()
	first := newKey(t, "user-plan", now)
	first.Plan = "pro"
	mustCreate(t, s, first)
	if first.MeterID() != first.ID {
		t.Fatalf("MeterID of a key without Meter: %q, want its ID", first.MeterID())
	}
	// A rotation's replacement meters under the first key of the chain.
	next := newKey(t, "user-plan", now.Add(time.Millisecond))
	next.Plan, next.Meter, next.Replaces = "pro", first.ID, first.ID
	mustCreate(t, s, next)
	if next.MeterID() != first.ID {
		t.Fatalf("MeterID: %q, want %q", next.MeterID(), first.ID)
	}
	check := func(what string, k *Key, plan string) {
		t.Helper()
		reads := map[string]*Key{"Get": getKey(t, s, k.ID)}
		var err error
		if reads["ByDigest"], err = s.ByDigest(ctx, k.Digest); err != nil {
			t.Fatal(err)
		}
		keys, _, err := s.List(ctx, k.Owner, "", 10)
		if err != nil {
			t.Fatal(err)
		}
		for _, l := range keys {
			if l.ID == k.ID {
				reads["List"] = l
			}
		}
		if len(reads) != 3 {
			t.Fatalf("%s: %s not listed", what, k.ID)
		}
		for op, got := range reads {
			if got.Plan != plan || got.Meter != k.Meter {
				t.Errorf("%s, %s: plan %q meter %q; want %q %q", what, op, got.Plan, got.Meter, plan, k.Meter)
			}
		}
	}
	check("created", first, "pro")
	check("created", next, "pro")
	got, err := s.Update(ctx, next.ID, func(k *Key) error { k.Plan = "free"; return nil })
	if err != nil || got.Plan != "free" || got.Meter != first.ID {
		t.Fatalf("change plan: %v, %+v", err, got)
	}
	check("plan changed", next, "free")
	if _, err := s.Update(ctx, next.ID, func(k *Key) error { k.Plan = ""; return nil }); err != nil {
		t.Fatal(err)
	}
	check("plan cleared", next, "")
	check("other key untouched", first, "pro")
}

// TestCachedKeyPlanMeter: the cached form reads the plan and meter out of
// its packed text, without allocating, and the scopes after them are
// intact.
func TestCachedKeyPlanMeter(t *testing.T) {
	for _, tc := range []struct {
		k                  Key
		plan, meter, scope string
	}{
		{Key{ID: "key_b", Owner: "o", Plan: "pro", Meter: "key_a", Scopes: []string{"x:read", "y"}}, "pro", "key_a", "x:read y"},
		{Key{ID: "key_b", Owner: "o", Plan: "pro", Meter: "key_b"}, "pro", "key_b", FullAccessScopes},
		{Key{ID: "key_b", Owner: "o", Scopes: []string{"x"}}, "", "key_b", "x"},
	} {
		ck := newCachedKey(&tc.k, 0, 0)
		if ck.ID() != tc.k.ID || ck.Owner() != "o" || ck.Plan() != tc.plan || ck.Meter() != tc.meter || ck.Scopes() != tc.scope {
			t.Errorf("%+v: id %q owner %q plan %q meter %q scopes %q", tc.k, ck.ID(), ck.Owner(), ck.Plan(), ck.Meter(), ck.Scopes())
		}
		if !ck.HasScope("x") && tc.scope != "x:read y" {
			t.Errorf("%+v: HasScope(x) false", tc.k)
		}
		if n := testing.AllocsPerRun(100, func() { _, _ = ck.Plan(), ck.Meter() }); n != 0 {
			t.Errorf("reading plan and meter allocates %v times", n)
		}
	}
}
