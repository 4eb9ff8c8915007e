package apikeys

import (
	"encoding/json"
	"fmt"
	"net/http"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/caddy-apikeys/caddy-apikeys/internal/testcaddy"
	"github.com/caddy-apikeys/caddy-apikeys/internal/testredis"
)

// viewMap decodes a response's data as a map of raw members.
func viewMap(t *testing.T, resp *response) map[string]json.RawMessage {
	t.Helper()
	var m map[string]json.RawMessage
	if err := json.Unmarshal(resp.env.Data, &m); err != nil {
		t.Fatalf("data is not an object: %v: %s", err, resp.body)
	}
	return m
}

// sameJSON reports whether two JSON texts hold equal values.
func sameJSON(t *testing.T, a, b string) bool {
	t.Helper()
	var x, y any
	if err := json.Unmarshal([]byte(a), &x); err != nil {
		t.Fatalf("%q: %v", a, err)
	}
	if err := json.Unmarshal([]byte(b), &y); err != nil {
		t.Fatalf("%q: %v", b, err)
	}
	return reflect.DeepEqual(x, y)
}

// TestDisableEnable: PATCH enabled false suspends a key (403 key_disabled
// at once, 401 stays for revoked and unknown keys), the view and the
// status filter show it, rotation is refused, other changes keep it
// disabled, enabled true restores it; a disabled key still counts towards
// max_keys_per_owner; a revoked key cannot be enabled.
func TestDisableEnable(t *testing.T) {
	for _, kind := range storeKinds {
		t.Run(kind, func(t *testing.T) {
			g := startGateway(t, kind, "max_keys_per_owner 3")
			alice := dashboardToken(t, "alice")
			patch := func(id, body string) *response {
				return g.do(request{method: "PATCH", path: "/v1/apikeys/" + id, bearer: alice, body: body})
			}
			k := g.create("alice", `{"name":"suspend me","scopes":["analytics:read"]}`)
			other := g.create("alice", `{"name":"other"}`)
			if r := g.do(request{method: "GET", path: "/v1/analytics", bearer: k.Key}); r.status != 200 {
				t.Fatalf("before disable: %d", r.status)
			}
			if v, _ := g.view("alice", k.KeyID); !strings.Contains(string(mustGet(t, g, k.KeyID)), `"enabled":true`) || v.Status != "active" {
				t.Errorf("a new key's view: %+v", v)
			}

			resp := patch(k.KeyID, `{"enabled":false}`)
			m := viewMap(t, resp)
			if resp.status != 200 || string(m["enabled"]) != "false" || string(m["status"]) != `"disabled"` {
				t.Fatalf("disable: %d %s", resp.status, resp.body)
			}
			r := g.do(request{method: "GET", path: "/v1/analytics", bearer: k.Key})
			if r.status != 403 || r.errCode() != "key_disabled" {
				t.Fatalf("a disabled key on the next request: %d %s", r.status, r.body)
			}
			if g.backend.count() != 1 {
				t.Errorf("the backend saw %d requests, want 1 (before the key was disabled)", g.backend.count())
			}
			// Scope is not even considered: still key_disabled.
			if r := g.do(request{method: "POST", path: "/v1/webhooks/1", bearer: k.Key}); r.errCode() != "key_disabled" {
				t.Errorf("a disabled key on another route: %d %s", r.status, r.body)
			}
			// Unknown keys are unchanged: 401 invalid_api_key.
			if r := g.do(request{method: "GET", path: "/v1/x", bearer: unknownKey(t)}); r.status != 401 || r.errCode() != "invalid_api_key" {
				t.Errorf("an unknown key: %d %s", r.status, r.body)
			}

			// The filter and the view.
			l, _ := g.list("alice", "?status=disabled")
			if len(l.Keys) != 1 || l.Keys[0].KeyID != k.KeyID || l.Keys[0].Status != "disabled" {
				t.Errorf("status=disabled lists %+v", l.Keys)
			}
			l, _ = g.list("alice", "?status=active")
			if len(l.Keys) != 1 || l.Keys[0].KeyID != other.KeyID {
				t.Errorf("status=active lists %+v", l.Keys)
			}
			if v, _ := g.view("alice", k.KeyID); v.Status != "disabled" {
				t.Errorf("view of a disabled key: %+v", v)
			}

			// Rotation is refused; a rename keeps it disabled; a repeated
			// disable is harmless.
			if r := g.do(request{method: "POST", path: "/v1/apikeys/" + k.KeyID + "/rotate", bearer: alice}); r.status != 409 || r.errCode() != "key_not_active" {
				t.Errorf("rotate a disabled key: %d %s", r.status, r.body)
			}
			if r := patch(k.KeyID, `{"name":"renamed"}`); r.status != 200 || string(viewMap(t, r)["enabled"]) != "false" {
				t.Errorf("rename a disabled key: %d %s", r.status, r.body)
			}
			if r := patch(k.KeyID, `{"enabled":false}`); r.status != 200 || string(viewMap(t, r)["status"]) != `"disabled"` {
				t.Errorf("disable again: %d %s", r.status, r.body)
			}
			for _, body := range []string{`{"enabled":null}`, `{"enabled":"false"}`, `{"enabled":0}`} {
				if r := patch(k.KeyID, body); r.status != 400 || r.errCode() != "validation_error" || r.env.Error.Field != "enabled" {
					t.Errorf("%s: %d %s", body, r.status, r.body)
				}
			}
			if r := g.do(request{method: "PATCH", path: "/v1/apikeys/" + k.KeyID, bearer: dashboardToken(t, "bob"), body: `{"enabled":true}`}); r.status != 404 {
				t.Errorf("bob enabled alice's key: %d", r.status)
			}
			if r := g.do(request{method: "GET", path: "/v1/analytics", bearer: k.Key}); r.errCode() != "key_disabled" {
				t.Errorf("refused patches enabled the key: %d %s", r.status, r.body)
			}

			// Still live: the owner holds 2 keys of 3; one more, then the limit.
			g.create("alice", `{"name":"third"}`)
			if r := g.do(request{method: "POST", path: "/v1/apikeys", bearer: alice, body: `{"name":"fourth"}`}); r.status != 409 || r.errCode() != "key_limit_reached" {
				t.Errorf("a disabled key did not count towards the limit: %d %s", r.status, r.body)
			}

			resp = patch(k.KeyID, `{"enabled":true}`)
			if m := viewMap(t, resp); resp.status != 200 || string(m["enabled"]) != "true" || string(m["status"]) != `"active"` {
				t.Fatalf("enable: %d %s", resp.status, resp.body)
			}
			if r := g.do(request{method: "GET", path: "/v1/analytics", bearer: k.Key}); r.status != 200 {
				t.Errorf("an enabled key on the next request: %d %s", r.status, r.body)
			}

			// Revoked: 401 as before, and cannot be enabled or disabled.
			g.do(request{method: "PATCH", path: "/v1/apikeys/" + other.KeyID, bearer: alice, body: `{"enabled":false}`})
			g.do(request{method: "DELETE", path: "/v1/apikeys/" + other.KeyID, bearer: alice})
			if r := g.do(request{method: "GET", path: "/v1/x", bearer: other.Key}); r.status != 401 || r.errCode() != "invalid_api_key" {
				t.Errorf("a revoked (disabled) key: %d %s", r.status, r.body)
			}
			if v, _ := g.view("alice", other.KeyID); v.Status != "revoked" {
				t.Errorf("a revoked disabled key shows %s", v.Status)
			}
			if r := patch(other.KeyID, `{"enabled":true}`); r.status != 409 || r.errCode() != "key_not_active" {
				t.Errorf("enable a revoked key: %d %s", r.status, r.body)
			}
		})
	}
}

