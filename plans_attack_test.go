package apikeys

// Attacks on plans (issue 11): ways a key owner, a dashboard session or a
// stranger might escape or reset a key's rate limit or quota, or make the
// limiter fail another key. Each test names the attack and what must
// hold; tests of attacks that worked fail on the code they were written
// against.

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"
)

// attackPlans: two plans with a quota of 3 a period, one per period, and
// a plan with a rate limit only.
const attackPlans = `
		plan daily {
			quota 3 day
		}
		plan monthly {
			quota 3 month
		}
		plan ratey {
			rate_limit 1000 1s
		}
		plan both {
			rate_limit 3 1h
			quota 100 day
		}`

// patchPlan changes key id's plan as owner and fails unless it is 200.
func (g *gateway) patchPlan(owner, id, plan string) {
	g.t.Helper()
	r := g.do(request{method: "PATCH", path: "/v1/apikeys/" + id, bearer: dashboardToken(g.t, owner), body: fmt.Sprintf(`{"plan":%q}`, plan)})
	if r.status != http.StatusOK {
		g.t.Fatalf("patch plan %s: %d %s", plan, r.status, r.body)
	}
}

// TestAttackPlanToggleResetsQuota: a key owner whose session may assign
// two plans with quotas of different periods (`quota 3 day`, `quota 3
// month`) switches the key back and forth. The quota of each plan counts
// the key's accepted requests in its period, so in one day the key can be
// admitted at most 3 under each plan: 6 in all, however often it
// switches. Found: on the file store every switch starts the quota afresh
// (setPolicy drops the counts not yet flushed, and the bbolt record holds
// one period kind, so writing the month's count erases the day's), so the
// key is admitted without limit.
func TestAttackPlanToggleResetsQuota(t *testing.T) {
	for _, kind := range planKinds() {
		t.Run(kind, func(t *testing.T) {
			g := startGateway(t, kind, attackPlans)
			k := g.keyWithPlan("alice", "daily")
			admitted := 0
			for round := range 2 {
				for _, plan := range []string{"daily", "monthly"} {
					if round > 0 || plan != "daily" {
						g.patchPlan("alice", k.KeyID, plan)
					}
					admitted += countStatus(g.hit(k.Key, 4), 200)
					if kind == "file" {
						// Let a sync write the counts, as a patient
						// attacker would (the second half of the bug).
						time.Sleep(1100 * time.Millisecond)
					}
				}
			}
			if admitted > 6 {
				t.Errorf("switching between a daily and a monthly quota of 3 admitted %d requests in one day, want at most 6", admitted)
			}
		})
	}
}

// TestAttackPlanToggleThroughRateOnlyPlan: the same owner switches a key
// on `quota 3 day` to a plan with a rate limit only, makes one request,
// and switches back, all within one sync interval. The requests counted
// before the switch must still count after it. Found: on the file store
// the switch to a plan without a quota leaves the unflushed count where
// no sync sends it, and the switch back drops it: the quota starts again.
func TestAttackPlanToggleThroughRateOnlyPlan(t *testing.T) {
	g := startGateway(t, "file", attackPlans)
	k := g.keyWithPlan("alice", "daily")
	admitted := 0
	for range 4 {
		admitted += countStatus(g.hit(k.Key, 3), 200)
		g.patchPlan("alice", k.KeyID, "ratey")
		if s := g.hit(k.Key, 1); s[0] != 200 {
			t.Fatalf("on the rate-only plan: %v", s)
		}
		g.patchPlan("alice", k.KeyID, "daily")
	}
	admitted += countStatus(g.hit(k.Key, 3), 200)
	if admitted > 3 {
		t.Errorf("quota 3 day admitted %d requests in one day across switches to a rate-only plan and back", admitted)
	}
}

