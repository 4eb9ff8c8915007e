package apikeys

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/spf13/cobra"

	"github.com/caddy-apikeys/caddy-apikeys/internal/testcaddy"
	"github.com/caddy-apikeys/caddy-apikeys/internal/testredis"
	"github.com/caddy-apikeys/caddy-apikeys/jwtauth"
	"github.com/caddy-apikeys/caddy-apikeys/keystore"
)

// operatorCaddyfile is a gateway on port with the default file store (or
// storeLine), an admin endpoint on adminPort (0: admin off), the test
// dashboard secret and one scope rule.
func operatorCaddyfile(port, adminPort int, storeLine, extra string) string {
	admin := "admin off"
	if adminPort != 0 {
		admin = fmt.Sprintf("admin 127.0.0.1:%d", adminPort)
	}
	return fmt.Sprintf(`{
	%s
	persist_config off
	auto_https off
}
http://127.0.0.1:%d {
	apikeys {
		%s
		dashboard_jwt {
			secret {env.APIKEYS_TEST_JWT_SECRET}
			issuer %s
			audience %s
		}
		scope analytics:read GET /v1/analytics/*
		%s
	}
	respond "owner={http.request.header.X-Api-Key-Owner}" 200
}
`, admin, port, storeLine, testIssuer, testAudience, extra)
}

// caddyCmd runs the test Caddy binary with args and the environment of the
// Caddy process p (its data directory), and returns its combined output.
func caddyCmd(t *testing.T, p *testcaddy.Process, args ...string) (string, error) {
	t.Helper()
	cmd := exec.Command(testcaddy.Binary(t), args...)
	cmd.Env = os.Environ()
	if p != nil {
		cmd.Env = append(cmd.Env, "XDG_DATA_HOME="+filepath.Join(p.Dir(), "data"), "XDG_CONFIG_HOME="+filepath.Join(p.Dir(), "config"))
	}
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// mintHTTP creates a key through the gateway at base and returns it.
func mintHTTP(t *testing.T, base, owner, body string) createdKey {
	t.Helper()
	req, _ := http.NewRequest("POST", base+"/v1/apikeys", strings.NewReader(body))
	req.Header.Set("Authorization", "Bearer "+dashboardToken(t, owner))
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 201 {
		t.Fatalf("create: %d %s", resp.StatusCode, b)
	}
	var env struct{ Data createdKey }
	if err := json.Unmarshal(b, &env); err != nil {
		t.Fatal(err)
	}
	return env.Data
}

// getStatus sends GET base+path with the key and returns the status.
func getStatus(t *testing.T, base, path, key string) int {
	t.Helper()
	req, _ := http.NewRequest("GET", base+path, nil)
	req.Header.Set("Authorization", "Bearer "+key)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	return resp.StatusCode
}

// TestValidateWhileRunning is the validate-then-reload workflow on the
// default file store: `caddy validate` of the running config succeeds (with
// a warning that the file is held), a second `caddy run` on the same file
// still fails, naming the lock, and `caddy reload` reuses the open file.
func TestValidateWhileRunning(t *testing.T) {
	port, adminPort := testcaddy.FreePort(t), testcaddy.FreePort(t)
	proc := testcaddy.Start(t, operatorCaddyfile(port, adminPort, "", ""), []string{fmt.Sprintf("127.0.0.1:%d", port)})
	base := fmt.Sprintf("http://127.0.0.1:%d", port)
	k := mintHTTP(t, base, "alice", `{"name":"v","scopes":["analytics:read"]}`)

	cfg := filepath.Join(proc.Dir(), "Caddyfile")
	start := time.Now()
	out, err := caddyCmd(t, proc, "validate", "--config", cfg, "--adapter", "caddyfile")
	if err != nil || !strings.Contains(out, "Valid configuration") {
		t.Fatalf("caddy validate while Caddy runs: %v\n%s", err, out)
	}
	if !strings.Contains(out, "held by another process") {
		t.Errorf("validate does not warn that the store file is held:\n%s", out)
	}
	if d := time.Since(start); d > 15*time.Second {
		t.Errorf("validate took %v", d)
	}

	// A second Caddy on the same file must not start.
	other := filepath.Join(t.TempDir(), "Caddyfile")
	if err := os.WriteFile(other, []byte(operatorCaddyfile(testcaddy.FreePort(t), 0, "", "")), 0o600); err != nil {
		t.Fatal(err)
	}
	run := exec.Command(testcaddy.Binary(t), "run", "--config", other, "--adapter", "caddyfile")
	run.Env = append(os.Environ(), "XDG_DATA_HOME="+filepath.Join(proc.Dir(), "data"), "XDG_CONFIG_HOME="+t.TempDir())
	done := make(chan struct{})
	var runOut []byte
	var runErr error
	go func() { runOut, runErr = run.CombinedOutput(); close(done) }()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		_ = run.Process.Kill()
		<-done
		t.Fatalf("a second caddy run on the same store file kept running:\n%s", runOut)
	}
	if runErr == nil || !strings.Contains(string(runOut), "locked by another process") {
		t.Errorf("second caddy run on the same file: %v, want a failure naming the lock:\n%s", runErr, runOut)
	}

	// Reload (the new rule lets the key call /v1/reports) reuses the file.
	if err := proc.Reload(operatorCaddyfile(port, adminPort, "", "scope analytics:read GET /v1/reports")); err != nil {
		t.Fatalf("reload after validate: %v", err)
	}
	if s := getStatus(t, base, "/v1/reports", k.Key); s != 200 {
		t.Errorf("key after reload: %d\n%s", s, proc.Logs())
	}
	k2 := mintHTTP(t, base, "alice", `{"name":"after reload"}`)
	if s := getStatus(t, base, "/v1/analytics/x", k2.Key); s != 200 {
		t.Errorf("key minted after reload: %d", s)
	}
}