// mustGet returns the data of GET <management>/id for alice.
func mustGet(t *testing.T, g *gateway, id string) []byte {
	t.Helper()
	r := g.do(request{method: "GET", path: "/v1/apikeys/" + id, bearer: dashboardToken(t, "alice")})
	if r.status != 200 {
		t.Fatalf("get %s: %d", id, r.status)
	}
	return r.env.Data
}

// TestDisableReachesEveryInstance: a key disabled through one instance is
// refused by another that had it cached, as fast as a revocation, and
// accepted there again once enabled.
func TestDisableReachesEveryInstance(t *testing.T) {
	g := startGateway(t, "redis", "")
	peer := startPeer(t, g, "")
	waitSubscribers(t, g, 2)
	client := &http.Client{Timeout: 5 * time.Second}
	k := g.create("alice", `{"name":"shared"}`)
	if s := peerStatus(t, client, peer, k.Key); s != 200 {
		t.Fatalf("peer before disable: %d", s)
	}
	until := func(want int) time.Duration {
		t.Helper()
		start := time.Now()
		for peerStatus(t, client, peer, k.Key) != want {
			if time.Since(start) > 2*time.Second {
				t.Fatalf("the peer did not answer %d within 2s", want)
			}
			time.Sleep(5 * time.Millisecond)
		}
		return time.Since(start)
	}
	alice := dashboardToken(t, "alice")
	if r := g.do(request{method: "PATCH", path: "/v1/apikeys/" + k.KeyID, bearer: alice, body: `{"enabled":false}`}); r.status != 200 {
		t.Fatalf("disable: %d %s", r.status, r.body)
	}
	t.Logf("disable reached the peer in %v", until(403))
	if r := g.do(request{method: "PATCH", path: "/v1/apikeys/" + k.KeyID, bearer: alice, body: `{"enabled":true}`}); r.status != 200 {
		t.Fatalf("enable: %d %s", r.status, r.body)
	}
	t.Logf("enable reached the peer in %v", until(200))
}

