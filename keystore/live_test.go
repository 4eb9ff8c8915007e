package keystore

import (
	"errors"
	"path/filepath"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	bolt "go.etcd.io/bbolt"

	"github.com/caddy-apikeys/caddy-apikeys/internal/testredis"
)

// TestBoltLiveIndexBackfill opens a file written before the live-key index
// existed, or changed by such code after it was built: NewBolt rebuilds the
// index from the keys there, so the limit holds for keys older versions
// wrote.
func TestBoltLiveIndexBackfill(t *testing.T) {
	ctx := ctxT(t)
	path := filepath.Join(t.TempDir(), "keys.db")
	s, err := NewBolt(BoltOptions{Path: path})
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	live, revoked := newKey(t, "old", now), newKey(t, "old", now)
	expired := newKey(t, "old", now.Add(-time.Hour))
	past := now.Add(-time.Minute)
	expired.ExpiresAt = &past
	for _, k := range []*Key{live, revoked, expired} {
		mustCreate(t, s, k)
	}
	if _, err := s.Revoke(ctx, revoked.ID, now); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	for _, tc := range []struct {
		name  string
		spoil func(tx *bolt.Tx) error
	}{
		{"file without the index", func(tx *bolt.Tx) error {
			if err := tx.DeleteBucket(bucketLive); err != nil {
				return err
			}
			return tx.DeleteBucket(bucketLiveCount)
		}},
		// Older code wrote keys (or revoked one) after the index was built.
		{"index behind the records", func(tx *bolt.Tx) error {
			if err := tx.Bucket(bucketLive).Delete(liveEntryKey(live)); err != nil {
				return err
			}
			revokedEntry := *revoked
			revokedEntry.RevokedAt = nil
			return tx.Bucket(bucketLive).Put(liveEntryKey(&revokedEntry), nil)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			db, err := bolt.Open(path, 0o600, nil)
			if err != nil {
				t.Fatal(err)
			}
			err = db.Update(tc.spoil)
			if cerr := db.Close(); err != nil || cerr != nil {
				t.Fatal(err, cerr)
			}
			s, err := NewBolt(BoltOptions{Path: path})
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			countLive(t, s, "old", now, 1)
			if err := s.CreateLimited(ctx, newKey(t, "old", now), 1, now); !errors.Is(err, ErrLimitReached) {
				t.Errorf("CreateLimited over an older key: %v, want ErrLimitReached", err)
			}
		})
	}
}

// TestBoltSweepPrunesLiveIndex: the sweeper removes the entries of keys
// that ended, and CountLive agrees before and after.
func TestBoltSweepPrunesLiveIndex(t *testing.T) {
	clock := &testClock{}
	s := newBoltStoreClock(t, time.Hour, clock)
	now := clock.Now()
	k := newKey(t, "u", now)
	end := now.Add(time.Minute)
	k.ExpiresAt = &end
	mustCreate(t, s, k)
	countLive(t, s, "u", now, 1)
	countLive(t, s, "u", end, 0)
	if err := s.sweepOnce(end); err != nil {
		t.Fatal(err)
	}
	countLive(t, s, "u", end, 0)
	countLive(t, s, "u", now, 0) // the entry is gone, not just skipped
	var entries int
	_ = s.db.View(func(tx *bolt.Tx) error {
		entries = tx.Bucket(bucketLive).Stats().KeyN + tx.Bucket(bucketLiveCount).Stats().KeyN
		return nil
	})
	if entries != 0 {
		t.Errorf("%d live-index entries left after the sweep", entries)
	}
}

// TestRedisLiveIndexBackfill: an owner whose keys were written before the
// live-key index existed has it built on first use, from its listed keys.
func TestRedisLiveIndexBackfill(t *testing.T) {
	srv := testredis.Start(t)
	rdb := srv.Client(t)
	s := newRedisStore(t, srv, RedisOptions{Namespace: "bf"})
	ctx := ctxT(t)
	now := time.Now()
	live, revoked := newKey(t, "old", now), newKey(t, "old", now)
	mustCreate(t, s, live)
	mustCreate(t, s, revoked)
	if _, err := s.Revoke(ctx, revoked.ID, now); err != nil {
		t.Fatal(err)
	}
	liveKey := "bf:live:{" + ownerHash("old") + "}"
	if n := rdb.Exists(ctx, liveKey, liveKey+":ready").Val(); n != 2 {
		t.Fatalf("live index keys: %d of 2 exist", n)
	}
	if err := rdb.Del(ctx, liveKey, liveKey+":ready").Err(); err != nil {
		t.Fatal(err)
	}

	countLive(t, s, "old", now, 1)
	if err := s.CreateLimited(ctx, newKey(t, "old", now), 1, now); !errors.Is(err, ErrLimitReached) {
		t.Errorf("CreateLimited over an older key: %v, want ErrLimitReached", err)
	}
	if err := rdb.Del(ctx, liveKey+":ready").Err(); err != nil {
		t.Fatal(err)
	}
	if err := s.CreateLimited(ctx, newKey(t, "old", now), 2, now); err != nil {
		t.Errorf("CreateLimited under the limit: %v", err)
	}
	countLive(t, s, "old", now, 2)
}

// TestRedisInterruptedCreateHoldsPlaceBriefly: a Create that fails after
// reserving its place under the limit (here its next write fails) holds
// that place for livePending only, and a finished Create holds it until the
// key's end.
func TestRedisInterruptedCreateHoldsPlaceBriefly(t *testing.T) {
	srv := testredis.Start(t)
	rdb := redis.NewClient(&redis.Options{Addr: srv.Addr()})
	defer rdb.Close()
	hook := &failNth{n: 0} // the id key's SET, right after the reservation
	rdb.AddHook(hook)
	s := NewRedisFromClient(rdb, "pending")
	ctx := ctxT(t)
	now := time.Now()

	k := newKey(t, "u", now)
	if err := s.CreateLimited(ctx, k, 1, now); err == nil || errors.Is(err, ErrLimitReached) {
		t.Fatalf("CreateLimited with a failing write: %v", err)
	}
	countLive(t, s, "u", now, 1)
	if err := s.CreateLimited(ctx, newKey(t, "u", now), 1, now); !errors.Is(err, ErrLimitReached) {
		t.Errorf("while the failed Create's place is pending: %v, want ErrLimitReached", err)
	}
	later := now.Add(livePending)
	countLive(t, s, "u", later, 0)
	done := newKey(t, "u", later)
	if err := s.CreateLimited(ctx, done, 1, later); err != nil {
		t.Fatalf("after the pending place lapsed: %v", err)
	}
	countLive(t, s, "u", later.Add(2*livePending), 1)
	score, err := rdb.ZScore(ctx, "pending:live:{"+ownerHash("u")+"}", done.ID).Result()
	if err != nil || int64(score) != done.ExpiresAt.UnixMilli() {
		t.Errorf("confirmed score %v, %v; want the key's end %d", score, err, done.ExpiresAt.UnixMilli())
	}
}