// TestRedisDownAtStart: with Redis down, Caddy starts (keys it caches keep
// working once Redis is back), but both `caddy validate` and `caddy run`
// log a warning naming the store and the error.
func TestRedisDownAtStart(t *testing.T) {
	rds := testredis.Start(t)
	url := rds.URL()
	rds.Stop()
	storeLine := "store redis " + url + "\n\t\tsecret {env.APIKEYS_TEST_SECRET}"

	cfg := filepath.Join(t.TempDir(), "Caddyfile")
	port := testcaddy.FreePort(t)
	if err := os.WriteFile(cfg, []byte(operatorCaddyfile(port, 0, storeLine, "")), 0o600); err != nil {
		t.Fatal(err)
	}
	out, err := caddyCmd(t, nil, "validate", "--config", cfg, "--adapter", "caddyfile")
	if err != nil || !strings.Contains(out, "Valid configuration") {
		t.Fatalf("validate: %v\n%s", err, out)
	}
	var warn map[string]any
	for _, line := range strings.Split(out, "\n") {
		if strings.Contains(line, "key store unreachable at start") {
			_ = json.Unmarshal([]byte(line[strings.Index(line, "{"):]), &warn)
		}
	}
	if warn == nil || warn["level"] != "warn" || warn["store"] != "redis" || !strings.Contains(fmt.Sprint(warn["error"]), "refused") {
		t.Errorf("validate with Redis down does not warn with the store and the error:\n%s", out)
	}

	proc := testcaddy.Start(t, operatorCaddyfile(port, 0, storeLine, ""), []string{fmt.Sprintf("127.0.0.1:%d", port)})
	if !strings.Contains(proc.Logs(), "key store unreachable at start") {
		t.Errorf("caddy run with Redis down logs no warning:\n%s", proc.Logs())
	}
}

