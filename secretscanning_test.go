package apikeys

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/getkin/kin-openapi/openapi3"
	"github.com/getkin/kin-openapi/routers/gorillamux"

	"github.com/caddy-apikeys/caddy-apikeys/keystore"
)

// ghSigner is a locally generated P-256 key standing in for GitHub's.
type ghSigner struct {
	id  string
	key *ecdsa.PrivateKey
}

func newGHSigner(t testing.TB) ghSigner {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, _ := x509.MarshalPKIXPublicKey(&k.PublicKey)
	sum := sha256.Sum256(der)
	return ghSigner{id: hex.EncodeToString(sum[:]), key: k}
}

func (s ghSigner) sign(t testing.TB, body []byte) string {
	t.Helper()
	d := sha256.Sum256(body)
	sig, err := ecdsa.SignASN1(rand.Reader, s.key, d[:])
	if err != nil {
		t.Fatal(err)
	}
	return base64.StdEncoding.EncodeToString(sig)
}

// ghKeys is a real HTTP server publishing keys in GitHub's key list format.
type ghKeys struct {
	*httptest.Server
	mu   sync.Mutex
	keys []ghSigner
	hits atomic.Int64
}

func newGHKeys(t *testing.T, keys ...ghSigner) *ghKeys {
	ks := &ghKeys{keys: keys}
	ks.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ks.hits.Add(1)
		ks.mu.Lock()
		defer ks.mu.Unlock()
		type entry struct {
			KeyIdentifier string `json:"key_identifier"`
			Key           string `json:"key"`
			IsCurrent     bool   `json:"is_current"`
		}
		list := struct {
			PublicKeys []entry `json:"public_keys"`
		}{PublicKeys: []entry{}}
		for i, s := range ks.keys {
			der, _ := x509.MarshalPKIXPublicKey(&s.key.PublicKey)
			list.PublicKeys = append(list.PublicKeys, entry{s.id,
				string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der})), i == len(ks.keys)-1})
		}
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(list)
	}))
	t.Cleanup(ks.Close)
	return ks
}

func (ks *ghKeys) set(keys ...ghSigner) {
	ks.mu.Lock()
	ks.keys = keys
	ks.mu.Unlock()
}

// ghMatch is one element of a report.
type ghMatch struct {
	Token  string `json:"token"`
	Type   string `json:"type"`
	URL    string `json:"url"`
	Source string `json:"source"`
}

// ghFeedback is one element of the partner response.
type ghFeedback struct {
	TokenHash string `json:"token_hash"`
	TokenType string `json:"token_type"`
	Label     string `json:"label"`
}

