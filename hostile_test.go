package apikeys

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"
)

// hostileCase is one hostile request and the clear 4xx it must get.
type hostileCase struct {
	name     string
	method   string // default POST
	path     string // default /v1/apikeys
	body     func() io.Reader
	length   int64 // Content-Length; -1 for chunked
	header   map[string]string
	noBearer bool
	status   []int  // acceptable statuses, all 4xx
	code     string // error.code when the module answers
}

// TestHostileRequests sends hostile requests to a real Caddy and checks
// that each gets a clear 4xx, that the store is unchanged after each, and
// that the server still works afterwards.
func TestHostileRequests(t *testing.T) {
	const mib = 1 << 20
	repeat := func(s string, n int) func() io.Reader {
		return func() io.Reader { return strings.NewReader(strings.Repeat(s, n)) }
	}
	str := func(s string) func() io.Reader { return func() io.Reader { return strings.NewReader(s) } }
	tenMiB := func() io.Reader {
		return io.MultiReader(strings.NewReader(`{"name":"`), bytes.NewReader(bytes.Repeat([]byte("x"), 10*mib)), strings.NewReader(`"}`))
	}
	millionScopes := func() io.Reader {
		return io.MultiReader(strings.NewReader(`{"name":"a","scopes":["s"`), strings.NewReader(strings.Repeat(`,"s"`, 1_000_000-1)), strings.NewReader(`]}`))
	}
	deep := func(prefix string, n int, suffix string) func() io.Reader {
		return str(prefix + strings.Repeat("[", n) + strings.Repeat("]", n) + suffix)
	}
	bigAuth := "Bearer " + strings.Repeat("A", 100<<10)

	cases := []hostileCase{
		{name: "10 MiB body with Content-Length", body: tenMiB, length: 10*mib + 11, status: []int{413}, code: "payload_too_large"},
		{name: "10 MiB body chunked", body: tenMiB, length: -1, status: []int{413}, code: "payload_too_large"},
		{name: "a million scopes", body: millionScopes, length: -1, status: []int{413}, code: "payload_too_large"},
		{name: "10000 scopes under 64 KiB", body: str(`{"name":"a","scopes":["s"` + strings.Repeat(`,"s"`, 9999) + `]}`), status: []int{400}, code: "validation_error"},
		// encoding/json refuses nesting beyond 10000 levels as invalid JSON.
		{name: "deep nesting in scopes", body: deep(`{"name":"a","scopes":`, 9000, `}`), status: []int{400}, code: "validation_error"},
		{name: "deep nesting as name", body: deep(`{"name":`, 9000, `}`), status: []int{400}, code: "validation_error"},
		{name: "deep nesting as days", body: deep(`{"name":"a","expires_in_days":`, 9000, `}`), status: []int{400}, code: "validation_error"},
		{name: "nesting beyond the decoder's limit", body: deep(`{"name":"a","scopes":`, 30000, `}`), status: []int{400}, code: "invalid_request"},
		{name: "deep objects, unterminated", body: repeat(`{"a":`, 12000), status: []int{400}, code: "validation_error"},
		{name: "deep arrays at top level", body: deep("", 30000, ""), status: []int{400}, code: "invalid_request"},
		{name: "invalid UTF-8 in name", body: str("{\"name\":\"ab\xc3\x28\"}"), status: []int{400}, code: "invalid_request"},
		{name: "invalid UTF-8 in a field name", body: str("{\"na\xffme\":\"a\"}"), status: []int{400}, code: "invalid_request"},
		{name: "overlong UTF-8 encoding of /", body: str("{\"name\":\"a\xc0\xafb\"}"), status: []int{400}, code: "invalid_request"},
		{name: "UTF-16 surrogate escape", body: str(`{"name":"a\ud800b"}`), status: []int{400}, code: "validation_error"},
		{name: "escaped NUL in name", body: str(`{"name":"a\u0000b"}`), status: []int{400}, code: "validation_error"},
		{name: "raw NUL in name", body: str("{\"name\":\"a\x00b\"}"), status: []int{400}, code: "invalid_request"},
		{name: "NUL in a scope", body: str(`{"name":"a","scopes":["billing:read\u0000"]}`), status: []int{400}, code: "validation_error"},
		{name: "duplicate name", body: str(`{"name":"a","name":"b"}`), status: []int{400}, code: "validation_error"},
		{name: "duplicate scopes", body: str(`{"name":"a","scopes":["billing:read"],"scopes":null}`), status: []int{400}, code: "validation_error"},
		{name: "duplicate days", body: str(`{"name":"a","expires_in_days":1,"expires_in_days":2}`), status: []int{400}, code: "validation_error"},
		{name: "case-variant duplicate", body: str(`{"name":"a","Name":"b"}`), status: []int{400}, code: "validation_error"},
		{name: "days 1e309", body: str(`{"name":"a","expires_in_days":1e309}`), status: []int{400}, code: "validation_error"},
		{name: "days 90.5", body: str(`{"name":"a","expires_in_days":90.5}`), status: []int{400}, code: "validation_error"},
		{name: "days -0", body: str(`{"name":"a","expires_in_days":-0}`), status: []int{400}, code: "validation_error"},
		{name: "days 2^53+1", body: str(`{"name":"a","expires_in_days":9007199254740993}`), status: []int{400}, code: "validation_error"},
		{name: "days huge exponent", body: str(`{"name":"a","expires_in_days":1e999999999}`), status: []int{400}, code: "validation_error"},
		{name: "days NaN", body: str(`{"name":"a","expires_in_days":NaN}`), status: []int{400}, code: "invalid_request"},
		{name: "days as object", body: str(`{"name":"a","expires_in_days":{"$gt":0}}`), status: []int{400}, code: "validation_error"},
		{name: "CRLF header injection in name", body: str(`{"name":"a\r\nX-Injected: yes"}`), status: []int{400}, code: "validation_error"},
		{name: "LF in name", body: str(`{"name":"a\nSet-Cookie: x=y"}`), status: []int{400}, code: "validation_error"},
		{name: "NEL in name", body: str(`{"name":"a\u0085b"}`), status: []int{400}, code: "validation_error"},
		{name: "line separator in name", body: str(`{"name":"a\u2028b"}`), status: []int{400}, code: "validation_error"},
		{name: "129 characters of name", body: str(`{"name":"` + strings.Repeat("é", 129) + `"}`), status: []int{400}, code: "validation_error"},
		{name: "prototype pollution field", body: str(`{"name":"a","__proto__":{"admin":true}}`), status: []int{400}, code: "validation_error"},
		{name: "owner smuggled in body", body: str(`{"name":"a","owner":"bob"}`), status: []int{400}, code: "validation_error"},
		{name: "empty body", body: str(""), length: 0, status: []int{400}, code: "invalid_request"},
		{name: "JSON null", body: str("null"), status: []int{400}, code: "invalid_request"},
		{name: "two objects", body: str(`{"name":"a"}{"name":"b"}`), status: []int{400}, code: "invalid_request"},
		{name: "100 KiB Authorization on the management API", body: str(`{"name":"a"}`), noBearer: true,
			header: map[string]string{"Authorization": bigAuth}, status: []int{401, 431}, code: "invalid_token"},
		{name: "100 KiB Authorization on a guarded route", method: "GET", path: "/v1/x", noBearer: true,
			header: map[string]string{"Authorization": bigAuth}, status: []int{401, 431}, code: "invalid_api_key"},
		{name: "8 KiB Authorization on the management API", body: str(`{"name":"a"}`), noBearer: true,
			header: map[string]string{"Authorization": bigAuth[:8<<10]}, status: []int{401}, code: "invalid_token"},
		{name: "8 KiB Authorization on a guarded route", method: "GET", path: "/v1/x", noBearer: true,
			header: map[string]string{"Authorization": bigAuth[:8<<10]}, status: []int{401}, code: "invalid_api_key"},
		{name: "100 KiB Idempotency-Key", body: str(`{"name":"a"}`), header: map[string]string{"Idempotency-Key": strings.Repeat("k", 100<<10)},
			status: []int{400, 431}, code: "invalid_idempotency_key"},
		{name: "key-shaped bearer with NUL-free junk", method: "GET", path: "/v1/x", noBearer: true,
			header: map[string]string{"Authorization": "Bearer wbk_" + strings.Repeat("g", 64)}, status: []int{401}, code: "invalid_api_key"},
		{name: "content type with huge parameters", body: str(`{"name":"a"}`),
			header: map[string]string{"Content-Type": "application/json; " + strings.Repeat("a=b; ", 5000) + "charset=utf-8"}, status: []int{400, 415, 431}},
	}

	for _, kind := range []string{"file", "redis"} {
		t.Run(kind, func(t *testing.T) {
			g := startGateway(t, kind, "")
			g.create("alice", `{"name":"existing"}`)
			alice := dashboardToken(t, "alice")
			client := &http.Client{Timeout: 20 * time.Second}
			for _, tc := range cases {
				t.Run(tc.name, func(t *testing.T) {
					before := g.countKeys("alice")
					method, path := tc.method, tc.path
					if method == "" {
						method = "POST"
					}
					if path == "" {
						path = "/v1/apikeys"
					}
					var body io.Reader = http.NoBody
					if tc.body != nil {
						body = tc.body()
					}
					req, err := http.NewRequest(method, g.base+path, body)
					if err != nil {
						t.Fatal(err)
					}
					req.ContentLength = tc.length
					if tc.length == 0 && tc.body != nil {
						if b, err := io.ReadAll(tc.body()); err == nil && len(b) > 0 {
							req.ContentLength = int64(len(b))
						}
					}
					if method == "POST" {
						req.Header.Set("Content-Type", "application/json")
					}
					if !tc.noBearer {
						req.Header.Set("Authorization", "Bearer "+alice)
					}
					for k, v := range tc.header {
						req.Header.Set(k, v)
					}
					start := time.Now()
					resp, err := client.Do(req)
					if err != nil {
						t.Fatalf("no answer: %v", err)
					}
					got, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
					resp.Body.Close()
					ok := false
					for _, s := range tc.status {
						ok = ok || resp.StatusCode == s
					}
					if !ok {
						t.Fatalf("status %d, want one of %v: %.300s", resp.StatusCode, tc.status, got)
					}
					if resp.StatusCode < 400 || resp.StatusCode > 499 {
						t.Fatalf("status %d is not a 4xx", resp.StatusCode)
					}
					if tc.code != "" && resp.StatusCode != 431 {
						var env struct {
							Error struct{ Code, Message string }
						}
						if err := json.Unmarshal(got, &env); err != nil || env.Error.Code != tc.code || env.Error.Message == "" {
							t.Errorf("error %+v (%v), want code %q: %.300s", env.Error, err, tc.code, got)
						}
						if len(got) > 2048 {
							t.Errorf("a %d-byte error body echoes the input", len(got))
						}
					}
					if after := g.countKeys("alice"); after != before {
						t.Errorf("the store changed: %d keys before, %d after", before, after)
					}
					t.Logf("%d in %s", resp.StatusCode, time.Since(start).Round(time.Millisecond))
				})
			}

			t.Run("raw requests", func(t *testing.T) {
				before := g.countKeys("alice")
				addr := strings.TrimPrefix(g.base, "http://")
				body := `{"name":"a"}`
				for name, head := range map[string]string{
					"NUL in Authorization":     "Authorization: Bearer " + alice + "\x00x\r\n",
					"NUL in Idempotency-Key":   "Authorization: Bearer " + alice + "\r\nIdempotency-Key: a\x00b\r\n",
					"bare CR in a header":      "Authorization: Bearer " + alice + "\r\nIdempotency-Key: a\rX-Injected: 1\r\n",
					"two Authorization fields": "Authorization: Bearer " + alice + "\r\nAuthorization: Bearer " + alice + "\r\n",
					"space before colon":       "Authorization : Bearer " + alice + "\r\n",
				} {
					status := sendRaw(t, addr, "POST /v1/apikeys HTTP/1.1\r\nHost: "+addr+"\r\nContent-Type: application/json\r\n"+
						head+fmt.Sprintf("Content-Length: %d\r\nConnection: close\r\n\r\n", len(body))+body).status
					if status < 400 || status > 499 {
						t.Errorf("%s: status %d, want a 4xx", name, status)
					}
				}
				if after := g.countKeys("alice"); after != before {
					t.Errorf("the store changed: %d keys before, %d after", before, after)
				}
			})

			// Nothing crashed: the gateway still mints and validates.
			k := g.create("alice", `{"name":"after the storm"}`)
			if r := g.do(request{method: "GET", path: "/v1/x", bearer: k.Key}); r.status != 200 {
				t.Errorf("after the hostile requests: %d", r.status)
			}
		})
	}
}

