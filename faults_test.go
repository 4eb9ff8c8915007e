package apikeys

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"path/filepath"
	"runtime/pprof"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/caddy-apikeys/caddy-apikeys/internal/testcaddy"
	"github.com/caddy-apikeys/caddy-apikeys/internal/testredis"
	"github.com/caddy-apikeys/caddy-apikeys/keystore"
)

// outcome is one request of a load stream.
type outcome struct {
	op      string // "mint" or "check"
	status  int
	err     error
	latency time.Duration
	key     createdKey // for a 201
	at      time.Time
	resent  bool // the first attempt died in transit and was sent again
}

// loadStream sends mints and key checks from worker goroutines until stop
// is closed. With careful set it acts as a careful client: every mint
// carries an Idempotency-Key, and a request whose connection died in
// transit (reset or closed before an answer) is sent once more, which that
// makes safe. Otherwise a quarter of the mints carry a key and nothing is
// resent.
type loadStream struct {
	g       *gateway
	client  *http.Client
	mu      sync.Mutex
	out     []outcome
	wg      sync.WaitGroup
	stop    chan struct{}
	counter atomic.Int64
}

func startLoad(g *gateway, workers int, checkKey string, careful bool) *loadStream {
	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: workers}}
	ls := &loadStream{g: g, client: client, stop: make(chan struct{})}
	token := dashboardToken(g.t, "alice")
	for w := range workers {
		ls.wg.Go(func() {
			for i := 0; ; i++ {
				select {
				case <-ls.stop:
					return
				default:
				}
				n := ls.counter.Add(1)
				var req *http.Request
				op := "check"
				if (i+w)%2 == 0 {
					op = "mint"
					req, _ = http.NewRequest("POST", g.base+"/v1/apikeys", strings.NewReader(`{"name":"load"}`))
					req.Header.Set("Content-Type", "application/json")
					req.Header.Set("Authorization", "Bearer "+token)
					if careful || n%4 == 0 {
						req.Header.Set("Idempotency-Key", "load-"+strconv.FormatInt(n, 10))
					}
				} else {
					req, _ = http.NewRequest("GET", g.base+"/v1/x", nil)
					req.Header.Set("Authorization", "Bearer "+checkKey)
				}
				start := time.Now()
				resp, err := client.Do(req)
				resent := false
				if err != nil && careful {
					retry := req.Clone(req.Context())
					if req.GetBody != nil {
						retry.Body, _ = req.GetBody()
					}
					resp, err = client.Do(retry)
					resent = true
				}
				o := outcome{op: op, err: err, latency: time.Since(start), at: start, resent: resent}
				if err == nil {
					o.status = resp.StatusCode
					var env struct {
						Data createdKey `json:"data"`
					}
					if json.NewDecoder(resp.Body).Decode(&env) == nil {
						o.key = env.Data
					}
					resp.Body.Close()
				}
				ls.mu.Lock()
				ls.out = append(ls.out, o)
				ls.mu.Unlock()
				if o.status == 503 {
					time.Sleep(20 * time.Millisecond) // as a client honouring Retry-After would, but faster
				}
			}
		})
	}
	return ls
}

// finish stops the workers, closes their connections and returns every
// outcome.
func (ls *loadStream) finish() []outcome {
	close(ls.stop)
	ls.wg.Wait()
	ls.client.CloseIdleConnections()
	return ls.out
}

// summary counts outcomes by operation and status ("mint 201: 12, ...")
// and gives the slowest answer.
func summary(out []outcome) string {
	counts := map[string]int{}
	for _, o := range out {
		if o.resent {
			counts[o.op+" resent once"]++
		}
		k := fmt.Sprintf("%s %d", o.op, o.status)
		if o.err != nil {
			k = o.op + " error"
		}
		counts[k]++
	}
	var slowest time.Duration
	for _, o := range out {
		slowest = max(slowest, o.latency)
	}
	var parts []string
	for k, v := range counts {
		parts = append(parts, fmt.Sprintf("%s: %d", k, v))
	}
	sort.Strings(parts)
	return strings.Join(parts, ", ") + fmt.Sprintf("; slowest %s", slowest.Round(time.Millisecond))
}

