package keystore

import (
	"fmt"
	"hash/crc32"
	"strings"
	"testing"
	"time"
)

// Fuzz targets of the key format and the store's small parsers. Plain
// `go test` runs their seeds (f.Add and testdata/fuzz/<FuzzName>/);
// scripts/fuzz.sh runs them as fuzzers.

// FuzzCheck checks that Check accepts exactly the strings of Mint's form:
// the prefix, 56 lowercase hex characters and the CRC32-IEEE of what
// precedes it as 8 lowercase hex characters; that one changed character
// is always caught; and that the allocation-free CRC matches hash/crc32.
func FuzzCheck(f *testing.F) {
	minted, err := Mint(DefaultPrefix)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(DefaultPrefix, minted, uint8(0))
	f.Add(DefaultPrefix, strings.ToUpper(minted), uint8(7))
	f.Add("sk_live_", minted, uint8(67))
	f.Add(DefaultPrefix, "", uint8(1))
	f.Add(DefaultPrefix, "wbk_"+strings.Repeat("0", 64), uint8(3))
	f.Fuzz(func(t *testing.T, prefix, raw string, pos uint8) {
		if got, want := crc32IEEEString(raw), crc32.ChecksumIEEE([]byte(raw)); got != want {
			t.Fatalf("crc32IEEEString(%q) = %08x, hash/crc32 says %08x", raw, got, want)
		}
		err := Check(prefix, raw)
		if err != nil && err != ErrMalformed && err != ErrChecksum {
			t.Fatalf("Check returned %v, not one of its documented errors", err)
		}
		if ValidatePrefix(prefix) != nil {
			return
		}
		n := len(prefix) + secretHexLen
		if err == nil {
			if len(raw) != n+checksumHexLen || !strings.HasPrefix(raw, prefix) {
				t.Fatalf("Check accepted %q of the wrong shape", raw)
			}
			for i := len(prefix); i < len(raw); i++ {
				if !isLowerHex(raw[i]) {
					t.Fatalf("Check accepted %q with a non-hex character at %d", raw, i)
				}
			}
			if want := fmt.Sprintf("%08x", crc32.ChecksumIEEE([]byte(raw[:n]))); raw[n:] != want {
				t.Fatalf("Check accepted %q with checksum %s, want %s", raw, raw[n:], want)
			}
			// CRC32 catches every single-character change.
			i := len(prefix) + int(pos)%(len(raw)-len(prefix))
			c := byte('0')
			if raw[i] == '0' {
				c = 'f'
			}
			if Check(prefix, raw[:i]+string(c)+raw[i+1:]) == nil {
				t.Fatalf("Check accepted %q with character %d changed", raw, i)
			}
			if DisplayPrefix(prefix, raw) != raw[:len(prefix)+displayHexLen] {
				t.Fatalf("DisplayPrefix(%q) = %q", raw, DisplayPrefix(prefix, raw))
			}
		}
		// Conversely: any 28 bytes in Mint's form are accepted.
		body := fmt.Sprintf("%x", []byte(raw))
		body = (body + strings.Repeat("0", secretHexLen))[:secretHexLen]
		key := prefix + body
		key += fmt.Sprintf("%08x", crc32.ChecksumIEEE([]byte(key)))
		if err := Check(prefix, key); err != nil {
			t.Fatalf("Check refused %q, which has Mint's form: %v", key, err)
		}
		if minted, err := Mint(prefix); err != nil || Check(prefix, minted) != nil {
			t.Fatalf("Mint(%q) = %q, %v; Check refuses it", prefix, minted, err)
		}
	})
}

// FuzzParseDigest checks that ParseDigest accepts exactly 64 hex digits and
// that a parsed digest prints back as its (lowercased) input.
func FuzzParseDigest(f *testing.F) {
	f.Add(testHasher.Digest("wbk_x").String())
	f.Add(strings.ToUpper(testHasher.Digest("wbk_y").String()))
	f.Add(strings.Repeat("g", 64))
	f.Add("")
	f.Fuzz(func(t *testing.T, s string) {
		d, err := ParseDigest(s)
		if err != nil {
			return
		}
		if !strings.EqualFold(d.String(), s) {
			t.Fatalf("ParseDigest(%q) prints as %q", s, d.String())
		}
		again, err := ParseDigest(d.String())
		if err != nil || !again.Equal(d) {
			t.Fatalf("a digest's own text does not parse back: %v", err)
		}
	})
}

// FuzzIndexMember checks the owner index encoding: every key that Create
// accepts gets an index member that parses back to its ID (so it is
// listed), and memberID accepts only members of that form.
func FuzzIndexMember(f *testing.F) {
	f.Add(int64(1754827200123), "key_abc", "0001754827200123:key_abc")
	f.Add(int64(0), "key_x", "0000000000000001:")
	f.Add(int64(-1), "k", "garbage")
	f.Add(int64(1)<<62, "key_far_future", "00000000000000ab:key_x")
	f.Fuzz(func(t *testing.T, ms int64, id, member string) {
		k := &Key{ID: id, Owner: "o", Digest: Digest{1}, CreatedAt: time.UnixMilli(ms)}
		if validateKey(k) == nil {
			got, ok := memberID(indexMember(k))
			if !ok || got != id {
				t.Fatalf("Create accepts a key created at %d ms, but its index member %q parses to %q, %v: it would never be listed",
					ms, indexMember(k), got, ok)
			}
			if checkCursor(indexMember(k)) != nil {
				t.Fatalf("the member %q is not a valid cursor", indexMember(k))
			}
		}
		if got, ok := memberID(member); ok {
			if len(member) < msDigits+2 || member[msDigits] != ':' || member[msDigits+1:] != got || got == "" {
				t.Fatalf("memberID(%q) = %q", member, got)
			}
		}
	})
}
