package apikeys

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net/http"
	"slices"
	"strconv"
	"time"

	"go.uber.org/zap"

	"github.com/caddy-apikeys/caddy-apikeys/jwtauth"
	"github.com/caddy-apikeys/caddy-apikeys/keystore"
)

// idempotencyLock is how long a request holds its Idempotency-Key before a
// retry may take the work over (after a crash, say). Each request makes a
// few store calls bounded by store_timeout, so this is ample.
const idempotencyLock = 30 * time.Second

// How idempotency works here: before anything is stored, the complete
// response (with the new raw key, sealed with AES-GCM) is written into a
// pending idempotency record. The key is then stored and the record marked
// done. Every execution under one Idempotency-Key therefore produces the
// same key: a retry after a crash finishes the recorded work instead of
// minting anew, so no retry can ever mint a second key.

// idempotencyKey reads and checks the Idempotency-Key header.
func idempotencyKey(r *http.Request) (key string, present bool, aerr *apiError) {
	vals, present := r.Header["Idempotency-Key"]
	if !present {
		return "", false, nil
	}
	bad := &apiError{status: http.StatusBadRequest, code: "invalid_idempotency_key",
		message: "Idempotency-Key must be one header of 1 to 255 printable ASCII characters."}
	if len(vals) != 1 || !validIdempotencyKey(vals[0]) {
		return "", true, bad
	}
	return vals[0], true, nil
}

func validIdempotencyKey(s string) bool {
	if len(s) == 0 || len(s) > 255 {
		return false
	}
	for i := 0; i < len(s); i++ {
		if s[i] < 0x20 || s[i] > 0x7e {
			return false
		}
	}
	return true
}

// hashParts hashes length-prefixed parts, so no two part lists collide.
func hashParts(parts ...string) string {
	h := sha256.New()
	for _, p := range parts {
		var n [8]byte
		binary.LittleEndian.PutUint64(n[:], uint64(len(p)))
		h.Write(n[:])
		h.Write([]byte(p))
	}
	return hex.EncodeToString(h.Sum(nil))
}

// mintOp is a prepared minting request: the new key and the complete
// response that announces it. Rotations also name the key they replace and
// when that key's grace period ends.
type mintOp struct {
	key      *keystore.Key
	respBody []byte
	replaces string
	graceEnd *time.Time
}

// newMintOp renders the response of a minted key. rotation, when set, is
// the key being replaced.
func newMintOp(key *keystore.Key, raw string, rotation *rotationPlan) (*mintOp, *apiError) {
	resp := newKeyResponse(key, raw)
	op := &mintOp{key: key}
	if rotation != nil {
		op.replaces, op.graceEnd = rotation.oldID, &rotation.graceEnd
		resp.Replaces = rotation.oldID
		resp.GracePeriodEndsAt = &apiTime{rotation.graceEnd}
	}
	body, err := marshalJSON(envelope{Success: true, Data: resp})
	if err != nil {
		return nil, internalError(err)
	}
	op.respBody = body
	return op, nil
}

// mint runs a key-minting POST (create, rotate). prepare checks the
// request against the session and the store and builds the operation; it
// runs only when the request is new. meaning is the request's canonical
// form, which the Idempotency-Key fingerprint covers (body is its raw form,
// which records written by earlier versions fingerprinted). With an
// Idempotency-Key the request is scoped to the owner and endpoint.
func (h *Handler) mint(w http.ResponseWriter, r *http.Request, claims jwtauth.Claims, body []byte, meaning string, prepare func(context.Context) (*mintOp, *apiError)) error {
	owner := claims.Owner
	idemKey, present, aerr := idempotencyKey(r)
	if aerr != nil {
		return writeError(w, aerr)
	}
	if !present && h.RequireIdempotencyKey {
		return writeError(w, &apiError{status: http.StatusBadRequest, code: "idempotency_key_required",
			message: "This server requires an Idempotency-Key header on POST requests."})
	}
	ctx, cancel := h.storeCtx(r)
	defer cancel()
	if !present {
		op, aerr := prepare(ctx)
		if aerr != nil {
			return writeError(w, aerr)
		}
		if aerr := h.executeMint(ctx, op); aerr != nil {
			return writeError(w, aerr)
		}
		writeCreated(w, op.respBody, false)
		return nil
	}

	endpoint := r.Method + " " + r.URL.Path
	id := hashParts("idempotency", owner, endpoint, idemKey)
	fp := fingerprint{hashParts("meaning", endpoint, meaning), hashParts(endpoint, string(body))}
	existing, err := h.store.GetIdempotency(ctx, id)
	switch {
	case err == nil:
		return h.answerExisting(w, ctx, claims, id, fp, existing)
	case !errors.Is(err, keystore.ErrNotFound):
		h.logger.Error("idempotency lookup failed", zap.Error(err))
		return writeError(w, errStoreUnavailable)
	}

	// First sight of this key: validate, then record the full response
	// before storing anything.
	op, aerr := prepare(ctx)
	if aerr != nil {
		return writeError(w, aerr) // nothing stored: a corrected retry runs afresh
	}
	token, err := randomToken()
	if err != nil {
		return err
	}
	rec := &keystore.IdempotencyRecord{
		Token:       token,
		Fingerprint: fp.current,
		State:       keystore.IdempotencyPending,
		LockedUntil: h.now().Add(idempotencyLock),
		KeyID:       op.key.ID,
		Status:      http.StatusCreated,
		Body:        h.seal(id, op.respBody),
	}
	existing, err = h.store.ReserveIdempotency(ctx, id, rec, time.Duration(h.IdempotencyTTL))
	if err != nil {
		h.logger.Error("idempotency reserve failed", zap.Error(err))
		return writeError(w, errStoreUnavailable)
	}
	if existing != nil { // a concurrent request got there first
		return h.answerExisting(w, ctx, claims, id, fp, existing)
	}
	return h.finishIdempotent(w, ctx, id, rec, op)
}