// TestAttackRotationIntoOtherPeriod: a rotation keeps the quota usage
// (both keys are metered as one). Rotating a key on `quota 3 day` into
// the monthly plan with a grace period gives two working keys on one
// meter under plans of different periods; alternating between them must
// not start either quota afresh. Found on the file store: every request
// that changes the policy of the shared meter drops its count.
func TestAttackRotationIntoOtherPeriod(t *testing.T) {
	g := startGateway(t, "file", attackPlans)
	old := g.keyWithPlan("alice", "daily")
	r := g.do(request{method: "POST", path: "/v1/apikeys/" + old.KeyID + "/rotate", bearer: dashboardToken(t, "alice"),
		body: `{"plan":"monthly","grace_period_seconds":3600}`})
	var next createdKey
	if r.status != 201 || json.Unmarshal(r.env.Data, &next) != nil {
		t.Fatalf("rotate: %d %s", r.status, r.body)
	}
	admitted := 0
	for range 10 {
		admitted += countStatus(g.hit(old.Key, 1), 200)
		admitted += countStatus(g.hit(next.Key, 1), 200)
	}
	if admitted > 6 {
		t.Errorf("a daily key and its monthly replacement, alternated, were admitted %d times in one day, want at most 6 (3 a plan)", admitted)
	}
}

// TestAttackRotationGraceSharesLimits (defended): during a rotation's
// grace period the old and the new key both work; they must share one
// rate limit and one quota, or every rotation doubles a key's allowance.
// Disabling and enabling the key resets nothing either.
func TestAttackRotationGraceSharesLimits(t *testing.T) {
	for _, kind := range planKinds() {
		t.Run(kind, func(t *testing.T) {
			g := startGateway(t, kind, attackPlans)
			alice := dashboardToken(t, "alice")
			old := g.keyWithPlan("alice", "both") // rate_limit 3 1h
			if s := g.hit(old.Key, 2); countStatus(s, 200) != 2 {
				t.Fatalf("old key: %v", s)
			}
			r := g.do(request{method: "POST", path: "/v1/apikeys/" + old.KeyID + "/rotate", bearer: alice, body: `{"grace_period_seconds":3600}`})
			var next createdKey
			if r.status != 201 || json.Unmarshal(r.env.Data, &next) != nil {
				t.Fatalf("rotate: %d %s", r.status, r.body)
			}
			admitted := countStatus(g.hit(old.Key, 3), 200) + countStatus(g.hit(next.Key, 3), 200)
			if admitted != 1 {
				t.Errorf("after 2 of a burst of 3, the old and new key were admitted %d more times, want 1", admitted)
			}
			// Disable and enable the new key: still limited.
			for _, body := range []string{`{"enabled":false}`, `{"enabled":true}`} {
				if r := g.do(request{method: "PATCH", path: "/v1/apikeys/" + next.KeyID, bearer: alice, body: body}); r.status != 200 {
					t.Fatalf("patch %s: %d %s", body, r.status, r.body)
				}
			}
			if r := g.do(request{method: "GET", path: "/v1/x", bearer: next.Key}); r.status != 429 || r.errCode() != "rate_limited" {
				t.Errorf("after disable and enable: %d %s", r.status, r.body)
			}
		})
	}
}

// TestAttackInternalFieldsOnCreate (defended): a create, PATCH or rotate
// that names an internal member of the key record (meter, to share or
// reset another key's usage; disabled, replaces…) is 400 and changes
// nothing.
func TestAttackInternalFieldsOnCreate(t *testing.T) {
	g := startGateway(t, "file", attackPlans)
	alice := dashboardToken(t, "alice")
	victim := g.keyWithPlan("alice", "daily")
	k := g.keyWithPlan("alice", "daily")
	for _, c := range []struct{ method, path, body string }{
		{"POST", "/v1/apikeys", fmt.Sprintf(`{"name":"x","plan":"daily","meter":%q}`, victim.KeyID)},
		{"POST", "/v1/apikeys", `{"name":"x","plan":"daily","Meter":"key_x"}`},
		{"PATCH", "/v1/apikeys/" + k.KeyID, `{"meter":"key_fresh"}`},
		{"POST", "/v1/apikeys/" + k.KeyID + "/rotate", `{"meter":"key_fresh"}`},
		{"POST", "/v1/apikeys", `{"name":"x","plan":"daily","usage":{"used":0}}`},
	} {
		r := g.do(request{method: c.method, path: c.path, bearer: alice, body: c.body})
		if r.status != 400 || r.errCode() != "validation_error" {
			t.Errorf("%s %s %s: %d %s", c.method, c.path, c.body, r.status, r.body)
		}
	}
}

