package apikeys

import (
	"encoding/json"
	"fmt"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/caddy-apikeys/caddy-apikeys/internal/testcaddy"
	"github.com/caddy-apikeys/caddy-apikeys/internal/testredis"
)

// counterValue reads a counter.
func counterValue(c prometheus.Counter) float64 {
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		panic(err)
	}
	return m.GetCounter().GetValue()
}

// testPlans are the plans of the plan tests' gateways.
const testPlans = `
		plan burst {
			rate_limit 5 2s
		}
		plan daily {
			quota 3 day
		}
		plan both {
			rate_limit 100 1m
			quota 1000 month
		}
		plan free`

// planKinds are the store kinds the plan tests run on.
func planKinds() []string { return storeKinds }

// keyWithPlan creates a key for owner with plan and returns it.
func (g *gateway) keyWithPlan(owner, plan string) createdKey {
	g.t.Helper()
	return g.create(owner, fmt.Sprintf(`{"name":"metered","plan":%q}`, plan))
}

// hit sends n guarded requests with key and returns their statuses.
func (g *gateway) hit(key string, n int) []int {
	g.t.Helper()
	out := make([]int, n)
	for i := range out {
		out[i] = g.do(request{method: "GET", path: "/v1/x", bearer: key}).status
	}
	return out
}

func countStatus(statuses []int, want int) int {
	n := 0
	for _, s := range statuses {
		if s == want {
			n++
		}
	}
	return n
}

// rateLimitField matches the RateLimit field of one policy item.
func rateLimitItem(field, policy string) (r, t int64, ok bool) {
	m := regexp.MustCompile(`"` + policy + `";r=(\d+);t=(\d+)`).FindStringSubmatch(field)
	if m == nil {
		return 0, 0, false
	}
	r, _ = strconv.ParseInt(m[1], 10, 64)
	t, _ = strconv.ParseInt(m[2], 10, 64)
	return r, t, true
}

