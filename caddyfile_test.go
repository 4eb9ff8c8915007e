package apikeys

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddytest"
)

// TestCaddyfileAdapt adapts every testdata/*.caddyfiletest (a Caddyfile,
// a line of ten dashes, the expected JSON) as Caddy's own adapt tests do.
func TestCaddyfileAdapt(t *testing.T) {
	files, err := filepath.Glob("testdata/*.caddyfiletest")
	if err != nil || len(files) == 0 {
		t.Fatalf("no adapt cases found: %v", err)
	}
	for _, f := range files {
		t.Run(filepath.Base(f), func(t *testing.T) {
			data, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			caddyfile, expected, ok := strings.Cut(string(data), "----------")
			if !ok {
				t.Fatalf("%s has no ---------- separator", f)
			}
			if !caddytest.CompareAdapt(t, f, caddyfile, "caddyfile", strings.TrimSpace(expected)) {
				t.Fail()
			}
		})
	}
}

// TestCaddyfileErrors checks that mistakes are refused with a message that
// names them, and that no refused secret is echoed.
func TestCaddyfileErrors(t *testing.T) {
	cases := []struct {
		name, body, want string
	}{
		{"unknown subdirective", "frobnicate on", `unrecognized subdirective "frobnicate"`},
		{"literal secret", "secret hunter2-hunter2-hunter2-hunter2-hunter2", "secret must be a placeholder"},
		{"literal jwt secret", "dashboard_jwt {\n secret hunter2-hunter2-hunter2-hunter2-hunter2\n}", "secret must be a placeholder"},
		{"redis password in url", "store redis redis://:hunter2@127.0.0.1:6379", "environment variable"},
		{"redis bad scheme", "store redis http://127.0.0.1:6379", "redis:// or rediss://"},
		{"store twice", "store file\nstore file", "only once"},
		{"unknown store", "store mysql", `unknown store type "mysql"`},
		{"store file block", "store file /x {\n foo\n}", `unrecognized store file option "foo"`},
		{"namespace on file", "store file /x {\n namespace a\n}", "store redis option"},
		{"store redis option", "store redis redis://127.0.0.1 {\n pool 3\n}", `unrecognized store redis option "pool"`},
		{"scope without path", "scope a:b", "at least one path"},
		{"scope methods only", "scope a:b GET", "at least one path"},
		{"scope bad token", "scope a:b get /x", "neither an upper-case method nor a path"},
		{"unknown jwt option", "dashboard_jwt {\n algo HS256\n}", `unrecognized dashboard_jwt option "algo"`},
		{"jwt twice", "dashboard_jwt {\n secret {env.A}\n}\ndashboard_jwt {\n secret {env.A}\n}", "only once"},
		{"jwt no key source", "dashboard_jwt {\n issuer x\n}", "dashboard_jwt needs exactly one key source, got none: secret {env."},
		{"jwt two key sources", "dashboard_jwt {\n secret {env.A}\n jwks https://idp/jwks\n}", "got secret and jwks"},
		{"redis url without scheme", "store redis 127.0.0.1:6379", "must start with its scheme, like redis://localhost:6379"},
		{"redis host:port", "store redis localhost:6379", "must start with its scheme"},
		{"scope unknown method", "scope analytics:read GTE /v1/analytics/*", `unknown HTTP method "GTE"`},
		{"bad max days", "max_expires_in_days ninety", "not a positive whole number"},
		{"bad duration", "idempotency_ttl forever", "idempotency_ttl"},
		{"flag with arg", "require_idempotency_key yes", "wrong argument count"},
		{"identity option", "identity_headers {\n user X-User\n}", `unrecognized identity_headers option "user"`},
		{"scopes empty", "scopes", "wrong argument count"},
		{"sentinel password", "store redis redis+sentinel://:hunter2@127.0.0.1:26379/m", "environment variable"},
		{"sentinel query password", "store redis redis+sentinel://127.0.0.1:26379/m?sentinel_password=hunter2", "environment variable"},
		{"sentinel tls", "store redis rediss+sentinel://127.0.0.1:26379/m", "redis+sentinel://"},
		{"wait_replicas word", "store redis redis://127.0.0.1 {\n wait_replicas one\n}", "not a whole number"},
		{"wait_replicas timeout", "store redis redis://127.0.0.1 {\n wait_replicas 1 soon\n}", "not a positive duration"},
		{"wait_replicas args", "store redis redis://127.0.0.1 {\n wait_replicas\n}", "wrong argument count"},
		{"cache twice", "cache off\ncache off", "only once"},
		{"cache bad arg", "cache on", "no argument but off"},
		{"cache off block", "cache off {\n ttl 1s\n}", "takes no block"},
		{"cache option", "cache {\n ttl_max 1s\n}", `unrecognized cache option "ttl_max"`},
		{"cache size", "cache {\n size many\n}", "not a positive whole number"},
		{"cache size zero", "cache {\n size 0\n}", "not a positive whole number"},
		{"cache ttl", "cache {\n ttl soon\n}", "ttl"},
		{"cache pubsub", "cache {\n pubsub on\n}", "want off"},
		{"plan without name", "plan", "plan needs a name"},
		{"plan bad name", "plan fr€e", "not a valid plan name"},
		{"plan twice", "plan free\nplan free", `plan "free" is defined twice`},
		{"plan option", "plan free {\n burst 3\n}", `unrecognized plan option "burst"`},
		{"rate_limit args", "plan free {\n rate_limit 10\n}", "plan free: rate_limit takes <requests> <window>"},
		{"rate_limit requests", "plan free {\n rate_limit ten 1m\n}", `plan free: rate_limit requests: "ten" is not a positive whole number`},
		{"rate_limit zero", "plan free {\n rate_limit 0 1m\n}", "rate_limit requests"},
		{"rate_limit window", "plan free {\n rate_limit 10 soon\n}", `plan free: rate_limit window: "soon"`},
		{"rate_limit short window", "plan free {\n rate_limit 10 500ms\n}", "not a duration from 1s to 24h"},
		{"rate_limit twice", "plan free {\n rate_limit 10 1m\n rate_limit 10 1m\n}", "rate_limit may be given only once"},
		{"quota period", "plan free {\n quota 10 week\n}", `plan free: quota period must be day or month, got "week"`},
		{"quota requests", "plan free {\n quota -1 day\n}", "plan free: quota requests"},
		{"quota twice", "plan free {\n quota 1 day\n quota 1 day\n}", "quota may be given only once"},
		{"default_plan unknown", "plan free\ndefault_plan pro", `default_plan "pro" names no plan of this apikeys block (plans: free)`},
		{"default_plan twice", "plan free\ndefault_plan free\ndefault_plan free", "default_plan may be given only once"},
		{"plans_claim args", "dashboard_jwt {\n secret {env.A}\n plans_claim\n}", "wrong argument count"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			cfg := ":8080 {\n\tapikeys {\n" + tc.body + "\n\t}\n}\n"
			_, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(cfg), nil)
			if err == nil {
				t.Fatalf("adapted without error")
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %q does not mention %q", err, tc.want)
			}
			if strings.Contains(err.Error(), "hunter2") {
				t.Errorf("error echoes the secret: %q", err)
			}
		})
	}
}

