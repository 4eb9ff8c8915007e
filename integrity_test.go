package apikeys

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/golang-jwt/jwt/v5"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"go.uber.org/zap"

	"github.com/caddy-apikeys/caddy-apikeys/internal/testcaddy"
	"github.com/caddy-apikeys/caddy-apikeys/internal/testredis"
	"github.com/caddy-apikeys/caddy-apikeys/keystore"
)

// This file tests the integrity of the management API (issue 10): exact
// methods, replays authorised like fresh requests, an atomic key limit and
// strict identities, on every store.

// parallelStatuses sends n copies of a request built by build at once and
// returns how many answers each "status code" pair got.
func (g *gateway) parallelStatuses(n int, build func(i int) request) map[string]int {
	g.t.Helper()
	var (
		wg   sync.WaitGroup
		mu   sync.Mutex
		seen = map[string]int{}
	)
	start := make(chan struct{})
	for i := range n {
		req := build(i)
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			var (
				resp *http.Response
				err  error
			)
			// A request with an Idempotency-Key is resent after a transport
			// error (right after a reload the old server may reset a
			// connection), as a careful client would: it is safe.
			for attempt := 0; attempt < 3; attempt++ {
				r, rerr := http.NewRequest(req.method, g.base+req.path, strings.NewReader(req.body))
				if rerr != nil {
					panic(rerr)
				}
				r.Header.Set("Authorization", "Bearer "+req.bearer)
				r.Header.Set("Content-Type", "application/json")
				for k, v := range req.header {
					r.Header.Set(k, v)
				}
				if resp, err = g.client.Do(r); err == nil || req.header["Idempotency-Key"] == "" {
					break
				}
			}
			key := "error"
			if err == nil {
				body, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				code := ""
				if _, rest, ok := strings.Cut(string(body), `"code":"`); ok {
					code, _, _ = strings.Cut(rest, `"`)
				}
				key = fmt.Sprintf("%d %s", resp.StatusCode, code)
			}
			mu.Lock()
			seen[key]++
			mu.Unlock()
		}()
	}
	close(start)
	wg.Wait()
	return seen
}

// TestKeyLimitParallel: parallel creates for one owner never exceed
// max_keys_per_owner; every other answer is 409 key_limit_reached.
func TestKeyLimitParallel(t *testing.T) {
	for _, kind := range storeKinds {
		t.Run(kind, func(t *testing.T) {
			// A generous store_timeout: 200 requests at once on a small
			// machine must not time out, or the answers are 503s.
			g := startGateway(t, kind, "max_keys_per_owner 3\nstore_timeout 20s")
			for _, tc := range []struct {
				owner    string
				limit, n int
			}{{"limit-a", 3, 20}, {"limit-b", 10, 200}} {
				if tc.limit != 3 {
					if err := g.load(fmt.Sprintf("max_keys_per_owner %d\nstore_timeout 20s", tc.limit)); err != nil {
						t.Fatal(err)
					}
				}
				tok := dashboardToken(t, tc.owner)
				seen := g.parallelStatuses(tc.n, func(i int) request {
					return request{method: "POST", path: "/v1/apikeys", bearer: tok, body: `{"name":"k"}`,
						header: idem(fmt.Sprintf("%s-%d", tc.owner, i))}
				})
				want := map[string]int{"201 ": tc.limit, "409 key_limit_reached": tc.n - tc.limit}
				if fmt.Sprint(seen) != fmt.Sprint(want) {
					t.Errorf("%d parallel creates under limit %d: %v, want %v", tc.n, tc.limit, seen, want)
					t.Logf("logs: %s", grepLogs(g.readLogs(), `"level":"error"`))
				}
				if n := g.countKeys(tc.owner); n != tc.limit {
					t.Errorf("%d parallel creates left %d keys, want %d", tc.n, n, tc.limit)
				}
			}
		})
	}
}

