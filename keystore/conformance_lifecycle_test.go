package keystore

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"
)

// This file is the part of the conformance suite (see runConformance) that
// covers the key lifecycle: Update, RecordUsage, CountOwner, Status and
// retention.

// getKey returns the key with the given ID or fails the test.
func getKey(t testing.TB, s Store, id string) *Key {
	t.Helper()
	k, err := s.Get(context.Background(), id)
	if err != nil {
		t.Fatalf("Get(%s): %v", id, err)
	}
	return k
}

// assertEverywhere fails the test unless Get, ByDigest and List all return
// want (List under want.Owner, among the first 100).
func assertEverywhere(t testing.TB, s Store, want *Key) {
	t.Helper()
	ctx := context.Background()
	assertKey(t, want, getKey(t, s, want.ID))
	byDigest, err := s.ByDigest(ctx, want.Digest)
	if err != nil {
		t.Fatalf("ByDigest(%s): %v", want.ID, err)
	}
	assertKey(t, want, byDigest)
	page, _, err := s.List(ctx, want.Owner, "", 100)
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range page {
		if k.ID == want.ID {
			assertKey(t, want, k)
			return
		}
	}
	t.Errorf("%s not listed", want.ID)
}

func testUpdateFields(t *testing.T, s Store) {
	ctx := ctxT(t)
	now := time.Now()
	k := newKey(t, "user-1", now)
	mustCreate(t, s, k)

	expires := now.Add(24 * time.Hour)
	revoked := now.Add(time.Hour)
	got, err := s.Update(ctx, k.ID, func(k *Key) error {
		k.Name = "renamed"
		k.Scopes = []string{"billing:read"}
		k.ExpiresAt = &expires
		k.RevokedAt = &revoked
		k.Replaces = "key_older"
		k.ReplacedBy = "key_newer"
		return nil
	})
	if err != nil {
		t.Fatalf("Update: %v", err)
	}
	want := *k
	want.Name, want.Scopes, want.ExpiresAt, want.RevokedAt = "renamed", []string{"billing:read"}, &expires, &revoked
	want.Replaces, want.ReplacedBy = "key_older", "key_newer"
	assertKey(t, &want, got)
	assertEverywhere(t, s, &want)

	// Fields can be cleared again: full access, no end, no rotation.
	got, err = s.Update(ctx, k.ID, func(k *Key) error {
		k.Scopes, k.ExpiresAt, k.RevokedAt, k.Replaces, k.ReplacedBy = nil, nil, nil, "", ""
		return nil
	})
	if err != nil {
		t.Fatalf("Update: %v", err)
	}
	want.Scopes, want.ExpiresAt, want.RevokedAt, want.Replaces, want.ReplacedBy = nil, nil, nil, "", ""
	assertKey(t, &want, got)
	assertEverywhere(t, s, &want)
	if !getKey(t, s, k.ID).FullAccess() {
		t.Error("clearing Scopes did not give a full-access key")
	}

	// The function gets its own copy: keeping and changing it later does
	// not reach the store.
	var kept *Key
	if _, err := s.Update(ctx, k.ID, func(k *Key) error { kept = k; return nil }); err != nil {
		t.Fatal(err)
	}
	kept.Name = "changed afterwards"
	assertKey(t, &want, getKey(t, s, k.ID))
}

func testUpdateRefusesImmutable(t *testing.T, s Store) {
	ctx := ctxT(t)
	k := newKey(t, "user-1", time.Now())
	mustCreate(t, s, k)
	other := newKey(t, "user-1", time.Now())

	for name, mutate := range map[string]func(*Key){
		"ID":        func(x *Key) { x.ID = other.ID },
		"Owner":     func(x *Key) { x.Owner = "user-2" },
		"Digest":    func(x *Key) { x.Digest = other.Digest },
		"Prefix":    func(x *Key) { x.Prefix = other.Prefix },
		"CreatedAt": func(x *Key) { x.CreatedAt = x.CreatedAt.Add(time.Millisecond) },
		"Meter":     func(x *Key) { x.Meter = other.ID },
	} {
		_, err := s.Update(ctx, k.ID, func(x *Key) error {
			x.Name = "must not be stored"
			mutate(x)
			return nil
		})
		if !errors.Is(err, ErrConflict) {
			t.Errorf("Update changing %s: got %v, want ErrConflict", name, err)
		}
	}
	assertEverywhere(t, s, k)
	if listed := listAll(t, s, "user-2", 10); len(listed) != 0 {
		t.Errorf("user-2 sees %v", listed)
	}
	if _, err := s.Get(ctx, other.ID); !errors.Is(err, ErrNotFound) {
		t.Errorf("Get(other ID): got %v, want ErrNotFound", err)
	}

	// The same instant in another time zone is no change.
	got, err := s.Update(ctx, k.ID, func(x *Key) error {
		x.CreatedAt = x.CreatedAt.UTC()
		x.Name = "renamed"
		return nil
	})
	if err != nil {
		t.Fatalf("Update with CreatedAt in UTC: %v", err)
	}
	want := *k
	want.Name = "renamed"
	assertKey(t, &want, got)
	assertKey(t, &want, getKey(t, s, k.ID))
}

