package apikeys

import (
	"encoding/json"
	"fmt"
	"net/http"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
)

// keyViewT is a key as GET /v1/apikeys shows it.
type keyViewT struct {
	KeyID      string   `json:"key_id"`
	Name       string   `json:"name"`
	Prefix     string   `json:"prefix"`
	Scopes     []string `json:"scopes"`
	ExpiresAt  *string  `json:"expires_at"`
	CreatedAt  string   `json:"created_at"`
	LastUsedAt *string  `json:"last_used_at"`
	Status     string   `json:"status"`
	RevokedAt  *string  `json:"revoked_at"`
	Replaces   string   `json:"replaces"`
	ReplacedBy string   `json:"replaced_by"`
}

type listT struct {
	Keys       []keyViewT `json:"keys"`
	NextCursor *string    `json:"next_cursor"`
}

func (g *gateway) list(owner, query string) (listT, *response) {
	g.t.Helper()
	resp := g.do(request{method: "GET", path: "/v1/apikeys" + query, bearer: dashboardToken(g.t, owner)})
	var l listT
	if resp.status == 200 {
		if err := json.Unmarshal(resp.env.Data, &l); err != nil {
			g.t.Fatal(err)
		}
	}
	return l, resp
}

func (g *gateway) view(owner, id string) (keyViewT, *response) {
	g.t.Helper()
	resp := g.do(request{method: "GET", path: "/v1/apikeys/" + id, bearer: dashboardToken(g.t, owner)})
	var v keyViewT
	if resp.status == 200 {
		if err := json.Unmarshal(resp.env.Data, &v); err != nil {
			g.t.Fatal(err)
		}
	}
	return v, resp
}