// grepLogs returns the log lines that contain s.
func grepLogs(logs []byte, s string) string {
	var out []string
	for _, line := range strings.Split(string(logs), "\n") {
		if strings.Contains(line, s) {
			out = append(out, line)
		}
	}
	return strings.Join(out, "\n")
}

// allMethods is every method the method table sends: the standard ones,
// prefixes of them (once matched by substring of the Allow list) and a
// lower-case one (methods are case-sensitive).
var allMethods = []string{"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "T", "PO", "GE", "get"}

// TestManagementMethods sends every method to every management route: a
// method not documented for the route gets 405 with the route's Allow and
// changes nothing; OPTIONS gets the preflight with the same Allow; the
// documented ones reach their endpoint.
func TestManagementMethods(t *testing.T) {
	for _, kind := range storeKinds {
		t.Run(kind, func(t *testing.T) { testManagementMethods(t, kind) })
	}
}

func testManagementMethods(t *testing.T, kind string) {
	g := startGateway(t, kind, "")
	alice := dashboardToken(t, "alice")
	k := g.create("alice", `{"name":"target"}`)
	before, _ := g.list("alice", "")
	routes := []struct {
		path    string
		allow   string
		success map[string]int // documented method -> status
	}{
		{"/v1/apikeys", "GET, POST", map[string]int{"GET": 200, "POST": 201}},
		{"/v1/apikeys/" + k.KeyID, "GET, PATCH, DELETE", map[string]int{"GET": 200, "PATCH": 200, "DELETE": 200}},
		{"/v1/apikeys/" + k.KeyID + "/rotate", "POST", map[string]int{"POST": 201}},
	}
	// A body every endpoint would act on, were the request routed to it.
	const body = `{"name":"changed"}`
	for _, rt := range routes {
		for _, m := range allMethods {
			if _, ok := rt.success[m]; ok {
				continue
			}
			t.Run(rt.path+"/"+m, func(t *testing.T) {
				req := request{method: m, path: rt.path, bearer: alice, body: body, header: map[string]string{"Idempotency-Key": "m-" + m}}
				var r *response
				if m == "HEAD" {
					r = g.doHead(req) // no body to decode
				} else {
					r = g.do(req)
				}
				switch m {
				case "OPTIONS":
					if r.status != 204 || r.header.Get("Allow") != rt.allow+", OPTIONS" {
						t.Errorf("%d Allow=%q, want 204 and %q", r.status, r.header.Get("Allow"), rt.allow+", OPTIONS")
					}
				default:
					if r.status != 405 || r.header.Get("Allow") != rt.allow {
						t.Errorf("%d Allow=%q, want 405 and %q: %s", r.status, r.header.Get("Allow"), rt.allow, r.body)
					}
					if m != "HEAD" && r.errCode() != "method_not_allowed" {
						t.Errorf("code %q, want method_not_allowed", r.errCode())
					}
				}
			})
		}
	}
	after, _ := g.list("alice", "")
	if fmt.Sprint(after.Keys) != fmt.Sprint(before.Keys) {
		t.Fatalf("refused methods changed the keys:\nbefore %+v\nafter  %+v", before.Keys, after.Keys)
	}
	if v, _ := g.view("alice", k.KeyID); v.Status != "active" || v.Name != "target" || v.ReplacedBy != "" {
		t.Fatalf("key after refused methods: %+v", v)
	}

	// The documented methods reach their endpoints (each on a fresh key).
	for _, rt := range routes {
		for m, status := range rt.success {
			fresh := g.create("alice", `{"name":"fresh"}`)
			path := strings.ReplaceAll(rt.path, k.KeyID, fresh.KeyID)
			okBody := body
			if strings.HasSuffix(path, "/rotate") {
				okBody = `{"grace_period_seconds":0}`
			}
			r := g.do(request{method: m, path: path, bearer: alice, body: okBody})
			if r.status != status {
				t.Errorf("%s %s: %d, want %d: %s", m, rt.path, r.status, status, r.body)
			}
		}
	}
}

// doHead sends a HEAD request, whose answer has no body.
func (g *gateway) doHead(req request) *response {
	g.t.Helper()
	r, err := http.NewRequest("HEAD", g.base+req.path, nil)
	if err != nil {
		g.t.Fatal(err)
	}
	r.Header.Set("Authorization", "Bearer "+req.bearer)
	resp, err := g.client.Do(r)
	if err != nil {
		g.t.Fatal(err)
	}
	resp.Body.Close()
	return &response{status: resp.StatusCode, header: resp.Header}
}

// orgToken signs a dashboard JWT for a member of org with the given grants
// (for owner_claim org, scopes_claim perms).
func orgToken(t testing.TB, sub, org string, perms any) string {
	return signToken(t, jwt.SigningMethodHS256, []byte(testJWTSecret), jwt.MapClaims{
		"sub": sub, "org": org, "perms": perms, "iss": testIssuer, "aud": testAudience,
		"iat": time.Now().Unix(), "exp": time.Now().Add(time.Hour).Unix(),
	})
}

// TestReplayIntegrity: an idempotent replay is authorised like a fresh
// request, never hands out a key that no longer validates as it did, and
// matches requests by meaning rather than bytes; replays are logged.
func TestReplayIntegrity(t *testing.T) {
	for _, kind := range storeKinds {
		t.Run(kind, func(t *testing.T) {
			g := startGateway(t, kind, "", "owner_claim org\nscopes_claim perms")
			admin := orgToken(t, "admin", "acme", "*")
			reader := orgToken(t, "reader", "acme", []string{"analytics:read"})
			post := func(tok, path, key, body string) *response {
				return g.do(request{method: "POST", path: path, bearer: tok, body: body, header: idem(key)})
			}
			mustCreate := func(tok, key, body string) createdKey {
				t.Helper()
				r := post(tok, "/v1/apikeys", key, body)
				if r.status != 201 {
					t.Fatalf("create: %d %s", r.status, r.body)
				}
				var k createdKey
				_ = json.Unmarshal(r.env.Data, &k)
				return k
			}
			refused := func(what string, r *response, status int, code string) {
				t.Helper()
				if r.status != status || r.errCode() != code {
					t.Errorf("%s: %d %s, want %d %s", what, r.status, r.body, status, code)
				}
				if strings.Contains(string(r.body), "wbk_") {
					t.Errorf("%s: the answer holds a key: %s", what, r.body)
				}
			}

			t.Run("replay re-checks grants", func(t *testing.T) {
				full := mustCreate(admin, "grant-1", `{"name":"full"}`)
				refused("narrower session replaying a full-access create", post(reader, "/v1/apikeys", "grant-1", `{"name":"full"}`), 403, "scope_not_grantable")
				refused("the same create, fresh", post(reader, "/v1/apikeys", "grant-fresh", `{"name":"full"}`), 403, "scope_not_grantable")
				if r := post(admin, "/v1/apikeys", "grant-1", `{"name":"full"}`); r.status != 201 || r.header.Get("Idempotent-Replayed") != "true" {
					t.Errorf("admin's own replay: %d %s", r.status, r.body)
				}
				// A grant the narrower session holds is replayed to it.
				scoped := mustCreate(admin, "grant-2", `{"name":"r","scopes":["analytics:read"]}`)
				r := post(reader, "/v1/apikeys", "grant-2", `{"name":"r","scopes":["analytics:read"]}`)
				if r.status != 201 || !strings.Contains(string(r.body), scoped.Key) {
					t.Errorf("replay of a grantable key: %d %s", r.status, r.body)
				}
				// Rotations too: the reader may not rotate (or replay the
				// rotation of) a full-access key.
				refused("narrower session replaying a rotation", func() *response {
					if r := post(admin, "/v1/apikeys/"+full.KeyID+"/rotate", "grant-rot", ""); r.status != 201 {
						t.Fatalf("rotate: %d %s", r.status, r.body)
					}
					return post(reader, "/v1/apikeys/"+full.KeyID+"/rotate", "grant-rot", "")
				}(), 403, "scope_not_grantable")
			})

			t.Run("no replay of a key that changed", func(t *testing.T) {
				body := `{"name":"changing","scopes":["analytics:read"]}`
				revoked := mustCreate(admin, "gone-revoke", body)
				rotated := mustCreate(admin, "gone-rotate", body)
				patched := mustCreate(admin, "gone-patch", body)
				if r := g.do(request{method: "DELETE", path: "/v1/apikeys/" + revoked.KeyID, bearer: admin}); r.status != 200 {
					t.Fatalf("revoke: %d", r.status)
				}
				if r := post(admin, "/v1/apikeys/"+rotated.KeyID+"/rotate", "rot-of-rotated", `{"grace_period_seconds":600}`); r.status != 201 {
					t.Fatalf("rotate: %d %s", r.status, r.body)
				}
				if r := g.do(request{method: "PATCH", path: "/v1/apikeys/" + patched.KeyID, bearer: admin, body: `{"scopes":["webhooks:manage"]}`}); r.status != 200 {
					t.Fatalf("patch: %d %s", r.status, r.body)
				}
				refused("replay after revoke", post(admin, "/v1/apikeys", "gone-revoke", body), 409, "idempotency_replay_unavailable")
				refused("replay after rotate", post(admin, "/v1/apikeys", "gone-rotate", body), 409, "idempotency_replay_unavailable")
				refused("replay after a scope change", post(admin, "/v1/apikeys", "gone-patch", body), 409, "idempotency_replay_unavailable")

				// The replay of a rotation whose new key was revoked.
				r := post(admin, "/v1/apikeys/"+patched.KeyID+"/rotate", "rot-2", "")
				var replacement createdKey
				_ = json.Unmarshal(r.env.Data, &replacement)
				if r.status != 201 {
					t.Fatalf("rotate: %d %s", r.status, r.body)
				}
				g.do(request{method: "DELETE", path: "/v1/apikeys/" + replacement.KeyID, bearer: admin})
				refused("rotation replay after its key was revoked", post(admin, "/v1/apikeys/"+patched.KeyID+"/rotate", "rot-2", ""), 409, "idempotency_replay_unavailable")
			})

			t.Run("no takeover of a key that changed", func(t *testing.T) {
				// A request that died after storing its key leaves a pending
				// record; the key is listed, and revoked, before a retry
				// takes the record over.
				body := `{"name":"ci","scopes":["analytics:read"],"expires_in_days":30}`
				_, sealed := sealedPending(t, g.store, "acme", "abandoned-1", body, true)
				var announced struct{ Data createdKey }
				_ = json.Unmarshal(sealed, &announced)
				if r := g.do(request{method: "DELETE", path: "/v1/apikeys/" + announced.Data.KeyID, bearer: admin}); r.status != 200 {
					t.Fatalf("revoke: %d %s", r.status, r.body)
				}
				refused("takeover after revoke", post(admin, "/v1/apikeys", "abandoned-1", body), 409, "idempotency_replay_unavailable")
			})

			t.Run("fingerprint is the meaning", func(t *testing.T) {
				first := post(admin, "/v1/apikeys", "meaning-1", `{"name":"ci","scopes":["analytics:read"],"expires_in_days":30}`)
				if first.status != 201 {
					t.Fatalf("first: %d %s", first.status, first.body)
				}
				for _, same := range []string{
					`{"expires_in_days":30,"scopes":["analytics:read"],"name":"ci"}`,
					"{\n  \"name\" : \"ci\",\n  \"scopes\" : [ \"analytics:read\" ],\n  \"expires_in_days\" : 30\n}\n",
					`{"name":"\u0063i","scopes":["analytics:read"],"expires_in_days":30.0}`,
				} {
					r := post(admin, "/v1/apikeys", "meaning-1", same)
					if r.status != 201 || r.header.Get("Idempotent-Replayed") != "true" || string(r.body) != string(first.body) {
						t.Errorf("%s: %d replayed=%q %s", same, r.status, r.header.Get("Idempotent-Replayed"), r.body)
					}
				}
				refused("another meaning", post(admin, "/v1/apikeys", "meaning-1", `{"name":"ci","scopes":["analytics:read"],"expires_in_days":31}`), 422, "idempotency_key_reused")
				// Omitted and null scopes mean the same (full access); so do
				// an omitted body and {} for a rotation.
				if r := post(admin, "/v1/apikeys", "meaning-2", `{"name":"x"}`); r.status != 201 {
					t.Fatalf("create: %d", r.status)
				}
				if r := post(admin, "/v1/apikeys", "meaning-2", `{"scopes":null,"name":"x"}`); r.header.Get("Idempotent-Replayed") != "true" {
					t.Errorf("explicit null: %d %s", r.status, r.body)
				}
			})

			// Replays are logged at Info like creates, never with the key.
			logs := grepLogs(g.readLogs(), `"msg":"api key replayed"`)
			if !strings.Contains(logs, `"level":"info"`) || !strings.Contains(logs, `"owner":"acme"`) || !strings.Contains(logs, `"key_id":"key_`) {
				t.Errorf("no Info log of a replay with owner and key_id: %q", logs)
			}
			if strings.Contains(logs, "wbk_") {
				t.Error("a replay log line holds a key")
			}
		})
	}
}

// signWith signs claims with HS256 under the test dashboard secret, with
// the given header members set (nil deletes one).
func signWith(t testing.TB, header map[string]any, claims jwt.MapClaims) string {
	t.Helper()
	tok := jwt.NewWithClaims(jwt.SigningMethodHS256, claims)
	for k, v := range header {
		if v == nil {
			delete(tok.Header, k)
		} else {
			tok.Header[k] = v
		}
	}
	s, err := tok.SignedString([]byte(testJWTSecret))
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// TestDashboardTokenStrictness: owners a backend could not receive byte for
// byte, crit headers, typ outside the allowlist and tokens issued for
// longer than max_token_age get 401 invalid_token; key names refuse
// bidirectional controls.
func TestDashboardTokenStrictness(t *testing.T) {
	g := startGateway(t, "file", "", "max_token_age 1h\ntyp JWT")
	claims := func(sub string, life time.Duration) jwt.MapClaims {
		return jwt.MapClaims{"sub": sub, "iss": testIssuer, "aud": testAudience,
			"iat": time.Now().Unix(), "exp": time.Now().Add(life).Unix()}
	}
	list := func(tok string) *response {
		return g.do(request{method: "GET", path: "/v1/apikeys", bearer: tok})
	}
	if r := list(dashboardToken(t, "alice")); r.status != 200 {
		t.Fatalf("valid token: %d %s", r.status, r.body)
	}
	for name, tok := range map[string]string{
		"owner with a trailing space": signWith(t, nil, claims("alice ", time.Hour)),
		"owner with a leading space":  signWith(t, nil, claims(" alice", time.Hour)),
		"owner with U+2028":           signWith(t, nil, claims("ali\u2028ce", time.Hour)),
		"owner with a bidi override":  signWith(t, nil, claims("alice\u202e", time.Hour)),
		"crit naming an extension":    signWith(t, map[string]any{"crit": []string{"urn:x"}, "urn:x": true}, claims("alice", time.Hour)),
		"crit empty":                  signWith(t, map[string]any{"crit": []string{}}, claims("alice", time.Hour)),
		"typ outside the allowlist":   signWith(t, map[string]any{"typ": "id+jwt"}, claims("alice", time.Hour)),
		"no typ":                      signWith(t, map[string]any{"typ": nil}, claims("alice", time.Hour)),
		"issued for a day":            signWith(t, nil, claims("alice", 24*time.Hour)),
	} {
		r := list(tok)
		if r.status != 401 || r.errCode() != "invalid_token" {
			t.Errorf("%s: %d %s, want 401 invalid_token", name, r.status, r.body)
		}
	}

	alice := dashboardToken(t, "alice")
	k := g.create("alice", `{"name":"plain"}`)
	for _, name := range []string{"evil\u202etxt.exe", "\u2066name\u2069", "a\u200fb", "a\u061cb"} {
		body, _ := json.Marshal(map[string]string{"name": name})
		for _, req := range []request{
			{method: "POST", path: "/v1/apikeys", bearer: alice, body: string(body)},
			{method: "PATCH", path: "/v1/apikeys/" + k.KeyID, bearer: alice, body: string(body)},
		} {
			r := g.do(req)
			if r.status != 400 || r.errCode() != "validation_error" || r.env.Error.Field != "name" {
				t.Errorf("%s name %q: %d %s", req.method, name, r.status, r.body)
			}
		}
	}
	if n := g.countKeys("alice"); n != 1 {
		t.Errorf("alice has %d keys, want 1", n)
	}
}

// TestValidateWarnsJWKSWithoutAudience: `caddy validate` warns when
// dashboard_jwt trusts a JWKS without checking the audience, and is quiet
// once audience is set.
func TestValidateWarnsJWKSWithoutAudience(t *testing.T) {
	jwks := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_, _ = io.WriteString(w, `{"keys":[]}`)
	}))
	defer jwks.Close()
	for _, tc := range []struct {
		audience string
		warn     bool
	}{{"", true}, {"audience dashboard", false}} {
		dir := t.TempDir()
		cfg := filepath.Join(dir, "Caddyfile")
		body := fmt.Sprintf(`{
	admin off
	persist_config off
}
:0 {
	apikeys {
		store file %s
		dashboard_jwt {
			jwks %s/jwks.json
			%s
		}
	}
}
`, filepath.Join(dir, "keys.db"), jwks.URL, tc.audience)
		if err := os.WriteFile(cfg, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		cmd := exec.Command(testcaddy.Binary(t), "validate", "--config", cfg, "--adapter", "caddyfile")
		cmd.Env = append(os.Environ(), "XDG_DATA_HOME="+dir, "XDG_CONFIG_HOME="+dir)
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("validate: %v\n%s", err, out)
		}
		warned := strings.Contains(string(out), "jwks is set without audience")
		if warned != tc.warn {
			t.Errorf("%q: warned=%v, want %v:\n%s", tc.audience, warned, tc.warn, out)
		}
	}
}

