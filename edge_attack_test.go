package apikeys

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// The tests in this file began as attacks that worked against the edge
// (a fresh attacker's review of the first edge conformance fix); each now
// holds its fix. Their comments describe the attack and why it mattered.

// newOverrideBackend is the edge ServeMux with a DELETE route on the
// analytics resource, behind the method-override middleware the guard's
// `?_method=` rule exists for (Express's methodOverride('_method', {methods:
// null}), Laravel/Symfony, Rails-style `_method`): it reads `_method` from
// the query string the way those stacks' query parsers do, with names
// percent-decoded (Node's querystring, PHP's $_GET, Go's url.ParseQuery all
// decode `%5F` to `_`). With semicolons, pairs are also split on `;`, as
// Rack 2's parse_query and Python's parse_qs before 3.9.2 do.
func newOverrideBackend(t *testing.T, semicolons bool) string {
	return newOverrideBackendParsing(t, func(raw string) url.Values {
		if semicolons {
			raw = strings.ReplaceAll(raw, ";", "&")
		}
		vals, _ := url.ParseQuery(raw)
		return vals
	})
}

// phpQuery reads a query string as PHP fills $_GET: names decoded, leading
// spaces dropped, then ' ' and '.' in a name become '_' (so `.method` is
// `_method`).
func phpQuery(raw string) url.Values {
	vals, _ := url.ParseQuery(raw)
	out := url.Values{}
	for k, vv := range vals {
		k = strings.NewReplacer(" ", "_", ".", "_").Replace(strings.TrimLeft(k, " "))
		out[k] = append(out[k], vv...)
	}
	return out
}

// nodeQuery reads a query string as Node's querystring.parse does (which
// Express's method-override query getter uses): pairs split on '&', names
// and values decoded, at most maxKeys (default 1000) pairs read and the
// rest ignored. PHP's $_GET likewise keeps the first max_input_vars (1000).
func nodeQuery(raw string) url.Values {
	out := url.Values{}
	n := 0
	for _, pair := range strings.Split(raw, "&") {
		if n == 1000 {
			break
		}
		n++
		k, v, _ := strings.Cut(pair, "=")
		k, err1 := url.QueryUnescape(k)
		v, err2 := url.QueryUnescape(v)
		if k == "" || err1 != nil || err2 != nil {
			continue
		}
		out[k] = append(out[k], v)
	}
	return out
}

func newOverrideBackendParsing(t *testing.T, parse func(rawQuery string) url.Values) string {
	mux := http.NewServeMux()
	routes := []string{"GET /v1/analytics/{id}", "DELETE /v1/analytics/{id}", "/v1/webhooks/", "/"}
	for _, pattern := range routes {
		mux.HandleFunc(pattern, func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("X-Handler", pattern)
			w.Header().Set("X-Seen-Owner", r.Header.Get("X-Api-Key-Owner"))
			_, _ = io.WriteString(w, "ok")
		})
	}
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if m := parse(r.URL.RawQuery).Get("_method"); m != "" {
			r.Method = strings.ToUpper(m)
		}
		mux.ServeHTTP(w, r)
	})
	return serveOnLoopback(t, &http.Server{Handler: h})
}

