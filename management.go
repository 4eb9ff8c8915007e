package apikeys

import (
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"mime"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/caddy-apikeys/caddy-apikeys/jwtauth"
	"github.com/caddy-apikeys/caddy-apikeys/keystore"
)

// Limits of the management API's input.
const (
	maxBodyBytes          = 64 << 10
	maxNameLen            = 128 // characters
	maxScopes             = 50
	maxScopeLen           = 64
	maxExpiresInDaysLimit = 36500
)

// serveManagement answers requests at and below the management path:
//
//	POST   /v1/apikeys              create
//	GET    /v1/apikeys              list the caller's keys
//	GET    /v1/apikeys/{id}         one key
//	PATCH  /v1/apikeys/{id}         rename, change scopes or meta, disable, enable
//	DELETE /v1/apikeys/{id}         revoke
//	POST   /v1/apikeys/{id}/rotate  replace with a new key, old one kept for a grace period
//	GET    /v1/apikeys/{id}/usage   daily counts of accepted and refused requests
func (h *Handler) serveManagement(w http.ResponseWriter, r *http.Request) error {
	if h.verifier == nil {
		return writeError(w, &apiError{status: http.StatusNotFound, code: "not_found",
			message: "Key management is not enabled on this server (no dashboard_jwt is configured)."})
	}
	id, action, ok := h.managementRoute(r.URL.Path)
	methods := routeMethods(id, action, ok)
	if r.Method == http.MethodOptions {
		return h.preflight(w, r, methods) // never 401: browsers send no credentials here
	}
	h.corsHeaders(w, r)
	if !ok {
		// Unknown path: say nothing to strangers.
		if _, ok := h.authenticateDashboard(w, r); !ok {
			return nil
		}
		return writeError(w, errNotFound)
	}
	// Methods are case-sensitive tokens (RFC 9110 §9.1): only an exact
	// match of a documented method reaches an endpoint.
	if !slices.Contains(methods, r.Method) {
		allow := strings.Join(methods, ", ")
		w.Header().Set("Allow", allow)
		return writeError(w, &apiError{status: http.StatusMethodNotAllowed, code: "method_not_allowed",
			message: "This endpoint allows " + allow + "."})
	}
	claims, ok := h.authenticateDashboard(w, r)
	if !ok {
		return nil
	}
	switch {
	case id == "" && r.Method == http.MethodPost:
		return h.serveCreate(w, r, claims)
	case id == "":
		return h.serveList(w, r, claims)
	case action == "rotate":
		return h.serveRotate(w, r, claims, id)
	case action == "usage":
		return h.serveUsage(w, r, claims, id)
	case r.Method == http.MethodGet:
		return h.serveGet(w, r, claims, id)
	case r.Method == http.MethodPatch:
		return h.servePatch(w, r, claims, id)
	default:
		return h.serveRevoke(w, r, claims, id)
	}
}

// routeMethods returns the methods of a management route (as
// managementRoute found it), in the order Allow names them; nil for a path
// that is no route.
func routeMethods(id, action string, ok bool) []string {
	switch {
	case !ok:
		return nil
	case id == "":
		return []string{http.MethodGet, http.MethodPost}
	case action == "":
		return []string{http.MethodGet, http.MethodPatch, http.MethodDelete}
	case action == "usage":
		return []string{http.MethodGet}
	default:
		return []string{http.MethodPost}
	}
}

// managementRoute splits a path below the management path into a key ID
// and an action ("rotate", "usage"). ok is false for paths that are no endpoint.
func (h *Handler) managementRoute(p string) (id, action string, ok bool) {
	rest := strings.TrimPrefix(p, h.ManagementPath)
	if rest == "" {
		return "", "", true
	}
	parts := strings.Split(strings.TrimPrefix(rest, "/"), "/")
	if !validKeyID(parts[0]) {
		return "", "", false
	}
	switch {
	case len(parts) == 1:
		return parts[0], "", true
	case len(parts) == 2 && (parts[1] == "rotate" || parts[1] == "usage"):
		return parts[0], parts[1], true
	}
	return "", "", false
}

// validKeyID reports whether s can be a key ID; anything else is not found.
func validKeyID(s string) bool {
	if len(s) < 5 || len(s) > 64 || !strings.HasPrefix(s, "key_") {
		return false
	}
	for i := 4; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9') {
			return false
		}
	}
	return true
}

// serveCreate answers POST /v1/apikeys.
func (h *Handler) serveCreate(w http.ResponseWriter, r *http.Request, claims jwtauth.Claims) error {
	body, aerr := readJSONBody(w, r, false)
	if aerr != nil {
		return writeError(w, aerr)
	}
	req, aerr := h.parseCreateRequest(body)
	if aerr != nil {
		return writeError(w, aerr) // nothing stored: a corrected retry runs afresh
	}
	return h.mint(w, r, claims, body, req.meaning(), func(ctx context.Context) (*mintOp, *apiError) {
		return h.prepareCreate(ctx, claims, req)
	})
}

