package keystore

import (
	"errors"
	"hash/crc32"
	"strings"
	"testing"
)

func TestValidatePrefix(t *testing.T) {
	for _, ok := range []string{"wbk_", "sk_live_", "a_", "a1_", "abcdefghijklmno_"} {
		if err := ValidatePrefix(ok); err != nil {
			t.Errorf("ValidatePrefix(%q): %v", ok, err)
		}
	}
	for _, bad := range []string{"", "_", "a", "wbk", "Wbk_", "1bk_", "_bk_", "wb-_", "wbk_ ", "wbké_", "abcdefghijklmnop_", "wbk_\x00"} {
		if err := ValidatePrefix(bad); err == nil {
			t.Errorf("ValidatePrefix(%q) accepted", bad)
		}
	}
}

func TestMintFormat(t *testing.T) {
	for _, prefix := range []string{DefaultPrefix, "sk_live_", "a_"} {
		raw, err := Mint(prefix)
		if err != nil {
			t.Fatal(err)
		}
		if len(raw) != len(prefix)+64 {
			t.Errorf("Mint(%q) is %d chars, want %d", prefix, len(raw), len(prefix)+64)
		}
		if !strings.HasPrefix(raw, prefix) {
			t.Errorf("Mint(%q) = %q lacks the prefix", prefix, raw)
		}
		body := raw[len(prefix):]
		if strings.Trim(body, "0123456789abcdef") != "" {
			t.Errorf("Mint(%q) body %q is not lowercase hex", prefix, body)
		}
		sum := crc32.ChecksumIEEE([]byte(raw[:len(raw)-8]))
		if want := raw[len(raw)-8:]; want != hex8(sum) {
			t.Errorf("checksum %s, want %s", want, hex8(sum))
		}
		if err := Check(prefix, raw); err != nil {
			t.Errorf("Check(Mint(%q)): %v", prefix, err)
		}
	}
	raw, _ := Mint(DefaultPrefix)
	if len(raw) != 68 {
		t.Errorf("default key is %d chars, want 68", len(raw))
	}
	if _, err := Mint("BAD"); err == nil {
		t.Error("Mint accepted an invalid prefix")
	}
}

// hex8 formats v as 8 lowercase hex digits, independently of putHex32.
func hex8(v uint32) string {
	const digits = "0123456789abcdef"
	out := make([]byte, 8)
	for i := range out {
		out[i] = digits[v>>(28-4*i)&0xf]
	}
	return string(out)
}

func TestMintUnique(t *testing.T) {
	seen := map[string]bool{}
	for range 1000 {
		raw, err := Mint(DefaultPrefix)
		if err != nil {
			t.Fatal(err)
		}
		if seen[raw] {
			t.Fatalf("Mint repeated %s", DisplayPrefix(DefaultPrefix, raw))
		}
		seen[raw] = true
	}
}

func TestCRC32String(t *testing.T) {
	for _, s := range []string{"", "a", "wbk_", strings.Repeat("0123456789abcdef", 5)} {
		if got, want := crc32IEEEString(s), crc32.ChecksumIEEE([]byte(s)); got != want {
			t.Errorf("crc32IEEEString(%q) = %08x, want %08x", s, got, want)
		}
	}
}

// withChecksum returns prefix+hex56 with its correct checksum appended.
func withChecksum(s string) string {
	return s + hex8(crc32.ChecksumIEEE([]byte(s)))
}

