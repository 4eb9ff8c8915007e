package apikeys

import (
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/caddy-apikeys/caddy-apikeys/keystore"
)

// compiledRule is a ScopeRule with its matchers provisioned.
type compiledRule struct {
	scope   string
	methods caddyhttp.MatchMethod
	paths   caddyhttp.MatchPath
}

// compileScopes validates the declared scopes and scope rules and builds
// their matchers.
func (h *Handler) compileScopes(ctx caddy.Context) error {
	h.declared = make(map[string]struct{})
	for _, s := range h.Scopes {
		if !validScope(s) {
			return fmt.Errorf("apikeys: scopes: %q is not a valid scope name (letters, digits and . _ : - /, at most %d characters)", s, maxScopeLen)
		}
		h.declared[s] = struct{}{}
	}
	h.rules = h.rules[:0]
	for i, rule := range h.ScopeRules {
		if !validScope(rule.Scope) {
			return fmt.Errorf("apikeys: scope rule %d: %q is not a valid scope name", i+1, rule.Scope)
		}
		if len(rule.Paths) == 0 {
			return fmt.Errorf("apikeys: scope rule %d (%s): at least one path is required", i+1, rule.Scope)
		}
		cr := compiledRule{scope: rule.Scope, paths: caddyhttp.MatchPath(append([]string(nil), rule.Paths...))}
		for _, m := range rule.Methods {
			cr.methods = append(cr.methods, strings.ToUpper(m))
		}
		if err := cr.paths.Provision(ctx); err != nil {
			return fmt.Errorf("apikeys: scope rule %d (%s): %w", i+1, rule.Scope, err)
		}
		h.rules = append(h.rules, cr)
		h.declared[rule.Scope] = struct{}{}
	}
	return nil
}

// guard validates the request's API key and, if it may call this route,
// passes the request on with the caller's identity.
func (h *Handler) guard(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler) error {
	h.stripIdentityHeaders(r)
	token, ok := bearerToken(r)
	if !ok {
		validationNoKey.Inc()
		return h.unauthorized(w, "unauthorized", "Send an API key as `Authorization: Bearer <key>`.")
	}
	if len(token) != keystore.KeyLen(h.KeyPrefix) || !strings.HasPrefix(token, h.KeyPrefix) {
		// Not an API key (a JWT, say) or truncated.
		validationMalformed.Inc()
		return h.unauthorized(w, "invalid_api_key", "The API key is malformed or invalid.")
	}
	digest := h.hasher.Digest(token)

	// A record in the cache proves the key was minted: the full check of
	// its characters and checksum is only needed before other lookups.
	key, prepared, cached := h.cache.Peek(digest)
	if !cached {
		if keystore.Check(h.KeyPrefix, token) != nil {
			// Malformed or a typo: refused without a store lookup.
			validationMalformed.Inc()
			return h.unauthorized(w, "invalid_api_key", "The API key is malformed or invalid.")
		}
		// A miss reads the store, bounded by store_timeout.
		var err error
		key, prepared, err = h.cache.Lookup(r.Context(), digest)
		if errors.Is(err, keystore.ErrNotFound) && len(h.oldHashers) > 0 {
			// Minted under a secret being rotated out?
			digest, key, prepared, err = h.lookupPrevious(r, token)
		}
		switch {
		case errors.Is(err, keystore.ErrNotFound):
			validationUnknown.Inc()
			return h.unauthorized(w, "invalid_api_key", "The API key is invalid, revoked or expired.")
		case err != nil:
			// An outage the cache knows of is logged once, by the cache.
			level := zapcore.ErrorLevel
			if errors.Is(err, keystore.ErrUnavailable) {
				level = zapcore.DebugLevel
			}
			if c := h.logger.Check(level, "key store lookup failed"); c != nil {
				c.Write(zap.Error(err))
			}
			validationStoreUnavailable.Inc()
			return writeError(w, errStoreUnavailable)
		}
	}
	now := h.now()
	if !key.Digest.Equal(digest) || !key.Active(now) {
		switch {
		case !key.Digest.Equal(digest):
			validationUnknown.Inc()
		case key.Status(now) == keystore.StatusRevoked:
			validationRevoked.Inc()
		default:
			validationExpired.Inc()
		}
		h.debug("api key refused: revoked or expired", key)
		return h.unauthorized(w, "invalid_api_key", "The API key is invalid, revoked or expired.")
	}
	if required, ok := h.allowed(key, r); !ok {
		validationInsufficientScope.Inc()
		h.debug("api key refused: insufficient scope", key)
		return h.insufficientScope(w, required)
	}

	// The backend learns who calls from these headers only; the identity
	// headers' names are canonical (see applyDefaults).
	id, _ := prepared.(*keyIdentity)
	if id == nil {
		id = newKeyIdentity(key)
	}
	hdr := r.Header
	delete(hdr, "Authorization") // keys of a parsed request are canonical
	ids := h.IdentityHeaders
	// One allocation for the three values; each header gets a slice of
	// its own capacity, so an append to one cannot touch another.
	vals := make([]string, 3)
	vals[0], vals[1], vals[2] = key.ID, key.Owner, id.scopes
	hdr[ids.ID] = vals[0:1:1]
	hdr[ids.Owner] = vals[1:2:2]
	hdr[ids.Scopes] = vals[2:3:3]
	if repl, ok := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer); ok {
		repl.Set("http.auth.user.id", id.owner)
		repl.Set("http.auth.apikey.id", id.id)
		repl.Set("http.auth.apikey.scopes", id.scopesValue)
	}
	if id.noteUse(now) {
		h.usage.touch(key.ID, now)
	}
	validationAccepted.Inc()
	h.debug("api key accepted", key)
	return next.ServeHTTP(w, r)
}

