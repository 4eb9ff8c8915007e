package apikeys

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	_ "github.com/caddyserver/caddy/v2/modules/standard"
	"github.com/golang-jwt/jwt/v5"

	"github.com/caddy-apikeys/caddy-apikeys/internal/testcaddy"
	"github.com/caddy-apikeys/caddy-apikeys/internal/testredis"
	"github.com/caddy-apikeys/caddy-apikeys/keystore"
)

// Test secrets, handed to Caddy through {env.*} placeholders as an operator
// would. The log-capture test checks that none of them is ever logged.
const (
	testSecret    = "test-store-secret-0123456789abcdef0123456789abcdef"
	testJWTSecret = "test-dashboard-secret-0123456789abcdef0123456789abcd"
	testIssuer    = "test-dashboard"
	testAudience  = "caddy-apikeys"
)

func TestMain(m *testing.M) {
	// Keep Caddy's data and config (the default file store, autosave) out
	// of the user's home.
	home, err := os.MkdirTemp("", "apikeys-test-home-")
	if err != nil {
		panic(err)
	}
	os.Setenv("XDG_DATA_HOME", filepath.Join(home, "data"))
	os.Setenv("XDG_CONFIG_HOME", filepath.Join(home, "config"))
	os.Setenv("APIKEYS_TEST_SECRET", testSecret)
	os.Setenv("APIKEYS_TEST_JWT_SECRET", testJWTSecret)
	code := m.Run()
	os.RemoveAll(home)
	os.Exit(code)
}

// gateway is a real Caddy server, loaded in-process, running the apikeys
// handler in front of a real HTTP backend, with a real store.
type gateway struct {
	t          *testing.T
	kind       string
	port       int
	base       string // http://127.0.0.1:port
	storePath  string // the bbolt file, for the file store
	jwtExtra   string // extra dashboard_jwt subdirectives
	secretLine string // the secret subdirective
	reloaded   bool   // load ran more than once
	backend    *echoBackend
	redis      *testredis.Server   // nil for the file store
	cluster    *testredis.Cluster  // the "cluster" kind's Redis Cluster
	sentinel   *testredis.Sentinel // the "sentinel" kind's Sentinel deployment
	store      keystore.Store      // the very store the handler uses
	logDir     string
	client     *http.Client
}

// testAccessLogFormat is the format of the access log of gateways started
// afterwards.
var testAccessLogFormat = "format json"

// testStoreBlock, when set, is the body of the store subdirective's block
// for gateways started afterwards.
var testStoreBlock string

// storeKinds are the backends every contract test runs against. "cluster"
// is a real three-primary Redis Cluster; "sentinel" (a primary, a replica
// and a sentinel, wait_replicas 1) is started by the tests that need it.
var storeKinds = []string{"file", "redis", "cluster"}

// startGateway loads a Caddy config with the given store kind and extra
// apikeys subdirectives, and stops it when the test ends.
func startGateway(t *testing.T, kind string, extra string, jwtExtra ...string) *gateway {
	t.Helper()
	g := &gateway{t: t, kind: kind, backend: newEchoBackend(t), logDir: t.TempDir(),
		client: &http.Client{Timeout: 10 * time.Second}}
	switch kind {
	case "file":
		g.storePath = filepath.Join(t.TempDir(), "keys.db")
	case "redis":
		// Persist every write so tests that restart Redis keep the data.
		g.redis = testredis.Start(t, "--appendonly", "yes", "--appendfsync", "always")
	case "cluster":
		g.cluster = testredis.StartCluster(t, "--appendonly", "yes", "--appendfsync", "always")
	case "sentinel":
		g.sentinel = testredis.StartSentinel(t, "apikeys-primary")
	default:
		t.Fatalf("unknown store kind %q", kind)
	}
	g.port = freePort(t)
	g.base = fmt.Sprintf("http://127.0.0.1:%d", g.port)
	t.Cleanup(func() { stopCaddy(t) })
	g.jwtExtra = strings.Join(jwtExtra, "\n")
	g.secretLine = "secret {env.APIKEYS_TEST_SECRET}"
	if err := g.load(extra); err != nil {
		t.Fatal(err)
	}
	g.store = currentStore(t)
	return g
}