// TestListAndGet: newest first, the documented fields and never the key,
// owner isolation, pagination and filters.
func TestListAndGet(t *testing.T) {
	for _, kind := range storeKinds {
		t.Run(kind, func(t *testing.T) {
			g := startGateway(t, kind, "")
			var made []createdKey
			for i := range 5 {
				made = append(made, g.create("alice", fmt.Sprintf(`{"name":"k%d","scopes":["analytics:read"],"expires_in_days":30}`, i)))
			}
			bobs := g.create("bob", `{"name":"bob's"}`)

			// Newest first; keys minted in the same millisecond by ID, descending.
			sort.Slice(made, func(i, j int) bool {
				if made[i].CreatedAt != made[j].CreatedAt {
					return made[i].CreatedAt < made[j].CreatedAt
				}
				return made[i].KeyID < made[j].KeyID
			})
			l, resp := g.list("alice", "")
			if resp.status != 200 || len(l.Keys) != 5 || l.NextCursor != nil {
				t.Fatalf("list: %d %s", resp.status, resp.body)
			}
			for i, v := range l.Keys {
				want := made[len(made)-1-i]
				if v.KeyID != want.KeyID || v.Name != want.Name || v.Prefix != want.Prefix || v.Status != "active" ||
					v.CreatedAt != want.CreatedAt || *v.ExpiresAt != *want.ExpiresAt || v.LastUsedAt != nil {
					t.Errorf("item %d = %+v, want %+v", i, v, want)
				}
			}
			for _, k := range made {
				if strings.Contains(string(resp.body), k.Key[12:]) {
					t.Fatal("the listing contains a raw key")
				}
			}
			if strings.Contains(string(resp.body), "digest") || strings.Contains(string(resp.body), bobs.KeyID) {
				t.Fatalf("the listing shows a digest or another owner's key: %s", resp.body)
			}
			wantMembers := "key_id,name,prefix,scopes,expires_at,created_at,last_used_at,status,enabled"
			var items []json.RawMessage
			var raw struct{ Keys []json.RawMessage }
			_ = json.Unmarshal(resp.env.Data, &raw)
			items = raw.Keys
			if got := strings.Join(memberOrder(t, items[0]), ","); got != wantMembers {
				t.Errorf("members %s, want %s", got, wantMembers)
			}

			// Pages of two: 2 + 2 + 1, no duplicates, no gaps.
			var seen []string
			cursor := ""
			for page := 0; ; page++ {
				q := "?limit=2"
				if cursor != "" {
					q += "&cursor=" + cursor
				}
				l, resp := g.list("alice", q)
				if resp.status != 200 {
					t.Fatalf("page %d: %d %s", page, resp.status, resp.body)
				}
				for _, v := range l.Keys {
					seen = append(seen, v.KeyID)
				}
				if l.NextCursor == nil {
					break
				}
				cursor = *l.NextCursor
			}
			if len(seen) != 5 || seen[0] != made[4].KeyID || seen[4] != made[0].KeyID {
				t.Errorf("paged ids %v", seen)
			}

			// Get: own key, another owner's, unknown, malformed.
			v, resp := g.view("alice", made[0].KeyID)
			if resp.status != 200 || v.KeyID != made[0].KeyID || v.Name != made[0].Name {
				t.Errorf("get own: %d %s", resp.status, resp.body)
			}
			for _, c := range []struct{ owner, id string }{{"bob", made[0].KeyID}, {"alice", bobs.KeyID}, {"alice", "key_aaaaaaaaaaaaaaaaaaaaaaaa"}, {"alice", "nope"}} {
				if _, resp := g.view(c.owner, c.id); resp.status != 404 || resp.errCode() != "not_found" {
					t.Errorf("get %s as %s: %d %s", c.id, c.owner, resp.status, resp.body)
				}
			}

			// Status filter.
			ctx, cancel := testCtx()
			defer cancel()
			if _, err := g.store.Revoke(ctx, made[2].KeyID, time.Now()); err != nil {
				t.Fatal(err)
			}
			l, _ = g.list("alice", "?status=revoked")
			if len(l.Keys) != 1 || l.Keys[0].KeyID != made[2].KeyID || l.Keys[0].Status != "revoked" || l.Keys[0].RevokedAt == nil {
				t.Errorf("status=revoked: %+v", l.Keys)
			}
			l, _ = g.list("alice", "?status=active&limit=3")
			if len(l.Keys) != 3 || l.NextCursor == nil {
				t.Fatalf("status=active&limit=3: %+v", l)
			}
			l2, _ := g.list("alice", "?status=active&limit=3&cursor="+*l.NextCursor)
			if len(l2.Keys) != 1 || l2.NextCursor != nil {
				t.Errorf("second filtered page: %+v", l2)
			}

			for _, q := range []string{"?limit=0", "?limit=101", "?limit=x", "?status=gone", "?cursor=!!!", "?cursor=bm90LWEtY3Vyc29y"} {
				if _, resp := g.list("alice", q); resp.status != 400 || resp.errCode() != "validation_error" {
					t.Errorf("%s: %d %s", q, resp.status, resp.body)
				}
			}
		})
	}
}

// TestListStableUnderConcurrentInserts pages through 60 keys while another
// goroutine keeps minting: every key that existed at the start is seen
// exactly once.
func TestListStableUnderConcurrentInserts(t *testing.T) {
	for _, kind := range storeKinds {
		t.Run(kind, func(t *testing.T) {
			g := startGateway(t, kind, "")
			existing := map[string]bool{}
			for i := range 60 {
				existing[g.create("dave", fmt.Sprintf(`{"name":"k%d"}`, i)).KeyID] = true
			}
			stop := make(chan struct{})
			var wg sync.WaitGroup
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := 0; ; i++ {
					select {
					case <-stop:
						return
					default:
					}
					resp := g.do(request{method: "POST", path: "/v1/apikeys", bearer: dashboardToken(t, "dave"), body: `{"name":"late"}`})
					if resp.status != 201 {
						t.Errorf("concurrent create: %d", resp.status)
						return
					}
				}
			}()
			seen := map[string]int{}
			cursor := ""
			for {
				q := "?limit=7"
				if cursor != "" {
					q += "&cursor=" + cursor
				}
				l, resp := g.list("dave", q)
				if resp.status != 200 {
					t.Fatalf("%d %s", resp.status, resp.body)
				}
				for _, v := range l.Keys {
					seen[v.KeyID]++
				}
				if l.NextCursor == nil {
					break
				}
				cursor = *l.NextCursor
			}
			close(stop)
			wg.Wait()
			for id := range existing {
				if seen[id] != 1 {
					t.Errorf("key %s seen %d times", id, seen[id])
				}
			}
			for id, n := range seen {
				if n != 1 {
					t.Errorf("key %s seen %d times", id, n)
				}
			}
		})
	}
}