// TestRedisURLPasswordOnlyFromAPlaceholder: a Redis URL that carries a
// password must be one placeholder as a whole; the Caddyfile finds the
// password where the Redis client does, however the URL is spelled.
func TestRedisURLPasswordOnlyFromAPlaceholder(t *testing.T) {
	adapt := func(url string) (string, error) {
		cfg := ":8080 {\n\tapikeys {\n\t\tstore redis " + url + "\n\t}\n}\n"
		out, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(cfg), nil)
		return string(out), err
	}
	for _, url := range []string{
		"redis://:hunter2@127.0.0.1/0?client_name={x}",
		"redis://:hunter2@127.0.0.1/0?client_name={env.NAME}",
		"redis+sentinel://user@x:hunter2@127.0.0.1/m",
		"redis+sentinel://{env.USER}:hunter2@127.0.0.1/m",
		"redis://:{env.REDIS_PASSWORD}@127.0.0.1/0",
		"redis+sentinel://127.0.0.1/m?sentinel_password=hunter2&x={y}",
		"rediss://u:hunter2@127.0.0.1",
	} {
		out, err := adapt(url)
		if err == nil || !strings.Contains(err.Error(), "placeholder") {
			t.Errorf("%s: adapted (%v): %s", url, err, out)
		}
		if err != nil && strings.Contains(err.Error(), "hunter2") {
			t.Errorf("%s: the error shows the password: %v", url, err)
		}
	}
	for _, url := range []string{
		"{env.REDIS_URL}",
		"redis://127.0.0.1/0?client_name={env.NAME}",
		"redis+sentinel://user@127.0.0.1:26379/m",
		"redis://user@127.0.0.1/0",
	} {
		if _, err := adapt(url); err != nil {
			t.Errorf("%s: %v", url, err)
		}
	}
}

