package apikeys

import (
	"fmt"
	"net/url"
	"regexp"
	"slices"
	"strconv"
	"strings"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"

	"github.com/caddy-apikeys/caddy-apikeys/keystore"
)

func init() {
	httpcaddyfile.RegisterHandlerDirective("apikeys", parseCaddyfile)
	httpcaddyfile.RegisterDirectiveOrder("apikeys", httpcaddyfile.Before, "basic_auth")
}

func parseCaddyfile(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	handler := new(Handler)
	err := handler.UnmarshalCaddyfile(h.Dispenser)
	return handler, err
}

// UnmarshalCaddyfile sets up the handler from Caddyfile tokens. Syntax:
//
//	apikeys [<matcher>] {
//		store file [<path>] {
//			retention <duration>
//		}
//		store redis <url>... {
//			namespace <prefix>
//			retention <duration>
//			wait_replicas <n> [<timeout>]
//		}
//		secret <placeholder> [<previous-placeholder>...]
//		key_prefix <prefix>
//		management_path <path>
//		dashboard_jwt {
//			secret <placeholder>
//			public_key <pem-file>
//			jwks <url>
//			algorithms <alg>...
//			issuer <iss>
//			audience <aud>
//			owner_claim <claim>
//			leeway <duration>
//			scopes_claim <claim>
//			plans_claim <claim>
//			max_token_age <duration>
//			typ <type>...
//		}
//		scopes <scope>...
//		scope <scope> [<METHOD>...] <path>...
//		allow_encoded_slashes
//		max_expires_in_days <n>
//		idempotency_ttl <duration>
//		require_idempotency_key
//		store_timeout <duration>
//		realm <realm>
//		max_keys_per_owner <n>
//		last_used_interval <duration>
//		cors_origins <origin>...
//		identity_headers {
//			id <header>
//			owner <header>
//			scopes <header>
//			meta <header>
//			plan <header>
//		}
//		cache off
//		cache {
//			size <n>
//			ttl <duration>
//			refresh <duration>
//			outage_window <duration>
//			pubsub off
//		}
//		key_header <header>
//		plan <name> {
//			rate_limit <requests> <window>
//			quota <requests> day|month
//		}
//		default_plan <name>
//		secret_scanning [<public_keys>] {
//			public_keys <url|file>
//			action revoke|report
//			refresh <duration>
//		}
//	}
//
// Secrets (`secret`, the dashboard_jwt `secret`) must be placeholders such
// as {env.APIKEYS_SECRET} or {file./run/secrets/x}, resolved when the
// config is provisioned, so no secret is written into the adapted JSON.
// For the same reason a Redis URL may not hold a literal password.
//
// `store redis` takes one redis:// or rediss:// URL (standalone), several
// (seed nodes of a Redis Cluster), or one Sentinel URL,
// redis+sentinel://[user:pass@]host:port[,host:port...]/<master-name>[/db],
// which follows the primary the Sentinels name through failovers.
// wait_replicas makes every write of a new key wait until n replicas
// acknowledged it (Redis WAIT, at most timeout, default 1s), so a failover
// cannot lose a key already answered with 201; use it with Sentinel.
//
// Request paths that are not canonical (dot segments, encoded separators,
// `;`, `//`, needless or double encoding, invalid UTF-8) are refused with
// 400 non_canonical_path; allow_encoded_slashes lets `%2F` through (see
// Handler.AllowEncodedSlashes for its risk). Scope rule paths are matched
// case-sensitively, and a rule naming GET also covers HEAD.
func (h *Handler) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // consume directive name
	if d.NextArg() {
		return d.ArgErr()
	}
	for d.NextBlock(0) {
		switch d.Val() {
		case "store":
			if err := h.unmarshalStore(d); err != nil {
				return err
			}
		case "secret":
			vals, err := secretArgs(d)
			if err != nil {
				return err
			}
			h.Secret, h.PreviousSecrets = vals[0], vals[1:]
		case "key_prefix":
			if err := singleArg(d, &h.KeyPrefix); err != nil {
				return err
			}
		case "management_path":
			if err := singleArg(d, &h.ManagementPath); err != nil {
				return err
			}
		case "dashboard_jwt":
			if h.DashboardJWT != nil {
				return d.Err("dashboard_jwt may be given only once")
			}
			h.DashboardJWT = new(DashboardJWT)
			if err := h.DashboardJWT.unmarshalCaddyfile(d); err != nil {
				return err
			}
		case "scopes":
			args := d.RemainingArgs()
			if len(args) == 0 {
				return d.ArgErr()
			}
			h.Scopes = append(h.Scopes, args...)
		case "scope":
			rule, err := unmarshalScopeRule(d)
			if err != nil {
				return err
			}
			h.ScopeRules = append(h.ScopeRules, rule)
		case "max_expires_in_days":
			var s string
			if err := singleArg(d, &s); err != nil {
				return err
			}
			n, err := strconv.Atoi(s)
			if err != nil || n < 1 {
				return d.Errf("max_expires_in_days: %q is not a positive whole number", s)
			}
			h.MaxExpiresInDays = n
		case "idempotency_ttl":
			if err := durationArg(d, &h.IdempotencyTTL); err != nil {
				return err
			}
		case "store_timeout":
			if err := durationArg(d, &h.StoreTimeout); err != nil {
				return err
			}
		case "require_idempotency_key":
			if d.NextArg() {
				return d.ArgErr()
			}
			h.RequireIdempotencyKey = true
		case "allow_encoded_slashes":
			if d.NextArg() {
				return d.ArgErr()
			}
			h.AllowEncodedSlashes = true
		case "realm":
			if err := singleArg(d, &h.Realm); err != nil {
				return err
			}
		case "max_keys_per_owner":
			var s string
			if err := singleArg(d, &s); err != nil {
				return err
			}
			n, err := strconv.Atoi(s)
			if err != nil || n < 1 {
				return d.Errf("max_keys_per_owner: %q is not a positive whole number", s)
			}
			h.MaxKeysPerOwner = n
		case "last_used_interval":
			if err := durationArg(d, &h.LastUsedInterval); err != nil {
				return err
			}
		case "cors_origins":
			args := d.RemainingArgs()
			if len(args) == 0 {
				return d.ArgErr()
			}
			h.CORSOrigins = append(h.CORSOrigins, args...)
		case "identity_headers":
			if err := h.unmarshalIdentityHeaders(d); err != nil {
				return err
			}
		case "cache":
			if err := h.unmarshalCache(d); err != nil {
				return err
			}
		case "key_header":
			if err := singleArg(d, &h.KeyHeader); err != nil {
				return err
			}
		case "secret_scanning":
			if err := h.unmarshalSecretScanning(d); err != nil {
				return err
			}
		case "plan":
			if err := h.unmarshalPlan(d); err != nil {
				return err
			}
		case "default_plan":
			if h.DefaultPlan != "" {
				return d.Err("default_plan may be given only once")
			}
			if err := singleArg(d, &h.DefaultPlan); err != nil {
				return err
			}
		default:
			return d.Errf("unrecognized subdirective %q", d.Val())
		}
	}
	if h.DefaultPlan != "" && !slices.ContainsFunc(h.Plans, func(p Plan) bool { return p.Name == h.DefaultPlan }) {
		return d.Errf("default_plan %q names no plan of this apikeys block (plans: %s)", h.DefaultPlan, h.planNames())
	}
	return nil
}

