package apikeys

import (
	"cmp"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"

	"github.com/caddy-apikeys/caddy-apikeys/jwtauth"
	"github.com/caddy-apikeys/caddy-apikeys/keystore"
)

// Limits and defaults of the lifecycle endpoints.
const (
	DefaultListLimit       = 20
	maxListLimit           = 100
	DefaultGracePeriod     = 24 * time.Hour
	maxGracePeriodSeconds  = 30 * 24 * 60 * 60
	DefaultMaxKeysPerOwner = 1000
)

// keyView is a stored key as the API shows it: never the key or its hash.
type keyView struct {
	KeyID      string   `json:"key_id"`
	Name       string   `json:"name"`
	Prefix     string   `json:"prefix"`
	Scopes     []string `json:"scopes"`
	ExpiresAt  *apiTime `json:"expires_at"`
	CreatedAt  apiTime  `json:"created_at"`
	LastUsedAt *apiTime `json:"last_used_at"`
	Status     string   `json:"status"`
	Enabled    bool     `json:"enabled"`
	RevokedAt  *apiTime `json:"revoked_at,omitempty"`
	Replaces   string   `json:"replaces,omitempty"`
	ReplacedBy string   `json:"replaced_by,omitempty"`
	// Meta appears only for a key that has metadata.
	Meta json.RawMessage `json:"meta,omitempty"`
	// Plan appears only for a key that has a plan, Usage only where its
	// plan has a quota (see Handler.keyView).
	Plan  string     `json:"plan,omitempty"`
	Usage *usageView `json:"usage,omitempty"`
}

func newKeyView(k *keystore.Key, now time.Time) keyView {
	v := keyView{KeyID: k.ID, Name: k.Name, Prefix: k.Prefix, Scopes: k.Scopes,
		CreatedAt: apiTime{k.CreatedAt}, Status: k.Status(now), Enabled: !k.Disabled,
		Replaces: k.Replaces, ReplacedBy: k.ReplacedBy, Meta: k.Meta, Plan: k.Plan}
	v.ExpiresAt = optTime(k.ExpiresAt)
	v.LastUsedAt = optTime(k.LastUsedAt)
	v.RevokedAt = optTime(k.RevokedAt)
	return v
}

func optTime(t *time.Time) *apiTime {
	if t == nil {
		return nil
	}
	return &apiTime{*t}
}

// listResponse is the `data` of GET /v1/apikeys.
type listResponse struct {
	Keys       []keyView `json:"keys"`
	NextCursor *string   `json:"next_cursor"`
}

// listQuery is the paging and filter of a list request.
type listQuery struct {
	limit  int
	status string // "" for every status
	cursor string // decoded
}

// parseListQuery reads `limit`, `status` and `cursor` of a list request
// (also of a prefix search).
func parseListQuery(q url.Values) (listQuery, *apiError) {
	lq := listQuery{limit: DefaultListLimit, status: q.Get("status")}
	if s := q.Get("limit"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 || n > maxListLimit {
			return lq, validationError("limit", fmt.Sprintf("`limit` must be a whole number from 1 to %d.", maxListLimit))
		}
		lq.limit = n
	}
	switch lq.status {
	case "", keystore.StatusActive, keystore.StatusRotating, keystore.StatusExpired, keystore.StatusRevoked, keystore.StatusDisabled:
	default:
		return lq, validationError("status", "`status` must be one of active, rotating, disabled, expired, revoked.")
	}
	if s := q.Get("cursor"); s != "" {
		b, err := base64.RawURLEncoding.DecodeString(s)
		if err != nil {
			return lq, validationError("cursor", "`cursor` is not a cursor this API returned.")
		}
		lq.cursor = string(b)
	}
	return lq, nil
}

// serveList answers GET /v1/apikeys?limit=&cursor=&status=, the caller's
// keys newest first.
func (h *Handler) serveList(w http.ResponseWriter, r *http.Request, claims jwtauth.Claims) error {
	q := r.URL.Query()
	if q.Has("prefix") {
		return h.serveFindPrefix(w, r, claims) // findkeys.go
	}
	lq, aerr := parseListQuery(q)
	if aerr != nil {
		return writeError(w, aerr)
	}
	limit, status, cursor := lq.limit, lq.status, lq.cursor

	ctx, cancel := h.storeCtx(r)
	defer cancel()
	now := h.now()
	resp := listResponse{Keys: []keyView{}}
	var (
		keys []*keystore.Key
		next string
		err  error
	)
	if status == "" {
		keys, next, err = h.store.List(ctx, claims.Owner, cursor, limit)
	} else {
		// A bounded scan: an owner with a long history of revoked keys
		// gets a short (even empty) page with a cursor rather than a
		// request that reads every key it ever had.
		keys, next, err = keystore.ListFiltered(ctx, h.store, claims.Owner, cursor, limit, keystore.DefaultListScan,
			func(k *keystore.Key) bool { return k.Status(now) == status })
	}
	if errors.Is(err, keystore.ErrInvalidCursor) {
		return writeError(w, validationError("cursor", "`cursor` is not a cursor this API returned."))
	}
	if err != nil {
		h.logger.Error("listing keys failed", zap.Error(err))
		return writeError(w, errStoreUnavailable)
	}
	for _, k := range keys {
		resp.Keys = append(resp.Keys, h.keyView(ctx, k, now))
	}
	if next != "" {
		c := base64.RawURLEncoding.EncodeToString([]byte(next))
		resp.NextCursor = &c
	}
	return writeData(w, http.StatusOK, resp)
}

