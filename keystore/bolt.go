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
//	used         key ID                   -> 8-byte big-endian last use (unix ms)
//	idempotency  record ID                -> 8-byte big-endian expiry (unix ns) + JSON record
//	meta         "version"                -> data format version
//	live, livecount                       -> the live-key index (see bolt_live.go)
//
// The used, live and livecount buckets were added after format version 1
// without a version bump: NewBolt creates them in older files, and older
// code ignores them. NewBolt rebuilds the live index from the keys bucket
// at every open (one pass over the records, as each sweep makes), so writes
// made by older code in between are never missed.
//
// A background sweeper deletes expired idempotency records and, under
// retention, keys whose end (Key.End) plus retention has passed: record, ID,
// owner index entry and last-use time together, in one transaction.

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

// boltSweepInterval is how often expired idempotency records, and keys past
// their retention, are deleted.
const boltSweepInterval = time.Minute

// boltFormatVersion is stored in the meta bucket; NewBolt refuses files
// written in another format.
const boltFormatVersion = "1"

var (
	bucketKeys        = []byte("keys")
	bucketIDs         = []byte("ids")
	bucketOwners      = []byte("owners")
	bucketUsed        = []byte("used")
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
	// Retention is how long revoked and expired keys are kept after they
	// stop validating (from the earlier of revocation and expiry), so they
	// can still be listed and inspected; then the sweeper deletes them
	// (within a minute). Default 30 days ([DefaultRetention]); zero means
	// the default, negative is invalid.
	Retention time.Duration
}

// BoltStore is a [Store] in an embedded bbolt file. Only one process may
// open the file at a time. Create it with [NewBolt].
type BoltStore struct {
	db        *bolt.DB
	retention time.Duration
	now       func() time.Time // the clock; a test hook

	stop      chan struct{}
	sweeper   sync.WaitGroup
	closeOnce sync.Once
	closeErr  error
}

var _ Store = (*BoltStore)(nil)

// DB returns the store's open bbolt database, for a component that keeps
// its own buckets beside the store's (the rate limiter); the store owns it
// and closes it in Close.
func (s *BoltStore) DB() *bolt.DB { return s.db }

// NewBolt opens (creating if needed) the bbolt file at opts.Path and starts
// a background sweeper that deletes expired idempotency records, and keys
// past their retention, every minute. Call Close to stop it and release the
// file.
func NewBolt(opts BoltOptions) (*BoltStore, error) {
	return newBolt(opts, boltSweepInterval, time.Now)
}

