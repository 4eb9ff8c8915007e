package keystore

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"slices"
	"sort"
	"sync"
	"testing"
	"time"
)

// This file is the conformance suite every Store implementation runs (see
// redis_test.go and bolt_test.go). A backend passes when runConformance is
// green against a real instance of it.

// backend is what the suite needs of one Store implementation.
type backend struct {
	// newStore returns a fresh, empty store with the default retention
	// (and arranges for it to be closed).
	newStore func(t *testing.T) Store
	// newRetentionStore returns a fresh, empty store with a short or
	// controllable retention, and a function pass(end) that returns once
	// the retention of keys that ended at or before end has passed for the
	// store (by waiting, or by moving its clock and sweeping).
	newRetentionStore func(t *testing.T) (s Store, pass func(end time.Time))
	// open opens a fresh store with the given retention option.
	open func(t *testing.T, retention time.Duration) (Store, error)
}

// runConformance runs the whole suite against b.
func runConformance(t *testing.T, b backend) {
	tests := []struct {
		name string
		run  func(t *testing.T, s Store)
	}{
		{"Ping", testPing},
		{"CreateRoundTrip", testCreateRoundTrip},
		{"CreateFullAccessRoundTrip", testCreateFullAccessRoundTrip},
		{"CreateTwiceIsNoop", testCreateTwiceIsNoop},
		{"CreateConflictSameID", testCreateConflictSameID},
		{"CreateConflictSameDigest", testCreateConflictSameDigest},
		{"CreateRejectsInvalid", testCreateRejectsInvalid},
		{"NotFound", testNotFound},
		{"ListNewestFirst", testListNewestFirst},
		{"ListPagination", testListPagination},
		{"ListConcurrentInserts", testListConcurrentInserts},
		{"ListBadArguments", testListBadArguments},
		{"OwnerIsolation", testOwnerIsolation},
		{"Revoke", testRevoke},
		{"RevokeConcurrent", testRevokeConcurrent},
		{"ActiveExpiredRevoked", testActiveExpiredRevoked},
		{"IdempotencyLifecycle", testIdempotencyLifecycle},
		{"IdempotencyBadArguments", testIdempotencyBadArguments},
		{"IdempotencyTTL", testIdempotencyTTL},
		{"IdempotencyReplaceSetsTTL", testIdempotencyReplaceSetsTTL},
		{"IdempotencyConcurrentReserve", testIdempotencyConcurrentReserve},
		{"UpdateFields", testUpdateFields},
		{"DisabledAndMeta", testDisabledAndMeta},
		{"PlanAndMeter", testPlanAndMeter},
		{"UpdateRefusesImmutable", testUpdateRefusesImmutable},
		{"UpdateFnError", testUpdateFnError},
		{"UpdateNoChange", testUpdateNoChange},
		{"UpdateConcurrent", testUpdateConcurrent},
		{"UpdateNotFound", testUpdateNotFound},
		{"RecordUsage", testRecordUsage},
		{"CountOwner", testCountOwner},
		{"CreateLimitedConcurrent", testCreateLimitedConcurrent},
		{"CountLive", testCountLive},
		{"Status", testStatus},
		{"ListFilteredBounded", testListFilteredBounded},
		{"CanceledContext", testCanceledContext},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			tc.run(t, b.newStore(t))
		})
	}
	// Tests that need more than a default store; backends that only check
	// a deployment (ACLs, Sentinel) leave these hooks out.
	if b.newRetentionStore == nil || b.open == nil {
		return
	}
	for _, tc := range []struct {
		name string
		run  func(t *testing.T, b backend)
	}{
		{"Retention", testRetention},
		{"RetentionRejectsNegative", testRetentionRejectsNegative},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			tc.run(t, b)
		})
	}
}

// testSecret is the operator secret of the test hasher.
var testSecret = []byte("0123456789abcdef0123456789abcdef")

// testHasher digests keys in tests.
var testHasher = func() *Hasher {
	h, err := NewHasher(testSecret)
	if err != nil {
		panic(err)
	}
	return h
}()

