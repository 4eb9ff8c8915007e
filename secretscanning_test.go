package apikeys

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddy-apikeys/caddy-apikeys/keystore"
)

// ghSigner is a locally generated P-256 key standing in for GitHub's.
type ghSigner struct {
	id  string
	key *ecdsa.PrivateKey
}

func newGHSigner(t testing.TB) ghSigner {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, _ := x509.MarshalPKIXPublicKey(&k.PublicKey)
	sum := sha256.Sum256(der)
	return ghSigner{id: hex.EncodeToString(sum[:]), key: k}
}

func (s ghSigner) sign(t testing.TB, body []byte) string {
	t.Helper()
	d := sha256.Sum256(body)
	sig, err := ecdsa.SignASN1(rand.Reader, s.key, d[:])
	if err != nil {
		t.Fatal(err)
	}
	return base64.StdEncoding.EncodeToString(sig)
}

// ghKeys is a real HTTP server publishing keys in GitHub's key list format.
type ghKeys struct {
	*httptest.Server
	mu   sync.Mutex
	keys []ghSigner
	hits atomic.Int64
}

func newGHKeys(t *testing.T, keys ...ghSigner) *ghKeys {
	ks := &ghKeys{keys: keys}
	ks.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ks.hits.Add(1)
		ks.mu.Lock()
		defer ks.mu.Unlock()
		type entry struct {
			KeyIdentifier string `json:"key_identifier"`
			Key           string `json:"key"`
			IsCurrent     bool   `json:"is_current"`
		}
		list := struct {
			PublicKeys []entry `json:"public_keys"`
		}{PublicKeys: []entry{}}
		for i, s := range ks.keys {
			der, _ := x509.MarshalPKIXPublicKey(&s.key.PublicKey)
			list.PublicKeys = append(list.PublicKeys, entry{s.id,
				string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der})), i == len(ks.keys)-1})
		}
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(list)
	}))
	t.Cleanup(ks.Close)
	return ks
}

func (ks *ghKeys) set(keys ...ghSigner) {
	ks.mu.Lock()
	ks.keys = keys
	ks.mu.Unlock()
}

// ghMatch is one element of a report.
type ghMatch struct {
	Token  string `json:"token"`
	Type   string `json:"type"`
	URL    string `json:"url"`
	Source string `json:"source"`
}

// ghFeedback is one element of the partner response.
type ghFeedback struct {
	TokenHash string `json:"token_hash"`
	TokenType string `json:"token_type"`
	Label     string `json:"label"`
}