// storeErrors sums caddy_apikeys_store_errors_total over every operation.
func storeErrors(t *testing.T) float64 {
	t.Helper()
	ch := make(chan prometheus.Metric, 64)
	go func() { metricStoreErrors.Collect(ch); close(ch) }()
	var sum float64
	for m := range ch {
		var pb dto.Metric
		if err := m.Write(&pb); err != nil {
			t.Fatal(err)
		}
		sum += pb.GetCounter().GetValue()
	}
	return sum
}

// TestConflictsAreNotStoreErrors: answers such as 409 key_not_active,
// key_already_rotated, key_limit_reached and 404 come from a working store
// and do not count as store errors.
func TestConflictsAreNotStoreErrors(t *testing.T) {
	for _, kind := range storeKinds {
		t.Run(kind, func(t *testing.T) {
			g := startGateway(t, kind, "max_keys_per_owner 2")
			alice := dashboardToken(t, "alice")
			k := g.create("alice", `{"name":"a"}`)
			rotated := g.create("alice", `{"name":"b"}`)
			if r := g.do(request{method: "POST", path: "/v1/apikeys/" + rotated.KeyID + "/rotate", bearer: alice, body: `{}`}); r.status != 409 || r.errCode() != "key_limit_reached" {
				t.Fatalf("rotate at the limit: %d %s", r.status, r.body)
			}
			if r := g.do(request{method: "DELETE", path: "/v1/apikeys/" + k.KeyID, bearer: alice}); r.status != 200 {
				t.Fatalf("revoke: %d", r.status)
			}
			if r := g.do(request{method: "POST", path: "/v1/apikeys/" + rotated.KeyID + "/rotate", bearer: alice, body: `{}`}); r.status != 201 {
				t.Fatalf("rotate: %d %s", r.status, r.body)
			}
			before := storeErrors(t)
			for _, tc := range []struct {
				req  request
				code string
			}{
				{request{method: "PATCH", path: "/v1/apikeys/" + k.KeyID, bearer: alice, body: `{"name":"x"}`}, "key_not_active"},
				{request{method: "POST", path: "/v1/apikeys/" + rotated.KeyID + "/rotate", bearer: alice, body: `{}`}, "key_already_rotated"},
				{request{method: "POST", path: "/v1/apikeys", bearer: alice, body: `{"name":"c"}`}, "key_limit_reached"},
				{request{method: "PATCH", path: "/v1/apikeys/key_doesnotexist", bearer: alice, body: `{"name":"x"}`}, "not_found"},
				{request{method: "DELETE", path: "/v1/apikeys/" + k.KeyID, bearer: dashboardToken(t, "bob")}, "not_found"},
			} {
				if r := g.do(tc.req); r.errCode() != tc.code {
					t.Errorf("%s %s: %d %s, want %s", tc.req.method, tc.req.path, r.status, r.body, tc.code)
				}
			}
			if after := storeErrors(t); after != before {
				t.Errorf("store_errors_total went from %v to %v on answers of a working store", before, after)
			}
		})
	}
}

