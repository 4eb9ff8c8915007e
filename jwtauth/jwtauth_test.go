package jwtauth

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
)

// ---------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------

var fixedNow = time.Date(2030, 6, 1, 12, 0, 0, 0, time.UTC)

func nowFn() time.Time { return fixedNow }

var (
	testSecret  = []byte("test-secret-0123456789-abcdefghijklmnop")
	otherSecret = []byte("other-secret-0123456789-abcdefghijklmno")
)

type testKeys struct {
	rsa, rsa2      *rsa.PrivateKey
	ec, ec2, ec384 *ecdsa.PrivateKey
	ed, ed2        ed25519.PrivateKey
}

var getKeys = sync.OnceValue(func() *testKeys {
	must := func(err error) {
		if err != nil {
			panic(err)
		}
	}
	var k testKeys
	var err error
	k.rsa, err = rsa.GenerateKey(rand.Reader, 2048)
	must(err)
	k.rsa2, err = rsa.GenerateKey(rand.Reader, 2048)
	must(err)
	k.ec, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	must(err)
	k.ec2, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	must(err)
	k.ec384, err = ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	must(err)
	_, k.ed, err = ed25519.GenerateKey(rand.Reader)
	must(err)
	_, k.ed2, err = ed25519.GenerateKey(rand.Reader)
	must(err)
	return &k
})

type claimsMod func(jwt.MapClaims)

func set(k string, v any) claimsMod { return func(c jwt.MapClaims) { c[k] = v } }
func del(k string) claimsMod        { return func(c jwt.MapClaims) { delete(c, k) } }

// claims returns a valid claim set (owner "alice", exp in an hour) with mods.
func claims(mods ...claimsMod) jwt.MapClaims {
	c := jwt.MapClaims{
		"sub": "alice",
		"iat": fixedNow.Unix(),
		"exp": fixedNow.Add(time.Hour).Unix(),
	}
	for _, m := range mods {
		m(c)
	}
	return c
}

func sign(t testing.TB, m jwt.SigningMethod, key any, c jwt.MapClaims, kid string) string {
	t.Helper()
	tok := jwt.NewWithClaims(m, c)
	if kid != "" {
		tok.Header["kid"] = kid
	}
	s, err := tok.SignedString(key)
	if err != nil {
		t.Fatalf("sign %s: %v", m.Alg(), err)
	}
	return s
}

func b64(b []byte) string { return base64.RawURLEncoding.EncodeToString(b) }

func b64JSON(t testing.TB, v any) string {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return b64(b)
}

// unsigned builds an `alg: none`-style token with an empty signature.
func unsigned(t testing.TB, alg string, c jwt.MapClaims) string {
	return b64JSON(t, map[string]any{"alg": alg, "typ": "JWT"}) + "." + b64JSON(t, c) + "."
}

// tamper replaces the payload of token, keeping header and signature.
func tamper(t testing.TB, token string, c jwt.MapClaims) string {
	parts := strings.Split(token, ".")
	parts[1] = b64JSON(t, c)
	return strings.Join(parts, ".")
}

func pemPKIX(t testing.TB, pub any) []byte {
	t.Helper()
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der})
}

func pemPKCS1(pub *rsa.PublicKey) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "RSA PUBLIC KEY", Bytes: x509.MarshalPKCS1PublicKey(pub)})
}

func pemCert(t testing.TB, priv *rsa.PrivateKey) []byte {
	t.Helper()
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "dashboard"},
		NotBefore:    fixedNow.Add(-time.Hour),
		NotAfter:     fixedNow.Add(time.Hour),
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &priv.PublicKey, priv)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
}

func mustNew(t testing.TB, cfg Config) *Verifier {
	t.Helper()
	if cfg.Now == nil {
		cfg.Now = nowFn
	}
	v, err := New(context.Background(), cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(v.Close)
	return v
}

// JWK builders (hand-written JSON, independent of the library under use).

func rsaJWK(kid, alg, use string, pub *rsa.PublicKey) map[string]any {
	return map[string]any{
		"kty": "RSA", "kid": kid, "alg": alg, "use": use,
		"n": b64(pub.N.Bytes()), "e": b64(big.NewInt(int64(pub.E)).Bytes()),
	}
}

func ecJWK(t testing.TB, kid string, pub *ecdsa.PublicKey) map[string]any {
	t.Helper()
	ep, err := pub.ECDH()
	if err != nil {
		t.Fatal(err)
	}
	raw := ep.Bytes() // 0x04 || X || Y
	n := (len(raw) - 1) / 2
	return map[string]any{
		"kty": "EC", "kid": kid, "alg": "ES256", "use": "sig", "crv": "P-256",
		"x": b64(raw[1 : 1+n]), "y": b64(raw[1+n:]),
	}
}

func edJWK(kid string, pub ed25519.PublicKey) map[string]any {
	return map[string]any{"kty": "OKP", "kid": kid, "alg": "EdDSA", "use": "sig", "crv": "Ed25519", "x": b64(pub)}
}

// jwksServer is a real HTTP JWKS endpoint whose behaviour tests can change.
type jwksServer struct {
	*httptest.Server
	hits   atomic.Int64
	delay  atomic.Int64 // nanoseconds to stall each response
	status atomic.Int64 // non-zero: answer with this status and no body
	mu     sync.Mutex
	body   []byte
}

func newJWKSServer(t testing.TB, tls bool, keys ...map[string]any) *jwksServer {
	t.Helper()
	s := &jwksServer{}
	s.setKeys(t, keys...)
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.hits.Add(1)
		if d := time.Duration(s.delay.Load()); d > 0 {
			select {
			case <-time.After(d):
			case <-r.Context().Done():
				return
			}
		}
		if st := s.status.Load(); st != 0 {
			w.WriteHeader(int(st))
			return
		}
		s.mu.Lock()
		body := s.body
		s.mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write(body)
	})
	if tls {
		s.Server = httptest.NewTLSServer(h)
	} else {
		s.Server = httptest.NewServer(h)
	}
	t.Cleanup(s.Close)
	return s
}

func (s *jwksServer) setKeys(t testing.TB, keys ...map[string]any) {
	t.Helper()
	if keys == nil {
		keys = []map[string]any{}
	}
	b, err := json.Marshal(map[string]any{"keys": keys})
	if err != nil {
		t.Fatal(err)
	}
	s.setBody(b)
}

