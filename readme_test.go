package apikeys

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/caddy-apikeys/caddy-apikeys/internal/testcaddy"
	"github.com/caddy-apikeys/caddy-apikeys/internal/testredis"
)

// readmeBlock returns the first ```sh block of README.md after the line
// heading.
func readmeBlock(t *testing.T, heading string) string {
	t.Helper()
	b, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	_, rest, ok := strings.Cut(string(b), "\n"+heading+"\n")
	if !ok {
		t.Fatalf("README.md has no %q", heading)
	}
	_, rest, ok = strings.Cut(rest, "```sh\n")
	block, _, ok2 := strings.Cut(rest, "\n```")
	if !ok || !ok2 {
		t.Fatalf("README.md has no sh block after %q", heading)
	}
	return block
}

// readEnvFile reads KEY=VALUE lines as --envfile does.
func readEnvFile(t *testing.T, path string) map[string]string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	env := map[string]string{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if k, v, ok := strings.Cut(line, "="); ok && !strings.HasPrefix(line, "#") {
			env[k] = v
		}
	}
	return env
}

// exampleCaddyfile is Caddyfile.example on free ports (gateway, backend,
// admin), with the Redis lines uncommented when redis is set, as the
// comment in the file says to.
func exampleCaddyfile(t *testing.T, gw, be, admin int, redis bool) string {
	t.Helper()
	b, err := os.ReadFile("Caddyfile.example")
	if err != nil {
		t.Fatal(err)
	}
	s := string(b)
	for old, new := range map[string]string{":8080": fmt.Sprintf(":%d", gw), ":8081": fmt.Sprintf(":%d", be),
		"localhost:2019": fmt.Sprintf("127.0.0.1:%d", admin)} {
		if !strings.Contains(s, old) {
			t.Fatalf("Caddyfile.example no longer has %q", old)
		}
		s = strings.ReplaceAll(s, old, new)
	}
	if redis {
		re := regexp.MustCompile(`(?m)^(\s*)# ((store redis|secret) \{env\.[A-Z_]+\})\s*$`)
		if n := len(re.FindAllString(s, -1)); n != 2 {
			t.Fatalf("Caddyfile.example has %d commented store redis / secret lines, want 2", n)
		}
		s = re.ReplaceAllString(s, "$1$2")
	}
	return s
}

// TestReadmeTryIt runs README's "Try it" block, as pasted into a shell,
// against Caddyfile.example (ports moved to free ones) with example.env:
// the file-store example as it is, and its Redis variant with the two
// lines uncommented and the environment example.env names.
func TestReadmeTryIt(t *testing.T) {
	script := readmeBlock(t, "## Try it")
	for _, variant := range []string{"file", "redis"} {
		t.Run(variant, func(t *testing.T) {
			gw, be, admin := testcaddy.FreePort(t), testcaddy.FreePort(t), testcaddy.FreePort(t)
			env := readEnvFile(t, "example.env")
			var rds *testredis.Server
			if variant == "redis" {
				if env["REDIS_URL"] == "" || env["APIKEYS_SECRET"] == "" {
					t.Fatalf("example.env does not set REDIS_URL and APIKEYS_SECRET: %v", env)
				}
				rds = testredis.Start(t)
				env["REDIS_URL"] = rds.URL()
			}
			var envList []string
			for k, v := range env {
				envList = append(envList, k+"="+v)
			}
			proc := testcaddy.Start(t, exampleCaddyfile(t, gw, be, admin, variant == "redis"),
				[]string{fmt.Sprintf("127.0.0.1:%d", gw), fmt.Sprintf("127.0.0.1:%d", be)}, envList...)

			s := strings.ReplaceAll(script, "localhost:8080", fmt.Sprintf("localhost:%d", gw))
			s = strings.ReplaceAll(s, "go run ./cmd/caddy", testcaddy.Binary(t))
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			cmd := exec.CommandContext(ctx, "bash", "-c", s)
			// The test's environment, less what example.env sets: the
			// block must get it from --envfile.
			for _, kv := range os.Environ() {
				if k, _, _ := strings.Cut(kv, "="); env[k] == "" {
					cmd.Env = append(cmd.Env, kv)
				}
			}
			out, err := cmd.CombinedOutput()
			if err != nil {
				t.Fatalf("the Try it block failed: %v\n%s\nCaddy:\n%s", err, out, proc.Logs())
			}
			got := string(out)
			for _, want := range []string{
				`"success":true`,
				`"owner":"alice","scopes":"analytics:read","authorization":""`,
			} {
				if !strings.Contains(got, want) {
					t.Errorf("output lacks %s:\n%s", want, got)
				}
			}
			// Step 4, in order.
			want := []string{"401", "unauthorized", "401", "invalid_api_key", "403", "insufficient_scope", "403", "api_key_not_allowed"}
			re := regexp.MustCompile(`HTTP/[0-9.]+ (\d{3})|"code":"([a-z_]+)"`)
			var seen []string
			for _, m := range re.FindAllStringSubmatch(got, -1) {
				seen = append(seen, m[1]+m[2])
			}
			if strings.Join(seen, " ") != strings.Join(want, " ") {
				t.Errorf("step 4 answered %v, want %v:\n%s", seen, want, got)
			}
			if rds != nil {
				n, err := rds.Client(t).Keys(ctx, "apikeys:*").Result()
				if err != nil || len(n) == 0 {
					t.Errorf("no key in Redis after the Redis variant: %v %v", n, err)
				}
			}
		})
	}
}