// TestEdgeMethodOverrideQuerySpellings: the guard looks for `_method` in
// the raw query with strings.Contains and then reads it with Go's
// url.ParseQuery, so a query parameter whose name is percent-encoded
// (`%5Fmethod`, `_%6Dethod`) is never looked at, and one in a pair that
// holds a `;` is skipped by ParseQuery, and PHP's `.method` (PHP turns '.'
// in a parameter name into '_') never contains `_method` at all. Backends
// decode the name (and some split on `;`, and PHP mangles it) and run the
// method the key was refused: the analytics:read key reaches
// DELETE /v1/analytics/{id}. A query of more than 10,000 pairs makes Go's
// url.ParseQuery return nothing at all, so even the plain `_method=DELETE`
// goes unseen by the guard while Node and PHP read it. (Laravel, Symfony and Spring's
// HiddenHttpMethodFilter honour the query parameter on POST only, which
// matters for rules that allow POST but not DELETE.)
func TestEdgeMethodOverrideQuerySpellings(t *testing.T) {
	g := startSites(t, edgeSites{backends: map[string]string{
		"amp":  newOverrideBackend(t, false),
		"semi": newOverrideBackend(t, true),
		"php":  newOverrideBackendParsing(t, phpQuery),
		"node": newOverrideBackendParsing(t, nodeQuery),
	}})
	// The rule works for the plain spelling: the guard refuses.
	for _, site := range []string{"amp", "semi", "php", "node"} {
		if resp := sendRaw(t, g.sites[site], getRaw("GET", "/v1/analytics/daily?_method=DELETE", g.analytics)); resp.status != 403 {
			t.Fatalf("%s: GET ?_method=DELETE with the analytics key: %d, want 403 (control)", site, resp.status)
		}
	}
	cases := []struct{ site, target string }{
		{"amp", "/v1/analytics/daily?%5Fmethod=DELETE"},
		{"amp", "/v1/analytics/daily?%5fmethod=DELETE"},
		{"amp", "/v1/analytics/daily?_%6Dethod=DELETE"},
		{"amp", "/v1/analytics/daily?%5F%6D%65%74%68%6F%64=%44%45%4C%45%54%45"},
		{"semi", "/v1/analytics/daily?x=1;_method=DELETE"},
		{"php", "/v1/analytics/daily?.method=DELETE"},
		{"php", "/v1/analytics/daily?%2Emethod=DELETE"},
		// More than 10,000 '&'-separated pairs: Go's url.ParseQuery (Go
		// 1.24+) refuses the whole query and returns no values, so the
		// guard sees no _method at all; Node and PHP read the first 1,000.
		{"node", "/v1/analytics/daily?_method=DELETE" + strings.Repeat("&", 10000)},
	}
	for _, tc := range cases {
		resp := sendRaw(t, g.sites[tc.site], getRaw("GET", tc.target, g.analytics))
		if resp.status != 403 {
			shown := tc.target
			if len(shown) > 80 {
				shown = shown[:60] + fmt.Sprintf("…(%d bytes)", len(shown))
			}
			t.Errorf("GET %s (backend %s) with an analytics:read key: %d from backend handler %q, want 403 as for ?_method=DELETE",
				shown, tc.site, resp.status, resp.header.Get("X-Handler"))
		}
	}
}

// malformedBodies are requests an analytics:read key may make (GET on its
// own route) whose chunked body is malformed: the framing error is the
// client's, found only when reverse_proxy streams the body on.
func malformedBodies(key string) map[string]string {
	head := "GET /v1/analytics/daily HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer " + key + "\r\nTransfer-Encoding: chunked\r\n"
	return map[string]string{
		"bad chunk size":    head + "Connection: close\r\n\r\nzz\r\n\r\n",
		"bad trailer line":  head + "Connection: close\r\n\r\n1\r\na\r\n0\r\nnot a field\r\n\r\n",
		"oversized trailer": head + "Connection: close\r\nTrailer: X-Pad\r\n\r\n1\r\na\r\n0\r\nX-Pad: " + strings.Repeat("a", 5000) + "\r\n\r\n",
	}
}