func (s *jwksServer) setBody(b []byte) {
	s.mu.Lock()
	s.body = b
	s.mu.Unlock()
}

func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(3 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

type fixture struct {
	k                  *testKeys
	rsaPEM             []byte
	hmac, hmacIssAud   *Verifier
	hmacHS256Only      *Verifier
	rsa, rsaRS256Only  *Verifier
	rsaPKCS1, rsaCert  *Verifier
	ec, ec384, ed      *Verifier
	jwks, scopes, mail *Verifier
	srv                *jwksServer
}

func newFixture(t testing.TB) *fixture {
	t.Helper()
	k := getKeys()
	f := &fixture{k: k, rsaPEM: pemPKIX(t, &k.rsa.PublicKey)}
	f.hmac = mustNew(t, Config{Secret: testSecret})
	f.hmacIssAud = mustNew(t, Config{Secret: testSecret, Issuer: "https://dash.example", Audience: "apikeys"})
	f.hmacHS256Only = mustNew(t, Config{Secret: testSecret, Algorithms: []string{"HS256"}})
	f.rsa = mustNew(t, Config{PublicKeyPEM: f.rsaPEM})
	f.rsaRS256Only = mustNew(t, Config{PublicKeyPEM: f.rsaPEM, Algorithms: []string{"RS256"}})
	f.rsaPKCS1 = mustNew(t, Config{PublicKeyPEM: pemPKCS1(&k.rsa.PublicKey)})
	f.rsaCert = mustNew(t, Config{PublicKeyPEM: pemCert(t, k.rsa)})
	f.ec = mustNew(t, Config{PublicKeyPEM: pemPKIX(t, &k.ec.PublicKey)})
	f.ec384 = mustNew(t, Config{PublicKeyPEM: pemPKIX(t, &k.ec384.PublicKey)})
	f.ed = mustNew(t, Config{PublicKeyPEM: pemPKIX(t, k.ed.Public())})
	f.scopes = mustNew(t, Config{Secret: testSecret, ScopesClaim: "scope"})
	f.mail = mustNew(t, Config{Secret: testSecret, OwnerClaim: "email"})
	f.srv = newJWKSServer(t, false,
		rsaJWK("rsa1", "RS256", "sig", &k.rsa.PublicKey),
		ecJWK(t, "ec1", &k.ec.PublicKey),
		edJWK("ed1", k.ed.Public().(ed25519.PublicKey)),
		rsaJWK("rsa-enc", "RS256", "enc", &k.rsa2.PublicKey),
	)
	f.jwks = mustNew(t, Config{JWKSURL: f.srv.URL + "/.well-known/jwks.json"})
	return f
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

func TestVerifyValid(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	k := f.k
	tests := []struct {
		name      string
		v         *Verifier
		token     string
		wantOwner string
	}{
		{"HS256", f.hmac, sign(t, jwt.SigningMethodHS256, testSecret, claims(), ""), "alice"},
		{"HS384", f.hmac, sign(t, jwt.SigningMethodHS384, testSecret, claims(), ""), "alice"},
		{"HS512", f.hmac, sign(t, jwt.SigningMethodHS512, testSecret, claims(), ""), "alice"},
		{"HS256 with issuer and audience", f.hmacIssAud, sign(t, jwt.SigningMethodHS256, testSecret,
			claims(set("iss", "https://dash.example"), set("aud", "apikeys")), ""), "alice"},
		{"HS256 audience array", f.hmacIssAud, sign(t, jwt.SigningMethodHS256, testSecret,
			claims(set("iss", "https://dash.example"), set("aud", []string{"other", "apikeys"})), ""), "alice"},
		{"custom owner claim", f.mail, sign(t, jwt.SigningMethodHS256, testSecret,
			claims(set("email", "bob@example.com")), ""), "bob@example.com"},
		{"RS256 PEM", f.rsa, sign(t, jwt.SigningMethodRS256, k.rsa, claims(), ""), "alice"},
		{"RS512 PEM", f.rsa, sign(t, jwt.SigningMethodRS512, k.rsa, claims(), ""), "alice"},
		{"PS256 PEM", f.rsa, sign(t, jwt.SigningMethodPS256, k.rsa, claims(), ""), "alice"},
		{"RS256 PKCS1 PEM", f.rsaPKCS1, sign(t, jwt.SigningMethodRS256, k.rsa, claims(), ""), "alice"},
		{"RS256 certificate PEM", f.rsaCert, sign(t, jwt.SigningMethodRS256, k.rsa, claims(), ""), "alice"},
		{"ES256 PEM", f.ec, sign(t, jwt.SigningMethodES256, k.ec, claims(), ""), "alice"},
		{"ES384 PEM", f.ec384, sign(t, jwt.SigningMethodES384, k.ec384, claims(), ""), "alice"},
		{"EdDSA PEM", f.ed, sign(t, jwt.SigningMethodEdDSA, k.ed, claims(), ""), "alice"},
		{"RS256 JWKS", f.jwks, sign(t, jwt.SigningMethodRS256, k.rsa, claims(), "rsa1"), "alice"},
		{"ES256 JWKS", f.jwks, sign(t, jwt.SigningMethodES256, k.ec, claims(), "ec1"), "alice"},
		{"EdDSA JWKS", f.jwks, sign(t, jwt.SigningMethodEdDSA, k.ed, claims(), "ed1"), "alice"},
		{"RS256 JWKS without kid", f.jwks, sign(t, jwt.SigningMethodRS256, k.rsa, claims(), ""), "alice"},
		{"nbf and iat within leeway", f.hmac, sign(t, jwt.SigningMethodHS256, testSecret,
			claims(set("nbf", fixedNow.Add(20*time.Second).Unix()), set("iat", fixedNow.Add(20*time.Second).Unix())), ""), "alice"},
		{"large token below limit", f.hmac, sign(t, jwt.SigningMethodHS256, testSecret,
			claims(set("pad", strings.Repeat("x", 5000))), ""), "alice"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := tc.v.Verify(tc.token)
			if err != nil {
				t.Fatalf("Verify: %v", err)
			}
			if got.Owner != tc.wantOwner {
				t.Errorf("Owner = %q, want %q", got.Owner, tc.wantOwner)
			}
			if want := fixedNow.Add(time.Hour); !got.ExpiresAt.Equal(want) {
				t.Errorf("ExpiresAt = %v, want %v", got.ExpiresAt, want)
			}
			if got.Scopes != nil {
				t.Errorf("Scopes = %#v, want nil", got.Scopes)
			}
		})
	}
}

func TestVerifyRejects(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	k := f.k
	hs := func(c jwt.MapClaims) string { return sign(t, jwt.SigningMethodHS256, testSecret, c, "") }
	iss := set("iss", "https://dash.example")
	aud := set("aud", "apikeys")
	validHS := hs(claims())
	validRS := sign(t, jwt.SigningMethodRS256, k.rsa, claims(), "")
	validJWKS := sign(t, jwt.SigningMethodRS256, k.rsa, claims(), "rsa1")
	evil := claims(set("sub", "mallory"))

	tests := []struct {
		name     string
		v        *Verifier
		token    string
		want     string // substring of the reason; "" = any
		sentinel error  // optional golang-jwt sentinel the error must also match
	}{
		// Algorithm attacks.
		{"alg none vs secret", f.hmac, unsigned(t, "none", claims()), `signing algorithm "none" not allowed`, nil},
		{"alg none vs public key", f.rsa, unsigned(t, "none", claims()), `signing algorithm "none" not allowed`, nil},
		{"alg none vs JWKS", f.jwks, unsigned(t, "none", claims()), `signing algorithm "none" not allowed`, nil},
		{"alg None (unregistered spelling)", f.hmac, unsigned(t, "None", claims()), "unsupported signing algorithm", nil},
		{"alg header missing", f.hmac, b64JSON(t, map[string]any{"typ": "JWT"}) + "." + b64JSON(t, claims()) + ".", "alg header) missing", nil},
		{"alg none signed by golang-jwt", f.hmac, sign(t, jwt.SigningMethodNone, jwt.UnsafeAllowNoneSignatureType, claims(), ""), `"none" not allowed`, nil},
		{"HS256 keyed with the RSA public key PEM (confusion)", f.rsa, sign(t, jwt.SigningMethodHS256, f.rsaPEM, claims(), ""), `signing algorithm "HS256" not allowed`, jwt.ErrTokenSignatureInvalid},
		{"HS256 keyed with the RSA public key PEM vs JWKS", f.jwks, sign(t, jwt.SigningMethodHS256, f.rsaPEM, claims(), "rsa1"), `signing algorithm "HS256" not allowed`, nil},
		{"HS512 outside allowlist", f.hmacHS256Only, sign(t, jwt.SigningMethodHS512, testSecret, claims(), ""), `signing algorithm "HS512" not allowed (allowed: HS256)`, nil},
		{"PS256 outside allowlist", f.rsaRS256Only, sign(t, jwt.SigningMethodPS256, k.rsa, claims(), ""), `"PS256" not allowed`, nil},
		{"ES256 against RSA key", f.rsa, sign(t, jwt.SigningMethodES256, k.ec, claims(), ""), `"ES256" not allowed`, nil},
		{"JWK alg mismatch (PS256 with RS256 key)", f.jwks, sign(t, jwt.SigningMethodPS256, k.rsa, claims(), "rsa1"), "does not allow this token's algorithm", nil},
		{"JWK with use=enc", f.jwks, sign(t, jwt.SigningMethodRS256, k.rsa2, claims(), "rsa-enc"), "not a signing key", nil},
		{"kid not a string", f.jwks, func() string {
			tok := jwt.NewWithClaims(jwt.SigningMethodRS256, claims())
			tok.Header["kid"] = 7
			s, _ := tok.SignedString(k.rsa)
			return s
		}(), "kid header is not a string", nil},

		// Time claims.
		{"expired", f.hmac, hs(claims(set("exp", fixedNow.Add(-2*time.Minute).Unix()))), "token expired", jwt.ErrTokenExpired},
		{"not yet valid", f.hmac, hs(claims(set("nbf", fixedNow.Add(2*time.Minute).Unix()))), "token not valid yet", jwt.ErrTokenNotValidYet},
		{"issued in the future", f.hmac, hs(claims(set("iat", fixedNow.Add(2*time.Minute).Unix()))), "issued in the future", jwt.ErrTokenUsedBeforeIssued},
		{"missing exp", f.hmac, hs(claims(del("exp"))), "exp claim missing", jwt.ErrTokenRequiredClaimMissing},
		{"exp zero", f.hmac, hs(claims(set("exp", 0))), "exp claim missing", nil},
		{"exp not a number", f.hmac, hs(claims(set("exp", "tomorrow"))), "exp claim has an invalid type", nil},
		{"expired and wrong issuer", f.hmacIssAud, hs(claims(set("exp", fixedNow.Add(-time.Hour).Unix()), set("iss", "evil"), aud)), "token expired; issuer mismatch", nil},

		// Issuer / audience.
		{"wrong issuer", f.hmacIssAud, hs(claims(set("iss", "https://evil.example"), aud)), "issuer mismatch", jwt.ErrTokenInvalidIssuer},
		{"missing issuer", f.hmacIssAud, hs(claims(aud)), "iss claim missing", nil},
		{"wrong audience", f.hmacIssAud, hs(claims(iss, set("aud", "billing"))), "audience mismatch", jwt.ErrTokenInvalidAudience},
		{"wrong audience array", f.hmacIssAud, hs(claims(iss, set("aud", []string{"a", "b"}))), "audience mismatch", nil},
		{"missing audience", f.hmacIssAud, hs(claims(iss)), "aud claim missing", nil},

		// Owner claim.
		{"missing owner", f.hmac, hs(claims(del("sub"))), `owner claim "sub" missing`, nil},
		{"empty owner", f.hmac, hs(claims(set("sub", ""))), `owner claim "sub" is empty`, nil},
		{"non-string owner", f.hmac, hs(claims(set("sub", 42))), `owner claim "sub" is not a string`, nil},
		{"array owner", f.hmac, hs(claims(set("sub", []string{"alice"}))), "is not a string", nil},
		{"owner too long", f.hmac, hs(claims(set("sub", strings.Repeat("a", MaxOwnerLength+1)))), "longer than 256 bytes", nil},
		{"owner with control characters", f.hmac, hs(claims(set("sub", "alice\nadmin"))), "control characters", nil},
		{"custom owner claim missing", f.mail, validHS, `owner claim "email" missing`, nil},

		// Integrity.
		{"tampered payload HS256", f.hmac, tamper(t, validHS, evil), "invalid signature", jwt.ErrTokenSignatureInvalid},
		{"tampered payload RS256", f.rsa, tamper(t, validRS, evil), "invalid signature", nil},
		{"tampered payload JWKS", f.jwks, tamper(t, validJWKS, evil), "invalid signature", nil},
		{"truncated", f.hmac, validHS[:len(validHS)-6], "", nil},
		{"signature stripped", f.hmac, validHS[:strings.LastIndex(validHS, ".")+1], "invalid signature", nil},
		{"garbage", f.hmac, "garbage", "malformed token", jwt.ErrTokenMalformed},
		{"garbage segments", f.hmac, "a.b.c", "malformed token", nil},
		{"four segments", f.hmac, validHS + ".x", "malformed token", nil},
		{"payload not JSON", f.hmac, b64JSON(t, map[string]any{"alg": "HS256"}) + "." + b64([]byte("nope")) + ".sig", "malformed token", nil},
		{"empty", f.hmac, "", "token is empty", nil},
		{"too long", f.hmac, strings.Repeat("A", MaxTokenLength+1), "longer than 8192 bytes", nil},
		{"oversized but valid", f.hmac, hs(claims(set("pad", strings.Repeat("x", MaxTokenLength)))), "longer than 8192 bytes", nil},

		// Wrong keys.
		{"HMAC other secret", f.hmac, sign(t, jwt.SigningMethodHS256, otherSecret, claims(), ""), "invalid signature", nil},
		{"RSA other key", f.rsa, sign(t, jwt.SigningMethodRS256, k.rsa2, claims(), ""), "invalid signature", nil},
		{"ECDSA other key", f.ec, sign(t, jwt.SigningMethodES256, k.ec2, claims(), ""), "invalid signature", nil},
		{"Ed25519 other key", f.ed, sign(t, jwt.SigningMethodEdDSA, k.ed2, claims(), ""), "invalid signature", nil},
		{"JWKS known kid, other key", f.jwks, sign(t, jwt.SigningMethodRS256, k.rsa2, claims(), "rsa1"), "invalid signature", nil},
		{"JWKS no kid, other key", f.jwks, sign(t, jwt.SigningMethodRS256, k.rsa2, claims(), ""), "invalid signature", nil},
		{"JWKS unknown kid", f.jwks, sign(t, jwt.SigningMethodRS256, k.rsa2, claims(), "attacker-kid"), "unknown signing key id (kid)", nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := tc.v.Verify(tc.token)
			if err == nil {
				t.Fatalf("Verify accepted the token: %+v", got)
			}
			if !errors.Is(err, ErrInvalidToken) {
				t.Fatalf("error %v does not wrap ErrInvalidToken", err)
			}
			if !reflectZero(got) {
				t.Errorf("claims returned with error: %+v", got)
			}
			msg := err.Error()
			if !strings.HasPrefix(msg, "jwtauth: invalid token: ") {
				t.Errorf("error %q lacks the expected prefix", msg)
			}
			if tc.want != "" && !strings.Contains(msg, tc.want) {
				t.Errorf("error %q does not contain %q", msg, tc.want)
			}
			if tc.sentinel != nil && !errors.Is(err, tc.sentinel) {
				t.Errorf("error %q does not match %v", msg, tc.sentinel)
			}
			assertNoLeak(t, msg, tc.token)
		})
	}
}

