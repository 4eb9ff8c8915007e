package apikeys

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/getkin/kin-openapi/openapi3"
	"github.com/getkin/kin-openapi/openapi3filter"
	"github.com/getkin/kin-openapi/routers"
	"github.com/getkin/kin-openapi/routers/gorillamux"
)

// TestOpenAPIMatchesResponses validates real responses of every operation
// and error against openapi.yaml, so the document cannot drift from what
// the handler does. Undocumented statuses fail too.
func TestOpenAPIMatchesResponses(t *testing.T) {
	loader := openapi3.NewLoader()
	doc, err := loader.LoadFromFile("openapi.yaml")
	if err != nil {
		t.Fatalf("loading openapi.yaml: %v", err)
	}
	if err := doc.Validate(context.Background()); err != nil {
		t.Fatalf("openapi.yaml is not a valid document: %v", err)
	}
	if !doc.IsOpenAPI31OrLater() {
		t.Fatal("openapi.yaml must be OpenAPI 3.1")
	}

	for _, kind := range storeKinds {
		t.Run(kind, func(t *testing.T) {
			extra := "max_keys_per_owner 7\ncors_origins https://dash.example.com"
			planned := slices.Contains(planKinds(), kind)
			if planned {
				extra += testPlans
			}
			g := startGateway(t, kind, extra)
			doc.Servers = openapi3.Servers{{URL: g.base}}
			router, err := gorillamux.NewRouter(doc)
			if err != nil {
				t.Fatal(err)
			}
			alice := dashboardToken(t, "alice")
			seen := map[string]bool{}
			check := func(req request) *response {
				t.Helper()
				resp := g.do(req)
				validateAgainst(t, router, g.base, req, resp)
				seen[req.method+" "+routeName(req.path)+" "+http.StatusText(resp.status)] = true
				return resp
			}
			k := g.create("alice", `{"name":"spec","scopes":["analytics:read"],"expires_in_days":10}`)
			full := g.create("alice", `{"name":"full"}`)
			g.do(request{method: "GET", path: "/v1/x", bearer: full.Key}) // some last_used_at

			// Create and its errors.
			check(request{method: "POST", path: "/v1/apikeys", bearer: alice, body: `{"name":"a","scopes":["analytics:read"],"expires_in_days":5}`, header: idem("spec-1")})
			check(request{method: "POST", path: "/v1/apikeys", bearer: alice, body: `{"name":"a","scopes":["analytics:read"],"expires_in_days":5}`, header: idem("spec-1")})
			check(request{method: "POST", path: "/v1/apikeys", bearer: alice, body: `{"name":"b"}`, header: idem("spec-1")})
			check(request{method: "POST", path: "/v1/apikeys", body: `{"name":"a"}`})
			check(request{method: "POST", path: "/v1/apikeys", bearer: "garbage", body: `{"name":"a"}`})
			check(request{method: "POST", path: "/v1/apikeys", bearer: k.Key, body: `{"name":"a"}`})
			check(request{method: "POST", path: "/v1/apikeys", bearer: alice, body: `{"name":""}`})
			check(request{method: "POST", path: "/v1/apikeys", bearer: alice, body: `{"name":"a","scopes":["nope"]}`})
			check(request{method: "POST", path: "/v1/apikeys", bearer: alice, body: `{`, contentType: "text/plain"})
			check(request{method: "POST", path: "/v1/apikeys", bearer: alice, body: `{"name":"` + strings.Repeat("x", 70000) + `"}`})
			check(request{method: "PUT", path: "/v1/apikeys", bearer: alice})

			if planned {
				// Plans: create, patch, rotate, views with usage, the
				// usage endpoint, and the guard's 429s.
				pk := check(request{method: "POST", path: "/v1/apikeys", bearer: alice, body: `{"name":"p","plan":"daily"}`})
				var planKey createdKey
				_ = json.Unmarshal(pk.env.Data, &planKey)
				check(request{method: "POST", path: "/v1/apikeys", bearer: alice, body: `{"name":"p","plan":"gold"}`})
				g.hit(planKey.Key, 4)
				checkLimited(t, doc, g.do(request{method: "GET", path: "/v1/x", bearer: planKey.Key}), "quota_exceeded")
				check(request{method: "GET", path: "/v1/apikeys/" + planKey.KeyID, bearer: alice})
				check(request{method: "GET", path: "/v1/apikeys/" + planKey.KeyID + "/usage?days=3", bearer: alice})
				check(request{method: "GET", path: "/v1/apikeys/" + planKey.KeyID + "/usage?days=0", bearer: alice})
				check(request{method: "GET", path: "/v1/apikeys/" + planKey.KeyID + "/usage", bearer: dashboardToken(t, "bob")})
				check(request{method: "PATCH", path: "/v1/apikeys/" + planKey.KeyID, bearer: alice, body: `{"plan":"both"}`})
				check(request{method: "GET", path: "/v1/apikeys?limit=3", bearer: alice})
				check(request{method: "PATCH", path: "/v1/apikeys/" + planKey.KeyID, bearer: alice, body: `{"plan":"burst"}`})
				g.hit(planKey.Key, 6)
				checkLimited(t, doc, g.do(request{method: "GET", path: "/v1/x", bearer: planKey.Key}), "rate_limited")
				check(request{method: "PATCH", path: "/v1/apikeys/" + planKey.KeyID, bearer: alice, body: `{"plan":null}`})
				check(request{method: "POST", path: "/v1/apikeys/" + planKey.KeyID + "/rotate", bearer: alice, body: `{"plan":"daily"}`})
				for _, want := range []string{"GET /v1/apikeys/{key_id}/usage OK", "GET /v1/apikeys/{key_id}/usage Bad Request", "GET /v1/apikeys/{key_id}/usage Not Found"} {
					if !seen[want] {
						t.Errorf("no response seen for %s", want)
					}
				}
			}

			// List, get, patch, revoke, rotate.
			check(request{method: "GET", path: "/v1/apikeys?limit=2", bearer: alice})
			check(request{method: "GET", path: "/v1/apikeys?status=active", bearer: alice})
			check(request{method: "GET", path: "/v1/apikeys?limit=0", bearer: alice})
			check(request{method: "GET", path: "/v1/apikeys/" + k.KeyID, bearer: alice})
			check(request{method: "GET", path: "/v1/apikeys/" + k.KeyID, bearer: dashboardToken(t, "bob")})
			// A path that is not canonical: refused before routing.
			if resp := check(request{method: "GET", path: "/v1/apikeys/%2e%2e", bearer: alice}); resp.errCode() != "non_canonical_path" {
				t.Errorf("GET /v1/apikeys/%%2e%%2e: %d %q, want non_canonical_path", resp.status, resp.errCode())
			}
			check(request{method: "PATCH", path: "/v1/apikeys/" + k.KeyID, bearer: alice, body: `{"name":"renamed","scopes":null}`})
			check(request{method: "PATCH", path: "/v1/apikeys/" + k.KeyID, bearer: alice, body: `{}`})
			// Metadata and disable/enable.
			mk := check(request{method: "POST", path: "/v1/apikeys", bearer: alice, body: `{"name":"m","meta":{"plan":"pro","n":1,"org":{"id":"ü"}}}`})
			var metaKey createdKey
			_ = json.Unmarshal(mk.env.Data, &metaKey)
			check(request{method: "POST", path: "/v1/apikeys", bearer: alice, body: `{"name":"m","meta":[1]}`})
			check(request{method: "PATCH", path: "/v1/apikeys/" + metaKey.KeyID, bearer: alice, body: `{"enabled":false,"meta":{"plan":"free"}}`})
			check(request{method: "PATCH", path: "/v1/apikeys/" + metaKey.KeyID, bearer: alice, body: `{"enabled":"no"}`})
			check(request{method: "GET", path: "/v1/apikeys?status=disabled", bearer: alice})
			check(request{method: "GET", path: "/v1/apikeys/" + metaKey.KeyID, bearer: alice})
			if r := check(request{method: "POST", path: "/v1/apikeys/" + metaKey.KeyID + "/rotate", bearer: alice}); r.errCode() != "key_not_active" {
				t.Errorf("rotate a disabled key: %d %s", r.status, r.body)
			}
			check(request{method: "PATCH", path: "/v1/apikeys/" + metaKey.KeyID, bearer: alice, body: `{"enabled":true,"meta":null}`})
			rot := check(request{method: "POST", path: "/v1/apikeys/" + full.KeyID + "/rotate", bearer: alice, body: `{"grace_period_seconds":60}`})
			if rot.status != 201 {
				t.Fatalf("rotate: %d %s", rot.status, rot.body)
			}
			check(request{method: "POST", path: "/v1/apikeys/" + full.KeyID + "/rotate", bearer: alice})
			check(request{method: "GET", path: "/v1/apikeys/" + full.KeyID, bearer: alice})
			check(request{method: "DELETE", path: "/v1/apikeys/" + k.KeyID, bearer: alice})
			check(request{method: "DELETE", path: "/v1/apikeys/" + k.KeyID, bearer: alice})
			check(request{method: "PATCH", path: "/v1/apikeys/" + k.KeyID, bearer: alice, body: `{"name":"x"}`})
			// A replay whose key was revoked since.
			gone := check(request{method: "POST", path: "/v1/apikeys", bearer: alice, body: `{"name":"gone"}`, header: idem("spec-gone")})
			var goneKey createdKey
			_ = json.Unmarshal(gone.env.Data, &goneKey)
			check(request{method: "DELETE", path: "/v1/apikeys/" + goneKey.KeyID, bearer: alice})
			if r := check(request{method: "POST", path: "/v1/apikeys", bearer: alice, body: `{"name":"gone"}`, header: idem("spec-gone")}); r.errCode() != "idempotency_replay_unavailable" {
				t.Errorf("replay of a revoked key: %d %s", r.status, r.body)
			}
			for i := 0; i < 10; i++ {
				if r := check(request{method: "POST", path: "/v1/apikeys", bearer: alice, body: `{"name":"fill"}`}); r.status == 409 {
					break
				}
			}
			check(request{method: "OPTIONS", path: "/v1/apikeys", header: map[string]string{"Origin": "https://dash.example.com", "Access-Control-Request-Method": "POST"}})

			if kind == "redis" {
				g.redis.Stop()
				start := time.Now()
				check(request{method: "GET", path: "/v1/apikeys", bearer: alice})
				check(request{method: "POST", path: "/v1/apikeys", bearer: alice, body: `{"name":"down"}`})
				t.Logf("503s answered in %v", time.Since(start))
			}
			for _, want := range []string{"POST /v1/apikeys Created", "GET /v1/apikeys OK", "GET /v1/apikeys/{key_id} OK",
				"PATCH /v1/apikeys/{key_id} OK", "DELETE /v1/apikeys/{key_id} OK", "POST /v1/apikeys/{key_id}/rotate Created",
				"POST /v1/apikeys Conflict", "POST /v1/apikeys Unprocessable Entity", "PATCH /v1/apikeys/{key_id} Conflict"} {
				if !seen[want] {
					t.Errorf("no response seen for %s", want)
				}
			}
		})
	}
}

