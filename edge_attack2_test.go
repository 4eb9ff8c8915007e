package apikeys

// Findings of the second attack round (branch attack2). Each test fails
// against the code as merged; see the report for what each one shows.

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"

	"github.com/caddy-apikeys/caddy-apikeys/secretscanning"
)

// TestKeyHeaderAccessLog: Caddy copies each request for its access log
// before any handler runs and redacts only Authorization, Cookie,
// Set-Cookie and Proxy-Authorization there, so a raw key sent in key_header
// (accepted or refused) is logged unless the log's format removes it; the
// guard cannot reach that copy. (An attacker's review found the key in the
// log.) With the filter the README and the start-up warning give, no key
// is logged; without it, Caddy warns at start with that filter.
func TestKeyHeaderAccessLog(t *testing.T) {
	for _, filtered := range []bool{true, false} {
		t.Run(fmt.Sprintf("filtered=%v", filtered), func(t *testing.T) {
			if filtered {
				// As in README.md.
				testAccessLogFormat = "format filter {\n\t\t\twrap json\n\t\t\trequest>headers>X-Api-Key delete\n\t\t}"
				t.Cleanup(func() { testAccessLogFormat = "format json" })
			}
			g := startGateway(t, "file", "key_header X-API-Key")
			full := g.create("alice", `{"name":"migrating client"}`)
			scoped := g.create("alice", `{"name":"analytics only","scopes":["analytics:read"]}`)
			if r := g.do(request{method: "GET", path: "/v1/x", header: map[string]string{"X-Api-Key": full.Key}}); r.status != 200 {
				t.Fatalf("key in X-Api-Key: %d %s", r.status, r.body)
			}
			if r := g.do(request{method: "POST", path: "/v1/webhooks/1", header: map[string]string{"X-Api-Key": scoped.Key}}); r.status != 403 {
				t.Fatalf("scoped key outside its scope: %d %s", r.status, r.body)
			}
			stopCaddy(t) // flushes the logs
			logs := string(g.readLogs())
			if !strings.Contains(logs, `"uri":"/v1/x"`) {
				t.Fatalf("the access log did not record the requests:\n%s", logs)
			}
			for name, k := range map[string]string{"accepted (200)": full.Key, "refused (403)": scoped.Key} {
				if got := strings.Contains(logs, k); got == filtered {
					t.Errorf("filtered=%v: the raw key of the %s request is in the logs: %v", filtered, name, got)
				}
			}
			if !strings.Contains(logs, `request>headers>X-Api-Key delete`) {
				t.Error("no start-up warning naming the log filter")
			}
		})
	}
}

// TestSecretScanningAbortedReloadStillLoads: an anonymous
// caller spends the on-demand key list reload (one per minute) and aborts
// it. It sends a report with an unknown Github-Public-Key-Identifier and
// hangs up: the reload runs under that request's context, so it is
// cancelled, yet it counts as the reload of the minute. GitHub's genuine
// report, signed with the key it has just rotated to, is then refused 401
// and the leaked key keeps working, until the hourly refresh. Repeating
// this once a minute keeps every report signed with a new GitHub key out.
func TestSecretScanningAbortedReloadStillLoads(t *testing.T) {
	old, rotated, never := newGHSigner(t), newGHSigner(t), newGHSigner(t)
	ks := newGHKeys(t, old)
	// GitHub's key list endpoint, with a realistic latency once slow is set.
	var slow atomic.Bool
	list := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if slow.Load() {
			select {
			case <-time.After(700 * time.Millisecond):
			case <-r.Context().Done():
				return
			}
		}
		ks.Config.Handler.ServeHTTP(w, r)
	}))
	t.Cleanup(list.Close)

	g := startGateway(t, "file", secretScanningConfig(list.URL, "revoke"))
	k := g.create("alice", `{"name":"about to leak"}`)
	ks.set(old, rotated) // GitHub publishes its new key and signs with it
	slow.Store(true)

	// The attacker: an unknown identifier, and a hang-up 150 ms later.
	junk := reportBody(t, ghMatch{unknownKey(t), "caddy_apikeys", "", "content"})
	req, _ := http.NewRequest("POST", g.base+"/v1/apikeys/secret-scanning", strings.NewReader(string(junk)))
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Github-Public-Key-Identifier", never.id)
	req.Header.Set("Github-Public-Key-Signature", never.sign(t, junk))
	ctx, cancel := context.WithTimeout(context.Background(), 150*time.Millisecond)
	if resp, err := http.DefaultClient.Do(req.WithContext(ctx)); err == nil {
		resp.Body.Close()
	}
	cancel()
	time.Sleep(900 * time.Millisecond) // the aborted reload is over

	// GitHub's genuine report.
	body := reportBody(t, ghMatch{k.Key, "caddy_apikeys", "https://github.com/o/r/blob/1/.env", "content"})
	status, out := g.report(body, rotated.id, rotated.sign(t, body), nil)
	if status != 200 {
		t.Errorf("GitHub's report signed with its newly published key was refused after an anonymous caller aborted the reload: %d %s", status, out)
	}
	if r := g.do(request{method: "GET", path: "/v1/x", bearer: k.Key}); r.status != 401 {
		t.Errorf("the leaked key still validates: %d", r.status)
	}
}