// TestAttackRefusedRequestsDoNotCount (defended): requests refused before
// the key is known to be allowed the route (a wrong key, a
// non-canonical path, a scope the key lacks, ambiguous credentials) cost
// the key nothing; so nobody can burn another's quota with its key ID or
// a near miss.
func TestAttackRefusedRequestsDoNotCount(t *testing.T) {
	g := startGateway(t, "file", attackPlans)
	alice := dashboardToken(t, "alice")
	r := g.do(request{method: "POST", path: "/v1/apikeys", bearer: alice, body: `{"name":"scoped","plan":"daily","scopes":["analytics:read"]}`})
	var k createdKey
	if r.status != 201 || json.Unmarshal(r.env.Data, &k) != nil {
		t.Fatalf("create: %d %s", r.status, r.body)
	}
	for _, c := range []request{
		{method: "GET", path: "/v1/analytics/%2e%2e/x", bearer: k.Key},
		{method: "GET", path: "/v1/analytics//x", bearer: k.Key},
		{method: "GET", path: "/v1/webhooks/x", bearer: k.Key},
		{method: "DELETE", path: "/v1/analytics", bearer: k.Key},
		{method: "GET", path: "/v1/analytics", bearer: k.Key, header: map[string]string{"X-Http-Method-Override": "DELETE"}},
		{method: "GET", path: "/v1/analytics", bearer: k.Key[:len(k.Key)-1] + "x"},
	} {
		for range 3 {
			if r := g.do(c); r.status == 200 || r.status == 429 {
				t.Fatalf("%s %s: %d %s", c.method, c.path, r.status, r.body)
			}
		}
	}
	if s := g.hit2(k.Key, "/v1/analytics", 4); countStatus(s, 200) != 3 || s[3] != 429 {
		t.Errorf("after 21 refused requests, the key's quota of 3: %v, want 3 admitted", s)
	}
}

// hit2 sends n GET requests to path with key.
func (g *gateway) hit2(key, path string, n int) []int {
	g.t.Helper()
	out := make([]int, n)
	for i := range out {
		out[i] = g.do(request{method: "GET", path: path, bearer: key}).status
	}
	return out
}

// TestAttackUsageDaysParameter (defended): `days` is a whole
// number from 1 to 90; anything else is 400 validation_error, never a
// 500 or a huge answer. Another owner's key is 404 whatever `days` is.
func TestAttackUsageDaysParameter(t *testing.T) {
	g := startGateway(t, "file", attackPlans)
	k := g.keyWithPlan("alice", "daily")
	alice, mallory := dashboardToken(t, "alice"), dashboardToken(t, "mallory")
	path := "/v1/apikeys/" + k.KeyID + "/usage"
	for _, q := range []string{"0", "-1", "91", "1e3", "30.5", "9999999999999999999999", "%20", "0x10", "1%00", "30&days=x", "7&days=7"} {
		r := g.do(request{method: "GET", path: path + "?days=" + q, bearer: alice})
		if r.status != 400 || r.errCode() != "validation_error" {
			t.Errorf("days=%s: %d %.200s", q, r.status, r.body)
		}
	}
	// (A bad `days` is 400 for every key ID, so it tells nothing.)
	for _, q := range []string{"", "?days=1", "?days=90"} {
		if r := g.do(request{method: "GET", path: path + q, bearer: mallory}); r.status != 404 {
			t.Errorf("another owner's usage%s: %d %s", q, r.status, r.body)
		}
	}
}

