package apikeys

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/caddy-apikeys/caddy-apikeys/internal/testredis"
	"github.com/caddy-apikeys/caddy-apikeys/keystore"
)

// The guard's benchmarks call Handler.ServeHTTP directly, as Caddy's
// server does, on a handler provisioned from a config like any other:
//
//	go test -run '^$' -bench Guard -benchmem .
//
// Hit: a cached key, as after its first request. The request, its header
// map and its replacer are reused between iterations (as a server reuses a
// connection's buffers; allocating them is Caddy's cost, not the guard's),
// so the figures are what the guard itself costs per request.

// benchHandler provisions a Handler with the given store config and scope
// rules and returns it with a cleanup.
func benchHandler(b testing.TB, store *StoreConfig, cache *CacheConfig, plans ...Plan) *Handler {
	b.Helper()
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	h := &Handler{
		Store:      store,
		Secret:     "{env.APIKEYS_TEST_SECRET}",
		ScopeRules: []ScopeRule{{Scope: "analytics:read", Methods: []string{"GET"}, Paths: []string{"/v1/analytics/*"}}},
		Cache:      cache,
		Plans:      plans,
	}
	// No running config, so no events app: key changes are not emitted.
	if err := h.provision(ctx, nil); err != nil {
		b.Fatal(err)
	}
	if err := h.Validate(); err != nil {
		b.Fatal(err)
	}
	// Caddy's default level: Info (the guard logs its decisions at Debug).
	h.logger = zap.New(zapcore.NewCore(zapcore.NewJSONEncoder(zap.NewProductionEncoderConfig()), zapcore.AddSync(io.Discard), zapcore.InfoLevel))
	b.Cleanup(func() {
		_ = h.Cleanup()
		cancel()
	})
	return h
}

// benchKey mints a key through the handler's store (so it is cached),
// with metadata and a plan when given.
func benchKey(b testing.TB, h *Handler, scopes []string, metaAndPlan ...string) string {
	b.Helper()
	req := createRequest{Name: "bench", Scopes: scopes}
	if len(metaAndPlan) > 0 && metaAndPlan[0] != "" {
		m, aerr := parseMeta([]byte(metaAndPlan[0]))
		if aerr != nil {
			b.Fatal(aerr.message)
		}
		req.Meta = m
	}
	if len(metaAndPlan) > 1 {
		req.Plan = metaAndPlan[1]
	}
	k, raw, err := h.newKey("bench-owner", req)
	if err != nil {
		b.Fatal(err)
	}
	if err := h.store.Create(context.Background(), k); err != nil {
		b.Fatal(err)
	}
	return raw
}

// benchRequest is a reusable request with a Caddy replacer in its context.
type benchRequest struct {
	r    *http.Request
	auth []string
}

func newBenchRequest(b testing.TB, path, key string) *benchRequest {
	r, err := http.NewRequest("GET", "http://gateway"+path, nil)
	if err != nil {
		b.Fatal(err)
	}
	repl := caddy.NewReplacer()
	r = r.WithContext(context.WithValue(r.Context(), caddy.ReplacerCtxKey, repl))
	// As in Caddy: the server (default options) is in the context.
	r = r.WithContext(context.WithValue(r.Context(), caddyhttp.ServerCtxKey, new(caddyhttp.Server)))
	r.Header.Set("User-Agent", "bench")
	r.Header.Set("Accept", "*/*")
	// As in Caddy: net/http gives a request without a body http.NoBody,
	// and Caddy's server wraps every body (for its read timeouts).
	r.Body = caddyWrappedBody{http.NoBody}
	return &benchRequest{r: r, auth: []string{"Bearer " + key}}
}

// caddyWrappedBody stands for the wrapper Caddy's server puts around every
// request body.
type caddyWrappedBody struct{ io.ReadCloser }

// TestGuardEmptyBodyNotWatched: a GET without a body, as Caddy hands it on
// (its body wrapped), passes the guard with one allocation: only a request
// whose framing announces a body has it watched (see bodyWatch).
func TestGuardEmptyBodyNotWatched(t *testing.T) {
	h := benchHandler(t, &StoreConfig{Path: filepath.Join(t.TempDir(), "keys.db")}, nil)
	br := newBenchRequest(t, "/v1/anything", benchKey(t, h, nil))
	w := &nopWriter{h: http.Header{}}
	var watched bool
	next := caddyhttp.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) error {
		_, watched = w.(*watchedWriter)
		return nil
	})
	allocs := testing.AllocsPerRun(100, func() {
		if err := h.ServeHTTP(w, br.reset(), next); err != nil {
			t.Fatal(err)
		}
	})
	if watched {
		t.Error("a GET without a body had its body watched")
	}
	// Under the race detector sync.Pool drops items: counts mean nothing.
	if !raceEnabled && allocs > 1 {
		t.Errorf("a GET without a body: %.0f allocations, want at most 1", allocs)
	}
}