// TestReadmeListsRedisKeys mints, uses (with an Idempotency-Key) and
// revokes keys on a real Redis, then checks that every kind of Redis key
// the store wrote is in README's list.
func TestReadmeListsRedisKeys(t *testing.T) {
	readme, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	g := startGateway(t, "redis", "last_used_interval 50ms")
	k := g.create("alice", `{"name":"a"}`)
	g.do(request{method: "POST", path: "/v1/apikeys", bearer: dashboardToken(t, "alice"), body: `{"name":"b"}`,
		header: map[string]string{"Idempotency-Key": "readme-keys"}})
	if r := g.do(request{method: "GET", path: "/v1/other", bearer: k.Key}); r.status != 200 {
		t.Fatalf("using the key: %d", r.status)
	}
	ctx, cancel := testCtx()
	defer cancel()
	kinds := map[string]bool{}
	for deadline := time.Now().Add(5 * time.Second); !kinds["used"] && time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		keys, err := g.redis.Client(t).Keys(ctx, "*").Result()
		if err != nil {
			t.Fatal(err)
		}
		for _, key := range keys {
			parts := strings.SplitN(key, ":", 3)
			if len(parts) != 3 || parts[0] != "apikeys" {
				t.Errorf("Redis key %q is not <namespace>:<kind>:<id>", key)
				continue
			}
			kinds[parts[1]] = true
		}
	}
	if len(kinds) < 5 {
		t.Errorf("only %v written: the test no longer exercises every kind", kinds)
	}
	for kind := range kinds {
		if !strings.Contains(string(readme), "`<namespace>:"+kind+":") {
			t.Errorf("README does not list the Redis keys <namespace>:%s:…", kind)
		}
	}
}

// TestDocsStateGoModVersion: every Go version README.md and xcaddy.md
// state is go.mod's.
func TestDocsStateGoModVersion(t *testing.T) {
	mod, err := os.ReadFile("go.mod")
	if err != nil {
		t.Fatal(err)
	}
	want := regexp.MustCompile(`(?m)^go (\S+)$`).FindSubmatch(mod)
	if want == nil {
		t.Fatal("go.mod has no go line")
	}
	for _, f := range []string{"README.md", "xcaddy.md"} {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		found := regexp.MustCompile(`\bGo (1\.[0-9.]*[0-9])`).FindAllSubmatch(b, -1)
		if len(found) == 0 {
			t.Errorf("%s states no Go version", f)
		}
		for _, m := range found {
			if string(m[1]) != string(want[1]) {
				t.Errorf("%s says Go %s, go.mod says %s", f, m[1], want[1])
			}
		}
	}
}