// TestAttackRateLimitFieldsAreStructuredFields: RateLimit-Policy and
// RateLimit are Structured Fields (RFC 9651) lists, whose integers have
// at most 15 digits. A plan whose numbers do not fit must be refused at
// load rather than make every 429 carry a field that clients reject
// whole. Found: `quota 10000000000000000 day` loads, and its 429s send
// q=10000000000000000.
func TestAttackRateLimitFieldsAreStructuredFields(t *testing.T) {
	g := startGateway(t, "file", attackPlans)
	err := g.load(attackPlans + `
		plan huge {
			rate_limit 1 1h
			quota 10000000000000000 day
		}`)
	if err != nil {
		// Refused at load, naming the bound: defended.
		if !strings.Contains(err.Error(), "999999999999999") {
			t.Errorf("refused, but the error does not name the bound: %v", err)
		}
		return
	}
	k := g.keyWithPlan("alice", "huge")
	g.hit(k.Key, 1)
	r := g.do(request{method: "GET", path: "/v1/x", bearer: k.Key})
	if r.status != 429 {
		t.Fatalf("second request on rate_limit 1 1h: %d %s", r.status, r.body)
	}
	for _, f := range []string{"RateLimit-Policy", "RateLimit"} {
		v := r.header.Get(f)
		for item := range strings.SplitSeq(v, ",") {
			for param := range strings.SplitSeq(item, ";") {
				if _, num, ok := strings.Cut(param, "="); ok && len(strings.TrimPrefix(num, "-")) > 15 {
					t.Errorf("%s: %q has an integer of more than 15 digits, not a Structured Field", f, v)
				}
			}
		}
	}
}

// TestAttackRedisHangUnderLoad: Redis stops answering (SIGSTOP) while
// keys on a plan are busy. Every request must still get 200 or 429 (the
// limiter falls back to per-instance limits), within store_timeout plus a
// margin; never 500, never an unbounded wait, and one key's lease must
// not hold up another's requests.
func TestAttackRedisHangUnderLoad(t *testing.T) {
	g := startGateway(t, "redis", attackPlans)
	keys := []createdKey{g.keyWithPlan("alice", "ratey"), g.keyWithPlan("bob", "ratey"), g.keyWithPlan("carol", "daily")}
	for _, k := range keys {
		g.hit(k.Key, 1) // cached and leased
	}
	g.redis.Pause()
	type result struct {
		status  int
		latency time.Duration
		err     error
	}
	var mu sync.Mutex
	var out []result
	var wg sync.WaitGroup
	start := time.Now()
	for w := range 6 {
		wg.Add(1)
		go func(k createdKey) {
			defer wg.Done()
			c := &http.Client{Timeout: 5 * time.Second}
			for time.Since(start) < 2*time.Second {
				req, _ := http.NewRequest("GET", g.base+"/v1/x", nil)
				req.Header.Set("Authorization", "Bearer "+k.Key)
				t0 := time.Now()
				resp, err := c.Do(req)
				res := result{latency: time.Since(t0), err: err}
				if err == nil {
					res.status = resp.StatusCode
					resp.Body.Close()
				}
				mu.Lock()
				out = append(out, res)
				mu.Unlock()
			}
		}(keys[w%len(keys)])
	}
	wg.Wait()
	g.redis.Resume()
	const bound = 500*time.Millisecond + 500*time.Millisecond
	var worst time.Duration
	statuses := map[int]int{}
	for _, o := range out {
		worst = max(worst, o.latency)
		statuses[o.status]++
		switch {
		case o.err != nil:
			t.Errorf("request failed: %v", o.err)
		case o.status != 200 && o.status != 429:
			t.Errorf("answered %d during the Redis hang", o.status)
		case o.latency > bound:
			t.Errorf("answered after %s (bound %s)", o.latency, bound)
		}
	}
	t.Logf("%d requests during the hang: %v, worst latency %s", len(out), statuses, worst.Round(time.Millisecond))
}

