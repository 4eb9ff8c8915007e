package apikeys

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/caddy-apikeys/caddy-apikeys/internal/testredis"
	"github.com/caddy-apikeys/caddy-apikeys/keystore"
)

// scrape reads Caddy's metrics endpoint and returns every sample of the
// module's metrics by name and labels, as Prometheus would see them, e.g.
// `caddy_apikeys_validations_total{result="accepted"}`.
func scrape(t *testing.T, url string) map[string]float64 {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 {
		t.Fatalf("metrics endpoint: %d %s", resp.StatusCode, body)
	}
	out := map[string]float64{}
	for _, line := range strings.Split(string(body), "\n") {
		if !strings.HasPrefix(line, metricsNamespace+"_") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			t.Fatalf("metrics line %q: %v", line, err)
		}
		out[line[:i]] = v
	}
	return out
}

// TestMetrics runs a gateway with Caddy's metrics endpoint and checks that
// each of the module's metrics moves when it should.
func TestMetrics(t *testing.T) {
	srv := testredis.Start(t)
	backend := newEchoBackend(t)
	port, metricsPort := freePort(t), freePort(t)
	cfg := fmt.Sprintf(`{
	admin off
	persist_config off
	auto_https off
}

http://127.0.0.1:%[1]d {
	metrics
}

http://127.0.0.1:%[2]d {
	apikeys {
		store redis %[3]s
		secret {env.APIKEYS_TEST_SECRET}
		dashboard_jwt {
			secret {env.APIKEYS_TEST_JWT_SECRET}
			issuer %[4]s
			audience %[5]s
		}
		store_timeout 300ms
	}
	reverse_proxy %[6]s
}
`, metricsPort, port, srv.URL(), testIssuer, testAudience, strings.TrimPrefix(backend.URL, "http://"))
	cfgJSON, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(cfg), nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { stopCaddy(t) })
	if err := caddy.Load(cfgJSON, true); err != nil {
		t.Fatal(err)
	}
	waitCacheSubscribed(t, srv)
	g := &gateway{t: t, base: fmt.Sprintf("http://127.0.0.1:%d", port), client: &http.Client{Timeout: 10 * time.Second}}
	metricsURL := fmt.Sprintf("http://127.0.0.1:%d/metrics", metricsPort)
	before := scrape(t, metricsURL)
	delta := func(after map[string]float64, name string) float64 { return after[name] - before[name] }

	// Mint (twice with one Idempotency-Key: one key, one replay), use,
	// refuse, revoke.
	alice := dashboardToken(t, "alice")
	var key createdKey
	for range 2 {
		resp := g.do(request{method: "POST", path: "/v1/apikeys", bearer: alice, body: `{"name":"m"}`,
			header: map[string]string{"Idempotency-Key": "metrics-1"}})
		if resp.status != 201 {
			t.Fatalf("create: %d %s", resp.status, resp.body)
		}
		key = mustDecodeCreated(t, resp)
	}
	unknown, _ := keystore.Mint("wbk_")
	for range 3 {
		g.status(key.Key)
	}
	g.status(unknown)
	g.status("wbk_short")
	g.status("")
	s := currentStore(t)
	ctx, cancel := testCtx()
	defer cancel()
	if _, err := s.Revoke(ctx, key.KeyID, time.Now()); err != nil {
		t.Fatal(err)
	}
	g.status(key.Key)

	after := scrape(t, metricsURL)
	want := map[string]float64{
		`caddy_apikeys_keys_minted_total`:                          1,
		`caddy_apikeys_idempotent_replays_total`:                   1,
		`caddy_apikeys_keys_revoked_total`:                         1,
		`caddy_apikeys_validations_total{result="accepted"}`:       3,
		`caddy_apikeys_validations_total{result="unknown"}`:        1,
		`caddy_apikeys_validations_total{result="malformed"}`:      1,
		`caddy_apikeys_validations_total{result="no_key"}`:         1,
		`caddy_apikeys_validations_total{result="revoked"}`:        1,
		`caddy_apikeys_cache_lookups_total{result="hit"}`:          3,
		`caddy_apikeys_cache_lookups_total{result="miss"}`:         2, // unknown key; revoked key re-read
		`caddy_apikeys_cache_invalidations_total{source="local"}`:  1,
		`caddy_apikeys_store_duration_seconds_count{op="create"}`:  1,
		`caddy_apikeys_store_duration_seconds_count{op="revoke"}`:  1,
		`caddy_apikeys_store_duration_seconds_count{op="publish"}`: 2, // created, revoked
	}
	for name, w := range want {
		if got := delta(after, name); got != w {
			t.Errorf("%s moved by %v, want %v", name, got, w)
		}
	}
	if got := delta(after, `caddy_apikeys_store_duration_seconds_count{op="by_digest"}`); got < 2 {
		t.Errorf("by_digest store calls moved by %v, want >= 2", got)
	}

	// An outage: store errors, an unavailable validation.
	srv.Stop()
	other, _ := keystore.Mint("wbk_")
	if s := g.status(other); s != 503 {
		t.Fatalf("during outage: %d", s)
	}
	after = scrape(t, metricsURL)
	for name, w := range map[string]float64{
		`caddy_apikeys_store_errors_total{op="by_digest"}`:            1,
		`caddy_apikeys_store_outages_total`:                           1,
		`caddy_apikeys_validations_total{result="store_unavailable"}`: 1,
	} {
		if got := delta(after, name); got < w {
			t.Errorf("%s moved by %v, want >= %v", name, got, w)
		}
	}
}

func mustDecodeCreated(t *testing.T, resp *response) createdKey {
	t.Helper()
	var k createdKey
	if err := json.Unmarshal(resp.env.Data, &k); err != nil {
		t.Fatal(err)
	}
	return k
}

// TestRegisterMetricsTwice: several handlers in one config register into
// the same registry; every config load brings a new one.
func TestRegisterMetricsTwice(t *testing.T) {
	reg := prometheus.NewPedanticRegistry()
	for i := range 2 {
		if err := registerMetrics(reg); err != nil {
			t.Fatalf("registration %d: %v", i+1, err)
		}
	}
	if err := registerMetrics(prometheus.NewPedanticRegistry()); err != nil {
		t.Fatalf("a second registry: %v", err)
	}
	validationAccepted.Inc()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, mf := range mfs {
		found = found || mf.GetName() == "caddy_apikeys_validations_total"
	}
	if !found {
		t.Error("caddy_apikeys_validations_total not gathered")
	}
}