// TestKeyMeta: metadata on create and PATCH, in views and rotations, sent
// to the backend as X-Api-Key-Meta (ASCII compact JSON, never the
// client's copy, safe from Connection and trailers) and as placeholders;
// invalid metadata is 400 field meta; a create without it answers exactly
// the reference shape.
func TestKeyMeta(t *testing.T) {
	for _, kind := range storeKinds {
		t.Run(kind, func(t *testing.T) {
			g := startGateway(t, kind, "")
			alice := dashboardToken(t, "alice")
			addr := strings.TrimPrefix(g.base, "http://")

			// Without meta: exactly the reference's members, and no header.
			plain := g.do(request{method: "POST", path: "/v1/apikeys", bearer: alice, body: `{"name":"CI usage reader","scopes":["analytics:read","webhooks:manage"],"expires_in_days":90}`})
			var members []string
			for name := range viewMap(t, plain) {
				members = append(members, name)
			}
			slices.Sort(members)
			if want := []string{"created_at", "expires_at", "key", "key_id", "name", "prefix", "scopes"}; !slices.Equal(members, want) {
				t.Errorf("create without meta answers %v, want %v", members, want)
			}
			var plainKey createdKey
			_ = json.Unmarshal(plain.env.Data, &plainKey)
			if _, ok := viewMap(t, g.do(request{method: "GET", path: "/v1/apikeys/" + plainKey.KeyID, bearer: alice}))["meta"]; ok {
				t.Errorf("a view without meta shows meta")
			}
			g.do(request{method: "GET", path: "/v1/analytics", bearer: plainKey.Key, header: map[string]string{"X-Api-Key-Meta": `{"plan":"enterprise"}`, "X_Api_Key_Meta": "x"}})
			// An unset placeholder: header_up leaves it as written.
			if h := g.backend.last(t); len(h.Values("X-Api-Key-Meta")) != 0 || h.Get("X-Auth-Meta-Plan") != "{http.auth.apikey.meta.plan}" {
				t.Errorf("a key without meta: the backend received meta %q, plan %q", h.Values("X-Api-Key-Meta"), h.Get("X-Auth-Meta-Plan"))
			}

			// With meta.
			meta := `{"plan":"pro","seats":25,"beta":true,"org":{"name":"Zürich AG","tags":["a","b"]},"note":"tab\there \u007f 😀"}`
			resp := g.do(request{method: "POST", path: "/v1/apikeys", bearer: alice, body: `{"name":"with meta","meta":` + meta + `}`})
			if resp.status != 201 {
				t.Fatalf("create with meta: %d %s", resp.status, resp.body)
			}
			got := string(viewMap(t, resp)["meta"])
			if !sameJSON(t, got, meta) {
				t.Errorf("create answers meta %s, want %s", got, meta)
			}
			var mk createdKey
			_ = json.Unmarshal(resp.env.Data, &mk)
			if r := g.do(request{method: "GET", path: "/v1/x", bearer: mk.Key, header: map[string]string{"X-Api-Key-Meta": `{"plan":"enterprise"}`, "Connection": "X-Api-Key-Meta"}}); r.status != 200 {
				t.Fatalf("a key with meta: %d %s", r.status, r.body)
			}
			h := g.backend.last(t)
			sent := h.Values("X-Api-Key-Meta")
			if len(sent) != 1 || !sameJSON(t, sent[0], meta) {
				t.Fatalf("the backend received X-Api-Key-Meta %q, want %s", sent, meta)
			}
			for i := 0; i < len(sent[0]); i++ {
				if c := sent[0][i]; c < 0x20 || c > 0x7e {
					t.Fatalf("X-Api-Key-Meta holds byte %#x: %q", c, sent[0])
				}
			}
			if strings.Contains(sent[0], " :") || strings.Contains(sent[0], ", ") {
				t.Errorf("X-Api-Key-Meta is not compact: %s", sent[0])
			}
			if h.Get("X-Auth-Meta-Plan") != "pro" || h.Get("X-Auth-Meta-Seats") != "25" || h.Get("X-Auth-Meta-Beta") != "true" {
				t.Errorf("placeholders: plan %q seats %q beta %q", h.Get("X-Auth-Meta-Plan"), h.Get("X-Auth-Meta-Seats"), h.Get("X-Auth-Meta-Beta"))
			}
			if v := string(viewMap(t, g.do(request{method: "GET", path: "/v1/apikeys/" + mk.KeyID, bearer: alice}))["meta"]); !sameJSON(t, v, meta) {
				t.Errorf("the view shows meta %s", v)
			}
			l, _ := g.list("alice", "")
			if raw, _ := json.Marshal(l); !strings.Contains(string(raw), mk.KeyID) {
				t.Fatalf("list lacks the key")
			}
			if r := g.do(request{method: "GET", path: "/v1/apikeys", bearer: alice}); !strings.Contains(string(r.body), `"plan":"pro"`) {
				t.Errorf("list does not show meta: %s", r.body)
			}

			// A declared trailer under the meta header's name is refused.
			raw := fmt.Sprintf("POST /v1/x HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer %s\r\nContent-Type: application/json\r\n"+
				"Transfer-Encoding: chunked\r\nTrailer: X-Api-Key-Meta\r\nConnection: close\r\n\r\n2\r\n{}\r\n0\r\nX-Api-Key-Meta: {}\r\n\r\n", mk.Key)
			if r := sendRaw(t, addr, raw); r.status != 400 || r.code != "forbidden_trailer" {
				t.Errorf("Trailer: X-Api-Key-Meta: %d %q", r.status, r.code)
			}
			if r := sendRaw(t, addr, strings.Replace(raw, "Trailer: X-Api-Key-Meta", "Trailer: X-Api-Key-Owner", 1)); r.status != 400 || r.code != "forbidden_trailer" {
				t.Errorf("Trailer: X-Api-Key-Owner: %d %q", r.status, r.code)
			}

			// PATCH changes it on the next request; null removes it.
			patch := func(body string) *response {
				return g.do(request{method: "PATCH", path: "/v1/apikeys/" + mk.KeyID, bearer: alice, body: body})
			}
			if r := patch(`{"meta":{"plan":"free"}}`); r.status != 200 || string(viewMap(t, r)["meta"]) != `{"plan":"free"}` {
				t.Fatalf("patch meta: %d %s", r.status, r.body)
			}
			g.do(request{method: "GET", path: "/v1/x", bearer: mk.Key})
			if h := g.backend.last(t); h.Get("X-Api-Key-Meta") != `{"plan":"free"}` || h.Get("X-Auth-Meta-Plan") != "free" || h.Get("X-Auth-Meta-Seats") != "{http.auth.apikey.meta.seats}" {
				t.Errorf("after patch: meta %q plan %q seats %q", h.Get("X-Api-Key-Meta"), h.Get("X-Auth-Meta-Plan"), h.Get("X-Auth-Meta-Seats"))
			}

			// Rotation carries it to the new key.
			rot := g.do(request{method: "POST", path: "/v1/apikeys/" + mk.KeyID + "/rotate", bearer: alice})
			if rot.status != 201 || string(viewMap(t, rot)["meta"]) != `{"plan":"free"}` {
				t.Fatalf("rotate: %d %s", rot.status, rot.body)
			}
			var nk createdKey
			_ = json.Unmarshal(rot.env.Data, &nk)
			g.do(request{method: "GET", path: "/v1/x", bearer: nk.Key})
			if h := g.backend.last(t); h.Get("X-Api-Key-Meta") != `{"plan":"free"}` {
				t.Errorf("the rotated key sends meta %q", h.Get("X-Api-Key-Meta"))
			}
			r := g.do(request{method: "PATCH", path: "/v1/apikeys/" + nk.KeyID, bearer: alice, body: `{"meta":null}`})
			if _, ok := viewMap(t, r)["meta"]; r.status != 200 || ok {
				t.Errorf("meta null: %d %s", r.status, r.body)
			}
			g.do(request{method: "GET", path: "/v1/x", bearer: nk.Key})
			if h := g.backend.last(t); len(h.Values("X-Api-Key-Meta")) != 0 || h.Get("X-Auth-Meta-Plan") != "{http.auth.apikey.meta.plan}" {
				t.Errorf("meta removed, yet the backend received %q", h.Values("X-Api-Key-Meta"))
			}

			// Invalid meta: 400 field meta, nothing created or changed.
			deep := `{"a":{"b":{"c":{}}}}`
			before := g.countKeys("alice")
			for _, m := range []string{`"x"`, `[1]`, `1`, `true`, deep, `{"a":[[[1]]]}`, `{"a":1,"a":2}`, `{"a":{"b":1,"b":2}}`,
				`{"s":"` + strings.Repeat("x", 4096) + `"}`, `{"s":"` + strings.Repeat("ü", 700) + `"}`} {
				for _, c := range []struct{ method, path, body string }{
					{"POST", "/v1/apikeys", `{"name":"bad","meta":` + m + `}`},
					{"PATCH", "/v1/apikeys/" + nk.KeyID, `{"meta":` + m + `}`},
				} {
					r := g.do(request{method: c.method, path: c.path, bearer: alice, body: c.body})
					if r.status != 400 || r.errCode() != "validation_error" || r.env.Error.Field != "meta" {
						t.Errorf("%s meta %.60s: %d %s", c.method, m, r.status, truncate(string(r.body), 200))
					}
				}
			}
			if after := g.countKeys("alice"); after != before {
				t.Errorf("invalid meta created keys: %d -> %d", before, after)
			}
			if _, ok := viewMap(t, g.do(request{method: "GET", path: "/v1/apikeys/" + nk.KeyID, bearer: alice}))["meta"]; ok {
				t.Errorf("an invalid patch set meta")
			}
			// The limits are inclusive: 3 levels, 4096 bytes.
			exact := `{"s":"` + strings.Repeat("x", 4096-8) + `"}`
			for _, m := range []string{`{"a":{"b":{"c":1}}}`, `{"a":[{"b":1}]}`, exact, `{}`} {
				if r := g.do(request{method: "POST", path: "/v1/apikeys", bearer: alice, body: `{"name":"ok","meta":` + m + `}`}); r.status != 201 {
					t.Errorf("meta %.60s: %d %s", m, r.status, truncate(string(r.body), 200))
				}
			}
			// meta null on create is no meta.
			if r := g.do(request{method: "POST", path: "/v1/apikeys", bearer: alice, body: `{"name":"null","meta":null}`}); r.status != 201 || viewMap(t, r)["meta"] != nil {
				t.Errorf("meta null on create: %d %s", r.status, r.body)
			}
		})
	}
}

