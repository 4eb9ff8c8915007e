package apikeys

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddy-apikeys/caddy-apikeys/internal/testcaddy"
	"github.com/caddy-apikeys/caddy-apikeys/internal/testredis"
	"github.com/caddy-apikeys/caddy-apikeys/keystore"
)

// TestSentinelFailover runs a gateway configured with a redis+sentinel://
// URL (wait_replicas 1), forces a failover with SENTINEL FAILOVER, and
// keeps minting and validating through it with a bounded retry: requests
// during the switch get 503 (never 500), service resumes by itself, and
// every key answered with 201, before or during the switch, validates
// once the old primary has been demoted.
func TestSentinelFailover(t *testing.T) {
	g := startGateway(t, "sentinel", "")
	alice := dashboardToken(t, "alice")
	var minted []createdKey
	for i := range 5 {
		minted = append(minted, g.create("alice", fmt.Sprintf(`{"name":"before %d"}`, i)))
	}
	old, err := g.sentinel.PrimaryAddr()
	if err != nil {
		t.Fatal(err)
	}

	start := time.Now()
	g.sentinel.Failover()
	promoted := time.Since(start)

	// Mint until 5 more keys are in, validating the first key each round;
	// answers during the switch are 503.
	statuses := map[int]int{}
	deadline := time.Now().Add(25 * time.Second)
	var firstOK time.Duration
	for n := 0; n < 5; {
		if time.Now().After(deadline) {
			t.Fatalf("minting did not resume within 25 s after the failover: %v", statuses)
		}
		r := g.do(request{method: "POST", path: "/v1/apikeys", bearer: alice, body: `{"name":"after"}`})
		statuses[r.status]++
		switch r.status {
		case 201:
			var k createdKey
			if err := json.Unmarshal(r.env.Data, &k); err != nil {
				t.Fatal(err)
			}
			minted = append(minted, k)
			if n == 0 {
				firstOK = time.Since(start)
			}
			n++
		case 503:
			if r.errCode() != "store_unavailable" || r.header.Get("Retry-After") == "" {
				t.Fatalf("503 without store_unavailable and Retry-After: %s", r.body)
			}
			time.Sleep(100 * time.Millisecond)
		default:
			t.Fatalf("during the failover: %d %s", r.status, r.body)
		}
		v := g.do(request{method: "GET", path: "/v1/x", bearer: minted[0].Key})
		if v.status != 200 && v.status != 503 {
			t.Fatalf("validating an old key during the failover: %d %s", v.status, v.body)
		}
	}
	t.Logf("promotion %s, first 201 after %s; answers %v", promoted.Round(time.Millisecond), firstOK.Round(time.Millisecond), statuses)

	g.sentinel.WaitReplica(old) // the old primary's stray writes are gone now
	for _, k := range minted {
		if r := g.do(request{method: "GET", path: "/v1/x", bearer: k.Key}); r.status != 200 {
			t.Errorf("key %s (%s) after the failover: %d %s", k.KeyID, k.Name, r.status, r.body)
		}
	}
	if n := g.countKeys("alice"); n != len(minted) {
		t.Errorf("alice has %d keys listed, %d were answered with 201", n, len(minted))
	}
}

// instanceCaddyfile is the config of one Caddy child process on a shared
// Redis: the guarded route answers with the caller's key ID.
func instanceCaddyfile(port, adminPort int, redisURL, extra string) string {
	return fmt.Sprintf(`{
	admin 127.0.0.1:%[2]d
	persist_config off
	auto_https off
}

http://127.0.0.1:%[1]d {
	apikeys {
		store redis %[3]s
		secret {env.APIKEYS_TEST_SECRET}
		dashboard_jwt {
			secret {env.APIKEYS_TEST_JWT_SECRET}
			issuer %[4]s
			audience %[5]s
		}
		store_timeout 500ms
		# Load tests mint thousands of keys for one owner.
		max_keys_per_owner 100000
		%[6]s
	}
	respond "key={http.auth.apikey.id} owner={http.auth.user.id}" 200
}
`, port, adminPort, redisURL, testIssuer, testAudience, extra)
}

// instance is a Caddy child process serving the API.
type instance struct {
	*testcaddy.Process
	base      string
	port      int
	adminPort int
}

func startInstance(t *testing.T, redisURL string) *instance {
	t.Helper()
	in := &instance{port: testcaddy.FreePort(t), adminPort: testcaddy.FreePort(t)}
	in.base = fmt.Sprintf("http://127.0.0.1:%d", in.port)
	in.Process = testcaddy.Start(t, instanceCaddyfile(in.port, in.adminPort, redisURL, ""),
		[]string{fmt.Sprintf("127.0.0.1:%d", in.port)})
	return in
}