// TestProvisionErrorsNameSubdirectives: mistakes found only once the config
// is loaded (placeholders resolved, JSON written by hand) are reported in
// the config's terms, with what a valid value looks like.
func TestProvisionErrorsNameSubdirectives(t *testing.T) {
	t.Setenv("APIKEYS_TEST_REDIS_URL", "127.0.0.1:6379")
	for _, c := range []struct{ name, apikeys, want string }{
		{"redis URL from env without scheme", "store redis {env.APIKEYS_TEST_REDIS_URL}\nsecret {env.APIKEYS_TEST_SECRET}",
			"must start with its scheme, like redis://localhost:6379"},
	} {
		t.Run(c.name, func(t *testing.T) {
			err := loadCaddyfileErr(t, fmt.Sprintf("{\n\tadmin off\n}\nhttp://127.0.0.1:%d {\n\tapikeys {\n%s\n\t}\n}\n", freePort(t), c.apikeys))
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Errorf("got %v, want an error containing %q", err, c.want)
			}
			if err != nil && strings.Contains(err.Error(), "127.0.0.1:6379") {
				t.Errorf("the error echoes the URL: %v", err)
			}
		})
	}
	// JSON configs skip the Caddyfile parser: the same checks hold.
	for _, c := range []struct{ name, handler, want string }{
		{"no key source", `{"handler":"apikeys","secret":"{env.APIKEYS_TEST_SECRET}","store":{"path":"%s"},"dashboard_jwt":{"issuer":"x"}}`,
			"dashboard_jwt needs exactly one key source, got none"},
		{"unknown method", `{"handler":"apikeys","secret":"{env.APIKEYS_TEST_SECRET}","store":{"path":"%s"},"scope_rules":[{"scope":"a:b","methods":["GTE"],"paths":["/a"]}]}`,
			`unknown HTTP method "GTE"`},
	} {
		t.Run(c.name, func(t *testing.T) {
			handler := fmt.Sprintf(c.handler, filepath.Join(t.TempDir(), "keys.db"))
			cfg := fmt.Sprintf(`{"admin":{"disabled":true},"apps":{"http":{"servers":{"s":{"listen":["127.0.0.1:%d"],"routes":[{"handle":[%s]}]}}}}}`, freePort(t), handler)
			err := caddy.Load([]byte(cfg), true)
			if err == nil {
				_ = caddy.Stop()
			}
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Errorf("got %v, want an error containing %q", err, c.want)
			}
		})
	}
}

// TestDevTokenClaims: --claim adds claims (JSON values decoded, anything
// else a string) to the dev token, and a malformed one is refused.
func TestDevTokenClaims(t *testing.T) {
	root := &cobra.Command{Use: "apikeys"}
	addSubcommands(root)
	var out bytes.Buffer
	root.SetOut(&out)
	root.SetArgs([]string{"dev-token", "--config", "Caddyfile.example", "--envfile", "example.env", "--owner", "alice",
		"--claim", `scopes=["analytics:read"]`, "--claim", "org=acme", "--claim", "level=3", "--claim", "note=a=b"})
	if err := root.Execute(); err != nil {
		t.Fatal(err)
	}
	parts := strings.Split(strings.TrimSpace(out.String()), ".")
	if len(parts) != 3 {
		t.Fatalf("not a JWT: %q", out.String())
	}
	payload, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil {
		t.Fatal(err)
	}
	var claims map[string]any
	if err := json.Unmarshal(payload, &claims); err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(claims["scopes"]) != "[analytics:read]" || claims["org"] != "acme" || claims["level"] != float64(3) ||
		claims["note"] != "a=b" || claims["sub"] != "alice" || claims["iss"] != "caddy-apikeys-example" {
		t.Errorf("claims = %v", claims)
	}
	v, err := jwtauth.New(context.Background(), jwtauth.Config{Secret: []byte(os.Getenv("APIKEYS_DASHBOARD_SECRET")),
		Issuer: "caddy-apikeys-example", ScopesClaim: "scopes"})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	if _, err := v.Verify(strings.TrimSpace(out.String())); err != nil {
		t.Errorf("the token with extra claims does not verify: %v", err)
	}

	root.SetArgs([]string{"dev-token", "--config", "Caddyfile.example", "--envfile", "example.env", "--claim", "novalue"})
	if err := root.Execute(); err == nil || !strings.Contains(err.Error(), "name=value") {
		t.Errorf("--claim without =: %v", err)
	}
}