// TestProvisionErrors checks mistakes only visible at provision time.
func TestProvisionErrors(t *testing.T) {
	t.Setenv("SHORT_SECRET", "too-short")
	dir := t.TempDir()
	cases := []struct {
		name, body, want string
	}{
		{"short secret", "store file " + dir + "/a.db\nsecret {env.SHORT_SECRET}", "at least 32 bytes"},
		{"missing env secret", "store file " + dir + "/b.db\nsecret {env.APIKEYS_NOT_SET_ANYWHERE}", "secret"},
		{"redis without secret", "store redis redis://127.0.0.1:1", "secret is required with the redis store"},
		{"bad prefix", "store file " + dir + "/c.db\nkey_prefix WBK", "key_prefix"},
		{"bad management path", "store file " + dir + "/d.db\nmanagement_path v1/keys", "management_path"},
		{"bad scope name", "store file " + dir + "/e.db\nscopes bad!scope", "not a valid scope"},
		{"bad identity header", "store file " + dir + "/f.db\nidentity_headers {\n id X_Bad:Header\n}", "not a valid header name"},
		{"short jwt secret", "store file " + dir + "/g.db\ndashboard_jwt {\n secret {env.SHORT_SECRET}\n}", "dashboard_jwt"},
		{"cache refresh not below ttl", "store file " + dir + "/h.db\ncache {\n ttl 2s\n refresh 2s\n}", "must be less than ttl"},
		{"cache negative window", "store file " + dir + "/i.db\ncache {\n outage_window -1s\n}", "must not be negative"},
	}
	// Plans in JSON configs, which skip the Caddyfile's checks.
	plans := []struct {
		name, plans, defaultPlan, want string
	}{
		{"plan bad name", `[{"name":"a b"}]`, "", `plan 1: "a b" is not a valid plan name`},
		{"plan twice", `[{"name":"a"},{"name":"a"}]`, "", `plan "a" is defined twice`},
		{"plan zero requests", `[{"name":"a","rate_limit":{"requests":0,"window":1000000000}}]`, "", `plan "a": rate_limit requests must be from 1 to 999999999999999, got 0`},
		{"plan requests over 15 digits", `[{"name":"a","rate_limit":{"requests":1000000000000000,"window":86400000000000}}]`, "", `plan "a": rate_limit requests must be from 1 to 999999999999999`},
		{"plan short window", `[{"name":"a","rate_limit":{"requests":5,"window":1000}}]`, "", `plan "a": rate_limit window must be at least 1s`},
		{"plan quota zero", `[{"name":"a","quota":{"requests":0,"period":"day"}}]`, "", `plan "a": quota requests must be from 1 to 999999999999999, got 0`},
		{"plan quota period", `[{"name":"a","quota":{"requests":5,"period":"year"}}]`, "", `plan "a": quota period must be day or month, got "year"`},
		{"default plan unknown", `[{"name":"a"}]`, "b", `default_plan "b" is not a configured plan (have a)`},
		{"default plan without plans", `[]`, "b", `default_plan "b" is not a configured plan (have none)`},
	}
	for i, tc := range plans {
		t.Run(tc.name, func(t *testing.T) {
			h := fmt.Sprintf(`{"handler":"apikeys","store":{"path":%q},"plans":%s,"default_plan":%q}`, filepath.Join(dir, fmt.Sprintf("p%d.db", i)), tc.plans, tc.defaultPlan)
			cfg := `{"admin":{"disabled":true},"apps":{"http":{"servers":{"s":{"listen":["127.0.0.1:0"],"routes":[{"handle":[` + h + `]}]}}}}}`
			err := caddy.Load([]byte(cfg), true)
			if err == nil {
				_ = caddy.Stop()
				t.Fatal("config loaded without error")
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %q does not mention %q", err, tc.want)
			}
		})
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			cfg := "{\n\tadmin off\n\tpersist_config off\n}\nhttp://127.0.0.1:0 {\n\tapikeys {\n" + tc.body + "\n\t}\n}\n"
			err := loadCaddyfileErr(t, cfg)
			if err == nil {
				t.Fatal("config loaded without error")
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %q does not mention %q", err, tc.want)
			}
			if strings.Contains(err.Error(), "too-short") {
				t.Errorf("error echoes the secret: %q", err)
			}
		})
	}
}
