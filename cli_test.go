package apikeys

import (
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/caddy-apikeys/caddy-apikeys/internal/testcaddy"
	"github.com/caddy-apikeys/caddy-apikeys/internal/testredis"
)

// TestCLI runs `caddy apikeys create|list|rotate|revoke` as an operator
// would, against the config of a running Caddy (Redis store), and checks
// each result through that Caddy.
func TestCLI(t *testing.T) {
	cfg, base := startCLISite(t, `scope analytics:read GET /v1/analytics/*`)

	// run returns stdout; stderr (Caddy's config-loading logs, errors) is
	// appended when the command fails.
	run := func(args ...string) (string, error) { t.Helper(); return runCLI(t, args...) }
	call := func(key string) int {
		req, _ := http.NewRequest("GET", base+"/v1/analytics/daily", nil)
		req.Header.Set("Authorization", "Bearer "+key)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	parse := func(out string) createdKey {
		t.Helper()
		var env struct{ Data createdKey }
		if err := json.Unmarshal([]byte(out), &env); err != nil {
			t.Fatalf("output is not the create JSON: %v\n%s", err, out)
		}
		return env.Data
	}

	out, err := run("create", "--config", cfg, "--owner", "ops", "--name", "cli key", "--scopes", "analytics:read", "--expires-in-days", "7")
	if err != nil {
		t.Fatalf("create: %v\n%s", err, out)
	}
	k := parse(out)
	if !keyPattern.MatchString(k.Key) || k.Name != "cli key" || strings.Join(k.Scopes, ",") != "analytics:read" || k.ExpiresAt == nil {
		t.Fatalf("created %+v", k)
	}
	if s := call(k.Key); s != 200 {
		t.Fatalf("CLI-minted key through Caddy: %d", s)
	}

	out, err = run("list", "--config", cfg, "--owner", "ops")
	if err != nil || !strings.Contains(out, k.KeyID) || !strings.Contains(out, "KEY_ID") || !strings.Contains(out, "active") {
		t.Fatalf("list: %v\n%s", err, out)
	}
	if strings.Contains(out, k.Key[12:]) {
		t.Fatal("list printed the raw key")
	}

	out, err = run("rotate", "--config", cfg, k.KeyID, "--grace", "0s")
	if err != nil {
		t.Fatalf("rotate: %v\n%s", err, out)
	}
	nk := parse(out)
	if call(nk.Key) != 200 || call(k.Key) != 401 {
		t.Errorf("after rotate with no grace: new %d, old %d", call(nk.Key), call(k.Key))
	}

	out, err = run("revoke", "--config", cfg, nk.KeyID)
	if err != nil || !strings.Contains(out, `"status":"revoked"`) {
		t.Fatalf("revoke: %v\n%s", err, out)
	}
	if s := call(nk.Key); s != 401 {
		t.Errorf("revoked key: %d", s)
	}
	out, _ = run("list", "--config", cfg, "--owner", "ops", "--status", "revoked", "--json")
	lines := strings.Split(strings.TrimSpace(out), "\n")
	var v keyViewT
	if len(lines) != 1 || json.Unmarshal([]byte(lines[0]), &v) != nil || v.KeyID != nk.KeyID || v.Status != "revoked" {
		t.Errorf("list --status revoked --json:\n%s", out)
	}

	// Errors: clear message, non-zero exit.
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"revoke", "--config", cfg, "key_doesnotexist"}, "no key"},
		{[]string{"create", "--config", cfg, "--owner", "ops", "--name", "x", "--scopes", "admin:all"}, "unknown_scope"},
		{[]string{"create", "--config", cfg, "--owner", "ops"}, "--name are required"},
		{[]string{"create", "--config", cfg, "--owner", "ops", "--name", "x", "--expires-in-days", "0"}, "expires_in_days"},
		{[]string{"list", "--owner", "ops"}, "--config is required"},
		{[]string{"rotate", "--config", cfg, nk.KeyID}, "key_not_active"},
	} {
		out, err := run(c.args...)
		if err == nil || !strings.Contains(out, c.want) {
			t.Errorf("%v: err=%v, output does not mention %q:\n%s", c.args, err, c.want, out)
		}
	}
}