// TestCLIQuietAndStrict: commands print their result only (no log lines on
// stderr unless --verbose), and a bad --status is an error, not an empty
// list.
func TestCLIQuietAndStrict(t *testing.T) {
	dir := t.TempDir()
	cfg := filepath.Join(dir, "Caddyfile")
	if err := os.WriteFile(cfg, []byte(operatorCaddyfile(8080, 0, "store file "+filepath.Join(dir, "keys.db"), "")), 0o600); err != nil {
		t.Fatal(err)
	}
	run := func(args ...string) (stdout, stderr string, err error) {
		cmd := exec.Command(testcaddy.Binary(t), append([]string{"apikeys"}, args...)...)
		var o, e strings.Builder
		cmd.Stdout, cmd.Stderr = &o, &e
		err = cmd.Run()
		return o.String(), e.String(), err
	}
	for _, args := range [][]string{
		{"create", "--config", cfg, "--owner", "ops", "--name", "quiet"},
		{"list", "--config", cfg, "--owner", "ops"},
		{"list", "--config", cfg, "--owner", "ops", "--status", "active", "--json"},
		{"dev-token", "--config", cfg, "--owner", "ops"},
	} {
		stdout, stderr, err := run(args...)
		if err != nil || stdout == "" || stderr != "" {
			t.Errorf("%v: err=%v, stdout %d bytes, stderr:\n%s", args[0], err, len(stdout), stderr)
		}
	}
	_, stderr, err := run("list", "--config", cfg, "--owner", "ops", "--verbose")
	if err != nil || !strings.Contains(stderr, "using config from file") {
		t.Errorf("list --verbose: %v, stderr:\n%s", err, stderr)
	}
	stdout, stderr, err := run("list", "--config", cfg, "--owner", "ops", "--status", "bogus")
	if err == nil || stdout != "" || !strings.Contains(stderr, `--status "bogus"`) || !strings.Contains(stderr, "active, rotating, disabled, expired, revoked") {
		t.Errorf("list --status bogus: err=%v\nstdout:\n%s\nstderr:\n%s", err, stdout, stderr)
	}
}

// TestIdempotencyRetryAfter: a 409 idempotency_in_progress says to retry
// when the request holding the key will have finished (within its
// store_timeout, 500ms here), not after the 30 s lock; a holder past that
// point has likely died, and then Retry-After is when the record can be
// taken over.
func TestIdempotencyRetryAfter(t *testing.T) {
	g := startGateway(t, "file", "")
	body := `{"name":"busy"}`
	for _, c := range []struct {
		name        string
		lockedFor   time.Duration // LockedUntil - now
		want, want2 string        // Retry-After, allowing for a second boundary
	}{
		{"holder just started", idempotencyLock, "1", "1"},
		{"holder overdue", 10 * time.Second, "10", "9"},
	} {
		t.Run(c.name, func(t *testing.T) {
			idemKey := "busy-" + strings.ReplaceAll(c.name, " ", "-")
			id, fp := idemIDs("alice", idemKey, body)
			ctx, cancel := testCtx()
			defer cancel()
			rec := &keystore.IdempotencyRecord{Token: "holder", Fingerprint: fp, State: keystore.IdempotencyPending,
				LockedUntil: time.Now().Add(c.lockedFor)}
			if existing, err := g.store.ReserveIdempotency(ctx, id, rec, time.Hour); err != nil || existing != nil {
				t.Fatal(err, existing)
			}
			resp := g.do(request{method: "POST", path: "/v1/apikeys", bearer: dashboardToken(t, "alice"), body: body,
				header: map[string]string{"Idempotency-Key": idemKey}})
			if resp.status != 409 || resp.errCode() != "idempotency_in_progress" {
				t.Fatalf("got %d %s", resp.status, resp.body)
			}
			if ra := resp.header.Get("Retry-After"); ra != c.want && ra != c.want2 {
				t.Errorf("Retry-After = %q, want %s", ra, c.want)
			}
		})
	}
}