func reflectZero(c Claims) bool { return c.Owner == "" && c.Scopes == nil && c.ExpiresAt.IsZero() }

// assertNoLeak checks that an error text contains neither the token, nor
// any sizeable part of it, nor key material.
func assertNoLeak(t *testing.T, msg, token string) {
	t.Helper()
	if len(token) >= 16 && strings.Contains(msg, token) {
		t.Errorf("error contains the token")
	}
	for _, part := range strings.Split(token, ".") {
		if len(part) >= 16 && strings.Contains(msg, part) {
			t.Errorf("error contains a token segment")
		}
	}
	for _, secret := range [][]byte{testSecret, otherSecret} {
		if strings.Contains(msg, string(secret)) {
			t.Errorf("error contains a secret")
		}
	}
}

func TestLeeway(t *testing.T) {
	t.Parallel()
	def := mustNew(t, Config{Secret: testSecret})
	short := mustNew(t, Config{Secret: testSecret, Leeway: 5 * time.Second})
	ago := func(d time.Duration) int64 { return fixedNow.Add(-d).Unix() }
	tests := []struct {
		name string
		v    *Verifier
		mod  claimsMod
		ok   bool
	}{
		{"exp 10s ago, default leeway", def, set("exp", ago(10*time.Second)), true},
		{"exp 29s ago, default leeway", def, set("exp", ago(29*time.Second)), true},
		{"exp 60s ago, default leeway", def, set("exp", ago(60*time.Second)), false},
		{"exp 10s ago, 5s leeway", short, set("exp", ago(10*time.Second)), false},
		{"nbf in 10s, default leeway", def, set("nbf", ago(-10*time.Second)), true},
		{"nbf in 60s, default leeway", def, set("nbf", ago(-60*time.Second)), false},
		{"iat in 10s, default leeway", def, set("iat", ago(-10*time.Second)), true},
		{"iat in 60s, default leeway", def, set("iat", ago(-60*time.Second)), false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := tc.v.Verify(sign(t, jwt.SigningMethodHS256, testSecret, claims(tc.mod), ""))
			if tc.ok && err != nil {
				t.Fatalf("Verify: %v", err)
			}
			if !tc.ok && !errors.Is(err, ErrInvalidToken) {
				t.Fatalf("Verify error = %v, want ErrInvalidToken", err)
			}
		})
	}
}