// runCLI runs `caddy apikeys args...` (the test binary of testcaddy) with
// the test secret in its environment. It returns stdout, and stderr too
// when the command fails (Caddy's config-loading logs, the error).
func runCLI(t *testing.T, args ...string) (string, error) {
	t.Helper()
	cmd := exec.Command(testcaddy.Binary(t), append([]string{"apikeys"}, args...)...)
	cmd.Env = append(os.Environ(), "APIKEYS_TEST_SECRET="+testSecret)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return string(out) + stderr.String(), err
	}
	return string(out), nil
}

// TestCLIPlans: `caddy apikeys create --plan` gives a key a plan the
// gateway then enforces; the operator's CLI is not capped by the
// dashboard's scopes_claim and plans_claim (create without a plan and with
// full access, rotate a key without a plan); an unknown plan is refused as
// the API refuses it.
func TestCLIPlans(t *testing.T) {
	cfg, base := startCLISite(t, `dashboard_jwt {
	secret {env.APIKEYS_TEST_SECRET}
	scopes_claim scope
	plans_claim plans
}
scope analytics:read GET /v1/analytics/*
plan tiny {
	rate_limit 2 1h
}`)
	created := func(out string, err error) createdKey {
		t.Helper()
		if err != nil {
			t.Fatalf("%v\n%s", err, out)
		}
		var env struct{ Data createdKey }
		if err := json.Unmarshal([]byte(out), &env); err != nil {
			t.Fatalf("output is not the create JSON: %v\n%s", err, out)
		}
		return env.Data
	}
	call := func(key string) (int, string) {
		req, _ := http.NewRequest("GET", base+"/v1/analytics/daily", nil)
		req.Header.Set("Authorization", "Bearer "+key)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode, resp.Header.Get("Ratelimit-Policy")
	}

	k := created(runCLI(t, "create", "--config", cfg, "--owner", "ops", "--name", "tiny", "--plan", "tiny"))
	var statuses []int
	var policy string
	for range 3 {
		s, p := call(k.Key)
		statuses, policy = append(statuses, s), p
	}
	if fmt.Sprint(statuses) != "[200 200 429]" || policy != `"rate";q=2;w=3600` {
		t.Fatalf("a key created with --plan tiny (2/h): %v, RateLimit-Policy %q", statuses, policy)
	}
	// Full access and no plan: what a dashboard session under both claims
	// may not grant without "*", an operator may.
	free := created(runCLI(t, "create", "--config", cfg, "--owner", "ops", "--name", "free"))
	if s, _ := call(free.Key); s != 200 {
		t.Fatalf("a full-access key without a plan from the CLI: %d", s)
	}
	if out, err := runCLI(t, "rotate", "--config", cfg, free.KeyID); err != nil {
		t.Fatalf("rotating a key without a plan from the CLI: %v\n%s", err, out)
	}
	if out, err := runCLI(t, "create", "--config", cfg, "--owner", "ops", "--name", "x", "--plan", "gold"); err == nil || !strings.Contains(out, "unknown_plan") {
		t.Fatalf("--plan gold (not configured): %v\n%s", err, out)
	}
}

// startCLISite starts a Caddy process with a Redis store and extra apikeys
// subdirectives in front of an echo backend, for the CLI tests; it returns
// the path of its Caddyfile (for --config) and its base URL.
func startCLISite(t *testing.T, extra string) (cfg, base string) {
	t.Helper()
	rds := testredis.Start(t)
	backend := newEchoBackend(t)
	port := testcaddy.FreePort(t)
	caddyfile := fmt.Sprintf(`{
	admin off
	persist_config off
}
http://127.0.0.1:%d {
	apikeys {
		store redis %s
		secret {env.APIKEYS_TEST_SECRET}
		%s
	}
	reverse_proxy %s
}
`, port, rds.URL(), extra, strings.TrimPrefix(backend.URL, "http://"))
	proc := testcaddy.Start(t, caddyfile, []string{fmt.Sprintf("127.0.0.1:%d", port)})
	return filepath.Join(proc.Dir(), "Caddyfile"), fmt.Sprintf("http://127.0.0.1:%d", port)
}
