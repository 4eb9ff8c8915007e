// Package jwtauth verifies the "dashboard JWTs" that authorize calls to the
// key-management API.
//
// A [Verifier] is built from a [Config] holding exactly one key source: an
// HMAC secret, a PEM public key (RSA, ECDSA or Ed25519, bare or inside a
// certificate) or the URL of a JSON Web Key Set. Verification is strict: the
// signing algorithm must be on an allowlist that can never contain "none" and
// never mixes HMAC with public keys, `exp` is required, `nbf` and `iat` are
// honoured with a small leeway, and issuer and audience are checked when
// configured. The owner of the session is read from a configurable claim.
//
// Every verification failure wraps [ErrInvalidToken] and carries a short,
// actionable reason ("token expired", "issuer mismatch", ...). Error texts
// never contain the token or any key material.
//
// The package has no Caddy dependency.
package jwtauth

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/golang-jwt/jwt/v5"
)

const (
	// MaxTokenLength is the largest token, in bytes, that Verify will parse.
	// Longer tokens are rejected before any decoding.
	MaxTokenLength = 8 << 10

	// MinSecretLength is the minimum length, in bytes, of an HMAC secret.
	MinSecretLength = 32

	// MaxOwnerLength is the maximum length, in bytes, of the owner claim.
	MaxOwnerLength = 256

	// DefaultLeeway is the clock-skew allowance used when Config.Leeway is 0.
	DefaultLeeway = 30 * time.Second

	// DefaultOwnerClaim is the owner claim used when Config.OwnerClaim is "".
	DefaultOwnerClaim = "sub"
)

var (
	// ErrInvalidToken is wrapped by every error returned from
	// [Verifier.Verify]. The error text adds a short reason after it.
	ErrInvalidToken = errors.New("jwtauth: invalid token")

	// ErrInvalidConfig is wrapped by every error returned from [New] for a
	// configuration mistake.
	ErrInvalidConfig = errors.New("jwtauth: invalid config")
)

// Config configures a [Verifier]. Zero values mean defaults. Exactly one of
// Secret, PublicKeyPEM and JWKSURL must be set; a non-nil Secret or
// PublicKeyPEM counts as set even when empty (and is then rejected).
type Config struct {
	// Secret is the HMAC secret (at least MinSecretLength bytes) for
	// HS256, HS384 and HS512 tokens.
	Secret []byte

	// PublicKeyPEM holds a PEM public key: a PKIX "PUBLIC KEY", a PKCS #1
	// "RSA PUBLIC KEY" or a "CERTIFICATE" whose key is used (its validity
	// period is not checked). Only the first PEM block is read. An RSA key
	// (at least 2048 bits) verifies RS256/384/512 and PS256/384/512; an
	// ECDSA key verifies the algorithm of its curve (P-256 ES256, P-384
	// ES384, P-521 ES512); an Ed25519 key verifies EdDSA.
	PublicKeyPEM []byte

	// JWKSURL is the URL of a JSON Web Key Set. It must use https, or
	// http to a loopback host. The set is fetched in the background,
	// refreshed periodically, and refreshed (rate-limited) when a token
	// names an unknown key ID. The default allowlist is every asymmetric
	// algorithm (RS*, PS*, ES*, EdDSA).
	JWKSURL string

	// Algorithms is the allowlist of signing algorithms. The default is
	// every algorithm the key source can verify. Naming an algorithm the
	// key source cannot verify, an unknown algorithm or "none" is a
	// configuration error; HS* with a public key or JWKS is rejected to
	// prevent algorithm-confusion attacks.
	Algorithms []string

	// Issuer, when set, must equal the token's `iss` claim.
	Issuer string

	// Audience, when set, must be one of the token's `aud` values.
	Audience string

	// OwnerClaim names the claim identifying the session owner. It must
	// be a non-empty string of at most MaxOwnerLength bytes that a backend
	// receives byte for byte in a header: valid UTF-8, no control, line or
	// paragraph separator or bidirectional control characters, and no
	// white space at either end (header values are trimmed, so "alice "
	// would reach the backend as "alice"). Default: DefaultOwnerClaim
	// ("sub").
	OwnerClaim string

	// ScopesClaim, when set, names the claim holding the scopes the
	// session may grant: an array of strings or a space-separated string.
	// "" means scopes are not read.
	ScopesClaim string

	// PlansClaim, when set, names the claim holding the plans the session
	// may assign to keys, in the same forms as ScopesClaim. "" means plans
	// are not read.
	PlansClaim string

	// Leeway is the allowed clock skew for `exp`, `nbf` and `iat`.
	// 0 means DefaultLeeway; negative values are invalid.
	Leeway time.Duration

	// MaxTokenAge, when set, refuses tokens issued for longer than it: a
	// token whose `exp` is more than MaxTokenAge after its `iat`, or more
	// than MaxTokenAge (plus Leeway) from now. 0 means no limit; negative
	// values are invalid.
	MaxTokenAge time.Duration

	// Types, when set, is the allowlist of the `typ` header (compared
	// case-insensitively, with an "application/" prefix ignored, as RFC
	// 7515 §4.1.9 says), e.g. "JWT" or "at+jwt". A token without `typ` is
	// then refused. Empty means `typ` is not checked.
	Types []string

	// HTTPClient fetches the JWKS. Default: a client with a 10 s timeout.
	// Its timeout (when set) also bounds each JWKS fetch. A copy is used
	// that rejects responses larger than 1 MiB and redirects that break
	// the JWKSURL rules (or exceed 5 hops) before the client's own
	// CheckRedirect runs.
	HTTPClient *http.Client

	// Now returns the current time; for tests. Default: time.Now.
	Now func() time.Time
}