// keyIdentity is what the guard hands on for a key: computed once per cached
// record (keystore.CacheOptions.Prepare) instead of on every request. The
// placeholder values are boxed once, so setting them does not allocate.
type keyIdentity struct {
	scopes                 string // header value: space-separated, or "*"
	id, owner, scopesValue any    // the placeholders' values
	lastUse                atomic.Int64
}

// noteUse reports whether a use at now should be passed to the last-used
// recorder: once per second per cached record, so the hot path mostly
// skips the recorder's lock (last_used_at has second precision).
func (id *keyIdentity) noteUse(now time.Time) bool {
	sec := now.Unix()
	last := id.lastUse.Load()
	return sec != last && id.lastUse.CompareAndSwap(last, sec)
}

func newKeyIdentity(k *keystore.Key) *keyIdentity {
	s := scopeString(k)
	return &keyIdentity{scopes: s, id: k.ID, owner: k.Owner, scopesValue: s}
}

// prepareIdentity is the cache's Prepare function.
func prepareIdentity(k *keystore.Key) any { return newKeyIdentity(k) }

// lookupPrevious looks a key up under the previous secrets' digests, after
// the current secret's gave ErrNotFound. Unknown digests are remembered by
// the cache, so a fake key costs each secret one store read at most.
func (h *Handler) lookupPrevious(r *http.Request, token string) (keystore.Digest, *keystore.Key, any, error) {
	err := keystore.ErrNotFound
	for _, old := range h.oldHashers {
		d := old.Digest(token)
		var key *keystore.Key
		var prepared any
		key, prepared, err = h.cache.Lookup(r.Context(), d)
		if !errors.Is(err, keystore.ErrNotFound) {
			return d, key, prepared, err
		}
	}
	return keystore.Digest{}, nil, nil, err
}

// stripIdentityHeaders removes client-sent copies of the identity headers.
// It runs on every guarded request before anything else. Names that differ
// only in case or in '_' or '.' for '-' (X_Api_Key_Owner) go too: CGI,
// FastCGI (php_fastcgi) and WSGI backends read them all as
// HTTP_X_API_KEY_OWNER. Caddy drops every header name with '_' or '.'
// unless the server allowlists some (expected_underscore_headers,
// expected_dot_headers), so only then is the slower scan needed; header
// keys of a parsed request are canonical, so case variants are caught by
// the plain deletes.
func (h *Handler) stripIdentityHeaders(r *http.Request) {
	ids := h.IdentityHeaders
	delete(r.Header, ids.ID)
	delete(r.Header, ids.Owner)
	delete(r.Header, ids.Scopes)
	if srv, ok := r.Context().Value(caddyhttp.ServerCtxKey).(*caddyhttp.Server); ok &&
		len(srv.ExpectedUnderscoreHeaders) == 0 && len(srv.ExpectedDotHeaders) == 0 {
		return
	}
	for name := range r.Header {
		if sameHeaderLoosely(name, ids.ID) || sameHeaderLoosely(name, ids.Owner) || sameHeaderLoosely(name, ids.Scopes) {
			delete(r.Header, name)
		}
	}
}

// sameHeaderLoosely reports whether header names a and b are equal when
// case is ignored and '_' and '.' count as '-'.
func sameHeaderLoosely(a, b string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := 0; i < len(a); i++ {
		x, y := a[i], b[i]
		if x == '_' || x == '.' {
			x = '-'
		}
		if y == '_' || y == '.' {
			y = '-'
		}
		if x|0x20 != y|0x20 || x != y && (x|0x20 < 'a' || x|0x20 > 'z') {
			return false
		}
	}
	return true
}

// allowed reports whether key may make request r. required lists the scopes
// of the rules that match (nil when none does, so a full-access key is
// needed).
func (h *Handler) allowed(key *keystore.Key, r *http.Request) (required []string, ok bool) {
	if key.FullAccess() {
		return nil, true
	}
	for i := range h.rules {
		rule := &h.rules[i]
		if len(rule.methods) > 0 && !rule.methods.Match(r) {
			continue
		}
		if !rule.paths.Match(r) {
			continue
		}
		if key.HasScope(rule.scope) {
			return nil, true
		}
		required = append(required, rule.scope)
	}
	return required, false
}

// scopeString renders a key's scopes for headers and placeholders.
func scopeString(k *keystore.Key) string {
	if k.FullAccess() {
		return "*"
	}
	return strings.Join(k.Scopes, " ")
}

func (h *Handler) unauthorized(w http.ResponseWriter, code, msg string) error {
	challenge := h.challenge
	if code != "unauthorized" {
		challenge += `, error="invalid_token"`
	}
	w.Header().Set("WWW-Authenticate", challenge)
	return writeError(w, &apiError{status: http.StatusUnauthorized, code: code, message: msg})
}

func (h *Handler) insufficientScope(w http.ResponseWriter, required []string) error {
	msg := "This route needs a full-access key."
	challenge := h.challenge + `, error="insufficient_scope"`
	if len(required) > 0 {
		msg = "The API key lacks the scope this route needs: " + strings.Join(required, " or ") + "."
		challenge += fmt.Sprintf(", scope=%q", strings.Join(required, " "))
	}
	w.Header().Set("WWW-Authenticate", challenge)
	return writeError(w, &apiError{status: http.StatusForbidden, code: "insufficient_scope", message: msg})
}

// debug logs a key decision with its ID and owner, never the key itself.
func (h *Handler) debug(msg string, k *keystore.Key) {
	if c := h.logger.Check(zapcore.DebugLevel, msg); c != nil {
		c.Write(zap.String("key_id", k.ID), zap.String("owner", k.Owner))
	}
}