// TestSecretScanningKeyListRedirectObeysPolicy: the key list
// source must be https, or plain http to localhost only (checkSource; a
// plain http URL to any other host is refused at provision). The fetch
// follows redirects without checking them, so a source that redirects
// (e.g. an http://127.0.0.1 mirror, or any https URL) hands the gateway a key
// list from a plain-http host it would refuse, and a report signed with a
// key from that list revokes keys. jwtauth's JWKS fetch checks redirects
// against the same rules; this fetch does not.
func TestSecretScanningKeyListRedirectObeysPolicy(t *testing.T) {
	forger := newGHSigner(t)
	ks := newGHKeys(t, forger)
	ln, err := net.Listen("tcp", "127.0.0.2:0")
	if err != nil {
		t.Skipf("no second loopback address: %v", err)
	}
	evil := httptest.NewUnstartedServer(ks.Config.Handler)
	evil.Listener.Close()
	evil.Listener = ln
	evil.Start()
	t.Cleanup(evil.Close)

	// Configured directly, that host is refused.
	if _, err := secretscanning.New(context.Background(), secretscanning.Options{Source: evil.URL + "/keys"}); err == nil {
		t.Fatalf("precondition: plain http to %s was accepted as a source", evil.URL)
	}

	redirector := httptest.NewServer(http.RedirectHandler(evil.URL+"/keys", http.StatusFound))
	t.Cleanup(redirector.Close)
	g := startGateway(t, "file", secretScanningConfig(redirector.URL, "revoke"))
	victim := g.create("alice", `{"name":"victim"}`)

	body := reportBody(t, ghMatch{victim.Key, "caddy_apikeys", "", "content"})
	status, out := g.report(body, forger.id, forger.sign(t, body), nil)
	if status == 200 {
		t.Errorf("a report signed with a key fetched over plain http from %s (via a redirect) was accepted: %s", evil.URL, out)
	}
	if r := g.do(request{method: "GET", path: "/v1/x", bearer: victim.Key}); r.status != 200 {
		t.Errorf("the key was revoked on the strength of that key list: %d", r.status)
	}
}

// TestKeyHeaderUnderscoreSpellingIsACredential: where the server
// keeps '_' header names (expected_underscore_headers, as in
// TestEdgeAllowlistedSpellingsOfOverrideHeaders), X_Api_Key is the key
// header to a CGI/FastCGI backend (HTTP_X_API_KEY). The guard treats that
// spelling as the key header for trailers and Connection (isProtected is
// loose), but not as a credential: a request with key A in Authorization and
// key B in X_Api_Key is not refused as ambiguous_credentials, and X_Api_Key
// is not removed, so the backend receives the guard's identity for A next
// to key B in the variable it reads the key header from.
func TestKeyHeaderUnderscoreSpellingIsACredential(t *testing.T) {
	backend := newRawEcho(t)
	port := freePort(t)
	cfg := fmt.Sprintf(`{
	admin off
	persist_config off
	auto_https off
	servers {
		expected_underscore_headers x_*
	}
}
http://:%d {
	apikeys {
		store file %s
		secret {env.APIKEYS_TEST_SECRET}
		dashboard_jwt {
			secret {env.APIKEYS_TEST_JWT_SECRET}
			issuer %s
			audience %s
		}
		scope analytics:read GET /v1/analytics /v1/analytics/*
		key_header X-API-Key
	}
	reverse_proxy %s
}
`, port, filepath.Join(t.TempDir(), "keys.db"), testIssuer, testAudience, backend)
	cfgJSON, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(cfg), nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := caddy.Load(cfgJSON, true); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { stopCaddy(t) })
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	mint := func(owner, body string) string { return mintKey(t, addr, owner, body) }
	a := mint("alice", `{"name":"alice analytics","scopes":["analytics:read"]}`)
	b := mint("mallory", `{"name":"mallory full"}`)

	resp := sendRaw(t, addr, getRaw("GET", "/v1/analytics/daily", a, "X_Api_Key: "+b))
	if resp.status == 400 && resp.code == "ambiguous_credentials" {
		return // held
	}
	if resp.status != 200 {
		t.Fatalf("unexpected answer %d %s", resp.status, resp.body)
	}
	var seen rawSeen
	if err := json.Unmarshal(resp.body, &seen); err != nil {
		t.Fatal(err)
	}
	for _, l := range seen.Headers {
		name, v, _ := strings.Cut(l, ":")
		if cgiName(name) == "HTTP_X_API_KEY" {
			t.Errorf("two credentials (Authorization: key A, X_Api_Key: key B) were not refused as ambiguous, and the backend received %q = %s (key B, another owner's) beside X-Api-Key-Owner %q", name, strings.TrimSpace(v)[:12]+"…", seen.header("X-Api-Key-Owner"))
		}
	}
}

// TestIdempotencyTTLWithinRetention: an Idempotency-Key record that outlives
// its key's retention could let a retried create (a take-over of an
// abandoned request) store the same raw key again after retention deleted
// the revoked key, so such a config is refused (found in an attacker's
// review, not demonstrated end to end).
func TestIdempotencyTTLWithinRetention(t *testing.T) {
	dir := t.TempDir()
	cfg := func(block string) string {
		return fmt.Sprintf(`{
	admin off
	persist_config off
}
http://127.0.0.1:%d {
	apikeys {
		store file %s/keys.db {
			retention 48h
		}
		secret {env.APIKEYS_TEST_SECRET}
		%s
	}
	respond "ok"
}`, freePort(t), dir, block)
	}
	if err := loadCaddyfileErr(t, cfg("idempotency_ttl 72h")); err == nil || !strings.Contains(err.Error(), "must not exceed the store's retention") {
		t.Errorf("idempotency_ttl 72h with retention 48h: %v, want a refusal", err)
	}
	if err := loadCaddyfileErr(t, cfg("idempotency_ttl 24h")); err != nil {
		t.Errorf("idempotency_ttl 24h with retention 48h: %v", err)
	}
}