func testUpdateFnError(t *testing.T, s Store) {
	ctx := ctxT(t)
	k := newKey(t, "user-1", time.Now())
	mustCreate(t, s, k)

	errValidation := errors.New("name: too long")
	calls := 0
	got, err := s.Update(ctx, k.ID, func(x *Key) error {
		calls++
		x.Name = "must not be stored"
		x.RevokedAt = &x.CreatedAt
		return errValidation
	})
	if err != errValidation { //nolint:errorlint // the very error, unwrapped
		t.Fatalf("Update: got error %v (%T), want the function's own error", err, err)
	}
	if got != nil {
		t.Errorf("Update returned key %+v with an error", got)
	}
	if calls != 1 {
		t.Errorf("function called %d times without contention", calls)
	}
	assertEverywhere(t, s, k)

	// Even a sentinel from the function comes back as is.
	if _, err := s.Update(ctx, k.ID, func(*Key) error { return ErrNotFound }); err != ErrNotFound { //nolint:errorlint
		t.Errorf("function returning ErrNotFound: got %v", err)
	}
}

func testUpdateNoChange(t *testing.T, s Store) {
	ctx := ctxT(t)
	k := newKey(t, "user-1", time.Now())
	mustCreate(t, s, k)
	used := time.Now().Truncate(time.Millisecond)
	if err := s.RecordUsage(ctx, map[string]time.Time{k.ID: used}); err != nil {
		t.Fatal(err)
	}

	got, err := s.Update(ctx, k.ID, func(x *Key) error {
		far := time.Now().Add(1000 * time.Hour)
		x.LastUsedAt = &far // not part of the record: ignored
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	assertKey(t, k, got)
	if !sameTimePtr(got.LastUsedAt, &used) {
		t.Errorf("Update returned last used %v, want %v", got.LastUsedAt, used)
	}
	if stored := getKey(t, s, k.ID); !sameTimePtr(stored.LastUsedAt, &used) {
		t.Errorf("after Update, last used %v, want %v", stored.LastUsedAt, used)
	}
	assertEverywhere(t, s, k)
}

func testUpdateConcurrent(t *testing.T, s Store) {
	k := newKey(t, "user-1", time.Now())
	k.Scopes = []string{"base"}
	mustCreate(t, s, k)

	const n = 20
	var wg sync.WaitGroup
	start := make(chan struct{})
	want := []string{"base"}
	for i := range n {
		scope := fmt.Sprintf("scope:%02d", i)
		want = append(want, scope)
		wg.Go(func() {
			<-start
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			got, err := s.Update(ctx, k.ID, func(x *Key) error {
				x.Scopes = append(x.Scopes, scope)
				return nil
			})
			if err != nil {
				t.Errorf("Update adding %s: %v", scope, err)
				return
			}
			if !slices.Contains(got.Scopes, scope) {
				t.Errorf("Update adding %s returned scopes %v", scope, got.Scopes)
			}
		})
	}
	close(start)
	wg.Wait()

	got := slices.Clone(getKey(t, s, k.ID).Scopes)
	slices.Sort(got)
	slices.Sort(want)
	if !slices.Equal(got, want) {
		t.Errorf("lost updates: stored scopes\n%v\nwant\n%v", got, want)
	}
}

func testUpdateNotFound(t *testing.T, s Store) {
	ctx := ctxT(t)
	mustCreate(t, s, newKey(t, "user-1", time.Now()))
	unknown := newKey(t, "user-1", time.Now())
	for _, id := range []string{unknown.ID, ""} {
		called := false
		_, err := s.Update(ctx, id, func(*Key) error { called = true; return nil })
		if !errors.Is(err, ErrNotFound) {
			t.Errorf("Update(%q): got %v, want ErrNotFound", id, err)
		}
		if called {
			t.Errorf("Update(%q) called the function", id)
		}
	}
	if _, err := s.Get(ctx, unknown.ID); !errors.Is(err, ErrNotFound) {
		t.Errorf("Update of an unknown ID stored something: %v", err)
	}
}

func testRecordUsage(t *testing.T, s Store) {
	ctx := ctxT(t)
	a := newKey(t, "user-1", time.Now())
	b := newKey(t, "user-1", time.Now())
	mustCreate(t, s, a)
	mustCreate(t, s, b)
	unknown := newKey(t, "user-1", time.Now())

	for _, empty := range []map[string]time.Time{nil, {}} {
		if err := s.RecordUsage(ctx, empty); err != nil {
			t.Fatalf("RecordUsage(%v): %v", empty, err)
		}
	}
	if got := getKey(t, s, a.ID).LastUsedAt; got != nil {
		t.Errorf("never used key has last used %v", got)
	}

	t1 := time.Now().Add(-time.Minute).Truncate(time.Millisecond)
	if err := s.RecordUsage(ctx, map[string]time.Time{a.ID: t1, unknown.ID: t1, "": t1, b.ID: {}}); err != nil {
		t.Fatalf("RecordUsage: %v", err)
	}
	check := func(k *Key, want *time.Time) {
		t.Helper()
		if got := getKey(t, s, k.ID).LastUsedAt; !sameTimePtr(got, want) {
			t.Errorf("Get(%s): last used %v, want %v", k.ID, got, want)
		}
	}
	check(a, &t1)
	check(b, nil)
	if _, err := s.Get(ctx, unknown.ID); !errors.Is(err, ErrNotFound) {
		t.Errorf("RecordUsage of an unknown ID made it a key: %v", err)
	}

	// The later time wins, whichever order they come in.
	earlier, later := t1.Add(-time.Hour), t1.Add(time.Hour)
	if err := s.RecordUsage(ctx, map[string]time.Time{a.ID: earlier, b.ID: t1}); err != nil {
		t.Fatal(err)
	}
	check(a, &t1)
	check(b, &t1)
	if err := s.RecordUsage(ctx, map[string]time.Time{a.ID: later}); err != nil {
		t.Fatal(err)
	}
	check(a, &later)
	// Milliseconds are kept; finer is dropped.
	if err := s.RecordUsage(ctx, map[string]time.Time{b.ID: t1.Add(1500 * time.Microsecond)}); err != nil {
		t.Fatal(err)
	}
	bUsed := t1.Add(time.Millisecond)
	check(b, &bUsed)

	// List shows it too; ByDigest leaves it out.
	page, _, err := s.List(ctx, "user-1", "", 10)
	if err != nil {
		t.Fatal(err)
	}
	wantUsed := map[string]*time.Time{a.ID: &later, b.ID: &bUsed}
	for _, k := range page {
		if !sameTimePtr(k.LastUsedAt, wantUsed[k.ID]) {
			t.Errorf("List: %s last used %v, want %v", k.ID, k.LastUsedAt, wantUsed[k.ID])
		}
	}
	if len(page) != 2 {
		t.Errorf("listed %v", ids(page))
	}
	byDigest, err := s.ByDigest(ctx, a.Digest)
	if err != nil {
		t.Fatal(err)
	}
	if byDigest.LastUsedAt != nil {
		t.Errorf("ByDigest filled LastUsedAt: %v", byDigest.LastUsedAt)
	}

	// Usage and record updates do not disturb each other.
	got, err := s.Update(ctx, a.ID, func(k *Key) error { k.Name = "renamed"; return nil })
	if err != nil {
		t.Fatal(err)
	}
	if !sameTimePtr(got.LastUsedAt, &later) {
		t.Errorf("Update returned last used %v, want %v", got.LastUsedAt, later)
	}
	check(a, &later)
	if got := getKey(t, s, a.ID); got.Name != "renamed" {
		t.Errorf("name %q after RecordUsage", got.Name)
	}
	revoked, err := s.Revoke(ctx, b.ID, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	if !sameTimePtr(revoked.LastUsedAt, &bUsed) {
		t.Errorf("Revoke returned last used %v, want %v", revoked.LastUsedAt, bUsed)
	}
}

func testCountOwner(t *testing.T, s Store) {
	ctx := ctxT(t)
	count := func(owner string, want int) {
		t.Helper()
		n, err := s.CountOwner(ctx, owner)
		if err != nil {
			t.Fatalf("CountOwner(%q): %v", owner, err)
		}
		if n != want {
			t.Errorf("CountOwner(%q) = %d, want %d", owner, n, want)
		}
	}
	count("user-1", 0)
	keys := createSeries(t, s, "user-1", 3) // 5 keys
	createSeries(t, s, "user-2", 1)         // 3 keys
	count("user-1", 5)
	count("user-2", 3)
	count("user-", 0)
	count("", 0)

	// Revoked and expired keys count until retention deletes them.
	if _, err := s.Revoke(ctx, keys[0].ID, time.Now()); err != nil {
		t.Fatal(err)
	}
	expired := newKey(t, "user-1", time.Now().Add(-time.Hour))
	past := time.Now().Add(-time.Minute)
	expired.ExpiresAt = &past
	mustCreate(t, s, expired)
	count("user-1", 6)

	// A retried Create and one refused for a taken ID add nothing.
	mustCreate(t, s, expired)
	taken := newKey(t, "user-1", time.Now())
	taken.ID = keys[1].ID
	if err := s.Create(ctx, taken); !errors.Is(err, ErrConflict) {
		t.Fatalf("Create with a taken ID: %v", err)
	}
	count("user-1", 6)
}

func testStatus(t *testing.T, s Store) {
	ctx := ctxT(t)
	now := time.Now()

	active := newKey(t, "user-1", now)
	mustCreate(t, s, active)

	rotating := newKey(t, "user-1", now.Add(-time.Hour))
	mustCreate(t, s, rotating)
	graceEnd := now.Add(time.Hour)
	if _, err := s.Update(ctx, rotating.ID, func(k *Key) error {
		k.ReplacedBy = active.ID
		k.ExpiresAt = &graceEnd
		return nil
	}); err != nil {
		t.Fatal(err)
	}

	expired := newKey(t, "user-1", now.Add(-48*time.Hour))
	past := now.Add(-time.Hour)
	expired.ExpiresAt = &past
	mustCreate(t, s, expired)

	revoked := newKey(t, "user-1", now.Add(-time.Hour))
	mustCreate(t, s, revoked)
	if _, err := s.Revoke(ctx, revoked.ID, now.Add(-time.Minute)); err != nil {
		t.Fatal(err)
	}

	// A rotated key that was then revoked is revoked.
	rotatedRevoked := newKey(t, "user-1", now.Add(-time.Hour))
	mustCreate(t, s, rotatedRevoked)
	if _, err := s.Update(ctx, rotatedRevoked.ID, func(k *Key) error {
		k.ReplacedBy = active.ID
		k.ExpiresAt = &graceEnd
		k.RevokedAt = &past
		return nil
	}); err != nil {
		t.Fatal(err)
	}

	for _, tc := range []struct {
		k    *Key
		at   time.Time
		want string
	}{
		{active, now, StatusActive},
		{rotating, now, StatusRotating},
		{rotating, graceEnd, StatusExpired},
		{expired, now, StatusExpired},
		{revoked, now, StatusRevoked},
		{revoked, now.Add(-time.Hour), StatusActive}, // before the revocation
		{rotatedRevoked, now, StatusRevoked},
	} {
		got := getKey(t, s, tc.k.ID).Status(tc.at)
		if got != tc.want {
			t.Errorf("%s at %s: status %q, want %q", tc.k.Name, tc.at.Sub(now), got, tc.want)
		}
	}
}

func testRetention(t *testing.T, b backend) {
	s, pass := b.newRetentionStore(t)
	ctx := ctxT(t)
	base := time.Now().Truncate(time.Millisecond)
	soon := base.Add(100 * time.Millisecond)
	far := base.Add(365 * 24 * time.Hour)

	var all []*Key
	create := func(name string, expires *time.Time) *Key {
		k := newKey(t, "user-1", base.Add(time.Duration(len(all))*time.Millisecond))
		k.Name = name
		k.ExpiresAt = expires
		mustCreate(t, s, k)
		all = append(all, k)
		return k
	}
	update := func(k *Key, fn func(*Key) error) {
		if _, err := s.Update(ctx, k.ID, fn); err != nil {
			t.Fatalf("Update(%s): %v", k.Name, err)
		}
	}
	active := create("active", nil)
	later := create("expires later", &far)
	expiring := create("expiring", &soon)
	revoked := create("revoked", nil)
	if _, err := s.Revoke(ctx, revoked.ID, base); err != nil {
		t.Fatal(err)
	}
	// Removing the end keeps a key for ever again.
	extended := create("extended", &soon)
	update(extended, func(k *Key) error { k.ExpiresAt = nil; return nil })
	unrevoked := create("unrevoked", nil)
	if _, err := s.Revoke(ctx, unrevoked.ID, base); err != nil {
		t.Fatal(err)
	}
	update(unrevoked, func(k *Key) error { k.RevokedAt = nil; return nil })
	// Moving the end later moves the deletion.
	postponed := create("postponed", &soon)
	update(postponed, func(k *Key) error { k.ExpiresAt = &far; return nil })

	used := map[string]time.Time{}
	for _, k := range all {
		used[k.ID] = base
	}
	if err := s.RecordUsage(ctx, used); err != nil {
		t.Fatal(err)
	}

	// Before the retention passes, everything is there.
	if got, want := listAll(t, s, "user-1", 3), newestFirst(all); !slices.Equal(got, want) {
		t.Fatalf("before retention: listed\n%v\nwant\n%v", got, want)
	}
	for _, k := range all {
		if got := getKey(t, s, k.ID); !sameTimePtr(got.LastUsedAt, &base) {
			t.Errorf("%s: last used %v, want %v", k.Name, got.LastUsedAt, base)
		}
	}
	if n, err := s.CountOwner(ctx, "user-1"); err != nil || n != len(all) {
		t.Errorf("CountOwner before retention: %d, %v; want %d", n, err, len(all))
	}

	pass(soon)

	for _, k := range []*Key{expiring, revoked} {
		if _, err := s.Get(ctx, k.ID); !errors.Is(err, ErrNotFound) {
			t.Errorf("Get(%s) after retention: got %v, want ErrNotFound", k.Name, err)
		}
		if _, err := s.ByDigest(ctx, k.Digest); !errors.Is(err, ErrNotFound) {
			t.Errorf("ByDigest(%s) after retention: got %v, want ErrNotFound", k.Name, err)
		}
		if _, err := s.Revoke(ctx, k.ID, time.Now()); !errors.Is(err, ErrNotFound) {
			t.Errorf("Revoke(%s) after retention: got %v, want ErrNotFound", k.Name, err)
		}
		// Late usage reports for a deleted key change nothing.
		if err := s.RecordUsage(ctx, map[string]time.Time{k.ID: time.Now()}); err != nil {
			t.Errorf("RecordUsage(%s) after retention: %v", k.Name, err)
		}
		if _, err := s.Get(ctx, k.ID); !errors.Is(err, ErrNotFound) {
			t.Errorf("Get(%s) after a late RecordUsage: got %v, want ErrNotFound", k.Name, err)
		}
	}
	kept := []*Key{active, later, extended, unrevoked, postponed}
	if got, want := listAll(t, s, "user-1", 2), newestFirst(kept); !slices.Equal(got, want) {
		t.Errorf("after retention: listed\n%v\nwant\n%v", got, want)
	}
	// (The Redis store prunes its owner index as List walks it.)
	if n, err := s.CountOwner(ctx, "user-1"); err != nil || n != len(kept) {
		t.Errorf("CountOwner after retention: %d, %v; want %d", n, err, len(kept))
	}
	for _, k := range kept {
		got := getKey(t, s, k.ID)
		if !sameTimePtr(got.LastUsedAt, &base) {
			t.Errorf("%s: last used %v, want %v", k.Name, got.LastUsedAt, base)
		}
		if _, err := s.ByDigest(ctx, k.Digest); err != nil {
			t.Errorf("ByDigest(%s): %v", k.Name, err)
		}
	}
}

func testRetentionRejectsNegative(t *testing.T, b backend) {
	s, err := b.open(t, -time.Second)
	if err == nil {
		_ = s.Close()
		t.Fatal("a negative retention was accepted")
	}
	s, err = b.open(t, 0)
	if err != nil {
		t.Fatalf("zero retention (the default): %v", err)
	}
	_ = s.Close()
}
