package secretscanning

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// signer is a locally generated P-256 key, as GitHub holds one.
type signer struct {
	id  string
	key *ecdsa.PrivateKey
}

func newSigner(t testing.TB) signer {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	id, err := KeyIdentifier(&k.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	return signer{id: id, key: k}
}

// sign returns the base64 ASN.1 DER signature over body, as GitHub sends it.
func (s signer) sign(t testing.TB, body []byte) string {
	t.Helper()
	d := sha256.Sum256(body)
	sig, err := ecdsa.SignASN1(rand.Reader, s.key, d[:])
	if err != nil {
		t.Fatal(err)
	}
	return base64.StdEncoding.EncodeToString(sig)
}

func (s signer) pem(t testing.TB) string {
	t.Helper()
	der, err := x509.MarshalPKIXPublicKey(&s.key.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	return string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}))
}

// keyServer serves a key list in GitHub's format, with an ETag, and counts
// the requests it answers.
type keyServer struct {
	*httptest.Server
	mu      sync.Mutex
	keys    []signer
	hits    atomic.Int64
	full    atomic.Int64 // 200 answers
	failing atomic.Bool
}

func newKeyServer(t testing.TB, keys ...signer) *keyServer {
	ks := &keyServer{keys: keys}
	ks.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ks.hits.Add(1)
		if ks.failing.Load() {
			http.Error(w, "down", http.StatusBadGateway)
			return
		}
		body := ks.body(t)
		etag := fmt.Sprintf(`"%x"`, sha256.Sum256(body))
		if r.Header.Get("If-None-Match") == etag {
			w.WriteHeader(http.StatusNotModified)
			return
		}
		ks.full.Add(1)
		w.Header().Set("ETag", etag)
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write(body)
	}))
	t.Cleanup(ks.Close)
	return ks
}

func (ks *keyServer) publish(s signer) {
	ks.mu.Lock()
	ks.keys = append(ks.keys, s)
	ks.mu.Unlock()
}

func (ks *keyServer) body(t testing.TB) []byte {
	ks.mu.Lock()
	defer ks.mu.Unlock()
	type entry struct {
		KeyIdentifier string `json:"key_identifier"`
		Key           string `json:"key"`
		IsCurrent     bool   `json:"is_current"`
	}
	var list struct {
		PublicKeys []entry `json:"public_keys"`
	}
	for i, s := range ks.keys {
		list.PublicKeys = append(list.PublicKeys, entry{s.id, s.pem(t), i == len(ks.keys)-1})
	}
	b, _ := json.Marshal(list)
	return b
}

// clock is a settable clock.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) now() time.Time      { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *clock) add(d time.Duration) { c.mu.Lock(); c.t = c.t.Add(d); c.mu.Unlock() }

func newVerifier(t *testing.T, src string, clk *clock, errs *[]error) *Verifier {
	t.Helper()
	var mu sync.Mutex
	v, err := New(context.Background(), Options{Source: src, Now: clk.now, OnError: func(err error) {
		mu.Lock()
		*errs = append(*errs, err)
		mu.Unlock()
	}})
	if err != nil {
		t.Fatal(err)
	}
	return v
}

const report = `[{"token":"wbk_x","type":"caddy_apikeys","url":"https://github.com/o/r/blob/1/a.txt","source":"content"}]`

func TestVerifyRealSignatures(t *testing.T) {
	gh := newSigner(t)
	other := newSigner(t)
	ks := newKeyServer(t, newSigner(t), gh)
	var errs []error
	v := newVerifier(t, ks.URL, &clock{t: time.Now()}, &errs)
	body := []byte(report)
	ctx := context.Background()

	if err := v.Verify(ctx, gh.id, gh.sign(t, body), body); err != nil {
		t.Fatalf("a real signature was refused: %v", err)
	}
	tampered := []byte(strings.Replace(report, "wbk_x", "wbk_y", 1))
	sig := gh.sign(t, body)
	for name, c := range map[string]struct {
		id, sig string
		body    []byte
		want    error
	}{
		"tampered body":         {gh.id, sig, tampered, ErrBadSignature},
		"another key's sig":     {gh.id, other.sign(t, body), body, ErrBadSignature},
		"not base64":            {gh.id, "!!!" + sig, body, ErrBadSignature},
		"truncated":             {gh.id, sig[:20], body, ErrBadSignature},
		"no signature":          {gh.id, "", body, ErrMissingSignature},
		"no identifier":         {"", sig, body, ErrMissingSignature},
		"identifier too long":   {strings.Repeat("a", 200), sig, body, ErrBadSignature},
		"body re-encoded":       {gh.id, sig, []byte(strings.ReplaceAll(report, ",", ", ")), ErrBadSignature},
		"raw (unpadded) base64": {gh.id, strings.TrimRight(sig, "="), body, ErrBadSignature},
	} {
		if name == "raw (unpadded) base64" && !strings.HasSuffix(sig, "=") {
			continue
		}
		if err := v.Verify(ctx, c.id, c.sig, c.body); !errors.Is(err, c.want) {
			t.Errorf("%s: got %v, want %v", name, err, c.want)
		}
	}
	if len(errs) != 0 {
		t.Errorf("reload errors: %v", errs)
	}
}

