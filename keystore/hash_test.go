package keystore

import (
	"bytes"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/json"
	"strings"
	"sync"
	"testing"
)

func TestHasherDeterministic(t *testing.T) {
	raw, _ := Mint(DefaultPrefix)
	h1, err := NewHasher(testSecret)
	if err != nil {
		t.Fatal(err)
	}
	h2, err := NewHasher(bytes.Clone(testSecret))
	if err != nil {
		t.Fatal(err)
	}
	d := h1.Digest(raw)
	if d != h1.Digest(raw) || d != h2.Digest(raw) {
		t.Error("Digest is not deterministic")
	}
	other, _ := Mint(DefaultPrefix)
	if d == h1.Digest(other) {
		t.Error("two keys have the same digest")
	}
	if d.IsZero() {
		t.Error("digest is zero")
	}
}

func TestHasherMatchesSpec(t *testing.T) {
	raw, _ := Mint(DefaultPrefix)
	pepper, err := DeriveKey(testSecret, "key-digest", 32)
	if err != nil {
		t.Fatal(err)
	}
	mac := hmac.New(sha256.New, pepper)
	mac.Write([]byte(raw))
	var want Digest
	copy(want[:], mac.Sum(nil))
	if got := testHasher.Digest(raw); got != want {
		t.Errorf("Digest = %s, want HMAC-SHA256(HKDF pepper) %s", got, want)
	}
	// Not a plain hash of the key, nor keyed with the secret itself.
	if sha256.Sum256([]byte(raw)) == want {
		t.Error("digest is an unkeyed hash")
	}
	direct := hmac.New(sha256.New, testSecret)
	direct.Write([]byte(raw))
	if bytes.Equal(direct.Sum(nil), want[:]) {
		t.Error("digest is keyed with the raw secret, not the derived pepper")
	}
}

func TestHasherSecretDependent(t *testing.T) {
	raw, _ := Mint(DefaultPrefix)
	other := bytes.Clone(testSecret)
	other[0] ^= 1
	h2, err := NewHasher(other)
	if err != nil {
		t.Fatal(err)
	}
	if testHasher.Digest(raw) == h2.Digest(raw) {
		t.Error("digest does not depend on the secret")
	}
}

func TestHasherRejectsShortSecret(t *testing.T) {
	for _, n := range []int{0, 1, 31} {
		if _, err := NewHasher(make([]byte, n)); err == nil {
			t.Errorf("NewHasher accepted a %d-byte secret", n)
		}
	}
	if _, err := NewHasher(make([]byte, 32)); err != nil {
		t.Errorf("NewHasher rejected a 32-byte secret: %v", err)
	}
}

func TestHasherConcurrent(t *testing.T) {
	keys := make([]string, 16)
	want := make([]Digest, len(keys))
	for i := range keys {
		keys[i], _ = Mint(DefaultPrefix)
		want[i] = testHasher.Digest(keys[i])
	}
	// A long input in between must not disturb the pooled states.
	long := strings.Repeat("x", 5000)
	wantLong := testHasher.Digest(long)
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Go(func() {
			for i := range 500 {
				j := (g + i) % len(keys)
				if got := testHasher.Digest(keys[j]); got != want[j] {
					t.Errorf("concurrent Digest mismatch")
					return
				}
				if i%100 == 0 && testHasher.Digest(long) != wantLong {
					t.Errorf("long Digest mismatch")
					return
				}
			}
		})
	}
	wg.Wait()
}

func TestDeriveKey(t *testing.T) {
	a, err := DeriveKey(testSecret, "idempotency-seal", 32)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := DeriveKey(testSecret, "idempotency-seal", 32)
	c, _ := DeriveKey(testSecret, "key-digest", 32)
	if len(a) != 32 || !bytes.Equal(a, b) || bytes.Equal(a, c) {
		t.Error("DeriveKey is not deterministic per purpose, or purposes collide")
	}
	if _, err := DeriveKey(testSecret[:31], "x", 32); err == nil {
		t.Error("DeriveKey accepted a short secret")
	}
	if _, err := DeriveKey(testSecret, "", 32); err == nil {
		t.Error("DeriveKey accepted an empty purpose")
	}
	if _, err := DeriveKey(testSecret, "x", 0); err == nil {
		t.Error("DeriveKey accepted length 0")
	}
	if err := func() error { _, err := DeriveKey(testSecret, "x", 32); return err }(); err != nil {
		t.Error(err)
	}
	// The error for a short secret does not echo it.
	_, err = DeriveKey([]byte("short-secret-value"), "x", 32)
	if err == nil || strings.Contains(err.Error(), "short-secret-value") {
		t.Errorf("short secret error: %v", err)
	}
}

func TestDigestText(t *testing.T) {
	d := testHasher.Digest("wbk_x")
	s := d.String()
	if len(s) != 64 || strings.ToLower(s) != s {
		t.Fatalf("String = %q", s)
	}
	p, err := ParseDigest(s)
	if err != nil || p != d {
		t.Fatalf("ParseDigest(String) = %s, %v", p, err)
	}
	data, err := json.Marshal(struct{ D Digest }{d})
	if err != nil {
		t.Fatal(err)
	}
	if want := `{"D":"` + s + `"}`; string(data) != want {
		t.Errorf("JSON = %s, want %s", data, want)
	}
	var back struct{ D Digest }
	if err := json.Unmarshal(data, &back); err != nil || back.D != d {
		t.Errorf("JSON round trip: %s, %v", back.D, err)
	}
	for _, bad := range []string{"", "00", s[:63], s + "0", "zz" + s[2:]} {
		if _, err := ParseDigest(bad); err == nil {
			t.Errorf("ParseDigest(%q) accepted", bad)
		}
	}
	if err := json.Unmarshal([]byte(`{"D":"nope"}`), &back); err == nil {
		t.Error("JSON accepted a bad digest")
	}
}

func TestDigestEqual(t *testing.T) {
	a := testHasher.Digest("a")
	b := a
	if !a.Equal(b) {
		t.Error("equal digests differ")
	}
	b[31] ^= 1
	if a.Equal(b) {
		t.Error("different digests are equal")
	}
}

func TestDigestDoesNotAllocate(t *testing.T) {
	raw, _ := Mint(DefaultPrefix)
	testHasher.Digest(raw) // warm the pool
	n := testing.AllocsPerRun(1000, func() { _ = testHasher.Digest(raw) })
	if raceEnabled {
		// sync.Pool drops items on purpose under the race detector.
		t.Logf("race detector on: Digest allocates %.2f times per call; counted without -race only", n)
		return
	}
	if n != 0 {
		t.Errorf("Digest allocates %.2f times per call", n)
	}
}

func BenchmarkDigest(b *testing.B) {
	raw, err := Mint(DefaultPrefix)
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		_ = testHasher.Digest(raw)
	}
}

func BenchmarkDigestParallel(b *testing.B) {
	raw, err := Mint(DefaultPrefix)
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			_ = testHasher.Digest(raw)
		}
	})
}