// TestEdgeMalformedBodyIs4xx: a key holder's malformed request body is
// answered 502 Bad Gateway, as if the backend had failed (the edge
// invariant: never 5xx for what a client sends). With passive health checks
// on reverse_proxy (fail_duration, max_fails), the same request counts as a
// backend failure: one request from the least-privileged key takes the
// backend out for every key, and a full-access key's valid request then
// gets 503.
func TestEdgeMalformedBodyIs4xx(t *testing.T) {
	t.Run("502", func(t *testing.T) {
		g := startEdgeGateway(t, "")
		for name, raw := range malformedBodies(g.analytics) {
			for backend, addr := range map[string]string{"ServeMux": g.mux, "rawEcho": g.raw} {
				if resp := sendRaw(t, addr, raw); resp.status >= 500 {
					t.Errorf("%s (%s): the gateway answered %d, want a 4xx (the client's framing error)", name, backend, resp.status)
				}
			}
		}
	})
	t.Run("h2c prior knowledge, body shorter than content-length", func(t *testing.T) {
		// The edge sites set no `protocols`, yet a plain-HTTP site accepts
		// HTTP/2 with prior knowledge: Caddy enables unencrypted HTTP/2
		// whenever h2 is on, and its listener checks the preface only when
		// h1 or h2 is off.
		g := startEdgeGateway(t, "")
		status := h2cRequest(t, g.mux, []hpack.HeaderField{
			{Name: ":method", Value: "GET"}, {Name: ":scheme", Value: "http"}, {Name: ":authority", Value: "gateway"},
			{Name: ":path", Value: "/v1/analytics/daily"}, {Name: "authorization", Value: "Bearer " + g.analytics},
			{Name: "content-length", Value: "10"},
		}, "ab")
		if status >= 500 {
			t.Errorf("HTTP/2 GET /v1/analytics/daily, content-length 10, 2 bytes of body: the gateway answered %d, want a 4xx", status)
		}
	})
	t.Run("passive health checks", func(t *testing.T) {
		g := startSites(t, edgeSites{proxyBody: "fail_duration 30s\n\t\tmax_fails 1", backends: map[string]string{"mux": newMuxBackend(t)}})
		addr := g.sites["mux"]
		if resp := sendRaw(t, addr, getRaw("GET", "/v1/webhooks/1", g.full)); resp.status != 200 {
			t.Fatalf("before: a full-access key got %d", resp.status)
		}
		resp := sendRaw(t, addr, malformedBodies(g.analytics)["bad chunk size"])
		t.Logf("the malformed request from the analytics:read key: %d", resp.status)
		if resp := sendRaw(t, addr, getRaw("GET", "/v1/webhooks/1", g.full)); resp.status != 200 {
			t.Errorf("after one malformed request from an analytics:read key, a full-access key's GET /v1/webhooks/1 got %d, want 200: the backend was marked down", resp.status)
		}
	})
}