// load (re)loads the gateway's config with extra apikeys subdirectives.
func (g *gateway) load(extra string) error {
	storeLine := "store file " + g.storePath
	switch {
	case g.redis != nil:
		storeLine = "store redis " + g.redis.URL()
	case g.cluster != nil:
		storeLine = "store redis " + strings.Join(g.cluster.URLs(), " ")
	case g.sentinel != nil:
		storeLine = "store redis " + g.sentinel.URL()
	}
	block := testStoreBlock
	if g.sentinel != nil {
		block += "\nwait_replicas 1 300ms"
	}
	if block != "" {
		storeLine += " {\n" + block + "\n}"
	}
	cfg := fmt.Sprintf(`{
	admin off
	persist_config off
	auto_https off
	log {
		output file %[1]s/caddy.log
		format json
		level DEBUG
	}
}

http://127.0.0.1:%[2]d {
	log {
		output file %[1]s/access.log
		%[10]s
	}
	apikeys {
		%[3]s
		%[9]s
		dashboard_jwt {
			secret {env.APIKEYS_TEST_JWT_SECRET}
			issuer %[4]s
			audience %[5]s
			%[8]s
		}
		scope analytics:read GET /v1/analytics /v1/analytics/*
		scope webhooks:manage /v1/webhooks/*
		scopes billing:read
		max_expires_in_days 365
		store_timeout 500ms
		%[6]s
	}
	reverse_proxy %[7]s {
		header_up X-Auth-User-Id {http.auth.user.id}
		header_up X-Auth-Apikey-Id {http.auth.apikey.id}
		header_up X-Auth-Apikey-Scopes {http.auth.apikey.scopes}
		header_up X-Auth-Meta-Plan {http.auth.apikey.meta.plan}
		header_up X-Auth-Meta-Seats {http.auth.apikey.meta.seats}
		header_up X-Auth-Meta-Beta {http.auth.apikey.meta.beta}
		header_up X-Auth-Apikey-Plan {http.auth.apikey.plan}
	}
}
`, g.logDir, g.port, storeLine, testIssuer, testAudience, extra, strings.TrimPrefix(g.backend.URL, "http://"), g.jwtExtra, g.secretLine, testAccessLogFormat)
	cfgJSON, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(cfg), nil)
	if err != nil {
		return fmt.Errorf("adapting Caddyfile: %w", err)
	}
	g.reloaded = g.store != nil // loaded before
	g.reloaded = g.store != nil // loaded before
	err = caddy.Load(cfgJSON, true)
	// The old servers close their idle connections; start afresh rather
	// than race them.
	g.client.CloseIdleConnections()
	return err
}

// stopCaddy stops the running config, if any.
func stopCaddy(t *testing.T) {
	if err := caddy.Stop(); err != nil {
		t.Errorf("stopping caddy: %v", err)
	}
}

// currentStore returns the store the running handler holds (there is one).
func currentStore(t *testing.T) keystore.Store {
	t.Helper()
	var found keystore.Store
	n := 0
	stores.Range(func(_, v any) bool {
		found = v.(*pooledStore).Store
		n++
		return true
	})
	if n != 1 {
		t.Fatalf("want exactly one open store, have %d", n)
	}
	return found
}

func freePort(t testing.TB) int { return testcaddy.FreePort(t) }

// echoBackend is a real HTTP server that records what it received.
type echoBackend struct {
	*httptest.Server
	mu   sync.Mutex
	seen []http.Header
}