// ctxT returns a context bounded by 10s, cancelled with the test.
func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// newKey returns a freshly minted key record (the raw key is dropped) for
// owner, created at created, with every optional field set.
func newKey(t testing.TB, owner string, created time.Time) *Key {
	t.Helper()
	raw, err := Mint(DefaultPrefix)
	if err != nil {
		t.Fatal(err)
	}
	id, err := NewKeyID()
	if err != nil {
		t.Fatal(err)
	}
	expires := created.Add(90 * 24 * time.Hour)
	return &Key{
		ID:        id,
		Owner:     owner,
		Name:      "key " + id,
		Prefix:    DisplayPrefix(DefaultPrefix, raw),
		Digest:    testHasher.Digest(raw),
		Scopes:    []string{"analytics:read", "webhooks:manage"},
		CreatedAt: created,
		ExpiresAt: &expires,
	}
}

// mustCreate stores k or fails the test.
func mustCreate(t testing.TB, s Store, k *Key) {
	t.Helper()
	if err := s.Create(context.Background(), k); err != nil {
		t.Fatalf("Create(%s): %v", k.ID, err)
	}
}

// sameTimePtr reports whether two optional times are both nil or Equal.
func sameTimePtr(a, b *time.Time) bool {
	if a == nil || b == nil {
		return a == nil && b == nil
	}
	return a.Equal(*b)
}

// assertKey fails the test unless got has every field of want.
func assertKey(t testing.TB, want, got *Key) {
	t.Helper()
	if got == nil {
		t.Fatalf("got nil key, want %s", want.ID)
	}
	if got.ID != want.ID || got.Owner != want.Owner || got.Name != want.Name || got.Prefix != want.Prefix {
		t.Errorf("key identity: got {%q %q %q %q}, want {%q %q %q %q}",
			got.ID, got.Owner, got.Name, got.Prefix, want.ID, want.Owner, want.Name, want.Prefix)
	}
	if !got.Digest.Equal(want.Digest) {
		t.Errorf("digest: got %s, want %s", got.Digest, want.Digest)
	}
	if (got.Scopes == nil) != (want.Scopes == nil) || !slices.Equal(got.Scopes, want.Scopes) {
		t.Errorf("scopes: got %#v, want %#v", got.Scopes, want.Scopes)
	}
	if !got.CreatedAt.Equal(want.CreatedAt) {
		t.Errorf("created_at: got %v, want %v", got.CreatedAt, want.CreatedAt)
	}
	if !sameTimePtr(got.ExpiresAt, want.ExpiresAt) {
		t.Errorf("expires_at: got %v, want %v", got.ExpiresAt, want.ExpiresAt)
	}
	if !sameTimePtr(got.RevokedAt, want.RevokedAt) {
		t.Errorf("revoked_at: got %v, want %v", got.RevokedAt, want.RevokedAt)
	}
	if got.Replaces != want.Replaces || got.ReplacedBy != want.ReplacedBy {
		t.Errorf("rotation: got replaces %q, replaced by %q; want %q, %q",
			got.Replaces, got.ReplacedBy, want.Replaces, want.ReplacedBy)
	}
	if got.Plan != want.Plan || got.Meter != want.Meter {
		t.Errorf("plan, meter: got %q, %q; want %q, %q", got.Plan, got.Meter, want.Plan, want.Meter)
	}
}

// ids returns the IDs of keys, in order.
func ids(keys []*Key) []string {
	out := make([]string, len(keys))
	for i, k := range keys {
		out[i] = k.ID
	}
	return out
}

// newestFirst returns the IDs of keys in List order.
func newestFirst(keys []*Key) []string {
	sorted := slices.Clone(keys)
	sort.Slice(sorted, func(i, j int) bool {
		a, b := sorted[i], sorted[j]
		if am, bm := a.CreatedAt.UnixMilli(), b.CreatedAt.UnixMilli(); am != bm {
			return am > bm
		}
		return a.ID > b.ID
	})
	return ids(sorted)
}

// listAll pages through owner's keys with the given page size.
func listAll(t testing.TB, s Store, owner string, limit int) []string {
	t.Helper()
	var (
		out    []string
		cursor string
	)
	for page := 0; ; page++ {
		if page > 10000 {
			t.Fatal("List does not terminate")
		}
		keys, next, err := s.List(context.Background(), owner, cursor, limit)
		if err != nil {
			t.Fatalf("List(limit %d, cursor %q): %v", limit, cursor, err)
		}
		if len(keys) > limit {
			t.Fatalf("List returned %d keys, limit %d", len(keys), limit)
		}
		if next != "" && len(keys) != limit {
			t.Fatalf("List returned a short page (%d of %d) with a next cursor", len(keys), limit)
		}
		out = append(out, ids(keys)...)
		if next == "" {
			return out
		}
		cursor = next
	}
}

