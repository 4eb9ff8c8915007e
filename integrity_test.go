package apikeys

import (
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"testing"
)

// This file tests the integrity of the management API (issue 10): exact
// methods, replays authorised like fresh requests, an atomic key limit and
// strict identities, on every store.

// parallelStatuses sends n copies of a request built by build at once and
// returns how many answers each "status code" pair got.
func (g *gateway) parallelStatuses(n int, build func(i int) request) map[string]int {
	g.t.Helper()
	var (
		wg   sync.WaitGroup
		mu   sync.Mutex
		seen = map[string]int{}
	)
	start := make(chan struct{})
	for i := range n {
		req := build(i)
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			r, err := http.NewRequest(req.method, g.base+req.path, strings.NewReader(req.body))
			if err != nil {
				panic(err)
			}
			r.Header.Set("Authorization", "Bearer "+req.bearer)
			r.Header.Set("Content-Type", "application/json")
			for k, v := range req.header {
				r.Header.Set(k, v)
			}
			resp, err := g.client.Do(r)
			key := "error"
			if err == nil {
				body, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				code := ""
				if _, rest, ok := strings.Cut(string(body), `"code":"`); ok {
					code, _, _ = strings.Cut(rest, `"`)
				}
				key = fmt.Sprintf("%d %s", resp.StatusCode, code)
			}
			mu.Lock()
			seen[key]++
			mu.Unlock()
		}()
	}
	close(start)
	wg.Wait()
	return seen
}

// TestKeyLimitParallel: parallel creates for one owner never exceed
// max_keys_per_owner; every other answer is 409 key_limit_reached.
func TestKeyLimitParallel(t *testing.T) {
	for _, kind := range storeKinds {
		t.Run(kind, func(t *testing.T) {
			g := startGateway(t, kind, "max_keys_per_owner 10\nstore_timeout 20s")
			for _, tc := range []struct {
				owner string
				n     int
			}{{"limit-a", 20}, {"limit-b", 200}} {
				tok := dashboardToken(t, tc.owner)
				seen := g.parallelStatuses(tc.n, func(int) request {
					return request{method: "POST", path: "/v1/apikeys", bearer: tok, body: `{"name":"k"}`}
				})
				want := map[string]int{"201 ": 10, "409 key_limit_reached": tc.n - 10}
				if fmt.Sprint(seen) != fmt.Sprint(want) {
					t.Errorf("%d parallel creates under limit 10: %v, want %v", tc.n, seen, want)
				}
				if seen["201 "] != 10 {
					t.Logf("logs: %s", grepLogs(g.readLogs(), "error"))
				}
				if n := g.countKeys(tc.owner); n != 10 {
					t.Errorf("%d parallel creates left %d keys, want 10", tc.n, n)
				}
			}
		})
	}
}

// grepLogs returns the log lines that contain s.
func grepLogs(logs []byte, s string) string {
	var out []string
	for _, line := range strings.Split(string(logs), "\n") {
		if strings.Contains(line, s) {
			out = append(out, line)
		}
	}
	return strings.Join(out, "\n")
}
