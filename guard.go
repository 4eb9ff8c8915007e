package apikeys

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/textproto"
	"net/url"
	"slices"
	"strings"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/caddy-apikeys/caddy-apikeys/keystore"
	"github.com/caddy-apikeys/caddy-apikeys/ratelimit"
	"github.com/caddy-apikeys/caddy-apikeys/requesttarget"
)

// compiledRule is a ScopeRule with its methods and path patterns ready.
type compiledRule struct {
	scope   string
	methods []string // exact, case-sensitive; GET brings HEAD; empty: any
	paths   []requesttarget.Pattern
}

// compileScopes validates the declared scopes and scope rules and builds
// their matchers.
func (h *Handler) compileScopes() error {
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
		cr := compiledRule{scope: rule.Scope}
		for _, m := range rule.Methods {
			cr.methods = append(cr.methods, strings.ToUpper(m))
		}
		// HEAD is GET without the body (RFC 9110 §9.3.2): a rule that
		// allows GET allows HEAD, as Go's ServeMux routes it.
		if slices.Contains(cr.methods, http.MethodGet) && !slices.Contains(cr.methods, http.MethodHead) {
			cr.methods = append(cr.methods, http.MethodHead)
		}
		for _, p := range rule.Paths {
			pt, err := requesttarget.ParsePattern(p)
			if err != nil {
				return fmt.Errorf("apikeys: scope rule %d (%s): %w", i+1, rule.Scope, err)
			}
			cr.paths = append(cr.paths, pt)
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
	if err := h.hopByHopHygiene(r); err != nil {
		validationBadRequest.Inc()
		return writeError(w, err)
	}
	token, ok, err := h.requestKey(r)
	if err != nil {
		validationBadRequest.Inc()
		return writeError(w, &apiError{status: http.StatusBadRequest, code: "ambiguous_credentials",
			message: "Send the API key in one header: Authorization or " + h.KeyHeader + ", not both."})
	}
	if !ok {
		validationNoKey.Inc()
		msg := "Send an API key as `Authorization: Bearer <key>`."
		if h.KeyHeader != "" {
			msg = "Send an API key as `Authorization: Bearer <key>` or in the " + h.KeyHeader + " header."
		}
		return h.unauthorized(w, "unauthorized", msg)
	}
	if len(token) != keystore.KeyLen(h.KeyPrefix) || !strings.HasPrefix(token, h.KeyPrefix) {
		// Not an API key (a JWT, say) or truncated.
		validationMalformed.Inc()
		return h.unauthorized(w, "invalid_api_key", "The API key is malformed or invalid.")
	}
	digest := h.hasher.Digest(token)

	// A record in the cache proves the key was minted: the full check of
	// its characters and checksum is only needed before other lookups.
	key, cached := h.cache.Peek(digest)
	if !cached {
		if keystore.Check(h.KeyPrefix, token) != nil {
			// Malformed or a typo: refused without a store lookup.
			validationMalformed.Inc()
			return h.unauthorized(w, "invalid_api_key", "The API key is malformed or invalid.")
		}
		// A miss reads the store, bounded by store_timeout.
		var err error
		key, err = h.cache.Lookup(r.Context(), digest)
		if errors.Is(err, keystore.ErrNotFound) && len(h.oldHashers) > 0 {
			// Minted under a secret being rotated out?
			key, err = h.lookupPrevious(r, token)
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
	if !key.Active(now) {
		switch {
		case key.Status(now) == keystore.StatusRevoked:
			validationRevoked.Inc()
		default:
			validationExpired.Inc()
		}
		h.debug("api key refused: revoked or expired", &key)
		return h.unauthorized(w, "invalid_api_key", "The API key is invalid, revoked or expired.")
	}
	if key.Disabled() {
		validationDisabled.Inc()
		h.debug("api key refused: disabled", &key)
		return writeError(w, &apiError{status: http.StatusForbidden, code: "key_disabled",
			message: "This API key is disabled; its owner can enable it again in the dashboard."})
	}
	if required, ok := h.allowed(&key, r); !ok {
		validationInsufficientScope.Inc()
		h.debug("api key refused: insufficient scope", &key)
		return h.insufficientScope(w, required)
	}

	// The plan's limits are checked last, so that only a request the key
	// may make counts against its quota. The plan in effect is the key's,
	// or default_plan's when the key's was removed from the config, and
	// the backend learns that one. A key without a plan costs a string
	// comparison here.
	inEffect := h.planFor(key.Plan())
	plan := ""
	if inEffect != nil {
		plan = inEffect.policy.Name
		if inEffect.limited && h.limiter != nil {
			if d := h.limiter.AllowAt(key.Meter(), &inEffect.policy, now); d.Result != ratelimit.Allowed {
				h.debug("api key refused: over its plan's limits", &key)
				return h.refuseLimited(w, inEffect, d)
			}
		}
	}

	// The backend learns who calls from these headers only; the identity
	// headers' names are canonical (see applyDefaults).
	hdr := r.Header
	delete(hdr, "Authorization") // keys of a parsed request are canonical
	if h.KeyHeader != "" {
		delete(hdr, h.KeyHeader) // canonical (see applyDefaults)
	}
	ids := h.IdentityHeaders
	// One allocation for the three (with metadata or a plan, up to five)
	// values; each header gets a slice of its own capacity, so an append
	// to one cannot touch another, and none is shared with the cached
	// record.
	meta := key.Meta()
	n := 3
	if meta != "" {
		n++
	}
	if plan != "" {
		n++
	}
	// Every identity header is set or deleted here, replacing whatever
	// the client sent under its canonical name (stripIdentityHeaders took
	// the other spellings).
	vals := make([]string, n)
	vals[0], vals[1], vals[2] = key.ID(), key.Owner(), key.Scopes()
	hdr[ids.ID] = vals[0:1:1]
	hdr[ids.Owner] = vals[1:2:2]
	hdr[ids.Scopes] = vals[2:3:3]
	i := 3
	if meta != "" {
		vals[i] = meta // ASCII-only compact JSON (see parseMeta)
		hdr[ids.Meta] = vals[i : i+1 : i+1]
		i++
	} else {
		delete(hdr, ids.Meta)
	}
	if plan != "" {
		vals[i] = plan // a configured plan name (see validPlanName)
		hdr[ids.Plan] = vals[i : i+1 : i+1]
	} else {
		delete(hdr, ids.Plan)
	}
	if repl, ok := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer); ok {
		// Values boxed when the record was cached: no allocation here.
		repl.Set("http.auth.user.id", key.OwnerValue())
		repl.Set("http.auth.apikey.id", key.IDValue())
		repl.Set("http.auth.apikey.scopes", key.ScopesValue())
		// Where plans are configured, set for every key ("" without a
		// plan), so that a config using it never forwards the
		// placeholder's own text.
		if plan != "" {
			repl.Set("http.auth.apikey.plan", inEffect.value)
		} else if h.plans != nil {
			repl.Set("http.auth.apikey.plan", noPlan)
		}
		if meta != "" {
			repl.Set("http.auth.apikey.meta", key.MetaValue())
			for _, v := range key.MetaVars() {
				repl.Set(v.Name, v.Value)
			}
		}
	}
	// One use a second of a key is noted, in the cached record; the usage
	// recorder collects it from the cache. Only a record that is not (or
	// no longer) cached needs the recorder's lock.
	if key.NoteUse(now) && !key.UseCollected() {
		h.usage.touch(key.ID(), now)
	}
	validationAccepted.Inc()
	h.debug("api key accepted", &key)
	if r.Body == nil || r.Body == http.NoBody || noBodyByFraming(r) {
		return next.ServeHTTP(w, r)
	}
	return h.serveWithBody(w, r, next)
}

// noPlan is the plan placeholder's value for a key without a plan, boxed
// once.
var noPlan any = ""

// noBodyByFraming reports whether an HTTP/1.x request has no body by its
// framing: no Content-Length (or 0) and no Transfer-Encoding. net/http then
// gave it http.NoBody, which Caddy's server may have wrapped (its read
// timeouts do, on every request): no trailer can follow and no framing
// error can occur, so there is nothing for bodyWatch to watch. (Over
// HTTP/2 and 3, trailers may follow even a declared length of 0.)
func noBodyByFraming(r *http.Request) bool {
	return r.ProtoMajor == 1 && r.ContentLength == 0 && len(r.TransferEncoding) == 0
}

// serveWithBody passes on a request that has a body, watching the body for
// what only its end reveals (see bodyWatch).
func (h *Handler) serveWithBody(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler) error {
	if cw, ok := w.(*closingWriter); ok {
		cw.proxied = true
	}
	bw := &bodyWatch{r: r, h: h}
	bw.body = watchedBody{ReadCloser: r.Body, bw: bw}
	bw.w = watchedWriter{ResponseWriterWrapper: caddyhttp.ResponseWriterWrapper{ResponseWriter: w}, bw: bw}
	r.Body = &bw.body
	err := next.ServeHTTP(&bw.w, r)
	if bw.err != nil && !bw.w.wrote {
		// reverse_proxy failed because the client's body was malformed
		// and answered with an error rather than through watchedWriter.
		return bw.w.refuse()
	}
	return err
}

// bodyWatch watches the body of a request on its way to the backend, for
// what only its end reveals: trailers, where net/http puts every trailer
// field received over HTTP/1.1, declared or not, and reverse_proxy forwards
// what it finds (protected names are dropped), and a framing error in the
// client's body (a bad chunk, an oversized trailer, an HTTP/2 body shorter
// than its content-length), which reverse_proxy would answer as 502 and
// count against the upstream in passive health checks. Such an error is
// the client's: it is answered 400 malformed_body and charged to nobody.
// One allocation holds the body and the response writer it guards.
type bodyWatch struct {
	body watchedBody
	w    watchedWriter
	r    *http.Request
	h    *Handler
	err  error // a read of the body failed (not io.EOF, not cancellation)
}

type watchedBody struct {
	io.ReadCloser
	bw *bodyWatch
}

func (b *watchedBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	switch {
	case err == nil:
	case err == io.EOF:
		tr := b.bw.r.Trailer
		for name := range tr {
			if b.bw.h.isProtected(name) {
				delete(tr, name)
			}
		}
	case b.bw.r.Context().Err() == nil:
		b.bw.err = err
		return n, malformedBodyError{err}
	}
	return n, err
}

// malformedBodyError is a framing error in a client's request body. To
// reverse_proxy it reads as context.Canceled, the error it already treats
// as the client's (no retry, no passive health failure, status 499), and
// watchedWriter answers 400 in place of that 499.
type malformedBodyError struct{ err error }

func (e malformedBodyError) Error() string {
	return "apikeys: malformed request body: " + e.err.Error()
}
func (e malformedBodyError) Unwrap() error        { return e.err }
func (e malformedBodyError) Is(target error) bool { return target == context.Canceled }

// watchedWriter is the response writer of a request whose body is watched.
type watchedWriter struct {
	caddyhttp.ResponseWriterWrapper
	bw       *bodyWatch
	wrote    bool // a status was written
	replaced bool // the status was replaced by refuse's 400
}

func (w *watchedWriter) WriteHeader(code int) {
	if w.wrote {
		return
	}
	if w.bw.err != nil && (code == 499 || code >= 500) {
		_ = w.refuse()
		return
	}
	w.wrote = true
	w.ResponseWriter.WriteHeader(code)
}

func (w *watchedWriter) Write(p []byte) (int, error) {
	if w.replaced {
		return len(p), nil
	}
	w.wrote = true
	return w.ResponseWriter.Write(p)
}

// refuse answers 400 malformed_body and closes an HTTP/1.x connection,
// whose remaining bytes cannot be trusted to start a request.
func (w *watchedWriter) refuse() error {
	w.wrote, w.replaced = true, true
	validationBadRequest.Inc()
	if w.bw.r.ProtoMajor == 1 {
		w.Header().Set("Connection", "close")
	}
	return writeError(w.ResponseWriter, &apiError{status: http.StatusBadRequest, code: "malformed_body",
		message: "The request body is malformed: " + w.bw.err.Error() + "."})
}

// hopByHopHygiene keeps the client from changing, through HTTP's hop-by-hop
// machinery, what the guard tells the backend:
//
//   - a Connection header token naming Authorization or an identity header
//     is removed (reverse_proxy deletes the headers that Connection names,
//     after the guard has set them);
//   - an Upgrade to anything but WebSocket (h2c above all) is removed with
//     its HTTP2-Settings, so the request is an ordinary one (RFC 9110 §7.8
//     lets a server ignore Upgrade); a tunnel the guard cannot read into
//     would carry later requests past it;
//   - trailers declared (Trailer header) under a protected name are refused
//     with 400 forbidden_trailer; undeclared ones are dropped at the end of
//     the body (see bodyWatch);
//   - X-Original-URL and X-Rewrite-URL, which some backends route on in
//     place of the request line, are removed.
//
// Names are compared as stripIdentityHeaders does: without case, with '_'
// and '.' read as '-'.
func (h *Handler) hopByHopHygiene(r *http.Request) *apiError {
	hdr := r.Header
	if vals, ok := hdr["Connection"]; ok && h.namesProtected(vals) {
		var kept []string
		for _, v := range vals {
			for tok := range strings.SplitSeq(v, ",") {
				if tok = textproto.TrimString(tok); tok != "" && !h.isProtected(tok) {
					kept = append(kept, tok)
				}
			}
		}
		if len(kept) == 0 {
			delete(hdr, "Connection")
		} else {
			hdr["Connection"] = []string{strings.Join(kept, ", ")}
		}
	}
	if up, ok := hdr["Upgrade"]; ok && !onlyWebSocket(up) {
		delete(hdr, "Upgrade")
		delete(hdr, "Http2-Settings")
	}
	// Headers that IIS's URL Rewrite, Symfony and Laravel read as the
	// request's path in place of the request line: only a proxy in front
	// may set them, never a client.
	delete(hdr, "X-Original-Url")
	delete(hdr, "X-Rewrite-Url")
	for name := range r.Trailer {
		if h.isProtected(name) {
			return &apiError{status: http.StatusBadRequest, code: "forbidden_trailer",
				message: "The request declares a trailer field named " + name + ", which only the gateway may set."}
		}
	}
	return nil
}

// namesProtected reports whether Connection header values name a protected
// header. It does not allocate.
func (h *Handler) namesProtected(vals []string) bool {
	for _, v := range vals {
		for v != "" {
			tok := v
			if i := strings.IndexByte(v, ','); i >= 0 {
				tok, v = v[:i], v[i+1:]
			} else {
				v = ""
			}
			if h.isProtected(textproto.TrimString(tok)) {
				return true
			}
		}
	}
	return false
}

// isProtected reports whether a header field name is one only the gateway
// may set (or, for Authorization, that it consumes).
func (h *Handler) isProtected(name string) bool {
	for _, p := range h.protected {
		if sameHeaderLoosely(name, p) {
			return true
		}
	}
	return false
}

// onlyWebSocket reports whether Upgrade header values ask for WebSocket and
// nothing else.
func onlyWebSocket(vals []string) bool {
	seen := false
	for _, v := range vals {
		for tok := range strings.SplitSeq(v, ",") {
			if !strings.EqualFold(textproto.TrimString(tok), "websocket") {
				return false
			}
			seen = true
		}
	}
	return seen
}

// lookupPrevious looks a key up under the previous secrets' digests, after
// the current secret's gave ErrNotFound. Unknown digests are remembered by
// the cache, so a fake key costs each secret one store read at most.
func (h *Handler) lookupPrevious(r *http.Request, token string) (keystore.CachedKey, error) {
	for _, old := range h.oldHashers {
		key, err := h.cache.Lookup(r.Context(), old.Digest(token))
		if !errors.Is(err, keystore.ErrNotFound) {
			return key, err
		}
	}
	return keystore.CachedKey{}, keystore.ErrNotFound
}

// stripIdentityHeaders removes client-sent spellings of the identity
// headers other than their canonical names, which the guard replaces or
// deletes when it passes the request on. It runs on every guarded request
// before anything else. Where the server
// lets '_' and '.' spellings in, it also removes those of X-Original-URL
// and X-Rewrite-URL and gathers those of the method-override headers under
// their canonical names (see allowed). Names that differ
// only in case or in '_' or '.' for '-' (X_Api_Key_Owner) go too: CGI,
// FastCGI (php_fastcgi) and WSGI backends read them all as
// HTTP_X_API_KEY_OWNER. Caddy drops every header name with '_' or '.'
// unless the server allowlists some (expected_underscore_headers,
// expected_dot_headers), so only then is the slower scan needed; header
// keys of a parsed request are canonical, so case variants are
// canonical names.
func (h *Handler) stripIdentityHeaders(r *http.Request) {
	ids := h.IdentityHeaders
	// The canonical names are set or deleted when the request is passed
	// on (see guard), the only way a request leaves the guard: a refusal
	// answers it here. Other spellings go now.
	if srv, ok := r.Context().Value(caddyhttp.ServerCtxKey).(*caddyhttp.Server); ok &&
		len(srv.ExpectedUnderscoreHeaders) == 0 && len(srv.ExpectedDotHeaders) == 0 {
		return
	}
	for name, vals := range r.Header {
		switch {
		case sameHeaderLoosely(name, ids.ID) || sameHeaderLoosely(name, ids.Owner) || sameHeaderLoosely(name, ids.Scopes) ||
			sameHeaderLoosely(name, ids.Meta) || sameHeaderLoosely(name, ids.Plan),
			sameHeaderLoosely(name, "X-Original-Url") || sameHeaderLoosely(name, "X-Rewrite-Url"):
			delete(r.Header, name)
		case h.KeyHeader != "" && name != h.KeyHeader && sameHeaderLoosely(name, h.KeyHeader):
			// A spelling of the key header is the key header (CGI reads
			// them as one): gathered under its name, it is a credential
			// like any other (two are refused) and never forwarded.
			delete(r.Header, name)
			r.Header[h.KeyHeader] = append(r.Header[h.KeyHeader], vals...)
		default:
			// Spellings of the method-override headers join the canonical
			// name, which the scope check reads (CGI reads them as one).
			for _, o := range methodOverrideHeaders {
				if name != o && sameHeaderLoosely(name, o) {
					delete(r.Header, name)
					r.Header[o] = append(r.Header[o], vals...)
				}
			}
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
//
// Rules match the decoded path, which ServeHTTP has checked is canonical,
// so every common backend routes it to the same handler. A request can
// still be read more than one way, and the key must be allowed under every
// reading:
//
//   - where the site allows encoded slashes, a path holding one is read
//     with the encoded slash as a separator and with it kept inside its
//     segment;
//   - a method named in X-HTTP-Method-Override, X-HTTP-Method,
//     X-Method-Override or a `_method` query parameter is the method to
//     backends that honour them (Express's method-override, Rails, Laravel,
//     Symfony), so the key must be allowed that method too.
func (h *Handler) allowed(key *keystore.CachedKey, r *http.Request) (required []string, ok bool) {
	if key.FullAccess() {
		return nil, true
	}
	var split string
	hasSplit := false
	if h.AllowEncodedSlashes {
		split, hasSplit = requesttarget.SplitView(r.URL.EscapedPath())
	}
	if required, ok = h.allowedMethod(key, r.Method, r.URL.Path, split, hasSplit); !ok {
		return required, false
	}
	for _, name := range methodOverrideHeaders {
		for _, v := range r.Header[name] {
			for tok := range strings.SplitSeq(v, ",") {
				m := strings.ToUpper(textproto.TrimString(tok))
				if required, ok = h.allowedMethod(key, m, r.URL.Path, split, hasSplit); !ok {
					return required, false
				}
			}
		}
	}
	for q := r.URL.RawQuery; q != ""; {
		var m string
		var found bool
		if m, q, found = nextQueryMethod(q); found {
			if required, ok = h.allowedMethod(key, m, r.URL.Path, split, hasSplit); !ok {
				return required, false
			}
		}
	}
	return nil, true
}

// nextQueryMethod reads the first parameter of query q and returns the rest
// of q. found reports whether that parameter is one some backend reads as
// `_method`, however it is spelled: pairs split at '&' and at ';' (Rack 2,
// older Python), names percent-decoded with '+' as a space (every
// framework), ASCII case ignored (ASP.NET), '.', ' ' and '[' read as '_'
// (PHP), `_method[…]` as `_method` (PHP arrays); method is then its value,
// decoded and upper-cased. The caller reads the whole query, with no pair
// limit; only a match allocates.
func nextQueryMethod(q string) (method, rest string, found bool) {
	pair := q
	if i := strings.IndexAny(q, "&;"); i >= 0 {
		pair, rest = q[:i], q[i+1:]
	}
	name, value, _ := strings.Cut(pair, "=")
	if !isMethodParam(name) {
		return "", rest, false
	}
	v, err := url.QueryUnescape(value)
	if err != nil {
		v = value // a lenient parser keeps the raw text
	}
	return strings.ToUpper(strings.TrimSpace(v)), rest, true
}

// isMethodParam reports whether an encoded query parameter name reads as
// `_method` to some backend (see nextQueryMethod). Only a name with '%' or
// '+' is decoded (and allocates).
func isMethodParam(name string) bool {
	if strings.ContainsAny(name, "%+") {
		d, err := url.QueryUnescape(name)
		if err != nil {
			return false // refused by every parser that decodes names
		}
		name = d
	}
	const want = "_method"
	if len(name) < len(want) {
		return false
	}
	for i := 0; i < len(want); i++ {
		c := name[i]
		switch c {
		case '.', ' ', '[':
			c = '_' // PHP
		case 'M', 'E', 'T', 'H', 'O', 'D':
			c |= 0x20 // ASP.NET ignores case
		}
		if c != want[i] {
			return false
		}
	}
	// PHP reads _method[] and _method[x] as _method.
	return len(name) == len(want) || name[len(want)] == '['
}

// methodOverrideHeaders are the request headers that backends read as the
// request's method (canonical names).
var methodOverrideHeaders = [...]string{"X-Http-Method-Override", "X-Http-Method", "X-Method-Override"}

// allowedMethod applies the scope rules to method on the decoded path and,
// when hasSplit, on the reading that keeps encoded slashes in their segment.
func (h *Handler) allowedMethod(key *keystore.CachedKey, method, decoded, split string, hasSplit bool) ([]string, bool) {
	required, ok := h.allowedPath(key, method, decoded, nil)
	if ok && hasSplit {
		required, ok = h.allowedPath(key, method, split, nil)
	}
	return required, ok
}

// allowedPath applies the scope rules to one reading of the path.
func (h *Handler) allowedPath(key *keystore.CachedKey, method, p string, required []string) ([]string, bool) {
	for i := range h.rules {
		rule := &h.rules[i]
		if len(rule.methods) > 0 && !slices.Contains(rule.methods, method) {
			continue
		}
		if !matchAny(rule.paths, p) {
			continue
		}
		if key.HasScope(rule.scope) {
			return nil, true
		}
		required = append(required, rule.scope)
	}
	return required, false
}

func matchAny(patterns []requesttarget.Pattern, p string) bool {
	for i := range patterns {
		if patterns[i].Match(p) {
			return true
		}
	}
	return false
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
func (h *Handler) debug(msg string, k *keystore.CachedKey) {
	if c := h.logger.Check(zapcore.DebugLevel, msg); c != nil {
		c.Write(zap.String("key_id", k.ID()), zap.String("owner", k.Owner()))
	}
}