func testPing(t *testing.T, s Store) {
	if err := s.Ping(ctxT(t)); err != nil {
		t.Fatalf("Ping: %v", err)
	}
}

func testCreateRoundTrip(t *testing.T, s Store) {
	ctx := ctxT(t)
	// Nanoseconds and a non-UTC zone must survive; times compare with Equal.
	created := time.Now().In(time.FixedZone("X", 3600))
	k := newKey(t, "user-1", created)
	mustCreate(t, s, k)

	got, err := s.ByDigest(ctx, k.Digest)
	if err != nil {
		t.Fatalf("ByDigest: %v", err)
	}
	assertKey(t, k, got)

	got, err = s.Get(ctx, k.ID)
	if err != nil {
		t.Fatalf("Get: %v", err)
	}
	assertKey(t, k, got)

	// The caller's record is not aliased by the store.
	got.Name = "changed"
	again, err := s.Get(ctx, k.ID)
	if err != nil {
		t.Fatal(err)
	}
	if again.Name != k.Name {
		t.Errorf("stored record changed through a returned pointer")
	}
}

func testCreateFullAccessRoundTrip(t *testing.T, s Store) {
	k := newKey(t, "user-1", time.Now())
	k.Scopes = nil
	k.ExpiresAt = nil
	mustCreate(t, s, k)
	got, err := s.ByDigest(ctxT(t), k.Digest)
	if err != nil {
		t.Fatal(err)
	}
	assertKey(t, k, got)
	if !got.FullAccess() || got.ExpiresAt != nil {
		t.Errorf("full access key came back with scopes %#v, expires %v", got.Scopes, got.ExpiresAt)
	}
}

func testCreateTwiceIsNoop(t *testing.T, s Store) {
	k := newKey(t, "user-1", time.Now())
	mustCreate(t, s, k)
	retry := *k
	mustCreate(t, s, &retry)

	got, err := s.Get(ctxT(t), k.ID)
	if err != nil {
		t.Fatal(err)
	}
	assertKey(t, k, got)
	if listed := listAll(t, s, "user-1", 10); !slices.Equal(listed, []string{k.ID}) {
		t.Errorf("listed %v, want exactly [%s]", listed, k.ID)
	}
}

func testCreateConflictSameID(t *testing.T, s Store) {
	ctx := ctxT(t)
	k := newKey(t, "user-1", time.Now())
	mustCreate(t, s, k)

	other := newKey(t, "user-1", time.Now())
	other.ID = k.ID
	if err := s.Create(ctx, other); !errors.Is(err, ErrConflict) {
		t.Fatalf("Create with a taken ID: got %v, want ErrConflict", err)
	}
	if _, err := s.ByDigest(ctx, other.Digest); !errors.Is(err, ErrNotFound) {
		t.Errorf("conflicting key is findable by digest: %v", err)
	}
	got, err := s.Get(ctx, k.ID)
	if err != nil {
		t.Fatal(err)
	}
	assertKey(t, k, got)
	if listed := listAll(t, s, "user-1", 10); !slices.Equal(listed, []string{k.ID}) {
		t.Errorf("listed %v, want exactly [%s]", listed, k.ID)
	}
}

func testCreateConflictSameDigest(t *testing.T, s Store) {
	ctx := ctxT(t)
	k := newKey(t, "user-1", time.Now())
	mustCreate(t, s, k)

	other := newKey(t, "user-1", time.Now())
	other.Digest = k.Digest
	if err := s.Create(ctx, other); !errors.Is(err, ErrConflict) {
		t.Fatalf("Create with a taken digest: got %v, want ErrConflict", err)
	}
	if _, err := s.Get(ctx, other.ID); !errors.Is(err, ErrNotFound) {
		t.Errorf("Get(conflicting ID): got %v, want ErrNotFound", err)
	}
	got, err := s.ByDigest(ctx, k.Digest)
	if err != nil {
		t.Fatal(err)
	}
	assertKey(t, k, got)
	if listed := listAll(t, s, "user-1", 10); !slices.Equal(listed, []string{k.ID}) {
		t.Errorf("listed %v, want exactly [%s]", listed, k.ID)
	}
}