func TestScopes(t *testing.T) {
	t.Parallel()
	withScopes := mustNew(t, Config{Secret: testSecret, ScopesClaim: "scope"})
	noScopes := mustNew(t, Config{Secret: testSecret})
	tests := []struct {
		name    string
		v       *Verifier
		mod     claimsMod
		want    []string
		wantErr string
	}{
		{"array", withScopes, set("scope", []string{"keys:read", "keys:write", "keys:read"}), []string{"keys:read", "keys:write"}, ""},
		{"space-separated string", withScopes, set("scope", "  keys:read keys:write\tkeys:read "), []string{"keys:read", "keys:write"}, ""},
		{"absent", withScopes, del("scope"), nil, ""},
		{"empty array", withScopes, set("scope", []string{}), []string{}, ""},
		{"empty string", withScopes, set("scope", ""), []string{}, ""},
		{"claim not configured", noScopes, set("scope", []string{"keys:read"}), nil, ""},
		{"non-string element", withScopes, set("scope", []any{"keys:read", 1}), nil, "must be an array of strings or a space-separated string"},
		{"object", withScopes, set("scope", map[string]any{"a": true}), nil, "must be an array of strings"},
		{"null", withScopes, set("scope", nil), nil, "must be an array of strings"},
		{"element with space", withScopes, set("scope", []string{"keys:read keys:write"}), nil, "spaces or control characters"},
		{"empty element", withScopes, set("scope", []string{""}), nil, "empty scope"},
		{"control character", withScopes, set("scope", []string{"keys:\x00read"}), nil, "control characters"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := tc.v.Verify(sign(t, jwt.SigningMethodHS256, testSecret, claims(tc.mod), ""))
			if tc.wantErr != "" {
				if !errors.Is(err, ErrInvalidToken) || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("error = %v, want ErrInvalidToken containing %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("Verify: %v", err)
			}
			if (got.Scopes == nil) != (tc.want == nil) || !slices.Equal(got.Scopes, tc.want) {
				t.Errorf("Scopes = %#v, want %#v", got.Scopes, tc.want)
			}
		})
	}
}