// finishIdempotent executes the operation of a pending record this request
// holds, marks the record done and answers 201.
func (h *Handler) finishIdempotent(w http.ResponseWriter, ctx context.Context, id string, rec *keystore.IdempotencyRecord, op *mintOp) error {
	if aerr := h.executeMint(ctx, op); aerr != nil {
		// Release the key so a retry runs afresh, with a fresh deadline:
		// the failed writes may have used up ctx's. If even that fails, the
		// pending record lets a retry finish this same key after the lock.
		dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), h.storeTimeout)
		defer cancel()
		if derr := h.store.DeleteIdempotency(dctx, id, rec.Token); derr != nil {
			h.logger.Warn("releasing idempotency key failed", zap.Error(derr))
		}
		return writeError(w, aerr)
	}
	done := *rec
	done.State = keystore.IdempotencyDone
	if err := h.store.ReplaceIdempotency(ctx, id, rec.Token, &done, time.Duration(h.IdempotencyTTL)); err != nil {
		// The key is durably stored, so the client gets it. A retry that
		// finds the record still pending finishes the same key.
		h.logger.Warn("marking idempotency record done failed", zap.String("key_id", op.key.ID), zap.Error(err))
	}
	writeCreated(w, op.respBody, false)
	return nil
}

// executeMint stores the new key and, for a rotation, starts the old key's
// grace period. It is safe to run again for the same operation.
func (h *Handler) executeMint(ctx context.Context, op *mintOp) *apiError {
	// The limit is checked by the store in the same atomic step as the
	// insert, so parallel requests cannot overshoot it.
	switch err := h.store.CreateLimited(ctx, op.key, h.MaxKeysPerOwner, h.now()); {
	case errors.Is(err, keystore.ErrLimitReached):
		return h.keyLimitError()
	case err != nil:
		h.logger.Error("storing new key failed; nothing minted", zap.String("owner", op.key.Owner), zap.Error(err))
		return errStoreUnavailable
	}
	if op.replaces == "" {
		h.audit("created", op.key)
		return nil
	}
	old, err := h.store.Update(ctx, op.replaces, func(k *keystore.Key) error {
		return startGrace(k, op.key.ID, *op.graceEnd, h.now())
	})
	if err != nil {
		// Do not leave a second working key behind a failed rotation. The
		// failed Update may have used up ctx's deadline (or the client gone
		// away), so the clean-up gets a bounded deadline of its own.
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), h.storeTimeout)
		defer cancel()
		if _, rerr := h.store.Revoke(cctx, op.key.ID, h.now()); rerr != nil {
			h.logger.Error("revoking the new key of a failed rotation failed", zap.String("key_id", op.key.ID), zap.Error(rerr))
		}
		var aerr *apiError
		if errors.As(err, &aerr) {
			return aerr
		}
		h.logger.Error("rotating key failed", zap.String("key_id", op.replaces), zap.Error(err))
		return errStoreUnavailable
	}
	h.audit("rotated", old, zap.String("new_key_id", op.key.ID))
	h.audit("created", op.key, zap.String("replaces", old.ID))
	return nil
}

// fingerprint identifies a request for its Idempotency-Key: current is
// over the request's meaning, legacy over its bytes (as records written by
// earlier versions have it).
type fingerprint struct{ current, legacy string }

func (f fingerprint) matches(stored string) bool {
	return stored == f.current || stored == f.legacy
}

