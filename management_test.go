package apikeys

import (
	"context"
	"encoding/json"
	"fmt"
	"hash/crc32"
	"net/http"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"

	"github.com/caddy-apikeys/caddy-apikeys/keystore"
)

func testCtx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), 5*time.Second)
}

var (
	keyPattern  = regexp.MustCompile(`^wbk_[0-9a-f]{56}[0-9a-f]{8}$`)
	idPattern   = regexp.MustCompile(`^key_[a-z0-9]{20,}$`)
	timePattern = regexp.MustCompile(`^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$`)
)

// TestCreateKeyResponseShape checks a 201 against the reference page: the
// exact members in order, the key format and checksum, times, headers, and
// that the key is stored and validates.
func TestCreateKeyResponseShape(t *testing.T) {
	for _, kind := range storeKinds {
		t.Run(kind, func(t *testing.T) {
			g := startGateway(t, kind, "")
			resp := g.do(request{method: "POST", path: "/v1/apikeys", bearer: dashboardToken(t, "alice"),
				body: `{"name":"CI usage reader","scopes":["analytics:read","webhooks:manage"],"expires_in_days":90}`})
			if resp.status != http.StatusCreated {
				t.Fatalf("status %d: %s", resp.status, resp.body)
			}
			if got := resp.header.Get("Cache-Control"); got != "no-store" {
				t.Errorf("Cache-Control = %q, want no-store", got)
			}
			if got := resp.header.Get("Content-Type"); got != "application/json" {
				t.Errorf("Content-Type = %q", got)
			}
			// Member order as in the reference page.
			wantOrder := []string{"key_id", "name", "key", "prefix", "scopes", "expires_at", "created_at"}
			if got := memberOrder(t, resp.env.Data); strings.Join(got, ",") != strings.Join(wantOrder, ",") {
				t.Errorf("data members = %v, want %v", got, wantOrder)
			}
			if !strings.HasPrefix(string(resp.body), `{"success":true,"data":{`) {
				t.Errorf("envelope = %s", resp.body)
			}
			var k createdKey
			if err := json.Unmarshal(resp.env.Data, &k); err != nil {
				t.Fatal(err)
			}
			if !keyPattern.MatchString(k.Key) || len(k.Key) != 68 {
				t.Fatalf("key %q does not have the documented format", k.Key)
			}
			if sum := fmt.Sprintf("%08x", crc32.ChecksumIEEE([]byte(k.Key[:60]))); sum != k.Key[60:] {
				t.Errorf("checksum %s, want %s", k.Key[60:], sum)
			}
			if k.Prefix != k.Key[:12] {
				t.Errorf("prefix %q, want %q", k.Prefix, k.Key[:12])
			}
			if !idPattern.MatchString(k.KeyID) || strings.Contains(k.Key, strings.TrimPrefix(k.KeyID, "key_")) {
				t.Errorf("key_id %q malformed or derived from the key", k.KeyID)
			}
			if k.Name != "CI usage reader" || strings.Join(k.Scopes, ",") != "analytics:read,webhooks:manage" {
				t.Errorf("name/scopes = %q %v", k.Name, k.Scopes)
			}
			if k.ExpiresAt == nil || !timePattern.MatchString(*k.ExpiresAt) || !timePattern.MatchString(k.CreatedAt) {
				t.Fatalf("times not RFC 3339 UTC with milliseconds: %v %q", k.ExpiresAt, k.CreatedAt)
			}
			created, _ := time.Parse(time.RFC3339, k.CreatedAt)
			expires, _ := time.Parse(time.RFC3339, *k.ExpiresAt)
			if d := expires.Sub(created); d != 90*24*time.Hour {
				t.Errorf("expires_at - created_at = %v, want 90 days", d)
			}
			if d := time.Since(created); d < 0 || d > time.Minute {
				t.Errorf("created_at %v is not now", created)
			}

			// Stored under its owner, only as a digest.
			ctx, cancel := testCtx()
			defer cancel()
			stored, err := g.store.Get(ctx, k.KeyID)
			if err != nil {
				t.Fatalf("the key is not in the store: %v", err)
			}
			if stored.Owner != "alice" || stored.Prefix != k.Prefix {
				t.Errorf("stored owner/prefix = %q %q", stored.Owner, stored.Prefix)
			}
			if blob, _ := json.Marshal(stored); strings.Contains(string(blob), k.Key[len("wbk_"):60]) {
				t.Error("the stored record contains the raw key")
			}
			if g.countKeys("alice") != 1 {
				t.Error("want one key listed under alice")
			}
			// And it validates.
			if r := g.do(request{method: "GET", path: "/v1/analytics/daily", bearer: k.Key}); r.status != 200 {
				t.Errorf("minted key refused: %d %s", r.status, r.body)
			}
		})
	}
}