// TestPlans: the plans claim is read as the scopes claim is, apart from it.
func TestPlans(t *testing.T) {
	t.Parallel()
	v := mustNew(t, Config{Secret: testSecret, ScopesClaim: "scope", PlansClaim: "plans"})
	mod := func(c jwt.MapClaims) { c["plans"] = "pro  free pro"; c["scope"] = []string{"a"} }
	got, err := v.Verify(sign(t, jwt.SigningMethodHS256, testSecret, claims(mod), ""))
	if err != nil || !slices.Equal(got.Plans, []string{"pro", "free"}) || !slices.Equal(got.Scopes, []string{"a"}) {
		t.Fatalf("plans %#v scopes %#v, %v", got.Plans, got.Scopes, err)
	}
	got, err = v.Verify(sign(t, jwt.SigningMethodHS256, testSecret, claims(del("plans")), ""))
	if err != nil || got.Plans != nil {
		t.Fatalf("absent: plans %#v, %v", got.Plans, err)
	}
	_, err = v.Verify(sign(t, jwt.SigningMethodHS256, testSecret, claims(set("plans", []any{"pro", 2})), ""))
	if !errors.Is(err, ErrInvalidToken) || !strings.Contains(err.Error(), `plans claim "plans" must be an array of strings`) {
		t.Fatalf("bad plans claim: %v", err)
	}
}

func TestConfigErrors(t *testing.T) {
	t.Parallel()
	k := getKeys()
	rsaPEM := pemPKIX(t, &k.rsa.PublicKey)
	ecPEM := pemPKIX(t, &k.ec.PublicKey)
	shortSecret := []byte("too-short-secret-31-bytes-long!")
	small, err := rsa.GenerateKey(rand.Reader, 1024)
	if err != nil {
		t.Fatal(err)
	}
	privDER, err := x509.MarshalPKCS8PrivateKey(k.rsa)
	if err != nil {
		t.Fatal(err)
	}
	privPEM := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: privDER})

	tests := []struct {
		name string
		cfg  Config
		want string
	}{
		{"no key source", Config{}, "exactly one of Secret, PublicKeyPEM and JWKSURL"},
		{"secret and PEM", Config{Secret: testSecret, PublicKeyPEM: rsaPEM}, "exactly one of"},
		{"secret and JWKS", Config{Secret: testSecret, JWKSURL: "https://idp.example/jwks"}, "exactly one of"},
		{"all three", Config{Secret: testSecret, PublicKeyPEM: rsaPEM, JWKSURL: "https://idp.example/jwks"}, "got 3"},
		{"short secret", Config{Secret: shortSecret}, "at least 32 bytes (got 31)"},
		{"empty secret", Config{Secret: []byte{}}, "at least 32 bytes (got 0)"},
		{"alg none", Config{Secret: testSecret, Algorithms: []string{"HS256", "none"}}, `"none" (unsigned tokens) is never allowed`},
		{"alg NONE", Config{PublicKeyPEM: rsaPEM, Algorithms: []string{"NONE"}}, "never allowed"},
		{"unknown alg", Config{Secret: testSecret, Algorithms: []string{"HS999"}}, `unknown algorithm "HS999"`},
		{"lower-case alg", Config{Secret: testSecret, Algorithms: []string{"hs256"}}, `unknown algorithm "hs256"`},
		{"empty alg", Config{Secret: testSecret, Algorithms: []string{""}}, "empty name"},
		{"HS256 with PEM key", Config{PublicKeyPEM: rsaPEM, Algorithms: []string{"RS256", "HS256"}}, "HS256 needs an HMAC Secret and cannot be used with an RSA public key (algorithm confusion)"},
		{"HS512 with JWKS", Config{JWKSURL: "https://idp.example/jwks", Algorithms: []string{"HS512"}}, "algorithm confusion"},
		{"RS256 with secret", Config{Secret: testSecret, Algorithms: []string{"RS256"}}, "RS256 cannot be verified with an HMAC secret"},
		{"RS256 with EC key", Config{PublicKeyPEM: ecPEM, Algorithms: []string{"RS256"}}, "cannot be verified with this ECDSA public key (supported: ES256)"},
		{"ES384 with P-256 key", Config{PublicKeyPEM: ecPEM, Algorithms: []string{"ES384"}}, "supported: ES256"},
		{"negative leeway", Config{Secret: testSecret, Leeway: -time.Second}, "Leeway must not be negative"},
		{"PEM garbage", Config{PublicKeyPEM: []byte("not a pem")}, "no PEM block"},
		{"PEM private key", Config{PublicKeyPEM: privPEM}, "holds a private key"},
		{"PEM corrupt body", Config{PublicKeyPEM: pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: []byte("junk")})}, "cannot be parsed"},
		{"PEM unknown type", Config{PublicKeyPEM: pem.EncodeToMemory(&pem.Block{Type: "OPENSSH KEY", Bytes: []byte("x")})}, "not supported"},
		{"RSA key too small", Config{PublicKeyPEM: pemPKIX(t, &small.PublicKey)}, "1024 bits; at least 2048"},
		{"JWKS http to remote host", Config{JWKSURL: "http://idp.example/jwks"}, "must use https"},
		{"JWKS ftp", Config{JWKSURL: "ftp://127.0.0.1/jwks"}, "must use https"},
		{"JWKS relative", Config{JWKSURL: "/jwks"}, "no host"},
		{"JWKS not a URL", Config{JWKSURL: "idp.example/jwks"}, "not an absolute URL"},
		{"JWKS with credentials", Config{JWKSURL: "https://user:hunter2-password@idp.example/jwks"}, "must not contain user info"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			v, err := New(context.Background(), tc.cfg)
			if err == nil {
				v.Close()
				t.Fatal("New succeeded, want error")
			}
			if !errors.Is(err, ErrInvalidConfig) {
				t.Errorf("error %v does not wrap ErrInvalidConfig", err)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %q does not contain %q", err, tc.want)
			}
			for _, s := range []string{string(testSecret), string(shortSecret), "hunter2-password", "MII"} {
				if strings.Contains(err.Error(), s) {
					t.Errorf("error %q leaks %q", err, s)
				}
			}
		})
	}
}