func testCreateRejectsInvalid(t *testing.T, s Store) {
	ctx := ctxT(t)
	base := newKey(t, "user-1", time.Now())
	cases := map[string]func(k *Key) *Key{
		"nil":        func(*Key) *Key { return nil },
		"no ID":      func(k *Key) *Key { k.ID = ""; return k },
		"no owner":   func(k *Key) *Key { k.Owner = ""; return k },
		"no digest":  func(k *Key) *Key { k.Digest = Digest{}; return k },
		"no created": func(k *Key) *Key { k.CreatedAt = time.Time{}; return k },
		// Found by FuzzIndexMember: the owner index cannot represent it,
		// and Create used to panic on it.
		"created after year 318857": func(k *Key) *Key { k.CreatedAt = time.UnixMilli(1 << 62); return k },
	}
	for name, mutate := range cases {
		k := *base
		err := s.Create(ctx, mutate(&k))
		if err == nil || errors.Is(err, ErrConflict) || errors.Is(err, ErrNotFound) {
			t.Errorf("%s: Create gave %v, want a validation error", name, err)
		}
	}
	if listed := listAll(t, s, "user-1", 10); len(listed) != 0 {
		t.Errorf("invalid keys were listed: %v", listed)
	}
}

func testNotFound(t *testing.T, s Store) {
	ctx := ctxT(t)
	mustCreate(t, s, newKey(t, "user-1", time.Now()))
	unknown := newKey(t, "user-1", time.Now())

	if _, err := s.ByDigest(ctx, unknown.Digest); !errors.Is(err, ErrNotFound) {
		t.Errorf("ByDigest(unknown): got %v, want ErrNotFound", err)
	}
	if _, err := s.Get(ctx, unknown.ID); !errors.Is(err, ErrNotFound) {
		t.Errorf("Get(unknown): got %v, want ErrNotFound", err)
	}
	if _, err := s.Get(ctx, ""); !errors.Is(err, ErrNotFound) {
		t.Errorf(`Get(""): got %v, want ErrNotFound`, err)
	}
	if _, err := s.Revoke(ctx, unknown.ID, time.Now()); !errors.Is(err, ErrNotFound) {
		t.Errorf("Revoke(unknown): got %v, want ErrNotFound", err)
	}
	if _, err := s.GetIdempotency(ctx, "idem-unknown"); !errors.Is(err, ErrNotFound) {
		t.Errorf("GetIdempotency(unknown): got %v, want ErrNotFound", err)
	}
}

// createSeries stores n keys for owner, one millisecond apart, plus two that
// share a millisecond (ordered by ID), and returns them.
func createSeries(t testing.TB, s Store, owner string, n int) []*Key {
	t.Helper()
	base := time.Now().Add(-time.Hour).Truncate(time.Millisecond)
	var keys []*Key
	for i := range n {
		k := newKey(t, owner, base.Add(time.Duration(i)*time.Millisecond))
		mustCreate(t, s, k)
		keys = append(keys, k)
	}
	for range 2 {
		k := newKey(t, owner, base.Add(time.Duration(n/2)*time.Millisecond+300*time.Microsecond))
		mustCreate(t, s, k)
		keys = append(keys, k)
	}
	return keys
}

func testListNewestFirst(t *testing.T, s Store) {
	keys := createSeries(t, s, "user-1", 5)
	got, next, err := s.List(ctxT(t), "user-1", "", 100)
	if err != nil {
		t.Fatal(err)
	}
	if next != "" {
		t.Errorf("next cursor %q on the only page", next)
	}
	if want := newestFirst(keys); !slices.Equal(ids(got), want) {
		t.Fatalf("List order:\n got %v\nwant %v", ids(got), want)
	}
	// Listed records are complete.
	byID := map[string]*Key{}
	for _, k := range keys {
		byID[k.ID] = k
	}
	for _, k := range got {
		assertKey(t, byID[k.ID], k)
	}
}

func testListPagination(t *testing.T, s Store) {
	keys := createSeries(t, s, "user-1", 7) // 9 keys
	want := newestFirst(keys)
	for limit := 1; limit <= len(keys)+1; limit++ {
		if got := listAll(t, s, "user-1", limit); !slices.Equal(got, want) {
			t.Errorf("limit %d:\n got %v\nwant %v", limit, got, want)
		}
	}
}