// prepareCreate checks that the session may create the key req asks for
// and mints it (not stored yet).
func (h *Handler) prepareCreate(ctx context.Context, claims jwtauth.Claims, req createRequest) (*mintOp, *apiError) {
	if aerr := h.grantable(claims, req.Scopes); aerr != nil {
		return nil, aerr
	}
	if aerr := h.planGrantable(claims, cmp.Or(req.Plan, h.DefaultPlan)); aerr != nil {
		return nil, aerr
	}
	key, raw, err := h.newKey(claims.Owner, req)
	if err != nil {
		return nil, internalError(err)
	}
	return newMintOp(key, raw, nil)
}

// writeCreated answers a minted key. The body holds the raw key, so it
// must never be cached.
func writeCreated(w http.ResponseWriter, body []byte, replayed bool) {
	w.Header().Set("Cache-Control", "no-store")
	if replayed {
		w.Header().Set("Idempotent-Replayed", "true")
	}
	writeRaw(w, http.StatusCreated, body)
}

// authenticateDashboard verifies the dashboard JWT. On failure it has
// already answered and ok is false.
func (h *Handler) authenticateDashboard(w http.ResponseWriter, r *http.Request) (claims jwtauth.Claims, ok bool) {
	token, ok := bearerToken(r)
	if !ok {
		w.Header().Set("WWW-Authenticate", h.challenge)
		_ = writeError(w, &apiError{status: http.StatusUnauthorized, code: "unauthorized",
			message: "Sign in to the dashboard and send its session token as `Authorization: Bearer <jwt>`."})
		return claims, false
	}
	if strings.HasPrefix(token, h.KeyPrefix) {
		_ = writeError(w, &apiError{status: http.StatusForbidden, code: "api_key_not_allowed",
			message: "API keys cannot manage API keys; use a dashboard session token."})
		return claims, false
	}
	claims, err := h.verifier.Verify(token)
	if err != nil {
		// jwtauth errors name the reason, never the token.
		w.Header().Set("WWW-Authenticate", h.challenge+`, error="invalid_token"`)
		_ = writeError(w, &apiError{status: http.StatusUnauthorized, code: "invalid_token",
			message: "The dashboard token was refused: " + strings.TrimPrefix(err.Error(), "jwtauth: ") + "."})
		return claims, false
	}
	return claims, true
}

// readJSONBody checks the content type and reads a bounded body. With
// allowEmpty, a request without a body (and then without a content type)
// gives an empty body.
func readJSONBody(w http.ResponseWriter, r *http.Request, allowEmpty bool) ([]byte, *apiError) {
	if allowEmpty && r.ContentLength == 0 && r.Header.Get("Content-Type") == "" {
		return nil, nil
	}
	mt, _, err := mime.ParseMediaType(r.Header.Get("Content-Type"))
	if err != nil || mt != "application/json" {
		return nil, &apiError{status: http.StatusUnsupportedMediaType, code: "unsupported_media_type",
			message: "Send the request body as JSON with `Content-Type: application/json`."}
	}
	tooLarge := &apiError{status: http.StatusRequestEntityTooLarge, code: "payload_too_large",
		message: fmt.Sprintf("The request body is larger than %d KiB.", maxBodyBytes>>10)}
	if r.ContentLength > maxBodyBytes {
		return nil, tooLarge
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxBodyBytes))
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return nil, tooLarge
		}
		return nil, &apiError{status: http.StatusBadRequest, code: "invalid_request",
			message: "The request body could not be read."}
	}
	return body, nil
}

// createRequest is a validated body of POST /v1/apikeys.
type createRequest struct {
	Name          string   `json:"name"`
	Scopes        []string `json:"scopes"`          // nil: full access
	ExpiresInDays int      `json:"expires_in_days"` // 0: never expires
	// Meta is the canonical form of `meta` (see parseMeta); nil: none.
	// Left out of meaning when nil, so fingerprints of requests without
	// it are as before.
	Meta json.RawMessage `json:"meta,omitempty"`
	// Plan is the plan asked for; "" (left out of meaning, as Meta) when
	// none was, and the key then gets DefaultPlan.
	Plan string `json:"plan,omitempty"`
}

// meaning returns what the request asks for in one canonical form, so that
// the Idempotency-Key fingerprint does not depend on member order,
// whitespace, escapes, number spelling or an explicit null.
func (req createRequest) meaning() string {
	if req.Meta != nil {
		// Members sorted by name: re-encoded from a map.
		var v any
		dec := json.NewDecoder(bytes.NewReader(req.Meta))
		dec.UseNumber()
		if dec.Decode(&v) == nil {
			req.Meta, _ = json.Marshal(v)
		}
	}
	b, _ := json.Marshal(req) // cannot fail: strings, a string slice, an int, valid JSON
	return string(b)
}

