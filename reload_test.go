package apikeys

import (
	"strings"
	"testing"
	"time"

	"github.com/caddy-apikeys/caddy-apikeys/keystore"
)

// TestReloadReusesStore reloads the config (as `caddy reload` does): the
// store is the same object afterwards (no new Redis client, no second
// bbolt open, which would block on the file lock), keys keep working, and
// the new scope rules apply at once.
func TestReloadReusesStore(t *testing.T) {
	for _, kind := range storeKinds {
		t.Run(kind, func(t *testing.T) {
			g := startGateway(t, kind, "")
			k := g.create("alice", `{"name":"r","scopes":["billing:read"]}`)
			if r := g.do(request{method: "GET", path: "/v1/billing", bearer: k.Key}); r.status != 403 {
				t.Fatalf("before reload: %d", r.status)
			}
			before := g.store

			// The new config adds a rule for billing:read.
			start := time.Now()
			if err := g.load("scope billing:read /v1/billing"); err != nil {
				t.Fatalf("reload: %v", err)
			}
			if d := time.Since(start); d > 900*time.Millisecond {
				t.Errorf("reload took %v: was the store reopened?", d)
			}
			if after := currentStore(t); after != before {
				t.Error("the reload opened a new store instead of reusing the pooled one")
			}
			if r := g.do(request{method: "GET", path: "/v1/billing", bearer: k.Key}); r.status != 200 {
				t.Errorf("after reload: %d %s", r.status, r.body)
			}
		})
	}
}

// TestCleanupClosesStore checks that stopping Caddy releases the store:
// the pool is empty and a bbolt file can be opened again by someone else.
func TestCleanupClosesStore(t *testing.T) {
	g := startGateway(t, "file", "")
	g.create("alice", `{"name":"c"}`)
	path := g.storePath
	stopCaddy(t)
	n := 0
	stores.Range(func(_, _ any) bool { n++; return true })
	if n != 0 {
		t.Fatalf("%d stores still open after stop", n)
	}
	s, err := keystore.NewBolt(keystore.BoltOptions{Path: path, Timeout: 500 * time.Millisecond})
	if err != nil {
		t.Fatalf("reopening the file after stop: %v", err)
	}
	defer s.Close()
	ctx, cancel := testCtx()
	defer cancel()
	keys, _, err := s.List(ctx, "alice", "", 10)
	if err != nil || len(keys) != 1 {
		t.Fatalf("keys after restart: %v %v", len(keys), err)
	}
}

// TestLogsCarryNoSecrets runs the whole flow with Debug logs and access
// logs on, then searches every log line for raw keys, JWTs and secrets.
func TestLogsCarryNoSecrets(t *testing.T) {
	for _, kind := range storeKinds {
		t.Run(kind, func(t *testing.T) {
			g := startGateway(t, kind, "")
			var secrets []string
			alice := dashboardToken(t, "alice")
			secrets = append(secrets, alice, testSecret, testJWTSecret)

			for i, body := range []string{`{"name":"plain"}`, `{"name":"scoped","scopes":["analytics:read"]}`} {
				k := g.create("alice", body)
				secrets = append(secrets, k.Key)
				g.do(request{method: "GET", path: "/v1/analytics", bearer: k.Key})
				g.do(request{method: "POST", path: "/v1/webhooks/x", bearer: k.Key})
				g.do(request{method: "POST", path: "/v1/apikeys", bearer: k.Key, body: `{"name":"x"}`})
				idemBody := `{"name":"idem"}`
				first := g.do(request{method: "POST", path: "/v1/apikeys", bearer: alice, body: idemBody, header: idem(string(rune('a' + i)))})
				g.do(request{method: "POST", path: "/v1/apikeys", bearer: alice, body: idemBody, header: idem(string(rune('a' + i)))})
				secrets = append(secrets, extractKey(t, first))
			}
			bad := dashboardToken(t, "mallory")
			bad = bad[:len(bad)-4] + "AAAA"
			secrets = append(secrets, bad)
			g.do(request{method: "POST", path: "/v1/apikeys", bearer: bad, body: `{"name":"x"}`})
			g.do(request{method: "GET", path: "/v1/x", bearer: "wbk_" + strings.Repeat("0", 64)})

			stopCaddy(t) // flush the log files
			logs := string(g.readLogs())
			if !strings.Contains(logs, `"msg":"api key accepted"`) || !strings.Contains(logs, `"key_id":"key_`) {
				t.Fatalf("Debug logs with key_id are missing; the test would prove nothing:\n%s", truncate(logs, 2000))
			}
			for _, s := range secrets {
				if s == "" {
					t.Fatal("empty secret in the list")
				}
				// The secret part of a key, so a logged prefix is allowed.
				needle := s
				if strings.HasPrefix(s, "wbk_") {
					needle = s[12:]
				}
				if strings.Contains(logs, needle) {
					t.Errorf("a log line contains a secret (%.12s…)", s)
				}
			}
		})
	}
}

func extractKey(t *testing.T, r *response) string {
	t.Helper()
	if r.status != 201 {
		t.Fatalf("status %d: %s", r.status, r.body)
	}
	s := string(r.env.Data)
	i := strings.Index(s, `"key":"`)
	return s[i+7 : i+7+68]
}