func newEchoBackend(t *testing.T) *echoBackend {
	b := &echoBackend{}
	b.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b.mu.Lock()
		b.seen = append(b.seen, r.Header.Clone())
		b.mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(map[string]any{"backend": true, "path": r.URL.Path, "method": r.Method})
	}))
	t.Cleanup(b.Close)
	return b
}

// last returns the headers of the last request the backend received.
func (b *echoBackend) last(t *testing.T) http.Header {
	t.Helper()
	b.mu.Lock()
	defer b.mu.Unlock()
	if len(b.seen) == 0 {
		t.Fatal("the backend received no request")
	}
	return b.seen[len(b.seen)-1]
}

func (b *echoBackend) count() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return len(b.seen)
}

// response is a decoded reply of the gateway.
type response struct {
	status int
	header http.Header
	body   []byte
	env    struct {
		Success bool            `json:"success"`
		Data    json.RawMessage `json:"data"`
		Error   *struct {
			Code    string `json:"code"`
			Message string `json:"message"`
			Field   string `json:"field"`
		} `json:"error"`
	}
}

func (r *response) errCode() string {
	if r.env.Error == nil {
		return ""
	}
	return r.env.Error.Code
}

// request describes one call to the gateway.
type request struct {
	method, path string
	bearer       string
	body         string
	contentType  string // default application/json when body is set
	header       map[string]string
}

func (g *gateway) do(req request) *response {
	g.t.Helper()
	build := func() *http.Request {
		r, err := http.NewRequest(req.method, g.base+req.path, strings.NewReader(req.body))
		if err != nil {
			g.t.Fatal(err)
		}
		if req.bearer != "" {
			r.Header.Set("Authorization", "Bearer "+req.bearer)
		}
		if req.body != "" {
			ct := req.contentType
			if ct == "" {
				ct = "application/json"
			}
			r.Header.Set("Content-Type", ct)
		}
		for k, v := range req.header {
			r.Header.Set(k, v)
		}
		return r
	}
	resp, err := g.client.Do(build())
	if err != nil && g.reloaded && (req.method == "GET" || req.header["Idempotency-Key"] != "") {
		// Right after a reload the old server may reset a connection it
		// accepted as it shut down; a careful client resends a safe
		// request once (the reload tests count such resends).
		resp, err = g.client.Do(build())
	}
	if err != nil {
		g.t.Fatalf("%s %s: %v", req.method, req.path, err)
	}
	defer resp.Body.Close()
	out := &response{status: resp.StatusCode, header: resp.Header}
	out.body, _ = io.ReadAll(resp.Body)
	if strings.HasPrefix(resp.Header.Get("Content-Type"), "application/json") {
		if err := json.Unmarshal(out.body, &out.env); err != nil {
			g.t.Fatalf("%s %s: response is not JSON: %v: %s", req.method, req.path, err, out.body)
		}
	}
	return out
}

// createdKey is the data of a 201 from POST /v1/apikeys.
type createdKey struct {
	KeyID     string   `json:"key_id"`
	Name      string   `json:"name"`
	Key       string   `json:"key"`
	Prefix    string   `json:"prefix"`
	Scopes    []string `json:"scopes"`
	ExpiresAt *string  `json:"expires_at"`
	CreatedAt string   `json:"created_at"`
}

// create mints a key through the API and fails the test unless it is 201.
func (g *gateway) create(owner, body string) createdKey {
	g.t.Helper()
	resp := g.do(request{method: "POST", path: "/v1/apikeys", bearer: dashboardToken(g.t, owner), body: body})
	if resp.status != http.StatusCreated {
		g.t.Fatalf("create: status %d: %s", resp.status, resp.body)
	}
	var k createdKey
	if err := json.Unmarshal(resp.env.Data, &k); err != nil {
		g.t.Fatal(err)
	}
	return k
}

