package apikeys

import (
	"encoding/json"
	"net/http"
	"slices"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"

	"github.com/caddy-apikeys/caddy-apikeys/keystore"
)

// Fuzz targets of the module's input parsers. Plain `go test` runs their
// seeds (f.Add and testdata/fuzz/<FuzzName>/); scripts/fuzz.sh runs them
// as fuzzers.

// FuzzBearerToken checks the Authorization parser: a token is returned
// only for exactly one header that starts with "Bearer " (any case), and
// it is that header's rest, trimmed and non-empty.
func FuzzBearerToken(f *testing.F) {
	f.Add("Bearer wbk_abc", false)
	f.Add("bearer   eyJ.x.y  ", false)
	f.Add("Bearer ", false)
	f.Add("Basic YTpi", false)
	f.Add("BEARER\tx", true)
	f.Add("Bearer wbk_abc", true)
	f.Fuzz(func(t *testing.T, value string, twice bool) {
		r := &http.Request{Header: http.Header{"Authorization": {value}}}
		if twice {
			r.Header["Authorization"] = append(r.Header["Authorization"], value)
		}
		token, ok := bearerToken(r)
		if !ok {
			if token != "" {
				t.Fatalf("no token, but %q returned", token)
			}
			return
		}
		if twice {
			t.Fatal("a token from two Authorization headers")
		}
		if len(value) < 7 || !strings.EqualFold(value[:7], "Bearer ") {
			t.Fatalf("a token from %q, which is not a Bearer header", value)
		}
		if token == "" || token != strings.TrimSpace(value[7:]) {
			t.Fatalf("token %q from %q", token, value)
		}
	})
}

// fuzzHandler is a provisioned-enough Handler for the body parsers.
func fuzzHandler() *Handler {
	h := &Handler{MaxExpiresInDays: 365}
	h.declared = map[string]struct{}{"analytics:read": {}, "billing:read": {}, "webhooks:manage": {}}
	return h
}

// FuzzParseCreateRequest checks the create body parser: it never panics;
// a refusal is a 400 with a known code, a message and a bounded length; an
// accepted body is valid UTF-8 JSON and gives a request that satisfies
// every documented limit and survives a round trip through JSON.
func FuzzParseCreateRequest(f *testing.F) {
	for _, s := range []string{
		`{"name":"CI usage reader","scopes":["analytics:read"],"expires_in_days":90}`,
		`{"name":"full"}`,
		`{"name":"a","scopes":null,"expires_in_days":null}`,
		`{"name":"a","name":"b"}`,
		`{"name":"a","expires_in_days":1e309}`,
		`{"name":"a","expires_in_days":90.5}`,
		`{"name":"a","expires_in_days":1e2}`,
		`{"name":"a\u0000"}`,
		"{\"name\":\"\xff\"}",
		`{"name":"a","scopes":["billing:read","billing:read"]}`,
		`{"name":"a","scopes":[]}`,
		`[[[[[[[[[[]]]]]]]]]]`,
		`{"name":"` + strings.Repeat("é", 128) + `"}`,
		` {"name" : "a" } `,
	} {
		f.Add([]byte(s))
	}
	h := fuzzHandler()
	codes := []string{"invalid_request", "validation_error", "unknown_scope"}
	fields := []string{"", "name", "scopes", "expires_in_days"}
	f.Fuzz(func(t *testing.T, body []byte) {
		req, aerr := h.parseCreateRequest(body)
		if aerr != nil {
			if aerr.status != http.StatusBadRequest || !slices.Contains(codes, aerr.code) || !slices.Contains(fields, aerr.field) {
				t.Fatalf("refusal %d %q field %q", aerr.status, aerr.code, aerr.field)
			}
			if aerr.message == "" || len(aerr.message) > 512 || !utf8.ValidString(aerr.message) {
				t.Fatalf("message %q", aerr.message)
			}
			return
		}
		if !utf8.Valid(body) || !json.Valid(body) {
			t.Fatalf("accepted a body that is not valid UTF-8 JSON: %q", body)
		}
		if validateName(req.Name) != nil {
			t.Fatalf("accepted name %q", req.Name)
		}
		if req.Scopes != nil {
			if len(req.Scopes) == 0 || len(req.Scopes) > maxScopes {
				t.Fatalf("accepted %d scopes", len(req.Scopes))
			}
			for i, s := range req.Scopes {
				if _, ok := h.declared[s]; !ok || !validScope(s) || slices.Contains(req.Scopes[:i], s) {
					t.Fatalf("accepted scopes %q", req.Scopes)
				}
			}
		}
		if req.ExpiresInDays < 0 || req.ExpiresInDays > h.MaxExpiresInDays {
			t.Fatalf("accepted expires_in_days %d", req.ExpiresInDays)
		}

		// Round trip: the request, written back as JSON, parses to itself.
		m := map[string]any{"name": req.Name}
		if req.Scopes != nil {
			m["scopes"] = req.Scopes
		}
		if req.ExpiresInDays != 0 {
			m["expires_in_days"] = req.ExpiresInDays
		}
		again, _ := json.Marshal(m)
		req2, aerr := h.parseCreateRequest(again)
		if aerr != nil || req2.Name != req.Name || !slices.Equal(req2.Scopes, req.Scopes) || req2.ExpiresInDays != req.ExpiresInDays {
			t.Fatalf("round trip of %q: %+v %v, want %+v", again, req2, aerr, req)
		}
	})
}