func routeName(p string) string {
	p, _, _ = strings.Cut(p, "?")
	parts := strings.Split(p, "/")
	if len(parts) > 3 {
		parts[3] = "{key_id}"
	}
	return strings.Join(parts, "/")
}

// checkLimited validates a guarded route's 429 against the document's
// Limited response: its code, required headers and their schemas, and the
// body's schema.
func checkLimited(t *testing.T, doc *openapi3.T, resp *response, code string) {
	t.Helper()
	if resp.status != http.StatusTooManyRequests || resp.errCode() != code {
		t.Fatalf("want 429 %s, got %d %s", code, resp.status, resp.body)
	}
	spec := doc.Components.Responses["Limited"].Value
	for name, h := range spec.Headers {
		v := resp.header.Get(name)
		if v == "" {
			if h.Value.Required {
				t.Errorf("429 %s without %s", code, name)
			}
			continue
		}
		if err := h.Value.Schema.Value.VisitJSON(v, openapi3.EnableJSONSchema2020()); err != nil {
			t.Errorf("429 %s: %s %q does not match openapi.yaml: %v", code, name, v, err)
		}
	}
	var body any
	if err := json.Unmarshal(resp.body, &body); err != nil {
		t.Fatal(err)
	}
	if err := spec.Content.Get("application/json").Schema.Value.VisitJSON(body, openapi3.EnableJSONSchema2020()); err != nil {
		t.Errorf("429 %s body does not match openapi.yaml: %v", code, err)
	}
}