func (h *Handler) unmarshalStore(d *caddyfile.Dispenser) error {
	if h.Store != nil {
		return d.Err("store may be given only once")
	}
	if !d.NextArg() {
		return d.Err("store needs a type: file or redis")
	}
	h.Store = &StoreConfig{Type: d.Val()}
	switch h.Store.Type {
	case "file":
		args := d.RemainingArgs()
		if len(args) > 1 {
			return d.ArgErr()
		}
		if len(args) == 1 {
			h.Store.Path = args[0]
		}
	case "redis":
		h.Store.URLs = d.RemainingArgs()
		if len(h.Store.URLs) == 0 {
			return d.Err("store redis needs at least one redis:// or rediss:// URL")
		}
		for _, u := range h.Store.URLs {
			if err := checkRedisURL(u); err != nil {
				return d.Err(err.Error())
			}
		}
	default:
		return d.Errf("unknown store type %q (want file or redis)", h.Store.Type)
	}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		switch d.Val() {
		case "namespace":
			if h.Store.Type != "redis" {
				return d.Errf("namespace is a store redis option")
			}
			if err := singleArg(d, &h.Store.Namespace); err != nil {
				return err
			}
		case "retention":
			if err := durationArg(d, &h.Store.Retention); err != nil {
				return err
			}
		case "wait_replicas":
			if h.Store.Type != "redis" {
				return d.Errf("wait_replicas is a store redis option")
			}
			if err := h.Store.unmarshalWaitReplicas(d); err != nil {
				return err
			}
		default:
			return d.Errf("unrecognized store %s option %q", h.Store.Type, d.Val())
		}
	}
	return nil
}