// FuzzIdempotencyKey checks the Idempotency-Key parser (1 to 255 printable
// ASCII characters, exactly one header) and that the record IDs derived
// from (owner, endpoint, key) never collide for different inputs.
func FuzzIdempotencyKey(f *testing.F) {
	f.Add("3f1c8f1e-6a59-4c1b-9a34-0b0c7e0f2b1d", "alice", false)
	f.Add("", "alice", false)
	f.Add("clé", "bob", false)
	f.Add(strings.Repeat("k", 256), "a", true)
	f.Add("a\x00b", "a\x00b", false)
	f.Add("x y~", "", true)
	f.Fuzz(func(t *testing.T, value, owner string, twice bool) {
		r := &http.Request{Header: http.Header{"Idempotency-Key": {value}}}
		if twice {
			r.Header["Idempotency-Key"] = append(r.Header["Idempotency-Key"], value)
		}
		key, present, aerr := idempotencyKey(r)
		if !present {
			t.Fatal("a present header reported absent")
		}
		printable := len(value) >= 1 && len(value) <= 255
		for i := 0; i < len(value); i++ {
			printable = printable && value[i] >= 0x20 && value[i] <= 0x7e
		}
		switch {
		case aerr == nil && (twice || !printable || key != value):
			t.Fatalf("accepted %q (twice %v) as %q", value, twice, key)
		case aerr != nil && !twice && printable:
			t.Fatalf("refused %q", value)
		case aerr != nil && (aerr.status != 400 || aerr.code != "invalid_idempotency_key" || key != ""):
			t.Fatalf("refusal %d %q key %q", aerr.status, aerr.code, key)
		}
		// Length-prefixed parts: moving a boundary changes the hash.
		a := hashParts("idempotency", owner, "POST /v1/apikeys", value)
		b := hashParts("idempotency", owner+value, "POST /v1/apikeys", "")
		c := hashParts("idempotency", owner, "POST /v1/apikeys"+value, "")
		if value != "" && (a == b || a == c) {
			t.Fatalf("hashParts collides for owner %q, key %q", owner, value)
		}
		if len(a) != 64 || a != hashParts("idempotency", owner, "POST /v1/apikeys", value) {
			t.Fatalf("hashParts is not a stable SHA-256: %q", a)
		}
	})
}

// FuzzUnmarshalCaddyfile feeds arbitrary text as the block of an apikeys
// directive: the parser never panics, and whatever it accepts keeps
// secrets out of the config (placeholders only, no password in a Redis
// URL), names a known store type and encodes as JSON.
func FuzzUnmarshalCaddyfile(f *testing.F) {
	for _, s := range []string{
		"store file /var/lib/apikeys.db\nsecret {env.S}",
		"store redis redis://127.0.0.1:6379/0 {\n namespace gw\n wait_replicas 1 500ms\n}\nsecret {env.S}",
		"store redis redis://a:1 redis://b:2 redis://c:3",
		"store redis redis+sentinel://s1:26379,s2/mymaster/0",
		"store redis redis://:pw@h",
		"store redis redis://:pw@h/0?client_name={x}",
		"store redis redis+sentinel://u@x:pw@h/m",
		"dashboard_jwt {\n secret {env.J}\n issuer i\n audience a\n leeway 30s\n}",
		"scope analytics:read GET /v1/analytics/*\nscopes billing:read",
		"identity_headers {\n id X-Id\n}\nrealm r\nstore_timeout 2s\nmax_expires_in_days 90",
		"secret hunter2hunter2hunter2hunter2hunter2",
		"require_idempotency_key\nidempotency_ttl 24h\nkey_prefix sk_live_\nmanagement_path /keys",
		"store redis {env.REDIS_URL}",
		"dashboard_jwt {\n}\ndashboard_jwt {\n}",
		"}\n{",
		"\"unterminated",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, block string) {
		d := caddyfile.NewTestDispenser("apikeys {\n" + block + "\n}")
		h := new(Handler)
		if err := h.UnmarshalCaddyfile(d); err != nil {
			return
		}
		for _, ps := range h.PreviousSecrets {
			if !isPlaceholder(ps) {
				t.Fatalf("a previous secret is not a placeholder: %q", ps)
			}
		}
		if h.Secret != "" && !isPlaceholder(h.Secret) {
			t.Fatalf("accepted a literal secret")
		}
		if h.DashboardJWT != nil && h.DashboardJWT.Secret != "" && !isPlaceholder(h.DashboardJWT.Secret) {
			t.Fatalf("accepted a literal dashboard_jwt secret")
		}
		if s := h.Store; s != nil {
			if s.Type != "file" && s.Type != "redis" {
				t.Fatalf("accepted store type %q", s.Type)
			}
			for _, u := range s.URLs {
				if has, _ := keystore.RedisURLHasPassword(u); has && !isPlaceholder(u) {
					t.Fatalf("accepted Redis URL %q with a literal password", u)
				}
			}
			if s.WaitReplicas < 0 || s.WaitTimeout < 0 {
				t.Fatalf("accepted wait_replicas %d %d", s.WaitReplicas, s.WaitTimeout)
			}
		}
		for _, r := range h.ScopeRules {
			if len(r.Paths) == 0 {
				t.Fatalf("accepted scope rule %+v without a path", r)
			}
		}
		if _, err := json.Marshal(h); err != nil {
			t.Fatalf("accepted config does not encode: %v", err)
		}
	})
}