// TestPatch: new name and scopes, validated like create, enforced on the
// very next request.
func TestPatch(t *testing.T) {
	for _, kind := range storeKinds {
		t.Run(kind, func(t *testing.T) {
			g := startGateway(t, kind, "")
			alice := dashboardToken(t, "alice")
			k := g.create("alice", `{"name":"reader","scopes":["analytics:read"]}`)
			patch := func(token, id, body string) *response {
				return g.do(request{method: "PATCH", path: "/v1/apikeys/" + id, bearer: token, body: body})
			}
			if r := g.do(request{method: "POST", path: "/v1/webhooks/1", bearer: k.Key}); r.status != 403 {
				t.Fatalf("before patch: %d", r.status)
			}
			resp := patch(alice, k.KeyID, `{"name":"hooks","scopes":["webhooks:manage"]}`)
			if resp.status != 200 {
				t.Fatalf("patch: %d %s", resp.status, resp.body)
			}
			var v keyViewT
			_ = json.Unmarshal(resp.env.Data, &v)
			if v.Name != "hooks" || strings.Join(v.Scopes, ",") != "webhooks:manage" || v.KeyID != k.KeyID {
				t.Errorf("patched view %+v", v)
			}
			if r := g.do(request{method: "POST", path: "/v1/webhooks/1", bearer: k.Key}); r.status != 200 {
				t.Errorf("new scope not enforced on the next request: %d", r.status)
			}
			if r := g.do(request{method: "GET", path: "/v1/analytics", bearer: k.Key}); r.status != 403 {
				t.Errorf("old scope still works: %d", r.status)
			}
			// Name only keeps scopes; scopes null makes it full access.
			if resp := patch(alice, k.KeyID, `{"name":"renamed"}`); resp.status != 200 || !strings.Contains(string(resp.env.Data), `"scopes":["webhooks:manage"]`) {
				t.Errorf("name-only patch: %s", resp.body)
			}
			if resp := patch(alice, k.KeyID, `{"scopes":null}`); resp.status != 200 || !strings.Contains(string(resp.env.Data), `"scopes":null`) {
				t.Errorf("scopes null: %s", resp.body)
			}
			if r := g.do(request{method: "GET", path: "/v1/anything", bearer: k.Key}); r.status != 200 {
				t.Errorf("full access after patch: %d", r.status)
			}

			before, _ := g.view("alice", k.KeyID)
			for _, c := range []struct {
				name, token, id, body string
				status                int
				code                  string
			}{
				{"empty", alice, k.KeyID, `{}`, 400, "validation_error"},
				{"bad name", alice, k.KeyID, `{"name":""}`, 400, "validation_error"},
				{"bad scopes", alice, k.KeyID, `{"scopes":[]}`, 400, "validation_error"},
				{"unknown scope", alice, k.KeyID, `{"scopes":["root"]}`, 400, "unknown_scope"},
				{"unknown field", alice, k.KeyID, `{"expires_in_days":3}`, 400, "validation_error"},
				{"other owner", dashboardToken(t, "bob"), k.KeyID, `{"name":"mine"}`, 404, "not_found"},
				{"unknown id", alice, "key_aaaaaaaaaaaaaaaaaaaaaaaa", `{"name":"x"}`, 404, "not_found"},
				{"api key caller", k.Key, k.KeyID, `{"name":"x"}`, 403, "api_key_not_allowed"},
			} {
				if resp := patch(c.token, c.id, c.body); resp.status != c.status || resp.errCode() != c.code {
					t.Errorf("%s: %d %s", c.name, resp.status, resp.body)
				}
			}
			if after, _ := g.view("alice", k.KeyID); after.Name != before.Name || strings.Join(after.Scopes, ",") != strings.Join(before.Scopes, ",") {
				t.Errorf("refused patches changed the key: %+v -> %+v", before, after)
			}
			g.do(request{method: "DELETE", path: "/v1/apikeys/" + k.KeyID, bearer: alice})
			if resp := patch(alice, k.KeyID, `{"name":"zombie"}`); resp.status != 409 || resp.errCode() != "key_not_active" {
				t.Errorf("patch revoked: %d %s", resp.status, resp.body)
			}
		})
	}
}