// TestPlanRateLimit: a fresh key on a plan with `rate_limit 5 2s` is
// admitted for exactly 5 requests of a burst, then refused with 429
// rate_limited, Retry-After and the RateLimit fields, counted in the
// metrics and the usage endpoint; the backend learns the plan from the
// header and placeholder, which no client can forge.
func TestPlanRateLimit(t *testing.T) {
	for _, kind := range planKinds() {
		t.Run(kind, func(t *testing.T) {
			g := startGateway(t, kind, testPlans)
			k := g.keyWithPlan("alice", "burst")
			limitedBefore := counterValue(validationRateLimited)
			statuses := g.hit(k.Key, 8)
			if got := countStatus(statuses, 200); got != 5 || countStatus(statuses, 429) != 3 || statuses[4] != 200 || statuses[5] != 429 {
				t.Fatalf("a burst of 8 on rate_limit 5 2s: %v, want 5 admitted then 429", statuses)
			}
			if d := counterValue(validationRateLimited) - limitedBefore; d != 3 {
				t.Errorf("validations_total{result=rate_limited} moved by %v, want 3", d)
			}
			r := g.do(request{method: "GET", path: "/v1/x", bearer: k.Key})
			if r.status != 429 || r.errCode() != "rate_limited" {
				t.Fatalf("over the limit: %d %s", r.status, r.body)
			}
			retry, err := strconv.Atoi(r.header.Get("Retry-After"))
			if err != nil || retry < 1 || retry > 2 {
				t.Errorf("Retry-After %q, want 1 or 2 seconds", r.header.Get("Retry-After"))
			}
			if p := r.header.Get("RateLimit-Policy"); p != `"rate";q=5;w=2` {
				t.Errorf("RateLimit-Policy %q", p)
			}
			if rr, tt, ok := rateLimitItem(r.header.Get("RateLimit"), "rate"); !ok || rr != 0 || tt != int64(retry) {
				t.Errorf("RateLimit %q, want r=0 and t=Retry-After (%d)", r.header.Get("RateLimit"), retry)
			}
			// Tokens come back at 5 per 2 s.
			time.Sleep(time.Duration(retry) * time.Second)
			if r := g.do(request{method: "GET", path: "/v1/x", bearer: k.Key}); r.status != 200 {
				t.Fatalf("after Retry-After: %d %s", r.status, r.body)
			}
			// The plan reaches the backend, never a client's copy of it.
			r = g.do(request{method: "GET", path: "/v1/x", bearer: k.Key, header: map[string]string{
				"X-Api-Key-Plan": "forged", "X-Auth-Apikey-Plan": "forged", "Connection": "X-Api-Key-Plan"}})
			if r.status != 200 {
				t.Fatalf("%d %s", r.status, r.body)
			}
			seen := g.backend.last(t)
			if seen.Get("X-Api-Key-Plan") != "burst" || seen.Get("X-Auth-Apikey-Plan") != "burst" || len(seen.Values("X-Api-Key-Plan")) != 1 {
				t.Errorf("backend saw plan %q / placeholder %q", seen.Values("X-Api-Key-Plan"), seen.Values("X-Auth-Apikey-Plan"))
			}
			// A key without a plan is not limited, and sends no plan.
			free := g.create("alice", `{"name":"unmetered"}`)
			if s := g.hit(free.Key, 12); countStatus(s, 200) != 12 {
				t.Errorf("a key without a plan: %v", s)
			}
			// ... and no client's copy of one.
			if r := g.do(request{method: "GET", path: "/v1/x", bearer: free.Key, header: map[string]string{
				"X-Api-Key-Plan": "forged"}}); r.status != 200 {
				t.Fatalf("%d %s", r.status, r.body)
			}
			if seen := g.backend.last(t); seen.Get("X-Api-Key-Plan") != "" || seen.Get("X-Auth-Apikey-Plan") != "" {
				t.Errorf("a key without a plan sent plan %q / %q", seen.Get("X-Api-Key-Plan"), seen.Get("X-Auth-Apikey-Plan"))
			}
			// The usage endpoint counts today's requests: 5 of the burst,
			// 1 after Retry-After and 1 with forged headers admitted, 4
			// refused (counts reach the store within a sync interval).
			var today dayView
			for deadline := time.Now().Add(3 * time.Second); ; time.Sleep(100 * time.Millisecond) {
				u := g.do(request{method: "GET", path: "/v1/apikeys/" + k.KeyID + "/usage?days=2", bearer: dashboardToken(t, "alice")})
				var data usageResponse
				if u.status != 200 || json.Unmarshal(u.env.Data, &data) != nil || len(data.Days) != 2 || data.Plan != "burst" || data.Usage != nil {
					t.Fatalf("usage: %d %s", u.status, u.body)
				}
				today = data.Days[1]
				if today.Accepted == 7 && today.RateLimited == 4 || time.Now().After(deadline) {
					break
				}
			}
			if today.Date != time.Now().UTC().Format(time.DateOnly) || today.Accepted != 7 || today.RateLimited != 4 || today.QuotaExceeded != 0 {
				t.Errorf("usage today: %+v, want 7 accepted, 4 rate-limited", today)
			}
		})
	}
}