// newBolt is NewBolt with a configurable sweep interval and clock, for tests.
func newBolt(opts BoltOptions, sweepEvery time.Duration, now func() time.Time) (*BoltStore, error) {
	if opts.Path == "" {
		return nil, errors.New("keystore: bolt store path is empty")
	}
	retention, err := checkRetention(opts.Retention)
	if err != nil {
		return nil, err
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
	if err := db.Update(func(tx *bolt.Tx) error { return initBuckets(tx, now()) }); err != nil {
		_ = db.Close()
		return nil, fmt.Errorf("keystore: initialise bolt store %s: %w", opts.Path, err)
	}

	s := &BoltStore{db: db, retention: retention, now: now, stop: make(chan struct{})}
	s.sweeper.Add(1)
	go s.sweep(sweepEvery)
	return s, nil
}

// initBuckets creates the buckets, rebuilds the live-key index, and checks
// the format version.
func initBuckets(tx *bolt.Tx, now time.Time) error {
	for _, name := range [][]byte{bucketKeys, bucketIDs, bucketOwners, bucketUsed, bucketIdempotency, bucketMeta} {
		if _, err := tx.CreateBucketIfNotExists(name); err != nil {
			return err
		}
	}
	if err := rebuildLive(tx, now); err != nil {
		return err
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

// Create implements [Store.Create]: CreateLimited without a limit.
func (s *BoltStore) Create(ctx context.Context, k *Key) error {
	return s.CreateLimited(ctx, k, 0, s.now())
}

// ownerIndexKey returns the owners-bucket key of member under owner.
func ownerIndexKey(owner, member string) []byte {
	return []byte(ownerHash(owner) + "/" + member)
}

// boltErr passes nil and the sentinel errors through and gives any other
// error context.
func boltErr(op string, err error) error {
	if Outcome(err) {
		return err
	}
	return fmt.Errorf("keystore: bolt %s: %w", op, err)
}

// ByDigest implements [Store.ByDigest].
func (s *BoltStore) ByDigest(ctx context.Context, d Digest) (*Key, error) {
	if err := ctx.Err(); err != nil {
		return nil, boltErr("get key", err)
	}
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

// lastUsed returns the last-use time of key id inside tx, or nil.
func lastUsed(tx *bolt.Tx, id string) *time.Time {
	v := tx.Bucket(bucketUsed).Get([]byte(id))
	if len(v) != 8 {
		return nil
	}
	t := time.UnixMilli(int64(binary.BigEndian.Uint64(v))).UTC()
	return &t
}

// Get implements [Store.Get].
func (s *BoltStore) Get(ctx context.Context, id string) (*Key, error) {
	if err := ctx.Err(); err != nil {
		return nil, boltErr("get key", err)
	}
	var k *Key
	err := s.db.View(func(tx *bolt.Tx) error {
		var err error
		if k, err = getByID(tx, id); err == nil {
			k.LastUsedAt = lastUsed(tx, id)
		}
		return err
	})
	return k, boltErr("get key", err)
}

// List implements [Store.List] by walking the owner's index entries
// backwards with a bbolt cursor.
func (s *BoltStore) List(ctx context.Context, owner, cursor string, limit int) ([]*Key, string, error) {
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
		skipped int
		walked  string // the last member walked past
	)
	if err := ctx.Err(); err != nil {
		return nil, "", boltErr("list keys", err)
	}
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

		for n := 0; k != nil && bytes.HasPrefix(k, prefix) && len(keys) <= limit; k, _ = c.Prev() {
			if n++; n%64 == 0 {
				if err := ctx.Err(); err != nil {
					return err
				}
			}
			if skipped >= maxListSkip {
				// Walked past many entries without a record: return what
				// was found, and go on after the last entry walked.
				return nil
			}
			member := string(k[len(prefix):])
			id, ok := memberID(member)
			if !ok {
				skipped++
				continue // not a member List wrote; never a cursor
			}
			walked = member
			key, err := getByID(tx, id)
			if errors.Is(err, ErrNotFound) {
				skipped++
				continue
			}
			if err != nil {
				return err
			}
			if key.Owner != owner {
				continue
			}
			key.LastUsedAt = lastUsed(tx, id)
			keys = append(keys, key)
			members = append(members, member)
		}
		return nil
	})
	if err != nil {
		return nil, "", boltErr("list keys", err)
	}
	if skipped >= maxListSkip && len(keys) <= limit {
		return keys, walked, nil
	}
	if len(keys) <= limit {
		return keys, "", nil
	}
	return keys[:limit], members[limit-1], nil
}

// Revoke implements [Store.Revoke] on top of Update.
func (s *BoltStore) Revoke(ctx context.Context, id string, at time.Time) (*Key, error) {
	return s.Update(ctx, id, func(k *Key) error {
		if k.RevokedAt == nil {
			k.RevokedAt = &at
		}
		return nil
	})
}

// Update implements [Store.Update] in one transaction.
func (s *BoltStore) Update(ctx context.Context, id string, fn func(*Key) error) (*Key, error) {
	if err := ctx.Err(); err != nil {
		return nil, boltErr("update key", err)
	}
	var out *Key
	err := s.db.Update(func(tx *bolt.Tx) error {
		cur, err := getByID(tx, id)
		if err != nil {
			return err
		}
		next, changed, err := applyUpdate(cur, fn)
		if err != nil {
			return err
		}
		if changed {
			data, err := encodeKey(next)
			if err != nil {
				return err
			}
			if err := tx.Bucket(bucketKeys).Put(next.Digest[:], data); err != nil {
				return err
			}
			// Move the key to its new end in the live index (a key given an
			// end in the past is pruned later).
			if err := deleteLive(tx, cur); err != nil {
				return err
			}
			if err := addLive(tx, next); err != nil {
				return err
			}
		}
		next.LastUsedAt = lastUsed(tx, id)
		out = next
		return nil
	})
	if fnErr := fnErrorOf(err); fnErr != nil {
		return nil, fnErr
	}
	if err != nil {
		return nil, boltErr("update key", err)
	}
	return out, nil
}

// RecordUsage implements [Store.RecordUsage] in one transaction. IDs that
// name no key are skipped.
func (s *BoltStore) RecordUsage(ctx context.Context, used map[string]time.Time) error {
	if err := ctx.Err(); err != nil {
		return boltErr("record usage", err)
	}
	if len(used) == 0 {
		return nil
	}
	err := s.db.Update(func(tx *bolt.Tx) error {
		ids, b := tx.Bucket(bucketIDs), tx.Bucket(bucketUsed)
		for id, t := range used {
			ms := t.UnixMilli()
			if id == "" || t.IsZero() || ms <= 0 || ids.Get([]byte(id)) == nil {
				continue
			}
			if v := b.Get([]byte(id)); len(v) == 8 && int64(binary.BigEndian.Uint64(v)) >= ms {
				continue
			}
			v := make([]byte, 8)
			binary.BigEndian.PutUint64(v, uint64(ms))
			if err := b.Put([]byte(id), v); err != nil {
				return err
			}
		}
		return nil
	})
	return boltErr("record usage", err)
}

// CountOwner implements [Store.CountOwner] by counting the owner's index
// entries.
func (s *BoltStore) CountOwner(ctx context.Context, owner string) (int, error) {
	if err := ctx.Err(); err != nil {
		return 0, boltErr("count keys", err)
	}
	prefix := []byte(ownerHash(owner) + "/")
	n := 0
	err := s.db.View(func(tx *bolt.Tx) error {
		c := tx.Bucket(bucketOwners).Cursor()
		for k, _ := c.Seek(prefix); k != nil && bytes.HasPrefix(k, prefix); k, _ = c.Next() {
			if n++; n%1024 == 0 {
				if err := ctx.Err(); err != nil {
					return err
				}
			}
		}
		return nil
	})
	if err != nil {
		return 0, boltErr("count keys", err)
	}
	return n, nil
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
func (s *BoltStore) ReserveIdempotency(ctx context.Context, id string, rec *IdempotencyRecord, ttl time.Duration) (*IdempotencyRecord, error) {
	if err := ctx.Err(); err != nil {
		return nil, boltErr("reserve idempotency record", err)
	}
	if err := validateIdempotency(id, rec, ttl); err != nil {
		return nil, err
	}
	var existing *IdempotencyRecord
	err := s.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketIdempotency)
		now := s.now()
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
func (s *BoltStore) GetIdempotency(ctx context.Context, id string) (*IdempotencyRecord, error) {
	if err := ctx.Err(); err != nil {
		return nil, boltErr("get idempotency record", err)
	}
	var rec *IdempotencyRecord
	err := s.db.View(func(tx *bolt.Tx) error {
		var err error
		rec, err = liveBoltIdem(tx.Bucket(bucketIdempotency), id, s.now())
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
func (s *BoltStore) ReplaceIdempotency(ctx context.Context, id, token string, rec *IdempotencyRecord, ttl time.Duration) error {
	if err := ctx.Err(); err != nil {
		return boltErr("replace idempotency record", err)
	}
	if err := validateIdempotency(id, rec, ttl); err != nil {
		return err
	}
	err := s.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketIdempotency)
		now := s.now()
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
func (s *BoltStore) DeleteIdempotency(ctx context.Context, id, token string) error {
	if err := ctx.Err(); err != nil {
		return boltErr("delete idempotency record", err)
	}
	if id == "" {
		return nil
	}
	err := s.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketIdempotency)
		cur, err := liveBoltIdem(b, id, s.now())
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
			// expired idempotency records are ignored by reads in the
			// meantime, and keys past retention stay a little longer.
			_ = s.sweepOnce(s.now())
		}
	}
}

// sweepOnce deletes the idempotency records expired at now, the keys
// whose retention has passed at now, and the live-index entries of keys
// that ended by now. It finds them in a read transaction, so
// that writers are not held up while it decodes every record, and deletes
// them, checked again, in one write transaction (none if there is nothing to
// delete).
func (s *BoltStore) sweepOnce(now time.Time) error {
	var idem, keys, live [][]byte
	err := s.db.View(func(tx *bolt.Tx) error {
		var err error
		if live, err = allEndedLive(tx, now); err != nil {
			return err
		}
		err = tx.Bucket(bucketIdempotency).ForEach(func(k, v []byte) error {
			if boltIdemExpired(v, now) {
				idem = append(idem, bytes.Clone(k))
			}
			return nil
		})
		if err != nil {
			return err
		}
		return tx.Bucket(bucketKeys).ForEach(func(digest, v []byte) error {
			if s.pastRetention(v, now) {
				keys = append(keys, bytes.Clone(digest))
			}
			return nil
		})
	})
	if err != nil || len(idem)+len(keys)+len(live) == 0 {
		return err
	}
	return s.db.Update(func(tx *bolt.Tx) error {
		if err := pruneLive(tx, live); err != nil {
			return err
		}
		b := tx.Bucket(bucketIdempotency)
		for _, k := range idem {
			if v := b.Get(k); v != nil && boltIdemExpired(v, now) {
				if err := b.Delete(k); err != nil {
					return err
				}
			}
		}
		for _, digest := range keys {
			if err := s.deleteIfPastRetention(tx, digest, now); err != nil {
				return err
			}
		}
		return nil
	})
}

// pastRetention reports whether the stored record v belongs to a key whose
// end plus retention has passed at now. A record that does not decode is
// left alone.
func (s *BoltStore) pastRetention(v []byte, now time.Time) bool {
	k, err := decodeKey(v)
	if err != nil {
		return false
	}
	at, ok := deleteAt(k, s.retention)
	return ok && !now.Before(at)
}

// deleteIfPastRetention deletes, inside tx, the key with the given digest
// and everything that refers to it, if it is (still) past its retention at
// now.
func (s *BoltStore) deleteIfPastRetention(tx *bolt.Tx, digest []byte, now time.Time) error {
	keys := tx.Bucket(bucketKeys)
	v := keys.Get(digest)
	if v == nil || !s.pastRetention(v, now) {
		return nil // deleted, or given a later end, since the scan
	}
	k, err := decodeKey(v)
	if err != nil {
		return err
	}
	ids := tx.Bucket(bucketIDs)
	if cur := ids.Get([]byte(k.ID)); cur != nil && bytes.Equal(cur, digest) {
		if err := ids.Delete([]byte(k.ID)); err != nil {
			return err
		}
	}
	if err := tx.Bucket(bucketOwners).Delete(ownerIndexKey(k.Owner, indexMember(k))); err != nil {
		return err
	}
	if err := tx.Bucket(bucketUsed).Delete([]byte(k.ID)); err != nil {
		return err
	}
	if err := deleteLive(tx, k); err != nil {
		return err
	}
	return keys.Delete(digest)
}

// Ping implements [Store.Ping]: it fails once the store is closed.
func (s *BoltStore) Ping(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return boltErr("ping", err)
	}
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
