// Package apikeys provides a Caddy HTTP handler that mints API keys at a
// management endpoint (callable only with a dashboard JWT) and validates
// those keys on every other request before handing it on, normally to
// reverse_proxy.
//
// The handler is thin glue: key format, hashing and storage live in package
// keystore, dashboard JWT verification in package jwtauth.
package apikeys

import (
	"cmp"
	"context"
	"crypto/cipher"
	"errors"
	"fmt"
	"net/http"
	"path"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyevents"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"

	"github.com/caddy-apikeys/caddy-apikeys/jwtauth"
	"github.com/caddy-apikeys/caddy-apikeys/keystore"
	"github.com/caddy-apikeys/caddy-apikeys/ratelimit"
	"github.com/caddy-apikeys/caddy-apikeys/requesttarget"
)

func init() {
	caddy.RegisterModule(Handler{})
}

// now is the clock of handlers provisioned from here on; tests move it.
var now = time.Now

// Defaults of the Handler's fields.
const (
	DefaultManagementPath   = "/v1/apikeys"
	DefaultMaxExpiresInDays = 3650
	DefaultIdempotencyTTL   = 24 * time.Hour
	DefaultStoreTimeout     = 2 * time.Second
	DefaultRealm            = "apikeys"
	DefaultHeaderID         = "X-Api-Key-Id"
	DefaultHeaderOwner      = "X-Api-Key-Owner"
	DefaultHeaderScopes     = "X-Api-Key-Scopes"
	DefaultHeaderMeta       = "X-Api-Key-Meta"
	DefaultHeaderPlan       = "X-Api-Key-Plan"
)