// TestEdgeOversizedTrailerSection: one HTTP/1.1 message on the wire, a
// GET with a chunked body whose trailer section (RFC 9112 §7.1.2: field
// lines up to the empty line) is longer than net/http's 4 KiB trailer
// window, is answered twice. The gateway gives up on the trailer (502),
// leaves it unread and keeps the connection, then parses the trailer
// section as a second request. Behind any front proxy that forwards request
// trailers and reuses its connections to Caddy, the two no longer agree on
// where requests start: the smuggled request can carry a Content-Length
// that swallows the next client's request (with that client's
// Authorization) as its body, sent with the attacker's key to a route
// that stores what it receives.
func TestEdgeOversizedTrailerSection(t *testing.T) {
	g := startEdgeGateway(t, "")
	smuggled := "GET /v1/webhooks/1 HTTP/1.1\r\nHost: gateway\r\nX-Pad: " + strings.Repeat("a", 5000) + "\r\n\r\n"
	msg := "GET /v1/analytics/daily HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer " + g.analytics + "\r\n" +
		"Transfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\n" + smuggled
	conn, err := net.DialTimeout("tcp", g.mux, 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(conn, msg); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(conn)
	first := readRawResponse(t, br, msg)
	t.Logf("the message: %d", first.status)
	_ = conn.SetReadDeadline(time.Now().Add(2 * time.Second))
	if resp, err := http.ReadResponse(br, &http.Request{Method: "GET"}); err == nil {
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		t.Errorf("one message on the wire got a second response, %d %s: the trailer section was parsed as a request (GET /v1/webhooks/1)", resp.StatusCode, body)
	}
}

// TestEdgeTrailerSmugglingCapturesNothing plays the front proxy of
// TestEdgeOversizedTrailerSection: it sends the attacker's message and
// then, on the same connection, another client's request. The smuggled
// request (webhooks key, Content-Length) takes the other client's request,
// its full-access key included, as its body: a backend route that stores
// what it is sent (a webhook's description, say) hands the key to the
// attacker.
func TestEdgeTrailerSmugglingCapturesNothing(t *testing.T) {
	captured := make(chan string, 4)
	store := serveOnLoopback(t, &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		if len(body) > 0 {
			captured <- r.Method + " " + r.URL.Path + " as " + r.Header.Get("X-Api-Key-Scopes") + ": " + string(body)
		}
		_, _ = io.WriteString(w, "stored")
	})})
	g := startSites(t, edgeSites{backends: map[string]string{"store": store}})
	victim := "GET /v1/analytics/daily HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer " + g.full + "\r\n\r\n"
	smuggled := "POST /v1/webhooks/1 HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer " + g.webhooks + "\r\n" +
		fmt.Sprintf("Content-Length: %d\r\n", len(victim)) + "X-Pad: " + strings.Repeat("a", 5000) + "\r\n\r\n"
	attacker := "GET /v1/analytics/daily HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer " + g.analytics + "\r\n" +
		"Transfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\n" + smuggled
	conn, err := net.DialTimeout("tcp", g.sites["store"], 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
	br := bufio.NewReader(conn)
	io.WriteString(conn, attacker)
	t.Logf("attacker's message: %d", readRawResponse(t, br, attacker).status)
	io.WriteString(conn, victim) // the front proxy reuses the connection
	if resp, err := http.ReadResponse(br, &http.Request{Method: "GET"}); err == nil {
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		t.Logf("the victim's request got: %d %s", resp.StatusCode, body)
	} else {
		t.Logf("the gateway closed the connection after the attacker's message: %v", err)
	}
	for {
		select {
		case c := <-captured:
			if strings.Contains(c, g.full) {
				t.Errorf("the backend received another client's full-access key as the body of the attacker's request: %q", c)
			}
			continue
		case <-time.After(time.Second):
		}
		break
	}
}

// cgiName is the variable a CGI/FastCGI backend (PHP's $_SERVER, Caddy's
// php_fastcgi) reads a request header as: upper case, '-' as '_', and PHP
// folds '.' to '_' too.
func cgiName(header string) string {
	return "HTTP_" + strings.NewReplacer("-", "_", ".", "_").Replace(strings.ToUpper(header))
}

// TestEdgeAllowlistedSpellingsOfOverrideHeaders: when the server keeps
// some '_' or '.' header names (expected_underscore_headers,
// expected_dot_headers), stripIdentityHeaders switches to its loose scan
// for the identity headers, but the method-override check and the removal
// of X-Original-URL / X-Rewrite-URL stay exact. X_HTTP_Method_Override and
// X_Original_URL then reach a CGI/FastCGI backend as
// HTTP_X_HTTP_METHOD_OVERRIDE and HTTP_X_ORIGINAL_URL, the variables PHP
// frameworks read, with nothing checked.
func TestEdgeAllowlistedSpellingsOfOverrideHeaders(t *testing.T) {
	g := startSites(t, edgeSites{global: "servers {\n\t\texpected_underscore_headers x_*\n\t\texpected_dot_headers x.*\n\t}",
		backends: map[string]string{"raw": newRawEcho(t)}})
	addr := g.sites["raw"]
	for _, tc := range []struct {
		header string // the line sent
		target string // what the guard would refuse (or remove) in canonical spelling
	}{
		{"X_HTTP_Method_Override: DELETE", "HTTP_X_HTTP_METHOD_OVERRIDE"},
		{"X.HTTP.Method: DELETE", "HTTP_X_HTTP_METHOD"},
		{"X_Method_Override: DELETE", "HTTP_X_METHOD_OVERRIDE"},
		{"X_Original_URL: /v1/webhooks/1", "HTTP_X_ORIGINAL_URL"},
		{"X.Rewrite.URL: /v1/webhooks/1", "HTTP_X_REWRITE_URL"},
	} {
		resp := sendRaw(t, addr, getRaw("GET", "/v1/analytics/daily", g.analytics, tc.header))
		if resp.status != 200 {
			continue // refused: held
		}
		var seen rawSeen
		if err := json.Unmarshal(resp.body, &seen); err != nil {
			t.Fatal(err)
		}
		for _, l := range seen.Headers {
			name, _, _ := strings.Cut(l, ":")
			if cgiName(name) == tc.target {
				t.Errorf("sent %q with an analytics:read key: 200, and the backend received %q, which a CGI/FastCGI backend reads as %s", tc.header, l, tc.target)
			}
		}
	}
}