// hangingUpdates is a real store whose Update of one key hangs until the
// caller's deadline, as a store that stopped answering would.
type hangingUpdates struct {
	keystore.Store
	id string
}

func (s hangingUpdates) Update(ctx context.Context, id string, fn func(*keystore.Key) error) (*keystore.Key, error) {
	if id == s.id {
		<-ctx.Done()
		return nil, ctx.Err()
	}
	return s.Store.Update(ctx, id, fn)
}

// TestRotationCleanupOwnDeadline: when a rotation stores its new key but
// cannot start the old key's grace period before the request's deadline,
// the new key is still revoked (under a deadline of its own), so no
// unannounced key is left working.
//
// The store is Redis: its calls honour the context's deadline, where
// bbolt's ignore it.
func TestRotationCleanupOwnDeadline(t *testing.T) {
	srv := testredis.Start(t)
	real, err := keystore.NewRedis(keystore.RedisOptions{URLs: []string{srv.URL()}})
	if err != nil {
		t.Fatal(err)
	}
	defer real.Close()
	now := time.Now().UTC().Truncate(time.Millisecond)
	old := &keystore.Key{ID: "key_old", Owner: "alice", Name: "k", Prefix: "wbk_00000000",
		Digest: keystore.Digest{1}, CreatedAt: now}
	if err := real.Create(t.Context(), old); err != nil {
		t.Fatal(err)
	}
	h := &Handler{store: hangingUpdates{real, old.ID}, logger: zap.NewNop(), now: time.Now, storeTimeout: time.Second}
	replacement := &keystore.Key{ID: "key_new", Owner: "alice", Name: "k", Prefix: "wbk_11111111",
		Digest: keystore.Digest{2}, CreatedAt: now, Replaces: old.ID}
	graceEnd := now.Add(time.Hour)
	ctx, cancel := context.WithTimeout(t.Context(), 200*time.Millisecond)
	defer cancel()
	if aerr := h.executeMint(ctx, &mintOp{key: replacement, replaces: old.ID, graceEnd: &graceEnd}); aerr == nil {
		t.Fatal("the rotation succeeded")
	}
	got, err := real.Get(t.Context(), replacement.ID)
	if err != nil {
		t.Fatal(err)
	}
	if got.Active(time.Now()) {
		t.Errorf("the new key of the failed rotation still validates: %+v", got)
	}
}