// Handler mints API keys at ManagementPath and validates them everywhere
// else. Its JSON form is the module `http.handlers.apikeys`.
type Handler struct {
	// Store selects where keys live. Default: an embedded bbolt file at
	// `<caddy data dir>/apikeys/keys.db`.
	Store *StoreConfig `json:"store,omitempty"`

	// Secret derives the pepper of key digests and the key that encrypts
	// idempotent replays. At least 32 bytes after placeholders such as
	// `{env.APIKEYS_SECRET}` or `{file./run/secrets/apikeys}` are
	// resolved (at provision time, so the value never lands in the config).
	// Required with the Redis store. With the file store it may be left
	// empty: a random secret is then generated once and kept beside the
	// database file (mode 0600).
	Secret string `json:"secret,omitempty"`

	// PreviousSecrets are secrets being rotated out, placeholders like
	// Secret. Keys minted under them keep validating and idempotent
	// replays sealed under them still open, but new keys and replays use
	// Secret only. Drop a previous secret once the keys minted under it
	// are rotated or expired.
	PreviousSecrets []string `json:"previous_secrets,omitempty"`

	// KeyPrefix starts every minted key. Default: "wbk_".
	KeyPrefix string `json:"key_prefix,omitempty"`

	// ManagementPath is where the key-management API is served.
	// Default: "/v1/apikeys".
	ManagementPath string `json:"management_path,omitempty"`

	// DashboardJWT configures who may call the management API. Without it
	// the management API answers 404 and the handler only validates keys.
	DashboardJWT *DashboardJWT `json:"dashboard_jwt,omitempty"`

	// Scopes declares scopes beyond those ScopeRules name. When any scope is
	// declared (here or in a rule), a create request naming another scope
	// is refused with 400 unknown_scope.
	Scopes []string `json:"scopes,omitempty"`

	// ScopeRules say which scope a request needs. A full-access key passes
	// every rule; a scoped key passes when it holds a scope of at least one
	// rule that matches. A request no rule matches needs a full-access key.
	ScopeRules []ScopeRule `json:"scope_rules,omitempty"`

	// AllowEncodedSlashes lets request paths hold `%2F` (an encoded `/`)
	// inside a segment, for APIs whose path parameters carry slashes. Every
	// other non-canonical path is still refused with 400
	// non_canonical_path (see package requesttarget), and a scoped key must
	// be allowed both with the `%2F` read as a separator and with it kept
	// inside its segment, since backends differ on which they do. Risk: a
	// backend that decodes `%2F` and then removes dot segments or routes on
	// the result sees a path the rules were not written for. Default: false
	// (paths with `%2F` are refused).
	AllowEncodedSlashes bool `json:"allow_encoded_slashes,omitempty"`

	// MaxExpiresInDays caps `expires_in_days` on create. Default: 3650.
	MaxExpiresInDays int `json:"max_expires_in_days,omitempty"`

	// IdempotencyTTL is how long Idempotency-Key results are kept; at
	// most the store's retention. Default: 24h, or the store's retention
	// if that is shorter.
	IdempotencyTTL caddy.Duration `json:"idempotency_ttl,omitempty"`

	// RequireIdempotencyKey makes the Idempotency-Key header mandatory on
	// POST requests to the management API. Default: false.
	RequireIdempotencyKey bool `json:"require_idempotency_key,omitempty"`

	// StoreTimeout bounds each store operation made while serving a
	// request. Default: 2s.
	StoreTimeout caddy.Duration `json:"store_timeout,omitempty"`

	// Realm is sent in WWW-Authenticate challenges. Default: "apikeys".
	Realm string `json:"realm,omitempty"`

	// IdentityHeaders names the request headers that tell the backend who
	// is calling. Client-sent copies are always removed.
	IdentityHeaders *IdentityHeaders `json:"identity_headers,omitempty"`

	// MaxKeysPerOwner caps how many keys one owner may hold that still
	// validate (revoked and expired keys do not count). Default: 1000.
	MaxKeysPerOwner int `json:"max_keys_per_owner,omitempty"`

	// LastUsedInterval is how often last-used times are written to the
	// store: at most one write per key per interval per Caddy instance,
	// and once more on shutdown. Default: 1m.
	LastUsedInterval caddy.Duration `json:"last_used_interval,omitempty"`

	// CORSOrigins lists dashboard origins (e.g. "https://dash.example.com")
	// allowed to call the management API from a browser. Preflight
	// requests are answered for them; other origins get no CORS headers.
	CORSOrigins []string `json:"cors_origins,omitempty"`

	// Cache configures the in-process cache of key records that the guard
	// reads. Default: on, with the defaults of CacheConfig.
	Cache *CacheConfig `json:"cache,omitempty"`

	// KeyHeader names a request header from which the guard also accepts
	// the API key, raw (no scheme), for clients migrating from gateways
	// that read X-API-Key. Like Authorization it is removed before the
	// request is passed on, and no client may name it in Connection or
	// send it as a trailer. A request with both it and Authorization is
	// refused (400 ambiguous_credentials). Keys in query strings are never
	// accepted: URLs end up in logs. Default: none (Authorization only).
	KeyHeader string `json:"key_header,omitempty"`

	// Plans are the usage plans keys can be given (`plan` on create,
	// PATCH and rotate): a rate limit (GCRA: a burst of at most requests,
	// then requests per window) and a quota of accepted requests per UTC
	// day or calendar month, metered per key and its rotations. A request
	// over either is refused with 429 rate_limited or quota_exceeded,
	// Retry-After and the RateLimit-Policy and RateLimit fields of
	// draft-ietf-httpapi-ratelimit-headers-11. The limiter's state lives
	// in the store (Redis or the bbolt file) and survives reloads; a
	// reload that changes a plan's numbers applies them to every key.
	// Default: none (keys are not limited).
	Plans []Plan `json:"plans,omitempty"`

	// DefaultPlan is the plan a key created without `plan` gets (and the
	// limits applied to a key whose plan is no longer configured); it
	// must name one of Plans. Default: none (such keys are not limited).
	DefaultPlan string `json:"default_plan,omitempty"`

	// SecretScanning turns on the GitHub secret scanning partner endpoint
	// at `<management_path>/secret-scanning`. Default: off.
	SecretScanning *SecretScanning `json:"secret_scanning,omitempty"`

	logger       *zap.Logger
	store        keystore.Store
	cache        *keystore.CachedStore // the same store, for the guard's lookups
	storePoolKey string
	pooled       *pooledStore       // the store's pool entry; nil for a stand-in
	hasher       *keystore.Hasher   // the current secret's
	oldHashers   []*keystore.Hasher // PreviousSecrets', to verify only
	sealers      []cipher.AEAD      // current first; the others open only
	verifier     *jwtauth.Verifier
	rules        []compiledRule
	plans        map[string]*compiledPlan // by name
	limited      bool                     // some plan has a rate limit or quota
	limiter      *ratelimit.Limiter       // the store's; nil unless limited
	pathOpts     requesttarget.Options
	protected    []string // header names no client may send, name in Connection or send as trailers
	declared     map[string]struct{}
	storeTimeout time.Duration
	challenge    string
	now          func() time.Time
	usage        *usageRecorder
	events       *caddyevents.App
	ctx          caddy.Context
	inCaddy      bool  // provisioned by Caddy (not by a `caddy apikeys` command)
	storeErr     error // the store could not be opened (see startup.go)
	ownStore     bool  // store is this handler's own stand-in, not pooled
}