// report posts a report signed by s (sig overrides the signature when set)
// to the gateway's secret scanning endpoint, with extra headers.
func (g *gateway) report(body []byte, keyID, sig string, extra map[string]string) (int, []byte) {
	g.t.Helper()
	req, err := http.NewRequest("POST", g.base+"/v1/apikeys/secret-scanning", bytes.NewReader(body))
	if err != nil {
		g.t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	if keyID != "" {
		req.Header.Set("Github-Public-Key-Identifier", keyID)
	}
	if sig != "" {
		req.Header.Set("Github-Public-Key-Signature", sig)
	}
	for k, v := range extra {
		req.Header.Set(k, v)
	}
	resp, err := g.client.Do(req)
	if err != nil {
		g.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, b
}

func reportBody(t testing.TB, ms ...ghMatch) []byte {
	b, err := json.Marshal(ms)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func sha256Hex(s string) string {
	sum := sha256.Sum256([]byte(s))
	return hex.EncodeToString(sum[:])
}

// unknownKey is a well-formed key (valid checksum) that was never minted.
func unknownKey(t testing.TB) string {
	k, err := keystore.Mint(keystore.DefaultPrefix)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func secretScanningConfig(url, action string) string {
	return fmt.Sprintf("secret_scanning {\n\t\t\tpublic_keys %s\n\t\t\taction %s\n\t\t}", url, action)
}

// TestSecretScanningRevokesLeakedKeys: a report signed with GitHub's key
// revokes the gateway's keys in it (and only those), answers the partner
// response, logs each leak at Info with its key ID, and emits
// apikeys.leaked; the key stops validating at once.
func TestSecretScanningRevokesLeakedKeys(t *testing.T) {
	gh := newGHSigner(t)
	for _, kind := range storeKinds {
		t.Run(kind, func(t *testing.T) {
			ks := newGHKeys(t, newGHSigner(t), gh)
			g := startGateway(t, kind, secretScanningConfig(ks.URL, "revoke"))
			alice := g.create("alice", `{"name":"leaked"}`)
			bob := g.create("bob", `{"name":"leaked too","scopes":["analytics:read"]}`)
			kept := g.create("alice", `{"name":"kept"}`)
			if r := g.do(request{method: "GET", path: "/v1/x", bearer: alice.Key}); r.status != 200 {
				t.Fatalf("key before the report: %d", r.status)
			}
			stranger := unknownKey(t)
			typo := alice.Key[:len(alice.Key)-1] + "0"
			if typo == alice.Key {
				typo = alice.Key[:len(alice.Key)-1] + "1"
			}
			url := "https://github.com/octo/repo/blob/abc/config.yml"
			ms := []ghMatch{
				{alice.Key, "caddy_apikeys", url, "content"},
				{bob.Key, "caddy_apikeys", "", "commit"},
				{stranger, "caddy_apikeys", url, "content"},
				{typo, "caddy_apikeys", url, "content"},
				{"not-a-key", "caddy_apikeys", url, "issue_comment"},
				{alice.Key, "caddy_apikeys", url + "#again", "gist_content"},
			}
			body := reportBody(t, ms...)
			status, out := g.report(body, gh.id, gh.sign(t, body), nil)
			if status != 200 {
				t.Fatalf("signed report: %d %s", status, out)
			}
			var fb []ghFeedback
			if err := json.Unmarshal(out, &fb); err != nil {
				t.Fatalf("the response is not the partner format: %v: %s", err, out)
			}
			want := []string{"true_positive", "true_positive", "false_positive", "false_positive", "false_positive", "true_positive"}
			if len(fb) != len(ms) {
				t.Fatalf("%d feedback elements for %d matches", len(fb), len(ms))
			}
			for i, f := range fb {
				if f.TokenHash != sha256Hex(ms[i].Token) || f.TokenType != "caddy_apikeys" || f.Label != want[i] {
					t.Errorf("feedback %d: %+v, want hash %s label %s", i, f, sha256Hex(ms[i].Token), want[i])
				}
			}
			if strings.Contains(string(out), alice.Key) || strings.Contains(string(out), "token_raw") {
				t.Errorf("the response holds a raw token: %s", out)
			}
			for _, k := range []createdKey{alice, bob} {
				if r := g.do(request{method: "GET", path: "/v1/x", bearer: k.Key}); r.status != 401 {
					t.Errorf("leaked key %s still validates: %d", k.KeyID, r.status)
				}
				v, _ := g.view(map[string]string{alice.KeyID: "alice", bob.KeyID: "bob"}[k.KeyID], k.KeyID)
				if v.Status != "revoked" {
					t.Errorf("leaked key %s is %s", k.KeyID, v.Status)
				}
			}
			if r := g.do(request{method: "GET", path: "/v1/x", bearer: kept.Key}); r.status != 200 {
				t.Errorf("a key not in the report stopped validating: %d", r.status)
			}

			// The same report again: still true positives, nothing new revoked.
			status, out = g.report(body, gh.id, gh.sign(t, body), nil)
			if status != 200 || !strings.Contains(string(out), "true_positive") {
				t.Fatalf("repeated report: %d %s", status, out)
			}

			logs := waitLogs(g, `"name":"apikeys.leaked"`, 3)
			for _, line := range strings.Split(logs, "\n") {
				if strings.Contains(line, `"msg":"api key leaked"`) && !strings.Contains(line, `"key_id":"key_`) {
					t.Errorf("leak log line without key_id: %s", line)
				}
			}
			var sawEvent bool
			for _, line := range strings.Split(logs, "\n") {
				if strings.Contains(line, `"name":"apikeys.leaked"`) && strings.Contains(line, alice.KeyID) &&
					strings.Contains(line, `"owner":"alice"`) && strings.Contains(line, url) {
					sawEvent = true
				}
			}
			if !sawEvent {
				t.Errorf("no apikeys.leaked event with key_id, owner and url:\n%s", logs)
			}
			for _, raw := range []string{alice.Key, bob.Key, stranger, typo} {
				if strings.Contains(logs, raw) {
					t.Errorf("a raw token reached the logs")
				}
			}
		})
	}
}

// waitLogs waits until the logs hold n lines with marker, and returns them.
func waitLogs(g *gateway, marker string, n int) string {
	g.t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		logs := string(g.readLogs())
		if strings.Count(logs, marker) >= n || time.Now().After(deadline) {
			if c := strings.Count(logs, marker); c < n {
				g.t.Errorf("logs hold %d lines with %s, want %d", c, marker, n)
			}
			return logs
		}
		time.Sleep(20 * time.Millisecond)
	}
}
