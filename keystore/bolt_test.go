package keystore

import (
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"
)

// newBoltStore opens a BoltStore in a fresh temporary directory.
func newBoltStore(t *testing.T) *BoltStore {
	t.Helper()
	s, err := NewBolt(BoltOptions{Path: filepath.Join(t.TempDir(), "keys.db")})
	if err != nil {
		t.Fatalf("NewBolt: %v", err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s
}

// testClock is a clock that a test moves forward.
type testClock struct {
	mu     sync.Mutex
	offset time.Duration
}

// Now returns the wall-clock time plus the offset the test has added.
func (c *testClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return time.Now().Add(c.offset)
}

// AdvanceTo moves the clock forward to at least t.
func (c *testClock) AdvanceTo(t time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if d := time.Until(t); d > c.offset {
		c.offset = d
	}
}

// newBoltStoreClock opens a BoltStore with the given retention on clock,
// whose sweeper does not run by itself during a test (call sweepOnce).
func newBoltStoreClock(t *testing.T, retention time.Duration, clock *testClock) *BoltStore {
	t.Helper()
	s, err := newBolt(BoltOptions{Path: filepath.Join(t.TempDir(), "keys.db"), Retention: retention}, time.Hour, clock.Now)
	if err != nil {
		t.Fatalf("newBolt: %v", err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s
}

func TestBoltConformance(t *testing.T) {
	runConformance(t, backend{
		newStore: func(t *testing.T) Store { return newBoltStore(t) },
		newRetentionStore: func(t *testing.T) (Store, func(time.Time)) {
			const retention = 24 * time.Hour
			clock := &testClock{}
			s := newBoltStoreClock(t, retention, clock)
			return s, func(end time.Time) {
				clock.AdvanceTo(end.Add(retention))
				if err := s.sweepOnce(clock.Now()); err != nil {
					t.Fatalf("sweep: %v", err)
				}
			}
		},
		open: func(t *testing.T, retention time.Duration) (Store, error) {
			s, err := NewBolt(BoltOptions{Path: filepath.Join(t.TempDir(), "keys.db"), Retention: retention})
			if err != nil {
				return nil, err
			}
			return s, nil
		},
	})
}

func TestBoltPersistsAcrossReopen(t *testing.T) {
	path := filepath.Join(t.TempDir(), "nested", "dir", "keys.db")
	s, err := NewBolt(BoltOptions{Path: path})
	if err != nil {
		t.Fatal(err)
	}
	k := newKey(t, "user-1", time.Now())
	mustCreate(t, s, k)
	revoked, err := s.Revoke(ctxT(t), k.ID, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.ReserveIdempotency(ctxT(t), "idem", newIdem("tok"), time.Hour); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}

	if runtime.GOOS != "windows" {
		for p, want := range map[string]os.FileMode{path: 0o600, filepath.Dir(path): 0o700, filepath.Dir(filepath.Dir(path)): 0o700} {
			fi, err := os.Stat(p)
			if err != nil {
				t.Fatal(err)
			}
			if got := fi.Mode().Perm(); got != want {
				t.Errorf("%s has mode %o, want %o", p, got, want)
			}
		}
	}

	s, err = NewBolt(BoltOptions{Path: path})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	got, err := s.Get(ctxT(t), k.ID)
	if err != nil {
		t.Fatal(err)
	}
	assertKey(t, revoked, got)
	if listed := listAll(t, s, "user-1", 1); len(listed) != 1 || listed[0] != k.ID {
		t.Errorf("listed %v after reopen", listed)
	}
	if _, err := s.GetIdempotency(ctxT(t), "idem"); err != nil {
		t.Errorf("idempotency record lost: %v", err)
	}
}

func TestBoltLockTimeout(t *testing.T) {
	path := filepath.Join(t.TempDir(), "keys.db")
	first, err := NewBolt(BoltOptions{Path: path})
	if err != nil {
		t.Fatal(err)
	}
	defer first.Close()

	start := time.Now()
	second, err := NewBolt(BoltOptions{Path: path, Timeout: 200 * time.Millisecond})
	if err == nil {
		second.Close()
		t.Fatal("opened a locked file")
	}
	if elapsed := time.Since(start); elapsed > 2*time.Second {
		t.Errorf("waited %s for a 200ms lock timeout", elapsed)
	}
	t.Logf("locked: %v", err)
}

func TestBoltRejectsOtherFormat(t *testing.T) {
	path := filepath.Join(t.TempDir(), "keys.db")
	db, err := bolt.Open(path, 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := db.Update(func(tx *bolt.Tx) error {
		b, err := tx.CreateBucket(bucketMeta)
		if err != nil {
			return err
		}
		return b.Put(metaVersion, []byte("99"))
	}); err != nil {
		t.Fatal(err)
	}
	db.Close()
	if s, err := NewBolt(BoltOptions{Path: path}); err == nil {
		s.Close()
		t.Fatal("opened a file of another format version")
	}
	if _, err := NewBolt(BoltOptions{}); err == nil {
		t.Fatal("opened an empty path")
	}
}

func TestBoltSweeper(t *testing.T) {
	s, err := newBolt(BoltOptions{Path: filepath.Join(t.TempDir(), "keys.db")}, 20*time.Millisecond, time.Now)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	ctx := ctxT(t)
	if _, err := s.ReserveIdempotency(ctx, "short", newIdem("t"), 10*time.Millisecond); err != nil {
		t.Fatal(err)
	}
	if _, err := s.ReserveIdempotency(ctx, "long", newIdem("t"), time.Hour); err != nil {
		t.Fatal(err)
	}
	count := func() (n int) {
		_ = s.db.View(func(tx *bolt.Tx) error {
			return tx.Bucket(bucketIdempotency).ForEach(func(_, _ []byte) error {
				n++
				return nil
			})
		})
		return n
	}
	deadline := time.Now().Add(3 * time.Second)
	for count() != 1 {
		if time.Now().After(deadline) {
			t.Fatalf("sweeper left %d records, want 1", count())
		}
		time.Sleep(10 * time.Millisecond)
	}
	if _, err := s.GetIdempotency(ctx, "long"); err != nil {
		t.Errorf("sweeper deleted a live record: %v", err)
	}
}

func TestBoltClosed(t *testing.T) {
	s := newBoltStore(t)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	exerciseUnavailable(t, s, time.Second)
}

// TestBoltSweeperRetention checks that the background sweeper deletes a key
// past its retention from every bucket, and nothing else.
func TestBoltSweeperRetention(t *testing.T) {
	const retention = time.Hour
	clock := &testClock{}
	s, err := newBolt(BoltOptions{Path: filepath.Join(t.TempDir(), "keys.db"), Retention: retention}, 20*time.Millisecond, clock.Now)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	ctx := ctxT(t)

	now := time.Now()
	gone := newKey(t, "user-1", now.Add(-time.Hour))
	revokedAt := now.Add(-time.Minute)
	gone.RevokedAt = &revokedAt // created revoked: its end is RevokedAt
	kept := newKey(t, "user-1", now)
	mustCreate(t, s, gone)
	mustCreate(t, s, kept)
	if err := s.RecordUsage(ctx, map[string]time.Time{gone.ID: now, kept.ID: now}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.ReserveIdempotency(ctx, "idem", newIdem("t"), 10*retention); err != nil {
		t.Fatal(err)
	}

	// counts returns the number of entries in each bucket.
	counts := func() map[string]int {
		out := map[string]int{}
		_ = s.db.View(func(tx *bolt.Tx) error {
			for _, name := range [][]byte{bucketKeys, bucketIDs, bucketOwners, bucketUsed, bucketIdempotency} {
				n := 0
				_ = tx.Bucket(name).ForEach(func(_, _ []byte) error { n++; return nil })
				out[string(name)] = n
			}
			return nil
		})
		return out
	}
	time.Sleep(100 * time.Millisecond) // a few sweeps before the retention passes
	if c := counts(); c["keys"] != 2 || c["ids"] != 2 || c["owners"] != 2 || c["used"] != 2 {
		t.Fatalf("swept before the retention passed: %v", c)
	}

	clock.AdvanceTo(revokedAt.Add(retention))
	deadline := time.Now().Add(3 * time.Second)
	for {
		c := counts()
		if c["keys"] == 1 && c["ids"] == 1 && c["owners"] == 1 && c["used"] == 1 && c["idempotency"] == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after the retention: %v, want one of each", c)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if _, err := s.Get(ctx, gone.ID); err == nil {
		t.Error("swept key still found")
	}
	if got := getKey(t, s, kept.ID); got.LastUsedAt == nil {
		t.Error("kept key lost its last-used time")
	}
}