// StoreConfig selects the key store.
type StoreConfig struct {
	// Type is "file" (embedded bbolt, one machine) or "redis".
	// Default: "file".
	Type string `json:"type,omitempty"`
	// Path of the bbolt file, for Type "file". Placeholders are resolved.
	// Default: `<caddy data dir>/apikeys/keys.db`.
	Path string `json:"path,omitempty"`
	// URLs of Redis, for Type "redis": one `redis://` or `rediss://` URL
	// (user, password, DB number and TLS are read from it), several seed
	// URLs of a Redis Cluster, or one Sentinel URL
	// `redis+sentinel://[user:pass@]host:port[,host:port...]/<master-name>[/db]`. Placeholders such as `{env.REDIS_URL}` are
	// resolved at provision time; keep passwords out of the config that way.
	URLs []string `json:"urls,omitempty"`
	// Namespace prefixes every Redis key. Default: "apikeys".
	Namespace string `json:"namespace,omitempty"`
	// Retention is how long revoked and expired keys stay in the store
	// (and in listings) after they stop validating. Default: 30 days.
	Retention caddy.Duration `json:"retention,omitempty"`
	// WaitReplicas, for Type "redis", makes each write of a new key wait
	// (Redis WAIT) until that many replicas acknowledged it, and answers
	// 503 otherwise, so that a failover cannot lose a key already answered
	// with 201. Default: 0 (no wait). Set it to 1 or more with Sentinel.
	WaitReplicas int `json:"wait_replicas,omitempty"`
	// WaitTimeout bounds each such wait (and never exceeds store_timeout).
	// Default: 1s.
	WaitTimeout caddy.Duration `json:"wait_timeout,omitempty"`
}

// IdentityHeaders names the headers set on requests that pass the guard.
type IdentityHeaders struct {
	// ID carries the key's ID. Default: "X-Api-Key-Id".
	ID string `json:"id,omitempty"`
	// Owner carries the key's owner. Default: "X-Api-Key-Owner".
	Owner string `json:"owner,omitempty"`
	// Scopes carries the key's scopes separated by spaces, or "*" for a
	// full-access key. Default: "X-Api-Key-Scopes".
	Scopes string `json:"scopes,omitempty"`
	// Meta carries the key's metadata as compact, ASCII-only JSON; it is
	// set only for a key that has metadata. Default: "X-Api-Key-Meta".
	Meta string `json:"meta,omitempty"`
	// Plan carries the name of the key's plan; it is set only for a key
	// that has one. Default: "X-Api-Key-Plan".
	Plan string `json:"plan,omitempty"`
}