// Claims is what a verified token grants.
type Claims struct {
	// Owner is the value of the owner claim.
	Owner string
	// Scopes are the scopes the session may grant, in token order without
	// duplicates. It is nil when Config.ScopesClaim is unset or the claim
	// is absent, and empty (non-nil) when the claim is present but empty.
	Scopes []string
	// Plans are the plans the session may assign, read from
	// Config.PlansClaim as Scopes is from ScopesClaim (nil when unset or
	// absent, empty when present but empty).
	Plans []string
	// ExpiresAt is the token's `exp`.
	ExpiresAt time.Time
}

// Verifier verifies dashboard JWTs. It is safe for concurrent use. Call
// Close when it is no longer needed.
type Verifier struct {
	parser      *jwt.Parser
	keyFunc     jwt.Keyfunc
	allowed     []string
	issuer      string
	audience    string
	ownerClaim  string
	scopesClaim string
	plansClaim  string
	maxAge      time.Duration
	leeway      time.Duration
	types       []string
	now         func() time.Time

	jwks      *jwksSource // nil unless JWKSURL is configured
	closeOnce sync.Once
}

// New checks cfg and builds a Verifier. It returns an error wrapping
// ErrInvalidConfig only for configuration mistakes.
//
// With JWKSURL, the key set is fetched in the background: New waits at most a
// few seconds for the first fetch and does not fail when the endpoint is
// unreachable; tokens verify once keys arrive. Background refreshing stops
// when ctx is done or Close is called.
func New(ctx context.Context, cfg Config) (*Verifier, error) {
	if ctx == nil {
		ctx = context.Background()
	}
	sources := 0
	for _, set := range []bool{cfg.Secret != nil, cfg.PublicKeyPEM != nil, cfg.JWKSURL != ""} {
		if set {
			sources++
		}
	}
	if sources != 1 {
		return nil, configErrorf("exactly one of Secret, PublicKeyPEM and JWKSURL must be set (got %d)", sources)
	}
	if cfg.Leeway < 0 {
		return nil, configErrorf("Leeway must not be negative")
	}
	if cfg.MaxTokenAge < 0 {
		return nil, configErrorf("MaxTokenAge must not be negative")
	}
	var types []string
	for _, t := range cfg.Types {
		if t = normalizeType(t); t == "" {
			return nil, configErrorf("Types must not contain an empty type")
		}
		types = append(types, t)
	}
	leeway := cfg.Leeway
	if leeway == 0 {
		leeway = DefaultLeeway
	}
	now := cfg.Now
	if now == nil {
		now = time.Now
	}
	v := &Verifier{
		issuer:      cfg.Issuer,
		audience:    cfg.Audience,
		ownerClaim:  cfg.OwnerClaim,
		scopesClaim: cfg.ScopesClaim,
		plansClaim:  cfg.PlansClaim,
		maxAge:      cfg.MaxTokenAge,
		leeway:      leeway,
		types:       types,
		now:         now,
	}
	if v.ownerClaim == "" {
		v.ownerClaim = DefaultOwnerClaim
	}

	var (
		kind    keyKind
		capable []string
	)
	switch {
	case cfg.Secret != nil:
		if len(cfg.Secret) < MinSecretLength {
			return nil, configErrorf("Secret must be at least %d bytes (got %d)", MinSecretLength, len(cfg.Secret))
		}
		secret := slices.Clone(cfg.Secret)
		kind, capable = kindHMAC, hmacAlgs
		v.keyFunc = func(*jwt.Token) (any, error) { return secret, nil }
	case cfg.PublicKeyPEM != nil:
		key, k, algs, err := parsePublicKeyPEM(cfg.PublicKeyPEM)
		if err != nil {
			return nil, err
		}
		kind, capable = k, algs
		v.keyFunc = func(*jwt.Token) (any, error) { return key, nil }
	default:
		if err := checkJWKSURL(cfg.JWKSURL); err != nil {
			return nil, err
		}
		kind, capable = kindJWKS, asymmetricAlgs
	}

	allowed, err := resolveAlgorithms(cfg.Algorithms, kind, capable)
	if err != nil {
		return nil, err
	}
	v.allowed = allowed

	opts := []jwt.ParserOption{
		jwt.WithValidMethods(allowed),
		jwt.WithExpirationRequired(),
		jwt.WithIssuedAt(),
		jwt.WithLeeway(leeway),
		jwt.WithTimeFunc(now),
		jwt.WithStrictDecoding(),
	}
	if cfg.Issuer != "" {
		opts = append(opts, jwt.WithIssuer(cfg.Issuer))
	}
	if cfg.Audience != "" {
		opts = append(opts, jwt.WithAudience(cfg.Audience))
	}
	v.parser = jwt.NewParser(opts...)

	if kind == kindJWKS {
		src, err := startJWKS(ctx, cfg.JWKSURL, cfg.HTTPClient)
		if err != nil {
			return nil, err
		}
		v.jwks = src
		v.keyFunc = src.keyfunc
	}
	return v, nil
}

