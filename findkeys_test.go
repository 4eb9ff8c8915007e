package apikeys

import (
	"encoding/hex"
	"encoding/json"
	"hash/crc32"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/getkin/kin-openapi/openapi3"
	"github.com/getkin/kin-openapi/routers/gorillamux"

	"github.com/caddy-apikeys/caddy-apikeys/keystore"
)

// keyWithPrefix makes a well-formed raw key whose display prefix is
// "wbk_"+hex8 (as a real key has, by chance, one time in 2^32).
func keyWithPrefix(t testing.TB, hex8 string) string {
	t.Helper()
	rnd, err := keystore.Mint("wbk_")
	if err != nil {
		t.Fatal(err)
	}
	body := "wbk_" + hex8 + rnd[12:60]
	sum := make([]byte, 4)
	c := crc32.ChecksumIEEE([]byte(body))
	sum[0], sum[1], sum[2], sum[3] = byte(c>>24), byte(c>>16), byte(c>>8), byte(c)
	raw := body + hex.EncodeToString(sum)
	if err := keystore.Check("wbk_", raw); err != nil {
		t.Fatalf("crafted key: %v", err)
	}
	return raw
}

// storeKey stores raw for owner directly, as minting would.
func (g *gateway) storeKey(owner, raw string) string {
	g.t.Helper()
	hasher, err := keystore.NewHasher([]byte(testSecret))
	if err != nil {
		g.t.Fatal(err)
	}
	id, _ := keystore.NewKeyID()
	ctx, cancel := testCtx()
	defer cancel()
	k := &keystore.Key{ID: id, Owner: owner, Name: "n", Prefix: keystore.DisplayPrefix("wbk_", raw),
		Digest: hasher.Digest(raw), CreatedAt: time.Now().UTC().Truncate(time.Millisecond)}
	if err := g.store.Create(ctx, k); err != nil {
		g.t.Fatal(err)
	}
	return id
}

// TestListByPrefix: GET <management_path>?prefix= lists the caller's keys
// with that display prefix (all of them, newest first), pages with limit
// and cursor, refuses anything but a display prefix (a whole key in a URL
// above all), and reads a bounded number of keys per request.
func TestListByPrefix(t *testing.T) {
	for _, kind := range storeKinds {
		t.Run(kind, func(t *testing.T) {
			g := startGateway(t, kind, "")
			var alices []string
			for range 3 {
				alices = append(alices, g.storeKey("alice", keyWithPrefix(t, "ce03e701")))
				time.Sleep(2 * time.Millisecond)
			}
			g.storeKey("alice", keyWithPrefix(t, "0badf00d"))
			bobs := g.storeKey("bob", keyWithPrefix(t, "ce03e701"))

			l, resp := g.list("alice", "?prefix=wbk_ce03e701")
			if resp.status != 200 || len(l.Keys) != 3 || l.NextCursor != nil {
				t.Fatalf("prefix search: %d, %d keys: %s", resp.status, len(l.Keys), resp.body)
			}
			for i, k := range l.Keys {
				if k.KeyID != alices[2-i] || k.Prefix != "wbk_ce03e701" {
					t.Errorf("key %d: %s %s, want %s (newest first)", i, k.KeyID, k.Prefix, alices[2-i])
				}
			}
			if l, _ := g.list("bob", "?prefix=wbk_ce03e701"); len(l.Keys) != 1 || l.Keys[0].KeyID != bobs {
				t.Errorf("bob's search: %+v", l.Keys)
			}
			if l, _ := g.list("carol", "?prefix=wbk_ce03e701"); len(l.Keys) != 0 {
				t.Errorf("another owner's keys were found: %+v", l.Keys)
			}
			// Paging.
			l, _ = g.list("alice", "?prefix=wbk_ce03e701&limit=2")
			if len(l.Keys) != 2 || l.NextCursor == nil {
				t.Fatalf("limit 2: %d keys, cursor %v", len(l.Keys), l.NextCursor)
			}
			l2, _ := g.list("alice", "?prefix=wbk_ce03e701&limit=2&cursor="+*l.NextCursor)
			if len(l2.Keys) != 1 || l2.Keys[0].KeyID != alices[0] || l2.NextCursor != nil {
				t.Errorf("second page: %+v %v", l2.Keys, l2.NextCursor)
			}
			if l, _ := g.list("alice", "?prefix=wbk_ce03e701&status=revoked"); len(l.Keys) != 0 {
				t.Errorf("status filter: %+v", l.Keys)
			}
			// Only display prefixes.
			whole := keyWithPrefix(t, "ce03e701")
			for _, bad := range []string{whole, "wbk_ce03e7", "wbk_CE03E701", "xyz_ce03e701", ""} {
				_, resp := g.list("alice", "?prefix="+bad)
				if resp.status != 400 || resp.env.Error == nil || resp.env.Error.Field != "prefix" {
					t.Errorf("prefix %q: %d %s", bad, resp.status, resp.body)
				}
			}

			// The scan is bounded: past maxPrefixScan keys, a short page and
			// a cursor (alice's newest key has another prefix, so the first
			// two keys read hold one match).
			old := maxPrefixScan
			maxPrefixScan = 2
			t.Cleanup(func() { maxPrefixScan = old })
			l, _ = g.list("alice", "?prefix=wbk_ce03e701")
			if len(l.Keys) != 1 || l.NextCursor == nil {
				t.Fatalf("bounded scan: %d keys, cursor %v", len(l.Keys), l.NextCursor)
			}
			seen := len(l.Keys)
			for l.NextCursor != nil {
				l, _ = g.list("alice", "?prefix=wbk_ce03e701&cursor="+*l.NextCursor)
				seen += len(l.Keys)
			}
			if seen != 3 {
				t.Errorf("following the cursors found %d keys, want 3", seen)
			}
		})
	}
}