// parseCreateRequest decodes and validates a create body strictly: unknown
// and duplicate fields, wrong types and bad values are all refused.
func (h *Handler) parseCreateRequest(body []byte) (createRequest, *apiError) {
	var req createRequest
	fields, aerr := decodeObject(body, "name", "scopes", "expires_in_days", "meta", "plan")
	if aerr != nil {
		return req, aerr
	}
	name, ok := fields["name"]
	if !ok || isNull(name) {
		return req, validationError("name", "`name` is required.")
	}
	if err := json.Unmarshal(name, &req.Name); err != nil {
		return req, validationError("name", "`name` must be a string.")
	}
	if aerr := validateName(req.Name); aerr != nil {
		return req, aerr
	}
	if raw, ok := fields["scopes"]; ok && !isNull(raw) {
		if req.Scopes, aerr = h.parseScopes(raw); aerr != nil {
			return req, aerr
		}
	}
	if raw, ok := fields["expires_in_days"]; ok && !isNull(raw) {
		if req.ExpiresInDays, aerr = parseWhole(raw, "expires_in_days", 1, h.MaxExpiresInDays); aerr != nil {
			return req, aerr
		}
	}
	if raw, ok := fields["meta"]; ok && !isNull(raw) {
		if req.Meta, aerr = parseMeta(raw); aerr != nil {
			return req, aerr
		}
	}
	if raw, ok := fields["plan"]; ok {
		if req.Plan, aerr = h.parsePlan(raw); aerr != nil {
			return req, aerr
		}
	}
	return req, nil
}

// decodeObject decodes body as one JSON object whose members are among
// allowed, each at most once, and returns the members' raw values.
func decodeObject(body []byte, allowed ...string) (map[string]json.RawMessage, *apiError) {
	invalid := func(msg string) *apiError {
		return &apiError{status: http.StatusBadRequest, code: "invalid_request", message: msg}
	}
	if !utf8.Valid(body) {
		return nil, invalid("The request body is not valid UTF-8.")
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.UseNumber()
	tok, err := dec.Token()
	if err != nil {
		return nil, invalid("The request body is not valid JSON.")
	}
	if d, ok := tok.(json.Delim); !ok || d != '{' {
		return nil, invalid("The request body must be a JSON object.")
	}
	fields := make(map[string]json.RawMessage, len(allowed))
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return nil, invalid("The request body is not valid JSON.")
		}
		name := tok.(string) // object keys are always strings
		known := false
		for _, a := range allowed {
			known = known || a == name
		}
		if !known {
			return nil, &apiError{status: http.StatusBadRequest, code: "validation_error",
				message: fmt.Sprintf("Unknown field %s; allowed fields are %s.", strconv.Quote(truncate(name, 64)), strings.Join(allowed, ", "))}
		}
		if _, dup := fields[name]; dup {
			return nil, validationError(name, fmt.Sprintf("Field `%s` appears more than once.", name))
		}
		var v json.RawMessage
		if err := dec.Decode(&v); err != nil {
			return nil, invalid("The request body is not valid JSON.")
		}
		fields[name] = v
	}
	if _, err := dec.Token(); err != nil { // the closing brace
		return nil, invalid("The request body is not valid JSON.")
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, invalid("The request body must hold exactly one JSON object.")
	}
	return fields, nil
}

func validationError(field, msg string) *apiError {
	return &apiError{status: http.StatusBadRequest, code: "validation_error", message: msg, field: field}
}

func isNull(raw json.RawMessage) bool { return string(raw) == "null" }

// validateName checks a key name: present, not blank, at most maxNameLen
// characters, no control characters, line or paragraph separators, or
// bidirectional controls (which make a name display as another).
func validateName(name string) *apiError {
	if strings.TrimSpace(name) == "" {
		return validationError("name", "`name` must not be empty.")
	}
	if utf8.RuneCountInString(name) > maxNameLen {
		return validationError("name", fmt.Sprintf("`name` must be at most %d characters.", maxNameLen))
	}
	for _, c := range name {
		if unicode.IsControl(c) || c == '\u2028' || c == '\u2029' || c == utf8.RuneError {
			return validationError("name", "`name` must not contain control characters.")
		}
		if unicode.Is(unicode.Bidi_Control, c) {
			return validationError("name", "`name` must not contain bidirectional control characters (U+061C, U+200E, U+200F, U+202A to U+202E, U+2066 to U+2069).")
		}
	}
	return nil
}

