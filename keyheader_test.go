package apikeys

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"path/filepath"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// TestKeyHeader: with key_header, the key is also accepted from that
// header, raw; the backend never receives it (nor Authorization); sending
// it both ways is refused; it cannot be smuggled as a trailer; keys in the
// query string stay refused.
func TestKeyHeader(t *testing.T) {
	g := startEdgeGateway(t, "key_header X-API-Key")
	seen := func(resp rawResponse) rawSeen {
		t.Helper()
		var s rawSeen
		if err := json.Unmarshal(resp.body, &s); err != nil {
			t.Fatalf("backend answer: %v: %s", err, resp.body)
		}
		return s
	}

	resp := sendRaw(t, g.raw, getRaw("GET", "/v1/analytics/daily", "", "X-Api-Key: "+g.analytics))
	if resp.status != 200 {
		t.Fatalf("key in X-Api-Key: %d %s", resp.status, resp.body)
	}
	s := seen(resp)
	if v := s.header("X-Api-Key"); len(v) != 0 {
		t.Errorf("the backend received the key header: %q", v)
	}
	if v := s.header("X-Api-Key-Owner"); len(v) != 1 || v[0] != "edge-owner" {
		t.Errorf("identity header: %q", v)
	}
	// Any case of the name; the scope rules apply as with Authorization.
	if resp := sendRaw(t, g.raw, getRaw("GET", "/v1/analytics/daily", "", "x-api-key: "+g.analytics)); resp.status != 200 {
		t.Errorf("lower-case header name: %d", resp.status)
	}
	if resp := sendRaw(t, g.raw, getRaw("POST", "/v1/webhooks/1", "", "X-Api-Key: "+g.analytics, "Content-Length: 0")); resp.status != 403 {
		t.Errorf("scoped key outside its scope: %d, want 403", resp.status)
	}

	for name, c := range map[string]struct {
		key    string
		extra  []string
		code   string
		status int
	}{
		"both headers":        {g.full, []string{"X-Api-Key: " + g.analytics}, "ambiguous_credentials", 400},
		"Bearer scheme in it": {"", []string{"X-Api-Key: Bearer " + g.analytics}, "invalid_api_key", 401},
		"two values":          {"", []string{"X-Api-Key: " + g.analytics, "X-Api-Key: " + g.analytics}, "invalid_api_key", 401},
		"empty":               {"", []string{"X-Api-Key: "}, "invalid_api_key", 401},
		"typo":                {"", []string{"X-Api-Key: " + g.analytics[:len(g.analytics)-1] + "x"}, "invalid_api_key", 401},
		"none":                {"", nil, "unauthorized", 401},
	} {
		resp := sendRaw(t, g.raw, getRaw("GET", "/v1/analytics/daily", c.key, c.extra...))
		if resp.status != c.status || resp.code != c.code {
			t.Errorf("%s: %d %q, want %d %s", name, resp.status, resp.code, c.status, c.code)
		}
	}

	// Query strings never carry keys.
	for _, q := range []string{"api_key", "apikey", "key", "X-Api-Key", "access_token"} {
		target := "/v1/analytics/daily?" + q + "=" + url.QueryEscape(g.analytics)
		if resp := sendRaw(t, g.raw, getRaw("GET", target, "")); resp.status != 401 {
			t.Errorf("key in the query (%s): %d, want 401", q, resp.status)
		}
	}

	// Trailers: declared under the key header's name, refused; undeclared,
	// dropped before the backend.
	chunked := func(decl string) string {
		var b strings.Builder
		fmt.Fprintf(&b, "POST /v1/webhooks/1 HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer %s\r\nTransfer-Encoding: chunked\r\n", g.webhooks)
		if decl != "" {
			fmt.Fprintf(&b, "Trailer: %s\r\n", decl)
		}
		fmt.Fprintf(&b, "Connection: close\r\n\r\n2\r\n{}\r\n0\r\nX-Api-Key: %s\r\n\r\n", g.full)
		return b.String()
	}
	for _, decl := range []string{"X-Api-Key", "x_api_key"} {
		if resp := sendRaw(t, g.raw, chunked(decl)); resp.status != 400 || resp.code != "forbidden_trailer" {
			t.Errorf("Trailer: %s: %d %q, want 400 forbidden_trailer", decl, resp.status, resp.code)
		}
	}
	resp = sendRaw(t, g.raw, chunked(""))
	if resp.status != 200 {
		t.Fatalf("undeclared trailer: %d %s", resp.status, resp.body)
	}
	if v := fieldValues(seen(resp).Trailers, "X-Api-Key"); len(v) != 0 {
		t.Errorf("the backend received the key header as a trailer: %q", v)
	}
}