// TestAttackMonthBoundary (defended): a monthly quota refuses until the
// first of the next month, UTC (Retry-After counts down to it), and only
// then admits the key again; an injected clock crosses the boundary.
func TestAttackMonthBoundary(t *testing.T) {
	for _, kind := range planKinds() {
		t.Run(kind, func(t *testing.T) {
			advance := setClock(t)
			g := startGateway(t, kind, attackPlans)
			k := g.keyWithPlan("alice", "monthly")
			if s := g.hit(k.Key, 4); countStatus(s, 200) != 3 || s[3] != 429 {
				t.Fatalf("quota 3 month: %v", s)
			}
			clock := now().UTC()
			first := time.Date(clock.Year(), clock.Month()+1, 1, 0, 0, 0, 0, time.UTC)
			r := g.do(request{method: "GET", path: "/v1/x", bearer: k.Key})
			want := int64(first.Sub(clock) / time.Second)
			var retry int64
			fmt.Sscan(r.header.Get("Retry-After"), &retry)
			if r.errCode() != "quota_exceeded" || retry < want-5 || retry > want+5 {
				t.Errorf("Retry-After %d, want about %d (to %s)", retry, want, first)
			}
			// One second before the month ends: still refused.
			advance(first.Add(-time.Second).Sub(now()))
			if r := g.do(request{method: "GET", path: "/v1/x", bearer: k.Key}); r.status != 429 {
				t.Errorf("a second before the month ends: %d", r.status)
			}
			advance(2 * time.Second)
			if s := g.hit(k.Key, 4); countStatus(s, 200) != 3 || s[3] != 429 {
				t.Errorf("the next month: %v, want 3 admitted", s)
			}
		})
	}
}

// TestAttackQuotaDuringRedisHang (defended): while Redis does not answer,
// one instance counts the quota locally from the count it last knew, so a
// key that has used 1 of `quota 3 day` gets at most 2 more, and none once
// Redis is back.
func TestAttackQuotaDuringRedisHang(t *testing.T) {
	g := startGateway(t, "redis", attackPlans)
	k := g.keyWithPlan("alice", "daily")
	if s := g.hit(k.Key, 1); s[0] != 200 {
		t.Fatalf("first request: %v", s)
	}
	time.Sleep(1100 * time.Millisecond) // a sync: the count is shared
	g.redis.Pause()
	during := g.hit(k.Key, 5)
	g.redis.Resume()
	time.Sleep(1100 * time.Millisecond) // the local counts are sent
	after := g.hit(k.Key, 2)
	if n := countStatus(during, 200) + countStatus(after, 200); n > 2 {
		t.Errorf("with 1 of 3 used, %d more admitted (during the hang %v, after %v)", n, during, after)
	}
}

// TestAttackForgedPlanHeaderSpellings (defended): on a server that lets
// '_' and '.' header names through, a client's X_Api_Key_Plan or
// X.Api.Key.Plan (which CGI-style backends read as X-Api-Key-Plan) never
// reaches the backend, for a key with a plan and one without, and
// neither does a Connection header naming it.
func TestAttackForgedPlanHeaderSpellings(t *testing.T) {
	g := startLooseHeaderSite(t, attackPlans)
	for _, k := range []createdKey{g.keyWithPlan("alice", "ratey"), g.create("alice", `{"name":"no plan"}`)} {
		req, _ := http.NewRequest("GET", g.base+"/v1/x", nil)
		req.Header.Set("Authorization", "Bearer "+k.Key)
		req.Header.Set("X_Api_Key_Unrelated", "kept")
		for _, name := range []string{"X_Api_Key_Plan", "X.Api.Key.Plan", "x-api_key-plan", "X-API-KEY-PLAN"} {
			req.Header[name] = []string{"enterprise"}
		}
		req.Header.Set("Connection", "X_Api_Key_Plan, X-Api-Key-Plan")
		resp, err := g.client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != 200 {
			t.Fatalf("status %d", resp.StatusCode)
		}
		seen := g.backend.last(t)
		if seen.Get("X_api_key_unrelated") != "kept" {
			t.Fatalf("the server dropped an allowed underscore header; the test proves nothing: %v", seen)
		}
		for name, vals := range seen {
			if sameHeaderLoosely(name, "X-Api-Key-Plan") && (name != "X-Api-Key-Plan" || len(vals) != 1 || vals[0] != "ratey") {
				t.Errorf("key %s: the backend saw %s: %q", k.KeyID, name, vals)
			}
		}
	}
}
