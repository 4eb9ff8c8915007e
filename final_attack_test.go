package apikeys

import "testing"

// TestAttackIdentityHeaderNamedTwice: identity_headers accepts two
// identity headers under one name. Since the guard deletes the meta (and
// plan) header for a key without one after setting the owner, a config
// that names the meta header as the owner header forwards no owner at all
// for keys without metadata (before, the owner was set and the meta
// header left alone). Either the config must be refused (then make this
// test expect the refusal) or every request must carry its owner.
func TestAttackIdentityHeaderNamedTwice(t *testing.T) {
	g := startGateway(t, "file", "identity_headers {\n\t\t\tmeta X-Api-Key-Owner\n\t\t}")
	plain := g.create("alice", `{"name":"plain"}`)
	g.do(request{method: "GET", path: "/v1/x", bearer: plain.Key})
	if h := g.backend.last(t); h.Get("X-Api-Key-Owner") != "alice" {
		t.Errorf("identity_headers naming meta as the owner header: the backend got owner %q, want alice (or the config refused)", h.Values("X-Api-Key-Owner"))
	}
}