// TestOperatorCommands runs `caddy apikeys find|get|revoke --owner --all`
// against a running Caddy's Redis store and checks the results through it.
func TestOperatorCommands(t *testing.T) {
	cfg, base := startCLISite(t, "")
	run := func(args ...string) (string, error) { t.Helper(); return runCLI(t, args...) }
	call := func(key string) int {
		req, _ := http.NewRequest("GET", base+"/v1/x", nil)
		req.Header.Set("Authorization", "Bearer "+key)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	mint := func(owner string) createdKey {
		t.Helper()
		out, err := run("create", "--config", cfg, "--owner", owner, "--name", "k")
		if err != nil {
			t.Fatalf("create: %v\n%s", err, out)
		}
		var env struct{ Data createdKey }
		if err := json.Unmarshal([]byte(out), &env); err != nil {
			t.Fatal(err)
		}
		return env.Data
	}
	a1, a2, a3, b1 := mint("alice"), mint("alice"), mint("alice"), mint("bob")

	// find by whole key: any owner.
	out, err := run("find", "--config", cfg, a1.Key)
	if err != nil || !strings.Contains(out, a1.KeyID) || !strings.Contains(out, "alice") || !strings.Contains(out, "active") ||
		!strings.Contains(out, a1.CreatedAt) {
		t.Fatalf("find <key>: %v\n%s", err, out)
	}
	if strings.Contains(out, a1.Key) {
		t.Error("find printed the raw key")
	}
	// find by prefix, with --owner; JSON lines.
	out, err = run("find", "--config", cfg, "--owner", "alice", "--json", a2.Prefix)
	var fk struct {
		Owner  string `json:"owner"`
		KeyID  string `json:"key_id"`
		Status string `json:"status"`
	}
	if err != nil || json.Unmarshal([]byte(strings.TrimSpace(out)), &fk) != nil || fk.KeyID != a2.KeyID || fk.Owner != "alice" || fk.Status != "active" {
		t.Fatalf("find <prefix> --owner --json: %v\n%s", err, out)
	}
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"find", "--config", cfg, a2.Prefix}, "needs --owner"},
		{[]string{"find", "--config", cfg, "--owner", "bob", a2.Prefix}, "no key found"},
		{[]string{"find", "--config", cfg, unknownKey(t)}, "no key found"},
		{[]string{"find", "--config", cfg, a1.Key[:len(a1.Key)-1] + "x"}, "not a key this gateway minted"},
		{[]string{"find", "--config", cfg, "hello"}, "whole key or its 12-character prefix"},
		{[]string{"get", "--config", cfg, "key_nope"}, "no key"},
		{[]string{"revoke", "--config", cfg, "--all"}, "give --owner"},
		{[]string{"revoke", "--config", cfg, "--owner", "alice"}, "--all"},
	} {
		if out, err := run(c.args...); err == nil || !strings.Contains(out, c.want) {
			t.Errorf("%v: %v, want an error mentioning %q:\n%s", c.args[1:], err, c.want, out)
		}
	}
	// get: the record with its owner.
	out, err = run("get", "--config", cfg, b1.KeyID)
	if err != nil || json.Unmarshal([]byte(strings.TrimSpace(out)), &fk) != nil || fk.KeyID != b1.KeyID || fk.Owner != "bob" {
		t.Fatalf("get: %v\n%s", err, out)
	}

	// Offboarding: revoke every key of alice; one already revoked.
	if out, err := run("revoke", "--config", cfg, a3.KeyID); err != nil {
		t.Fatalf("revoke: %v\n%s", err, out)
	}
	out, err = run("revoke", "--config", cfg, "--owner", "alice", "--all")
	if err != nil || !strings.Contains(out, "revoked 2 keys of alice (1 already revoked or expired)") {
		t.Fatalf("revoke --all: %v\n%s", err, out)
	}
	for _, k := range []createdKey{a1, a2, a3} {
		if s := call(k.Key); s != 401 {
			t.Errorf("alice's key %s after revoke --all: %d", k.KeyID, s)
		}
	}
	if s := call(b1.Key); s != 200 {
		t.Errorf("bob's key after alice's offboarding: %d", s)
	}
	out, err = run("revoke", "--config", cfg, "--owner", "alice", "--all")
	if err != nil || !strings.Contains(out, "revoked 0 keys of alice (3 already revoked or expired)") {
		t.Errorf("revoke --all again: %v\n%s", err, out)
	}
}

// TestListByPrefixOpenAPI validates ?prefix= answers against openapi.yaml.
func TestListByPrefixOpenAPI(t *testing.T) {
	doc, err := openapi3.NewLoader().LoadFromFile("openapi.yaml")
	if err != nil {
		t.Fatal(err)
	}
	g := startGateway(t, "file", "")
	doc.Servers = openapi3.Servers{{URL: g.base}}
	router, err := gorillamux.NewRouter(doc)
	if err != nil {
		t.Fatal(err)
	}
	k := g.create("alice", `{"name":"k"}`)
	for _, q := range []string{"?prefix=" + k.Prefix, "?prefix=" + k.Prefix + "&limit=1&status=active", "?prefix=wbk_nothex!"} {
		req := request{method: "GET", path: "/v1/apikeys" + q, bearer: dashboardToken(t, "alice")}
		resp := g.do(req)
		if want := map[bool]int{true: 400, false: 200}[strings.Contains(q, "!")]; resp.status != want {
			t.Errorf("%s: %d, want %d", q, resp.status, want)
		}
		validateAgainst(t, router, g.base, req, resp)
	}
}