// TestPlanQuota: a key on `quota 3 day` is admitted 3 times a UTC day,
// then refused with 429 quota_exceeded until the day ends (an injected
// clock crosses midnight); its view shows the usage; a rotation keeps the
// plan and the quota usage.
func TestPlanQuota(t *testing.T) {
	for _, kind := range planKinds() {
		t.Run(kind, func(t *testing.T) {
			advance := setClock(t)
			g := startGateway(t, kind, testPlans)
			alice := dashboardToken(t, "alice")
			k := g.keyWithPlan("alice", "daily")
			exceededBefore := counterValue(validationQuotaExceeded)
			if s := g.hit(k.Key, 5); countStatus(s, 200) != 3 || s[2] != 200 || s[3] != 429 {
				t.Fatalf("quota 3 day: %v", s)
			}
			if d := counterValue(validationQuotaExceeded) - exceededBefore; d != 2 {
				t.Errorf("validations_total{result=quota_exceeded} moved by %v, want 2", d)
			}
			r := g.do(request{method: "GET", path: "/v1/x", bearer: k.Key})
			clock := now().UTC()
			midnight := clock.Truncate(24 * time.Hour).Add(24 * time.Hour)
			toMidnight := int64(midnight.Sub(clock).Seconds())
			if r.status != 429 || r.errCode() != "quota_exceeded" {
				t.Fatalf("over quota: %d %s", r.status, r.body)
			}
			retry, _ := strconv.ParseInt(r.header.Get("Retry-After"), 10, 64)
			if retry < toMidnight-5 || retry > toMidnight+5 {
				t.Errorf("Retry-After %d, want about %d (seconds to UTC midnight)", retry, toMidnight)
			}
			if p := r.header.Get("RateLimit-Policy"); p != `"quota";q=3;w=86400` {
				t.Errorf("RateLimit-Policy %q", p)
			}
			if rr, tt, ok := rateLimitItem(r.header.Get("RateLimit"), "quota"); !ok || rr != 0 || tt != retry {
				t.Errorf("RateLimit %q", r.header.Get("RateLimit"))
			}
			// The view shows the usage.
			v := g.do(request{method: "GET", path: "/v1/apikeys/" + k.KeyID, bearer: alice})
			var view keyView
			if v.status != 200 || json.Unmarshal(v.env.Data, &view) != nil || view.Plan != "daily" || view.Usage == nil {
				t.Fatalf("view: %d %s", v.status, v.body)
			}
			if u := view.Usage; u.Used != 3 || u.Limit != 3 || u.Period != "day" || !u.ResetsAt.Equal(midnight) {
				t.Errorf("usage %+v, want 3 of 3 a day, resetting at %s", *u, midnight)
			}
			if !regexp.MustCompile(`"usage":\{"used":3,"limit":3,"period":"day","resets_at":"\d{4}-\d\d-\d\dT00:00:00\.000Z"\}`).Match(v.body) {
				t.Errorf("usage JSON: %s", v.body)
			}

			// A rotation keeps the plan and the usage.
			rot := g.do(request{method: "POST", path: "/v1/apikeys/" + k.KeyID + "/rotate", bearer: alice})
			var next createdKey
			if rot.status != 201 || json.Unmarshal(rot.env.Data, &next) != nil || !strings.Contains(string(rot.body), `"plan":"daily"`) {
				t.Fatalf("rotate: %d %s", rot.status, rot.body)
			}
			if r := g.do(request{method: "GET", path: "/v1/x", bearer: next.Key}); r.status != 429 || r.errCode() != "quota_exceeded" {
				t.Errorf("the rotated key's first request: %d %s, want quota_exceeded", r.status, r.body)
			}

			// Past UTC midnight the quota is fresh.
			advance(midnight.Sub(now()) + time.Second)
			if s := g.hit(next.Key, 4); countStatus(s, 200) != 3 || s[3] != 429 {
				t.Errorf("the next day: %v, want 3 admitted", s)
			}
		})
	}
}

