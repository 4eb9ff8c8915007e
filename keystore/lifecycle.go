package keystore

// This file holds what the Redis and bbolt stores share for the lifecycle
// methods: applying an Update function, encoding records, and retention.

import (
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"time"
)

// fnError carries an error returned by an Update function through a store's
// transaction machinery, so that Update can return it unchanged rather than
// wrapped as a store failure.
type fnError struct{ err error }

func (e *fnError) Error() string { return e.err.Error() }

// fnErrorOf returns the Update function's own error if err carries one,
// else nil.
func fnErrorOf(err error) error {
	var fe *fnError
	if errors.As(err, &fe) {
		return fe.err
	}
	return nil
}

// cloneKey returns a deep copy of k.
func cloneKey(k *Key) *Key {
	c := *k
	if k.Scopes != nil {
		c.Scopes = slices.Clone(k.Scopes)
	}
	if k.Meta != nil {
		c.Meta = slices.Clone(k.Meta)
	}
	c.ExpiresAt = cloneTime(k.ExpiresAt)
	c.RevokedAt = cloneTime(k.RevokedAt)
	c.LastUsedAt = cloneTime(k.LastUsedAt)
	return &c
}

func cloneTime(t *time.Time) *time.Time {
	if t == nil {
		return nil
	}
	c := *t
	return &c
}

// applyUpdate runs fn on a copy of cur (a freshly decoded record) and
// returns the result, and whether the record to store differs from cur.
// An error from fn comes back as a *fnError; a change to a field fn may not
// change gives ErrConflict.
func applyUpdate(cur *Key, fn func(*Key) error) (*Key, bool, error) {
	if fn == nil {
		return nil, false, errors.New("keystore: update function is nil")
	}
	next := cloneKey(cur)
	if err := fn(next); err != nil {
		return nil, false, &fnError{err}
	}
	if next.ID != cur.ID || next.Owner != cur.Owner || next.Digest != cur.Digest ||
		next.Prefix != cur.Prefix || !next.CreatedAt.Equal(cur.CreatedAt) || next.Meter != cur.Meter {
		return nil, false, ErrConflict
	}
	next.CreatedAt = cur.CreatedAt // the same instant; keep its stored form
	next.LastUsedAt = nil          // not part of the record
	before, err := encodeKey(cur)
	if err != nil {
		return nil, false, err
	}
	after, err := encodeKey(next)
	if err != nil {
		return nil, false, err
	}
	return next, string(before) != string(after), nil
}

// encodeKey returns the stored JSON form of k, which leaves out LastUsedAt.
func encodeKey(k *Key) ([]byte, error) {
	rec := *k
	rec.LastUsedAt = nil
	data, err := json.Marshal(&rec)
	if err != nil {
		return nil, fmt.Errorf("keystore: encode key: %w", err)
	}
	return data, nil
}

// decodeKey decodes a stored JSON key record.
func decodeKey(data []byte) (*Key, error) {
	var k Key
	if err := json.Unmarshal(data, &k); err != nil {
		return nil, fmt.Errorf("keystore: decode stored key: %w", err)
	}
	k.LastUsedAt = nil // never part of the record
	return &k, nil
}

// checkRetention validates a configured retention and applies the default.
func checkRetention(d time.Duration) (time.Duration, error) {
	switch {
	case d < 0:
		return 0, fmt.Errorf("keystore: retention must not be negative, got %s", d)
	case d == 0:
		return DefaultRetention, nil
	}
	return d, nil
}

// deleteAt returns when k is deleted under retention (its end plus
// retention), and false if k has no end and is kept for ever.
func deleteAt(k *Key, retention time.Duration) (time.Time, bool) {
	end := k.End()
	if end == nil {
		return time.Time{}, false
	}
	return end.Add(retention), true
}