// Close stops background JWKS refreshing and waits for in-flight fetches to
// be abandoned. Keys already fetched stay usable. Close is idempotent and a
// no-op for secret and PEM verifiers.
func (v *Verifier) Close() {
	v.closeOnce.Do(func() {
		if v.jwks != nil {
			v.jwks.close()
		}
	})
}

// Verify checks token and returns its claims. Every error wraps
// ErrInvalidToken and names the reason; it never contains the token.
func (v *Verifier) Verify(token string) (Claims, error) {
	if token == "" {
		return Claims{}, tokenError("token is empty")
	}
	if len(token) > MaxTokenLength {
		return Claims{}, tokenError(fmt.Sprintf("token is longer than %d bytes", MaxTokenLength))
	}
	mc := jwt.MapClaims{}
	tok, err := v.parser.ParseWithClaims(token, mc, v.keyFunc)
	if err != nil {
		return Claims{}, v.explain(tok, mc, err)
	}
	exp, err := mc.GetExpirationTime()
	if err != nil || exp == nil { // unreachable: the parser requires exp
		return Claims{}, tokenError("exp claim missing")
	}
	if err := v.checkHeader(tok.Header); err != nil {
		return Claims{}, err
	}
	if err := v.checkAge(mc, exp.Time); err != nil {
		return Claims{}, err
	}

	owner, err := v.owner(mc)
	if err != nil {
		return Claims{}, err
	}
	scopes, err := listClaim(mc, v.scopesClaim, "scopes", "scope")
	if err != nil {
		return Claims{}, err
	}
	plans, err := listClaim(mc, v.plansClaim, "plans", "plan")
	if err != nil {
		return Claims{}, err
	}
	return Claims{Owner: owner, Scopes: scopes, Plans: plans, ExpiresAt: exp.Time}, nil
}

// checkHeader refuses what golang-jwt does not check in the JOSE header:
// any `crit` (this verifier understands no extension, and RFC 7515
// §4.1.11 requires refusing a token whose critical extensions are not
// understood; an empty list is itself invalid), and a `typ` outside the
// allowlist.
func (v *Verifier) checkHeader(h map[string]any) error {
	if _, ok := h["crit"]; ok {
		return tokenError("crit header names extensions this server does not understand", jwt.ErrTokenUnverifiable)
	}
	if len(v.types) == 0 {
		return nil
	}
	typ, ok := h["typ"].(string)
	if !ok || !slices.Contains(v.types, normalizeType(typ)) {
		return tokenError("typ header not allowed (allowed: "+strings.Join(v.types, ", ")+")", jwt.ErrTokenUnverifiable)
	}
	return nil
}