func testListConcurrentInserts(t *testing.T, s Store) {
	initial := createSeries(t, s, "user-1", 20)
	want := newestFirst(initial)

	stop := make(chan struct{})
	var wg sync.WaitGroup
	var inserted []string
	wg.Go(func() {
		for {
			select {
			case <-stop:
				return
			default:
			}
			// Alternate new keys with keys back-dated into the range being
			// listed: neither may disturb the walk over the initial keys.
			created := time.Now()
			if len(inserted)%2 == 1 {
				created = initial[len(inserted)%len(initial)].CreatedAt.Add(500 * time.Microsecond)
			}
			k := newKey(t, "user-1", created)
			if err := s.Create(context.Background(), k); err != nil {
				t.Errorf("concurrent Create: %v", err)
				return
			}
			inserted = append(inserted, k.ID)
			time.Sleep(time.Millisecond)
		}
	})

	var got []string
	cursor := ""
	for {
		page, next, err := s.List(ctxT(t), "user-1", cursor, 3)
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, ids(page)...)
		if next == "" {
			break
		}
		cursor = next
		time.Sleep(2 * time.Millisecond) // let inserts land between pages
	}
	close(stop)
	wg.Wait()

	seen := map[string]bool{}
	for _, id := range got {
		if seen[id] {
			t.Errorf("key %s listed twice", id)
		}
		seen[id] = true
	}
	// The initial keys appear in order, none missing; keys created during
	// the walk may or may not appear, but never twice.
	var initialSeen []string
	for _, id := range got {
		if slices.Contains(want, id) {
			initialSeen = append(initialSeen, id)
		}
	}
	if !slices.Equal(initialSeen, want) {
		t.Errorf("initial keys while inserting:\n got %v\nwant %v", initialSeen, want)
	}
	if len(inserted) == 0 {
		t.Log("no insert landed during the walk")
	}
}

func testListBadArguments(t *testing.T, s Store) {
	ctx := ctxT(t)
	createSeries(t, s, "user-1", 2)
	for _, limit := range []int{-1, 0, MaxListLimit + 1, int(^uint(0) >> 1)} {
		if _, _, err := s.List(ctx, "user-1", "", limit); err == nil {
			t.Errorf("List with limit %d succeeded", limit)
		}
	}
	if keys, _, err := s.List(ctx, "user-1", "", MaxListLimit); err != nil || len(keys) != 4 {
		t.Errorf("List with limit MaxListLimit: %d keys, %v", len(keys), err)
	}
	for _, cursor := range []string{"garbage", "123:key_x", "00000000000000ab:key_x", "0000000000000001:"} {
		if _, _, err := s.List(ctx, "user-1", cursor, 10); !errors.Is(err, ErrInvalidCursor) {
			t.Errorf("List(cursor %q): got %v, want ErrInvalidCursor", cursor, err)
		}
	}
}

func testOwnerIsolation(t *testing.T, s Store) {
	a := createSeries(t, s, "alice", 3)
	b := createSeries(t, s, "bob", 2)
	if got := listAll(t, s, "alice", 2); !slices.Equal(got, newestFirst(a)) {
		t.Errorf("alice: got %v, want %v", got, newestFirst(a))
	}
	if got := listAll(t, s, "bob", 2); !slices.Equal(got, newestFirst(b)) {
		t.Errorf("bob: got %v, want %v", got, newestFirst(b))
	}
	// Owners that are prefixes of each other, or empty-ish, stay apart.
	for _, owner := range []string{"ali", "alice2", "carol", " "} {
		if got := listAll(t, s, owner, 5); len(got) != 0 {
			t.Errorf("owner %q sees %v", owner, got)
		}
	}
	// A cursor from alice's list does not reveal bob's keys.
	_, next, err := s.List(ctxT(t), "alice", "", 1)
	if err != nil || next == "" {
		t.Fatalf("List: %q %v", next, err)
	}
	page, _, err := s.List(ctxT(t), "bob", next, 10)
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range page {
		if k.Owner != "bob" {
			t.Errorf("bob's list holds %s of %s", k.ID, k.Owner)
		}
	}
}