// TestRevoke: DELETE returns the revoked record, the key fails on the next
// request, a second DELETE answers the same record, owners are isolated.
func TestRevoke(t *testing.T) {
	for _, kind := range storeKinds {
		t.Run(kind, func(t *testing.T) {
			g := startGateway(t, kind, "")
			alice := dashboardToken(t, "alice")
			k := g.create("alice", `{"name":"doomed"}`)
			if r := g.do(request{method: "GET", path: "/v1/x", bearer: k.Key}); r.status != 200 {
				t.Fatalf("before revoke: %d", r.status)
			}
			if resp := g.do(request{method: "DELETE", path: "/v1/apikeys/" + k.KeyID, bearer: dashboardToken(t, "bob")}); resp.status != 404 {
				t.Errorf("bob revoked alice's key: %d", resp.status)
			}
			if r := g.do(request{method: "GET", path: "/v1/x", bearer: k.Key}); r.status != 200 {
				t.Fatalf("bob's attempt changed the key: %d", r.status)
			}
			resp := g.do(request{method: "DELETE", path: "/v1/apikeys/" + k.KeyID, bearer: alice})
			var v keyViewT
			_ = json.Unmarshal(resp.env.Data, &v)
			if resp.status != 200 || v.Status != "revoked" || v.RevokedAt == nil || !timePattern.MatchString(*v.RevokedAt) {
				t.Fatalf("revoke: %d %s", resp.status, resp.body)
			}
			if r := g.do(request{method: "GET", path: "/v1/x", bearer: k.Key}); r.status != 401 || r.errCode() != "invalid_api_key" {
				t.Errorf("revoked key on the next request: %d", r.status)
			}
			again := g.do(request{method: "DELETE", path: "/v1/apikeys/" + k.KeyID, bearer: alice})
			if again.status != 200 || string(again.env.Data) != string(resp.env.Data) {
				t.Errorf("second revoke: %d %s", again.status, again.body)
			}
			if r := g.do(request{method: "DELETE", path: "/v1/apikeys/" + k.KeyID, bearer: k.Key}); r.status != 403 {
				t.Errorf("api key revoking: %d", r.status)
			}
		})
	}
}