// normalizeType returns a `typ` value in the form the allowlist compares:
// lower case, without an "application/" prefix.
func normalizeType(t string) string {
	t = strings.ToLower(strings.TrimSpace(t))
	return strings.TrimPrefix(t, "application/")
}

// checkAge refuses a token issued for longer than MaxTokenAge.
func (v *Verifier) checkAge(mc jwt.MapClaims, exp time.Time) error {
	if v.maxAge == 0 {
		return nil
	}
	if iat, err := mc.GetIssuedAt(); err == nil && iat != nil && exp.Sub(iat.Time) > v.maxAge {
		return tokenError(fmt.Sprintf("token lifetime (exp - iat) exceeds %s", v.maxAge), jwt.ErrTokenInvalidClaims)
	}
	if exp.Sub(v.now()) > v.maxAge+v.leeway {
		return tokenError(fmt.Sprintf("token expires more than %s from now", v.maxAge), jwt.ErrTokenInvalidClaims)
	}
	return nil
}

func (v *Verifier) owner(mc jwt.MapClaims) (string, error) {
	raw, ok := mc[v.ownerClaim]
	if !ok {
		return "", tokenError(fmt.Sprintf("owner claim %q missing", v.ownerClaim))
	}
	s, ok := raw.(string)
	switch {
	case !ok:
		return "", tokenError(fmt.Sprintf("owner claim %q is not a string", v.ownerClaim))
	case s == "":
		return "", tokenError(fmt.Sprintf("owner claim %q is empty", v.ownerClaim))
	case len(s) > MaxOwnerLength:
		return "", tokenError(fmt.Sprintf("owner claim %q is longer than %d bytes", v.ownerClaim, MaxOwnerLength))
	case !utf8.ValidString(s) || strings.IndexFunc(s, notInHeader) >= 0:
		return "", tokenError(fmt.Sprintf("owner claim %q contains control, separator or bidirectional control characters", v.ownerClaim))
	case strings.TrimFunc(s, isSpace) != s:
		return "", tokenError(fmt.Sprintf("owner claim %q begins or ends with white space", v.ownerClaim))
	}
	return s, nil
}

// notInHeader reports whether r may not appear in an owner: a character a
// backend would not receive as sent (control characters; line and
// paragraph separators, which some parsers treat as line ends) or that
// changes how text around it is displayed (bidirectional controls).
func notInHeader(r rune) bool {
	return unicode.IsControl(r) || unicode.In(r, unicode.Zl, unicode.Zp, unicode.Bidi_Control)
}

// isSpace reports whether r is white space that a header parser or an
// application may trim: Unicode white space and the byte order mark.
func isSpace(r rune) bool { return unicode.IsSpace(r) || r == '\uFEFF' }

// listClaim reads claim (named what in errors, an entry named one) as an
// array of strings or a space-separated string, without duplicates, in
// token order; nil when claim is "" or absent.
func listClaim(mc jwt.MapClaims, claim, what, one string) ([]string, error) {
	if claim == "" {
		return nil, nil
	}
	raw, ok := mc[claim]
	if !ok {
		return nil, nil
	}
	var list []string
	switch val := raw.(type) {
	case string:
		list = strings.Fields(val)
	case []any:
		list = make([]string, 0, len(val))
		for _, e := range val {
			s, ok := e.(string)
			if !ok {
				return nil, tokenError(fmt.Sprintf("%s claim %q must be an array of strings or a space-separated string", what, claim))
			}
			list = append(list, s)
		}
	default:
		return nil, tokenError(fmt.Sprintf("%s claim %q must be an array of strings or a space-separated string", what, claim))
	}
	out := make([]string, 0, len(list))
	for _, s := range list {
		if s == "" || !utf8.ValidString(s) || strings.IndexFunc(s, func(r rune) bool {
			return unicode.IsControl(r) || unicode.IsSpace(r)
		}) >= 0 {
			return nil, tokenError(fmt.Sprintf("%s claim %q contains an empty %s or one with spaces or control characters", what, claim, one))
		}
		if !slices.Contains(out, s) {
			out = append(out, s)
		}
	}
	return out, nil
}