func testRevoke(t *testing.T, s Store) {
	ctx := ctxT(t)
	k := newKey(t, "user-1", time.Now())
	mustCreate(t, s, k)

	at := time.Now().Add(time.Second)
	got, err := s.Revoke(ctx, k.ID, at)
	if err != nil {
		t.Fatalf("Revoke: %v", err)
	}
	want := *k
	want.RevokedAt = &at
	assertKey(t, &want, got)

	// Visible on every read path.
	byDigest, err := s.ByDigest(ctx, k.Digest)
	if err != nil {
		t.Fatal(err)
	}
	assertKey(t, &want, byDigest)
	if byDigest.Active(at) {
		t.Error("revoked key is active at its revocation time")
	}
	if !byDigest.Active(at.Add(-time.Millisecond)) {
		t.Error("key inactive before its revocation time")
	}
	page, _, err := s.List(ctx, "user-1", "", 10)
	if err != nil || len(page) != 1 {
		t.Fatalf("List: %v %v", page, err)
	}
	assertKey(t, &want, page[0])

	// Revoking again returns it unchanged.
	again, err := s.Revoke(ctx, k.ID, at.Add(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	assertKey(t, &want, again)
	byID, err := s.Get(ctx, k.ID)
	if err != nil {
		t.Fatal(err)
	}
	assertKey(t, &want, byID)
}

func testRevokeConcurrent(t *testing.T, s Store) {
	k := newKey(t, "user-1", time.Now())
	mustCreate(t, s, k)

	const n = 10
	results := make([]*Key, n)
	var wg sync.WaitGroup
	base := time.Now()
	for i := range n {
		wg.Go(func() {
			got, err := s.Revoke(context.Background(), k.ID, base.Add(time.Duration(i)*time.Second))
			if err != nil {
				t.Errorf("Revoke: %v", err)
				return
			}
			results[i] = got
		})
	}
	wg.Wait()
	stored, err := s.Get(ctxT(t), k.ID)
	if err != nil {
		t.Fatal(err)
	}
	for i, r := range results {
		if r != nil && !sameTimePtr(r.RevokedAt, stored.RevokedAt) {
			t.Errorf("revoke %d saw revoked_at %v, stored %v", i, r.RevokedAt, stored.RevokedAt)
		}
	}
}

func testActiveExpiredRevoked(t *testing.T, s Store) {
	ctx := ctxT(t)
	now := time.Now()

	expired := newKey(t, "user-1", now.Add(-48*time.Hour))
	past := now.Add(-time.Hour)
	expired.ExpiresAt = &past
	mustCreate(t, s, expired)

	revoked := newKey(t, "user-1", now.Add(-time.Hour))
	mustCreate(t, s, revoked)
	if _, err := s.Revoke(ctx, revoked.ID, now.Add(-time.Minute)); err != nil {
		t.Fatal(err)
	}

	active := newKey(t, "user-1", now)
	mustCreate(t, s, active)

	for _, tc := range []struct {
		k    *Key
		want bool
	}{{expired, false}, {revoked, false}, {active, true}} {
		got, err := s.ByDigest(ctx, tc.k.Digest)
		if err != nil {
			t.Fatalf("ByDigest(%s): %v", tc.k.ID, err)
		}
		if got.Active(now) != tc.want {
			t.Errorf("%s: Active = %v, want %v", tc.k.ID, got.Active(now), tc.want)
		}
	}
}

// newIdem returns an idempotency record held by token.
func newIdem(token string) *IdempotencyRecord {
	return &IdempotencyRecord{
		Token:       token,
		Fingerprint: "fp-" + token,
		State:       IdempotencyPending,
		LockedUntil: time.Now().Add(30 * time.Second),
		KeyID:       "key_" + token,
		Body:        []byte("sealed\x00body " + token),
	}
}

// assertIdem fails the test unless got equals want.
func assertIdem(t testing.TB, want, got *IdempotencyRecord) {
	t.Helper()
	if got == nil {
		t.Fatalf("got nil idempotency record, want token %q", want.Token)
	}
	if got.Token != want.Token || got.Fingerprint != want.Fingerprint || got.State != want.State ||
		!got.LockedUntil.Equal(want.LockedUntil) || got.KeyID != want.KeyID || got.Status != want.Status ||
		!bytes.Equal(got.Body, want.Body) {
		t.Errorf("idempotency record:\n got %+v\nwant %+v", got, want)
	}
}

func testIdempotencyLifecycle(t *testing.T, s Store) {
	ctx := ctxT(t)
	const id = "owner-1:POST /v1/apikeys:abc"
	first := newIdem("tok-1")

	existing, err := s.ReserveIdempotency(ctx, id, first, time.Hour)
	if err != nil || existing != nil {
		t.Fatalf("first Reserve: %v, %v; want nil, nil", existing, err)
	}
	got, err := s.GetIdempotency(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	assertIdem(t, first, got)

	// A second reservation returns the first record and changes nothing.
	existing, err = s.ReserveIdempotency(ctx, id, newIdem("tok-2"), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	assertIdem(t, first, existing)

	// Replace with the wrong token: conflict, unchanged.
	done := newIdem("tok-1")
	done.State, done.Status, done.Body = IdempotencyDone, 201, []byte(`{"sealed":true}`)
	if err := s.ReplaceIdempotency(ctx, id, "tok-2", done, time.Hour); !errors.Is(err, ErrConflict) {
		t.Fatalf("Replace with wrong token: got %v, want ErrConflict", err)
	}
	got, err = s.GetIdempotency(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	assertIdem(t, first, got)

	// Replace with the right token.
	if err := s.ReplaceIdempotency(ctx, id, "tok-1", done, time.Hour); err != nil {
		t.Fatalf("Replace: %v", err)
	}
	got, err = s.GetIdempotency(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	assertIdem(t, done, got)

	// A takeover may hand the record to a new token.
	takeover := newIdem("tok-3")
	if err := s.ReplaceIdempotency(ctx, id, "tok-1", takeover, time.Hour); err != nil {
		t.Fatal(err)
	}
	if err := s.ReplaceIdempotency(ctx, id, "tok-1", done, time.Hour); !errors.Is(err, ErrConflict) {
		t.Fatalf("Replace with the old token after a takeover: got %v, want ErrConflict", err)
	}

	// Delete with the wrong token keeps it.
	if err := s.DeleteIdempotency(ctx, id, "tok-1"); err != nil {
		t.Fatalf("Delete with wrong token: %v", err)
	}
	got, err = s.GetIdempotency(ctx, id)
	if err != nil {
		t.Fatalf("record gone after a Delete with the wrong token: %v", err)
	}
	assertIdem(t, takeover, got)

	// Delete with the right token removes it; deleting again is fine.
	if err := s.DeleteIdempotency(ctx, id, "tok-3"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.GetIdempotency(ctx, id); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Get after Delete: got %v, want ErrNotFound", err)
	}
	if err := s.DeleteIdempotency(ctx, id, "tok-3"); err != nil {
		t.Fatalf("Delete of a missing record: %v", err)
	}
	if err := s.ReplaceIdempotency(ctx, id, "tok-3", done, time.Hour); !errors.Is(err, ErrConflict) {
		t.Fatalf("Replace of a missing record: got %v, want ErrConflict", err)
	}

	// And the ID can be reserved afresh.
	existing, err = s.ReserveIdempotency(ctx, id, newIdem("tok-4"), time.Hour)
	if err != nil || existing != nil {
		t.Fatalf("Reserve after Delete: %v, %v", existing, err)
	}
}

func testIdempotencyBadArguments(t *testing.T, s Store) {
	ctx := ctxT(t)
	bad := map[string]struct {
		id  string
		rec *IdempotencyRecord
		ttl time.Duration
	}{
		"empty id":      {"", newIdem("t"), time.Hour},
		"nil record":    {"x", nil, time.Hour},
		"no token":      {"x", newIdem(""), time.Hour},
		"newline token": {"x", newIdem("a\nb"), time.Hour},
		"zero ttl":      {"x", newIdem("t"), 0},
		"sub-ms ttl":    {"x", newIdem("t"), time.Microsecond},
		"negative ttl":  {"x", newIdem("t"), -time.Second},
	}
	for name, tc := range bad {
		if _, err := s.ReserveIdempotency(ctx, tc.id, tc.rec, tc.ttl); err == nil {
			t.Errorf("Reserve with %s succeeded", name)
		}
		if err := s.ReplaceIdempotency(ctx, tc.id, "t", tc.rec, tc.ttl); err == nil {
			t.Errorf("Replace with %s succeeded", name)
		}
	}
	if _, err := s.GetIdempotency(ctx, "x"); !errors.Is(err, ErrNotFound) {
		t.Errorf("a bad Reserve stored something: %v", err)
	}
}

// waitGone polls until the record under id is gone, failing after limit.
func waitGone(t *testing.T, s Store, id string, limit time.Duration) time.Duration {
	t.Helper()
	start := time.Now()
	for {
		_, err := s.GetIdempotency(ctxT(t), id)
		if errors.Is(err, ErrNotFound) {
			return time.Since(start)
		}
		if err != nil {
			t.Fatal(err)
		}
		if time.Since(start) > limit {
			t.Fatalf("idempotency record %s still there after %s", id, limit)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func testIdempotencyTTL(t *testing.T, s Store) {
	ctx := ctxT(t)
	const ttl = 1500 * time.Millisecond
	start := time.Now()
	if _, err := s.ReserveIdempotency(ctx, "ttl", newIdem("tok-1"), ttl); err != nil {
		t.Fatal(err)
	}
	if _, err := s.GetIdempotency(ctx, "ttl"); err != nil {
		t.Fatalf("Get right after Reserve: %v", err)
	}
	waitGone(t, s, "ttl", 4*time.Second)
	if elapsed := time.Since(start); elapsed < ttl-100*time.Millisecond {
		t.Errorf("record expired after %s, ttl %s", elapsed, ttl)
	}
	// An expired record is missing for every operation.
	if err := s.ReplaceIdempotency(ctx, "ttl", "tok-1", newIdem("tok-1"), ttl); !errors.Is(err, ErrConflict) {
		t.Errorf("Replace of an expired record: got %v, want ErrConflict", err)
	}
	existing, err := s.ReserveIdempotency(ctx, "ttl", newIdem("tok-2"), ttl)
	if err != nil || existing != nil {
		t.Fatalf("Reserve after expiry: %v, %v; want nil, nil", existing, err)
	}
}

func testIdempotencyReplaceSetsTTL(t *testing.T, s Store) {
	ctx := ctxT(t)
	if _, err := s.ReserveIdempotency(ctx, "r", newIdem("tok-1"), 1500*time.Millisecond); err != nil {
		t.Fatal(err)
	}
	// Replace with a longer TTL keeps it past the first one...
	if err := s.ReplaceIdempotency(ctx, "r", "tok-1", newIdem("tok-1"), time.Hour); err != nil {
		t.Fatal(err)
	}
	// ...and with a shorter one lets it go sooner.
	if _, err := s.ReserveIdempotency(ctx, "s", newIdem("tok-1"), time.Hour); err != nil {
		t.Fatal(err)
	}
	if err := s.ReplaceIdempotency(ctx, "s", "tok-1", newIdem("tok-1"), 1500*time.Millisecond); err != nil {
		t.Fatal(err)
	}
	waitGone(t, s, "s", 4*time.Second)
	if _, err := s.GetIdempotency(ctx, "r"); err != nil {
		t.Errorf("record replaced with a 1h TTL expired: %v", err)
	}
}

func testIdempotencyConcurrentReserve(t *testing.T, s Store) {
	const n = 50
	var (
		wg      sync.WaitGroup
		mu      sync.Mutex
		winners []string
		seen    []string
	)
	start := make(chan struct{})
	for i := range n {
		wg.Go(func() {
			token := fmt.Sprintf("tok-%02d", i)
			<-start
			existing, err := s.ReserveIdempotency(context.Background(), "race", newIdem(token), time.Hour)
			mu.Lock()
			defer mu.Unlock()
			switch {
			case err != nil:
				t.Errorf("Reserve %s: %v", token, err)
			case existing == nil:
				winners = append(winners, token)
			default:
				seen = append(seen, existing.Token)
			}
		})
	}
	close(start)
	wg.Wait()

	if len(winners) != 1 {
		t.Fatalf("%d reservations won (%v), want exactly 1", len(winners), winners)
	}
	for _, tok := range seen {
		if tok != winners[0] {
			t.Errorf("a loser saw token %s, the winner was %s", tok, winners[0])
		}
	}
	got, err := s.GetIdempotency(ctxT(t), "race")
	if err != nil {
		t.Fatal(err)
	}
	if got.Token != winners[0] {
		t.Errorf("stored token %s, winner %s", got.Token, winners[0])
	}
}
