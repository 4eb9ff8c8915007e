package apikeys

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/h2c"

	"github.com/caddy-apikeys/caddy-apikeys/internal/backendpath"
	"github.com/caddy-apikeys/caddy-apikeys/requesttarget"
)

// The edge tests hold the gateway to invariant 6 of DESIGN.md: the backend
// receives exactly the request the guard authorised. They send raw bytes
// (no client normalises anything) through a real Caddy with reverse_proxy
// to real backends:
//
//   - muxBackend, a stock Go http.ServeMux with method and path routes, which
//     names the handler that ran;
//   - rawEcho, a TCP server that reports the request line, header lines and
//     trailer lines exactly as they arrived, and speaks WebSocket's
//     handshake;
//   - an h2c backend (golang.org/x/net/http2/h2c) that would switch to
//     HTTP/2 on `Upgrade: h2c`.

// muxRoutes are the ServeMux's patterns and, for each, the scope it serves
// under the edge config's rules ("" for full-access only).
var muxRoutes = []struct{ pattern, scope string }{
	{"GET /v1/analytics", "analytics:read"},
	{"GET /v1/analytics/", "analytics:read"},
	{"GET /v1/analytics/{id}", "analytics:read"},
	{"POST /v1/analytics/", ""},
	{"/v1/webhooks/", "webhooks:manage"},
	{"GET /v1/webhooks/{id}", "webhooks:manage"},
	{"/v1/billing/", ""},
	{"/", ""},
}

func newMuxBackend(t *testing.T) string {
	mux := http.NewServeMux()
	for _, rt := range muxRoutes {
		mux.HandleFunc(rt.pattern, func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("X-Handler", rt.pattern)
			w.Header().Set("X-Seen-Owner", r.Header.Get("X-Api-Key-Owner"))
			_, _ = io.WriteString(w, "ok")
		})
	}
	srv := &http.Server{Handler: mux}
	return serveOnLoopback(t, srv)
}

// newH2CBackend accepts `Upgrade: h2c` (and HTTP/2 with prior knowledge)
// and reports which protocol each request used.
func newH2CBackend(t *testing.T) string {
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Proto", r.Proto)
		w.Header().Set("X-Seen-Upgrade", r.Header.Get("Upgrade"))
		_, _ = io.WriteString(w, "ok")
	})
	return serveOnLoopback(t, &http.Server{Handler: h2c.NewHandler(h, &http2.Server{})})
}

func serveOnLoopback(t *testing.T, srv *http.Server) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(func() { _ = srv.Close() })
	return ln.Addr().String()
}

// rawSeen is what rawEcho received: the request line, header lines and
// trailer lines, byte for byte (without line ends).
type rawSeen struct {
	RequestLine string   `json:"request_line"`
	Headers     []string `json:"headers"`
	Trailers    []string `json:"trailers"`
}

func (s rawSeen) target() string {
	f := strings.Fields(s.RequestLine)
	if len(f) != 3 {
		return ""
	}
	return f[1]
}

// header returns the values of the header lines named name (any case).
func (s rawSeen) header(name string) []string { return fieldValues(s.Headers, name) }

func fieldValues(lines []string, name string) []string {
	var vals []string
	for _, l := range lines {
		if k, v, ok := strings.Cut(l, ":"); ok && strings.EqualFold(strings.TrimSpace(k), name) {
			vals = append(vals, strings.TrimSpace(v))
		}
	}
	return vals
}

// newRawEcho starts rawEcho. It answers each request with its rawSeen as
// JSON and closes the connection; to a WebSocket handshake it answers 101,
// writes its rawSeen as one JSON line, then echoes bytes.
func newRawEcho(t *testing.T) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer conn.Close()
				_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
				serveRawEcho(conn)
			}()
		}
	}()
	return ln.Addr().String()
}