// TestPlanAPI: plan on create, PATCH and rotate; unknown plans; a PATCH
// that changes the plan applies on the next request; `plan: null`
// removes it; the reference response shape is unchanged on a site
// without default_plan; the usage endpoint's bounds and owner scope.
func TestPlanAPI(t *testing.T) {
	g := startGateway(t, "file", testPlans)
	alice := dashboardToken(t, "alice")
	post := func(path, body string) *response {
		return g.do(request{method: "POST", path: path, bearer: alice, body: body})
	}
	patch := func(id, body string) *response {
		return g.do(request{method: "PATCH", path: "/v1/apikeys/" + id, bearer: alice, body: body})
	}

	// The reference request gets exactly the reference shape.
	r := post("/v1/apikeys", `{"name":"CI usage reader","scopes":["analytics:read"],"expires_in_days":90}`)
	var members map[string]json.RawMessage
	if r.status != 201 || json.Unmarshal(r.env.Data, &members) != nil {
		t.Fatalf("create: %d %s", r.status, r.body)
	}
	if len(members) != 7 || members["plan"] != nil || members["usage"] != nil {
		t.Errorf("reference create on a site without default_plan: %s", r.env.Data)
	}

	for _, tc := range []struct{ body, code, field string }{
		{`{"name":"a","plan":"gold"}`, "unknown_plan", "plan"},
		{`{"name":"a","plan":7}`, "validation_error", "plan"},
		{`{"name":"a","plan":""}`, "unknown_plan", "plan"},
	} {
		if r := post("/v1/apikeys", tc.body); r.status != 400 || r.errCode() != tc.code || r.env.Error.Field != tc.field {
			t.Errorf("create %s: %d %s", tc.body, r.status, r.body)
		}
	}
	k := g.keyWithPlan("alice", "burst")
	if r := patch(k.KeyID, `{"plan":"gold"}`); r.status != 400 || r.errCode() != "unknown_plan" {
		t.Errorf("patch unknown plan: %d %s", r.status, r.body)
	}
	if r := post("/v1/apikeys/"+k.KeyID+"/rotate", `{"plan":"gold"}`); r.status != 400 || r.errCode() != "unknown_plan" {
		t.Errorf("rotate unknown plan: %d %s", r.status, r.body)
	}

	// A PATCH to another plan applies on the next request.
	if s := g.hit(k.Key, 6); s[5] != 429 {
		t.Fatalf("burst: %v", s)
	}
	if r := patch(k.KeyID, `{"plan":"free"}`); r.status != 200 || !strings.Contains(string(r.body), `"plan":"free"`) {
		t.Fatalf("patch plan: %d %s", r.status, r.body)
	}
	if r := g.do(request{method: "GET", path: "/v1/x", bearer: k.Key}); r.status != 200 || g.backend.last(t).Get("X-Api-Key-Plan") != "free" {
		t.Errorf("after the plan change: %d, plan %q", r.status, g.backend.last(t).Get("X-Api-Key-Plan"))
	}
	if r := patch(k.KeyID, `{"plan":"burst"}`); r.status != 200 {
		t.Fatal(r.status)
	}
	if r := g.do(request{method: "GET", path: "/v1/x", bearer: k.Key}); r.status != 429 {
		t.Errorf("back on burst, still exhausted: %d", r.status)
	}
	// null removes the plan: no limits, no plan member.
	r = patch(k.KeyID, `{"plan":null}`)
	if r.status != 200 || strings.Contains(string(r.body), `"plan"`) {
		t.Fatalf("plan null: %d %s", r.status, r.body)
	}
	if s := g.hit(k.Key, 8); countStatus(s, 200) != 8 {
		t.Errorf("without a plan: %v", s)
	}
	// Rotate into a plan.
	r = post("/v1/apikeys/"+k.KeyID+"/rotate", `{"plan":"daily"}`)
	if r.status != 201 || !strings.Contains(string(r.body), `"plan":"daily"`) {
		t.Fatalf("rotate into a plan: %d %s", r.status, r.body)
	}

	// The usage endpoint.
	for _, q := range []string{"?days=0", "?days=91", "?days=x", "?days="} {
		if r := g.do(request{method: "GET", path: "/v1/apikeys/" + k.KeyID + "/usage" + q, bearer: alice}); r.status != 400 || r.errCode() != "validation_error" || r.env.Error.Field != "days" {
			t.Errorf("usage%s: %d %s", q, r.status, r.body)
		}
	}
	r = g.do(request{method: "GET", path: "/v1/apikeys/" + k.KeyID + "/usage", bearer: alice})
	var u usageResponse
	if r.status != 200 || json.Unmarshal(r.env.Data, &u) != nil || len(u.Days) != DefaultUsageDays || u.KeyID != k.KeyID {
		t.Fatalf("usage: %d %s", r.status, r.body)
	}
	if r := g.do(request{method: "GET", path: "/v1/apikeys/" + k.KeyID + "/usage", bearer: dashboardToken(t, "mallory")}); r.status != 404 {
		t.Errorf("another owner's usage: %d %s", r.status, r.body)
	}
	if r := g.do(request{method: "POST", path: "/v1/apikeys/" + k.KeyID + "/usage", bearer: alice}); r.status != 405 || r.header.Get("Allow") != "GET" {
		t.Errorf("POST usage: %d Allow %q", r.status, r.header.Get("Allow"))
	}
}