// checkRedisURL refuses a URL that carries a password unless the whole
// URL is one placeholder: anything else lands in the adapted JSON. It finds
// the password as the Redis client will (keystore.RedisURLHasPassword), so
// no spelling hides it. A URL that is a placeholder is checked at
// provision time.
func checkRedisURL(raw string) error {
	if isPlaceholder(raw) {
		return nil
	}
	has, err := keystore.RedisURLHasPassword(raw)
	if err != nil && strings.Contains(raw, "{") {
		return fmt.Errorf("store redis: a URL with a placeholder inside must still parse as a URL; to take a password from the environment, give the whole URL as one placeholder ({env.NAME})")
	}
	if !strings.HasPrefix(raw, "redis+sentinel://") {
		if _, perr := parseRedisURL(raw); perr != nil {
			return perr
		}
	}
	if err != nil {
		return fmt.Errorf("store redis: %s", strings.TrimPrefix(err.Error(), "keystore: "))
	}
	if has {
		return fmt.Errorf("store redis: a URL with a password must be given whole as a placeholder: put it in an environment variable and write {env.NAME}, so the password stays out of the adapted config")
	}
	return nil
}

// redisURLForm is what a valid `store redis` URL looks like, for errors.
const redisURLForm = "redis://[user:password@]host:6379[/db], rediss://… for TLS, or redis+sentinel://host:26379/<master-name>"

// parseRedisURL parses a redis:// or rediss:// URL, with errors that say
// what a valid one looks like. They never echo the URL: it may hold a
// password.
func parseRedisURL(raw string) (*url.URL, error) {
	if !strings.Contains(raw, "://") {
		return nil, fmt.Errorf("store redis: a URL must start with its scheme, like redis://localhost:6379 (want %s)", redisURLForm)
	}
	u, err := url.Parse(raw)
	if err != nil {
		return nil, fmt.Errorf("store redis: not a valid URL (want %s)", redisURLForm)
	}
	if u.Scheme != "redis" && u.Scheme != "rediss" {
		return nil, fmt.Errorf("store redis: URL scheme must be redis:// or rediss://, got %q (want %s)", u.Scheme, redisURLForm)
	}
	return u, nil
}

// keySourceErr says what is wrong with the key sources of a dashboard_jwt
// (exactly one of secret, public_key and jwks), in Caddyfile terms; nil
// when there is exactly one.
func (c *DashboardJWT) keySourceErr() error {
	var set []string
	for _, s := range []struct{ name, v string }{{"secret", c.Secret}, {"public_key", c.PublicKey}, {"jwks", c.JWKS}} {
		if s.v != "" {
			set = append(set, s.name)
		}
	}
	if len(set) == 1 {
		return nil
	}
	got := "none"
	if len(set) > 1 {
		got = strings.Join(set, " and ")
	}
	return fmt.Errorf("dashboard_jwt needs exactly one key source, got %s: secret {env.DASHBOARD_JWT_SECRET} (HMAC, at least 32 bytes), public_key /path/to/public.pem, or jwks https://idp.example.com/.well-known/jwks.json", got)
}