// CacheConfig configures the in-process cache of key records. The cache
// belongs to the store: handlers that use the same store (and successive
// configs, across reloads) share one cache, with the settings of the config
// provisioned last.
//
// A record is served from the cache for up to TTL after it was read from
// the store; records used in the last 5 minutes are re-read in the
// background (in batches) from Refresh on, so requests do not wait for the
// store. Writes through any instance (a create, a revocation) reach every
// instance's cache at once over Redis pub/sub; TTL bounds staleness if a
// message is lost. While the store is unreachable, records read less than
// OutageWindow ago keep validating and any other key gets 503
// store_unavailable at once.
type CacheConfig struct {
	// Disabled turns the cache off: every guarded request reads the store.
	// Default: false.
	Disabled bool `json:"disabled,omitempty"`
	// Size is the most key records kept, and, separately, the most unknown
	// keys remembered as unknown. Default: 100000.
	Size int `json:"size,omitempty"`
	// TTL is the longest a record, or an unknown key, is served from the
	// cache after it was read from a reachable store. Default: 10s.
	TTL caddy.Duration `json:"ttl,omitempty"`
	// Refresh is the age from which a record used in the last 5 minutes is
	// re-read in the background, while the cached one is still served. It
	// must be less than TTL. Default: 5s, or half of TTL if that is less.
	Refresh caddy.Duration `json:"refresh,omitempty"`
	// OutageWindow is how long after it was last read from the store a
	// record keeps validating while the store is unreachable; 0 disables
	// it (then no record is served past TTL). Default: 5m.
	OutageWindow *caddy.Duration `json:"outage_window,omitempty"`
	// DisablePubSub stops publishing and receiving invalidations over
	// Redis pub/sub (for a Redis that does not allow PUBLISH or SUBSCRIBE):
	// other instances then see a revocation only after TTL. Default: false.
	DisablePubSub bool `json:"disable_pubsub,omitempty"`
}

// ScopeRule requires Scope for requests matching Methods (any, when empty;
// GET also covers HEAD) and one of Paths: patterns in the syntax of Caddy's
// `path` matcher, matched case-sensitively against the decoded canonical
// path (see requesttarget.Pattern).
type ScopeRule struct {
	Scope   string   `json:"scope"`
	Methods []string `json:"methods,omitempty"`
	Paths   []string `json:"paths"`
}

// CaddyModule returns the Caddy module information.
func (Handler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.apikeys",
		New: func() caddy.Module { return new(Handler) },
	}
}

// Provision resolves secrets, opens (or reuses) the store and prepares the
// JWT verifier and scope rules.
func (h *Handler) Provision(ctx caddy.Context) error {
	eventsApp, err := ctx.App("events")
	if err != nil {
		return fmt.Errorf("apikeys: loading events app: %w", err)
	}
	return h.provision(ctx, eventsApp.(*caddyevents.App))
}