// TestRedisOutageDuringLoad kills Redis (SIGKILL) under a stream of mints
// and key checks, restarts it from its append-only file, then hangs it
// (SIGSTOP) and resumes it. Requests during the outages get 503, never 500
// and never later than store_timeout (500ms, twice for an idempotent mint,
// which makes two bounded rounds of store calls) plus slack; every 201 is
// for a key the store holds, and every 201'd key validates afterwards.
func TestRedisOutageDuringLoad(t *testing.T) {
	g := startGateway(t, "redis", "max_keys_per_owner 100000")
	check := g.create("alice", `{"name":"checker"}`)
	ls := startLoad(g, 4, check.Key, false)

	phase := func(name string, d time.Duration) { t.Logf("%s for %s", name, d); time.Sleep(d) }
	phase("normal", 400*time.Millisecond)
	g.redis.Stop()
	phase("crashed", 1200*time.Millisecond)
	g.redis.Restart()
	phase("restarted", 600*time.Millisecond)
	g.redis.Pause()
	phase("hung", 1200*time.Millisecond)
	g.redis.Resume()
	phase("resumed", 600*time.Millisecond)
	out := ls.finish()
	t.Logf("%d requests: %s", len(out), summary(out))

	const bound = 2*500*time.Millisecond + time.Second
	var (
		maxLatency time.Duration
		minted     []createdKey
		unavail    int
	)
	for _, o := range out {
		maxLatency = max(maxLatency, o.latency)
		switch {
		case o.err != nil:
			t.Errorf("%s at %s: %v", o.op, o.at.Format("15:04:05.000"), o.err)
		case o.latency > bound:
			t.Errorf("%s answered %d after %s (bound %s)", o.op, o.status, o.latency, bound)
		case o.status == 503:
			unavail++
		case o.op == "mint" && o.status == 201:
			minted = append(minted, o.key)
		case o.op == "check" && o.status == 200:
		default:
			t.Errorf("%s answered %d", o.op, o.status)
		}
	}
	t.Logf("max latency %s; %d answers were 503", maxLatency.Round(time.Millisecond), unavail)
	if unavail == 0 {
		t.Fatal("no request hit the outages: the test proves nothing")
	}

	ctx, cancel := testCtx()
	defer cancel()
	for _, k := range minted {
		if _, err := g.store.Get(ctx, k.KeyID); err != nil {
			t.Errorf("201 for %s, but the store does not hold it: %v", k.KeyID, err)
		}
		if r := g.do(request{method: "GET", path: "/v1/x", bearer: k.Key}); r.status != 200 {
			t.Errorf("201'd key %s after the outage: %d", k.KeyID, r.status)
		}
	}
	// Mints that stored a key but could not answer 201 in time may leave
	// a key nobody has; none may be missing.
	if n := g.countKeys("alice"); n < len(minted)+1 {
		t.Errorf("alice has %d keys listed, %d were answered with 201", n, len(minted)+1)
	} else {
		t.Logf("%d keys answered with 201, %d listed", len(minted)+1, n)
	}
}