// reset puts the Authorization header back (the guard removes it).
func (br *benchRequest) reset() *http.Request {
	br.r.Header["Authorization"] = br.auth
	return br.r
}

// nopWriter is a ResponseWriter that discards everything.
type nopWriter struct{ h http.Header }

func (w *nopWriter) Header() http.Header         { return w.h }
func (w *nopWriter) Write(p []byte) (int, error) { return len(p), nil }
func (w *nopWriter) WriteHeader(int)             {}

var nextOK = caddyhttp.HandlerFunc(func(http.ResponseWriter, *http.Request) error { return nil })

// checkPassed fails the benchmark unless the guard let the request through.
func checkPassed(b *testing.B, h *Handler, br *benchRequest, w *nopWriter) {
	b.Helper()
	w.h = http.Header{}
	var passed bool
	next := caddyhttp.HandlerFunc(func(http.ResponseWriter, *http.Request) error { passed = true; return nil })
	if err := h.ServeHTTP(w, br.reset(), next); err != nil || !passed {
		b.Fatalf("the guard refused the benchmark's key: %v %v", err, w.h)
	}
}

func BenchmarkGuardHit(b *testing.B) {
	// A plan with a rate limit and a quota that the benchmark never
	// reaches (a request every 3.6 µs for an hour; 10^15 a month).
	h := benchHandler(b, &StoreConfig{Path: filepath.Join(b.TempDir(), "keys.db")}, nil,
		Plan{Name: "pro", RateLimit: &RateLimit{Requests: 1e9, Window: caddy.Duration(time.Hour)}, Quota: &Quota{Requests: maxPlanNumber, Period: "month"}},
		Plan{Name: "unmetered"})
	cases := []struct {
		name, path string
		scopes     []string
		meta       string
		plan       string
	}{
		{"full-access", "/v1/anything", nil, "", ""},
		{"scoped", "/v1/analytics/daily", []string{"analytics:read"}, "", ""},
		// Metadata: a fourth header and a placeholder per scalar member.
		{"meta", "/v1/anything", nil, `{"plan":"pro","tenant":"acme-eu","seats":25,"beta":true,"limits":{"rps":10}}`, ""},
		// A plan: the limiter's decision, a fourth header, a placeholder.
		{"plan", "/v1/anything", nil, "", "pro"},
		// A plan without limits: the header and placeholder alone.
		{"plan-unmetered", "/v1/anything", nil, "", "unmetered"},
	}
	for _, tc := range cases {
		key := benchKey(b, h, tc.scopes, tc.meta, tc.plan)
		b.Run(tc.name, func(b *testing.B) {
			br := newBenchRequest(b, tc.path, key)
			w := &nopWriter{}
			checkPassed(b, h, br, w)
			b.ReportAllocs()
			for b.Loop() {
				if err := h.ServeHTTP(w, br.reset(), nextOK); err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run(tc.name+"-parallel", func(b *testing.B) {
			b.ReportAllocs()
			b.RunParallel(func(pb *testing.PB) {
				br := newBenchRequest(b, tc.path, key)
				w := &nopWriter{h: http.Header{}}
				for pb.Next() {
					if err := h.ServeHTTP(w, br.reset(), nextOK); err != nil {
						b.Fatal(err)
					}
				}
			})
		})
	}
}

// BenchmarkGuardMiss measures requests whose key the cache does not hold,
// answered by a real redis-server on loopback: "known" keys were stored
// behind the cache's back (one GET, then the record is cached), "unknown"
// ones were never stored (one GET, then remembered as unknown). Each
// iteration uses a key of its own.
func BenchmarkGuardMiss(b *testing.B) {
	srv := testredis.Start(b)
	h := benchHandler(b, &StoreConfig{Type: "redis", URLs: []string{srv.URL()}}, nil)
	raw, err := keystore.NewRedis(keystore.RedisOptions{URLs: []string{srv.URL()}})
	if err != nil {
		b.Fatal(err)
	}
	defer raw.Close()

	run := func(b *testing.B, store bool, want int) {
		keys := make([]string, b.N)
		for i := range keys {
			if keys[i], err = keystore.Mint(h.KeyPrefix); err != nil {
				b.Fatal(err)
			}
			if store {
				k := &keystore.Key{ID: "key_bench" + time.Now().Format("150405.000000000") + keys[i][4:12],
					Owner: "bench", Name: "bench", Prefix: keystore.DisplayPrefix(h.KeyPrefix, keys[i]),
					Digest: h.hasher.Digest(keys[i]), CreatedAt: time.Now().UTC().Truncate(time.Millisecond)}
				if err := raw.Create(context.Background(), k); err != nil {
					b.Fatal(err)
				}
			}
		}
		br := newBenchRequest(b, "/v1/anything", "")
		w := &nopWriter{h: http.Header{}}
		var status atomic.Int64
		write := &statusWriter{nopWriter: w, status: &status}
		b.ReportAllocs()
		b.ResetTimer()
		for i := range b.N {
			br.auth = []string{"Bearer " + keys[i]}
			status.Store(200)
			if err := h.ServeHTTP(write, br.reset(), nextOK); err != nil {
				b.Fatal(err)
			}
			if int(status.Load()) != want {
				b.Fatalf("status %d, want %d", status.Load(), want)
			}
		}
	}
	b.Run("known", func(b *testing.B) { run(b, true, 200) })
	b.Run("unknown", func(b *testing.B) { run(b, false, 401) })
}

// statusWriter records the status a refusal writes.
type statusWriter struct {
	*nopWriter
	status *atomic.Int64
}

func (w *statusWriter) WriteHeader(code int) { w.status.Store(int64(code)) }

// BenchmarkGuardRoundRobin is BenchmarkGuardHit with every one of n cached
// keys used in turn, as a gateway with n active customers sees them: each
// request's record is a different one (out of the CPU's caches at 10,000
// and more) and the first use of a key in a second reaches the last-used
// recorder. The keys are stored in a real redis-server and read into the
// cache once before the timer starts.
//
//	go test -run '^$' -bench GuardRoundRobin -benchmem .
func BenchmarkGuardRoundRobin(b *testing.B) {
	srv := testredis.Start(b)
	raw, err := keystore.NewRedis(keystore.RedisOptions{URLs: []string{srv.URL()}})
	if err != nil {
		b.Fatal(err)
	}
	defer raw.Close()
	h := benchHandler(b, &StoreConfig{Type: "redis", URLs: []string{srv.URL()}}, nil)
	var tokens []string
	for _, n := range []int{1_000, 10_000} {
		for len(tokens) < n {
			more := make([]string, n-len(tokens))
			var wg sync.WaitGroup
			for w := range 16 {
				wg.Go(func() {
					for i := w; i < len(more); i += 16 {
						more[i] = storeRoundRobinKey(b, h, raw)
					}
				})
			}
			wg.Wait()
			tokens = append(tokens, more...)
		}
		reqs := make([]*benchRequest, n)
		for i := range reqs {
			reqs[i] = newBenchRequest(b, "/v1/anything", tokens[i])
		}
		w := &nopWriter{h: http.Header{}}
		for _, br := range reqs {
			checkPassed(b, h, br, w)
		}
		// loop serves the keys in turn, calling roundDone after each round.
		loop := func(b *testing.B, roundDone func()) {
			b.ReportAllocs()
			i := 0
			for b.Loop() {
				if err := h.ServeHTTP(w, reqs[i].reset(), nextOK); err != nil {
					b.Fatal(err)
				}
				if i++; i == n {
					i = 0
					roundDone()
				}
			}
		}
		b.Run(fmt.Sprintf("keys=%d", n), func(b *testing.B) { loop(b, func() {}) })
		// Every request the first use of its key in its second, as with
		// n keys used less than once a second each (10,000 customers at
		// 3,000 requests a second): the guard's clock moves on a second
		// with every round of the keys, so every request notes a use.
		b.Run(fmt.Sprintf("keys=%d,every-use-noted", n), func(b *testing.B) {
			defer func(now func() time.Time) { h.now = now }(h.now)
			start := time.Now()
			round := 0
			h.now = func() time.Time { return start.Add(time.Duration(round) * time.Second) }
			loop(b, func() { round++ })
		})
	}
}

// storeRoundRobinKey stores a full-access key behind the cache's back and
// returns it.
func storeRoundRobinKey(b *testing.B, h *Handler, raw *keystore.RedisStore) string {
	token, err := keystore.Mint(h.KeyPrefix)
	if err != nil {
		b.Error(err)
		return ""
	}
	id, err := keystore.NewKeyID()
	if err != nil {
		b.Error(err)
		return ""
	}
	k := &keystore.Key{ID: id, Owner: "owner-" + id[4:6], Name: "bench",
		Prefix: keystore.DisplayPrefix(h.KeyPrefix, token), Digest: h.hasher.Digest(token),
		CreatedAt: time.Now().UTC().Truncate(time.Millisecond)}
	if err := raw.Create(context.Background(), k); err != nil {
		b.Error(err)
	}
	return token
}