// provision is Provision with the events app given (nil: key changes are
// logged but emit no events), so that a handler can also be set up outside
// a running Caddy config, as the benchmarks do.
func (h *Handler) provision(ctx caddy.Context, events *caddyevents.App) error {
	h.ctx = ctx
	h.events = events
	h.inCaddy = true
	if err := h.provisionCore(ctx, ctx.Logger()); err != nil {
		return err
	}
	if h.KeyHeader != "" {
		// Caddy copies each request for its access log before any handler
		// runs and redacts only Authorization, Cookie and
		// Proxy-Authorization there, so the raw key in this header is
		// logged unless the log's format removes it.
		h.logger.Warn("key_header: where this site has an access log, keep the raw keys out of it with a log filter (see README)",
			zap.String("key_header", h.KeyHeader),
			zap.String("log_format", "format filter { wrap json; request>headers>"+h.KeyHeader+" delete }"))
	}
	if h.storeErr != nil {
		app, err := ctx.App("apikeys")
		if err != nil {
			return fmt.Errorf("apikeys: loading apikeys app: %w", err)
		}
		app.(*App).block(h.storeErr)
	}
	if h.DashboardJWT != nil {
		var err error
		repl := caddy.NewReplacer()
		if h.verifier, err = h.DashboardJWT.newVerifier(ctx, repl); err != nil {
			return err
		}
	}
	h.usage = newUsageRecorder(h.store, h.cache.CollectUses, time.Duration(h.LastUsedInterval), h.logger)
	if h.limited && h.pooled != nil {
		// One limiter per store, shared across reloads (see limiter.go).
		var err error
		if h.limiter, err = h.pooled.lim.get(h.store, h.now, h.logger.Named("ratelimit")); err != nil {
			return err
		}
	}
	return h.provisionSecretScanning(ctx)
}

// provisionCore sets up what working with keys needs (defaults, scopes,
// secret, store), without the HTTP parts; `caddy apikeys` commands use it.
func (h *Handler) provisionCore(ctx caddy.Context, logger *zap.Logger) error {
	h.logger = logger
	h.now = now
	h.applyDefaults()
	repl := caddy.NewReplacer()

	if err := h.compileScopes(); err != nil {
		return err
	}
	if err := h.compilePlans(); err != nil {
		return err
	}
	if reg := ctx.GetMetricsRegistry(); reg != nil {
		if err := registerMetrics(reg); err != nil {
			return fmt.Errorf("apikeys: metrics: %w", err)
		}
	}

	storeCfg := h.Store
	if storeCfg == nil {
		storeCfg = &StoreConfig{}
	}
	secret, err := resolveSecret(repl, "secret", h.Secret)
	if err != nil {
		return err
	}
	cacheOpts, err := h.cacheOptions()
	if err != nil {
		return err
	}
	pooled, poolKey, autoSecret, err := openStore(storeCfg, repl, secret == nil, cacheOpts, h.Cache != nil && h.Cache.DisablePubSub)
	var store *keystore.CachedStore
	if pooled != nil {
		store = pooled.cached()
	}
	h.pooled = pooled
	switch {
	case err != nil && h.inCaddy && isLocked(err):
		// Another process (a running Caddy, when this is `caddy
		// validate`) holds the file: provision on with a stand-in, and
		// let the apikeys app fail `caddy run` (see startup.go).
		h.logger.Warn("key store file is held by another process (a running Caddy?); the config was checked without opening it, and `caddy run` with it fails until that process releases the file",
			zap.Error(err))
		h.storeErr = err
		if store, err = keystore.NewCachedStore(unavailableStore{err}, cacheOpts); err != nil {
			return fmt.Errorf("apikeys: %w", err)
		}
		h.ownStore = true
	case err != nil:
		return err
	}
	h.store, h.cache, h.storePoolKey = store, store, poolKey
	if h.inCaddy && h.storeErr == nil {
		// Once per store in this process: a reload reuses the open store,
		// and a ping beside a reload's traffic only grows its pool.
		if _, seen := pingedStores.LoadOrStore(poolKey, true); !seen {
			h.checkStoreAtStart(cmp.Or(storeCfg.Type, "file"))
		}
	}
	if secret == nil {
		secret = autoSecret
	}
	secrets := [][]byte{secret}
	for i, ps := range h.PreviousSecrets {
		old, err := resolveSecret(repl, fmt.Sprintf("previous secret %d", i+1), ps)
		if err != nil {
			return err
		}
		if old == nil {
			return fmt.Errorf("apikeys: previous secret %d is empty", i+1)
		}
		secrets = append(secrets, old)
	}
	h.oldHashers, h.sealers = nil, nil
	for i, sec := range secrets {
		if len(sec) < 32 {
			return fmt.Errorf("apikeys: every secret must be at least 32 bytes, secret %d has %d", i+1, len(sec))
		}
		hasher, err := keystore.NewHasher(sec)
		if err != nil {
			return fmt.Errorf("apikeys: %w", err)
		}
		sealer, err := newSealer(sec)
		if err != nil {
			return err
		}
		if i == 0 {
			h.hasher = hasher
		} else {
			h.oldHashers = append(h.oldHashers, hasher)
		}
		h.sealers = append(h.sealers, sealer)
	}
	return nil
}