// answerExisting answers a request whose Idempotency-Key already has a
// record: replay, conflict, or take over abandoned work. A replay or a
// takeover is authorised as a fresh request would be: the session must be
// allowed to grant the key's scopes, and a replay must still describe a
// key that validates as it did then.
func (h *Handler) answerExisting(w http.ResponseWriter, ctx context.Context, claims jwtauth.Claims, id string, fp fingerprint, rec *keystore.IdempotencyRecord) error {
	owner := claims.Owner
	if !fp.matches(rec.Fingerprint) {
		return writeError(w, &apiError{status: http.StatusUnprocessableEntity, code: "idempotency_key_reused",
			message: "This Idempotency-Key was used with a different request; use a new key for a new request."})
	}
	now := h.now()
	if rec.State != keystore.IdempotencyDone && now.Before(rec.LockedUntil) {
		return writeError(w, inProgress(h.retryAfter(rec, now)))
	}
	body, err := h.open(id, rec.Body)
	if err != nil {
		return h.unreadableRecord(w, err)
	}
	op, err := h.opFromResponse(owner, body)
	if err != nil {
		return h.unreadableRecord(w, err)
	}
	if aerr := h.grantable(claims, op.key.Scopes); aerr != nil {
		return writeError(w, aerr)
	}
	if rec.State == keystore.IdempotencyDone {
		k, aerr := h.replayable(ctx, op.key)
		if aerr != nil {
			return writeError(w, aerr)
		}
		h.audit("replayed", k)
		metricIdempotentReplays.Inc()
		writeCreated(w, body, true)
		return nil
	}

	// The holder went away without finishing: take the record over and
	// finish the very same key, unless it was stored and has changed since
	// (it was listed, so it may have been revoked): then it is a replay of
	// a key that no longer validates as announced.
	switch k, err := h.store.Get(ctx, op.key.ID); {
	case errors.Is(err, keystore.ErrNotFound): // not stored yet
	case err != nil:
		h.logger.Error("loading the key of an abandoned idempotent request failed", zap.Error(err))
		return writeError(w, errStoreUnavailable)
	default:
		if aerr := h.asAnnounced(k, op.key); aerr != nil {
			return writeError(w, aerr)
		}
	}
	token, err := randomToken()
	if err != nil {
		return err
	}
	taken := *rec
	taken.Token = token
	taken.LockedUntil = now.Add(idempotencyLock)
	err = h.store.ReplaceIdempotency(ctx, id, rec.Token, &taken, time.Duration(h.IdempotencyTTL))
	switch {
	case errors.Is(err, keystore.ErrConflict): // another retry took it first
		return writeError(w, inProgress(1))
	case err != nil:
		return writeError(w, errStoreUnavailable)
	}
	h.logger.Info("finishing abandoned idempotent request", zap.String("key_id", op.key.ID), zap.String("owner", owner))
	return h.finishIdempotent(w, ctx, id, &taken, op)
}

// retryAfter is the number of seconds (at least 1) after which a request
// that found rec pending should retry. The holder reserved rec
// idempotencyLock before rec.LockedUntil, inside a request whose store calls
// all share one store_timeout, so it finishes (or releases rec) within
// store_timeout of that. A holder past that point has most likely died:
// then the record can be taken over once the lock runs out.
func (h *Handler) retryAfter(rec *keystore.IdempotencyRecord, now time.Time) int {
	wait := rec.LockedUntil.Add(-idempotencyLock + h.storeTimeout).Sub(now)
	if wait <= 0 {
		wait = rec.LockedUntil.Sub(now)
	}
	return max(int(math.Ceil(wait.Seconds())), 1)
}

// replayable loads the key a stored response announced and checks that it
// still validates as the response says (see asAnnounced). Otherwise the raw
// key is not shown again.
func (h *Handler) replayable(ctx context.Context, announced *keystore.Key) (*keystore.Key, *apiError) {
	k, err := h.store.Get(ctx, announced.ID)
	switch {
	case errors.Is(err, keystore.ErrNotFound):
		return nil, replayUnavailable(announced.ID, "deleted")
	case err != nil:
		h.logger.Error("loading the key of an idempotent replay failed", zap.Error(err))
		return nil, errStoreUnavailable
	}
	return k, h.asAnnounced(k, announced)
}

// asAnnounced checks that the stored key k is the announced one and still
// validates as announced: not revoked, expired or rotated, with the same
// scopes and expiry.
func (h *Handler) asAnnounced(k, announced *keystore.Key) *apiError {
	if k.Owner != announced.Owner {
		// (Not the digest: a key minted under a previous secret has that
		// secret's digest.)
		return replayUnavailable(announced.ID, "deleted")
	}
	if st := k.Status(h.now()); st != keystore.StatusActive {
		return replayUnavailable(k.ID, st)
	}
	if !slices.Equal(k.Scopes, announced.Scopes) || (k.Scopes == nil) != (announced.Scopes == nil) ||
		!sameTime(k.ExpiresAt, announced.ExpiresAt) {
		return replayUnavailable(k.ID, "changed")
	}
	return nil
}