// ownedKey loads a key of the caller. Another owner's key is not found.
func (h *Handler) ownedKey(ctx context.Context, owner, id string) (*keystore.Key, *apiError) {
	k, err := h.store.Get(ctx, id)
	switch {
	case errors.Is(err, keystore.ErrNotFound):
		return nil, errNotFound
	case err != nil:
		h.logger.Error("loading key failed", zap.Error(err))
		return nil, errStoreUnavailable
	case k.Owner != owner:
		return nil, errNotFound
	}
	return k, nil
}

// serveGet answers GET /v1/apikeys/{id}.
func (h *Handler) serveGet(w http.ResponseWriter, r *http.Request, claims jwtauth.Claims, id string) error {
	ctx, cancel := h.storeCtx(r)
	defer cancel()
	k, aerr := h.ownedKey(ctx, claims.Owner, id)
	if aerr != nil {
		return writeError(w, aerr)
	}
	return writeData(w, http.StatusOK, h.keyView(ctx, k, h.now()))
}

// servePatch answers PATCH /v1/apikeys/{id}: a new name, scopes, meta or
// plan, validated as on create (`meta: null` removes the metadata, `plan:
// null` the plan: the key is then not limited; default_plan applies only
// at create), and `enabled` to disable or enable the key. A revoked or
// expired key is 409.
func (h *Handler) servePatch(w http.ResponseWriter, r *http.Request, claims jwtauth.Claims, id string) error {
	body, aerr := readJSONBody(w, r, false)
	if aerr != nil {
		return writeError(w, aerr)
	}
	fields, aerr := decodeObject(body, "name", "scopes", "meta", "enabled", "plan")
	if aerr != nil {
		return writeError(w, aerr)
	}
	if len(fields) == 0 {
		return writeError(w, validationError("", "Send `name`, `scopes`, `meta`, `plan` and/or `enabled` to change."))
	}
	var name string
	if raw, ok := fields["name"]; ok {
		if isNull(raw) || json.Unmarshal(raw, &name) != nil {
			return writeError(w, validationError("name", "`name` must be a string."))
		}
		if aerr := validateName(name); aerr != nil {
			return writeError(w, aerr)
		}
	}
	var scopes []string
	raw, changeScopes := fields["scopes"]
	if changeScopes && !isNull(raw) {
		if scopes, aerr = h.parseScopes(raw); aerr != nil {
			return writeError(w, aerr)
		}
	}
	if changeScopes {
		if aerr := h.grantable(claims, scopes); aerr != nil {
			return writeError(w, aerr)
		}
	}
	var meta json.RawMessage
	raw, changeMeta := fields["meta"]
	if changeMeta && !isNull(raw) {
		if meta, aerr = parseMeta(raw); aerr != nil {
			return writeError(w, aerr)
		}
	}
	var plan string
	raw, changePlan := fields["plan"]
	if changePlan {
		if plan, aerr = h.parsePlan(raw); aerr != nil {
			return writeError(w, aerr)
		}
		if aerr := h.planGrantable(claims, plan); aerr != nil {
			return writeError(w, aerr)
		}
	}
	var enabled bool
	raw, changeEnabled := fields["enabled"]
	if changeEnabled && (isNull(raw) || json.Unmarshal(raw, &enabled) != nil) {
		return writeError(w, validationError("enabled", "`enabled` must be true or false."))
	}

	ctx, cancel := h.storeCtx(r)
	defer cancel()
	if _, aerr := h.ownedKey(ctx, claims.Owner, id); aerr != nil {
		return writeError(w, aerr)
	}
	now := h.now()
	var toggled bool // the update changed whether the key is disabled
	k, err := h.store.Update(ctx, id, func(k *keystore.Key) error {
		if st := k.Status(now); st == keystore.StatusRevoked || st == keystore.StatusExpired {
			return keyNotActive(st)
		}
		if name != "" {
			k.Name = name
		}
		if changeScopes {
			k.Scopes = scopes
		}
		if changeMeta {
			k.Meta = meta
		}
		if changePlan {
			k.Plan = plan
		}
		toggled = false
		if changeEnabled {
			toggled = k.Disabled == enabled
			k.Disabled = !enabled
		}
		return nil
	})
	if aerr := h.storeError(err, "updating key"); aerr != nil {
		return writeError(w, aerr)
	}
	if name != "" || changeScopes || changeMeta || changePlan {
		h.audit("updated", k)
	}
	switch {
	case toggled && k.Disabled:
		h.audit("disabled", k)
	case toggled:
		h.audit("enabled", k)
	}
	return writeData(w, http.StatusOK, h.keyView(ctx, k, now))
}