func (c *DashboardJWT) unmarshalCaddyfile(d *caddyfile.Dispenser) error {
	if d.NextArg() {
		return d.ArgErr()
	}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		var err error
		switch d.Val() {
		case "secret":
			c.Secret, err = secretArg(d)
		case "public_key":
			err = singleArg(d, &c.PublicKey)
		case "jwks":
			err = singleArg(d, &c.JWKS)
		case "algorithms":
			c.Algorithms = d.RemainingArgs()
			if len(c.Algorithms) == 0 {
				err = d.ArgErr()
			}
		case "issuer":
			err = singleArg(d, &c.Issuer)
		case "audience":
			err = singleArg(d, &c.Audience)
		case "owner_claim":
			err = singleArg(d, &c.OwnerClaim)
		case "leeway":
			err = durationArg(d, &c.Leeway)
		case "scopes_claim":
			err = singleArg(d, &c.ScopesClaim)
		case "plans_claim":
			err = singleArg(d, &c.PlansClaim)
		case "max_token_age":
			err = durationArg(d, &c.MaxTokenAge)
		case "typ":
			c.Types = d.RemainingArgs()
			if len(c.Types) == 0 {
				err = d.ArgErr()
			}
		default:
			err = d.Errf("unrecognized dashboard_jwt option %q", d.Val())
		}
		if err != nil {
			return err
		}
	}
	if err := c.keySourceErr(); err != nil {
		return d.Err(err.Error())
	}
	return nil
}

