package apikeys

import (
	"crypto/cipher"
	"encoding/json"
	"fmt"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/caddy-apikeys/caddy-apikeys/keystore"
)

func idem(k string) map[string]string { return map[string]string{"Idempotency-Key": k} }

// TestIdempotency walks the Idempotency-Key table of DESIGN.md.
func TestIdempotency(t *testing.T) {
	for _, kind := range storeKinds {
		t.Run(kind, func(t *testing.T) {
			g := startGateway(t, kind, "")
			alice, bob := dashboardToken(t, "alice"), dashboardToken(t, "bob")
			body := `{"name":"ci","scopes":["analytics:read"],"expires_in_days":30}`
			post := func(token, key, body string) *response {
				return g.do(request{method: "POST", path: "/v1/apikeys", bearer: token, body: body, header: idem(key)})
			}

			t.Run("replay", func(t *testing.T) {
				first := post(alice, "replay-1", body)
				if first.status != 201 || first.header.Get("Idempotent-Replayed") != "" {
					t.Fatalf("first: %d %s", first.status, first.body)
				}
				second := post(alice, "replay-1", body)
				if second.status != 201 || second.header.Get("Idempotent-Replayed") != "true" {
					t.Fatalf("replay: %d replayed=%q %s", second.status, second.header.Get("Idempotent-Replayed"), second.body)
				}
				if string(second.body) != string(first.body) {
					t.Errorf("replayed body differs:\n%s\n%s", first.body, second.body)
				}
				if second.header.Get("Cache-Control") != "no-store" {
					t.Error("replay without Cache-Control: no-store")
				}
				if n := g.countKeys("alice"); n != 1 {
					t.Errorf("alice has %d keys, want 1", n)
				}
			})

			t.Run("different request", func(t *testing.T) {
				resp := post(alice, "replay-1", `{"name":"other"}`)
				if resp.status != 422 || resp.errCode() != "idempotency_key_reused" {
					t.Fatalf("got %d %s", resp.status, resp.body)
				}
			})

			t.Run("other owner is independent", func(t *testing.T) {
				resp := post(bob, "replay-1", body)
				if resp.status != 201 || resp.header.Get("Idempotent-Replayed") != "" {
					t.Fatalf("got %d %s", resp.status, resp.body)
				}
				if g.countKeys("bob") != 1 || g.countKeys("alice") != 1 {
					t.Error("owners' idempotency keys are not independent")
				}
			})

			t.Run("failed validation is not stored", func(t *testing.T) {
				bad := post(alice, "fix-me", `{"name":""}`)
				if bad.status != 400 {
					t.Fatalf("got %d", bad.status)
				}
				good := post(alice, "fix-me", `{"name":"fixed"}`)
				if good.status != 201 || good.header.Get("Idempotent-Replayed") != "" {
					t.Fatalf("corrected retry: %d %s", good.status, good.body)
				}
			})

			t.Run("in progress", func(t *testing.T) {
				id, fp := idemIDs("alice", "busy-1", body)
				ctx, cancel := testCtx()
				defer cancel()
				rec := &keystore.IdempotencyRecord{Token: "holder", Fingerprint: fp, State: keystore.IdempotencyPending,
					LockedUntil: time.Now().Add(20 * time.Second)}
				if existing, err := g.store.ReserveIdempotency(ctx, id, rec, time.Hour); err != nil || existing != nil {
					t.Fatal(err, existing)
				}
				before := g.countKeys("alice")
				resp := post(alice, "busy-1", body)
				if resp.status != 409 || resp.errCode() != "idempotency_in_progress" {
					t.Fatalf("got %d %s", resp.status, resp.body)
				}
				if ra := resp.header.Get("Retry-After"); ra == "" || ra == "0" {
					t.Errorf("Retry-After = %q", ra)
				}
				if g.countKeys("alice") != before {
					t.Error("a 409 minted a key")
				}
			})

			t.Run("abandoned request is finished with the same key", func(t *testing.T) {
				for _, alreadyStored := range []bool{false, true} {
					idemKey := fmt.Sprintf("crashed-%v", alreadyStored)
					raw, respBody := sealedPending(t, g.store, "alice", idemKey, body, alreadyStored)
					before := g.countKeys("alice")
					resp := post(alice, idemKey, body)
					if resp.status != 201 {
						t.Fatalf("takeover: %d %s", resp.status, resp.body)
					}
					if string(resp.body) != string(respBody) {
						t.Fatalf("takeover answered another key:\n%s\n%s", resp.body, respBody)
					}
					want := before + 1
					if alreadyStored {
						want = before
					}
					if n := g.countKeys("alice"); n != want {
						t.Errorf("alice has %d keys, want %d", n, want)
					}
					if r := g.do(request{method: "GET", path: "/v1/analytics", bearer: raw}); r.status != 200 {
						t.Errorf("finished key refused: %d", r.status)
					}
					if r := post(alice, idemKey, body); r.status != 201 || r.header.Get("Idempotent-Replayed") != "true" {
						t.Errorf("after takeover: %d replayed=%q", r.status, r.header.Get("Idempotent-Replayed"))
					}
				}
			})
		})
	}
}

