package keystore

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"
)

// readCounter is a Store that counts the key records its List and Get
// calls hand back: what a caller made the store read.
type readCounter struct {
	Store
	records atomic.Int64
	calls   atomic.Int64
}

func (r *readCounter) List(ctx context.Context, owner, cursor string, limit int) ([]*Key, string, error) {
	r.calls.Add(1)
	keys, next, err := r.Store.List(ctx, owner, cursor, limit)
	r.records.Add(int64(len(keys)))
	return keys, next, err
}

func (r *readCounter) Get(ctx context.Context, id string) (*Key, error) {
	r.calls.Add(1)
	r.records.Add(1)
	return r.Store.Get(ctx, id)
}

// storeHistory stores n keys of owner, created before created and revoked,
// as fast as the store allows: in one transaction on bbolt (each Create
// there is an fsync), else with parallel Creates.
func storeHistory(t *testing.T, s Store, owner string, n int, created time.Time) {
	t.Helper()
	revoked := created.Add(-time.Minute)
	keys := make([]*Key, n)
	for i := range keys {
		k := newKey(t, owner, created.Add(-time.Duration(n-i)*time.Millisecond-time.Hour))
		k.ExpiresAt, k.RevokedAt, k.Replaces, k.ReplacedBy = nil, &revoked, "", ""
		keys[i] = k
	}
	inner := s
	if c, ok := s.(*CachedStore); ok {
		inner = c.Inner()
	}
	if b, ok := inner.(*BoltStore); ok {
		err := b.db.Update(func(tx *bolt.Tx) error {
			for _, k := range keys {
				rec, err := encodeKey(k)
				if err != nil {
					return err
				}
				if err := tx.Bucket(bucketIDs).Put([]byte(k.ID), k.Digest[:]); err != nil {
					return err
				}
				if err := tx.Bucket(bucketOwners).Put(ownerIndexKey(k.Owner, indexMember(k)), nil); err != nil {
					return err
				}
				if err := tx.Bucket(bucketKeys).Put(k.Digest[:], rec); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		return
	}
	var wg sync.WaitGroup
	for w := range 16 {
		wg.Go(func() {
			for i := w; i < n; i += 16 {
				if err := s.Create(context.Background(), keys[i]); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
}

// testListFilteredBounded: listing an owner's keys by status reads a
// bounded number of records per call, whatever the owner's history, and
// paging on with the cursors it hands out still finds every match, once.
func testListFilteredBounded(t *testing.T, s Store) {
	const history = 2000
	ctx := ctxT(t)
	now := time.Now()
	// Newest first: a rotating key, the history, then an old rotating key.
	old := newKey(t, "user-1", now.Add(-48*time.Hour))
	old.RevokedAt, old.ExpiresAt, old.ReplacedBy = nil, nil, "key_next1"
	mustCreate(t, s, old)
	storeHistory(t, s, "user-1", history, now)
	fresh := newKey(t, "user-1", now)
	fresh.RevokedAt, fresh.ExpiresAt, fresh.ReplacedBy = nil, nil, "key_next2"
	mustCreate(t, s, fresh)

	rc := &readCounter{Store: s}
	rotating := func(k *Key) bool { return k.Status(now) == StatusRotating }
	var found []string
	cursor, pages := "", 0
	for {
		before := rc.records.Load()
		keys, next, err := ListFiltered(ctx, rc, "user-1", cursor, 1, 0, rotating)
		if err != nil {
			t.Fatal(err)
		}
		pages++
		if read := rc.records.Load() - before; read > DefaultListScan+1 {
			t.Fatalf("page %d: read %d records, want at most %d", pages, read, DefaultListScan+1)
		}
		found = append(found, ids(keys)...)
		if next == "" {
			break
		}
		if pages > history {
			t.Fatal("the cursors never end")
		}
		cursor = next
	}
	if want := []string{fresh.ID, old.ID}; len(found) != 2 || found[0] != want[0] || found[1] != want[1] {
		t.Errorf("rotating keys found %v, want %v", found, want)
	}
	if min, max := (history+2)/(DefaultListScan+1), (history+2)/DefaultListScan+3; pages < min || pages > max {
		t.Errorf("%d pages, want %d..%d", pages, min, max)
	}

	// The first page: the newest rotating key, found at once.
	keys, next, err := ListFiltered(ctx, s, "user-1", "", 1, 0, rotating)
	if err != nil || len(keys) != 1 || keys[0].ID != fresh.ID || next == "" {
		t.Errorf("first page: %v, %q, %v", ids(keys), next, err)
	}
	// A full page ends the call before the budget does.
	before := rc.records.Load()
	if keys, _, err := ListFiltered(ctx, rc, "user-1", "", 5, 0, func(*Key) bool { return true }); err != nil || len(keys) != 5 {
		t.Errorf("unfiltered page of 5: %d keys, %v", len(keys), err)
	}
	if read := rc.records.Load() - before; read > DefaultListScan+1 {
		t.Errorf("unfiltered page of 5 read %d records", read)
	}
}

// testCanceledContext: every call with a context that has ended fails
// with the context's error and changes nothing.
func testCanceledContext(t *testing.T, s Store) {
	k := newKey(t, "user-1", time.Now())
	mustCreate(t, s, k)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	other := newKey(t, "user-1", time.Now())
	rec := &IdempotencyRecord{Token: "t", Fingerprint: "f", State: IdempotencyPending, LockedUntil: time.Now()}
	calls := map[string]func() error{
		"Create":        func() error { return s.Create(ctx, other) },
		"CreateLimited": func() error { return s.CreateLimited(ctx, other, 10, time.Now()) },
		"CountLive":     func() error { _, err := s.CountLive(ctx, "user-1", time.Now()); return err },
		"ByDigest":      func() error { _, err := s.ByDigest(ctx, k.Digest); return err },
		"Get":           func() error { _, err := s.Get(ctx, k.ID); return err },
		"List":          func() error { _, _, err := s.List(ctx, "user-1", "", 10); return err },
		"ListFiltered": func() error {
			_, _, err := ListFiltered(ctx, s, "user-1", "", 10, 0, func(*Key) bool { return true })
			return err
		},
		"Revoke":             func() error { _, err := s.Revoke(ctx, k.ID, time.Now()); return err },
		"Update":             func() error { _, err := s.Update(ctx, k.ID, func(*Key) error { return nil }); return err },
		"RecordUsage":        func() error { return s.RecordUsage(ctx, map[string]time.Time{k.ID: time.Now()}) },
		"CountOwner":         func() error { _, err := s.CountOwner(ctx, "user-1"); return err },
		"ReserveIdempotency": func() error { _, err := s.ReserveIdempotency(ctx, "i", rec, time.Minute); return err },
		"GetIdempotency":     func() error { _, err := s.GetIdempotency(ctx, "i"); return err },
		"ReplaceIdempotency": func() error { return s.ReplaceIdempotency(ctx, "i", "t", rec, time.Minute) },
		"DeleteIdempotency":  func() error { return s.DeleteIdempotency(ctx, "i", "t") },
		"Ping":               func() error { return s.Ping(ctx) },
	}
	for name, call := range calls {
		if err := call(); !errors.Is(err, context.Canceled) {
			t.Errorf("%s with a cancelled context: %v, want context.Canceled", name, err)
		}
	}
	live := ctxT(t)
	if _, err := s.Get(live, other.ID); !errors.Is(err, ErrNotFound) {
		t.Errorf("Create with a cancelled context stored the key: %v", err)
	}
	if got := getKey(t, s, k.ID); got.RevokedAt != nil || got.LastUsedAt != nil {
		t.Errorf("calls with a cancelled context changed the key: %+v", got)
	}
	if _, err := s.GetIdempotency(live, "i"); !errors.Is(err, ErrNotFound) {
		t.Errorf("ReserveIdempotency with a cancelled context stored a record: %v", err)
	}
}
