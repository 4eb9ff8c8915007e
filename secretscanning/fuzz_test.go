package secretscanning

import (
	"context"
	"crypto/sha256"
	"errors"
	"strings"
	"testing"
	"time"
)

// FuzzParseReport: no input crashes the parser; what it accepts is at most
// max matches, each with a token.
func FuzzParseReport(f *testing.F) {
	f.Add([]byte(report), 3)
	f.Add([]byte(`[]`), 0)
	f.Add([]byte(`[{"token":"a","extra":[1,{"b":null}]},{"token":"b"}]`), 1)
	f.Add([]byte(`[{"token":"\u0000"}] `), 2)
	f.Fuzz(func(t *testing.T, body []byte, max int) {
		if max < 0 || max > 100 {
			return
		}
		ms, err := ParseReport(body, max)
		if err != nil {
			if !errors.Is(err, ErrMalformedReport) && !errors.Is(err, ErrTooManyMatches) {
				t.Fatalf("unexpected error kind: %v", err)
			}
			return
		}
		if len(ms) > max {
			t.Fatalf("%d matches accepted, max %d", len(ms), max)
		}
		for _, m := range ms {
			if m.Token == "" {
				t.Fatal("a match without a token was accepted")
			}
		}
	})
}

// FuzzVerify: whatever the headers and body, only the real signature over
// the real body verifies.
func FuzzVerify(f *testing.F) {
	gh := newSigner(f)
	ks := newKeyServer(f, gh)
	v, err := New(context.Background(), Options{Source: ks.URL, MinRefetch: time.Hour})
	if err != nil {
		f.Fatal(err)
	}
	body := []byte(report)
	sig := gh.sign(f, body)
	f.Add(gh.id, sig, body)
	f.Add(gh.id, sig, []byte(strings.ToUpper(report)))
	f.Add("x", sig, body)
	f.Add(gh.id, "", body)
	f.Fuzz(func(t *testing.T, id, s string, b []byte) {
		err := v.Verify(context.Background(), id, s, b)
		if err == nil && (id != gh.id || sha256.Sum256(b) != sha256.Sum256(body)) {
			t.Fatalf("verified a report that GitHub's key did not sign: id %q body %q", id, b)
		}
	})
}