// validateAgainst checks one exchange against the document.
func validateAgainst(t *testing.T, router routers.Router, base string, req request, resp *response) {
	t.Helper()
	httpReq, _ := http.NewRequest(req.method, base+req.path, strings.NewReader(req.body))
	route, params, err := router.FindRoute(httpReq)
	if err != nil && resp.status == http.StatusMethodNotAllowed {
		return // a method the document rightly does not list
	}
	if err != nil {
		t.Errorf("%s %s: not in openapi.yaml: %v", req.method, req.path, err)
		return
	}
	input := &openapi3filter.ResponseValidationInput{
		RequestValidationInput: &openapi3filter.RequestValidationInput{Request: httpReq, PathParams: params, Route: route,
			Options: &openapi3filter.Options{AuthenticationFunc: openapi3filter.NoopAuthenticationFunc}},
		Status: resp.status,
		Header: resp.header,
		Body:   io.NopCloser(bytes.NewReader(resp.body)),
		Options: &openapi3filter.Options{IncludeResponseStatus: true,
			SchemaValidationOptions: []openapi3.SchemaValidationOption{openapi3.EnableJSONSchema2020()}},
	}
	if err := openapi3filter.ValidateResponse(context.Background(), input); err != nil {
		t.Errorf("%s %s → %d does not match openapi.yaml: %v\nbody: %s", req.method, req.path, resp.status, err, truncate(string(resp.body), 400))
	}
}
