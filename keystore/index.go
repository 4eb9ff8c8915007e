package keystore

// This file holds what the Redis and bbolt stores share: validation of the
// records they are asked to write, and the owner index whose entries double
// as List cursors.
//
// Each owner's keys are indexed by a member string
//
//	<CreatedAt in unix milliseconds, zero-padded to 16 digits>:<key ID>
//
// Members sort bytewise in creation order (then by ID), so walking them
// backwards lists newest first, and the last member of a page is the cursor
// of the next one: "the keys strictly older than this one". Keys created
// while someone pages through the list sort before the cursor and so never
// show up twice or push an existing key out of a later page.

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// ErrInvalidCursor is returned by List for a cursor it did not hand out.
var ErrInvalidCursor = errors.New("keystore: invalid list cursor")

// msDigits is the zero-padded width of the milliseconds in a member; it
// covers every time from 1970 to the year 318857.
const msDigits = 16

// maxIndexMillis is the first UnixMilli that needs more than msDigits.
const maxIndexMillis = 1e16

// ownerHash returns the hex SHA-256 of owner. Index entries are keyed by it
// so that any owner string (an email, a URL) makes a well-formed store key.
func ownerHash(owner string) string {
	sum := sha256.Sum256([]byte(owner))
	return hex.EncodeToString(sum[:])
}

// indexMember returns the owner-index member of k (see the file comment).
func indexMember(k *Key) string {
	ms := strconv.FormatInt(k.CreatedAt.UnixMilli(), 10)
	return strings.Repeat("0", msDigits-len(ms)) + ms + ":" + k.ID
}

// memberID returns the key ID of a well-formed index member.
func memberID(member string) (string, bool) {
	if len(member) < msDigits+2 || member[msDigits] != ':' {
		return "", false
	}
	for i := 0; i < msDigits; i++ {
		if member[i] < '0' || member[i] > '9' {
			return "", false
		}
	}
	return member[msDigits+1:], true
}

// checkCursor validates a List cursor: "" or an index member.
func checkCursor(cursor string) error {
	if cursor == "" {
		return nil
	}
	if _, ok := memberID(cursor); !ok {
		return ErrInvalidCursor
	}
	return nil
}

// MaxListLimit is the largest page size List accepts.
const MaxListLimit = 1000

// checkLimit validates a List page size.
func checkLimit(limit int) error {
	if limit < 1 || limit > MaxListLimit {
		return fmt.Errorf("keystore: list limit must be between 1 and %d, got %d", MaxListLimit, limit)
	}
	return nil
}

// validateKey checks that k can be stored: it has an ID, an owner, a digest
// and a creation time the owner index can represent.
func validateKey(k *Key) error {
	switch {
	case k == nil:
		return errors.New("keystore: key is nil")
	case k.ID == "":
		return errors.New("keystore: key has no ID")
	case k.Owner == "":
		return errors.New("keystore: key has no owner")
	case k.Digest.IsZero():
		return errors.New("keystore: key has no digest")
	case k.CreatedAt.UnixMilli() < 0:
		return errors.New("keystore: key creation time is before 1970 or unset")
	case k.CreatedAt.UnixMilli() >= maxIndexMillis:
		// indexMember would overflow its fixed width (and used to panic).
		return errors.New("keystore: key creation time is after the year 318857")
	}
	return nil
}

// validateIdempotency checks the arguments of ReserveIdempotency and
// ReplaceIdempotency. Tokens may not contain a newline because the Redis
// store keeps a record as "<token>\n<json>".
func validateIdempotency(id string, rec *IdempotencyRecord, ttl time.Duration) error {
	switch {
	case id == "":
		return errors.New("keystore: idempotency record ID is empty")
	case rec == nil:
		return errors.New("keystore: idempotency record is nil")
	case rec.Token == "":
		return errors.New("keystore: idempotency record has no token")
	case strings.ContainsRune(rec.Token, '\n'):
		return errors.New("keystore: idempotency token contains a newline")
	case ttl < time.Millisecond:
		return fmt.Errorf("keystore: idempotency TTL must be at least 1ms, got %s", ttl)
	}
	return nil
}
