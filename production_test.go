package apikeys

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"

	"github.com/caddy-apikeys/caddy-apikeys/internal/testcaddy"
	"github.com/caddy-apikeys/caddy-apikeys/internal/testredis"
)

// docBlock returns the first fenced block of docs/production.md that
// opens with fence (e.g. "```caddyfile") after the line heading.
func docBlock(t *testing.T, heading, fence string) string {
	t.Helper()
	b, err := os.ReadFile("docs/production.md")
	if err != nil {
		t.Fatal(err)
	}
	_, rest, ok := strings.Cut(string(b), "\n"+heading+"\n")
	if !ok {
		t.Fatalf("docs/production.md has no %q", heading)
	}
	_, rest, ok = strings.Cut(rest, fence+"\n")
	block, _, ok2 := strings.Cut(rest, "\n```")
	if !ok || !ok2 {
		t.Fatalf("docs/production.md has no %s block after %q", fence, heading)
	}
	return block
}

// TestProductionDoc runs what docs/production.md prints: the Caddyfile
// validates as is, and run (on a loopback address, paths in a temporary
// directory) its access log carries no Authorization, Cookie or
// Idempotency-Key header; the systemd unit passes systemd-analyze verify;
// the Redis backup and restore commands bring a key back that validates.
func TestProductionDoc(t *testing.T) {
	dir := t.TempDir()
	env := []string{"APIKEYS_SECRET=" + testSecret, "DASHBOARD_JWT_SECRET=" + testJWTSecret}
	caddyfile := docBlock(t, "## Caddyfile", "```caddyfile")
	caddyfile = strings.ReplaceAll(caddyfile, "/var/lib/caddy", filepath.Join(dir, "lib"))
	caddyfile = strings.ReplaceAll(caddyfile, "/var/log/caddy", filepath.Join(dir, "log"))

	t.Run("Caddyfile", func(t *testing.T) {
		adminPort, port := testcaddy.FreePort(t), testcaddy.FreePort(t)
		cfg := strings.Replace(caddyfile, "localhost:2019", fmt.Sprintf("localhost:%d", adminPort), 1)
		f := filepath.Join(dir, "Caddyfile")
		if err := os.WriteFile(f, []byte(cfg), 0o600); err != nil {
			t.Fatal(err)
		}
		cmd := exec.Command(testcaddy.Binary(t), "validate", "--config", f, "--adapter", "caddyfile")
		cmd.Env = append(os.Environ(), env...)
		cmd.Env = append(cmd.Env, "XDG_DATA_HOME="+filepath.Join(dir, "data"), "XDG_CONFIG_HOME="+filepath.Join(dir, "config"))
		if out, err := cmd.CombinedOutput(); err != nil || !strings.Contains(string(out), "Valid configuration") {
			t.Fatalf("caddy validate of the production Caddyfile: %v\n%s", err, out)
		}

		// Served on loopback over HTTP (the doc's site gets a certificate).
		cfg = strings.Replace(cfg, "api.example.com {", fmt.Sprintf("http://127.0.0.1:%d {", port), 1)
		cfg = strings.Replace(cfg, "reverse_proxy 127.0.0.1:3000", `respond "ok" 200`, 1)
		proc := testcaddy.Start(t, cfg, []string{fmt.Sprintf("127.0.0.1:%d", port)}, env...)
		base := fmt.Sprintf("http://127.0.0.1:%d", port)
		tok := signToken(t, jwt.SigningMethodHS256, []byte(testJWTSecret), jwt.MapClaims{"sub": "alice",
			"iss": "https://dashboard.example.com", "aud": "api.example.com", "exp": time.Now().Add(time.Hour).Unix()})
		k := mintWithToken(t, base, tok, `{"name":"prod","scopes":["analytics:read"]}`, "prod-1")
		if s := getStatus(t, base, "/v1/analytics/daily", k.Key); s != 200 {
			t.Fatalf("key: %d\n%s", s, proc.Logs())
		}
		for _, name := range []string{filepath.Join(dir, "lib", "apikeys", "keys.db")} {
			if fi, err := os.Stat(name); err != nil || fi.Mode().Perm() != 0o600 {
				t.Errorf("%s: %v %v, want mode 0600", name, fi, err)
			}
		}
		proc.Stop()
		logs, err := os.ReadFile(filepath.Join(dir, "log", "access.log"))
		if err != nil || len(logs) == 0 {
			t.Fatalf("access log: %v", err)
		}
		for _, secret := range []string{"Authorization", "Cookie", "Idempotency-Key", k.Key, tok} {
			if strings.Contains(string(logs), secret) {
				t.Errorf("the access log contains %q:\n%s", secret, logs)
			}
		}
	})

	t.Run("systemd unit", func(t *testing.T) {
		analyze, err := exec.LookPath("systemd-analyze")
		if err != nil {
			t.Skip("systemd-analyze is not installed")
		}
		unit := strings.ReplaceAll(docBlock(t, "## systemd", "```ini"), "/usr/bin/caddy", testcaddy.Binary(t))
		f := filepath.Join(t.TempDir(), "caddy.service")
		if err := os.WriteFile(f, []byte(unit), 0o644); err != nil {
			t.Fatal(err)
		}
		out, err := exec.Command(analyze, "verify", f).CombinedOutput()
		if err != nil || len(strings.TrimSpace(string(out))) != 0 {
			t.Errorf("systemd-analyze verify: %v\n%s", err, out)
		}
	})

	t.Run("Redis backup and restore", func(t *testing.T) {
		cli, err := exec.LookPath("redis-cli")
		if err != nil {
			t.Fatalf("redis-cli is needed: %v", err)
		}
		rds := testredis.Start(t, "--appendonly", "yes", "--appendfsync", "always")
		port := testcaddy.FreePort(t)
		storeLine := "store redis " + rds.URL() + "\n\t\tsecret {env.APIKEYS_TEST_SECRET}"
		proc := testcaddy.Start(t, operatorCaddyfile(port, 0, storeLine, ""), []string{fmt.Sprintf("127.0.0.1:%d", port)})
		base := fmt.Sprintf("http://127.0.0.1:%d", port)
		k := mintHTTP(t, base, "alice", `{"name":"r","scopes":["analytics:read"]}`)
		proc.Stop()

		// The doc's commands, with -p for the test server's port.
		backupDir := t.TempDir()
		sh := func(script string) string {
			t.Helper()
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			cmd := exec.CommandContext(ctx, "bash", "-euo", "pipefail", "-c", script)
			cmd.Env = append(os.Environ(), "PATH="+filepath.Dir(cli)+":"+os.Getenv("PATH"))
			out, err := cmd.CombinedOutput()
			if err != nil {
				t.Fatalf("%s: %v\n%s", script, err, out)
			}
			return string(out)
		}
		redisCLI := fmt.Sprintf("redis-cli -p %d", rds.Port())
		backup := docBlock(t, "## Backup and restore", "```sh\nredis-cli BGSAVE")
		backup = "redis-cli BGSAVE\n" + backup
		backup = strings.ReplaceAll(backup, "/var/backups/redis/dump-$(date +%F).rdb", backupDir+"/dump.rdb")
		backup = strings.ReplaceAll(backup, "redis-cli", redisCLI)
		lines := strings.Split(backup, "\n")
		sh(lines[0]) // BGSAVE
		for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
			if strings.Contains(sh(lines[2]), "rdb_bgsave_in_progress:0") {
				break
			}
			if time.Now().After(deadline) {
				t.Fatal("BGSAVE did not finish")
			}
		}
		sh(lines[3]) // cp
		rds.Stop()

		// Restore into a fresh Redis: appendonly no first, then on.
		restored := testredis.Start(t, "--dir", backupDir, "--appendonly", "no")
		restore := docBlock(t, "## Backup and restore", "```sh\nredis-server /etc/redis/redis.conf --appendonly no")
		for _, line := range strings.Split(restore, "\n") {
			if strings.HasPrefix(line, "redis-cli CONFIG SET") {
				sh(strings.Replace(line, "redis-cli", fmt.Sprintf("redis-cli -p %d", restored.Port()), 1))
			}
		}
		if got := sh(fmt.Sprintf("redis-cli -p %d CONFIG GET appendonly", restored.Port())); !strings.Contains(got, "yes") {
			t.Errorf("appendonly after the restore: %s", got)
		}
		port2 := testcaddy.FreePort(t)
		storeLine = "store redis " + restored.URL() + "\n\t\tsecret {env.APIKEYS_TEST_SECRET}"
		testcaddy.Start(t, operatorCaddyfile(port2, 0, storeLine, ""), []string{fmt.Sprintf("127.0.0.1:%d", port2)})
		if s := getStatus(t, fmt.Sprintf("http://127.0.0.1:%d", port2), "/v1/analytics/daily", k.Key); s != 200 {
			t.Errorf("the key after the Redis restore: %d", s)
		}
	})
}

// mintWithToken creates a key with a dashboard token and an
// Idempotency-Key, through the gateway at base.
func mintWithToken(t *testing.T, base, token, body, idemKey string) createdKey {
	t.Helper()
	out, err := exec.Command("curl", "-sS", "-X", "POST", base+"/v1/apikeys",
		"-H", "Authorization: Bearer "+token, "-H", "Content-Type: application/json",
		"-H", "Idempotency-Key: "+idemKey, "-H", "Cookie: session=secret-cookie", "-d", body).Output()
	if err != nil {
		t.Fatal(err)
	}
	var env struct{ Data createdKey }
	if err := json.Unmarshal(out, &env); err != nil || env.Data.Key == "" {
		t.Fatalf("create: %v %s", err, out)
	}
	return env.Data
}