// TestKeyHeaderOff: without key_header, X-Api-Key is not a credential.
func TestKeyHeaderOff(t *testing.T) {
	g := startEdgeGateway(t, "")
	if resp := sendRaw(t, g.raw, getRaw("GET", "/v1/analytics/daily", "", "X-Api-Key: "+g.analytics)); resp.status != 401 || resp.code != "unauthorized" {
		t.Errorf("X-Api-Key without key_header: %d %q, want 401 unauthorized", resp.status, resp.code)
	}
}

// TestKeyHeaderValidation: key_header may not name a header the gateway
// sets or consumes, nor a hop-by-hop one.
func TestKeyHeaderValidation(t *testing.T) {
	for _, name := range []string{"Authorization", "X-Api-Key-Owner", "x_api_key_id", "Connection", "Proxy-Authorization", "Transfer-Encoding", "Bad Header"} {
		h := &Handler{KeyHeader: name}
		h.applyDefaults()
		if err := h.Validate(); err == nil || !strings.Contains(err.Error(), "key_header") {
			t.Errorf("key_header %q: %v", name, err)
		}
	}
	h := &Handler{KeyHeader: "x-api-key"}
	h.applyDefaults()
	if err := h.Validate(); err != nil {
		t.Fatal(err)
	}
	if h.KeyHeader != "X-Api-Key" || !h.isProtected("X_API_KEY") {
		t.Errorf("key_header %q is not canonical or not protected (%v)", h.KeyHeader, h.protected)
	}
}

// TestKeyHeaderHitAllocs: a cached key presented in key_header costs the
// guard one allocation, as with Authorization (BenchmarkGuardHit), and
// Authorization-only requests on a handler with key_header stay at one.
func TestKeyHeaderHitAllocs(t *testing.T) {
	if raceEnabled {
		t.Skip("allocation counts differ under the race detector")
	}
	h := &Handler{Store: &StoreConfig{Path: filepath.Join(t.TempDir(), "keys.db")}, Secret: "{env.APIKEYS_TEST_SECRET}", KeyHeader: "X-API-Key"}
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	defer cancel()
	if err := h.provision(ctx, nil); err != nil {
		t.Fatal(err)
	}
	defer h.Cleanup()
	// Caddy's default level: Info (the guard logs its decisions at Debug).
	h.logger = zap.New(zapcore.NewCore(zapcore.NewJSONEncoder(zap.NewProductionEncoderConfig()), zapcore.AddSync(io.Discard), zapcore.InfoLevel))
	key := benchKey(t, h, nil)
	br := newBenchRequest(t, "/v1/anything", key)
	w := &nopWriter{h: http.Header{}}
	viaHeader := []string{key}
	for name, reset := range map[string]func() *http.Request{
		"key header":    func() *http.Request { br.r.Header["X-Api-Key"] = viaHeader; return br.r },
		"authorization": br.reset,
	} {
		passed := false
		next := caddyhttp.HandlerFunc(func(http.ResponseWriter, *http.Request) error { passed = true; return nil })
		if err := h.ServeHTTP(w, reset(), next); err != nil || !passed {
			t.Fatalf("%s: the guard refused the key: %v %v", name, err, w.h)
		}
		allocs := testing.AllocsPerRun(200, func() {
			if err := h.ServeHTTP(w, reset(), nextOK); err != nil {
				t.Fatal(err)
			}
		})
		if allocs > 1 {
			t.Errorf("%s: %.1f allocations per hit, want 1", name, allocs)
		}
	}
}