func serveRawEcho(conn net.Conn) {
	br := bufio.NewReader(conn)
	readLines := func() ([]string, error) {
		var lines []string
		for {
			l, err := br.ReadString('\n')
			if err != nil {
				return nil, err
			}
			l = strings.TrimRight(l, "\r\n")
			if l == "" {
				return lines, nil
			}
			lines = append(lines, l)
		}
	}
	head, err := readLines()
	if err != nil || len(head) == 0 {
		return
	}
	seen := rawSeen{RequestLine: head[0], Headers: head[1:]}
	if slices.ContainsFunc(seen.header("Upgrade"), func(v string) bool { return strings.EqualFold(v, "websocket") }) {
		body, _ := json.Marshal(seen)
		fmt.Fprintf(conn, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n%s\n", body)
		_, _ = io.Copy(conn, br)
		return
	}
	switch {
	case slices.ContainsFunc(seen.header("Transfer-Encoding"), func(v string) bool { return strings.Contains(strings.ToLower(v), "chunked") }):
		if _, err := io.Copy(io.Discard, httputil.NewChunkedReader(br)); err != nil {
			return
		}
		if seen.Trailers, err = readLines(); err != nil {
			return
		}
	case len(seen.header("Content-Length")) > 0:
		n, _ := strconv.Atoi(seen.header("Content-Length")[0])
		if _, err := io.CopyN(io.Discard, br, int64(n)); err != nil {
			return
		}
	}
	body, _ := json.Marshal(seen)
	fmt.Fprintf(conn, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s", len(body), body)
}

// edgeSites describes a real Caddy for the edge tests: one site per
// backend, all behind the same apikeys config (the README's scope rules)
// and store.
type edgeSites struct {
	global    string            // global options
	extra     string            // more apikeys subdirectives
	proxyBody string            // the reverse_proxy block's body
	backends  map[string]string // site name -> backend address
}

// edgeGateway is a running edgeSites with three keys minted.
type edgeGateway struct {
	sites         map[string]string // site name -> address
	mux, raw, h2c string            // startEdgeGateway's sites
	analytics     string            // a key with analytics:read
	webhooks      string            // a key with webhooks:manage
	full          string            // a full-access key
}

// startEdgeGateway starts sites for the ServeMux, rawEcho and h2c backends.
func startEdgeGateway(t *testing.T, extra string) *edgeGateway {
	t.Helper()
	g := startSites(t, edgeSites{extra: extra, backends: map[string]string{
		"mux": newMuxBackend(t), "raw": newRawEcho(t), "h2c": newH2CBackend(t)}})
	g.mux, g.raw, g.h2c = g.sites["mux"], g.sites["raw"], g.sites["h2c"]
	return g
}

func startSites(t *testing.T, cfg edgeSites) *edgeGateway {
	t.Helper()
	storePath := filepath.Join(t.TempDir(), "keys.db")
	g := &edgeGateway{sites: map[string]string{}}
	var sites strings.Builder
	for name, backend := range cfg.backends {
		port := freePort(t)
		g.sites[name] = fmt.Sprintf("127.0.0.1:%d", port)
		fmt.Fprintf(&sites, `
http://:%d {
	apikeys {
		store file %s
		secret {env.APIKEYS_TEST_SECRET}
		dashboard_jwt {
			secret {env.APIKEYS_TEST_JWT_SECRET}
			issuer %s
			audience %s
		}
		scope analytics:read GET /v1/analytics /v1/analytics/*
		scope webhooks:manage /v1/webhooks/*
		%s
	}
	reverse_proxy %s {
		%s
	}
}
`, port, storePath, testIssuer, testAudience, cfg.extra, backend, cfg.proxyBody)
	}
	caddyfile := "{\n\tadmin off\n\tpersist_config off\n\tauto_https off\n\t" + cfg.global + "\n}\n" + sites.String()
	cfgJSON, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(caddyfile), nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := caddy.Load(cfgJSON, true); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { stopCaddy(t) })
	var site string
	for _, a := range g.sites {
		site = a
		break
	}
	mint := func(body string) string { return mintKey(t, site, "edge-owner", body) }
	g.analytics = mint(`{"name":"analytics","scopes":["analytics:read"]}`)
	g.webhooks = mint(`{"name":"webhooks","scopes":["webhooks:manage"]}`)
	g.full = mint(`{"name":"full"}`)
	return g
}

// mintKey creates a key for owner through the management API at addr and
// returns the raw key.
func mintKey(t *testing.T, addr, owner, body string) string {
	t.Helper()
	req, _ := http.NewRequest("POST", "http://"+addr+"/v1/apikeys", strings.NewReader(body))
	req.Header.Set("Authorization", "Bearer "+dashboardToken(t, owner))
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var out struct {
		Data struct {
			Key string `json:"key"`
		} `json:"data"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil || resp.StatusCode != 201 {
		t.Fatalf("minting a key: %d %v", resp.StatusCode, err)
	}
	return out.Data.Key
}

// rawResponse is a response read off a raw connection.
type rawResponse struct {
	status int
	header http.Header
	body   []byte
	code   string // error.code of a JSON error envelope
}

// sendRaw writes raw as one request on a new connection to addr and reads
// the response.
func sendRaw(t *testing.T, addr, raw string) rawResponse {
	t.Helper()
	conn, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(conn, raw); err != nil {
		t.Fatal(err)
	}
	return readRawResponse(t, bufio.NewReader(conn), raw)
}

func readRawResponse(t *testing.T, br *bufio.Reader, sent string) rawResponse {
	t.Helper()
	method, _, _ := strings.Cut(sent, " ")
	resp, err := http.ReadResponse(br, &http.Request{Method: method})
	if err != nil {
		t.Fatalf("reading the response to %q: %v", firstLine(sent), err)
	}
	defer resp.Body.Close()
	out := rawResponse{status: resp.StatusCode, header: resp.Header}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		out.body, _ = io.ReadAll(resp.Body)
	}
	var env struct {
		Error *struct {
			Code string `json:"code"`
		} `json:"error"`
	}
	if json.Unmarshal(out.body, &env) == nil && env.Error != nil {
		out.code = env.Error.Code
	}
	return out
}

func firstLine(s string) string { l, _, _ := strings.Cut(s, "\r\n"); return l }

// getRaw builds a raw request with a bearer key and extra header lines.
func getRaw(method, target, key string, extra ...string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s %s HTTP/1.1\r\nHost: gateway\r\n", method, target)
	if key != "" {
		fmt.Fprintf(&b, "Authorization: Bearer %s\r\n", key)
	}
	for _, l := range extra {
		b.WriteString(l + "\r\n")
	}
	b.WriteString("Connection: close\r\n\r\n")
	return b.String()
}

// mayReach is the test's own statement of the scope rules, written apart
// from the guard: may a key holding scope make method on path (a backend's
// reading of it)?
func mayReach(scope, method, path string) bool {
	switch scope {
	case "analytics:read":
		return (method == "GET" || method == "HEAD") && (path == "/v1/analytics" || strings.HasPrefix(path, "/v1/analytics/"))
	case "webhooks:manage":
		return strings.HasPrefix(path, "/v1/webhooks/")
	}
	return false
}

// edgeCorpus generates request targets by combining prefixes, dot
// segments, separators and encodings, plus the inputs of issue 9. Seeded,
// so every run sends the same targets.
func edgeCorpus() []string {
	prefixes := []string{"/v1/analytics/", "/v1/webhooks/", "/v1/webhooks/1", "/v1/analytics/x", "/v1/"}
	dots := []string{"..", ".", "%2e%2e", "%2E%2E", ".%2e", "%2e.", "%2e", "..;", "..%3b", ";", "%252e%252e",
		"%c0%ae%c0%ae", "%e0%80%ae%e0%80%ae", "..%00", "%00", "..%c0%af", "", "x", "X", "%61"}
	seps := []string{"/", "%2f", "%2F", `\`, "%5c", "%5C", "//", "%252f", ";/", "/./", "%3f", "%23", "%20/"}
	tails := []string{"analytics/x", "webhooks/1", "billing/1", "ANALYTICS/x", ""}
	var all []string
	for _, p := range prefixes {
		for _, d := range dots {
			for _, s := range seps {
				for _, tl := range tails {
					all = append(all, p+d+s+tl)
				}
			}
		}
	}
	rng := rand.New(rand.NewPCG(9, 9))
	rng.Shuffle(len(all), func(i, j int) { all[i], all[j] = all[j], all[i] })
	corpus := append([]string{
		// The inputs of issue 9.
		"/v1/webhooks/%2e%2e/analytics/x",
		"/v1/webhooks/..%2Fanalytics/x",
		"/v1/webhooks/1%2F..%2F..%2Fanalytics%2Fx",
		"/v1/webhooks/../analytics/x",
		"/v1/analytics/..;/webhooks/1",
		`/v1/analytics/..\webhooks/1`,
		// Canonical ones, which must pass for the right key.
		"/v1/analytics", "/v1/analytics/", "/v1/analytics/daily", "/v1/webhooks/1", "/v1/webhooks/",
		"/v1/billing/1", "/", "/v1/analytics/caf%C3%A9", "/v1/analytics/a%20b",
		// Case, absolute form, overlong and double encodings.
		"/V1/ANALYTICS/x", "/v1/Analytics/x", "/v1/WEBHOOKS/1", "http://gateway/v1/webhooks/1",
		"/v1/analytics/%c0%af..%c0%afwebhooks/1", "/v1/analytics%2f..%2fwebhooks/1",
		"/v1/analytics/%25%32%65%25%32%65/webhooks/1", "/v1/analytics/%u002e%u002e/webhooks",
		"/v1/analytics/x/../../webhooks/1", "/v1/analytics/./../webhooks/1", "//v1/webhooks/1",
		"/v1/analytics/..%2f..%2fwebhooks/1", "/v1/analytics/..%5c..%5cwebhooks/1", "/v1/analytics/.%00./webhooks/1",
		"/v1/analytics/x;jsessionid=1", "/v1/analytics/x%3b/../../webhooks/1",
		"/v1/analytics/%EF%BC%8E%EF%BC%8E/webhooks/1", // fullwidth dots: ".." after NFKC
	}, all[:600]...)
	return corpus
}

// TestEdgeDifferential sends every target of edgeCorpus through a real
// Caddy to the ServeMux backend with two scoped keys and to rawEcho with
// the analytics key. Whatever the gateway does, it must hold that:
//
//   - the answer is 2xx or 4xx, never 5xx (nor 1xx or 3xx);
//   - a 2xx from the ServeMux names a handler the key's scope serves;
//   - a 2xx from rawEcho carries the target exactly as sent, and every
//     backend model of package backendpath reads it as a path the key may
//     reach (by the test's own statement of the rules, mayReach);
//   - rawEcho received the guard's identity headers, once each, and no
//     Authorization.
func TestEdgeDifferential(t *testing.T) {
	g := startEdgeGateway(t, "")
	corpus := edgeCorpus()
	if len(corpus) < 300 {
		t.Fatalf("the corpus has %d targets, want at least 300", len(corpus))
	}
	scopeOf := map[string]string{}
	for _, rt := range muxRoutes {
		scopeOf[rt.pattern] = rt.scope
	}
	type tally struct{ passed, refused int }
	var muxTally, rawTally tally
	keys := []struct{ scope, key string }{{"analytics:read", g.analytics}, {"webhooks:manage", g.webhooks}}
	for _, target := range corpus {
		for _, k := range keys {
			resp := sendRaw(t, g.mux, getRaw("GET", target, k.key))
			switch {
			case resp.status >= 200 && resp.status < 300:
				muxTally.passed++
				handler := resp.header.Get("X-Handler")
				if scopeOf[handler] != k.scope {
					t.Errorf("GET %s with a %s key: 200 from ServeMux handler %q, which that scope does not serve", target, k.scope, handler)
				}
				if resp.header.Get("X-Seen-Owner") != "edge-owner" {
					t.Errorf("GET %s: the backend saw owner %q", target, resp.header.Get("X-Seen-Owner"))
				}
			case resp.status >= 400 && resp.status < 500:
				muxTally.refused++
			default:
				t.Errorf("GET %s with a %s key: status %d, want 2xx or 4xx", target, k.scope, resp.status)
			}
		}

		resp := sendRaw(t, g.raw, getRaw("GET", target, g.analytics))
		switch {
		case resp.status >= 200 && resp.status < 300:
			rawTally.passed++
			var seen rawSeen
			if err := json.Unmarshal(resp.body, &seen); err != nil {
				t.Fatalf("GET %s: rawEcho's answer: %v", target, err)
			}
			checkForwarded(t, target, seen)
		case resp.status >= 400 && resp.status < 500:
			rawTally.refused++
		default:
			t.Errorf("GET %s (rawEcho): status %d, want 2xx or 4xx", target, resp.status)
		}
	}
	t.Logf("%d targets; ServeMux: %d passed, %d refused; rawEcho: %d passed, %d refused",
		len(corpus), muxTally.passed, muxTally.refused, rawTally.passed, rawTally.refused)
	if muxTally.passed == 0 || rawTally.passed == 0 {
		t.Error("nothing passed: the corpus checks nothing")
	}
}

// checkForwarded holds one request rawEcho received with the analytics key
// to the invariants of TestEdgeDifferential.
func checkForwarded(t *testing.T, sent string, seen rawSeen) {
	t.Helper()
	got := seen.target()
	want := sent
	if strings.HasPrefix(sent, "http://") {
		want = "/" + strings.SplitN(sent, "/", 4)[3] // absolute form: the proxy sends the path
	}
	if got != want {
		t.Errorf("sent %s, the backend received %q", sent, got)
	}
	for _, m := range backendpath.Models {
		p, ok := m.Route(got)
		if !ok {
			continue // the backend refuses or redirects: no handler runs
		}
		if !mayReach("analytics:read", "GET", p) {
			t.Errorf("sent %s: backend %s routes %q, which analytics:read may not reach", sent, m.Name, p)
		}
	}
	for name, want := range map[string]string{"X-Api-Key-Owner": "edge-owner", "X-Api-Key-Scopes": "analytics:read"} {
		if vals := seen.header(name); len(vals) != 1 || vals[0] != want {
			t.Errorf("sent %s: the backend received %s %q", sent, name, vals)
		}
	}
	if vals := seen.header("Authorization"); len(vals) != 0 {
		t.Errorf("sent %s: the backend received Authorization", sent)
	}
}

// TestEdgeIssue9 turns each row of issue 9 into a test against real
// backends, with the analytics-only key unless a row says otherwise.
func TestEdgeIssue9(t *testing.T) {
	g := startEdgeGateway(t, "")

	t.Run("non-canonical paths", func(t *testing.T) {
		for _, target := range []string{
			"/v1/webhooks/%2e%2e/analytics/x",
			"/v1/webhooks/..%2Fanalytics/x",
			"/v1/webhooks/1%2F..%2F..%2Fanalytics%2Fx",
			"/v1/webhooks/../analytics/x",
			"/v1/analytics/..;/webhooks/1",
			`/v1/analytics/..\webhooks/1`,
			// The management path obeys the same policy.
			"/v1/apikeys/../apikeys",
			"/v1/apikeys/%2e%2e/x",
		} {
			for _, addr := range []string{g.mux, g.raw} {
				resp := sendRaw(t, addr, getRaw("GET", target, g.analytics))
				if resp.status != 400 || resp.code != "non_canonical_path" {
					t.Errorf("GET %s: %d %q, want 400 non_canonical_path", target, resp.status, resp.code)
				}
			}
		}
	})

	t.Run("Connection naming the identity headers", func(t *testing.T) {
		for _, proto := range []string{"HTTP/1.1", "HTTP/1.0"} {
			for _, conn := range []string{
				"close, X-Api-Key-Id, X-Api-Key-Owner, X-Api-Key-Scopes",
				"x-api-key-owner,x_api_key_scopes, X.Api.Key.Id",
				"keep-alive, Authorization, X-API-KEY-OWNER",
			} {
				raw := fmt.Sprintf("GET /v1/analytics/daily %s\r\nHost: gateway\r\nAuthorization: Bearer %s\r\nConnection: %s\r\n\r\n", proto, g.analytics, conn)
				resp := sendRaw(t, g.raw, raw)
				if resp.status != 200 {
					t.Fatalf("%s, Connection: %s: status %d", proto, conn, resp.status)
				}
				var seen rawSeen
				if err := json.Unmarshal(resp.body, &seen); err != nil {
					t.Fatal(err)
				}
				for name, want := range map[string]string{"X-Api-Key-Owner": "edge-owner", "X-Api-Key-Scopes": "analytics:read"} {
					if vals := seen.header(name); len(vals) != 1 || vals[0] != want {
						t.Errorf("%s, Connection: %s: the backend received %s %q, want %q", proto, conn, name, vals, want)
					}
				}
				if len(seen.header("X-Api-Key-Id")) != 1 {
					t.Errorf("%s, Connection: %s: the backend received no X-Api-Key-Id", proto, conn)
				}
			}
		}
	})

	t.Run("Upgrade h2c", func(t *testing.T) {
		for _, up := range []string{
			"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA",
			"Connection: upgrade\r\nUpgrade: H2C",
			"Connection: Upgrade\r\nUpgrade: websocket, h2c",
			"Connection: Upgrade\r\nUpgrade: h2c\r\nUpgrade: websocket",
		} {
			conn, err := net.DialTimeout("tcp", g.h2c, 2*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
			br := bufio.NewReader(conn)
			first := fmt.Sprintf("GET /v1/analytics/daily HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer %s\r\n%s\r\n\r\n", g.analytics, up)
			io.WriteString(conn, first)
			resp := readRawResponse(t, br, first)
			if resp.status != 200 || resp.header.Get("X-Proto") != "HTTP/1.1" || resp.header.Get("X-Seen-Upgrade") != "" {
				t.Errorf("%q: status %d, backend protocol %q, backend saw Upgrade %q; want 200 over HTTP/1.1 without Upgrade",
					up, resp.status, resp.header.Get("X-Proto"), resp.header.Get("X-Seen-Upgrade"))
			}
			// The connection is still HTTP/1.1 to the guard: a request
			// without a key on it is refused.
			next := "GET /v1/webhooks/1 HTTP/1.1\r\nHost: gateway\r\n\r\n"
			io.WriteString(conn, next)
			if resp := readRawResponse(t, br, next); resp.status != 401 {
				t.Errorf("%q: a keyless request on the same connection got %d, want 401", up, resp.status)
			}
			conn.Close()
		}
	})

	t.Run("WebSocket upgrades keep working with the identity headers", func(t *testing.T) {
		conn, err := net.DialTimeout("tcp", g.raw, 2*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
		br := bufio.NewReader(conn)
		hs := fmt.Sprintf("GET /v1/analytics/stream HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer %s\r\n"+
			"Connection: Upgrade, X-Api-Key-Owner\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n", g.analytics)
		io.WriteString(conn, hs)
		resp := readRawResponse(t, br, hs)
		if resp.status != http.StatusSwitchingProtocols {
			t.Fatalf("WebSocket handshake: status %d", resp.status)
		}
		line, err := br.ReadBytes('\n')
		if err != nil {
			t.Fatal(err)
		}
		var seen rawSeen
		if err := json.Unmarshal(line, &seen); err != nil {
			t.Fatal(err)
		}
		if v := seen.header("X-Api-Key-Owner"); len(v) != 1 || v[0] != "edge-owner" {
			t.Errorf("the WebSocket backend received owner %q", v)
		}
		io.WriteString(conn, "ping")
		buf := make([]byte, 4)
		if _, err := io.ReadFull(br, buf); err != nil || string(buf) != "ping" {
			t.Errorf("the tunnel did not echo: %q %v", buf, err)
		}
		// Not on the management path, nor without a key.
		for _, key := range []string{"", "wbk_" + strings.Repeat("0", 64)} {
			if resp := sendRaw(t, g.raw, getRaw("GET", "/v1/analytics/stream", key, "Upgrade: websocket")); resp.status != 401 {
				t.Errorf("a WebSocket handshake with key %q got %d, want 401", key, resp.status)
			}
		}
	})

	t.Run("trailers", func(t *testing.T) {
		chunked := func(trailerDecl string, trailers ...string) string {
			var b strings.Builder
			fmt.Fprintf(&b, "POST /v1/webhooks/1 HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer %s\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n", g.webhooks)
			if trailerDecl != "" {
				fmt.Fprintf(&b, "Trailer: %s\r\n", trailerDecl)
			}
			b.WriteString("Connection: close\r\n\r\n2\r\n{}\r\n0\r\n")
			for _, tr := range trailers {
				b.WriteString(tr + "\r\n")
			}
			b.WriteString("\r\n")
			return b.String()
		}
		// Declared under a protected name: refused before anything.
		for _, decl := range []string{"X-Api-Key-Owner, X-Api-Key-Scopes", "x_api_key_owner", "Authorization", "X-Checksum, X-Api-Key-Id"} {
			resp := sendRaw(t, g.raw, chunked(decl, "X-Api-Key-Owner: admin", "X-Api-Key-Scopes: *"))
			if resp.status != 400 || resp.code != "forbidden_trailer" {
				t.Errorf("Trailer: %s: %d %q, want 400 forbidden_trailer", decl, resp.status, resp.code)
			}
		}
		// Undeclared, or declared beside a harmless one: never forwarded,
		// while the harmless one still is.
		for _, decl := range []string{"", "X-Checksum"} {
			resp := sendRaw(t, g.raw, chunked(decl, "X-Checksum: abc", "X-Api-Key-Owner: admin", "X-Api-Key-Scopes: *", "X-API-KEY-ID: key_forged", "Authorization: Bearer x"))
			if resp.status != 200 {
				t.Fatalf("Trailer: %q: status %d: %s", decl, resp.status, resp.body)
			}
			var seen rawSeen
			if err := json.Unmarshal(resp.body, &seen); err != nil {
				t.Fatal(err)
			}
			for _, name := range []string{"X-Api-Key-Owner", "X-Api-Key-Scopes", "X-Api-Key-Id", "Authorization"} {
				if v := fieldValues(seen.Trailers, name); len(v) != 0 {
					t.Errorf("Trailer: %q: the backend received the trailer %s: %q", decl, name, v)
				}
			}
			if decl != "" && len(fieldValues(seen.Trailers, "X-Checksum")) != 1 {
				t.Errorf("Trailer: %q: the declared harmless trailer was not forwarded: %q", decl, seen.Trailers)
			}
			if v := seen.header("X-Api-Key-Owner"); len(v) != 1 || v[0] != "edge-owner" {
				t.Errorf("Trailer: %q: the backend received owner header %q", decl, v)
			}
		}
	})

	t.Run("HEAD follows GET", func(t *testing.T) {
		for _, target := range []string{"/v1/analytics/daily", "/v1/analytics"} {
			if resp := sendRaw(t, g.mux, getRaw("HEAD", target, g.analytics)); resp.status != 200 {
				t.Errorf("HEAD %s: %d, want 200", target, resp.status)
			}
		}
		// And nothing else follows: POST, lower-case get, PUT stay refused.
		for _, m := range []string{"POST", "get", "PUT", "DELETE", "OPTIONS", "TRACE", "PATCH"} {
			if resp := sendRaw(t, g.mux, getRaw(m, "/v1/analytics/daily", g.analytics)); resp.status != 403 {
				t.Errorf("%s /v1/analytics/daily: %d, want 403", m, resp.status)
			}
		}
	})

	t.Run("method overrides", func(t *testing.T) {
		// Backends that honour these run the named method: the key must be
		// allowed that method too.
		refused := [][]string{
			{"X-HTTP-Method-Override: DELETE"},
			{"X-HTTP-Method: post"},
			{"X-Method-Override: GET, DELETE"},
			{"X-HTTP-Method-Override: GET", "X-HTTP-Method-Override: PUT"},
		}
		for _, hdr := range refused {
			if resp := sendRaw(t, g.mux, getRaw("GET", "/v1/analytics/daily", g.analytics, hdr...)); resp.status != 403 {
				t.Errorf("GET /v1/analytics/daily with %q: %d, want 403", hdr, resp.status)
			}
		}
		for _, target := range []string{"/v1/analytics/daily?_method=DELETE", "/v1/analytics/daily?a=1&_method=patch"} {
			if resp := sendRaw(t, g.mux, getRaw("GET", target, g.analytics)); resp.status != 403 {
				t.Errorf("GET %s: %d, want 403", target, resp.status)
			}
		}
		// Overrides the key is allowed pass: GET for the analytics key, any
		// method for webhooks (its rule names none).
		if resp := sendRaw(t, g.mux, getRaw("GET", "/v1/analytics/daily?_method=GET", g.analytics, "X-HTTP-Method-Override: get")); resp.status != 200 {
			t.Errorf("an override to GET with the analytics key: %d, want 200", resp.status)
		}
		if resp := sendRaw(t, g.mux, getRaw("POST", "/v1/webhooks/1", g.webhooks, "X-HTTP-Method-Override: DELETE", "Content-Length: 0")); resp.status != 200 {
			t.Errorf("an override to DELETE with the webhooks key: %d, want 200", resp.status)
		}
	})

	t.Run("path override headers", func(t *testing.T) {
		resp := sendRaw(t, g.raw, getRaw("GET", "/v1/analytics/daily", g.analytics,
			"X-Original-URL: /v1/webhooks/1", "X-Rewrite-URL: /v1/webhooks/1", "x-original-url: /v1/billing/1"))
		if resp.status != 200 {
			t.Fatalf("status %d", resp.status)
		}
		var seen rawSeen
		if err := json.Unmarshal(resp.body, &seen); err != nil {
			t.Fatal(err)
		}
		for _, name := range []string{"X-Original-URL", "X-Rewrite-URL"} {
			if v := seen.header(name); len(v) != 0 {
				t.Errorf("the backend received %s %q", name, v)
			}
		}
	})

	t.Run("case", func(t *testing.T) {
		// A path that matches a rule only when case is ignored matches
		// none: a full-access key is needed.
		for _, target := range []string{"/V1/ANALYTICS/daily", "/v1/Analytics/daily"} {
			if resp := sendRaw(t, g.mux, getRaw("GET", target, g.analytics)); resp.status != 403 {
				t.Errorf("GET %s with the analytics key: %d, want 403", target, resp.status)
			}
			if resp := sendRaw(t, g.mux, getRaw("GET", target, g.full)); resp.status != 200 || resp.header.Get("X-Handler") != "/" {
				t.Errorf("GET %s with a full-access key: %d from %q", target, resp.status, resp.header.Get("X-Handler"))
			}
		}
	})
}

// TestEdgeAllowEncodedSlashes: with the opt-out, %2F passes, and a scoped
// key must be allowed both with %2F read as a separator and with it kept in
// its segment.
func TestEdgeAllowEncodedSlashes(t *testing.T) {
	g := startEdgeGateway(t, "allow_encoded_slashes")
	cases := []struct {
		target string
		key    string
		want   int
	}{
		{"/v1/webhooks/a%2Fb", g.webhooks, 200},              // both readings under /v1/webhooks/
		{"/v1/analytics%2Fx", g.analytics, 403},              // decoded: analytics; ServeMux: segment "analytics/x", no rule
		{"/v1/webhooks%2F1", g.webhooks, 403},                // likewise
		{"/v1/webhooks/1%2F..%2Fanalytics", g.webhooks, 400}, // dot segment on the decoding reading
		{"/v1/webhooks/a%2F%2Fb", g.webhooks, 400},
		{"/v1/webhooks/a%5Cb", g.webhooks, 400},
	}
	for _, tc := range cases {
		resp := sendRaw(t, g.mux, getRaw("GET", tc.target, tc.key))
		if resp.status != tc.want {
			t.Errorf("GET %s: %d %q, want %d", tc.target, resp.status, resp.code, tc.want)
		}
	}
	// Without the opt-out the same encoded slash is refused.
	stopCaddy(t)
	g = startEdgeGateway(t, "")
	if resp := sendRaw(t, g.mux, getRaw("GET", "/v1/webhooks/a%2Fb", g.webhooks)); resp.status != 400 || resp.code != "non_canonical_path" {
		t.Errorf("without allow_encoded_slashes, GET /v1/webhooks/a%%2Fb: %d %q", resp.status, resp.code)
	}
}

// FuzzGuardTarget is the unit-level form of TestEdgeDifferential: for any
// method and request target net/http parses, the handler either refuses
// with a 4xx, or passes on a request whose target every backend model
// reads as a path the analytics:read key may reach.
func FuzzGuardTarget(f *testing.F) {
	h := benchHandler(f, &StoreConfig{Path: filepath.Join(f.TempDir(), "keys.db")}, nil)
	key := benchKey(f, h, []string{"analytics:read"})
	for _, target := range edgeCorpus()[:60] {
		f.Add("GET", target)
	}
	f.Add("HEAD", "/v1/analytics/x")
	f.Add("get", "/v1/analytics/x")
	f.Fuzz(func(t *testing.T, method, target string) {
		req, err := http.ReadRequest(bufio.NewReader(strings.NewReader(method + " " + target + " HTTP/1.1\r\nHost: gateway\r\n\r\n")))
		if err != nil {
			return // net/http refuses it before any handler runs
		}
		br := newBenchRequest(t, "/", key)
		req = req.WithContext(br.r.Context())
		req.Header.Set("Authorization", "Bearer "+key)
		var forwarded *http.Request
		next := caddyhttp.HandlerFunc(func(_ http.ResponseWriter, r *http.Request) error { forwarded = r; return nil })
		rec := httptest.NewRecorder()
		if err := h.ServeHTTP(rec, req, next); err != nil {
			t.Fatalf("%s %q: %v", method, target, err)
		}
		if forwarded == nil {
			if rec.Code < 400 || rec.Code > 499 {
				t.Fatalf("%s %q: refused with %d, want a 4xx", method, target, rec.Code)
			}
			return
		}
		sent, _, _ := strings.Cut(forwarded.URL.RequestURI(), "?")
		for _, m := range backendpath.Models {
			if p, ok := m.Route(sent); ok && !mayReach("analytics:read", forwarded.Method, p) {
				t.Fatalf("%s %q passed as %q, which backend %s routes to %q", method, target, sent, m.Name, p)
			}
		}
	})
}

// TestCheckPathAgreesWithEscapedPath: the handler's shortcut (checking the
// decoded path when the URL has no RawPath) decides as a check of the
// escaped path would, for every target of the corpus and some that decode
// to escapes.
func TestCheckPathAgreesWithEscapedPath(t *testing.T) {
	h := &Handler{}
	targets := append(edgeCorpus(), "/a%2520b", "/a%2541", "/a%21b", "/a!b", "/a%25", "/caf%C3%A9", "/a%20b", "/a%3Bb", "/a(b)*")
	for _, target := range targets {
		req, err := http.ReadRequest(bufio.NewReader(strings.NewReader("GET " + target + " HTTP/1.1\r\nHost: x\r\n\r\n")))
		if err != nil {
			continue
		}
		want := requesttarget.Check(req.URL.EscapedPath(), h.pathOpts)
		if got := h.checkPath(req); (got == nil) != (want == nil) {
			t.Errorf("%s: checkPath = %v, Check(EscapedPath) = %v", target, got, want)
		}
	}
}
