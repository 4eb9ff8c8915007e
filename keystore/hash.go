package keystore

// This file holds the keyed hashing of API keys. The store never sees a raw
// key: it sees HMAC-SHA256(pepper, key), where the pepper is derived from
// the operator's secret with HKDF. A copy of the store alone therefore
// cannot confirm a guessed key.

import (
	"crypto/hkdf"
	"crypto/hmac"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"sync"
)

// MinSecretLen is the minimum length in bytes of the operator's secret.
const MinSecretLen = 32

// hkdfInfoPrefix namespaces every key derived from the secret, so that keys
// derived for different purposes (or by a future format version) never
// coincide.
const hkdfInfoPrefix = "caddy-apikeys/v1/"

// digestPurpose is the HKDF purpose of the pepper used by [Hasher].
const digestPurpose = "key-digest"

// Digest is the keyed hash of a raw API key, HMAC-SHA256(pepper, key). It is
// the lookup handle in the store. Its text form (String, MarshalText, and so
// JSON) is 64 lowercase hex characters.
type Digest [sha256.Size]byte

// String returns d as 64 lowercase hex characters.
func (d Digest) String() string { return hex.EncodeToString(d[:]) }

// MarshalText encodes d as 64 lowercase hex characters.
func (d Digest) MarshalText() ([]byte, error) {
	out := make([]byte, hex.EncodedLen(len(d)))
	hex.Encode(out, d[:])
	return out, nil
}

// UnmarshalText decodes 64 hex characters into d.
func (d *Digest) UnmarshalText(text []byte) error {
	if len(text) != hex.EncodedLen(len(d)) {
		return fmt.Errorf("keystore: digest must be %d hex characters, got %d", hex.EncodedLen(len(d)), len(text))
	}
	var out Digest
	if _, err := hex.Decode(out[:], text); err != nil {
		return fmt.Errorf("keystore: digest is not hex: %w", err)
	}
	*d = out
	return nil
}

// ParseDigest decodes the text form of a digest (64 hex characters).
func ParseDigest(s string) (Digest, error) {
	var d Digest
	err := d.UnmarshalText([]byte(s))
	return d, err
}

// Equal reports whether d and o are the same digest, in constant time.
func (d Digest) Equal(o Digest) bool {
	return subtle.ConstantTimeCompare(d[:], o[:]) == 1
}

// IsZero reports whether d is the zero value (no digest set).
func (d Digest) IsZero() bool { return d == Digest{} }

// Hasher computes the [Digest] of raw keys under a pepper derived from the
// operator's secret. Create it with [NewHasher]; the zero value is not
// usable. It is safe for concurrent use, and Digest does not allocate.
type Hasher struct {
	// pool holds *macState values keyed with the pepper; the pepper itself
	// lives only inside the HMAC states.
	pool sync.Pool
}

// macState is one reusable HMAC computation. buf holds a copy of the input
// (hash.Hash.Write takes a []byte, and converting the string would allocate)
// and sum receives the output.
type macState struct {
	mac hash.Hash
	buf []byte
	sum []byte
}

// NewHasher returns a Hasher whose pepper is HKDF-SHA256(secret, info
// "caddy-apikeys/v1/key-digest"), 32 bytes. The secret must be at least
// [MinSecretLen] bytes.
func NewHasher(secret []byte) (*Hasher, error) {
	pepper, err := DeriveKey(secret, digestPurpose, sha256.Size)
	if err != nil {
		return nil, err
	}
	h := &Hasher{}
	h.pool.New = func() any {
		return &macState{
			mac: hmac.New(sha256.New, pepper),
			buf: make([]byte, 0, 128),
			sum: make([]byte, 0, sha256.Size),
		}
	}
	return h, nil
}

// Digest returns HMAC-SHA256(pepper, raw).
func (h *Hasher) Digest(raw string) Digest {
	// Every state in the pool is freshly keyed or was Reset before Put.
	st := h.pool.Get().(*macState)
	st.buf = append(st.buf[:0], raw...)
	st.mac.Write(st.buf)
	st.sum = st.mac.Sum(st.sum[:0])

	var d Digest
	copy(d[:], st.sum)

	// Do not keep the raw key, or state derived from it, in the pool, and
	// do not let one unusually long input pin a large buffer.
	st.mac.Reset()
	clear(st.buf)
	if cap(st.buf) > 1024 {
		st.buf = make([]byte, 0, 128)
	}
	st.buf = st.buf[:0]
	h.pool.Put(st)
	return d
}

// DeriveKey derives n bytes from the operator's secret for one purpose with
// HKDF-SHA256 (no salt, info "caddy-apikeys/v1/"+purpose). Distinct purposes
// give independent keys; use it, for example, for the AES-GCM key that seals
// stored idempotent responses. The secret must be at least [MinSecretLen]
// bytes.
func DeriveKey(secret []byte, purpose string, n int) ([]byte, error) {
	if len(secret) < MinSecretLen {
		return nil, fmt.Errorf("keystore: secret must be at least %d bytes, got %d", MinSecretLen, len(secret))
	}
	if purpose == "" {
		return nil, errors.New("keystore: key derivation purpose must not be empty")
	}
	if n <= 0 {
		return nil, fmt.Errorf("keystore: derived key length must be positive, got %d", n)
	}
	key, err := hkdf.Key(sha256.New, secret, nil, hkdfInfoPrefix+purpose, n)
	if err != nil {
		return nil, fmt.Errorf("keystore: derive %s key: %w", purpose, err)
	}
	return key, nil
}
