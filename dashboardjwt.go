package apikeys

import (
	"fmt"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"

	"github.com/caddy-apikeys/caddy-apikeys/jwtauth"
)

// DashboardJWT configures verification of the dashboard session tokens that
// may call the management API. Exactly one key source (Secret, PublicKey or
// JWKS) must be set.
type DashboardJWT struct {
	// Secret is the HMAC key for HS256/HS384/HS512 tokens, at least 32
	// bytes. Use a placeholder such as `{env.DASHBOARD_JWT_SECRET}`; it is
	// resolved at provision time.
	Secret string `json:"secret,omitempty"`
	// PublicKey is the path of a PEM public key (RSA, ECDSA or Ed25519) or
	// certificate for RS*, PS*, ES* or EdDSA tokens.
	PublicKey string `json:"public_key,omitempty"`
	// JWKS is the URL of a JSON Web Key Set. Keys are refreshed
	// periodically, and a token with an unknown `kid` triggers a
	// rate-limited refresh.
	JWKS string `json:"jwks,omitempty"`
	// Algorithms is the allowlist of signing algorithms. Default: every
	// algorithm of the configured key kind (HS256/384/512 for a secret;
	// RS*, PS* for RSA; the curve's ES* for ECDSA; EdDSA for Ed25519; all
	// asymmetric ones for JWKS). "none" is never accepted.
	Algorithms []string `json:"algorithms,omitempty"`
	// Issuer, when set, must equal the token's `iss`.
	Issuer string `json:"issuer,omitempty"`
	// Audience, when set, must be among the token's `aud`.
	Audience string `json:"audience,omitempty"`
	// OwnerClaim names the claim that identifies the key owner.
	// Default: "sub".
	OwnerClaim string `json:"owner_claim,omitempty"`
	// Leeway allows for clock skew on `exp`, `nbf` and `iat`. Default: 30s.
	Leeway caddy.Duration `json:"leeway,omitempty"`
	// ScopesClaim, when set, names the claim (an array of strings or a
	// space-separated string) listing the scopes a session may grant.
	// Creating, changing or rotating a key with another scope, or with
	// full access, is then refused with 403 scope_not_grantable; a "*"
	// in the claim grants everything. Default: unset (no cap).
	ScopesClaim string `json:"scopes_claim,omitempty"`
	// PlansClaim, when set, names the claim (an array of strings or a
	// space-separated string) listing the plans a session may assign.
	// Creating, changing or rotating a key to another plan, or leaving a
	// key without a plan, is then refused with 403 plan_not_grantable;
	// the default_plan is always grantable, and a "*" in the claim grants
	// every plan and none. Default: unset (no cap).
	PlansClaim string `json:"plans_claim,omitempty"`
	// MaxTokenAge, when set, refuses tokens issued for longer than it
	// (`exp` more than this after `iat`, or after now). Default: unset (no
	// limit beyond `exp`).
	MaxTokenAge caddy.Duration `json:"max_token_age,omitempty"`
	// Types, when set, is the allowlist of the token's `typ` header (e.g.
	// "JWT", "at+jwt"; compared case-insensitively, "application/"
	// ignored); a token without `typ` is then refused. Default: unset
	// (`typ` not checked).
	Types []string `json:"typ,omitempty"`
}

// newVerifier resolves secrets and reads key files, then builds the verifier.
func (c *DashboardJWT) newVerifier(ctx caddy.Context, repl *caddy.Replacer) (*jwtauth.Verifier, error) {
	cfg := jwtauth.Config{
		Algorithms:  c.Algorithms,
		Issuer:      repl.ReplaceKnown(c.Issuer, ""),
		Audience:    repl.ReplaceKnown(c.Audience, ""),
		OwnerClaim:  c.OwnerClaim,
		ScopesClaim: c.ScopesClaim,
		PlansClaim:  c.PlansClaim,
		Leeway:      time.Duration(c.Leeway),
		MaxTokenAge: time.Duration(c.MaxTokenAge),
		Types:       c.Types,
		HTTPClient:  &http.Client{Timeout: 10 * time.Second},
	}
	if err := c.keySourceErr(); err != nil {
		return nil, fmt.Errorf("apikeys: %w", err)
	}
	var err error
	if cfg.Secret, err = resolveSecret(repl, "dashboard_jwt secret", c.Secret); err != nil {
		return nil, err
	}
	if c.PublicKey != "" {
		p := repl.ReplaceKnown(c.PublicKey, "")
		if cfg.PublicKeyPEM, err = os.ReadFile(p); err != nil {
			return nil, fmt.Errorf("apikeys: dashboard_jwt public_key: %w", err)
		}
	}
	cfg.JWKSURL = strings.TrimSpace(repl.ReplaceKnown(c.JWKS, ""))
	if cfg.JWKSURL != "" && cfg.Audience == "" {
		// A JWKS is often an identity provider's, whose tokens for other
		// applications it signs with the same keys.
		ctx.Logger().Warn("dashboard_jwt: jwks is set without audience, so a token the identity provider issued for any other application is accepted here; set audience to this dashboard's")
	}
	v, err := jwtauth.New(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("apikeys: dashboard_jwt: %w", err)
	}
	ctx.Logger().Debug("dashboard JWT verification ready",
		zap.Bool("hmac", cfg.Secret != nil), zap.String("public_key", c.PublicKey), zap.Bool("jwks", cfg.JWKSURL != ""))
	return v, nil
}