// TestRotate: a new key with the same name, scopes and expiry; the old one
// works inside the grace period and fails after it (clock moved, not slept).
func TestRotate(t *testing.T) {
	for _, kind := range storeKinds {
		t.Run(kind, func(t *testing.T) {
			advance := setClock(t)
			g := startGateway(t, kind, "")
			alice := dashboardToken(t, "alice")
			old := g.create("alice", `{"name":"svc","scopes":["analytics:read"],"expires_in_days":30}`)
			rotate := func(token, id, body string, hdr map[string]string) *response {
				return g.do(request{method: "POST", path: "/v1/apikeys/" + id + "/rotate", bearer: token, body: body, header: hdr})
			}
			resp := rotate(alice, old.KeyID, `{"grace_period_seconds":3600}`, idem("rot-1"))
			if resp.status != 201 || resp.header.Get("Cache-Control") != "no-store" {
				t.Fatalf("rotate: %d %s", resp.status, resp.body)
			}
			var nk struct {
				createdKey
				Replaces          string `json:"replaces"`
				GracePeriodEndsAt string `json:"grace_period_ends_at"`
			}
			_ = json.Unmarshal(resp.env.Data, &nk)
			if nk.Replaces != old.KeyID || nk.Name != "svc" || strings.Join(nk.Scopes, ",") != "analytics:read" ||
				*nk.ExpiresAt != *old.ExpiresAt || nk.KeyID == old.KeyID || !keyPattern.MatchString(nk.Key) {
				t.Fatalf("rotated key %+v", nk)
			}
			created, _ := time.Parse(time.RFC3339, nk.CreatedAt)
			graceEnd, _ := time.Parse(time.RFC3339, nk.GracePeriodEndsAt)
			if d := graceEnd.Sub(created); d != time.Hour {
				t.Errorf("grace period ends %v after creation, want 1h", d)
			}
			if again := rotate(alice, old.KeyID, `{"grace_period_seconds":3600}`, idem("rot-1")); again.status != 201 ||
				again.header.Get("Idempotent-Replayed") != "true" || string(again.body) != string(resp.body) {
				t.Errorf("idempotent rotate replay: %d %s", again.status, again.body)
			}
			v, _ := g.view("alice", old.KeyID)
			if v.Status != "rotating" || v.ReplacedBy != nk.KeyID {
				t.Errorf("old key view %+v", v)
			}
			for _, key := range []string{old.Key, nk.Key} {
				if r := g.do(request{method: "GET", path: "/v1/analytics", bearer: key}); r.status != 200 {
					t.Errorf("inside grace: %d", r.status)
				}
			}
			if r := rotate(alice, old.KeyID, "", nil); r.status != 409 || r.errCode() != "key_already_rotated" {
				t.Errorf("rotating a rotated key: %d %s", r.status, r.body)
			}
			advance(time.Hour + time.Second)
			if r := g.do(request{method: "GET", path: "/v1/analytics", bearer: old.Key}); r.status != 401 {
				t.Errorf("old key after grace: %d", r.status)
			}
			if r := g.do(request{method: "GET", path: "/v1/analytics", bearer: nk.Key}); r.status != 200 {
				t.Errorf("new key after grace: %d", r.status)
			}
			if v, _ := g.view("alice", old.KeyID); v.Status != "expired" {
				t.Errorf("old key after grace is %q", v.Status)
			}

			// No body: the default grace of 24 h. Zero: the old key stops now.
			k2 := g.create("alice", `{"name":"two"}`)
			r := rotate(alice, k2.KeyID, "", nil)
			if r.status != 201 || !strings.Contains(string(r.env.Data), `"grace_period_ends_at"`) {
				t.Fatalf("rotate without body: %d %s", r.status, r.body)
			}
			k3 := g.create("alice", `{"name":"three"}`)
			if r := rotate(alice, k3.KeyID, `{"grace_period_seconds":0}`, nil); r.status != 201 {
				t.Fatalf("grace 0: %d %s", r.status, r.body)
			}
			if r := g.do(request{method: "GET", path: "/v1/x", bearer: k3.Key}); r.status != 401 {
				t.Errorf("grace 0 left the old key working: %d", r.status)
			}

			n := g.countKeys("alice")
			for _, c := range []struct {
				name, token, id, body string
				status                int
				code                  string
			}{
				{"grace too long", alice, k2.KeyID, `{"grace_period_seconds":2592001}`, 400, "validation_error"},
				{"grace negative", alice, k2.KeyID, `{"grace_period_seconds":-1}`, 400, "validation_error"},
				{"unknown field", alice, k2.KeyID, `{"grace":1}`, 400, "validation_error"},
				{"other owner", dashboardToken(t, "bob"), k2.KeyID, "", 404, "not_found"},
				{"revoked", alice, old.KeyID, "", 409, "key_not_active"},
				{"api key caller", nk.Key, nk.KeyID, "", 403, "api_key_not_allowed"},
			} {
				if resp := rotate(c.token, c.id, c.body, nil); resp.status != c.status || resp.errCode() != c.code {
					t.Errorf("%s: %d %s", c.name, resp.status, resp.body)
				}
			}
			if g.countKeys("alice") != n {
				t.Error("refused rotations minted keys")
			}
		})
	}
}

