package keystore

// This file implements Store on an embedded bbolt file: the zero-setup store
// for a single machine. Each operation is one bbolt transaction, and bbolt
// fsyncs every committed write transaction, so a Create that returned nil
// survives a crash or power loss.
//
// Buckets:
//
//	keys         32-byte digest           -> JSON Key record
//	ids          key ID                   -> 32-byte digest
//	owners       "<sha256 owner hex>/<index member>" -> empty (see index.go)
//	idempotency  record ID                -> 8-byte big-endian expiry (unix ns) + JSON record
//	meta         "version"                -> data format version

import (
	"bytes"
	"context"
	"crypto/subtle"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	bolt "go.etcd.io/bbolt"
	berrors "go.etcd.io/bbolt/errors"
)

// DefaultBoltTimeout is how long [NewBolt] waits for the file lock by default.
const DefaultBoltTimeout = time.Second

// boltSweepInterval is how often expired idempotency records are deleted.
const boltSweepInterval = time.Minute

// boltFormatVersion is stored in the meta bucket; NewBolt refuses files
// written in another format.
const boltFormatVersion = "1"

var (
	bucketKeys        = []byte("keys")
	bucketIDs         = []byte("ids")
	bucketOwners      = []byte("owners")
	bucketIdempotency = []byte("idempotency")
	bucketMeta        = []byte("meta")
	metaVersion       = []byte("version")
)

// BoltOptions configures [NewBolt].
type BoltOptions struct {
	// Path is the database file. Missing parent directories are created
	// with mode 0700; the file is created with mode 0600.
	Path string
	// Timeout is how long to wait for the file lock held by another
	// process; default 1s ([DefaultBoltTimeout]).
	Timeout time.Duration
}

// BoltStore is a [Store] in an embedded bbolt file. Only one process may
// open the file at a time. Create it with [NewBolt].
type BoltStore struct {
	db *bolt.DB

	stop      chan struct{}
	sweeper   sync.WaitGroup
	closeOnce sync.Once
	closeErr  error
}

var _ Store = (*BoltStore)(nil)

// NewBolt opens (creating if needed) the bbolt file at opts.Path and starts
// a background sweeper that deletes expired idempotency records every
// minute. Call Close to stop it and release the file.
func NewBolt(opts BoltOptions) (*BoltStore, error) {
	return newBolt(opts, boltSweepInterval)
}

// newBolt is NewBolt with a configurable sweep interval, for tests.
func newBolt(opts BoltOptions, sweepEvery time.Duration) (*BoltStore, error) {
	if opts.Path == "" {
		return nil, errors.New("keystore: bolt store path is empty")
	}
	if opts.Timeout <= 0 {
		opts.Timeout = DefaultBoltTimeout
	}
	if err := os.MkdirAll(filepath.Dir(opts.Path), 0o700); err != nil {
		return nil, fmt.Errorf("keystore: create directory for bolt store: %w", err)
	}
	db, err := bolt.Open(opts.Path, 0o600, &bolt.Options{Timeout: opts.Timeout})
	if errors.Is(err, berrors.ErrTimeout) {
		return nil, fmt.Errorf("keystore: open bolt store %s: file is locked by another process (waited %s): %w", opts.Path, opts.Timeout, err)
	}
	if err != nil {
		return nil, fmt.Errorf("keystore: open bolt store %s: %w", opts.Path, err)
	}
	if err := db.Update(initBuckets); err != nil {
		_ = db.Close()
		return nil, fmt.Errorf("keystore: initialise bolt store %s: %w", opts.Path, err)
	}

	s := &BoltStore{db: db, stop: make(chan struct{})}
	s.sweeper.Add(1)
	go s.sweep(sweepEvery)
	return s, nil
}

// initBuckets creates the buckets and checks the format version.
func initBuckets(tx *bolt.Tx) error {
	for _, name := range [][]byte{bucketKeys, bucketIDs, bucketOwners, bucketIdempotency, bucketMeta} {
		if _, err := tx.CreateBucketIfNotExists(name); err != nil {
			return err
		}
	}
	meta := tx.Bucket(bucketMeta)
	switch v := meta.Get(metaVersion); {
	case v == nil:
		return meta.Put(metaVersion, []byte(boltFormatVersion))
	case string(v) != boltFormatVersion:
		return fmt.Errorf("unsupported data format version %q (want %q)", v, boltFormatVersion)
	}
	return nil
}

// Create implements [Store.Create] in one transaction.
func (s *BoltStore) Create(_ context.Context, k *Key) error {
	if err := validateKey(k); err != nil {
		return err
	}
	record, err := json.Marshal(k)
	if err != nil {
		return fmt.Errorf("keystore: encode key: %w", err)
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
		if err := ids.Put([]byte(k.ID), k.Digest[:]); err != nil {
			return err
		}
		if err := tx.Bucket(bucketOwners).Put(ownerIndexKey(k.Owner, indexMember(k)), nil); err != nil {
			return err
		}
		return keys.Put(k.Digest[:], record)
	})
	return boltErr("create key", err)
}