// TestCreateFullAccessKey checks the nulls of a key without scopes or expiry.
func TestCreateFullAccessKey(t *testing.T) {
	g := startGateway(t, "file", "")
	resp := g.do(request{method: "POST", path: "/v1/apikeys", bearer: dashboardToken(t, "alice"), body: `{"name":"full"}`})
	if resp.status != 201 {
		t.Fatalf("status %d: %s", resp.status, resp.body)
	}
	if !strings.Contains(string(resp.env.Data), `"scopes":null,"expires_at":null`) {
		t.Errorf("want scopes and expires_at null, got %s", resp.env.Data)
	}
}

func memberOrder(t *testing.T, raw json.RawMessage) []string {
	t.Helper()
	dec := json.NewDecoder(strings.NewReader(string(raw)))
	if _, err := dec.Token(); err != nil {
		t.Fatal(err)
	}
	var names []string
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			t.Fatal(err)
		}
		names = append(names, tok.(string))
		var skip json.RawMessage
		if err := dec.Decode(&skip); err != nil {
			t.Fatal(err)
		}
	}
	return names
}

// TestCreateKeyErrors walks the status table of DESIGN.md for POST
// /v1/apikeys. Every refused request leaves the store unchanged.
func TestCreateKeyErrors(t *testing.T) {
	for _, kind := range storeKinds {
		t.Run(kind, func(t *testing.T) {
			g := startGateway(t, kind, "")
			alice := dashboardToken(t, "alice")
			apiKey := g.create("alice", `{"name":"existing"}`).Key
			now := time.Now()
			claims := func(mod func(jwt.MapClaims)) jwt.MapClaims {
				c := jwt.MapClaims{"sub": "alice", "iss": testIssuer, "aud": testAudience,
					"iat": now.Unix(), "exp": now.Add(time.Hour).Unix()}
				mod(c)
				return c
			}
			hs := func(mod func(jwt.MapClaims)) string {
				return signToken(t, jwt.SigningMethodHS256, []byte(testJWTSecret), claims(mod))
			}
			none := signToken(t, jwt.SigningMethodNone, jwt.UnsafeAllowNoneSignatureType, claims(func(jwt.MapClaims) {}))
			valid := `{"name":"ok"}`
			long := strings.Repeat("a", 129)
			tooMany := `["` + strings.Repeat(`billing:read","`, 50) + `billing:read"]`
			huge := `{"name":"` + strings.Repeat("x", 70<<10) + `"}`

			cases := []struct {
				name   string
				req    request
				status int
				code   string
				field  string
			}{
				{"no authorization", request{body: valid}, 401, "unauthorized", ""},
				{"basic auth", request{body: valid, header: map[string]string{"Authorization": "Basic YTpi"}}, 401, "unauthorized", ""},
				{"api key caller", request{bearer: apiKey, body: valid}, 403, "api_key_not_allowed", ""},
				{"api-key-shaped caller", request{bearer: "wbk_whatever", body: valid}, 403, "api_key_not_allowed", ""},
				{"garbage jwt", request{bearer: "not.a.jwt", body: valid}, 401, "invalid_token", ""},
				{"expired jwt", request{bearer: hs(func(c jwt.MapClaims) { c["exp"] = now.Add(-time.Hour).Unix() }), body: valid}, 401, "invalid_token", ""},
				{"jwt without exp", request{bearer: hs(func(c jwt.MapClaims) { delete(c, "exp") }), body: valid}, 401, "invalid_token", ""},
				{"jwt not yet valid", request{bearer: hs(func(c jwt.MapClaims) { c["nbf"] = now.Add(time.Hour).Unix() }), body: valid}, 401, "invalid_token", ""},
				{"wrong issuer", request{bearer: hs(func(c jwt.MapClaims) { c["iss"] = "evil" }), body: valid}, 401, "invalid_token", ""},
				{"wrong audience", request{bearer: hs(func(c jwt.MapClaims) { c["aud"] = "other" }), body: valid}, 401, "invalid_token", ""},
				{"no owner claim", request{bearer: hs(func(c jwt.MapClaims) { delete(c, "sub") }), body: valid}, 401, "invalid_token", ""},
				{"alg none", request{bearer: none, body: valid}, 401, "invalid_token", ""},
				{"wrong hmac secret", request{bearer: signToken(t, jwt.SigningMethodHS256, []byte(strings.Repeat("k", 40)), claims(func(jwt.MapClaims) {})), body: valid}, 401, "invalid_token", ""},
				{"text/plain", request{bearer: alice, body: valid, contentType: "text/plain"}, 415, "unsupported_media_type", ""},
				{"body over 64 KiB", request{bearer: alice, body: huge}, 413, "payload_too_large", ""},
				{"not json", request{bearer: alice, body: `{"name":`}, 400, "invalid_request", ""},
				{"json array", request{bearer: alice, body: `["name"]`}, 400, "invalid_request", ""},
				{"trailing data", request{bearer: alice, body: `{"name":"a"} {}`}, 400, "invalid_request", ""},
				{"invalid utf-8", request{bearer: alice, body: "{\"name\":\"a\xff\"}"}, 400, "invalid_request", ""},
				{"unknown field", request{bearer: alice, body: `{"name":"a","owner":"bob"}`}, 400, "validation_error", ""},
				{"duplicate field", request{bearer: alice, body: `{"name":"a","name":"b"}`}, 400, "validation_error", "name"},
				{"name missing", request{bearer: alice, body: `{"scopes":["billing:read"]}`}, 400, "validation_error", "name"},
				{"name null", request{bearer: alice, body: `{"name":null}`}, 400, "validation_error", "name"},
				{"name wrong type", request{bearer: alice, body: `{"name":5}`}, 400, "validation_error", "name"},
				{"name empty", request{bearer: alice, body: `{"name":""}`}, 400, "validation_error", "name"},
				{"name blank", request{bearer: alice, body: `{"name":"   "}`}, 400, "validation_error", "name"},
				{"name too long", request{bearer: alice, body: `{"name":"` + long + `"}`}, 400, "validation_error", "name"},
				{"name control char", request{bearer: alice, body: `{"name":"a\nb"}`}, 400, "validation_error", "name"},
				{"name NUL", request{bearer: alice, body: `{"name":"a\u0000b"}`}, 400, "validation_error", "name"},
				{"scopes empty", request{bearer: alice, body: `{"name":"a","scopes":[]}`}, 400, "validation_error", "scopes"},
				{"scopes not array", request{bearer: alice, body: `{"name":"a","scopes":"billing:read"}`}, 400, "validation_error", "scopes"},
				{"scope empty string", request{bearer: alice, body: `{"name":"a","scopes":[""]}`}, 400, "validation_error", "scopes"},
				{"scope with space", request{bearer: alice, body: `{"name":"a","scopes":["billing read"]}`}, 400, "validation_error", "scopes"},
				{"scope not string", request{bearer: alice, body: `{"name":"a","scopes":[1]}`}, 400, "validation_error", "scopes"},
				{"scope duplicated", request{bearer: alice, body: `{"name":"a","scopes":["billing:read","billing:read"]}`}, 400, "validation_error", "scopes"},
				{"too many scopes", request{bearer: alice, body: `{"name":"a","scopes":` + tooMany + `}`}, 400, "validation_error", "scopes"},
				{"undeclared scope", request{bearer: alice, body: `{"name":"a","scopes":["admin:all"]}`}, 400, "unknown_scope", "scopes"},
				{"days zero", request{bearer: alice, body: `{"name":"a","expires_in_days":0}`}, 400, "validation_error", "expires_in_days"},
				{"days negative", request{bearer: alice, body: `{"name":"a","expires_in_days":-1}`}, 400, "validation_error", "expires_in_days"},
				{"days fractional", request{bearer: alice, body: `{"name":"a","expires_in_days":90.5}`}, 400, "validation_error", "expires_in_days"},
				{"days string", request{bearer: alice, body: `{"name":"a","expires_in_days":"90"}`}, 400, "validation_error", "expires_in_days"},
				{"days overflow", request{bearer: alice, body: `{"name":"a","expires_in_days":1e309}`}, 400, "validation_error", "expires_in_days"},
				{"days above max", request{bearer: alice, body: `{"name":"a","expires_in_days":366}`}, 400, "validation_error", "expires_in_days"},
				{"idempotency key empty", request{bearer: alice, body: valid, header: map[string]string{"Idempotency-Key": ""}}, 400, "invalid_idempotency_key", ""},
				{"idempotency key too long", request{bearer: alice, body: valid, header: map[string]string{"Idempotency-Key": strings.Repeat("k", 256)}}, 400, "invalid_idempotency_key", ""},
				{"idempotency key not ascii", request{bearer: alice, body: valid, header: map[string]string{"Idempotency-Key": "clé"}}, 400, "invalid_idempotency_key", ""},
				{"below management path", request{bearer: alice, path: "/v1/apikeys/key_123", method: "GET"}, 404, "not_found", ""},
				{"below management path, no auth", request{path: "/v1/apikeys/key_123", method: "GET"}, 401, "unauthorized", ""},
			}
			before := g.countKeys("alice")
			for _, tc := range cases {
				t.Run(tc.name, func(t *testing.T) {
					if tc.req.method == "" {
						tc.req.method = "POST"
					}
					if tc.req.path == "" {
						tc.req.path = "/v1/apikeys"
					}
					resp := g.do(tc.req)
					if resp.status != tc.status || resp.errCode() != tc.code {
						t.Fatalf("got %d %q, want %d %q: %s", resp.status, resp.errCode(), tc.status, tc.code, resp.body)
					}
					if resp.env.Success || resp.env.Error.Message == "" {
						t.Errorf("error envelope incomplete: %s", resp.body)
					}
					if tc.field != "" && resp.env.Error.Field != tc.field {
						t.Errorf("field = %q, want %q", resp.env.Error.Field, tc.field)
					}
					if tc.status == 401 && !strings.HasPrefix(resp.header.Get("WWW-Authenticate"), `Bearer realm="apikeys"`) {
						t.Errorf("WWW-Authenticate = %q", resp.header.Get("WWW-Authenticate"))
					}
				})
			}
			if after := g.countKeys("alice"); after != before {
				t.Errorf("refused requests changed the store: %d keys before, %d after", before, after)
			}

			t.Run("other methods", func(t *testing.T) {
				for _, m := range []string{"PUT", "DELETE", "PATCH"} {
					resp := g.do(request{method: m, path: "/v1/apikeys", bearer: alice})
					if resp.status != 405 || resp.errCode() != "method_not_allowed" || resp.header.Get("Allow") != "GET, POST" {
						t.Errorf("%s: %d %q Allow=%q", m, resp.status, resp.errCode(), resp.header.Get("Allow"))
					}
				}
			})
			t.Run("declared and rule scopes accepted", func(t *testing.T) {
				k := g.create("alice", `{"name":"a","scopes":["billing:read","analytics:read"],"expires_in_days":365}`)
				if len(k.Scopes) != 2 {
					t.Errorf("scopes = %v", k.Scopes)
				}
			})
		})
	}
}

