package requesttarget

import (
	"errors"
	"net/url"
	"strings"
	"testing"

	"github.com/caddy-apikeys/caddy-apikeys/internal/backendpath"
)

func TestCheck(t *testing.T) {
	accept := []string{
		"/",
		"/v1/analytics/daily",
		"/v1/analytics/",
		"/v1/analytics/.hidden",     // a dot file
		"/v1/analytics/a.b..c",      // dots inside a name
		"/v1/files/my%20file",       // a space must be encoded
		"/v1/files/caf%C3%A9",       // UTF-8, encoded
		"/v1/files/%E2%82%AC",       // €
		"/v1/files/%F0%9F%94%91",    // a four-byte rune
		"/v1/files/%EF%BF%BD",       // U+FFFD itself is valid
		"/v1/a:b@c!$&'()*+,=",       // every literal sub-delimiter but ;
		"/v1/users/alice%40example", // an encoded reserved character that is not a separator
		"/v1/files/%C2%BD",          // ½: NFKC makes it 1⁄2, no separator
		"/v1/files/%E4%B8%AD%E6%96%87",
	}
	for _, p := range accept {
		if err := Check(p, Options{}); err != nil {
			t.Errorf("Check(%q) = %v, want nil", p, err)
		}
	}

	refuse := []struct {
		path string
		want error
	}{
		{"", ErrNotAbsolute},
		{"*", ErrNotAbsolute},
		{"v1/analytics", ErrNotAbsolute},
		{"//v1/analytics", ErrEmptySegment},
		{"/v1//analytics", ErrEmptySegment},
		{"/v1/analytics//", ErrEmptySegment},
		{"/v1/webhooks/../analytics/x", ErrDotSegment},
		{"/v1/webhooks/./x", ErrDotSegment},
		{"/v1/webhooks/..", ErrDotSegment},
		{"/v1/webhooks/.", ErrDotSegment},
		{"/..", ErrDotSegment},
		{"/v1/analytics/.../webhooks", ErrDotSegment}, // Windows may read ... as ..
		{"/v1/analytics/....", ErrDotSegment},
		{"/v1/webhooks/%2e%2e/analytics/x", ErrNeedlessEncoding},
		{"/v1/webhooks/%2E%2E/analytics/x", ErrNeedlessEncoding},
		{"/v1/webhooks/.%2e/analytics/x", ErrNeedlessEncoding},
		{"/v1/webhooks/..%2Fanalytics/x", ErrEncodedSeparator},
		{"/v1/webhooks/1%2F..%2F..%2Fanalytics%2Fx", ErrEncodedSeparator},
		{"/v1/analytics/..;/webhooks/1", ErrSemicolon},
		{"/v1/analytics;/x", ErrSemicolon},
		{"/v1/analytics/..%3B/webhooks/1", ErrSemicolon},
		{"/v1/analytics/..%5Cwebhooks/1", ErrEncodedSeparator},
		{`/v1/analytics/..\webhooks/1`, ErrIllegalByte},
		{"/v1/analytics/%252e%252e/x", ErrEncodedSeparator}, // double encoding
		{"/v1/analytics/%25", ErrEncodedSeparator},
		{"/v1/analytics/x%3F/y", ErrEncodedSeparator},
		{"/v1/analytics/x%23/y", ErrEncodedSeparator},
		{"/v1/analytics/x%00", ErrControl},
		{"/v1/analytics/x%0a", ErrControl},
		{"/v1/analytics/x%7F", ErrControl},
		{"/v1/analytics/%C0%AE%C0%AE/x", ErrInvalidUTF8}, // overlong '.'
		{"/v1/analytics/%C0%AF", ErrInvalidUTF8},         // overlong '/'
		{"/v1/analytics/%E0%80%AE", ErrInvalidUTF8},      // overlong '.', three bytes
		{"/v1/analytics/%ED%A0%80", ErrInvalidUTF8},      // a surrogate
		{"/v1/analytics/%C3", ErrInvalidUTF8},            // truncated
		{"/v1/analytics/%C3/x", ErrInvalidUTF8},
		{"/v1/analytics/%FF", ErrInvalidUTF8},
		{"/v1/analytics/%80", ErrInvalidUTF8},
		{"/v1/analytics/%41", ErrNeedlessEncoding},
		{"/v1/%61nalytics/x", ErrNeedlessEncoding},
		{"/v1/analytics/%7e", ErrNeedlessEncoding},
		{"/v1/analytics/%", ErrBadEscape},
		{"/v1/analytics/%2", ErrBadEscape},
		{"/v1/analytics/%zz", ErrBadEscape},
		{"/v1/analytics/x y", ErrIllegalByte},
		{"/v1/analytics/\u00e9", ErrIllegalByte},
		{"/v1/analytics/x\x00", ErrIllegalByte},
		{"/v1/analytics/<x>", ErrIllegalByte},
		{"/v1/analytics/[x]", ErrIllegalByte},
		{"/v1/analytics/x?", ErrIllegalByte},
		{"/v1/analytics/x#", ErrIllegalByte},
		{"/v1/analytics/%EF%BC%8E%EF%BC%8E/webhooks", ErrCompatSeparator}, // fullwidth ..
		{"/v1/analytics/%E2%80%A5/webhooks", ErrCompatSeparator},          // two dot leader
		{"/v1/analytics%EF%BC%8Fx", ErrCompatSeparator},                   // fullwidth /
		{"/v1/analytics/%EF%BC%BCx", ErrCompatSeparator},                  // fullwidth backslash
		{"/v1/analytics/%EF%BC%85%32%65", ErrCompatSeparator},             // fullwidth %
		{"/v1/analytics/x%CD%BE", ErrCompatSeparator},                     // Greek question mark is ;
	}
	for _, tc := range refuse {
		if err := Check(tc.path, Options{}); !errors.Is(err, tc.want) {
			t.Errorf("Check(%q) = %v, want %v", tc.path, err, tc.want)
		}
	}
}