// ownerIndexKey returns the owners-bucket key of member under owner.
func ownerIndexKey(owner, member string) []byte {
	return []byte(ownerHash(owner) + "/" + member)
}

// boltErr passes nil and the sentinel errors through and gives any other
// error context.
func boltErr(op string, err error) error {
	if err == nil || errors.Is(err, ErrNotFound) || errors.Is(err, ErrConflict) {
		return err
	}
	return fmt.Errorf("keystore: bolt %s: %w", op, err)
}

// ByDigest implements [Store.ByDigest].
func (s *BoltStore) ByDigest(_ context.Context, d Digest) (*Key, error) {
	var k *Key
	err := s.db.View(func(tx *bolt.Tx) error {
		data := tx.Bucket(bucketKeys).Get(d[:])
		if data == nil {
			return ErrNotFound
		}
		var err error
		k, err = decodeKey(data)
		return err
	})
	return k, boltErr("get key", err)
}

// getByID reads the key with the given ID inside tx.
func getByID(tx *bolt.Tx, id string) (*Key, error) {
	if id == "" {
		return nil, ErrNotFound
	}
	digest := tx.Bucket(bucketIDs).Get([]byte(id))
	if digest == nil {
		return nil, ErrNotFound
	}
	data := tx.Bucket(bucketKeys).Get(digest)
	if data == nil {
		return nil, ErrNotFound
	}
	k, err := decodeKey(data)
	if err != nil {
		return nil, err
	}
	if k.ID != id {
		return nil, ErrNotFound
	}
	return k, nil
}

// Get implements [Store.Get].
func (s *BoltStore) Get(_ context.Context, id string) (*Key, error) {
	var k *Key
	err := s.db.View(func(tx *bolt.Tx) error {
		var err error
		k, err = getByID(tx, id)
		return err
	})
	return k, boltErr("get key", err)
}

// List implements [Store.List] by walking the owner's index entries
// backwards with a bbolt cursor.
func (s *BoltStore) List(_ context.Context, owner, cursor string, limit int) ([]*Key, string, error) {
	if err := checkLimit(limit); err != nil {
		return nil, "", err
	}
	if err := checkCursor(cursor); err != nil {
		return nil, "", err
	}
	prefix := []byte(ownerHash(owner) + "/")

	var (
		keys    []*Key
		members []string
	)
	err := s.db.View(func(tx *bolt.Tx) error {
		c := tx.Bucket(bucketOwners).Cursor()

		// Position on the first entry strictly before the start: the
		// cursor's own entry, or the end of this owner's range.
		var seek []byte
		if cursor != "" {
			seek = append(bytes.Clone(prefix), cursor...)
		} else {
			seek = bytes.Clone(prefix)
			seek[len(seek)-1]++ // "<hash>0" sorts right after every "<hash>/..."
		}
		k, _ := c.Seek(seek)
		if k == nil {
			k, _ = c.Last()
		} else {
			k, _ = c.Prev()
		}

		for ; k != nil && bytes.HasPrefix(k, prefix) && len(keys) <= limit; k, _ = c.Prev() {
			member := string(k[len(prefix):])
			id, ok := memberID(member)
			if !ok {
				continue
			}
			key, err := getByID(tx, id)
			if errors.Is(err, ErrNotFound) {
				continue
			}
			if err != nil {
				return err
			}
			if key.Owner != owner {
				continue
			}
			keys = append(keys, key)
			members = append(members, member)
		}
		return nil
	})
	if err != nil {
		return nil, "", boltErr("list keys", err)
	}
	if len(keys) <= limit {
		return keys, "", nil
	}
	return keys[:limit], members[limit-1], nil
}

// Revoke implements [Store.Revoke] in one transaction.
func (s *BoltStore) Revoke(_ context.Context, id string, at time.Time) (*Key, error) {
	var k *Key
	err := s.db.Update(func(tx *bolt.Tx) error {
		var err error
		k, err = getByID(tx, id)
		if err != nil || k.RevokedAt != nil {
			return err
		}
		revokedAt := at
		k.RevokedAt = &revokedAt
		data, err := json.Marshal(k)
		if err != nil {
			return err
		}
		return tx.Bucket(bucketKeys).Put(k.Digest[:], data)
	})
	if err != nil {
		return nil, boltErr("revoke key", err)
	}
	return k, nil
}

// encodeBoltIdem returns the stored form of rec, expiring at expires.
func encodeBoltIdem(rec *IdempotencyRecord, expires time.Time) ([]byte, error) {
	data, err := json.Marshal(rec)
	if err != nil {
		return nil, fmt.Errorf("encode idempotency record: %w", err)
	}
	out := make([]byte, 8, 8+len(data))
	binary.BigEndian.PutUint64(out, uint64(expires.UnixNano()))
	return append(out, data...), nil
}

// boltIdemExpired reports whether a stored idempotency record (or a
// malformed one) has expired at now.
func boltIdemExpired(v []byte, now time.Time) bool {
	return len(v) < 8 || int64(binary.BigEndian.Uint64(v)) <= now.UnixNano()
}