// TestScopesClaimCapsGrants: a session may grant only the scopes its
// scopes claim lists.
func TestScopesClaimCapsGrants(t *testing.T) {
	g := startGateway(t, "file", "", "scopes_claim grants")
	token := func(grants any) string {
		return signToken(t, jwtHS256, []byte(testJWTSecret), map[string]any{"sub": "erin", "iss": testIssuer, "aud": testAudience,
			"exp": time.Now().Add(time.Hour).Unix(), "grants": grants})
	}
	limited := token([]string{"analytics:read"})
	post := func(tok, body string) *response {
		return g.do(request{method: "POST", path: "/v1/apikeys", bearer: tok, body: body})
	}
	if r := post(limited, `{"name":"a","scopes":["analytics:read"]}`); r.status != 201 {
		t.Fatalf("grantable scope: %d %s", r.status, r.body)
	}
	for _, body := range []string{`{"name":"a","scopes":["webhooks:manage"]}`, `{"name":"full"}`} {
		if r := post(limited, body); r.status != 403 || r.errCode() != "scope_not_grantable" {
			t.Errorf("%s: %d %s", body, r.status, r.body)
		}
	}
	if r := post(token("analytics:read webhooks:manage"), `{"name":"a","scopes":["webhooks:manage"]}`); r.status != 201 {
		t.Errorf("space-separated claim: %d %s", r.status, r.body)
	}
	if r := post(token([]string{"*"}), `{"name":"full"}`); r.status != 201 {
		t.Errorf("wildcard grant: %d %s", r.status, r.body)
	}
	// A session without the claim may grant nothing.
	if r := post(dashboardToken(t, "erin"), `{"name":"a","scopes":["analytics:read"]}`); r.status != 403 || r.errCode() != "scope_not_grantable" {
		t.Errorf("no grants claim: %d %s", r.status, r.body)
	}
}

// TestKeyLimit: creating past max_keys_per_owner is refused.
func TestKeyLimit(t *testing.T) {
	g := startGateway(t, "redis", "max_keys_per_owner 3")
	for range 3 {
		g.create("frank", `{"name":"k"}`)
	}
	r := g.do(request{method: "POST", path: "/v1/apikeys", bearer: dashboardToken(t, "frank"), body: `{"name":"k"}`})
	if r.status != 409 || r.errCode() != "key_limit_reached" {
		t.Fatalf("fourth key: %d %s", r.status, r.body)
	}
	if g.countKeys("frank") != 3 {
		t.Error("the refused create stored a key")
	}
	g.create("grace", `{"name":"other owner"}`)
	// Revoked keys stop counting.
	l, _ := g.list("frank", "")
	if r := g.do(request{method: "DELETE", path: "/v1/apikeys/" + l.Keys[0].KeyID, bearer: dashboardToken(t, "frank")}); r.status != 200 {
		t.Fatalf("revoke: %d", r.status)
	}
	g.create("frank", `{"name":"after a revoke"}`)
}

// TestCORS: preflights are answered without credentials, only listed
// origins get CORS headers.
func TestCORS(t *testing.T) {
	g := startGateway(t, "file", "cors_origins https://dash.example.com")
	pre := func(origin string) *response {
		return g.do(request{method: "OPTIONS", path: "/v1/apikeys", header: map[string]string{
			"Origin": origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}})
	}
	r := pre("https://dash.example.com")
	if r.status != 204 || r.header.Get("Access-Control-Allow-Origin") != "https://dash.example.com" ||
		!strings.Contains(r.header.Get("Access-Control-Allow-Headers"), "Authorization") {
		t.Fatalf("preflight: %d %v", r.status, r.header)
	}
	if r := pre("https://evil.example.com"); r.status != 204 || r.header.Get("Access-Control-Allow-Origin") != "" {
		t.Errorf("unlisted origin: %d %v", r.status, r.header)
	}
	if r := g.do(request{method: "OPTIONS", path: "/v1/apikeys/key_aaaaaaaaaaaaaaaaaaaaaaaa/rotate", header: map[string]string{"Origin": "https://dash.example.com", "Access-Control-Request-Method": "POST"}}); r.status != 204 {
		t.Errorf("preflight on a key path: %d", r.status)
	}
	actual := g.do(request{method: "GET", path: "/v1/apikeys", bearer: dashboardToken(t, "alice"), header: map[string]string{"Origin": "https://dash.example.com"}})
	if actual.status != 200 || actual.header.Get("Access-Control-Allow-Origin") != "https://dash.example.com" {
		t.Errorf("actual response: %d %v", actual.status, actual.header)
	}
}