func TestCheckRejects(t *testing.T) {
	raw, err := Mint(DefaultPrefix)
	if err != nil {
		t.Fatal(err)
	}
	hex56 := raw[4:60]
	cases := []struct {
		name string
		raw  string
		want error
	}{
		{"empty", "", ErrMalformed},
		{"prefix only", "wbk_", ErrMalformed},
		{"one short", raw[:len(raw)-1], ErrMalformed},
		{"one long", raw + "0", ErrMalformed},
		{"other prefix", withChecksum("sk__" + hex56), ErrMalformed},
		{"uppercase prefix", "WBK_" + raw[4:], ErrMalformed},
		{"uppercase body", withChecksum("wbk_" + strings.ToUpper(hex56)), ErrMalformed},
		{"uppercase checksum", raw[:60] + strings.ToUpper(raw[60:]), ErrMalformed},
		{"non-hex", withChecksum("wbk_" + "g" + hex56[1:]), ErrMalformed},
		{"space", " " + raw[1:], ErrMalformed},
		{"jwt", "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJlc2lnbmF0dXJlc2ln", ErrMalformed},
		{"bad checksum", raw[:60] + "00000000", ErrChecksum},
		{"swapped halves", raw[:4] + raw[32:60] + raw[4:32] + raw[60:], ErrChecksum},
	}
	for _, tc := range cases {
		if raw == tc.raw {
			continue // "bad checksum" could in theory be right
		}
		if err := Check(DefaultPrefix, tc.raw); !errors.Is(err, tc.want) {
			t.Errorf("%s: Check = %v, want %v", tc.name, err, tc.want)
		}
	}
}

// TestCheckSingleCharTypos changes every character of a key to every other
// plausible character: Check must reject each one.
func TestCheckSingleCharTypos(t *testing.T) {
	const alphabet = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_-+/= "
	for range 5 {
		raw, err := Mint(DefaultPrefix)
		if err != nil {
			t.Fatal(err)
		}
		for i := range len(raw) {
			for _, c := range []byte(alphabet) {
				if c == raw[i] {
					continue
				}
				typo := raw[:i] + string(c) + raw[i+1:]
				err := Check(DefaultPrefix, typo)
				if err == nil {
					t.Fatalf("typo at %d (%q) accepted", i, c)
				}
				if !errors.Is(err, ErrMalformed) && !errors.Is(err, ErrChecksum) {
					t.Fatalf("typo at %d: unexpected error %v", i, err)
				}
				// A valid-looking hex typo in the body is caught by the checksum.
				if i >= 4 && isLowerHex(c) && !errors.Is(err, ErrChecksum) {
					t.Errorf("hex typo at %d: got %v, want ErrChecksum", i, err)
				}
			}
		}
	}
}

func TestDisplayPrefix(t *testing.T) {
	raw, _ := Mint(DefaultPrefix)
	if got := DisplayPrefix(DefaultPrefix, raw); got != raw[:12] || len(got) != 12 {
		t.Errorf("DisplayPrefix = %q, want %q", got, raw[:12])
	}
	raw, _ = Mint("sk_live_")
	if got := DisplayPrefix("sk_live_", raw); got != raw[:16] {
		t.Errorf("DisplayPrefix = %q, want %q", got, raw[:16])
	}
	if got := DisplayPrefix(DefaultPrefix, "wbk_12"); got != "wbk_12" {
		t.Errorf("DisplayPrefix of a short string = %q", got)
	}
}

func TestNewKeyID(t *testing.T) {
	seen := make(map[string]bool, 10000)
	for range 10000 {
		id, err := NewKeyID()
		if err != nil {
			t.Fatal(err)
		}
		if len(id) != 28 || !strings.HasPrefix(id, "key_") {
			t.Fatalf("NewKeyID = %q, want key_ + 24 chars", id)
		}
		if strings.Trim(id[4:], "abcdefghijklmnopqrstuvwxyz234567") != "" {
			t.Fatalf("NewKeyID = %q has characters outside base32 lowercase", id)
		}
		if seen[id] {
			t.Fatalf("NewKeyID repeated %s", id)
		}
		seen[id] = true
	}
}

func TestCheckDoesNotAllocate(t *testing.T) {
	raw, _ := Mint(DefaultPrefix)
	bad := raw[:60] + "00000000"
	if n := testing.AllocsPerRun(100, func() {
		_ = Check(DefaultPrefix, raw)
		_ = Check(DefaultPrefix, bad)
		_ = Check(DefaultPrefix, "Bearer nonsense")
	}); n != 0 {
		t.Errorf("Check allocates %.1f times per call", n)
	}
}

func BenchmarkCheck(b *testing.B) {
	raw, err := Mint(DefaultPrefix)
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		if err := Check(DefaultPrefix, raw); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkMint(b *testing.B) {
	b.ReportAllocs()
	for b.Loop() {
		if _, err := Mint(DefaultPrefix); err != nil {
			b.Fatal(err)
		}
	}
}