// call sends one request to base and returns status and body.
func call(t *testing.T, c *http.Client, method, url, bearer, body string, hdr map[string]string) (int, []byte) {
	t.Helper()
	req, err := http.NewRequest(method, url, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if bearer != "" {
		req.Header.Set("Authorization", "Bearer "+bearer)
	}
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := c.Do(req)
	if err != nil {
		t.Errorf("%s %s: %v", method, url, err)
		return 0, nil
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, b
}

// keyOf decodes the key of a 201 body.
func keyOf(t *testing.T, body []byte) createdKey {
	t.Helper()
	var env struct {
		Data createdKey `json:"data"`
	}
	if err := json.Unmarshal(body, &env); err != nil || env.Data.Key == "" {
		t.Fatalf("not a created key: %v %s", err, body)
	}
	return env.Data
}

// TestSeveralInstances runs two Caddy processes on one Redis: keys minted
// on either validate on both, a revocation in the store is seen by both,
// and the same Idempotency-Key sent to both at once mints one key.
func TestSeveralInstances(t *testing.T) {
	srv := testredis.Start(t)
	a, b := startInstance(t, srv.URL()), startInstance(t, srv.URL())
	c := &http.Client{Timeout: 10 * time.Second}
	alice := dashboardToken(t, "alice")
	store, err := keystore.NewRedis(keystore.RedisOptions{URLs: []string{srv.URL()}})
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()

	var keys []createdKey
	for _, in := range []*instance{a, b} {
		st, body := call(t, c, "POST", in.base+"/v1/apikeys", alice, `{"name":"shared"}`, nil)
		if st != 201 {
			t.Fatalf("mint on %s: %d %s", in.base, st, body)
		}
		keys = append(keys, keyOf(t, body))
	}
	for _, k := range keys {
		for _, in := range []*instance{a, b} {
			st, body := call(t, c, "GET", in.base+"/v1/x", k.Key, "", nil)
			if want := "key=" + k.KeyID + " owner=alice"; st != 200 || string(body) != want {
				t.Errorf("key %s on %s: %d %q, want 200 %q", k.KeyID, in.base, st, body, want)
			}
		}
	}

	// Revoked through instance a's API: both refuse it, b once a's
	// invalidation reaches it over pub/sub (well inside the poll).
	if st, body := call(t, c, "DELETE", a.base+"/v1/apikeys/"+keys[0].KeyID, alice, "", nil); st != 200 {
		t.Fatalf("revoke on a: %d %s", st, body)
	}
	for _, in := range []*instance{a, b} {
		deadline := time.Now().Add(2 * time.Second)
		for {
			st, body := call(t, c, "GET", in.base+"/v1/x", keys[0].Key, "", nil)
			if st == 401 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("revoked key still accepted by %s: %d %s", in.base, st, body)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}

	// The same Idempotency-Key to both instances at the same moment, 20
	// times: each Idempotency-Key mints exactly one key.
	const rounds = 20
	before := countOwner(t, store, "bob")
	bob := dashboardToken(t, "bob")
	statuses := map[int]int{}
	for i := range rounds {
		idemKey := fmt.Sprintf("race-%d", i)
		var (
			wg      sync.WaitGroup
			results [2]struct {
				status int
				body   []byte
			}
		)
		startGun := make(chan struct{})
		for j, in := range []*instance{a, b} {
			wg.Go(func() {
				<-startGun
				results[j].status, results[j].body = call(t, c, "POST", in.base+"/v1/apikeys", bob, `{"name":"race"}`, map[string]string{"Idempotency-Key": idemKey})
			})
		}
		close(startGun)
		wg.Wait()
		var got []string
		for _, r := range results {
			statuses[r.status]++
			switch r.status {
			case 201:
				got = append(got, keyOf(t, r.body).Key)
			case 409: // the other instance holds the key right now
			default:
				t.Fatalf("round %d: %d %s", i, r.status, r.body)
			}
		}
		if len(got) == 0 || len(got) == 2 && got[0] != got[1] {
			t.Fatalf("round %d: the two instances answered %d different keys", i, len(got))
		}
	}
	if n := countOwner(t, store, "bob") - before; n != rounds {
		t.Errorf("%d Idempotency-Keys sent to two instances at once minted %d keys", rounds, n)
	}
	t.Logf("answers to the idempotent races: %v", statuses)
}

// countOwner counts owner's listed keys in s.
func countOwner(t *testing.T, s keystore.Store, owner string) int {
	t.Helper()
	n, cursor := 0, ""
	for {
		ctx, cancel := testCtx()
		keys, next, err := s.List(ctx, owner, cursor, 100)
		cancel()
		if err != nil {
			t.Fatal(err)
		}
		n += len(keys)
		if next == "" {
			return n
		}
		cursor = next
	}
}