// TestIdempotencyKeyKeptOutOfAccessLogs checks the log filter SECURITY.md
// recommends: with it the access log has no Idempotency-Key; without it
// (the control) the access log has it.
func TestIdempotencyKeyKeptOutOfAccessLogs(t *testing.T) {
	for _, filtered := range []bool{true, false} {
		dir := t.TempDir()
		port := freePort(t)
		format := "format json"
		if filtered {
			// As in SECURITY.md.
			format = "format filter {\n\t\t\twrap json\n\t\t\trequest>headers>Idempotency-Key delete\n\t\t}"
		}
		cfg := fmt.Sprintf(`{
	admin off
	persist_config off
	auto_https off
}
http://127.0.0.1:%[1]d {
	log {
		output file %[2]s/access.log
		%[3]s
	}
	apikeys {
		store file %[2]s/keys.db
		secret {env.APIKEYS_TEST_SECRET}
		dashboard_jwt {
			secret {env.APIKEYS_TEST_JWT_SECRET}
			issuer %[4]s
			audience %[5]s
		}
	}
	respond "ok"
}
`, port, dir, format, testIssuer, testAudience)
		cfgJSON, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(cfg), nil)
		if err != nil {
			t.Fatal(err)
		}
		if err := caddy.Load(cfgJSON, true); err != nil {
			t.Fatal(err)
		}
		const idemKey = "idem-7c1e0b7d-secret-ish"
		req, _ := http.NewRequest("POST", fmt.Sprintf("http://127.0.0.1:%d/v1/apikeys", port), strings.NewReader(`{"name":"logged"}`))
		req.Header.Set("Authorization", "Bearer "+dashboardToken(t, "alice"))
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("Idempotency-Key", idemKey)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		stopCaddy(t) // flushes and closes the log
		if resp.StatusCode != 201 {
			t.Fatalf("create: %d", resp.StatusCode)
		}
		logged, err := os.ReadFile(filepath.Join(dir, "access.log"))
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(string(logged), `"uri":"/v1/apikeys"`) {
			t.Fatalf("no access log line for the request: %s", logged)
		}
		if got := strings.Contains(string(logged), idemKey); got == filtered {
			t.Errorf("filtered=%v: Idempotency-Key in the access log: %v\n%s", filtered, got, logged)
		}
	}
}