// serveRevoke answers DELETE /v1/apikeys/{id}. Revoking a revoked key
// answers its record again (200), so a retried DELETE is harmless.
func (h *Handler) serveRevoke(w http.ResponseWriter, r *http.Request, claims jwtauth.Claims, id string) error {
	ctx, cancel := h.storeCtx(r)
	defer cancel()
	if _, aerr := h.ownedKey(ctx, claims.Owner, id); aerr != nil {
		return writeError(w, aerr)
	}
	k, err := h.store.Revoke(ctx, id, h.now().UTC().Truncate(time.Millisecond))
	if aerr := h.storeError(err, "revoking key"); aerr != nil {
		return writeError(w, aerr)
	}
	h.audit("revoked", k)
	return writeData(w, http.StatusOK, h.keyView(ctx, k, h.now()))
}

// rotationPlan is the old key of a rotation and the end of its grace.
type rotationPlan struct {
	oldID    string
	graceEnd time.Time
}

// serveRotate answers POST /v1/apikeys/{id}/rotate with an optional
// `grace_period_seconds` and `plan`: a new key with the same name, scopes,
// expiry and (unless `plan` names another) plan, metered under the same
// subject as the old one, so it keeps its quota usage; the old key works
// until the grace period ends.
func (h *Handler) serveRotate(w http.ResponseWriter, r *http.Request, claims jwtauth.Claims, id string) error {
	body, aerr := readJSONBody(w, r, true)
	if aerr != nil {
		return writeError(w, aerr)
	}
	grace := DefaultGracePeriod
	var plan string
	if len(body) > 0 {
		fields, aerr := decodeObject(body, "grace_period_seconds", "plan")
		if aerr != nil {
			return writeError(w, aerr)
		}
		if raw, ok := fields["grace_period_seconds"]; ok && !isNull(raw) {
			secs, aerr := parseWhole(raw, "grace_period_seconds", 0, maxGracePeriodSeconds)
			if aerr != nil {
				return writeError(w, aerr)
			}
			grace = time.Duration(secs) * time.Second
		}
		if raw, ok := fields["plan"]; ok {
			if plan, aerr = h.parsePlan(raw); aerr != nil {
				return writeError(w, aerr)
			}
		}
	}
	meaning := strconv.FormatInt(int64(grace/time.Second), 10)
	if plan != "" {
		// Rotations without a plan keep their earlier fingerprint.
		meaning += " plan=" + plan
	}
	return h.mint(w, r, claims, body, meaning, func(ctx context.Context) (*mintOp, *apiError) {
		return h.prepareRotate(ctx, claims, id, grace, plan)
	})
}

// prepareRotate checks that the session's key id can be rotated and mints
// its replacement (not stored yet).
func (h *Handler) prepareRotate(ctx context.Context, claims jwtauth.Claims, id string, grace time.Duration, plan string) (*mintOp, *apiError) {
	old, aerr := h.ownedKey(ctx, claims.Owner, id)
	if aerr != nil {
		return nil, aerr
	}
	now := h.now().UTC().Truncate(time.Millisecond)
	if st := old.Status(now); st != keystore.StatusActive {
		if st == keystore.StatusRotating {
			return nil, &apiError{status: http.StatusConflict, code: "key_already_rotated",
				message: "This key was already rotated; rotate its replacement " + old.ReplacedBy + " instead."}
		}
		// A disabled key is not rotated: its replacement would either
		// work (undoing the suspension) or start disabled (a rotation
		// that hands out a key that does not work).
		return nil, keyNotActive(st)
	}
	if aerr := h.grantable(claims, old.Scopes); aerr != nil {
		return nil, aerr
	}
	plan = cmp.Or(plan, old.Plan)
	if aerr := h.planGrantable(claims, plan); aerr != nil {
		return nil, aerr
	}
	raw, err := keystore.Mint(h.KeyPrefix)
	if err != nil {
		return nil, internalError(err)
	}
	newID, err := keystore.NewKeyID()
	if err != nil {
		return nil, internalError(err)
	}
	k := &keystore.Key{ID: newID, Owner: old.Owner, Name: old.Name, Prefix: keystore.DisplayPrefix(h.KeyPrefix, raw),
		Digest: h.hasher.Digest(raw), Scopes: old.Scopes, CreatedAt: now, ExpiresAt: old.ExpiresAt, Replaces: old.ID,
		Meta: old.Meta, Plan: plan, Meter: old.MeterID()}
	graceEnd := now.Add(grace)
	if old.ExpiresAt != nil && old.ExpiresAt.Before(graceEnd) {
		graceEnd = *old.ExpiresAt
	}
	return newMintOp(k, raw, &rotationPlan{oldID: old.ID, graceEnd: graceEnd})
}