// report posts a report signed by s (sig overrides the signature when set)
// to the gateway's secret scanning endpoint, with extra headers.
func (g *gateway) report(body []byte, keyID, sig string, extra map[string]string) (int, []byte) {
	g.t.Helper()
	req, err := http.NewRequest("POST", g.base+"/v1/apikeys/secret-scanning", bytes.NewReader(body))
	if err != nil {
		g.t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	if keyID != "" {
		req.Header.Set("Github-Public-Key-Identifier", keyID)
	}
	if sig != "" {
		req.Header.Set("Github-Public-Key-Signature", sig)
	}
	for k, v := range extra {
		req.Header.Set(k, v)
	}
	resp, err := g.client.Do(req)
	if err != nil {
		g.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, b
}

func reportBody(t testing.TB, ms ...ghMatch) []byte {
	b, err := json.Marshal(ms)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func sha256Hex(s string) string {
	sum := sha256.Sum256([]byte(s))
	return hex.EncodeToString(sum[:])
}

// unknownKey is a well-formed key (valid checksum) that was never minted.
func unknownKey(t testing.TB) string {
	k, err := keystore.Mint(keystore.DefaultPrefix)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func secretScanningConfig(url, action string) string {
	return fmt.Sprintf("secret_scanning {\n\t\t\tpublic_keys %s\n\t\t\taction %s\n\t\t}", url, action)
}

// TestSecretScanningRevokesLeakedKeys: a report signed with GitHub's key
// revokes the gateway's keys in it (and only those), answers the partner
// response, logs each leak at Info with its key ID, and emits
// apikeys.leaked; the key stops validating at once.
func TestSecretScanningRevokesLeakedKeys(t *testing.T) {
	gh := newGHSigner(t)
	for _, kind := range storeKinds {
		t.Run(kind, func(t *testing.T) {
			ks := newGHKeys(t, newGHSigner(t), gh)
			g := startGateway(t, kind, secretScanningConfig(ks.URL, "revoke"))
			alice := g.create("alice", `{"name":"leaked"}`)
			bob := g.create("bob", `{"name":"leaked too","scopes":["analytics:read"]}`)
			kept := g.create("alice", `{"name":"kept"}`)
			if r := g.do(request{method: "GET", path: "/v1/x", bearer: alice.Key}); r.status != 200 {
				t.Fatalf("key before the report: %d", r.status)
			}
			stranger := unknownKey(t)
			typo := alice.Key[:len(alice.Key)-1] + "0"
			if typo == alice.Key {
				typo = alice.Key[:len(alice.Key)-1] + "1"
			}
			url := "https://github.com/octo/repo/blob/abc/config.yml"
			ms := []ghMatch{
				{alice.Key, "caddy_apikeys", url, "content"},
				{bob.Key, "caddy_apikeys", "", "commit"},
				{stranger, "caddy_apikeys", url, "content"},
				{typo, "caddy_apikeys", url, "content"},
				{"not-a-key", "caddy_apikeys", url, "issue_comment"},
				{alice.Key, "caddy_apikeys", url + "#again", "gist_content"},
			}
			body := reportBody(t, ms...)
			status, out := g.report(body, gh.id, gh.sign(t, body), nil)
			if status != 200 {
				t.Fatalf("signed report: %d %s", status, out)
			}
			var fb []ghFeedback
			if err := json.Unmarshal(out, &fb); err != nil {
				t.Fatalf("the response is not the partner format: %v: %s", err, out)
			}
			want := []string{"true_positive", "true_positive", "false_positive", "false_positive", "false_positive", "true_positive"}
			if len(fb) != len(ms) {
				t.Fatalf("%d feedback elements for %d matches", len(fb), len(ms))
			}
			for i, f := range fb {
				if f.TokenHash != sha256Hex(ms[i].Token) || f.TokenType != "caddy_apikeys" || f.Label != want[i] {
					t.Errorf("feedback %d: %+v, want hash %s label %s", i, f, sha256Hex(ms[i].Token), want[i])
				}
			}
			if strings.Contains(string(out), alice.Key) || strings.Contains(string(out), "token_raw") {
				t.Errorf("the response holds a raw token: %s", out)
			}
			for _, k := range []createdKey{alice, bob} {
				if r := g.do(request{method: "GET", path: "/v1/x", bearer: k.Key}); r.status != 401 {
					t.Errorf("leaked key %s still validates: %d", k.KeyID, r.status)
				}
				v, _ := g.view(map[string]string{alice.KeyID: "alice", bob.KeyID: "bob"}[k.KeyID], k.KeyID)
				if v.Status != "revoked" {
					t.Errorf("leaked key %s is %s", k.KeyID, v.Status)
				}
			}
			if r := g.do(request{method: "GET", path: "/v1/x", bearer: kept.Key}); r.status != 200 {
				t.Errorf("a key not in the report stopped validating: %d", r.status)
			}

			// The same report again: still true positives, nothing new revoked.
			status, out = g.report(body, gh.id, gh.sign(t, body), nil)
			if status != 200 || !strings.Contains(string(out), "true_positive") {
				t.Fatalf("repeated report: %d %s", status, out)
			}

			stopCaddy(t) // flushes the logs
			logs := string(g.readLogs())
			var leakLines, leaked, revoked []map[string]any
			for _, l := range strings.Split(logs, "\n") {
				var m map[string]any
				if json.Unmarshal([]byte(l), &m) != nil {
					continue
				}
				switch {
				case m["msg"] == "api key leaked" && m["level"] == "info":
					leakLines = append(leakLines, m)
				case m["msg"] == "event" && m["name"] == "apikeys.leaked":
					leaked = append(leaked, m["data"].(map[string]any))
				case m["msg"] == "event" && m["name"] == "apikeys.revoked":
					revoked = append(revoked, m["data"].(map[string]any))
				}
			}
			// Two reports naming two keys (alice's twice): one event per
			// key per report; each key revoked once.
			if len(leakLines) != 4 || len(leaked) != 4 || len(revoked) != 2 {
				t.Fatalf("%d leak log lines, %d apikeys.leaked and %d apikeys.revoked events, want 4, 4, 2:\n%s", len(leakLines), len(leaked), len(revoked), logs)
			}
			owners := map[string]string{alice.KeyID: "alice", bob.KeyID: "bob"}
			for i, d := range leaked {
				id, _ := d["key_id"].(string)
				if owners[id] == "" || d["owner"] != owners[id] || leakLines[i]["key_id"] != id || leakLines[i]["owner"] != owners[id] {
					t.Errorf("leak %d: event %v, log %v", i, d, leakLines[i])
				}
				wantURL := map[string]string{alice.KeyID: url, bob.KeyID: ""}[id]
				if d["url"] != wantURL || leakLines[i]["url"] != wantURL {
					t.Errorf("leak %d of %s: url %v, want %q", i, id, d["url"], wantURL)
				}
				wantAction := "revoke"
				if i >= 2 {
					wantAction = "none (already revoked)"
				}
				if d["action"] != wantAction {
					t.Errorf("leak %d: action %v, want %s", i, d["action"], wantAction)
				}
			}
			for _, d := range revoked {
				if d["reason"] != "leaked" {
					t.Errorf("revoked event without reason leaked: %v", d)
				}
			}
			for _, raw := range []string{alice.Key, bob.Key, stranger, typo} {
				if strings.Contains(logs, raw) {
					t.Errorf("a raw token reached the logs")
				}
			}
		})
	}
}

// waitLogs waits until the logs hold n lines with marker, and returns them.
func waitLogs(g *gateway, marker string, n int) string {
	g.t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		logs := string(g.readLogs())
		if strings.Count(logs, marker) >= n || time.Now().After(deadline) {
			if c := strings.Count(logs, marker); c < n {
				g.t.Errorf("logs hold %d lines with %s, want %d", c, marker, n)
			}
			return logs
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestSecretScanningRefusesUnsigned: without GitHub's valid signature a
// report is 401 and changes nothing; API keys and dashboard sessions are
// no credential here; the endpoint takes POST only and bounds its input.
func TestSecretScanningRefusesUnsigned(t *testing.T) {
	gh, forger := newGHSigner(t), newGHSigner(t)
	ks := newGHKeys(t, gh)
	g := startGateway(t, "file", secretScanningConfig(ks.URL, "revoke"))
	k := g.create("alice", `{"name":"target"}`)
	body := reportBody(t, ghMatch{k.Key, "caddy_apikeys", "https://github.com/x", "content"})
	good := gh.sign(t, body)
	other := reportBody(t, ghMatch{unknownKey(t), "caddy_apikeys", "", "content"})
	backendBefore := g.backend.count()

	for name, c := range map[string]struct {
		id, sig string
		extra   map[string]string
	}{
		"no headers":                    {"", "", nil},
		"no signature":                  {gh.id, "", nil},
		"no identifier":                 {"", good, nil},
		"signed by another key":         {gh.id, forger.sign(t, body), nil},
		"signature of another body":     {gh.id, gh.sign(t, other), nil},
		"garbage signature":             {gh.id, "MEUCIQ==", nil},
		"the forger's own identifier":   {forger.id, forger.sign(t, body), nil},
		"an API key as bearer":          {"", "", map[string]string{"Authorization": "Bearer " + k.Key}},
		"a dashboard session as bearer": {"", "", map[string]string{"Authorization": "Bearer " + dashboardToken(t, "alice")}},
	} {
		status, out := g.report(body, c.id, c.sig, c.extra)
		if status != 401 || !strings.Contains(string(out), `"code":"invalid_signature"`) {
			t.Errorf("%s: %d %s, want 401 invalid_signature", name, status, out)
		}
	}
	// Tampered body under a good signature.
	tampered := bytes.Replace(body, []byte("content"), []byte("commit!"), 1)
	if status, _ := g.report(tampered, gh.id, good, nil); status != 401 {
		t.Errorf("tampered body: %d, want 401", status)
	}
	if r := g.do(request{method: "GET", path: "/v1/x", bearer: k.Key}); r.status != 200 {
		t.Fatalf("an unsigned report changed the key: %d", r.status)
	}
	if n := g.backend.count() - backendBefore - 1; n != 0 {
		t.Errorf("the backend received %d requests for the endpoint", n)
	}

	// Other methods: 405 with Allow, whatever the credential.
	for _, m := range []string{"GET", "PUT", "DELETE", "OPTIONS"} {
		r := g.do(request{method: m, path: "/v1/apikeys/secret-scanning", bearer: k.Key})
		if r.status != 405 || r.header.Get("Allow") != "POST" {
			t.Errorf("%s: %d Allow %q, want 405 POST", m, r.status, r.header.Get("Allow"))
		}
	}
	// Non-canonical spellings of the path are refused by the path policy.
	for _, p := range []string{"/v1/apikeys//secret-scanning", "/v1/apikeys/./secret-scanning", "/v1/apikeys/secret-scanning/"} {
		r := g.do(request{method: "POST", path: p, body: string(body), header: map[string]string{
			"Github-Public-Key-Identifier": gh.id, "Github-Public-Key-Signature": good}})
		if r.status == 200 {
			t.Errorf("POST %s was answered as the endpoint", p)
		}
	}

	// Bounds: a body over 4 MiB, more than 5000 tokens, a signed non-report.
	huge := bytes.Repeat([]byte(" "), 4<<20+1)
	if status, out := g.report(huge, gh.id, gh.sign(t, huge), nil); status != 413 {
		t.Errorf("4 MiB body: %d %s, want 413", status, out)
	}
	many := make([]ghMatch, 5001)
	for i := range many {
		many[i] = ghMatch{Token: fmt.Sprintf("t%d", i)}
	}
	mb := reportBody(t, many...)
	if status, out := g.report(mb, gh.id, gh.sign(t, mb), nil); status != 413 || !strings.Contains(string(out), "too_many_tokens") {
		t.Errorf("5001 tokens: %d %s, want 413 too_many_tokens", status, out)
	}
	for _, bad := range []string{`{"token":"x"}`, `[{"token":""}]`, `not json`} {
		if status, out := g.report([]byte(bad), gh.id, gh.sign(t, []byte(bad)), nil); status != 400 {
			t.Errorf("signed %s: %d %s, want 400", bad, status, out)
		}
	}
	if r := g.do(request{method: "GET", path: "/v1/x", bearer: k.Key}); r.status != 200 {
		t.Fatalf("the key stopped validating: %d", r.status)
	}
	// A signed report with the key, at last, revokes it.
	if status, out := g.report(body, gh.id, good, nil); status != 200 || !strings.Contains(string(out), "true_positive") {
		t.Fatalf("signed report: %d %s", status, out)
	}
	if r := g.do(request{method: "GET", path: "/v1/x", bearer: k.Key}); r.status != 401 {
		t.Errorf("the leaked key still validates: %d", r.status)
	}
}

// TestSecretScanningOffUnlessConfigured: without secret_scanning the path
// is an ordinary management path: a signed report does nothing.
func TestSecretScanningOffUnlessConfigured(t *testing.T) {
	gh := newGHSigner(t)
	g := startGateway(t, "file", "")
	k := g.create("alice", `{"name":"k"}`)
	body := reportBody(t, ghMatch{k.Key, "caddy_apikeys", "", "content"})
	if status, out := g.report(body, gh.id, gh.sign(t, body), nil); status != 401 || strings.Contains(string(out), "true_positive") {
		t.Errorf("endpoint off: %d %s, want the management API's 401", status, out)
	}
	if r := g.do(request{method: "GET", path: "/v1/x", bearer: k.Key}); r.status != 200 {
		t.Errorf("the key stopped validating: %d", r.status)
	}
}

// TestSecretScanningUnknownIdentifier: a report signed with a key
// published after the gateway loaded the list makes it reload once, and
// verifies; more unknown identifiers do not reach the key server again
// (rate limit). With action report, a leaked key is labelled and logged
// but keeps working.
func TestSecretScanningUnknownIdentifier(t *testing.T) {
	old, rotated, never := newGHSigner(t), newGHSigner(t), newGHSigner(t)
	ks := newGHKeys(t, old)
	g := startGateway(t, "file", secretScanningConfig(ks.URL, "report"))
	k := g.create("alice", `{"name":"k"}`)
	h0 := ks.hits.Load()
	if h0 < 1 {
		t.Fatal("the key list was not loaded at start")
	}
	ks.set(old, rotated)
	body := reportBody(t, ghMatch{k.Key, "caddy_apikeys", "https://github.com/o/r/blob/1/x", "content"})
	status, out := g.report(body, rotated.id, rotated.sign(t, body), nil)
	if status != 200 || !strings.Contains(string(out), `"label":"true_positive"`) {
		t.Fatalf("report signed with a newly published key: %d %s", status, out)
	}
	if n := ks.hits.Load() - h0; n != 1 {
		t.Errorf("the key server was asked %d times for one unknown identifier, want 1", n)
	}
	for range 10 {
		if status, _ := g.report(body, never.id, never.sign(t, body), nil); status != 401 {
			t.Fatalf("an unpublished key: %d, want 401", status)
		}
	}
	if n := ks.hits.Load() - h0; n != 1 {
		t.Errorf("10 more unknown identifiers reached the key server %d times in all, want 1 (rate limit)", n-1)
	}
	// action report: logged and emitted, not revoked.
	if r := g.do(request{method: "GET", path: "/v1/x", bearer: k.Key}); r.status != 200 {
		t.Errorf("action report revoked the key: %d", r.status)
	}
	logs := waitLogs(g, `"name":"apikeys.leaked"`, 1)
	if !strings.Contains(logs, `"action":"report"`) {
		t.Errorf("the leak was not logged with action report:\n%s", logs)
	}
}

// TestSecretScanningRefresh: the background refresh alone picks up a
// rotated key list: a new key starts verifying, a dropped one stops.
func TestSecretScanningRefresh(t *testing.T) {
	old, next := newGHSigner(t), newGHSigner(t)
	ks := newGHKeys(t, old)
	g := startGateway(t, "file", "secret_scanning {\n\t\t\tpublic_keys "+ks.URL+"\n\t\t\trefresh 100ms\n\t\t}")
	body := reportBody(t, ghMatch{unknownKey(t), "caddy_apikeys", "", "content"})
	// Spend the reload an unknown identifier may trigger.
	if status, _ := g.report(body, next.id, next.sign(t, body), nil); status != 401 {
		t.Fatalf("unpublished key: %d, want 401", status)
	}
	ks.set(next)
	deadline := time.Now().Add(5 * time.Second)
	for {
		status, out := g.report(body, next.id, next.sign(t, body), nil)
		if status == 200 {
			if !strings.Contains(string(out), "false_positive") {
				t.Errorf("an unknown token: %s", out)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the background refresh never loaded the new key: %d %s", status, out)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if status, _ := g.report(body, old.id, old.sign(t, body), nil); status != 401 {
		t.Errorf("a key dropped from the list still verifies: %d", status)
	}
}

// TestSecretScanningThousandTokens: one report of 1,000 tokens, 200 of them
// keys of the gateway (of 20 owners), is answered in full and revokes
// exactly those 200.
func TestSecretScanningThousandTokens(t *testing.T) {
	gh := newGHSigner(t)
	hasher, err := keystore.NewHasher([]byte(testSecret))
	if err != nil {
		t.Fatal(err)
	}
	for _, kind := range storeKinds {
		t.Run(kind, func(t *testing.T) {
			ks := newGHKeys(t, gh)
			g := startGateway(t, kind, secretScanningConfig(ks.URL, "revoke"))
			ctx, cancel := testCtx()
			defer cancel()
			ms := make([]ghMatch, 1000)
			real := map[string]string{} // raw key -> key ID
			for i := range ms {
				raw := unknownKey(t)
				ms[i] = ghMatch{raw, "caddy_apikeys", fmt.Sprintf("https://github.com/o/r/blob/1/f%d", i), "content"}
				if i%5 != 0 {
					continue
				}
				id, _ := keystore.NewKeyID()
				k := &keystore.Key{ID: id, Owner: fmt.Sprintf("owner-%d", i%20), Name: "bulk", Prefix: keystore.DisplayPrefix("wbk_", raw),
					Digest: hasher.Digest(raw), CreatedAt: time.Now().UTC().Truncate(time.Millisecond)}
				if err := g.store.Create(ctx, k); err != nil {
					t.Fatal(err)
				}
				real[raw] = id
			}
			body := reportBody(t, ms...)
			start := time.Now()
			status, out := g.report(body, gh.id, gh.sign(t, body), nil)
			if status != 200 {
				t.Fatalf("1000-token report: %d %s", status, truncate(string(out), 300))
			}
			t.Logf("%s: 1000 tokens (%d keys) answered in %v", kind, len(real), time.Since(start))
			var fb []ghFeedback
			if err := json.Unmarshal(out, &fb); err != nil || len(fb) != 1000 {
				t.Fatalf("feedback: %v, %d elements", err, len(fb))
			}
			positives := 0
			for i, f := range fb {
				_, isKey := real[ms[i].Token]
				want := map[bool]string{true: "true_positive", false: "false_positive"}[isKey]
				if f.Label != want || f.TokenHash != sha256Hex(ms[i].Token) {
					t.Fatalf("feedback %d: %+v, want %s", i, f, want)
				}
				if isKey {
					positives++
				}
			}
			if positives != 200 {
				t.Errorf("%d true positives, want 200", positives)
			}
			for raw, id := range real {
				k, err := g.store.Get(ctx, id)
				if err != nil || k.RevokedAt == nil {
					t.Fatalf("key %s after the report: %v, revoked %v", id, err, k != nil && k.RevokedAt != nil)
				}
				_ = raw
			}
			if r := g.do(request{method: "GET", path: "/v1/x", bearer: ms[0].Token}); r.status != 401 {
				t.Errorf("a reported key still validates: %d", r.status)
			}
		})
	}
}

// TestSecretScanningConfig: bad actions, options and sources are refused
// with what to do instead; action disable is accepted.
func TestSecretScanningConfig(t *testing.T) {
	ok := new(Handler)
	if err := ok.UnmarshalCaddyfile(caddyfile.NewTestDispenser("apikeys {\nsecret_scanning {\n public_keys https://x\n action disable\n}\n}")); err != nil || ok.SecretScanning.Action != LeakActionDisable {
		t.Errorf("action disable: %v", err)
	}
	for _, c := range []struct{ block, want string }{
		{"secret_scanning {\n public_keys https://x\n action delete\n}", "must be revoke, disable or report"},
		{"secret_scanning {\n action revoke\n}", "needs public_keys"},
		{"secret_scanning {\n public_keys https://x\n nope 1\n}", `unrecognized secret_scanning option "nope"`},
		{"secret_scanning https://x https://y", "wrong argument count"},
	} {
		h := new(Handler)
		err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser("apikeys {\n" + c.block + "\n}"))
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%q: %v, want %q", c.block, err, c.want)
		}
	}
	// Provision-time checks, through a real Caddy load.
	for _, c := range []struct{ src, want string }{
		{"http://example.com/keys", "must use https"},
		{filepath.Join(t.TempDir(), "missing.pem"), "reading the key file"},
	} {
		cfg := fmt.Sprintf(`{
	admin off
	persist_config off
}
http://127.0.0.1:%d {
	apikeys {
		store file %s
		secret_scanning %s
	}
}`, freePort(t), filepath.Join(t.TempDir(), "keys.db"), c.src)
		if err := loadCaddyfileErr(t, cfg); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("public_keys %s: %v, want %q", c.src, err, c.want)
		}
	}
	// The JSON form is checked at provision too.
	h := &Handler{SecretScanning: &SecretScanning{PublicKeys: "https://x", Action: "delete"}}
	if err := h.provisionSecretScanning(caddy.Context{}); err == nil || !strings.Contains(err.Error(), "must be revoke, disable or report") {
		t.Errorf("action delete in JSON: %v", err)
	}
}

// TestSecretScanningOpenAPI validates the endpoint's real answers against
// openapi.yaml.
func TestSecretScanningOpenAPI(t *testing.T) {
	doc, err := openapi3.NewLoader().LoadFromFile("openapi.yaml")
	if err != nil {
		t.Fatal(err)
	}
	gh := newGHSigner(t)
	ks := newGHKeys(t, gh)
	g := startGateway(t, "redis", secretScanningConfig(ks.URL, "revoke"))
	doc.Servers = openapi3.Servers{{URL: g.base}}
	router, err := gorillamux.NewRouter(doc)
	if err != nil {
		t.Fatal(err)
	}
	k := g.create("alice", `{"name":"leaked"}`)
	body := reportBody(t, ghMatch{k.Key, "caddy_apikeys", "https://github.com/x", "content"}, ghMatch{"nope", "caddy_apikeys", "", "commit"})
	many := make([]ghMatch, 5001)
	for i := range many {
		many[i] = ghMatch{Token: "t"}
	}
	mb := reportBody(t, many...)
	statuses := map[int]bool{}
	for _, c := range []struct {
		body []byte
		sig  string
	}{
		{body, gh.sign(t, body)},
		{body, "MEUCIQ=="},
		{[]byte(`{}`), gh.sign(t, []byte(`{}`))},
		{mb, gh.sign(t, mb)},
	} {
		status, out := g.report(c.body, gh.id, c.sig, nil)
		statuses[status] = true
		req := request{method: "POST", path: "/v1/apikeys/secret-scanning", body: string(c.body)}
		validateAgainst(t, router, g.base, req, &response{status: status,
			header: http.Header{"Content-Type": {"application/json"}, "Cache-Control": {"no-store"}}, body: out})
	}
	r := g.do(request{method: "GET", path: "/v1/apikeys/secret-scanning"})
	validateAgainst(t, router, g.base, request{method: "GET", path: "/v1/apikeys/secret-scanning"}, r)
	g.redis.Stop()
	body = reportBody(t, ghMatch{unknownKey(t), "caddy_apikeys", "", "content"})
	status, out := g.report(body, gh.id, gh.sign(t, body), nil)
	statuses[status] = true
	validateAgainst(t, router, g.base, request{method: "POST", path: "/v1/apikeys/secret-scanning", body: string(body)},
		&response{status: status, header: http.Header{"Content-Type": {"application/json"}, "Retry-After": {"2"}}, body: out})
	for _, want := range []int{200, 400, 401, 413, 503} {
		if !statuses[want] {
			t.Errorf("no %d seen", want)
		}
	}
}