// TestLastUsed: last_used_at appears after the coalescing interval, from
// the uses the cache collects, and with the cache off from those the guard
// records itself.
func TestLastUsed(t *testing.T) {
	for _, kind := range []string{"file", "redis", "cluster", "redis/cache-off"} {
		t.Run(kind, func(t *testing.T) {
			block := "last_used_interval 100ms"
			if k, ok := strings.CutSuffix(kind, "/cache-off"); ok {
				kind, block = k, block+"\n\t\tcache off"
			}
			g := startGateway(t, kind, block)
			k := g.create("alice", `{"name":"used"}`)
			if v, _ := g.view("alice", k.KeyID); v.LastUsedAt != nil {
				t.Fatal("a fresh key has last_used_at")
			}
			before := time.Now().Add(-time.Second)
			for range 20 {
				g.do(request{method: "GET", path: "/v1/x", bearer: k.Key})
			}
			deadline := time.Now().Add(3 * time.Second)
			for {
				v, _ := g.view("alice", k.KeyID)
				if v.LastUsedAt != nil {
					at, _ := time.Parse(time.RFC3339, *v.LastUsedAt)
					if at.Before(before) || at.After(time.Now().Add(time.Second)) {
						t.Errorf("last_used_at %v", at)
					}
					break
				}
				if time.Now().After(deadline) {
					t.Fatal("last_used_at never appeared")
				}
				time.Sleep(50 * time.Millisecond)
			}
		})
	}
}

var jwtHS256 = jwt.SigningMethodHS256

var _ = http.StatusOK

// TestAuditLogAndEvents: create, update, rotate and revoke are logged at
// Info with action, key_id and owner, and emitted as Caddy events
// (apikeys.<action>) that the events app delivers (it logs each at Debug).
func TestAuditLogAndEvents(t *testing.T) {
	g := startGateway(t, "file", "")
	alice := dashboardToken(t, "alice")
	k := g.create("alice", `{"name":"audited"}`)
	g.do(request{method: "PATCH", path: "/v1/apikeys/" + k.KeyID, bearer: alice, body: `{"name":"renamed"}`})
	rot := g.do(request{method: "POST", path: "/v1/apikeys/" + k.KeyID + "/rotate", bearer: alice})
	var nk createdKey
	_ = json.Unmarshal(rot.env.Data, &nk)
	g.do(request{method: "DELETE", path: "/v1/apikeys/" + nk.KeyID, bearer: alice})
	stopCaddy(t)

	var infos, events []map[string]any
	for _, l := range strings.Split(string(g.readLogs()), "\n") {
		var m map[string]any
		if json.Unmarshal([]byte(l), &m) != nil {
			continue
		}
		if m["logger"] == "http.handlers.apikeys" && m["level"] == "info" && m["action"] != nil {
			infos = append(infos, m)
		}
		if m["msg"] == "event" && strings.HasPrefix(fmt.Sprint(m["name"]), "apikeys.") {
			events = append(events, m)
		}
	}
	want := []struct{ action, id string }{{"created", k.KeyID}, {"updated", k.KeyID}, {"rotated", k.KeyID}, {"created", nk.KeyID}, {"revoked", nk.KeyID}}
	if len(infos) != len(want) || len(events) != len(want) {
		t.Fatalf("%d audit lines and %d events, want %d each:\n%v\n%v", len(infos), len(events), len(want), infos, events)
	}
	for i, w := range want {
		if infos[i]["action"] != w.action || infos[i]["key_id"] != w.id || infos[i]["owner"] != "alice" {
			t.Errorf("audit line %d = %v, want %s of %s", i, infos[i], w.action, w.id)
		}
		data, _ := events[i]["data"].(map[string]any)
		if events[i]["name"] != "apikeys."+w.action || data["key_id"] != w.id || data["owner"] != "alice" {
			t.Errorf("event %d = %v, want apikeys.%s of %s", i, events[i], w.action, w.id)
		}
	}
	if !strings.Contains(fmt.Sprint(infos[2]), nk.KeyID) {
		t.Errorf("the rotation line does not name the new key: %v", infos[2])
	}
}