// TestCreateStoreUnavailable stops Redis under the gateway: a create gets
// 503 with Retry-After, nothing is minted, and service resumes with Redis.
func TestCreateStoreUnavailable(t *testing.T) {
	g := startGateway(t, "redis", "")
	alice := dashboardToken(t, "alice")
	key := g.create("alice", `{"name":"before"}`)
	g.redis.Stop()
	for _, hdr := range []map[string]string{nil, {"Idempotency-Key": "outage-1"}} {
		start := time.Now()
		resp := g.do(request{method: "POST", path: "/v1/apikeys", bearer: alice, body: `{"name":"during"}`, header: hdr})
		if resp.status != 503 || resp.errCode() != "store_unavailable" || resp.header.Get("Retry-After") == "" {
			t.Fatalf("got %d %q Retry-After=%q: %s", resp.status, resp.errCode(), resp.header.Get("Retry-After"), resp.body)
		}
		if d := time.Since(start); d > 3*time.Second {
			t.Errorf("503 took %v; store_timeout is 500ms", d)
		}
	}
	// The guard cannot check keys it does not know either (keys it
	// validated recently keep working: see TestGuardOutageWindow).
	unknown, err := keystore.Mint("wbk_")
	if err != nil {
		t.Fatal(err)
	}
	if resp := g.do(request{method: "GET", path: "/v1/analytics", bearer: unknown}); resp.status != 503 || resp.errCode() != "store_unavailable" {
		t.Errorf("guard during outage: %d %s", resp.status, resp.body)
	}
	g.redis.Restart()
	if n := g.countKeys("alice"); n != 1 {
		t.Errorf("after the outage alice has %d keys, want 1 (nothing minted during it)", n)
	}
	// A retry with the same Idempotency-Key runs afresh now.
	resp := g.do(request{method: "POST", path: "/v1/apikeys", bearer: alice, body: `{"name":"during"}`, header: map[string]string{"Idempotency-Key": "outage-1"}})
	if resp.status != 201 || resp.header.Get("Idempotent-Replayed") != "" {
		t.Fatalf("retry after outage: %d %s", resp.status, resp.body)
	}
	if r := g.do(request{method: "GET", path: "/v1/analytics", bearer: key.Key}); r.status != 200 {
		t.Errorf("old key after outage: %d", r.status)
	}
}

// TestRequireIdempotencyKey checks the require_idempotency_key option.
func TestRequireIdempotencyKey(t *testing.T) {
	g := startGateway(t, "file", "require_idempotency_key")
	alice := dashboardToken(t, "alice")
	resp := g.do(request{method: "POST", path: "/v1/apikeys", bearer: alice, body: `{"name":"a"}`})
	if resp.status != 400 || resp.errCode() != "idempotency_key_required" {
		t.Fatalf("without key: %d %s", resp.status, resp.body)
	}
	resp = g.do(request{method: "POST", path: "/v1/apikeys", bearer: alice, body: `{"name":"a"}`, header: map[string]string{"Idempotency-Key": "k1"}})
	if resp.status != 201 {
		t.Fatalf("with key: %d %s", resp.status, resp.body)
	}
}