func (h *Handler) unmarshalIdentityHeaders(d *caddyfile.Dispenser) error {
	if d.NextArg() {
		return d.ArgErr()
	}
	if h.IdentityHeaders == nil {
		h.IdentityHeaders = new(IdentityHeaders)
	}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		var err error
		switch d.Val() {
		case "id":
			err = singleArg(d, &h.IdentityHeaders.ID)
		case "owner":
			err = singleArg(d, &h.IdentityHeaders.Owner)
		case "scopes":
			err = singleArg(d, &h.IdentityHeaders.Scopes)
		case "meta":
			err = singleArg(d, &h.IdentityHeaders.Meta)
		case "plan":
			err = singleArg(d, &h.IdentityHeaders.Plan)
		default:
			err = d.Errf("unrecognized identity_headers option %q", d.Val())
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// unmarshalCache reads `cache off` or a `cache { ... }` block.
func (h *Handler) unmarshalCache(d *caddyfile.Dispenser) error {
	if h.Cache != nil {
		return d.Err("cache may be given only once")
	}
	h.Cache = new(CacheConfig)
	if d.NextArg() {
		if d.Val() != "off" || d.NextArg() {
			return d.Err("cache takes no argument but off, or a block")
		}
		h.Cache.Disabled = true
		if d.NextBlock(d.Nesting()) {
			return d.Err("cache off takes no block")
		}
		return nil
	}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		var err error
		switch d.Val() {
		case "size":
			var s string
			if err = singleArg(d, &s); err == nil {
				n, perr := strconv.Atoi(s)
				if perr != nil || n < 1 {
					return d.Errf("cache size: %q is not a positive whole number", s)
				}
				h.Cache.Size = n
			}
		case "ttl":
			err = durationArg(d, &h.Cache.TTL)
		case "refresh":
			err = durationArg(d, &h.Cache.Refresh)
		case "outage_window":
			var w caddy.Duration
			if err = durationArg(d, &w); err == nil {
				h.Cache.OutageWindow = &w
			}
		case "pubsub":
			var v string
			if err = singleArg(d, &v); err == nil {
				if v != "off" {
					return d.Errf("cache pubsub: want off, got %q", v)
				}
				h.Cache.DisablePubSub = true
			}
		default:
			err = d.Errf("unrecognized cache option %q", d.Val())
		}
		if err != nil {
			return err
		}
	}
	return nil
}

var methodToken = regexp.MustCompile(`^[A-Z]+$`)

// knownMethods are the methods a scope rule may name: those of RFC 9110
// and PATCH (RFC 5789). A typo such as GTE would otherwise make a rule that
// never matches, leaving its paths to full-access keys only.
var knownMethods = []string{"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"}

// checkMethod refuses a method that is not in knownMethods.
func checkMethod(m string) error {
	if slices.Contains(knownMethods, m) {
		return nil
	}
	return fmt.Errorf("unknown HTTP method %q; a scope rule's methods are upper-case, one of %s", m, strings.Join(knownMethods, " "))
}

// unmarshalScopeRule reads `scope <scope> [<METHOD>...] <path>...`.
func unmarshalScopeRule(d *caddyfile.Dispenser) (ScopeRule, error) {
	args := d.RemainingArgs()
	if len(args) < 2 {
		return ScopeRule{}, d.Err("scope needs a scope name and at least one path: scope <scope> [<METHOD>...] <path>...")
	}
	rule := ScopeRule{Scope: args[0]}
	for _, a := range args[1:] {
		switch {
		case methodToken.MatchString(a) && len(rule.Paths) == 0:
			if err := checkMethod(a); err != nil {
				return ScopeRule{}, d.Errf("scope %s: %v", args[0], err)
			}
			rule.Methods = append(rule.Methods, a)
		case strings.HasPrefix(a, "/") || strings.HasPrefix(a, "*"):
			rule.Paths = append(rule.Paths, a)
		default:
			return ScopeRule{}, d.Errf("scope %s: %q is neither an upper-case method nor a path starting with / or *", args[0], a)
		}
	}
	if len(rule.Paths) == 0 {
		return ScopeRule{}, d.Errf("scope %s: at least one path is required", args[0])
	}
	return rule, nil
}

// secretArgs reads one or more secrets, which must be placeholders.
func secretArgs(d *caddyfile.Dispenser) ([]string, error) {
	name := d.Val()
	vals := d.RemainingArgs()
	if len(vals) == 0 {
		return nil, d.ArgErr()
	}
	for _, v := range vals {
		if !isPlaceholder(v) {
			// Never echo v: it may be the secret itself.
			return nil, d.Errf("%s must be a placeholder such as {env.APIKEYS_SECRET} or {file./run/secrets/apikeys}, so the secret never lands in the adapted config", name)
		}
	}
	return vals, nil
}

// secretArg reads a secret, which must be a placeholder.
func secretArg(d *caddyfile.Dispenser) (string, error) {
	name := d.Val()
	var v string
	if err := singleArg(d, &v); err != nil {
		return "", err
	}
	if !isPlaceholder(v) {
		// Never echo v: it may be the secret itself.
		return "", d.Errf("%s must be a placeholder such as {env.APIKEYS_SECRET} or {file./run/secrets/apikeys}, so the secret never lands in the adapted config", name)
	}
	return v, nil
}

func isPlaceholder(v string) bool {
	return len(v) > 2 && v[0] == '{' && v[len(v)-1] == '}' && !strings.ContainsAny(v[1:len(v)-1], "{}")
}

func singleArg(d *caddyfile.Dispenser, dst *string) error {
	if !d.NextArg() {
		return d.ArgErr()
	}
	*dst = d.Val()
	if d.NextArg() {
		return d.ArgErr()
	}
	return nil
}

func durationArg(d *caddyfile.Dispenser, dst *caddy.Duration) error {
	name := d.Val()
	var s string
	if err := singleArg(d, &s); err != nil {
		return err
	}
	dur, err := caddy.ParseDuration(s)
	if err != nil {
		return d.Errf("%s: %v", name, err)
	}
	*dst = caddy.Duration(dur)
	return nil
}

// Interface guard.
var _ caddyfile.Unmarshaler = (*Handler)(nil)

// unmarshalWaitReplicas reads `wait_replicas <n> [<timeout>]`.
func (c *StoreConfig) unmarshalWaitReplicas(d *caddyfile.Dispenser) error {
	args := d.RemainingArgs()
	if len(args) < 1 || len(args) > 2 {
		return d.ArgErr()
	}
	n, err := strconv.Atoi(args[0])
	if err != nil || n < 0 {
		return d.Errf("wait_replicas: %q is not a whole number of replicas", args[0])
	}
	c.WaitReplicas = n
	if len(args) == 2 {
		dur, err := caddy.ParseDuration(args[1])
		if err != nil || dur <= 0 {
			return d.Errf("wait_replicas: timeout %q is not a positive duration", args[1])
		}
		c.WaitTimeout = caddy.Duration(dur)
	}
	return nil
}
