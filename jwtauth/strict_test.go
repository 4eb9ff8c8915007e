package jwtauth

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
)

// signHeader signs c with HS256 under testSecret, with extra header members.
func signHeader(t testing.TB, header map[string]any, c jwt.MapClaims) string {
	t.Helper()
	tok := jwt.NewWithClaims(jwt.SigningMethodHS256, c)
	for k, v := range header {
		if v == nil {
			delete(tok.Header, k)
		} else {
			tok.Header[k] = v
		}
	}
	s, err := tok.SignedString(testSecret)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// TestOwnerMustSurviveAHeader: an owner the backend could not receive byte
// for byte in a header (trimmed white space, line separators, control or
// bidirectional control characters) is refused; others pass unchanged.
func TestOwnerMustSurviveAHeader(t *testing.T) {
	v := mustNew(t, Config{Secret: testSecret})
	for _, owner := range []string{
		"alice ", " alice", "alice\t", "\u00a0alice", "alice\u3000", "\ufeffalice",
		"ali\u2028ce", "ali\u2029ce", "alice\u202e", "\u2066alice", "ali\u200fce", "ali\u061cce",
		"ali\x00ce", "ali\rce", "ali\x7fce", "ali\u0085ce",
	} {
		_, err := v.Verify(signHeader(t, nil, claims(set("sub", owner))))
		if !errors.Is(err, ErrInvalidToken) {
			t.Errorf("owner %q accepted (%v)", owner, err)
		}
	}
	for _, owner := range []string{"alice", "alice smith", "ålice@example.com", "org:42/team", "用户"} {
		c, err := v.Verify(signHeader(t, nil, claims(set("sub", owner))))
		if err != nil || c.Owner != owner {
			t.Errorf("owner %q: %q, %v", owner, c.Owner, err)
		}
	}
}

// TestCritHeaderRefused: a validly signed token with a crit header (an
// extension this verifier does not understand, or the invalid empty list)
// is refused (RFC 7515 §4.1.11).
func TestCritHeaderRefused(t *testing.T) {
	v := mustNew(t, Config{Secret: testSecret})
	for _, crit := range []any{[]string{"exp"}, []string{"b64"}, []string{"urn:example:ext"}, []string{}, "b64"} {
		tok := signHeader(t, map[string]any{"crit": crit, "b64": true, "urn:example:ext": 1}, claims())
		_, err := v.Verify(tok)
		if !errors.Is(err, ErrInvalidToken) || !strings.Contains(err.Error(), "crit") {
			t.Errorf("crit %v: %v", crit, err)
		}
	}
	if _, err := v.Verify(signHeader(t, nil, claims())); err != nil {
		t.Errorf("token without crit: %v", err)
	}
}

// TestTypesAllowlist: with Types set, only tokens whose typ is listed pass
// (case-insensitively, with or without "application/").
func TestTypesAllowlist(t *testing.T) {
	v := mustNew(t, Config{Secret: testSecret, Types: []string{"at+jwt", "application/JWT"}})
	for typ, ok := range map[any]bool{
		"at+jwt": true, "AT+JWT": true, "application/at+jwt": true, "JWT": true, "jwt": true,
		"id+jwt": false, "JOSE": false, nil: false, 7: false, "": false,
	} {
		_, err := v.Verify(signHeader(t, map[string]any{"typ": typ}, claims()))
		if (err == nil) != ok {
			t.Errorf("typ %v: %v, want accepted=%v", typ, err, ok)
		}
		if err != nil && !strings.Contains(err.Error(), "typ header") {
			t.Errorf("typ %v: %v", typ, err)
		}
	}
	// Without an allowlist typ is not checked.
	open := mustNew(t, Config{Secret: testSecret})
	if _, err := open.Verify(signHeader(t, map[string]any{"typ": "whatever"}, claims())); err != nil {
		t.Errorf("no allowlist: %v", err)
	}
	if _, err := New(t.Context(), Config{Secret: testSecret, Types: []string{" "}}); !errors.Is(err, ErrInvalidConfig) {
		t.Errorf("empty type: %v", err)
	}
}

// TestMaxTokenAge: tokens issued for longer than MaxTokenAge are refused,
// by exp - iat, or, without iat, by how far exp is from now.
func TestMaxTokenAge(t *testing.T) {
	v := mustNew(t, Config{Secret: testSecret, MaxTokenAge: time.Hour})
	for name, tc := range map[string]struct {
		c  jwt.MapClaims
		ok bool
	}{
		"an hour":                 {claims(), true},
		"a day":                   {claims(set("exp", fixedNow.Add(24*time.Hour).Unix())), false},
		"issued long ago":         {claims(set("iat", fixedNow.Add(-2*time.Hour).Unix()), set("exp", fixedNow.Add(time.Minute).Unix())), false},
		"no iat, an hour":         {claims(del("iat")), true},
		"no iat, a year from now": {claims(del("iat"), set("exp", fixedNow.Add(365*24*time.Hour).Unix())), false},
	} {
		_, err := v.Verify(signHeader(t, nil, tc.c))
		if (err == nil) != tc.ok {
			t.Errorf("%s: %v, want accepted=%v", name, err, tc.ok)
		}
	}
	if _, err := New(t.Context(), Config{Secret: testSecret, MaxTokenAge: -time.Second}); !errors.Is(err, ErrInvalidConfig) {
		t.Errorf("negative MaxTokenAge: %v", err)
	}
}