// TestReloadUnderLoad reloads the config six times (as `caddy reload` does,
// in-process) under a stream of mints and key checks: no request fails, the
// Redis client is reused (the count of Redis connections does not grow
// with reloads), and no goroutine is left behind (goleak).
//
// The client is a careful one (see startLoad): a reload closes the old
// server's idle keep-alive connections, and a request racing that close is
// lost in transit (reset, or EOF) before any server saw it: the HTTP/1.1
// keep-alive race, which no server can close. Such requests are resent
// once (safe for GETs and for mints with an Idempotency-Key) and counted;
// every request must then succeed.
func TestReloadUnderLoad(t *testing.T) {
	g := startGateway(t, "redis", "max_keys_per_owner 100000")
	check := g.create("alice", `{"name":"checker"}`)
	rdb := g.redis.Client(t)
	clients := func() int {
		ctx, cancel := testCtx()
		defer cancel()
		info, err := rdb.Info(ctx, "clients").Result()
		if err != nil {
			t.Fatal(err)
		}
		for _, line := range strings.Split(info, "\r\n") {
			if v, ok := strings.CutPrefix(line, "connected_clients:"); ok {
				n, _ := strconv.Atoi(v)
				return n
			}
		}
		t.Fatal("no connected_clients in INFO clients")
		return 0
	}

	// Warm up, so the pool holds the connections this load needs.
	warm := startLoad(g, 4, check.Key, true)
	time.Sleep(300 * time.Millisecond)
	warm.finish()
	g.client.CloseIdleConnections()
	before := clients()
	ignore := goleak.IgnoreCurrent()
	store := g.store

	ls := startLoad(g, 4, check.Key, true)
	const reloads = 12
	var took []time.Duration
	for i := range reloads {
		time.Sleep(150 * time.Millisecond)
		extra := "max_keys_per_owner 100000"
		if i%2 == 0 {
			extra += "\nscope billing:read /v1/billing"
		}
		start := time.Now()
		if err := g.load(extra); err != nil {
			t.Fatalf("reload %d: %v", i+1, err)
		}
		took = append(took, time.Since(start).Round(time.Millisecond))
	}
	time.Sleep(150 * time.Millisecond)
	out := ls.finish()
	t.Logf("%d requests over %d reloads (%v): %s", len(out), reloads, took, summary(out))
	for _, o := range out {
		ok := o.op == "mint" && o.status == 201 || o.op == "check" && o.status == 200
		if o.err != nil || !ok {
			t.Errorf("%s during a reload: %d %v", o.op, o.status, o.err)
		}
	}
	if currentStore(t) != store {
		t.Error("a reload replaced the pooled store")
	}
	after := clients()
	t.Logf("Redis connections: %d before the reloads, %d after", before, after)
	// The pool may grow while reloads run beside the load (a few more
	// connections at once, the same after 6 reloads as after 18: measured
	// 4-5 since creates make more round trips for the atomic key limit);
	// a store reopened per reload would add at least one connection
	// (client, pub/sub) for each of them.
	if after > before+4+reloads/2 {
		t.Errorf("Redis connections grew from %d to %d over %d reloads", before, after, reloads)
	}

	// Idle keep-alive connections hold server goroutines: close them, then
	// every goroutine started since the snapshot must end.
	for _, tr := range []*http.Client{g.client, http.DefaultClient} {
		tr.CloseIdleConnections()
	}
	// Ignored: reverse_proxy's keep-alive connections to the backend (both
	// ends; Caddy closes an old config's idle ones after its idle timeout,
	// 2m), and the one listener and storage-cleaning goroutine that every
	// live config has (the snapshot holds the first config's).
	opts := []goleak.Option{ignore,
		goleak.IgnoreAnyFunction("net/http.(*persistConn).readLoop"),
		goleak.IgnoreAnyFunction("net/http.(*persistConn).writeLoop"),
		goleak.IgnoreAnyFunction("net/http.(*conn).serve"),
		goleak.IgnoreAnyFunction("github.com/caddyserver/caddy/v2/modules/caddyhttp.(*http2Listener).Accept"),
		goleak.IgnoreTopFunction("github.com/caddyserver/caddy/v2/modules/caddytls.(*TLS).keepStorageClean.func1"),
		goleak.IgnoreTopFunction("github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy.(*metricsUpstreamsHealthyUpdater).init.func1"),
		// Each live handler has one last-used writer; counted below.
		goleak.IgnoreTopFunction("github.com/caddy-apikeys/caddy-apikeys.(*usageRecorder).loop"),
	}
	// Old servers shut down in the background: give them 5 s.
	deadline := time.Now().Add(5 * time.Second)
	for {
		err := goleak.Find(opts...)
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Errorf("goroutines left behind by reloads: %v", err)
			break
		}
	}
	// Exactly the live handler's last-used writer remains.
	var stacks bytes.Buffer
	_ = pprof.Lookup("goroutine").WriteTo(&stacks, 2)
	if n := strings.Count(stacks.String(), "(*usageRecorder).loop("); n != 1 {
		t.Errorf("%d last-used writers after the reloads, want 1 (the live config's)", n)
	}
}

// TestReloadChildProcess runs `caddy reload` (admin API) on a Caddy child
// process on Redis four times while a client mints and checks keys: no
// request fails and the Redis connection count stays flat.
func TestReloadChildProcess(t *testing.T) {
	g := &gateway{t: t}
	srv := testredis.Start(t)
	in := &instance{port: testcaddy.FreePort(t), adminPort: testcaddy.FreePort(t)}
	in.base = fmt.Sprintf("http://127.0.0.1:%d", in.port)
	in.Process = testcaddy.Start(t, instanceCaddyfile(in.port, in.adminPort, srv.URL(), ""), []string{fmt.Sprintf("127.0.0.1:%d", in.port)})
	g.base = in.base

	c := &http.Client{Timeout: 10 * time.Second}
	st, body := call(t, c, "POST", in.base+"/v1/apikeys", dashboardToken(t, "alice"), `{"name":"checker"}`, nil)
	if st != 201 {
		t.Fatalf("mint: %d %s", st, body)
	}
	check := keyOf(t, body)
	ls := startLoad(g, 2, check.Key, true)
	rdb := srv.Client(t)
	countClients := func() string {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		info := rdb.Info(ctx, "clients").Val()
		for _, line := range strings.Split(info, "\r\n") {
			if strings.HasPrefix(line, "connected_clients:") {
				return line
			}
		}
		return ""
	}
	time.Sleep(200 * time.Millisecond)
	before := countClients()
	var took []time.Duration
	for i := range 4 {
		extra := fmt.Sprintf("realm reload-%d", i)
		start := time.Now()
		if err := in.Reload(instanceCaddyfile(in.port, in.adminPort, srv.URL(), extra)); err != nil {
			t.Fatalf("reload %d: %v\n%s", i+1, err, in.Logs())
		}
		took = append(took, time.Since(start).Round(time.Millisecond))
		time.Sleep(150 * time.Millisecond)
	}
	out := ls.finish()
	after := countClients()
	t.Logf("%d requests over 4 `caddy reload`s (%v): %s; Redis %s before, %s after", len(out), took, summary(out), before, after)
	for _, o := range out {
		ok := o.op == "mint" && o.status == 201 || o.op == "check" && o.status == 200
		if o.err != nil || !ok {
			t.Errorf("%s during a reload: %d %v", o.op, o.status, o.err)
		}
	}
	// The last reload's realm is live.
	resp, err := http.Get(in.base + "/v1/x")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if got := resp.Header.Get("WWW-Authenticate"); !strings.Contains(got, `realm="reload-3"`) {
		t.Errorf("after the reloads WWW-Authenticate = %q", got)
	}
	b, _ := strconv.Atoi(strings.TrimPrefix(before, "connected_clients:"))
	a, _ := strconv.Atoi(strings.TrimPrefix(after, "connected_clients:"))
	if a > b+2 {
		t.Errorf("Redis connections grew from %d to %d over 4 reloads", b, a)
	}
}