// replayUnavailable is the answer to a replay whose key no longer
// validates as the stored response says (status: revoked, expired,
// rotating, changed, deleted).
func replayUnavailable(keyID, status string) *apiError {
	what := map[string]string{
		keystore.StatusRevoked:  "has been revoked",
		keystore.StatusExpired:  "has expired",
		keystore.StatusRotating: "has been rotated",
		keystore.StatusDisabled: "has been disabled",
		"changed":               "has had its scopes or expiry changed",
		"deleted":               "no longer exists",
	}[status]
	return &apiError{status: http.StatusConflict, code: "idempotency_replay_unavailable",
		message: "Key " + keyID + ", created by the request with this Idempotency-Key, " + what +
			"; its key is not shown again. Use a new Idempotency-Key to create another key."}
}

func sameTime(a, b *time.Time) bool {
	if a == nil || b == nil {
		return a == nil && b == nil
	}
	return a.Equal(*b)
}

func inProgress(retryAfter int) *apiError {
	return &apiError{status: http.StatusConflict, code: "idempotency_in_progress",
		message: "A request with this Idempotency-Key is still being processed; retry after it finishes.",
		header:  http.Header{"Retry-After": {strconv.Itoa(retryAfter)}}}
}

func (h *Handler) unreadableRecord(w http.ResponseWriter, err error) error {
	// Most likely the secret changed since the record was written.
	h.logger.Error("idempotency record cannot be read", zap.Error(err))
	return writeError(w, &apiError{status: http.StatusInternalServerError, code: "internal_error",
		message: "The stored result of this Idempotency-Key cannot be read; use a new Idempotency-Key."})
}

// opFromResponse rebuilds the operation from its sealed response.
func (h *Handler) opFromResponse(owner string, body []byte) (*mintOp, error) {
	var env struct {
		Data keyResponse `json:"data"`
	}
	if err := json.Unmarshal(body, &env); err != nil {
		return nil, fmt.Errorf("apikeys: decode idempotency record: %w", err)
	}
	d := env.Data
	if keystore.Check(h.KeyPrefix, d.Key) != nil {
		return nil, errors.New("apikeys: idempotency record holds no valid key")
	}
	k := &keystore.Key{ID: d.KeyID, Owner: owner, Name: d.Name, Prefix: d.Prefix,
		Digest: h.hasher.Digest(d.Key), Scopes: d.Scopes, CreatedAt: d.CreatedAt.Time, Replaces: d.Replaces}
	if d.ExpiresAt != nil {
		t := d.ExpiresAt.Time
		k.ExpiresAt = &t
	}
	op := &mintOp{key: k, respBody: body, replaces: d.Replaces}
	if d.Replaces != "" {
		if d.GracePeriodEndsAt == nil {
			return nil, errors.New("apikeys: idempotency record of a rotation has no grace period end")
		}
		t := d.GracePeriodEndsAt.Time
		op.graceEnd = &t
	}
	return op, nil
}

// newSealer derives the AES-256-GCM key that encrypts stored replays.
func newSealer(secret []byte) (cipher.AEAD, error) {
	k, err := keystore.DeriveKey(secret, "idempotency-seal", 32)
	if err != nil {
		return nil, fmt.Errorf("apikeys: %w", err)
	}
	block, err := aes.NewCipher(k)
	if err != nil {
		return nil, err
	}
	return cipher.NewGCM(block)
}

// seal encrypts a response body, bound to its record id.
func (h *Handler) seal(id string, plain []byte) []byte {
	sealer := h.sealers[0]
	nonce := make([]byte, sealer.NonceSize(), sealer.NonceSize()+len(plain)+sealer.Overhead())
	_, _ = rand.Read(nonce) // crypto/rand.Read never fails
	return sealer.Seal(nonce, nonce, plain, []byte(id))
}

// open decrypts what seal produced, under the current or a previous
// secret.
func (h *Handler) open(id string, sealed []byte) ([]byte, error) {
	var err error
	for _, sealer := range h.sealers {
		n := sealer.NonceSize()
		if len(sealed) < n {
			return nil, errors.New("apikeys: sealed record too short")
		}
		var plain []byte
		if plain, err = sealer.Open(nil, sealed[:n], sealed[n:], []byte(id)); err == nil {
			return plain, nil
		}
	}
	return nil, err
}

func randomToken() (string, error) {
	b := make([]byte, 16)
	if _, err := rand.Read(b); err != nil {
		return "", err
	}
	return hex.EncodeToString(b), nil
}
