package ratelimit

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"time"

	bolt "go.etcd.io/bbolt"
)

// The file store keeps, in the bbolt file of the keys, a bucket
// "ratelimit" with two buckets:
//
//	quota  subject -> period kind (1 byte) | period start, Unix ns (8) | count (8)
//	daily  subject | 0x00 | day (4, days since 1970 + 2^31) -> accepted | rate limited | quota exceeded (8 each)
//
// All integers big-endian. A Limiter writes both in one transaction per
// sync; a day's counts older than HistoryDays are deleted when the subject
// is first counted on a later day.
var (
	bucketRatelimit = []byte("ratelimit")
	bucketQuota     = []byte("quota")
	bucketDaily     = []byte("daily")
)

// BoltBackend is the Backend of the file store: one instance, so rate
// limits are decided locally and exactly; quota and daily counts persist
// in the bbolt file. Create it with NewBoltBackend.
type BoltBackend struct {
	db *bolt.DB
}

var _ Backend = (*BoltBackend)(nil)

// NewBoltBackend returns a Backend on db, the open bbolt file of the key
// store (see keystore.BoltStore.DB), creating its buckets. The caller
// keeps ownership of db.
func NewBoltBackend(db *bolt.DB) (*BoltBackend, error) {
	err := db.Update(func(tx *bolt.Tx) error {
		b, err := tx.CreateBucketIfNotExists(bucketRatelimit)
		if err != nil {
			return err
		}
		if _, err := b.CreateBucketIfNotExists(bucketQuota); err != nil {
			return err
		}
		_, err = b.CreateBucketIfNotExists(bucketDaily)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("ratelimit: create buckets: %w", err)
	}
	return &BoltBackend{db: db}, nil
}

// Shared implements Backend: false.
func (*BoltBackend) Shared() bool { return false }

func dailyKey(subject string, day int32) []byte {
	k := make([]byte, len(subject)+5)
	copy(k, subject)
	binary.BigEndian.PutUint32(k[len(subject)+1:], uint32(int64(day)+1<<31))
	return k
}

func keyDay(k []byte) int32 { return int32(int64(binary.BigEndian.Uint32(k[len(k)-4:])) - 1<<31) }

func (b *BoltBackend) buckets(tx *bolt.Tx) (quota, daily *bolt.Bucket, err error) {
	rl := tx.Bucket(bucketRatelimit)
	if rl == nil {
		return nil, nil, errors.New("ratelimit: bucket missing")
	}
	return rl.Bucket(bucketQuota), rl.Bucket(bucketDaily), nil
}

// sync implements Backend: it adds the counts in one write transaction.
func (b *BoltBackend) sync(ctx context.Context, _ int64, items []syncItem, hist []histDelta) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	return b.db.Update(func(tx *bolt.Tx) error {
		quota, daily, err := b.buckets(tx)
		if err != nil {
			return err
		}
		var v [17]byte
		for k := range items {
			it := &items[k]
			if !it.quota {
				continue
			}
			n := it.qAdd
			if cur := quota.Get([]byte(it.subject)); len(cur) == 17 && Period(cur[0]) == it.period && int64(binary.BigEndian.Uint64(cur[1:])) == it.qStart {
				n += int64(binary.BigEndian.Uint64(cur[9:]))
			}
			v[0] = byte(it.period)
			binary.BigEndian.PutUint64(v[1:], uint64(it.qStart))
			binary.BigEndian.PutUint64(v[9:], uint64(n))
			if err := quota.Put([]byte(it.subject), v[:]); err != nil {
				return err
			}
			it.count = n
		}
		for _, h := range hist {
			key := dailyKey(h.subject, h.day)
			var c [24]byte
			cur := daily.Get(key)
			if len(cur) == 24 {
				copy(c[:], cur)
			} else if err := pruneDaily(daily, h.subject, h.day-HistoryDays); err != nil {
				return err
			}
			put := func(off int, add int64) {
				binary.BigEndian.PutUint64(c[off:], binary.BigEndian.Uint64(c[off:])+uint64(add))
			}
			put(0, h.accepted)
			put(8, h.limited)
			put(16, h.refused)
			if err := daily.Put(key, c[:]); err != nil {
				return err
			}
		}
		return nil
	})
}

// pruneDaily deletes subject's days before cutoff.
func pruneDaily(daily *bolt.Bucket, subject string, cutoff int32) error {
	prefix := dailyKey(subject, 0)[:len(subject)+1]
	c := daily.Cursor()
	for k, _ := c.Seek(prefix); k != nil && bytes.HasPrefix(k, prefix) && len(k) == len(prefix)+4 && keyDay(k) < cutoff; k, _ = c.Seek(prefix) {
		if err := c.Delete(); err != nil {
			return err
		}
	}
	return nil
}

// quotaCount implements Backend.
func (b *BoltBackend) quotaCount(ctx context.Context, subject string, p Period, start int64) (int64, error) {
	if err := ctx.Err(); err != nil {
		return 0, err
	}
	var n int64
	err := b.db.View(func(tx *bolt.Tx) error {
		quota, _, err := b.buckets(tx)
		if err != nil {
			return err
		}
		if cur := quota.Get([]byte(subject)); len(cur) == 17 && Period(cur[0]) == p && int64(binary.BigEndian.Uint64(cur[1:])) == start {
			n = int64(binary.BigEndian.Uint64(cur[9:]))
		}
		return nil
	})
	return n, err
}

// History implements Backend.
func (b *BoltBackend) History(ctx context.Context, subject string, from, to time.Time) ([]DayCount, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	first, last := dayOf(from.UnixNano()), dayOf(to.UnixNano())
	out := emptyHistory(first, last)
	err := b.db.View(func(tx *bolt.Tx) error {
		_, daily, err := b.buckets(tx)
		if err != nil {
			return err
		}
		end := dailyKey(subject, last)
		c := daily.Cursor()
		for k, v := c.Seek(dailyKey(subject, first)); k != nil && bytes.Compare(k, end) <= 0; k, v = c.Next() {
			if len(k) != len(end) || !bytes.HasPrefix(k, end[:len(subject)+1]) || len(v) != 24 {
				continue
			}
			d := &out[keyDay(k)-first]
			d.Accepted = int64(binary.BigEndian.Uint64(v))
			d.RateLimited = int64(binary.BigEndian.Uint64(v[8:]))
			d.QuotaExceeded = int64(binary.BigEndian.Uint64(v[16:]))
		}
		return nil
	})
	return out, err
}