// TestKeyMetaIdempotency: a retry whose meta lists the same members in
// another order is the same request; other meta is another request.
func TestKeyMetaIdempotency(t *testing.T) {
	g := startGateway(t, "file", "")
	alice := dashboardToken(t, "alice")
	idem := map[string]string{"Idempotency-Key": "meta-1"}
	first := g.do(request{method: "POST", path: "/v1/apikeys", bearer: alice, header: idem, body: `{"name":"m","meta":{"a":1,"b":{"x":1,"y":2}}}`})
	again := g.do(request{method: "POST", path: "/v1/apikeys", bearer: alice, header: idem, body: `{"meta":{"b":{"y":2,"x":1},"a":1},"name":"m"}`})
	if first.status != 201 || again.status != 201 || again.header.Get("Idempotent-Replayed") != "true" || string(first.env.Data) != string(again.env.Data) {
		t.Errorf("reordered meta: %d, then %d %s", first.status, again.status, again.body)
	}
	if r := g.do(request{method: "POST", path: "/v1/apikeys", bearer: alice, header: idem, body: `{"name":"m","meta":{"a":2}}`}); r.status != 422 {
		t.Errorf("other meta under the same Idempotency-Key: %d %s", r.status, r.body)
	}
	if r := g.do(request{method: "POST", path: "/v1/apikeys", bearer: alice, header: idem, body: `{"name":"m"}`}); r.status != 422 {
		t.Errorf("no meta under the same Idempotency-Key: %d %s", r.status, r.body)
	}
}

