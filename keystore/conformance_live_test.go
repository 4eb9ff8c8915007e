package keystore

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"
)

// This file is the part of the conformance suite that covers the live-key
// index: CreateLimited and CountLive.

// countLive asserts owner's CountLive at now.
func countLive(t testing.TB, s Store, owner string, now time.Time, want int) {
	t.Helper()
	n, err := s.CountLive(context.Background(), owner, now)
	if err != nil {
		t.Fatalf("CountLive(%q): %v", owner, err)
	}
	if n != want {
		t.Errorf("CountLive(%q) = %d, want %d", owner, n, want)
	}
}

// testCreateLimitedConcurrent: parallel creates for one owner never leave
// more live keys than the limit, and every refusal is ErrLimitReached.
func testCreateLimitedConcurrent(t *testing.T, s Store) {
	for _, tc := range []struct{ limit, creates int }{{3, 20}, {10, 200}} {
		t.Run(fmt.Sprintf("%d_of_%d", tc.limit, tc.creates), func(t *testing.T) {
			ctx := ctxT(t)
			owner := fmt.Sprintf("limited-%d", tc.limit)
			now := time.Now()
			var (
				wg      sync.WaitGroup
				mu      sync.Mutex
				ok, lim int
				other   []error
			)
			start := make(chan struct{})
			for range tc.creates {
				k := newKey(t, owner, now)
				wg.Add(1)
				go func() {
					defer wg.Done()
					<-start
					err := s.CreateLimited(ctx, k, tc.limit, now)
					mu.Lock()
					defer mu.Unlock()
					switch {
					case err == nil:
						ok++
					case errors.Is(err, ErrLimitReached):
						lim++
					default:
						other = append(other, err)
					}
				}()
			}
			close(start)
			wg.Wait()
			if len(other) > 0 {
				t.Fatalf("%d creates failed otherwise, first: %v", len(other), other[0])
			}
			if ok != tc.limit || lim != tc.creates-tc.limit {
				t.Errorf("%d created, %d refused; want %d and %d", ok, lim, tc.limit, tc.creates-tc.limit)
			}
			if listed := listAll(t, s, owner, 100); len(listed) != tc.limit {
				t.Errorf("%d keys listed, want %d", len(listed), tc.limit)
			}
			countLive(t, s, owner, now, tc.limit)
		})
	}
}

// testCountLive: revoked, expired and rotated-out keys stop counting (and
// free their place under the limit), other owners are apart, and retried
// or refused creates count nothing.
func testCountLive(t *testing.T, s Store) {
	ctx := ctxT(t)
	now := time.Now().Truncate(time.Millisecond)
	countLive(t, s, "user-1", now, 0)

	var keys []*Key
	for range 3 {
		k := newKey(t, "user-1", now)
		if err := s.CreateLimited(ctx, k, 3, now); err != nil {
			t.Fatal(err)
		}
		keys = append(keys, k)
	}
	never := newKey(t, "user-2", now)
	never.ExpiresAt = nil
	if err := s.CreateLimited(ctx, never, 1, now); err != nil {
		t.Fatal(err)
	}
	countLive(t, s, "user-1", now, 3)
	countLive(t, s, "user-2", now, 1)
	countLive(t, s, "user-", now, 0)
	countLive(t, s, "", now, 0)

	extra := newKey(t, "user-1", now)
	if err := s.CreateLimited(ctx, extra, 3, now); !errors.Is(err, ErrLimitReached) {
		t.Fatalf("fourth key under limit 3: %v, want ErrLimitReached", err)
	}
	if _, err := s.Get(ctx, extra.ID); !errors.Is(err, ErrNotFound) {
		t.Errorf("a refused key is stored: %v", err)
	}
	// A retried Create of a stored key succeeds whatever the count.
	if err := s.CreateLimited(ctx, keys[0], 3, now); err != nil {
		t.Errorf("retried CreateLimited at the limit: %v", err)
	}
	countLive(t, s, "user-1", now, 3)

	// Revoking frees a place; a retried Create of the revoked key does not
	// count it again.
	if _, err := s.Revoke(ctx, keys[0].ID, now); err != nil {
		t.Fatal(err)
	}
	countLive(t, s, "user-1", now, 2)
	mustCreate(t, s, keys[0])
	countLive(t, s, "user-1", now, 2)

	// A key given an end (a rotation's grace period) counts until then.
	graceEnd := now.Add(time.Hour)
	if _, err := s.Update(ctx, keys[1].ID, func(k *Key) error { k.ExpiresAt = &graceEnd; return nil }); err != nil {
		t.Fatal(err)
	}
	countLive(t, s, "user-1", now, 2)
	countLive(t, s, "user-1", graceEnd.Add(-time.Millisecond), 2)
	countLive(t, s, "user-1", graceEnd, 1)
	// Expiry needs no write: past their end keys stop counting.
	countLive(t, s, "user-1", now.Add(91*24*time.Hour), 0)
	if err := s.CreateLimited(ctx, extra, 2, graceEnd); err != nil {
		t.Fatalf("create after a key's grace ended: %v", err)
	}
	countLive(t, s, "user-1", graceEnd, 2)

	// A key created already expired never counts.
	past := now.Add(-time.Minute)
	dead := newKey(t, "user-3", now.Add(-time.Hour))
	dead.ExpiresAt = &past
	if err := s.CreateLimited(ctx, dead, 1, now); err != nil {
		t.Fatal(err)
	}
	countLive(t, s, "user-3", now, 0)

	// A conflicting Create counts nothing.
	taken := newKey(t, "user-2", now)
	taken.ID = never.ID
	if err := s.CreateLimited(ctx, taken, 5, now); !errors.Is(err, ErrConflict) {
		t.Fatalf("Create with a taken ID: %v", err)
	}
	countLive(t, s, "user-2", now, 1)
	if err := s.CreateLimited(ctx, newKey(t, "user-2", now), -1, now); err == nil || errors.Is(err, ErrLimitReached) {
		t.Errorf("negative limit: %v, want an argument error", err)
	}
}