// TestIdempotencyConcurrent: 200 concurrent requests with one key mint
// exactly one key; 200 with distinct keys mint 200 keys that all validate.
func TestIdempotencyConcurrent(t *testing.T) {
	for _, kind := range storeKinds {
		t.Run(kind, func(t *testing.T) {
			// 200 concurrent requests on 2 busy cores: allow the store time.
			g := startGateway(t, kind, "store_timeout 5s")
			g.client.Transport = &http.Transport{MaxIdleConnsPerHost: 200}
			token := dashboardToken(t, "carol")
			body := `{"name":"burst"}`
			const n = 200

			results := make([]*response, n)
			var wg sync.WaitGroup
			for i := range n {
				wg.Add(1)
				go func() {
					defer wg.Done()
					results[i] = g.do(request{method: "POST", path: "/v1/apikeys", bearer: token, body: body, header: idem("same")})
				}()
			}
			wg.Wait()
			keys := map[string]bool{}
			created := 0
			for _, r := range results {
				switch r.status {
				case 201:
					created++
					var k createdKey
					_ = json.Unmarshal(r.env.Data, &k)
					keys[k.Key] = true
				case 409:
				default:
					t.Fatalf("unexpected %d: %s", r.status, r.body)
				}
			}
			if len(keys) != 1 || created == 0 {
				t.Fatalf("%d 201s carried %d distinct keys, want exactly 1", created, len(keys))
			}
			if c := g.countKeys("carol"); c != 1 {
				t.Fatalf("carol has %d keys in the store, want 1", c)
			}
			t.Logf("same key: %d x 201 (one mint, rest replays), %d x 409", created, n-created)

			minted := make([]string, n)
			for i := range n {
				wg.Add(1)
				go func() {
					defer wg.Done()
					r := g.do(request{method: "POST", path: "/v1/apikeys", bearer: token, body: body, header: idem(fmt.Sprintf("distinct-%d", i))})
					if r.status != 201 {
						t.Errorf("distinct %d: %d %s", i, r.status, r.body)
						return
					}
					var k createdKey
					_ = json.Unmarshal(r.env.Data, &k)
					minted[i] = k.Key
				}()
			}
			wg.Wait()
			distinct := map[string]bool{}
			for _, k := range minted {
				distinct[k] = true
			}
			if len(distinct) != n {
				t.Fatalf("%d distinct keys, want %d", len(distinct), n)
			}
			if c := g.countKeys("carol"); c != n+1 {
				t.Errorf("carol has %d keys, want %d", c, n+1)
			}
			for _, k := range minted {
				if r := g.do(request{method: "GET", path: "/v1/x", bearer: k}); r.status != 200 {
					t.Fatalf("minted key refused: %d", r.status)
				}
			}
		})
	}
}

// idemIDs computes the store id and fingerprint the handler uses.
func idemIDs(owner, idemKey, body string) (id, fingerprint string) {
	endpoint := "POST " + DefaultManagementPath
	return hashParts("idempotency", owner, endpoint, idemKey), hashParts(endpoint, body)
}

// sealedPending writes the pending record a request leaves behind when its
// process dies after reserving (and, if stored, after storing the key). It
// returns the raw key and the sealed response.
func sealedPending(t *testing.T, s keystore.Store, owner, idemKey, body string, stored bool) (string, []byte) {
	t.Helper()
	h := &Handler{KeyPrefix: "wbk_", now: time.Now}
	var err error
	if h.hasher, err = keystore.NewHasher([]byte(testSecret)); err != nil {
		t.Fatal(err)
	}
	sealer, err := newSealer([]byte(testSecret))
	h.sealers = []cipher.AEAD{sealer}
	if err != nil {
		t.Fatal(err)
	}
	key, raw, err := h.newKey(owner, createRequest{Name: "ci", Scopes: []string{"analytics:read"}, ExpiresInDays: 30})
	if err != nil {
		t.Fatal(err)
	}
	respBody, _ := json.Marshal(envelope{Success: true, Data: newKeyResponse(key, raw)})
	id, fp := idemIDs(owner, idemKey, body)
	rec := &keystore.IdempotencyRecord{Token: "dead-holder", Fingerprint: fp, State: keystore.IdempotencyPending,
		LockedUntil: time.Now().Add(-time.Second), KeyID: key.ID, Status: 201, Body: h.seal(id, respBody)}
	ctx, cancel := testCtx()
	defer cancel()
	if existing, err := s.ReserveIdempotency(ctx, id, rec, time.Hour); err != nil || existing != nil {
		t.Fatal(err, existing)
	}
	if stored {
		if err := s.Create(ctx, key); err != nil {
			t.Fatal(err)
		}
	}
	return raw, respBody
}