// TestSpoofedIdentityHeaderVariants sends client copies of the identity
// headers spelled with underscores, dots and other cases to a server that
// lets such names through (expected_underscore_headers and
// expected_dot_headers): none reaches the backend, where CGI-style servers
// would read X_Api_Key_Owner as the identity header (both become
// HTTP_X_API_KEY_OWNER).
func TestSpoofedIdentityHeaderVariants(t *testing.T) {
	g := startLooseHeaderSite(t, "")
	k := g.create("alice", `{"name":"spoof"}`)

	variants := []string{"X_Api_Key_Owner", "X_API_KEY_ID", "x_api_key_scopes", "X-Api_Key-Owner", "X.Api.Key.Owner"}
	req, err := http.NewRequest("GET", g.base+"/v1/x", nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+k.Key)
	req.Header.Set("X_Api_Key_Unrelated", "kept") // proves the server passes such names
	for _, name := range variants {
		req.Header[name] = []string{"mallory"}
	}
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
		for _, id := range []string{"X-Api-Key-Id", "X-Api-Key-Owner", "X-Api-Key-Scopes"} {
			if sameHeaderLoosely(name, id) && (name != id || len(vals) != 1 || slices.Contains(vals, "mallory")) {
				t.Errorf("the backend saw %s: %q", name, vals)
			}
		}
	}
	if seen.Get("X-Api-Key-Owner") != "alice" {
		t.Errorf("owner header %q", seen.Get("X-Api-Key-Owner"))
	}
}

func TestSameHeaderLoosely(t *testing.T) {
	for _, tc := range []struct {
		a, b string
		want bool
	}{
		{"X-Api-Key-Id", "X-Api-Key-Id", true},
		{"x_api_key_id", "X-Api-Key-Id", true},
		{"X-API-KEY-ID", "X-Api-Key-Id", true},
		{"X-Api-Key-Ids", "X-Api-Key-Id", false},
		{"X@Api-Key-Id", "X`Api-Key-Id", false},
		{"X-Api-Key-I[", "X-Api-Key-I{", false},
		{"X.Api.Key.Id", "X-Api-Key-Id", true},
		{"", "", true},
	} {
		if got := sameHeaderLoosely(tc.a, tc.b); got != tc.want {
			t.Errorf("sameHeaderLoosely(%q, %q) = %v", tc.a, tc.b, got)
		}
	}
}