// TestPlansClaimCapsPlans: under plans_claim a session may assign only
// the plans its claim lists (the default plan always, no plan only with
// "*"), on create, PATCH and rotate.
func TestPlansClaimCapsPlans(t *testing.T) {
	g := startGateway(t, "file", testPlans, "plans_claim plans")
	token := func(plans any) string {
		return signToken(t, jwtHS256, []byte(testJWTSecret), map[string]any{"sub": "erin", "iss": testIssuer, "aud": testAudience,
			"exp": time.Now().Add(time.Hour).Unix(), "plans": plans})
	}
	daily := token([]string{"daily"})
	post := func(tok, path, body string) *response {
		return g.do(request{method: "POST", path: path, bearer: tok, body: body})
	}
	r := post(daily, "/v1/apikeys", `{"name":"a","plan":"daily"}`)
	if r.status != 201 {
		t.Fatalf("grantable plan: %d %s", r.status, r.body)
	}
	var k createdKey
	_ = json.Unmarshal(r.env.Data, &k)
	for _, body := range []string{`{"name":"a","plan":"burst"}`, `{"name":"no plan"}`} {
		if r := post(daily, "/v1/apikeys", body); r.status != 403 || r.errCode() != "plan_not_grantable" || r.env.Error.Field != "plan" {
			t.Errorf("%s: %d %s", body, r.status, r.body)
		}
	}
	for _, body := range []string{`{"plan":"burst"}`, `{"plan":null}`} {
		if r := g.do(request{method: "PATCH", path: "/v1/apikeys/" + k.KeyID, bearer: daily, body: body}); r.status != 403 || r.errCode() != "plan_not_grantable" {
			t.Errorf("patch %s: %d %s", body, r.status, r.body)
		}
	}
	if r := post(daily, "/v1/apikeys/"+k.KeyID+"/rotate", `{"plan":"burst"}`); r.status != 403 || r.errCode() != "plan_not_grantable" {
		t.Errorf("rotate into burst: %d %s", r.status, r.body)
	}
	if r := post(token("daily burst"), "/v1/apikeys", `{"name":"a","plan":"burst"}`); r.status != 201 {
		t.Errorf("space-separated claim: %d %s", r.status, r.body)
	}
	if r := post(token([]string{"*"}), "/v1/apikeys", `{"name":"no plan"}`); r.status != 201 {
		t.Errorf("wildcard: %d %s", r.status, r.body)
	}
	if r := post(dashboardToken(t, "erin"), "/v1/apikeys", `{"name":"a","plan":"daily"}`); r.status != 403 || r.errCode() != "plan_not_grantable" {
		t.Errorf("no plans claim: %d %s", r.status, r.body)
	}
	// default_plan is grantable to every session.
	if err := g.load(testPlans + "\ndefault_plan free"); err != nil {
		t.Fatal(err)
	}
	r = post(daily, "/v1/apikeys", `{"name":"gets the default"}`)
	if r.status != 201 || !strings.Contains(string(r.body), `"plan":"free"`) {
		t.Errorf("default plan: %d %s", r.status, r.body)
	}
}

// TestPlanReload: a reload keeps every key's limiter state (an exhausted
// key stays refused) and applies a plan's new numbers to every key.
func TestPlanReload(t *testing.T) {
	for _, kind := range planKinds() {
		t.Run(kind, func(t *testing.T) {
			g := startGateway(t, kind, testPlans)
			k := g.keyWithPlan("alice", "daily")
			if s := g.hit(k.Key, 4); s[3] != 429 {
				t.Fatalf("quota 3 day: %v", s)
			}
			if err := g.load(testPlans + "\nrealm reloaded"); err != nil {
				t.Fatal(err)
			}
			if r := g.do(request{method: "GET", path: "/v1/x", bearer: k.Key}); r.status != 429 {
				t.Errorf("after a reload the quota was reset: %d %s", r.status, r.body)
			}
			// New numbers apply to the same key at once.
			if err := g.load(strings.Replace(testPlans, "quota 3 day", "quota 5 day", 1)); err != nil {
				t.Fatal(err)
			}
			// On Redis an instance learns the shared count again at its
			// next sync (every second).
			var s []int
			for deadline := time.Now().Add(3 * time.Second); countStatus(s, 200) == 0 && time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
				s = g.hit(k.Key, 1)
			}
			s = append(s, g.hit(k.Key, 2)...)
			if countStatus(s, 200) != 2 || s[len(s)-1] != 429 {
				t.Errorf("quota raised to 5 with 3 used: %v, want 2 more admitted", s)
			}
			r := g.do(request{method: "GET", path: "/v1/x", bearer: k.Key})
			if p := r.header.Get("RateLimit-Policy"); p != `"quota";q=5;w=86400` {
				t.Errorf("RateLimit-Policy after the reload: %q", p)
			}
			// A plan removed from the config: its keys get default_plan,
			// and the backend is told the plan whose limits apply.
			b := g.keyWithPlan("alice", "burst")
			if err := g.load(strings.Replace(testPlans, "plan burst {", "plan gone {", 1) + "\ndefault_plan daily"); err != nil {
				t.Fatal(err)
			}
			s = g.hit(b.Key, 4)
			if countStatus(s, 200) != 3 || s[3] != 429 {
				t.Errorf("a key of a removed plan under default_plan daily (quota 3): %v", s)
			}
			if p := g.backend.last(t).Get("X-Api-Key-Plan"); p != "daily" {
				t.Errorf("X-Api-Key-Plan of a key whose plan was removed: %q, want the default in effect", p)
			}
			// Without a default no plan is in effect: unlimited, no header.
			if err := g.load(strings.Replace(testPlans, "plan burst {", "plan gone {", 1)); err != nil {
				t.Fatal(err)
			}
			if s := g.hit(b.Key, 8); countStatus(s, 200) != 8 {
				t.Errorf("a key of a removed plan without default_plan: %v", s)
			}
			if p := g.backend.last(t).Values("X-Api-Key-Plan"); len(p) != 0 {
				t.Errorf("X-Api-Key-Plan of a key whose plan was removed, no default: %q", p)
			}
		})
	}
}