// applyDefaults fills in every setting the operator left at its zero value.
func (h *Handler) applyDefaults() {
	if h.KeyPrefix == "" {
		h.KeyPrefix = keystore.DefaultPrefix
	}
	if h.ManagementPath == "" {
		h.ManagementPath = DefaultManagementPath
	}
	if h.MaxExpiresInDays == 0 {
		h.MaxExpiresInDays = DefaultMaxExpiresInDays
	}
	if h.IdempotencyTTL == 0 {
		// Never longer than retention (see Validate).
		h.IdempotencyTTL = caddy.Duration(min(DefaultIdempotencyTTL, h.retention()))
	}
	h.storeTimeout = time.Duration(h.StoreTimeout)
	if h.storeTimeout == 0 {
		h.storeTimeout = DefaultStoreTimeout
	}
	if h.Realm == "" {
		h.Realm = DefaultRealm
	}
	if h.MaxKeysPerOwner == 0 {
		h.MaxKeysPerOwner = DefaultMaxKeysPerOwner
	}
	if h.LastUsedInterval == 0 {
		h.LastUsedInterval = caddy.Duration(DefaultLastUsedInterval)
	}
	if h.IdentityHeaders == nil {
		h.IdentityHeaders = &IdentityHeaders{}
	}
	if h.IdentityHeaders.ID == "" {
		h.IdentityHeaders.ID = DefaultHeaderID
	}
	if h.IdentityHeaders.Owner == "" {
		h.IdentityHeaders.Owner = DefaultHeaderOwner
	}
	if h.IdentityHeaders.Scopes == "" {
		h.IdentityHeaders.Scopes = DefaultHeaderScopes
	}
	if h.IdentityHeaders.Meta == "" {
		h.IdentityHeaders.Meta = DefaultHeaderMeta
	}
	if h.IdentityHeaders.Plan == "" {
		h.IdentityHeaders.Plan = DefaultHeaderPlan
	}
	ids := h.IdentityHeaders
	ids.ID = http.CanonicalHeaderKey(ids.ID)
	ids.Owner = http.CanonicalHeaderKey(ids.Owner)
	ids.Scopes = http.CanonicalHeaderKey(ids.Scopes)
	ids.Meta = http.CanonicalHeaderKey(ids.Meta)
	ids.Plan = http.CanonicalHeaderKey(ids.Plan)
	h.challenge = fmt.Sprintf("Bearer realm=%q", h.Realm)
	h.pathOpts = requesttarget.Options{AllowEncodedSlash: h.AllowEncodedSlashes}
	h.protected = []string{"Authorization", ids.ID, ids.Owner, ids.Scopes, ids.Meta, ids.Plan}
	if h.KeyHeader != "" {
		h.KeyHeader = http.CanonicalHeaderKey(h.KeyHeader)
		h.protected = append(h.protected, h.KeyHeader)
	}
}

// retention is how long the store keeps revoked and expired keys.
func (h *Handler) retention() time.Duration {
	if h.Store != nil && h.Store.Retention > 0 {
		return time.Duration(h.Store.Retention)
	}
	return keystore.DefaultRetention
}

