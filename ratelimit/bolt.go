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
//	quotas  subject | 0x00 | period kind (1 byte: 1 day, 2 month) -> period start, Unix ns (8) | count (8)
//	daily   subject | 0x00 | day (4, days since 1970 + 2^31) -> accepted | rate limited | quota exceeded (8 each)
//
// All integers big-endian. A subject has one quota record per period
// kind, holding the count of the latest period written: a key whose plan
// moves between a daily and a monthly quota keeps both counts. A Limiter
// writes both buckets in one transaction per sync; a day's counts older
// than HistoryDays are deleted when the subject is first counted on a
// later day.
//
// Files written before quotas were kept per kind have a bucket "quota"
// (subject -> kind | start | count, one record per subject);
// NewBoltBackend moves its records into "quotas" and deletes it.
var (
	bucketRatelimit = []byte("ratelimit")
	bucketQuotas    = []byte("quotas")
	bucketQuotaV1   = []byte("quota")
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
		quotas, err := b.CreateBucketIfNotExists(bucketQuotas)
		if err != nil {
			return err
		}
		if _, err := b.CreateBucketIfNotExists(bucketDaily); err != nil {
			return err
		}
		return migrateQuotaV1(b, quotas)
	})
	if err != nil {
		return nil, fmt.Errorf("ratelimit: create buckets: %w", err)
	}
	return &BoltBackend{db: db}, nil
}

// Shared implements Backend: false.
func (*BoltBackend) Shared() bool { return false }

// migrateQuotaV1 moves the records of the one-record-per-subject bucket
// "quota", if any, into quotas (a record already there wins) and deletes
// it.
func migrateQuotaV1(rl, quotas *bolt.Bucket) error {
	old := rl.Bucket(bucketQuotaV1)
	if old == nil {
		return nil
	}
	err := old.ForEach(func(k, v []byte) error {
		if len(v) != 17 || (Period(v[0]) != Day && Period(v[0]) != Month) {
			return nil // not a record: dropped
		}
		key := quotaKey(string(k), Period(v[0]))
		if quotas.Get(key) != nil {
			return nil
		}
		return quotas.Put(key, v[1:])
	})
	if err != nil {
		return err
	}
	return rl.DeleteBucket(bucketQuotaV1)
}

// quotaKey is the key of subject's quota record of period kind p.
func quotaKey(subject string, p Period) []byte {
	k := make([]byte, len(subject)+2)
	copy(k, subject)
	k[len(subject)+1] = byte(p)
	return k
}

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
	return rl.Bucket(bucketQuotas), rl.Bucket(bucketDaily), nil
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
		for k := range items {
			it := &items[k]
			if !it.quota {
				continue
			}
			key := quotaKey(it.subject, it.period)
			n := it.qAdd + recordCount(quota.Get(key), it.qStart)
			// A value of its own: bbolt keeps the slice until commit.
			v := make([]byte, 16)
			binary.BigEndian.PutUint64(v, uint64(it.qStart))
			binary.BigEndian.PutUint64(v[8:], uint64(n))
			if err := quota.Put(key, v); err != nil {
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

// recordCount returns the count of quota record v if it is of the period
// that starts at start, else 0.
func recordCount(v []byte, start int64) int64 {
	if len(v) != 16 || int64(binary.BigEndian.Uint64(v)) != start {
		return 0
	}
	return int64(binary.BigEndian.Uint64(v[8:]))
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
		n = recordCount(quota.Get(quotaKey(subject, p)), start)
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