func TestConfigDefaultsAndAllowlists(t *testing.T) {
	t.Parallel()
	k := getKeys()
	tests := []struct {
		name string
		cfg  Config
		want []string
	}{
		{"secret", Config{Secret: testSecret}, []string{"HS256", "HS384", "HS512"}},
		{"RSA", Config{PublicKeyPEM: pemPKIX(t, &k.rsa.PublicKey)}, []string{"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}},
		{"P-256", Config{PublicKeyPEM: pemPKIX(t, &k.ec.PublicKey)}, []string{"ES256"}},
		{"P-384", Config{PublicKeyPEM: pemPKIX(t, &k.ec384.PublicKey)}, []string{"ES384"}},
		{"Ed25519", Config{PublicKeyPEM: pemPKIX(t, k.ed.Public())}, []string{"EdDSA"}},
		{"JWKS", Config{JWKSURL: "http://127.0.0.1:1/jwks"}, []string{"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}},
		{"explicit subset, deduplicated", Config{PublicKeyPEM: pemPKIX(t, &k.rsa.PublicKey), Algorithms: []string{"PS256", "RS256", "PS256"}}, []string{"PS256", "RS256"}},
		{"JWKS localhost http", Config{JWKSURL: "http://localhost:1/jwks", Algorithms: []string{"ES256"}}, []string{"ES256"}},
		{"JWKS IPv6 loopback http", Config{JWKSURL: "http://[::1]:1/jwks", Algorithms: []string{"EdDSA"}}, []string{"EdDSA"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			v := mustNew(t, tc.cfg)
			if !slices.Equal(v.allowed, tc.want) {
				t.Errorf("allowed = %v, want %v", v.allowed, tc.want)
			}
		})
	}
}

func TestSecretIsCopied(t *testing.T) {
	t.Parallel()
	secret := bytes.Clone(testSecret)
	v := mustNew(t, Config{Secret: secret})
	tok := sign(t, jwt.SigningMethodHS256, testSecret, claims(), "")
	secret[0] ^= 0xff // caller reuses its buffer
	if _, err := v.Verify(tok); err != nil {
		t.Fatalf("Verify after caller mutated its secret: %v", err)
	}
}

func TestSignHMAC(t *testing.T) {
	t.Parallel()
	v := mustNew(t, Config{Secret: testSecret, ScopesClaim: "scope"})
	in := map[string]any{"sub": "carol", "exp": fixedNow.Add(time.Hour).Unix(), "scope": "keys:read"}
	for _, alg := range []string{"HS256", "HS384", "HS512"} {
		t.Run(alg, func(t *testing.T) {
			tok, err := SignHMAC(testSecret, alg, in)
			if err != nil {
				t.Fatalf("SignHMAC: %v", err)
			}
			got, err := v.Verify(tok)
			if err != nil {
				t.Fatalf("Verify: %v", err)
			}
			if got.Owner != "carol" || !slices.Equal(got.Scopes, []string{"keys:read"}) {
				t.Errorf("claims = %+v", got)
			}
			hdr, _ := base64.RawURLEncoding.DecodeString(strings.Split(tok, ".")[0])
			if !strings.Contains(string(hdr), `"alg":"`+alg+`"`) {
				t.Errorf("header %s lacks alg %s", hdr, alg)
			}
		})
	}
	if len(in) != 3 {
		t.Errorf("SignHMAC mutated the claims map: %v", in)
	}

	short := []byte("short-secret-for-dev-token-cmd")
	errTests := []struct {
		name   string
		secret []byte
		alg    string
		want   string
	}{
		{"short secret", short, "HS256", "at least 32 bytes"},
		{"nil secret", nil, "HS256", "at least 32 bytes"},
		{"RS256", testSecret, "RS256", "supports only HS256, HS384, HS512"},
		{"none", testSecret, "none", "supports only"},
		{"lower case", testSecret, "hs256", "supports only"},
	}
	for _, tc := range errTests {
		t.Run(tc.name, func(t *testing.T) {
			tok, err := SignHMAC(tc.secret, tc.alg, in)
			if err == nil || tok != "" {
				t.Fatalf("SignHMAC = %q, %v; want error", tok, err)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %q does not contain %q", err, tc.want)
			}
			if len(tc.secret) > 0 && strings.Contains(err.Error(), string(tc.secret)) {
				t.Errorf("error leaks the secret")
			}
		})
	}
	if _, err := SignHMAC(testSecret, "HS256", map[string]any{"bad": func() {}}); err == nil {
		t.Error("SignHMAC accepted unencodable claims")
	}
}

func TestJWKSOverTLSWithCustomClient(t *testing.T) {
	t.Parallel()
	k := getKeys()
	srv := newJWKSServer(t, true, rsaJWK("rsa1", "RS256", "sig", &k.rsa.PublicKey))
	v := mustNew(t, Config{JWKSURL: srv.URL + "/jwks", HTTPClient: srv.Client()})
	got, err := v.Verify(sign(t, jwt.SigningMethodRS256, k.rsa, claims(), "rsa1"))
	if err != nil {
		t.Fatalf("Verify: %v", err)
	}
	if got.Owner != "alice" {
		t.Errorf("Owner = %q", got.Owner)
	}
}

// TestJWKSUnknownKIDFlood proves that a flood of tokens with random kids,
// while the JWKS server is slow, costs at most one refresh and that every
// Verify returns quickly.
func TestJWKSUnknownKIDFlood(t *testing.T) {
	t.Parallel()
	k := getKeys()
	srv := newJWKSServer(t, false, rsaJWK("rsa1", "RS256", "sig", &k.rsa.PublicKey))
	v := mustNew(t, Config{JWKSURL: srv.URL})
	if h := srv.hits.Load(); h != 1 {
		t.Fatalf("initial fetches = %d, want 1", h)
	}
	srv.delay.Store(int64(5 * time.Second)) // the JWKS server becomes very slow

	const burst = 50
	tokens := make([]string, 2*burst)
	for i := range tokens {
		tokens[i] = sign(t, jwt.SigningMethodRS256, k.rsa2, claims(), fmt.Sprintf("random-kid-%d-%x", i, big.NewInt(int64(i)*7919)))
	}

	// Sequential burst.
	var slowest time.Duration
	start := time.Now()
	for _, tok := range tokens[:burst] {
		t0 := time.Now()
		_, err := v.Verify(tok)
		slowest = max(slowest, time.Since(t0))
		if !errors.Is(err, ErrInvalidToken) || !strings.Contains(err.Error(), "unknown signing key id") {
			t.Fatalf("Verify error = %v, want unknown kid", err)
		}
		assertNoLeak(t, err.Error(), tok)
	}
	total := time.Since(start)
	t.Logf("sequential burst of %d: total %v, slowest %v", burst, total, slowest)
	if slowest > 500*time.Millisecond {
		t.Errorf("slowest Verify took %v, want < 500ms", slowest)
	}
	if total > time.Second {
		t.Errorf("burst took %v, want < 1s", total)
	}

	// The one permitted refresh reaches the (stalled) server.
	waitFor(t, "the unknown-kid refresh", func() bool { return srv.hits.Load() == 2 })

	// Concurrent burst while that refresh is still stalled.
	var (
		wg       sync.WaitGroup
		mu       sync.Mutex
		slowest2 time.Duration
	)
	for _, tok := range tokens[burst:] {
		wg.Go(func() {
			t0 := time.Now()
			_, err := v.Verify(tok)
			d := time.Since(t0)
			mu.Lock()
			slowest2 = max(slowest2, d)
			mu.Unlock()
			if !errors.Is(err, ErrInvalidToken) {
				t.Errorf("Verify error = %v", err)
			}
		})
	}
	wg.Wait()
	t.Logf("concurrent burst of %d: slowest %v", burst, slowest2)
	if slowest2 > 500*time.Millisecond {
		t.Errorf("slowest concurrent Verify took %v, want < 500ms", slowest2)
	}
	if h := srv.hits.Load(); h != 2 {
		t.Errorf("JWKS fetches = %d, want 2 (initial + one rate-limited refresh)", h)
	}

	// Known keys keep working from memory while the server is stalled.
	t0 := time.Now()
	if _, err := v.Verify(sign(t, jwt.SigningMethodRS256, k.rsa, claims(), "rsa1")); err != nil {
		t.Fatalf("Verify with known kid: %v", err)
	}
	if d := time.Since(t0); d > 500*time.Millisecond {
		t.Errorf("Verify with known kid took %v", d)
	}
}

// TestJWKSKeyRotation: a token signed with a newly published key triggers a
// refresh and is accepted on the first try.
func TestJWKSKeyRotation(t *testing.T) {
	t.Parallel()
	k := getKeys()
	srv := newJWKSServer(t, false, rsaJWK("old", "RS256", "sig", &k.rsa.PublicKey))
	v := mustNew(t, Config{JWKSURL: srv.URL})
	oldTok := sign(t, jwt.SigningMethodRS256, k.rsa, claims(), "old")
	if _, err := v.Verify(oldTok); err != nil {
		t.Fatalf("Verify with old key: %v", err)
	}
	// The IdP rotates: "new" is published, "old" is withdrawn.
	srv.setKeys(t, ecJWK(t, "new", &k.ec.PublicKey))

	got, err := v.Verify(sign(t, jwt.SigningMethodES256, k.ec, claims(), "new"))
	if err != nil {
		t.Fatalf("Verify with rotated key: %v", err)
	}
	if got.Owner != "alice" {
		t.Errorf("Owner = %q", got.Owner)
	}
	if h := srv.hits.Load(); h != 2 {
		t.Errorf("JWKS fetches = %d, want 2", h)
	}
	// The refresh replaced the set, so the withdrawn key is revoked; the
	// limiter is spent, so this unknown kid fails fast without a fetch.
	_, err = v.Verify(oldTok)
	if !errors.Is(err, ErrInvalidToken) || !strings.Contains(err.Error(), "unknown signing key id") {
		t.Fatalf("Verify with withdrawn key: %v", err)
	}
	if h := srv.hits.Load(); h != 2 {
		t.Errorf("JWKS fetches = %d, want still 2", h)
	}
}

func TestJWKSEndpointDown(t *testing.T) {
	t.Parallel()
	k := getKeys()
	tok := sign(t, jwt.SigningMethodRS256, k.rsa, claims(), "rsa1")

	t.Run("New succeeds and keys arrive later", func(t *testing.T) {
		t.Parallel()
		srv := newJWKSServer(t, false, rsaJWK("rsa1", "RS256", "sig", &k.rsa.PublicKey))
		srv.status.Store(http.StatusServiceUnavailable)
		t0 := time.Now()
		v := mustNew(t, Config{JWKSURL: srv.URL})
		if d := time.Since(t0); d > time.Second {
			t.Errorf("New took %v with a failing endpoint", d)
		}
		srv.status.Store(0) // endpoint recovers
		if _, err := v.Verify(tok); err != nil {
			t.Fatalf("Verify after recovery: %v", err)
		}
	})

	t.Run("error names the fetch problem", func(t *testing.T) {
		t.Parallel()
		srv := newJWKSServer(t, false)
		srv.status.Store(http.StatusServiceUnavailable)
		v := mustNew(t, Config{JWKSURL: srv.URL + "/jwks?token=query-secret"})
		_, err := v.Verify(tok)
		if !errors.Is(err, ErrInvalidToken) || !strings.Contains(err.Error(), "no JWKS signing keys loaded yet (last fetch: HTTP status 503)") {
			t.Fatalf("Verify error = %v", err)
		}
		if strings.Contains(err.Error(), "query-secret") || strings.Contains(err.Error(), srv.URL) {
			t.Errorf("error %q leaks the URL", err)
		}
	})

	t.Run("unreachable host", func(t *testing.T) {
		t.Parallel()
		srv := httptest.NewServer(http.NotFoundHandler())
		url := srv.URL
		srv.Close() // nothing listens there any more
		v := mustNew(t, Config{JWKSURL: url})
		_, err := v.Verify(tok)
		if !errors.Is(err, ErrInvalidToken) || !strings.Contains(err.Error(), "last fetch: request failed") {
			t.Fatalf("Verify error = %v", err)
		}
	})

	t.Run("redirect to plain http is refused", func(t *testing.T) {
		t.Parallel()
		srv := httptest.NewTLSServer(http.RedirectHandler("http://idp.example/jwks", http.StatusFound))
		t.Cleanup(srv.Close)
		v := mustNew(t, Config{JWKSURL: srv.URL, HTTPClient: srv.Client()})
		_, err := v.Verify(tok)
		if !errors.Is(err, ErrInvalidToken) || !strings.Contains(err.Error(), "last fetch: request failed") {
			t.Fatalf("Verify error = %v", err)
		}
	})

	t.Run("redirect within the rules is followed", func(t *testing.T) {
		t.Parallel()
		target := newJWKSServer(t, false, rsaJWK("rsa1", "RS256", "sig", &k.rsa.PublicKey))
		srv := httptest.NewServer(http.RedirectHandler(target.URL+"/jwks", http.StatusFound))
		t.Cleanup(srv.Close)
		v := mustNew(t, Config{JWKSURL: srv.URL})
		if _, err := v.Verify(tok); err != nil {
			t.Fatalf("Verify: %v", err)
		}
	})

	t.Run("response too large", func(t *testing.T) {
		t.Parallel()
		srv := newJWKSServer(t, false)
		srv.setBody([]byte(`{"keys":[],"pad":"` + strings.Repeat("x", 2<<20) + `"}`))
		v := mustNew(t, Config{JWKSURL: srv.URL})
		_, err := v.Verify(tok)
		if !errors.Is(err, ErrInvalidToken) || !strings.Contains(err.Error(), "response larger than") {
			t.Fatalf("Verify error = %v", err)
		}
	})

	t.Run("not a JWKS", func(t *testing.T) {
		t.Parallel()
		srv := newJWKSServer(t, false)
		srv.setBody([]byte("<html>login</html>"))
		v := mustNew(t, Config{JWKSURL: srv.URL})
		_, err := v.Verify(tok)
		if !errors.Is(err, ErrInvalidToken) || !strings.Contains(err.Error(), "not a JWKS JSON document") {
			t.Fatalf("Verify error = %v", err)
		}
	})

	t.Run("hanging endpoint does not block New for long", func(t *testing.T) {
		t.Parallel()
		srv := newJWKSServer(t, false, rsaJWK("rsa1", "RS256", "sig", &k.rsa.PublicKey))
		srv.delay.Store(int64(time.Minute))
		t0 := time.Now()
		v := mustNew(t, Config{JWKSURL: srv.URL})
		d := time.Since(t0)
		if d > initialFetchWait+time.Second {
			t.Errorf("New took %v", d)
		}
		t0 = time.Now()
		_, err := v.Verify(tok)
		if !errors.Is(err, ErrInvalidToken) || !strings.Contains(err.Error(), "no JWKS signing keys loaded yet") {
			t.Fatalf("Verify error = %v", err)
		}
		if d := time.Since(t0); d > 500*time.Millisecond {
			t.Errorf("Verify took %v while the first fetch hangs", d)
		}
		t0 = time.Now()
		v.Close() // abandons the hanging fetch
		if d := time.Since(t0); d > 2*time.Second {
			t.Errorf("Close took %v", d)
		}
	})
}

func TestJWKSCloseAndContextStopRefreshing(t *testing.T) {
	t.Parallel()
	k := getKeys()
	tok := sign(t, jwt.SigningMethodRS256, k.rsa, claims(), "unknown")

	srv := newJWKSServer(t, false, rsaJWK("rsa1", "RS256", "sig", &k.rsa.PublicKey))
	v := mustNew(t, Config{JWKSURL: srv.URL})
	v.Close()
	v.Close() // idempotent
	if _, err := v.Verify(tok); !errors.Is(err, ErrInvalidToken) {
		t.Fatalf("Verify error = %v", err)
	}
	if _, err := v.Verify(sign(t, jwt.SigningMethodRS256, k.rsa, claims(), "rsa1")); err != nil {
		t.Errorf("loaded keys should stay usable after Close: %v", err)
	}
	if h := srv.hits.Load(); h != 1 {
		t.Errorf("JWKS fetches after Close = %d, want 1", h)
	}

	srv2 := newJWKSServer(t, false, rsaJWK("rsa1", "RS256", "sig", &k.rsa.PublicKey))
	ctx, cancel := context.WithCancel(context.Background())
	v2, err := New(ctx, Config{JWKSURL: srv2.URL, Now: nowFn})
	if err != nil {
		t.Fatal(err)
	}
	defer v2.Close()
	cancel()
	if _, err := v2.Verify(tok); !errors.Is(err, ErrInvalidToken) {
		t.Fatalf("Verify error = %v", err)
	}
	if h := srv2.hits.Load(); h != 1 {
		t.Errorf("JWKS fetches after ctx cancel = %d, want 1", h)
	}
}

func TestConcurrentVerify(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	hs := sign(t, jwt.SigningMethodHS256, testSecret, claims(), "")
	js := sign(t, jwt.SigningMethodES256, f.k.ec, claims(), "ec1")
	bad := sign(t, jwt.SigningMethodHS256, otherSecret, claims(), "")
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for range 50 {
				if _, err := f.hmac.Verify(hs); err != nil {
					t.Errorf("hmac: %v", err)
					return
				}
				if _, err := f.jwks.Verify(js); err != nil {
					t.Errorf("jwks: %v", err)
					return
				}
				if _, err := f.hmac.Verify(bad); !errors.Is(err, ErrInvalidToken) {
					t.Errorf("bad: %v", err)
					return
				}
			}
		})
	}
	wg.Wait()
}