// parseScopes decodes a non-empty array of distinct, valid scope names.
func (h *Handler) parseScopes(raw json.RawMessage) ([]string, *apiError) {
	var scopes []string
	if err := json.Unmarshal(raw, &scopes); err != nil {
		return nil, validationError("scopes", "`scopes` must be an array of strings; omit it for a full-access key.")
	}
	switch {
	case len(scopes) == 0:
		return nil, validationError("scopes", "`scopes` must not be empty; omit it for a full-access key.")
	case len(scopes) > maxScopes:
		return nil, validationError("scopes", fmt.Sprintf("`scopes` may hold at most %d entries.", maxScopes))
	}
	seen := make(map[string]struct{}, len(scopes))
	for _, s := range scopes {
		if !validScope(s) {
			return nil, validationError("scopes", fmt.Sprintf("%s is not a valid scope: use letters, digits and . _ : - / (at most %d characters).", strconv.Quote(truncate(s, 64)), maxScopeLen))
		}
		if _, dup := seen[s]; dup {
			return nil, validationError("scopes", fmt.Sprintf("Scope %q is listed twice.", s))
		}
		seen[s] = struct{}{}
		if _, ok := h.declared[s]; len(h.declared) > 0 && !ok {
			return nil, &apiError{status: http.StatusBadRequest, code: "unknown_scope", field: "scopes",
				message: fmt.Sprintf("Scope %q is not offered by this server.", s)}
		}
	}
	return scopes, nil
}

// validScope reports whether s is a well-formed scope name.
func validScope(s string) bool {
	if s == "" || len(s) > maxScopeLen {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9':
		case i > 0 && (c == '.' || c == '_' || c == ':' || c == '-' || c == '/'):
		default:
			return false
		}
	}
	return true
}

// parseWhole decodes a whole number from min to max for field.
func parseWhole(raw json.RawMessage, field string, min, max int) (int, *apiError) {
	bad := validationError(field, fmt.Sprintf("`%s` must be a whole number from %d to %d.", field, min, max))
	var n json.Number
	// json.Number also decodes from a string; a quoted "90" is refused.
	if raw[0] == '"' || json.Unmarshal(raw, &n) != nil {
		return 0, bad
	}
	f, err := strconv.ParseFloat(string(n), 64)
	if err != nil || math.IsInf(f, 0) || f != math.Trunc(f) || f < float64(min) || f > float64(max) {
		return 0, bad
	}
	return int(f), nil
}

// newKey mints a key for owner. The raw key is returned once, for the
// response, and never stored.
func (h *Handler) newKey(owner string, req createRequest) (*keystore.Key, string, error) {
	raw, err := keystore.Mint(h.KeyPrefix)
	if err != nil {
		return nil, "", fmt.Errorf("apikeys: mint key: %w", err)
	}
	id, err := keystore.NewKeyID()
	if err != nil {
		return nil, "", fmt.Errorf("apikeys: mint key id: %w", err)
	}
	now := h.now().UTC().Truncate(time.Millisecond)
	k := &keystore.Key{
		ID:        id,
		Owner:     owner,
		Name:      req.Name,
		Prefix:    keystore.DisplayPrefix(h.KeyPrefix, raw),
		Digest:    h.hasher.Digest(raw),
		Scopes:    req.Scopes,
		CreatedAt: now,
		Meta:      req.Meta,
		Plan:      cmp.Or(req.Plan, h.DefaultPlan),
	}
	if req.ExpiresInDays > 0 {
		exp := now.Add(time.Duration(req.ExpiresInDays) * 24 * time.Hour)
		k.ExpiresAt = &exp
	}
	return k, raw, nil
}

// keyResponse is the `data` of a create response, in the reference's order.
// A rotation adds the replaced key and the end of its grace period.
type keyResponse struct {
	KeyID             string   `json:"key_id"`
	Name              string   `json:"name"`
	Key               string   `json:"key"`
	Prefix            string   `json:"prefix"`
	Scopes            []string `json:"scopes"`
	ExpiresAt         *apiTime `json:"expires_at"`
	CreatedAt         apiTime  `json:"created_at"`
	Replaces          string   `json:"replaces,omitempty"`
	GracePeriodEndsAt *apiTime `json:"grace_period_ends_at,omitempty"`
	// Meta appears only for a key that has metadata.
	Meta json.RawMessage `json:"meta,omitempty"`
	// Plan appears only for a key that has a plan.
	Plan string `json:"plan,omitempty"`
}

func newKeyResponse(k *keystore.Key, raw string) keyResponse {
	resp := keyResponse{KeyID: k.ID, Name: k.Name, Key: raw, Prefix: k.Prefix, Scopes: k.Scopes, CreatedAt: apiTime{k.CreatedAt}, Meta: k.Meta, Plan: k.Plan}
	if k.ExpiresAt != nil {
		resp.ExpiresAt = &apiTime{*k.ExpiresAt}
	}
	return resp
}

// truncate shortens s to at most n bytes for echoing in messages.
func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}