// TestUnknownIdentifierRefreshes: a report signed with a key published
// after the list was loaded triggers one reload, which finds it; further
// unknown identifiers do not reload again until MinRefetch has passed.
func TestUnknownIdentifierRefreshes(t *testing.T) {
	old, rotated := newSigner(t), newSigner(t)
	ks := newKeyServer(t, old)
	clk := &clock{t: time.Now()}
	var errs []error
	v := newVerifier(t, ks.URL, clk, &errs)
	if n := ks.hits.Load(); n != 1 {
		t.Fatalf("New fetched %d times, want 1", n)
	}
	body := []byte(report)
	ctx := context.Background()

	ks.publish(rotated)
	if err := v.Verify(ctx, rotated.id, rotated.sign(t, body), body); err != nil {
		t.Fatalf("a report signed with a newly published key: %v", err)
	}
	if n := ks.hits.Load(); n != 2 {
		t.Fatalf("key server hit %d times, want 2 (one reload)", n)
	}
	// Known keys need no reload.
	if err := v.Verify(ctx, old.id, old.sign(t, body), body); err != nil {
		t.Fatal(err)
	}
	// Unknown identifiers: one reload per MinRefetch, however many come.
	stranger := newSigner(t)
	for i := 0; i < 20; i++ {
		if err := v.Verify(ctx, stranger.id, stranger.sign(t, body), body); !errors.Is(err, ErrUnknownKey) {
			t.Fatalf("unknown key: %v", err)
		}
	}
	if n := ks.hits.Load(); n != 2 {
		t.Fatalf("key server hit %d times after 20 unknown identifiers within a minute, want 2", n)
	}
	clk.add(DefaultMinRefetch + time.Second)
	ks.publish(stranger)
	if err := v.Verify(ctx, stranger.id, stranger.sign(t, body), body); err != nil {
		t.Fatalf("after MinRefetch the reload should find the key: %v", err)
	}
	if n := ks.hits.Load(); n != 3 {
		t.Fatalf("key server hit %d times, want 3", n)
	}
}

// TestRunRefreshesKeyList: the background loop reloads the list (with a
// conditional request), so a key removed from the list stops verifying and
// a new one starts, without any report triggering it.
func TestRunRefreshesKeyList(t *testing.T) {
	a, b := newSigner(t), newSigner(t)
	ks := newKeyServer(t, a)
	v, err := New(context.Background(), Options{Source: ks.URL, Refresh: 20 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { v.Run(ctx); close(done) }()
	defer func() { cancel(); <-done }()

	// Unchanged list: conditional requests, answered 304.
	for deadline := time.Now().Add(5 * time.Second); ks.hits.Load() < 4; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the background loop did not reload")
		}
	}
	if n := ks.full.Load(); n != 1 {
		t.Errorf("an unchanged list was sent in full %d times, want 1 (ETag)", n)
	}
	// Rotate: the list now holds b only.
	ks.mu.Lock()
	ks.keys = []signer{b}
	ks.mu.Unlock()
	body := []byte(report)
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		if v.keys.Load().byID[b.id] != nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the background loop did not pick up the new list")
		}
	}
	if err := v.Verify(context.Background(), b.id, b.sign(t, body), body); err != nil {
		t.Fatal(err)
	}
	if err := v.Verify(context.Background(), a.id, a.sign(t, body), body); !errors.Is(err, ErrUnknownKey) {
		t.Fatalf("a key dropped from the list still verifies: %v", err)
	}
}