// liveBoltIdem returns the record under id unless it is missing or expired.
func liveBoltIdem(b *bolt.Bucket, id string, now time.Time) (*IdempotencyRecord, error) {
	if id == "" {
		return nil, ErrNotFound
	}
	v := b.Get([]byte(id))
	if v == nil || boltIdemExpired(v, now) {
		return nil, ErrNotFound
	}
	var rec IdempotencyRecord
	if err := json.Unmarshal(v[8:], &rec); err != nil {
		return nil, fmt.Errorf("decode idempotency record: %w", err)
	}
	return &rec, nil
}

// ReserveIdempotency implements [Store.ReserveIdempotency].
func (s *BoltStore) ReserveIdempotency(_ context.Context, id string, rec *IdempotencyRecord, ttl time.Duration) (*IdempotencyRecord, error) {
	if err := validateIdempotency(id, rec, ttl); err != nil {
		return nil, err
	}
	var existing *IdempotencyRecord
	err := s.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketIdempotency)
		now := time.Now()
		cur, err := liveBoltIdem(b, id, now)
		if err == nil {
			existing = cur
			return nil
		}
		if !errors.Is(err, ErrNotFound) {
			return err
		}
		v, err := encodeBoltIdem(rec, now.Add(ttl))
		if err != nil {
			return err
		}
		return b.Put([]byte(id), v)
	})
	if err != nil {
		return nil, boltErr("reserve idempotency record", err)
	}
	return existing, nil
}

// GetIdempotency implements [Store.GetIdempotency].
func (s *BoltStore) GetIdempotency(_ context.Context, id string) (*IdempotencyRecord, error) {
	var rec *IdempotencyRecord
	err := s.db.View(func(tx *bolt.Tx) error {
		var err error
		rec, err = liveBoltIdem(tx.Bucket(bucketIdempotency), id, time.Now())
		return err
	})
	if err != nil {
		return nil, boltErr("get idempotency record", err)
	}
	return rec, nil
}

// tokenMatches compares idempotency tokens in constant time.
func tokenMatches(stored, presented string) bool {
	return subtle.ConstantTimeCompare([]byte(stored), []byte(presented)) == 1
}

// ReplaceIdempotency implements [Store.ReplaceIdempotency].
func (s *BoltStore) ReplaceIdempotency(_ context.Context, id, token string, rec *IdempotencyRecord, ttl time.Duration) error {
	if err := validateIdempotency(id, rec, ttl); err != nil {
		return err
	}
	err := s.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketIdempotency)
		now := time.Now()
		cur, err := liveBoltIdem(b, id, now)
		if errors.Is(err, ErrNotFound) {
			return ErrConflict
		}
		if err != nil {
			return err
		}
		if !tokenMatches(cur.Token, token) {
			return ErrConflict
		}
		v, err := encodeBoltIdem(rec, now.Add(ttl))
		if err != nil {
			return err
		}
		return b.Put([]byte(id), v)
	})
	return boltErr("replace idempotency record", err)
}

// DeleteIdempotency implements [Store.DeleteIdempotency].
func (s *BoltStore) DeleteIdempotency(_ context.Context, id, token string) error {
	if id == "" {
		return nil
	}
	err := s.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketIdempotency)
		cur, err := liveBoltIdem(b, id, time.Now())
		if errors.Is(err, ErrNotFound) {
			return nil
		}
		if err != nil {
			return err
		}
		if !tokenMatches(cur.Token, token) {
			return nil
		}
		return b.Delete([]byte(id))
	})
	return boltErr("delete idempotency record", err)
}

// sweep deletes expired idempotency records every interval until Close.
func (s *BoltStore) sweep(every time.Duration) {
	defer s.sweeper.Done()
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-s.stop:
			return
		case <-t.C:
			// An error here (say, a full disk) is retried at the next tick;
			// expired records are ignored by reads in the meantime.
			_ = s.sweepOnce(time.Now())
		}
	}
}

// sweepOnce deletes the idempotency records expired at now.
func (s *BoltStore) sweepOnce(now time.Time) error {
	return s.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketIdempotency)
		var expired [][]byte
		err := b.ForEach(func(k, v []byte) error {
			if boltIdemExpired(v, now) {
				expired = append(expired, bytes.Clone(k))
			}
			return nil
		})
		if err != nil {
			return err
		}
		for _, k := range expired {
			if err := b.Delete(k); err != nil {
				return err
			}
		}
		return nil
	})
}

// Ping implements [Store.Ping]: it fails once the store is closed.
func (s *BoltStore) Ping(_ context.Context) error {
	return boltErr("ping", s.db.View(func(*bolt.Tx) error { return nil }))
}

// Close implements [Store.Close]: it stops the sweeper and closes the file.
// Calling it again returns the first result.
func (s *BoltStore) Close() error {
	s.closeOnce.Do(func() {
		close(s.stop)
		s.sweeper.Wait()
		if err := s.db.Close(); err != nil {
			s.closeErr = fmt.Errorf("keystore: bolt close: %w", err)
		}
	})
	return s.closeErr
}