// countKeys counts owner's keys in the store.
func (g *gateway) countKeys(owner string) int {
	g.t.Helper()
	n, cursor := 0, ""
	for {
		ctx, cancel := testCtx()
		keys, next, err := g.store.List(ctx, owner, cursor, 100)
		cancel()
		if err != nil {
			g.t.Fatalf("listing keys: %v", err)
		}
		n += len(keys)
		if next == "" {
			return n
		}
		cursor = next
	}
}

// dashboardToken signs a valid dashboard JWT for owner.
func dashboardToken(t testing.TB, owner string) string {
	return signToken(t, jwt.SigningMethodHS256, []byte(testJWTSecret), jwt.MapClaims{
		"sub": owner, "iss": testIssuer, "aud": testAudience,
		"iat": time.Now().Unix(), "exp": time.Now().Add(time.Hour).Unix(),
	})
}

func signToken(t testing.TB, m jwt.SigningMethod, key any, claims jwt.MapClaims) string {
	t.Helper()
	s, err := jwt.NewWithClaims(m, claims).SignedString(key)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// readLogs returns everything Caddy logged during the test.
func (g *gateway) readLogs() []byte {
	var all bytes.Buffer
	for _, name := range []string{"caddy.log", "access.log"} {
		b, err := os.ReadFile(filepath.Join(g.logDir, name))
		if err != nil && !os.IsNotExist(err) {
			g.t.Fatal(err)
		}
		all.Write(b)
	}
	return all.Bytes()
}

// loadCaddyfileErr adapts and loads a Caddyfile that is expected to fail,
// returning the error (and stopping Caddy if it loaded after all).
func loadCaddyfileErr(t *testing.T, cfg string) error {
	t.Helper()
	cfgJSON, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(cfg), nil)
	if err != nil {
		return err
	}
	err = caddy.Load(cfgJSON, true)
	if err == nil {
		_ = caddy.Stop()
	}
	return err
}

// setClock makes handlers provisioned afterwards read the time from the
// returned control instead of the wall clock; the test moves it with
// advance. Call before startGateway.
func setClock(t *testing.T) (advance func(time.Duration)) {
	var mu sync.Mutex
	var offset time.Duration
	now = func() time.Time {
		mu.Lock()
		defer mu.Unlock()
		return time.Now().Add(offset)
	}
	t.Cleanup(func() { now = time.Now })
	return func(d time.Duration) {
		mu.Lock()
		offset += d
		mu.Unlock()
	}
}

// startLooseHeaderSite starts a file-store gateway on a server that lets
// '_' and '.' header names through (expected_underscore_headers and
// expected_dot_headers for the identity headers' spellings), with extra
// apikeys subdirectives: CGI-style backends read X_Api_Key_Owner as
// X-Api-Key-Owner, so these spellings are forgeries to strip.
func startLooseHeaderSite(t *testing.T, extra string) *gateway {
	t.Helper()
	backend := newEchoBackend(t)
	port := freePort(t)
	cfg := fmt.Sprintf(`{
	admin off
	persist_config off
	auto_https off
	servers {
		expected_underscore_headers x_api_key_* x-api_key-*
		expected_dot_headers x.api.key.*
	}
}

http://127.0.0.1:%[1]d {
	apikeys {
		store file %[2]s
		secret {env.APIKEYS_TEST_SECRET}
		dashboard_jwt {
			secret {env.APIKEYS_TEST_JWT_SECRET}
			issuer %[3]s
			audience %[4]s
		}
		%[6]s
	}
	reverse_proxy %[5]s
}
`, port, filepath.Join(t.TempDir(), "keys.db"), testIssuer, testAudience, strings.TrimPrefix(backend.URL, "http://"), extra)
	cfgJSON, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(cfg), nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := caddy.Load(cfgJSON, true); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { stopCaddy(t) })
	return &gateway{t: t, base: fmt.Sprintf("http://127.0.0.1:%d", port), backend: backend, client: &http.Client{Timeout: 10 * time.Second}}
}