// h2cRequest sends one HTTP/2 request with prior knowledge (fields as
// given, then data with END_STREAM) and returns the response status, or 0
// when the stream was reset.
func h2cRequest(t *testing.T, addr string, fields []hpack.HeaderField, data string) int {
	t.Helper()
	conn, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(conn, http2.ClientPreface); err != nil {
		t.Fatal(err)
	}
	fr := http2.NewFramer(conn, conn)
	fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	_ = fr.WriteSettings()
	var block bytes.Buffer
	enc := hpack.NewEncoder(&block)
	for _, f := range fields {
		_ = enc.WriteField(f)
	}
	_ = fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: block.Bytes(), EndHeaders: true, EndStream: data == ""})
	if data != "" {
		_ = fr.WriteData(1, true, []byte(data))
	}
	for {
		f, err := fr.ReadFrame()
		if err != nil {
			t.Fatalf("HTTP/2 with prior knowledge: %v", err)
		}
		switch f := f.(type) {
		case *http2.SettingsFrame:
			if !f.IsAck() {
				_ = fr.WriteSettingsAck()
			}
		case *http2.MetaHeadersFrame:
			if st := f.PseudoValue("status"); st != "" {
				n := 0
				fmt.Sscan(st, &n)
				return n
			}
		case *http2.RSTStreamFrame, *http2.GoAwayFrame:
			return 0
		}
	}
}

// TestEdgeTEWithCLClosesConnection: RFC 9112 §6.3 says a server that
// gets both Transfer-Encoding and Content-Length MUST close the connection
// after responding, because the two framings disagree on where the next
// request starts. The gateway reads the body as chunked and keeps the
// connection, so the bytes a Content-Length reader counts as this
// request's body are served as a second request (here without any key:
// the request itself needs none to be sent on).
func TestEdgeTEWithCLClosesConnection(t *testing.T) {
	g := startEdgeGateway(t, "")
	smuggled := "GET /v1/webhooks/1 HTTP/1.1\r\nHost: gateway\r\n\r\n"
	body := "0\r\n\r\n" + smuggled
	msg := fmt.Sprintf("GET /v1/analytics/daily HTTP/1.1\r\nHost: gateway\r\nContent-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n%s", len(body), body)
	conn, err := net.DialTimeout("tcp", g.mux, 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(conn, msg); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(conn)
	t.Logf("the message: %d", readRawResponse(t, br, msg).status)
	_ = conn.SetReadDeadline(time.Now().Add(2 * time.Second))
	if resp, err := http.ReadResponse(br, &http.Request{Method: "GET"}); err == nil {
		resp.Body.Close()
		t.Errorf("Transfer-Encoding with Content-Length: the connection stayed open and the bytes inside Content-Length were answered as a second request (%d)", resp.StatusCode)
	}
}
