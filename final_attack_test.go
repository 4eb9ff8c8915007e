package apikeys

import (
	"strings"
	"testing"
)

// TestAttackIdentityHeaderNamedTwice: two identity headers under one name
// would make one overwrite or delete the other (the guard deletes the meta
// header of a key without metadata after setting the owner, so a config
// naming the meta header as the owner's forwarded no owner at all). Such
// a config is refused, naming both, in any spelling; so is a key_header
// that is an identity header.
func TestAttackIdentityHeaderNamedTwice(t *testing.T) {
	g := startGateway(t, "file", "")
	for cfg, want := range map[string]string{
		"identity_headers {\n\t\t\tmeta X-Api-Key-Owner\n\t\t}":          "owner and meta are both X-Api-Key-Owner",
		"identity_headers {\n\t\t\tplan x-api-key-scopes\n\t\t}":         "scopes and plan are both",
		"identity_headers {\n\t\t\tid X-User\n\t\t\towner X-User\n\t\t}": "id and owner are both X-User",
		"key_header X-Api-Key-Plan":                                      "key_header cannot be X-Api-Key-Plan",
		"key_header X-Api-Key-Meta":                                      "key_header cannot be X-Api-Key-Meta",
	} {
		err := g.load(cfg)
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: %v, want a refusal naming %q", cfg, err, want)
		}
	}
	// The gateway still runs its last good config: owners reach the backend.
	plain := g.create("alice", `{"name":"plain"}`)
	g.do(request{method: "GET", path: "/v1/x", bearer: plain.Key})
	if h := g.backend.last(t); h.Get("X-Api-Key-Owner") != "alice" {
		t.Errorf("the backend got owner %q, want alice", h.Values("X-Api-Key-Owner"))
	}
}