// startGrace marks k as replaced by newID and ends its life at graceEnd.
// Running it again for the same rotation changes nothing.
func startGrace(k *keystore.Key, newID string, graceEnd, now time.Time) error {
	switch {
	case k.ReplacedBy == newID:
		return nil
	case k.ReplacedBy != "":
		return &apiError{status: http.StatusConflict, code: "key_already_rotated",
			message: "This key was already rotated; rotate its replacement " + k.ReplacedBy + " instead."}
	}
	if st := k.Status(now); st != keystore.StatusActive {
		return keyNotActive(st)
	}
	k.ReplacedBy = newID
	if k.ExpiresAt == nil || graceEnd.Before(*k.ExpiresAt) {
		k.ExpiresAt = &graceEnd
	}
	return nil
}

func keyNotActive(status string) *apiError {
	if status == keystore.StatusDisabled {
		return &apiError{status: http.StatusConflict, code: "key_not_active",
			message: "This key is disabled and cannot be rotated; enable it first (PATCH with `enabled: true`)."}
	}
	return &apiError{status: http.StatusConflict, code: "key_not_active",
		message: "This key is " + status + " and cannot be changed."}
}

// grantable checks that the session may grant scopes (nil: full access)
// when dashboard_jwt names a scopes_claim.
func (h *Handler) grantable(claims jwtauth.Claims, scopes []string) *apiError {
	if h.DashboardJWT == nil || h.DashboardJWT.ScopesClaim == "" || slices.Contains(claims.Scopes, "*") {
		return nil
	}
	if scopes == nil {
		return &apiError{status: http.StatusForbidden, code: "scope_not_grantable", field: "scopes",
			message: "Your session may not grant full access; list the scopes the key needs."}
	}
	for _, s := range scopes {
		if !slices.Contains(claims.Scopes, s) {
			return &apiError{status: http.StatusForbidden, code: "scope_not_grantable", field: "scopes",
				message: fmt.Sprintf("Your session may not grant scope %q.", s)}
		}
	}
	return nil
}

// keyLimitError is the answer to a create or rotation that would give the
// owner more than max_keys_per_owner live keys.
func (h *Handler) keyLimitError() *apiError {
	return &apiError{status: http.StatusConflict, code: "key_limit_reached",
		message: fmt.Sprintf("You hold %d active keys, the most this server allows; revoke keys you no longer use.", h.MaxKeysPerOwner)}
}

// storeError maps a store error to an answer; nil for nil.
func (h *Handler) storeError(err error, doing string) *apiError {
	var aerr *apiError
	switch {
	case err == nil:
		return nil
	case errors.As(err, &aerr):
		return aerr
	case errors.Is(err, keystore.ErrNotFound):
		return errNotFound
	}
	h.logger.Error(doing+" failed", zap.Error(err))
	return errStoreUnavailable
}

func internalError(err error) *apiError {
	caddy.Log().Named("http.handlers.apikeys").Error("internal error", zap.Error(err))
	return &apiError{status: http.StatusInternalServerError, code: "internal_error",
		message: "The server failed to handle this request."}
}

// audit logs a change to a key at Info and emits it as a Caddy event
// ("apikeys.<action>"), never with the key itself.
func (h *Handler) audit(action string, k *keystore.Key, extra ...zap.Field) {
	fields := append([]zap.Field{zap.String("action", action), zap.String("key_id", k.ID), zap.String("owner", k.Owner)}, extra...)
	h.logger.Info("api key "+action, fields...)
	if h.events != nil {
		data := map[string]any{"action": action, "key_id": k.ID, "owner": k.Owner}
		for _, f := range extra {
			data[f.Key] = f.String
		}
		h.events.Emit(h.ctx, "apikeys."+action, data)
	}
}