// Validate checks the configuration for mistakes.
func (h *Handler) Validate() error {
	if err := keystore.ValidatePrefix(h.KeyPrefix); err != nil {
		return fmt.Errorf("apikeys: key_prefix: %w", err)
	}
	if h.ManagementPath == "" || h.ManagementPath[0] != '/' || path.Clean(h.ManagementPath) != h.ManagementPath {
		return fmt.Errorf("apikeys: management_path must be a clean absolute path like /v1/apikeys, got %q", h.ManagementPath)
	}
	if h.MaxExpiresInDays < 1 || h.MaxExpiresInDays > maxExpiresInDaysLimit {
		return fmt.Errorf("apikeys: max_expires_in_days must be between 1 and %d", maxExpiresInDaysLimit)
	}
	if h.IdempotencyTTL < 0 || h.StoreTimeout < 0 || h.LastUsedInterval < 0 {
		return errors.New("apikeys: idempotency_ttl, store_timeout and last_used_interval must not be negative")
	}
	if retention := h.retention(); time.Duration(h.IdempotencyTTL) > retention {
		// A create retried after its key was revoked and then deleted
		// under retention would store the very same raw key again.
		return fmt.Errorf("apikeys: idempotency_ttl (%s) must not exceed the store's retention (%s): a retried create could bring back a key that retention deleted", time.Duration(h.IdempotencyTTL), retention)
	}
	if h.MaxKeysPerOwner < 1 {
		return errors.New("apikeys: max_keys_per_owner must be at least 1")
	}
	for i, rule := range h.ScopeRules {
		for _, m := range rule.Methods {
			if err := checkMethod(strings.ToUpper(m)); err != nil {
				return fmt.Errorf("apikeys: scope rule %d (%s): %w", i+1, rule.Scope, err)
			}
		}
	}
	for _, o := range h.CORSOrigins {
		if !validOrigin(o) {
			return fmt.Errorf("apikeys: cors_origins: %q is not an origin like https://dash.example.com", o)
		}
	}
	ids := h.IdentityHeaders
	named := []struct{ role, name string }{{"id", ids.ID}, {"owner", ids.Owner}, {"scopes", ids.Scopes}, {"meta", ids.Meta}, {"plan", ids.Plan}}
	for i, n := range named {
		if !validHeaderName(n.name) {
			return fmt.Errorf("apikeys: identity header name %q is not a valid header name", n.name)
		}
		if http.CanonicalHeaderKey(n.name) == "Authorization" {
			return errors.New("apikeys: an identity header cannot be Authorization")
		}
		// One name for two identity headers would make one overwrite or
		// delete the other (CGI-style backends read '_' and '.' as '-').
		for _, m := range named[:i] {
			if sameHeaderLoosely(n.name, m.name) {
				return fmt.Errorf("apikeys: identity_headers: %s and %s are both %s; each needs a name of its own", m.role, n.role, n.name)
			}
		}
	}
	if err := h.validateKeyHeader(); err != nil {
		return err
	}
	return nil
}

// Cleanup releases this instance's hold on the shared store and stops the
// JWT verifier. It tolerates a half-provisioned handler.
func (h *Handler) Cleanup() error {
	if h.usage != nil {
		h.usage.close() // flushes pending last-used times
	}
	if h.verifier != nil {
		h.verifier.Close()
	}
	if h.ownStore {
		return h.store.Close()
	}
	if h.storePoolKey != "" {
		_, err := stores.Delete(h.storePoolKey)
		return err
	}
	return nil
}

// storeCtx bounds a store operation made while serving r.
func (h *Handler) storeCtx(r *http.Request) (context.Context, context.CancelFunc) {
	return context.WithTimeout(r.Context(), h.storeTimeout)
}

// validHeaderName reports whether s is a usable HTTP header field name.
func validHeaderName(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-') {
			return false
		}
	}
	return true
}

// Interface guards.
var (
	_ caddy.Provisioner           = (*Handler)(nil)
	_ caddy.Validator             = (*Handler)(nil)
	_ caddy.CleanerUpper          = (*Handler)(nil)
	_ caddyhttp.MiddlewareHandler = (*Handler)(nil)
)
