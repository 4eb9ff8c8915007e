package keystore

// This file holds the bbolt store's live-key index (see live.go):
//
//	live       "<sha256 owner hex>/<end, 16 digits or 9…9>:<key ID>" -> empty
//	livecount  "<sha256 owner hex>"                                  -> 8-byte big-endian count of the owner's live entries
//
// Entries sort by owner, then end, so the entries that ended by a given time
// are the first ones of the owner's range. Every change of an entry changes
// the count in the same transaction, so the count is exact; CountLive
// subtracts the entries that ended but were not pruned yet (the sweeper
// prunes them every minute, CreateLimited before it counts). NewBolt
// rebuilds the index from the key records at every open.

import (
	"bytes"
	"context"
	"crypto/subtle"
	"encoding/binary"
	"time"

	bolt "go.etcd.io/bbolt"
)

var (
	bucketLive      = []byte("live")
	bucketLiveCount = []byte("livecount")
)

// liveEntryKey returns the live-bucket key of k.
func liveEntryKey(k *Key) []byte {
	return []byte(ownerHash(k.Owner) + "/" + liveEnd(k) + ":" + k.ID)
}

// addLiveCount adds delta to owner hash oh's live count inside tx.
func addLiveCount(tx *bolt.Tx, oh []byte, delta int64) error {
	b := tx.Bucket(bucketLiveCount)
	n := int64(0)
	if v := b.Get(oh); len(v) == 8 {
		n = int64(binary.BigEndian.Uint64(v))
	}
	n += delta
	if n <= 0 {
		return b.Delete(oh)
	}
	v := make([]byte, 8)
	binary.BigEndian.PutUint64(v, uint64(n))
	return b.Put(oh, v)
}

// liveCount returns owner hash oh's live count inside tx.
func liveCount(tx *bolt.Tx, oh []byte) int64 {
	if v := tx.Bucket(bucketLiveCount).Get(oh); len(v) == 8 {
		return int64(binary.BigEndian.Uint64(v))
	}
	return 0
}

// addLive puts k's live entry inside tx, if it is not there yet.
func addLive(tx *bolt.Tx, k *Key) error {
	b, key := tx.Bucket(bucketLive), liveEntryKey(k)
	if b.Get(key) != nil {
		return nil
	}
	if err := b.Put(key, nil); err != nil {
		return err
	}
	return addLiveCount(tx, []byte(ownerHash(k.Owner)), 1)
}

// deleteLive removes k's live entry inside tx, if it is there.
func deleteLive(tx *bolt.Tx, k *Key) error {
	b, key := tx.Bucket(bucketLive), liveEntryKey(k)
	if b.Get(key) == nil {
		return nil
	}
	if err := b.Delete(key); err != nil {
		return err
	}
	return addLiveCount(tx, []byte(ownerHash(k.Owner)), -1)
}

// endedLive returns the live entries of owner hash oh whose end is at or
// before now, the first ones of its range.
func endedLive(tx *bolt.Tx, oh string, now time.Time) [][]byte {
	prefix := []byte(oh + "/")
	limit := []byte(oh + "/" + padMillis(nowMillis(now)) + ";") // ';' sorts right after ':'
	var out [][]byte
	c := tx.Bucket(bucketLive).Cursor()
	for k, _ := c.Seek(prefix); k != nil && bytes.HasPrefix(k, prefix) && bytes.Compare(k, limit) < 0; k, _ = c.Next() {
		out = append(out, bytes.Clone(k))
	}
	return out
}

// allEndedLive returns the live entries of every owner whose end is at or
// before now.
func allEndedLive(tx *bolt.Tx, now time.Time) ([][]byte, error) {
	nowEnd := padMillis(nowMillis(now))
	var ended [][]byte
	err := tx.Bucket(bucketLive).ForEach(func(k, _ []byte) error {
		if i := bytes.IndexByte(k, '/'); i >= 0 && len(k) > i+msDigits && string(k[i+1:i+1+msDigits]) <= nowEnd {
			ended = append(ended, bytes.Clone(k))
		}
		return nil
	})
	return ended, err
}

// pruneLive removes the given entries (found by endedLive or allEndedLive)
// from the live index inside tx, those that are still there.
func pruneLive(tx *bolt.Tx, ended [][]byte) error {
	b := tx.Bucket(bucketLive)
	for _, k := range ended {
		if b.Get(k) == nil {
			continue
		}
		if err := b.Delete(k); err != nil {
			return err
		}
		oh, _, _ := bytes.Cut(k, []byte("/"))
		if err := addLiveCount(tx, oh, -1); err != nil {
			return err
		}
	}
	return nil
}

// rebuildLive builds the live index afresh from the keys bucket.
func rebuildLive(tx *bolt.Tx, now time.Time) error {
	for _, name := range [][]byte{bucketLive, bucketLiveCount} {
		if tx.Bucket(name) != nil {
			if err := tx.DeleteBucket(name); err != nil {
				return err
			}
		}
		if _, err := tx.CreateBucket(name); err != nil {
			return err
		}
	}
	return tx.Bucket(bucketKeys).ForEach(func(_, v []byte) error {
		k, err := decodeKey(v)
		if err != nil || !k.Active(now) {
			return nil // left alone, as the sweeper does
		}
		return addLive(tx, k)
	})
}

// CreateLimited implements [Store.CreateLimited] in one transaction: prune
// the owner's ended entries, compare the count with limit, store.
func (s *BoltStore) CreateLimited(ctx context.Context, k *Key, limit int, now time.Time) error {
	if err := ctx.Err(); err != nil {
		return boltErr("create key", err)
	}
	record, err := checkCreate(k, limit)
	if err != nil {
		return err
	}
	err = s.db.Update(func(tx *bolt.Tx) error {
		keys, ids := tx.Bucket(bucketKeys), tx.Bucket(bucketIDs)
		if cur := ids.Get([]byte(k.ID)); cur != nil && subtle.ConstantTimeCompare(cur, k.Digest[:]) != 1 {
			return ErrConflict
		}
		if cur := keys.Get(k.Digest[:]); cur != nil {
			existing, err := decodeKey(cur)
			if err != nil {
				return err
			}
			if existing.ID != k.ID {
				return ErrConflict
			}
			return nil // already stored: a retried Create
		}
		if limit > 0 {
			oh := ownerHash(k.Owner)
			if err := pruneLive(tx, endedLive(tx, oh, now)); err != nil {
				return err
			}
			if liveCount(tx, []byte(oh)) >= int64(limit) {
				return ErrLimitReached
			}
		}
		if err := ids.Put([]byte(k.ID), k.Digest[:]); err != nil {
			return err
		}
		if err := tx.Bucket(bucketOwners).Put(ownerIndexKey(k.Owner, indexMember(k)), nil); err != nil {
			return err
		}
		if err := addLive(tx, k); err != nil {
			return err
		}
		return keys.Put(k.Digest[:], record)
	})
	return boltErr("create key", err)
}

// CountLive implements [Store.CountLive]: the owner's count less the
// entries that ended but were not pruned yet.
func (s *BoltStore) CountLive(ctx context.Context, owner string, now time.Time) (int, error) {
	if err := ctx.Err(); err != nil {
		return 0, boltErr("count live keys", err)
	}
	var n int64
	err := s.db.View(func(tx *bolt.Tx) error {
		oh := ownerHash(owner)
		n = liveCount(tx, []byte(oh)) - int64(len(endedLive(tx, oh, now)))
		return nil
	})
	if err != nil {
		return 0, boltErr("count live keys", err)
	}
	return int(max(n, 0)), nil
}