// explain turns a parser error into an ErrInvalidToken error with a reason.
// Only fixed texts, configuration values and registered algorithm names are
// used, so nothing from the token leaks into the message.
func (v *Verifier) explain(tok *jwt.Token, mc jwt.MapClaims, err error) error {
	var ke *keyError
	switch {
	case errors.Is(err, jwt.ErrTokenMalformed) || tok == nil:
		return tokenError("malformed token", jwt.ErrTokenMalformed)
	case tok.Method == nil:
		if _, ok := tok.Header["alg"].(string); !ok {
			return tokenError("signing algorithm (alg header) missing", jwt.ErrTokenUnverifiable)
		}
		return tokenError(fmt.Sprintf("unsupported signing algorithm (allowed: %s)", strings.Join(v.allowed, ", ")), jwt.ErrTokenUnverifiable)
	case !slices.Contains(v.allowed, tok.Method.Alg()):
		return tokenError(fmt.Sprintf("signing algorithm %q not allowed (allowed: %s)", tok.Method.Alg(), strings.Join(v.allowed, ", ")), jwt.ErrTokenSignatureInvalid)
	case errors.As(err, &ke):
		return tokenError(ke.reason, jwt.ErrTokenUnverifiable)
	case errors.Is(err, jwt.ErrTokenUnverifiable):
		return tokenError("no usable verification key for this token", jwt.ErrTokenUnverifiable)
	case errors.Is(err, jwt.ErrTokenSignatureInvalid):
		return tokenError("invalid signature", jwt.ErrTokenSignatureInvalid)
	case errors.Is(err, jwt.ErrTokenInvalidClaims):
		return v.explainClaims(mc, err)
	default:
		return tokenError("verification failed")
	}
}

func (v *Verifier) explainClaims(mc jwt.MapClaims, err error) error {
	var (
		reasons []string
		causes  = []error{jwt.ErrTokenInvalidClaims}
	)
	add := func(sentinel error, reason string) {
		if errors.Is(err, sentinel) {
			reasons = append(reasons, reason)
			causes = append(causes, sentinel)
		}
	}
	add(jwt.ErrTokenExpired, "token expired")
	add(jwt.ErrTokenNotValidYet, "token not valid yet (nbf is in the future)")
	add(jwt.ErrTokenUsedBeforeIssued, "token issued in the future (iat)")
	add(jwt.ErrTokenInvalidIssuer, "issuer mismatch")
	add(jwt.ErrTokenInvalidAudience, "audience mismatch")
	if errors.Is(err, jwt.ErrTokenRequiredClaimMissing) {
		causes = append(causes, jwt.ErrTokenRequiredClaimMissing)
		if exp, e := mc.GetExpirationTime(); e == nil && exp == nil {
			reasons = append(reasons, "exp claim missing")
		}
		if iss, e := mc.GetIssuer(); v.issuer != "" && e == nil && iss == "" {
			reasons = append(reasons, "iss claim missing (an issuer is required)")
		}
		if aud, e := mc.GetAudience(); v.audience != "" && e == nil && (len(aud) == 0 || len(aud) == 1 && aud[0] == "") {
			reasons = append(reasons, "aud claim missing (an audience is required)")
		}
	}
	if errors.Is(err, jwt.ErrInvalidType) {
		causes = append(causes, jwt.ErrInvalidType)
		for _, c := range []struct {
			name string
			get  func() error
		}{
			{"exp", func() error { _, e := mc.GetExpirationTime(); return e }},
			{"nbf", func() error { _, e := mc.GetNotBefore(); return e }},
			{"iat", func() error { _, e := mc.GetIssuedAt(); return e }},
			{"iss", func() error { _, e := mc.GetIssuer(); return e }},
			{"aud", func() error { _, e := mc.GetAudience(); return e }},
		} {
			if c.get() != nil {
				reasons = append(reasons, c.name+" claim has an invalid type")
			}
		}
	}
	if len(reasons) == 0 {
		reasons = append(reasons, "invalid claims")
	}
	return tokenError(strings.Join(reasons, "; "), causes...)
}

// verifyError is the error returned by Verify. Its text is ErrInvalidToken's
// followed by the reason; it unwraps to ErrInvalidToken and to the matching
// golang-jwt sentinel errors (e.g. jwt.ErrTokenExpired).
type verifyError struct {
	reason string
	causes []error
}

func tokenError(reason string, causes ...error) error {
	return &verifyError{reason: reason, causes: append([]error{ErrInvalidToken}, causes...)}
}

func (e *verifyError) Error() string { return ErrInvalidToken.Error() + ": " + e.reason }

func (e *verifyError) Unwrap() []error { return e.causes }

func configErrorf(format string, args ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{ErrInvalidConfig}, args...)...)
}
