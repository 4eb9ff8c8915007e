package apikeys

import (
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/caddy-apikeys/caddy-apikeys/keystore"
)

// TestGuard walks the guard table of DESIGN.md against a real backend.
func TestGuard(t *testing.T) {
	for _, kind := range storeKinds {
		t.Run(kind, func(t *testing.T) {
			g := startGateway(t, kind, "")
			full := g.create("alice", `{"name":"full"}`)
			analytics := g.create("bob", `{"name":"reader","scopes":["analytics:read"]}`)
			both := g.create("bob", `{"name":"both","scopes":["analytics:read","webhooks:manage"]}`)
			revoked := g.create("alice", `{"name":"revoked"}`)
			ctx, cancel := testCtx()
			defer cancel()
			if _, err := g.store.Revoke(ctx, revoked.KeyID, time.Now()); err != nil {
				t.Fatal(err)
			}
			expired := storeKeyDirectly(t, g.store, "alice", time.Now().Add(-time.Second))

			// A well-formed key with a valid checksum that was never minted.
			unknown, err := keystore.Mint("wbk_")
			if err != nil {
				t.Fatal(err)
			}
			badSum := full.Key[:len(full.Key)-1] + flipHex(full.Key[len(full.Key)-1])
			typo := full.Key[:20] + flipHex(full.Key[20]) + full.Key[21:]

			cases := []struct {
				name   string
				method string
				path   string
				bearer string
				status int
				code   string
			}{
				{"no bearer", "GET", "/v1/analytics", "", 401, "unauthorized"},
				{"jwt instead of key", "GET", "/v1/analytics", dashboardToken(t, "alice"), 401, "invalid_api_key"},
				{"malformed", "GET", "/v1/analytics", "wbk_short", 401, "invalid_api_key"},
				{"bad checksum", "GET", "/v1/analytics", badSum, 401, "invalid_api_key"},
				{"typo", "GET", "/v1/analytics", typo, 401, "invalid_api_key"},
				{"uppercase", "GET", "/v1/analytics", strings.ToUpper(full.Key), 401, "invalid_api_key"},
				{"unknown key", "GET", "/v1/analytics", unknown, 401, "invalid_api_key"},
				{"revoked", "GET", "/v1/analytics", revoked.Key, 401, "invalid_api_key"},
				{"expired", "GET", "/v1/analytics", expired, 401, "invalid_api_key"},
				{"full access, unruled route", "GET", "/v1/anything", full.Key, 200, ""},
				{"full access, ruled route", "POST", "/v1/webhooks/1", full.Key, 200, ""},
				{"scope matches", "GET", "/v1/analytics/daily", analytics.Key, 200, ""},
				{"scope matches exact path", "GET", "/v1/analytics", analytics.Key, 200, ""},
				{"method outside rule", "POST", "/v1/analytics/daily", analytics.Key, 403, "insufficient_scope"},
				{"other rule's route", "POST", "/v1/webhooks/1", analytics.Key, 403, "insufficient_scope"},
				{"second scope", "DELETE", "/v1/webhooks/1", both.Key, 200, ""},
				{"unruled route needs full access", "GET", "/v1/anything", both.Key, 403, "insufficient_scope"},
			}
			for _, tc := range cases {
				t.Run(tc.name, func(t *testing.T) {
					before := g.backend.count()
					resp := g.do(request{method: tc.method, path: tc.path, bearer: tc.bearer})
					if resp.status != tc.status || resp.errCode() != tc.code {
						t.Fatalf("got %d %q, want %d %q: %s", resp.status, resp.errCode(), tc.status, tc.code, resp.body)
					}
					reached := g.backend.count() > before
					if reached != (tc.status == 200) {
						t.Errorf("backend reached = %v for status %d", reached, tc.status)
					}
					if tc.status == 401 && !strings.HasPrefix(resp.header.Get("WWW-Authenticate"), `Bearer realm="apikeys"`) {
						t.Errorf("WWW-Authenticate = %q", resp.header.Get("WWW-Authenticate"))
					}
				})
			}

			t.Run("insufficient scope challenge", func(t *testing.T) {
				resp := g.do(request{method: "POST", path: "/v1/webhooks/1", bearer: analytics.Key})
				want := `Bearer realm="apikeys", error="insufficient_scope", scope="webhooks:manage"`
				if got := resp.header.Get("WWW-Authenticate"); got != want {
					t.Errorf("WWW-Authenticate = %q, want %q", got, want)
				}
			})

			t.Run("identity reaches the backend, spoofs do not", func(t *testing.T) {
				resp := g.do(request{method: "GET", path: "/v1/analytics/x", bearer: both.Key, header: map[string]string{
					"X-Api-Key-Id": "key_spoofed", "X-Api-Key-Owner": "mallory", "X-Api-Key-Scopes": "*",
				}})
				if resp.status != 200 {
					t.Fatalf("status %d", resp.status)
				}
				h := g.backend.last(t)
				want := map[string]string{
					"X-Api-Key-Id": both.KeyID, "X-Api-Key-Owner": "bob", "X-Api-Key-Scopes": "analytics:read webhooks:manage",
					// placeholders, through reverse_proxy header_up
					"X-Auth-User-Id": "bob", "X-Auth-Apikey-Id": both.KeyID, "X-Auth-Apikey-Scopes": "analytics:read webhooks:manage",
				}
				for k, v := range want {
					if got := h.Values(k); len(got) != 1 || got[0] != v {
						t.Errorf("backend saw %s = %q, want [%q]", k, got, v)
					}
				}
				if h.Get("Authorization") != "" {
					t.Error("the backend saw the Authorization header")
				}
			})

			t.Run("full access scopes header", func(t *testing.T) {
				g.do(request{method: "GET", path: "/v1/anything", bearer: full.Key, header: map[string]string{"X-Api-Key-Owner": "mallory"}})
				h := g.backend.last(t)
				if h.Get("X-Api-Key-Scopes") != "*" || h.Get("X-Api-Key-Owner") != "alice" {
					t.Errorf("backend saw scopes %q owner %q", h.Get("X-Api-Key-Scopes"), h.Get("X-Api-Key-Owner"))
				}
			})

			t.Run("spoofed headers stripped from refused requests too", func(t *testing.T) {
				// Nothing is proxied on refusal; the strip runs first anyway.
				resp := g.do(request{method: "GET", path: "/v1/anything", header: map[string]string{"X-Api-Key-Owner": "mallory"}})
				if resp.status != 401 {
					t.Fatalf("status %d", resp.status)
				}
			})
		})
	}
}