// TestFailedReloadKeepsKeys: a key server that fails leaves the loaded keys
// in use; one that never answered gives ErrNoKeys.
func TestFailedReloadKeepsKeys(t *testing.T) {
	a := newSigner(t)
	ks := newKeyServer(t, a)
	clk := &clock{t: time.Now()}
	var errs []error
	v := newVerifier(t, ks.URL, clk, &errs)
	ks.failing.Store(true)
	body := []byte(report)
	stranger := newSigner(t)
	if err := v.Verify(context.Background(), stranger.id, stranger.sign(t, body), body); !errors.Is(err, ErrUnknownKey) {
		t.Fatal(err)
	}
	if len(errs) != 1 || !strings.Contains(errs[0].Error(), "status 502") {
		t.Errorf("want one reported reload error, got %v", errs)
	}
	if err := v.Verify(context.Background(), a.id, a.sign(t, body), body); err != nil {
		t.Fatalf("the loaded key stopped verifying after a failed reload: %v", err)
	}

	down := newKeyServer(t, a)
	down.failing.Store(true)
	errs = nil
	v2 := newVerifier(t, down.URL, clk, &errs)
	if err := v2.Verify(context.Background(), a.id, a.sign(t, body), body); !errors.Is(err, ErrNoKeys) {
		t.Fatalf("no list loaded: got %v, want ErrNoKeys", err)
	}
}

// TestKeyFile: a file of PEM keys pins them (any identifier); a file with
// GitHub's JSON is read as the list; bad files and sources are refused.
func TestKeyFile(t *testing.T) {
	a, b := newSigner(t), newSigner(t)
	dir := t.TempDir()
	pemFile := filepath.Join(dir, "keys.pem")
	if err := os.WriteFile(pemFile, []byte(a.pem(t)+b.pem(t)), 0o600); err != nil {
		t.Fatal(err)
	}
	body := []byte(report)
	v, err := New(context.Background(), Options{Source: pemFile})
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range []signer{a, b} {
		if err := v.Verify(context.Background(), "whatever-github-names-it", s.sign(t, body), body); err != nil {
			t.Errorf("pinned key: %v", err)
		}
	}
	if err := v.Verify(context.Background(), "x", newSigner(t).sign(t, body), body); !errors.Is(err, ErrBadSignature) {
		t.Errorf("a key not in the file: %v", err)
	}

	jsonFile := filepath.Join(dir, "keys.json")
	ks := newKeyServer(t, a)
	if err := os.WriteFile(jsonFile, ks.body(t), 0o600); err != nil {
		t.Fatal(err)
	}
	v, err = New(context.Background(), Options{Source: jsonFile})
	if err != nil {
		t.Fatal(err)
	}
	if err := v.Verify(context.Background(), a.id, a.sign(t, body), body); err != nil {
		t.Errorf("JSON key file: %v", err)
	}

	rsaLike := filepath.Join(dir, "empty.pem")
	_ = os.WriteFile(rsaLike, []byte("not a key"), 0o600)
	for _, src := range []string{rsaLike, filepath.Join(dir, "missing.pem"), "http://example.com/keys", "ftp://x/y", ""} {
		if _, err := New(context.Background(), Options{Source: src}); err == nil {
			t.Errorf("source %q was accepted", src)
		}
	}
}

func TestParseReport(t *testing.T) {
	var sb strings.Builder
	sb.WriteString("[")
	for i := 0; i < 1000; i++ {
		if i > 0 {
			sb.WriteString(",")
		}
		fmt.Fprintf(&sb, `{"token":"t%d","type":"x","url":"","source":"commit","extra":{"new":"field"}}`, i)
	}
	sb.WriteString("]")
	ms, err := ParseReport([]byte(sb.String()), 1000)
	if err != nil || len(ms) != 1000 || ms[999].Token != "t999" || ms[0].Source != "commit" {
		t.Fatalf("1000 matches: %v, %d", err, len(ms))
	}
	if _, err := ParseReport([]byte(sb.String()), 999); !errors.Is(err, ErrTooManyMatches) {
		t.Errorf("over the limit: %v", err)
	}
	for _, bad := range []string{``, `{}`, `[{"token":1}]`, `[{"type":"x"}]`, `[null]`, `["x"]`, `[] []`, `[{"token":"a"}`} {
		if _, err := ParseReport([]byte(bad), 10); !errors.Is(err, ErrMalformedReport) {
			t.Errorf("%q: got %v, want ErrMalformedReport", bad, err)
		}
	}
	if ms, err := ParseReport([]byte(`[]`), 10); err != nil || len(ms) != 0 {
		t.Errorf("empty report: %v %v", ms, err)
	}
	if h := TokenHash("abc"); h != "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad" {
		t.Errorf("TokenHash: %s", h)
	}
}