// startInstanceWith is startInstance with extra apikeys subdirectives.
func startInstanceWith(t *testing.T, redisURL, extra string) *instance {
	t.Helper()
	in := &instance{port: testcaddy.FreePort(t), adminPort: testcaddy.FreePort(t)}
	in.base = fmt.Sprintf("http://127.0.0.1:%d", in.port)
	in.Process = testcaddy.Start(t, instanceCaddyfile(in.port, in.adminPort, redisURL, extra),
		[]string{fmt.Sprintf("127.0.0.1:%d", in.port)})
	return in
}

// TestPlansSeveralInstances runs three Caddy processes on one Redis
// (standalone and Cluster): a plan change made through one instance
// applies on the next request on another, and the three instances,
// hammered at once, admit no more than the limit's GCRA allowance times
// 1.1 plus one per instance.
func TestPlansSeveralInstances(t *testing.T) {
	const plans = testPlans + `
		plan hammer {
			rate_limit 100 1s
		}`
	for _, kind := range []string{"redis", "cluster"} {
		t.Run(kind, func(t *testing.T) {
			var url string
			if kind == "redis" {
				url = testredis.Start(t).URL()
			} else {
				url = strings.Join(testredis.StartCluster(t).URLs(), " ")
			}
			ins := []*instance{startInstanceWith(t, url, plans), startInstanceWith(t, url, plans), startInstanceWith(t, url, plans)}
			c := &http.Client{Timeout: 10 * time.Second}
			alice := dashboardToken(t, "alice")
			mint := func(plan string) createdKey {
				st, body := call(t, c, "POST", ins[0].base+"/v1/apikeys", alice, fmt.Sprintf(`{"name":"p","plan":%q}`, plan), nil)
				if st != 201 {
					t.Fatalf("create: %d %s", st, body)
				}
				return keyOf(t, body)
			}

			// A plan change through instance 0 applies on instance 1.
			k := mint("burst")
			refused := false
			for range 20 {
				if st, _ := call(t, c, "GET", ins[1].base+"/v1/x", k.Key, "", nil); st == 429 {
					refused = true
					break
				}
			}
			if !refused {
				t.Fatal("burst never refused on instance 1")
			}
			if st, body := call(t, c, "PATCH", ins[0].base+"/v1/apikeys/"+k.KeyID, alice, `{"plan":"free"}`, nil); st != 200 {
				t.Fatalf("patch: %d %s", st, body)
			}
			ok := false
			for deadline := time.Now().Add(time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
				if st, _ := call(t, c, "GET", ins[1].base+"/v1/x", k.Key, "", nil); st == 200 {
					ok = true
					break
				}
			}
			if !ok {
				t.Error("the plan change made on instance 0 did not apply on instance 1 within 1s")
			}

			// Hammer one key from every instance for 3 windows.
			for _, n := range []int{2, 3} {
				h := mint("hammer")
				const limit, window, windows = 100, time.Second, 2
				var admitted, total atomic.Int64
				start := time.Now()
				var wg sync.WaitGroup
				for i := range n * 4 {
					wg.Add(1)
					go func(in *instance) {
						defer wg.Done()
						hc := &http.Client{Timeout: 5 * time.Second}
						for time.Since(start) < windows*window {
							st, _ := call(t, hc, "GET", in.base+"/v1/x", h.Key, "", nil)
							total.Add(1)
							if st == 200 {
								admitted.Add(1)
							}
						}
					}(ins[i%n])
				}
				wg.Wait()
				elapsed := time.Since(start)
				// GCRA allows a burst of limit, then limit per window.
				allowance := float64(limit) + float64(limit)*elapsed.Seconds()/window.Seconds()
				bound := allowance*1.1 + float64(n)
				t.Logf("%s, %d instances: %d admitted of %d in %s (GCRA allowance %.0f, bound %.0f)",
					kind, n, admitted.Load(), total.Load(), elapsed.Round(time.Millisecond), allowance, bound)
				if float64(admitted.Load()) > bound {
					t.Errorf("%d instances admitted %d, over the bound %.0f", n, admitted.Load(), bound)
				}
				if float64(admitted.Load()) < allowance*0.8 {
					t.Errorf("%d instances admitted %d, far under the allowance %.0f", n, admitted.Load(), allowance)
				}
			}
		})
	}
}