// TestBoltKilledDuringMints SIGKILLs a Caddy child process on the file
// store while four clients mint keys, starts a new process on the same
// file, and checks that every key answered with 201 is there and
// validates.
func TestBoltKilledDuringMints(t *testing.T) {
	dbPath := filepath.Join(t.TempDir(), "keys.db")
	caddyfile := func(port int) string {
		return fmt.Sprintf(`{
	admin off
	persist_config off
	auto_https off
}

http://127.0.0.1:%[1]d {
	apikeys {
		store file %[2]s
		secret {env.APIKEYS_TEST_SECRET}
		max_keys_per_owner 100000
		dashboard_jwt {
			secret {env.APIKEYS_TEST_JWT_SECRET}
			issuer %[3]s
			audience %[4]s
		}
	}
	respond "key={http.auth.apikey.id}" 200
}
`, port, dbPath, testIssuer, testAudience)
	}
	port := testcaddy.FreePort(t)
	addr := []string{fmt.Sprintf("127.0.0.1:%d", port)}
	base := "http://" + addr[0]
	p := testcaddy.Start(t, caddyfile(port), addr)

	token := dashboardToken(t, "alice")
	c := &http.Client{Timeout: 5 * time.Second}
	var (
		mu      sync.Mutex
		minted  []createdKey
		refused int
		wg      sync.WaitGroup
	)
	for w := range 4 {
		wg.Go(func() {
			for i := 0; ; i++ {
				req, _ := http.NewRequest("POST", base+"/v1/apikeys", strings.NewReader(`{"name":"crash"}`))
				req.Header.Set("Content-Type", "application/json")
				req.Header.Set("Authorization", "Bearer "+token)
				if i%2 == 0 {
					req.Header.Set("Idempotency-Key", fmt.Sprintf("crash-%d-%d", w, i))
				}
				resp, err := c.Do(req)
				if err != nil {
					mu.Lock()
					refused++
					mu.Unlock()
					return // the process is gone
				}
				var env struct {
					Data createdKey `json:"data"`
				}
				_ = json.NewDecoder(resp.Body).Decode(&env)
				resp.Body.Close()
				if resp.StatusCode != 201 {
					t.Errorf("mint: %d", resp.StatusCode)
					return
				}
				mu.Lock()
				minted = append(minted, env.Data)
				mu.Unlock()
			}
		})
	}
	time.Sleep(800 * time.Millisecond)
	p.Kill()
	wg.Wait()
	if len(minted) == 0 || refused == 0 {
		t.Fatalf("%d mints answered, %d cut off: the kill did not land mid-stream", len(minted), refused)
	}

	port2 := testcaddy.FreePort(t)
	addr2 := []string{fmt.Sprintf("127.0.0.1:%d", port2)}
	p2 := testcaddy.Start(t, caddyfile(port2), addr2)
	for _, k := range minted {
		st, body := call(t, c, "GET", "http://"+addr2[0]+"/v1/x", k.Key, "", nil)
		if st != 200 || string(body) != "key="+k.KeyID {
			t.Errorf("201'd key %s after the crash: %d %s", k.KeyID, st, body)
		}
	}
	p2.Stop()

	s, err := keystore.NewBolt(keystore.BoltOptions{Path: dbPath})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	n := countOwner(t, s, "alice")
	if n < len(minted) {
		t.Errorf("%d keys in the file, %d were answered with 201", n, len(minted))
	}
	t.Logf("SIGKILL after %d answered mints (%d cut off); %d keys in the file, all answered ones validate", len(minted), refused, n)
}