func TestCheckAllowEncodedSlash(t *testing.T) {
	opts := Options{AllowEncodedSlash: true}
	for _, p := range []string{"/v1/files/a%2Fb", "/v1/files/a%2fb/c", "/v1/files/a%2Fb%2Fc"} {
		if err := Check(p, opts); err != nil {
			t.Errorf("Check(%q, AllowEncodedSlash) = %v, want nil", p, err)
		}
	}
	refuse := []struct {
		path string
		want error
	}{
		{"/v1/webhooks/1%2F..%2F..%2Fanalytics%2Fx", ErrDotSegment},
		{"/v1/webhooks/..%2Fanalytics", ErrDotSegment},
		{"/v1/webhooks/.%2Fanalytics", ErrDotSegment},
		{"/v1/files/a%2F%2Fb", ErrEmptySegment},
		{"/v1/files/%2Fb", ErrEmptySegment},
		{"/v1/files/a%2F", ErrEmptySegment},
		{"/v1/files/a%2F/b", ErrEmptySegment},
		{"/v1/files/a%5Cb", ErrEncodedSeparator},
		{"/v1/files/%C3%2Fb", ErrInvalidUTF8},
	}
	for _, tc := range refuse {
		if err := Check(tc.path, opts); !errors.Is(err, tc.want) {
			t.Errorf("Check(%q, AllowEncodedSlash) = %v, want %v", tc.path, err, tc.want)
		}
	}
}

func TestSplitView(t *testing.T) {
	if _, ok := SplitView("/v1/files/a%20b"); ok {
		t.Error("SplitView reported an encoded slash where there is none")
	}
	got, ok := SplitView("/v1/files/a%2fb%20c/d")
	if !ok || got != "/v1/files/a%2Fb c/d" {
		t.Errorf("SplitView = %q, %v", got, ok)
	}
}

func TestCheckAllocs(t *testing.T) {
	for _, p := range []string{"/v1/analytics/daily", "/v1/files/caf%C3%A9", "/v1/webhooks/../x"} {
		if n := testing.AllocsPerRun(100, func() { _ = Check(p, Options{}) }); n != 0 {
			t.Errorf("Check(%q) allocates %v times", p, n)
		}
	}
}