// TestRetention: revoked and expired keys stay listed (as revoked /
// expired) for the retention period, then disappear from listings.
func TestRetention(t *testing.T) {
	testStoreBlock = "retention 1s"
	t.Cleanup(func() { testStoreBlock = "" })
	g := startGateway(t, "redis", "")
	alice := dashboardToken(t, "alice")
	keep := g.create("alice", `{"name":"keep"}`)
	gone := g.create("alice", `{"name":"gone"}`)
	g.do(request{method: "DELETE", path: "/v1/apikeys/" + gone.KeyID, bearer: alice})
	l, _ := g.list("alice", "?status=revoked")
	if len(l.Keys) != 1 || l.Keys[0].KeyID != gone.KeyID {
		t.Fatalf("revoked key not listed as revoked: %+v", l.Keys)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		l, _ = g.list("alice", "")
		if len(l.Keys) == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("revoked key still listed after retention: %+v", l.Keys)
		}
		time.Sleep(200 * time.Millisecond)
	}
	if l.Keys[0].KeyID != keep.KeyID {
		t.Errorf("the active key was removed: %+v", l.Keys)
	}
	if _, resp := g.view("alice", gone.KeyID); resp.status != 404 {
		t.Errorf("GET of a cleaned-up key: %d", resp.status)
	}
}

// TestSecretRotation: with `secret {new} {old}`, keys minted under the old
// secret keep validating and old idempotent replays still open, while new
// keys use the new secret only; dropping the old secret retires its keys.
func TestSecretRotation(t *testing.T) {
	t.Setenv("APIKEYS_TEST_SECRET_NEW", "rotated-store-secret-0123456789abcdef0123456789")
	for _, kind := range []string{"file", "redis"} {
		t.Run(kind, func(t *testing.T) {
			g := startGateway(t, kind, "")
			alice := dashboardToken(t, "alice")
			old := g.create("alice", `{"name":"old"}`)
			first := g.do(request{method: "POST", path: "/v1/apikeys", bearer: alice, body: `{"name":"idem"}`, header: idem("before-rotation")})
			if first.status != 201 {
				t.Fatalf("idempotent create: %d", first.status)
			}

			g.secretLine = "secret {env.APIKEYS_TEST_SECRET_NEW} {env.APIKEYS_TEST_SECRET}"
			if err := g.load(""); err != nil {
				t.Fatal(err)
			}
			if r := g.do(request{method: "GET", path: "/v1/x", bearer: old.Key}); r.status != 200 {
				t.Fatalf("key minted under the previous secret: %d %s", r.status, r.body)
			}
			replay := g.do(request{method: "POST", path: "/v1/apikeys", bearer: alice, body: `{"name":"idem"}`, header: idem("before-rotation")})
			if replay.status != 201 || replay.header.Get("Idempotent-Replayed") != "true" || string(replay.body) != string(first.body) {
				t.Fatalf("replay sealed under the previous secret: %d %s", replay.status, replay.body)
			}
			fresh := g.create("alice", `{"name":"new"}`)
			if r := g.do(request{method: "GET", path: "/v1/x", bearer: fresh.Key}); r.status != 200 {
				t.Fatalf("key minted under the new secret: %d", r.status)
			}
			g.secretLine = "secret {env.APIKEYS_TEST_SECRET_NEW}"
			if err := g.load(""); err != nil {
				t.Fatal(err)
			}
			if r := g.do(request{method: "GET", path: "/v1/x", bearer: fresh.Key}); r.status != 200 {
				t.Errorf("new key after the old secret is dropped: %d", r.status)
			}
			if r := g.do(request{method: "GET", path: "/v1/x", bearer: old.Key}); r.status != 401 {
				t.Errorf("old-secret key after the old secret is dropped: %d", r.status)
			}
		})
	}
}