// TestCLIDisableEnable: `caddy apikeys disable|enable <key_id>` against
// the Redis store of a running Caddy, which refuses the key with 403
// key_disabled at once and accepts it again once enabled.
func TestCLIDisableEnable(t *testing.T) {
	rds := testredis.Start(t)
	port := testcaddy.FreePort(t)
	caddyfile := fmt.Sprintf(`{
	admin off
	persist_config off
}
http://127.0.0.1:%d {
	apikeys {
		store redis %s
		secret {env.APIKEYS_TEST_SECRET}
	}
	respond "ok" 200
}
`, port, rds.URL())
	proc := testcaddy.Start(t, caddyfile, []string{fmt.Sprintf("127.0.0.1:%d", port)}, "APIKEYS_TEST_SECRET="+testSecret)
	cfg := filepath.Join(proc.Dir(), "Caddyfile")
	base := fmt.Sprintf("http://127.0.0.1:%d", port)
	run := func(args ...string) (string, error) { t.Helper(); return runCLI(t, args...) }
	client := &http.Client{Timeout: 5 * time.Second}
	until := func(key string, want int) {
		t.Helper()
		deadline := time.Now().Add(3 * time.Second)
		for peerStatus(t, client, base, key) != want {
			if time.Now().After(deadline) {
				t.Fatalf("the running Caddy did not answer %d within 3s", want)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	out, err := run("create", "--config", cfg, "--owner", "ops", "--name", "cli key")
	if err != nil {
		t.Fatalf("create: %v\n%s", err, out)
	}
	var env struct{ Data createdKey }
	if err := json.Unmarshal([]byte(out), &env); err != nil {
		t.Fatalf("create output: %v\n%s", err, out)
	}
	k := env.Data
	until(k.Key, 200)

	out, err = run("disable", "--config", cfg, k.KeyID)
	var v struct {
		Owner   string `json:"owner"`
		Status  string `json:"status"`
		Enabled *bool  `json:"enabled"`
	}
	if err != nil || json.Unmarshal([]byte(out), &v) != nil || v.Owner != "ops" || v.Status != "disabled" || v.Enabled == nil || *v.Enabled {
		t.Fatalf("disable: %v\n%s", err, out)
	}
	until(k.Key, 403)
	out, err = run("enable", "--config", cfg, k.KeyID)
	if err != nil || json.Unmarshal([]byte(out), &v) != nil || v.Status != "active" || !*v.Enabled {
		t.Fatalf("enable: %v\n%s", err, out)
	}
	until(k.Key, 200)

	if out, err := run("disable", "--config", cfg, "key_aaaaaaaaaaaaaaaaaaaaaaaa"); err == nil || !strings.Contains(out, "no key") {
		t.Errorf("disable an unknown key: %v\n%s", err, out)
	}
	if out, err := run("revoke", "--config", cfg, k.KeyID); err != nil {
		t.Fatalf("revoke: %v\n%s", err, out)
	}
	if out, err := run("enable", "--config", cfg, k.KeyID); err == nil || !strings.Contains(out, "key_not_active") {
		t.Errorf("enable a revoked key: %v\n%s", err, out)
	}
	if out, err := run("disable", "--config", cfg); err == nil {
		t.Errorf("disable without a key ID: %s", out)
	}
}

// TestSecretScanningDisable: with `action disable`, a signed report
// suspends the leaked keys (403 key_disabled, status disabled, audited
// with reason leaked) instead of revoking them; the owner can enable a key
// again; a revoked key in a report stays revoked; a repeated report
// changes nothing.
func TestSecretScanningDisable(t *testing.T) {
	gh := newGHSigner(t)
	for _, kind := range storeKinds {
		t.Run(kind, func(t *testing.T) {
			ks := newGHKeys(t, gh)
			g := startGateway(t, kind, secretScanningConfig(ks.URL, "disable"))
			alice := dashboardToken(t, "alice")
			leaked := g.create("alice", `{"name":"leaked"}`)
			gone := g.create("alice", `{"name":"revoked before"}`)
			kept := g.create("alice", `{"name":"kept"}`)
			g.do(request{method: "DELETE", path: "/v1/apikeys/" + gone.KeyID, bearer: alice})
			url := "https://github.com/octo/repo/blob/abc/.env"
			body := reportBody(t, ghMatch{leaked.Key, "caddy_apikeys", url, "content"},
				ghMatch{gone.Key, "caddy_apikeys", url, "content"}, ghMatch{unknownKey(t), "caddy_apikeys", url, "content"})
			status, out := g.report(body, gh.id, gh.sign(t, body), nil)
			var fb []ghFeedback
			if status != 200 || json.Unmarshal(out, &fb) != nil || len(fb) != 3 ||
				fb[0].Label != "true_positive" || fb[1].Label != "true_positive" || fb[2].Label != "false_positive" {
				t.Fatalf("signed report: %d %s", status, out)
			}
			if r := g.do(request{method: "GET", path: "/v1/x", bearer: leaked.Key}); r.status != 403 || r.errCode() != "key_disabled" {
				t.Errorf("a leaked key after the report: %d %s", r.status, r.body)
			}
			if v, _ := g.view("alice", leaked.KeyID); v.Status != "disabled" || v.RevokedAt != nil {
				t.Errorf("the leaked key's view: %+v", v)
			}
			if v, _ := g.view("alice", gone.KeyID); v.Status != "revoked" {
				t.Errorf("a revoked key in the report is now %s", v.Status)
			}
			if r := g.do(request{method: "GET", path: "/v1/x", bearer: kept.Key}); r.status != 200 {
				t.Errorf("a key not in the report: %d", r.status)
			}
			// Again: nothing changes, still true positives.
			status, out = g.report(body, gh.id, gh.sign(t, body), nil)
			if status != 200 || !strings.Contains(string(out), "true_positive") {
				t.Fatalf("repeated report: %d %s", status, out)
			}
			// The owner checked the leak and enables the key again.
			if r := g.do(request{method: "PATCH", path: "/v1/apikeys/" + leaked.KeyID, bearer: alice, body: `{"enabled":true}`}); r.status != 200 {
				t.Fatalf("enable: %d %s", r.status, r.body)
			}
			if r := g.do(request{method: "GET", path: "/v1/x", bearer: leaked.Key}); r.status != 200 {
				t.Errorf("an enabled key: %d", r.status)
			}

			stopCaddy(t) // flushes the logs
			logs := string(g.readLogs())
			var actions []any
			disabled, revoked := 0, 0
			for _, l := range strings.Split(logs, "\n") {
				var m map[string]any
				if json.Unmarshal([]byte(l), &m) != nil || m["msg"] != "event" {
					continue
				}
				data, _ := m["data"].(map[string]any)
				switch m["name"] {
				case "apikeys.leaked":
					actions = append(actions, data["action"])
				case "apikeys.disabled":
					if data["key_id"] == leaked.KeyID && data["reason"] == "leaked" {
						disabled++
					}
				case "apikeys.revoked":
					revoked++
				}
			}
			// Reports: leaked disabled, gone untouched; then both untouched.
			want := []any{"disable", "none (already revoked)", "none (already disabled or ended)", "none (already revoked)"}
			slices.SortFunc(actions, func(a, b any) int { return strings.Compare(fmt.Sprint(a), fmt.Sprint(b)) })
			slices.SortFunc(want, func(a, b any) int { return strings.Compare(fmt.Sprint(a), fmt.Sprint(b)) })
			if !reflect.DeepEqual(actions, want) || disabled != 1 || revoked != 1 {
				t.Errorf("leak actions %v (want %v), %d disabled events (want 1), %d revoked (want 1, the DELETE)", actions, want, disabled, revoked)
			}
			for _, raw := range []string{leaked.Key, gone.Key} {
				if strings.Contains(logs, raw) {
					t.Errorf("a raw key reached the logs")
				}
			}
		})
	}
}

// TestKeyMetaRenamedHeader: identity_headers { meta … } renames the
// header; the client's copy of the new name is removed.
func TestKeyMetaRenamedHeader(t *testing.T) {
	g := startGateway(t, "file", "identity_headers {\n\t\t\tmeta X-Tenant-Meta\n\t\t}")
	k := g.create("alice", `{"name":"renamed","meta":{"tenant":"acme"}}`)
	plain := g.create("alice", `{"name":"plain"}`)
	g.do(request{method: "GET", path: "/v1/x", bearer: k.Key, header: map[string]string{"X-Tenant-Meta": `{"tenant":"evil"}`}})
	if h := g.backend.last(t); len(h.Values("X-Tenant-Meta")) != 1 || h.Get("X-Tenant-Meta") != `{"tenant":"acme"}` || h.Get("X-Api-Key-Meta") != "" {
		t.Errorf("renamed meta header: %q, default name %q", h.Values("X-Tenant-Meta"), h.Get("X-Api-Key-Meta"))
	}
	g.do(request{method: "GET", path: "/v1/x", bearer: plain.Key, header: map[string]string{"X-Tenant-Meta": `{"tenant":"evil"}`}})
	if h := g.backend.last(t); len(h.Values("X-Tenant-Meta")) != 0 {
		t.Errorf("a client's copy of the renamed header reached the backend: %q", h.Values("X-Tenant-Meta"))
	}
}