// TestGuardRejectsMalformedWithoutStoreLookup counts Redis GETs: malformed
// keys and bad checksums never reach the store.
func TestGuardRejectsMalformedWithoutStoreLookup(t *testing.T) {
	g := startGateway(t, "redis", "")
	k := g.create("alice", `{"name":"a"}`)
	rdb := g.redis.Client(t)
	calls := func() int {
		ctx, cancel := testCtx()
		defer cancel()
		info, err := rdb.Info(ctx, "commandstats").Result()
		if err != nil {
			t.Fatal(err)
		}
		for _, line := range strings.Split(info, "\n") {
			if strings.HasPrefix(line, "cmdstat_get:") {
				v := strings.TrimPrefix(strings.Split(line, ",")[0], "cmdstat_get:calls=")
				n, _ := strconv.Atoi(v)
				return n
			}
		}
		return 0
	}
	before := calls()
	for i := 0; i < 20; i++ {
		bad := k.Key[:len(k.Key)-1] + flipHex(k.Key[len(k.Key)-1])
		for _, tok := range []string{bad, "wbk_x", dashboardToken(t, "alice")} {
			if resp := g.do(request{method: "GET", path: "/v1/x", bearer: tok}); resp.status != 401 {
				t.Fatalf("status %d", resp.status)
			}
		}
	}
	if after := calls(); after != before {
		t.Errorf("refusing malformed keys made %d store GETs", after-before)
	}
	// Control: a well-formed key the cache does not know does reach the
	// store (the key minted above is cached by the node that minted it).
	unknown, err := keystore.Mint("wbk_")
	if err != nil {
		t.Fatal(err)
	}
	g.do(request{method: "GET", path: "/v1/x", bearer: unknown})
	if calls() == before {
		t.Error("an unknown well-formed key made no store GET: the counter does not work")
	}
}

// storeKeyDirectly stores a key with the given expiry through the store
// (as an operator tool would) and returns the raw key.
func storeKeyDirectly(t *testing.T, s keystore.Store, owner string, expires time.Time) string {
	t.Helper()
	raw, err := keystore.Mint("wbk_")
	if err != nil {
		t.Fatal(err)
	}
	id, _ := keystore.NewKeyID()
	hasher, err := keystore.NewHasher([]byte(testSecret))
	if err != nil {
		t.Fatal(err)
	}
	created := expires.Add(-time.Hour).UTC()
	k := &keystore.Key{ID: id, Owner: owner, Name: "direct", Prefix: keystore.DisplayPrefix("wbk_", raw),
		Digest: hasher.Digest(raw), CreatedAt: created, ExpiresAt: &expires}
	ctx, cancel := testCtx()
	defer cancel()
	if err := s.Create(ctx, k); err != nil {
		t.Fatal(err)
	}
	return raw
}

// flipHex returns another lowercase hex digit than c.
func flipHex(c byte) string {
	if c == '0' {
		return "1"
	}
	return "0"
}

var _ = http.StatusOK
