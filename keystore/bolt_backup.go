package keystore

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	bolt "go.etcd.io/bbolt"
	berrors "go.etcd.io/bbolt/errors"
)

// ErrNoSnapshot is returned by [CachedStore.Snapshot] for a store that is
// not a bbolt file (Redis has its own persistence: RDB and AOF).
var ErrNoSnapshot = errors.New("keystore: only a bbolt file store can be snapshotted")

// Snapshot writes a consistent copy of the whole database file to w and
// returns its size. It runs in one read transaction, so writers go on
// meanwhile, and the copy is a valid bbolt file as of the moment it began.
// size, if not nil, is called with the number of bytes the copy will have
// before anything is written (for a Content-Length, say).
func (s *BoltStore) Snapshot(w io.Writer, size func(int64)) (int64, error) {
	var n int64
	err := s.db.View(func(tx *bolt.Tx) error {
		if size != nil {
			size(tx.Size())
		}
		var err error
		n, err = tx.WriteTo(w)
		return err
	})
	return n, err
}

// Snapshot writes a consistent copy of the underlying bbolt store to w (see
// [BoltStore.Snapshot]), or returns [ErrNoSnapshot].
func (c *CachedStore) Snapshot(w io.Writer, size func(int64)) (int64, error) {
	b, ok := c.inner.(*BoltStore)
	if !ok {
		return 0, ErrNoSnapshot
	}
	return b.Snapshot(w, size)
}

// BoltFileInfo describes a bbolt key store file, as [InspectBolt] read it.
type BoltFileInfo struct {
	Keys int // key records, of every status
}

// InspectBolt opens the bbolt file at path read-only (waiting at most
// timeout for another process's exclusive lock), checks that it is a key
// store of this format, and counts its keys.
func InspectBolt(path string, timeout time.Duration) (BoltFileInfo, error) {
	var info BoltFileInfo
	if _, err := os.Stat(path); err != nil {
		return info, fmt.Errorf("keystore: %w", err)
	}
	db, err := bolt.Open(path, 0o600, &bolt.Options{ReadOnly: true, Timeout: timeout})
	if errors.Is(err, berrors.ErrTimeout) {
		return info, fmt.Errorf("keystore: %s is locked by another process: %w", path, err)
	}
	if err != nil {
		return info, fmt.Errorf("keystore: %s is not a bbolt file: %w", path, err)
	}
	defer db.Close()
	err = db.View(func(tx *bolt.Tx) error {
		for _, name := range [][]byte{bucketKeys, bucketIDs, bucketOwners, bucketIdempotency, bucketMeta} {
			if tx.Bucket(name) == nil {
				return fmt.Errorf("keystore: %s is not a key store (no %s bucket)", path, name)
			}
		}
		if v := tx.Bucket(bucketMeta).Get(metaVersion); string(v) != boltFormatVersion {
			return fmt.Errorf("keystore: %s has data format version %q, want %q", path, v, boltFormatVersion)
		}
		info.Keys = tx.Bucket(bucketKeys).Stats().KeyN
		return nil
	})
	return info, err
}

// LockBolt takes the exclusive lock of the bbolt file at path (creating
// it, as [NewBolt] would, if missing), waiting at most timeout, so that no
// process can open it until release is called. It is for replacing the
// file: a caller holding the lock knows no Caddy has it open.
func LockBolt(path string, timeout time.Duration) (release func() error, err error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("keystore: create directory for bolt store: %w", err)
	}
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: timeout})
	if errors.Is(err, berrors.ErrTimeout) {
		return nil, fmt.Errorf("keystore: %s is locked by another process (a running Caddy?): %w", path, err)
	}
	if err != nil {
		return nil, fmt.Errorf("keystore: open %s: %w", path, err)
	}
	return db.Close, nil
}

// SnapshotBoltFile writes a consistent copy of the bbolt file at path to w,
// opening it read-only (waiting at most timeout for another process's
// exclusive lock). A file a running Caddy holds is snapshotted through
// that Caddy instead ([CachedStore.Snapshot]).
func SnapshotBoltFile(path string, w io.Writer, timeout time.Duration) (int64, error) {
	if _, err := os.Stat(path); err != nil {
		return 0, fmt.Errorf("keystore: %w", err)
	}
	db, err := bolt.Open(path, 0o600, &bolt.Options{ReadOnly: true, Timeout: timeout})
	if errors.Is(err, berrors.ErrTimeout) {
		return 0, fmt.Errorf("keystore: %s is locked by another process: %w", path, err)
	}
	if err != nil {
		return 0, fmt.Errorf("keystore: open %s: %w", path, err)
	}
	defer db.Close()
	s := &BoltStore{db: db}
	return s.Snapshot(w, nil)
}