// agreesWithEveryBackend reports whether every backend model reads the
// escaped path p as the same sequence of decoded segments as its plain
// decoding, and names the first model that does not.
func agreesWithEveryBackend(t testing.TB, p string) (string, bool) {
	decoded, err := url.PathUnescape(p)
	if err != nil {
		t.Fatalf("Check accepted %q, which does not decode: %v", p, err)
	}
	for _, m := range backendpath.Models {
		got, ok := m.Route(p)
		if !ok {
			return m.Name + " refuses or redirects it", false
		}
		want := decoded
		if m.Name == "iis-backslash-casefold" {
			want = strings.ToLower(decoded)
		}
		if m.Name == "nfkc-normalize" {
			// Same segments: as many, none removed or merged.
			if strings.Count(got, "/") != strings.Count(decoded, "/") {
				return m.Name + " reads " + got, false
			}
			continue
		}
		if m.Name == "express-raw" || m.Name == "go-servemux" {
			// These route on segments; compare each decoded.
			segs := strings.Split(got, "/")
			for i, s := range segs {
				if segs[i], err = url.PathUnescape(s); err != nil {
					return m.Name + " has an undecodable segment", false
				}
			}
			got = strings.Join(segs, "/")
		}
		if got != want {
			return m.Name + " reads " + got, false
		}
	}
	return "", true
}

// FuzzCheck holds Check to its promise: a path it accepts is read as the
// same segments by every backend model, and Check never panics.
func FuzzCheck(f *testing.F) {
	for _, s := range []string{
		"/v1/analytics/daily", "/v1/webhooks/%2e%2e/analytics/x", "/v1/webhooks/..%2Fanalytics/x",
		"/v1/webhooks/1%2F..%2F..%2Fanalytics%2Fx", "/v1/webhooks/../analytics/x", "/v1/analytics/..;/webhooks/1",
		`/v1/analytics/..\webhooks/1`, "/v1/analytics/%C0%AE%C0%AE/", "/v1/a%252e%252e/", "/v1/caf%C3%A9/x",
		"/v1//x", "/v1/a%3b/..", "/%2e", "/.%2E/", "/v1/a%2Fb",
		"/v1/%EF%BC%8E%EF%BC%8E/x", "/v1/%C2%BD", "/v1/%E2%91%A0/x",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, p string) {
		if Check(p, Options{}) != nil {
			return
		}
		if why, ok := agreesWithEveryBackend(t, p); !ok {
			t.Fatalf("Check accepted %q, but %s", p, why)
		}
	})
}

func TestPattern(t *testing.T) {
	cases := []struct {
		pattern string
		match   []string
		miss    []string
	}{
		{"*", []string{"/", "/anything"}, nil},
		{"/v1/analytics", []string{"/v1/analytics"}, []string{"/v1/analytics/", "/V1/analytics", "/v1/analyticsx"}},
		{"/v1/analytics/*", []string{"/v1/analytics/", "/v1/analytics/daily", "/v1/analytics/a/b"},
			[]string{"/v1/analytics", "/V1/ANALYTICS/daily", "/v1/Analytics/daily", "/v1/analyticsx"}},
		{"*.json", []string{"/a.json", "/x/y.json"}, []string{"/a.JSON", "/a.jsonx"}},
		{"*/admin/*", []string{"/v1/admin/x"}, []string{"/v1/Admin/x"}},
		{"/v1/*/items", []string{"/v1/a/items"}, []string{"/v1/a/b/items", "/v1/A/Items"}},
	}
	for _, tc := range cases {
		p, err := ParsePattern(tc.pattern)
		if err != nil {
			t.Fatalf("ParsePattern(%q): %v", tc.pattern, err)
		}
		for _, s := range tc.match {
			if !p.Match(s) {
				t.Errorf("%q should match %q", tc.pattern, s)
			}
		}
		for _, s := range tc.miss {
			if p.Match(s) {
				t.Errorf("%q should not match %q", tc.pattern, s)
			}
		}
	}
	for _, bad := range []string{"", "v1/x", "/v1/%2F/*", "/v1/{http.request.host}/*", "/v1/[x"} {
		if _, err := ParsePattern(bad); err == nil {
			t.Errorf("ParsePattern(%q) accepted a bad pattern", bad)
		}
	}
}

func BenchmarkCheck(b *testing.B) {
	b.ReportAllocs()
	for b.Loop() {
		_ = Check("/v1/analytics/daily/report-2026-11-30", Options{})
	}
}
