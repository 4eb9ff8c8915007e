// Package backendpath models how common backends turn a request path, as
// received on the wire, into the path they route on. The tests use it to
// check that whatever path the gateway forwards, every such backend routes
// it to a handler the caller's key may reach.
//
// Each model is a plain reading of documented behaviour, written
// independently of package requesttarget so the tests can hold one against
// the other.
package backendpath

import (
	"net/url"
	"path"
	"strings"

	"golang.org/x/text/unicode/norm"
)

// Model names a backend's reading of a path.
type Model struct {
	Name string
	// Route returns the path the backend routes on, and false when the
	// backend would refuse the path outright (a 400) or redirect instead of
	// running a handler.
	Route func(escaped string) (string, bool)
}

// Models are the readings the tests check against.
var Models = []Model{
	{"go-servemux", goServeMux},
	{"decode-then-clean", decodeThenClean},
	{"express-raw", expressRaw},
	{"servlet-path-params", servletPathParams},
	{"iis-backslash-casefold", iisBackslash},
	{"double-decode", doubleDecode},
	{"nfkc-normalize", nfkcNormalize},
}

// goServeMux: Go 1.22+ ServeMux redirects a path that path.Clean would
// change, and matches segments unescaped, keeping %2F inside a segment. The
// returned path keeps %2F so that segment boundaries stay visible.
func goServeMux(escaped string) (string, bool) {
	u, err := url.ParseRequestURI(escaped)
	if err != nil {
		return "", false
	}
	if clean := cleanKeepTrailing(u.Path); clean != u.Path {
		return "", false // 301 to the clean path: no handler runs
	}
	segs := strings.Split(escaped, "/")
	for i, s := range segs {
		d, err := url.PathUnescape(strings.ReplaceAll(strings.ReplaceAll(s, "%2F", "\x00"), "%2f", "\x00"))
		if err != nil {
			return "", false
		}
		segs[i] = strings.ReplaceAll(d, "\x00", "%2F")
	}
	return strings.Join(segs, "/"), true
}

// decodeThenClean: decode the whole path, then remove dot segments and
// merge slashes (nginx with merge_slashes, many frameworks).
func decodeThenClean(escaped string) (string, bool) {
	d, err := url.PathUnescape(escaped)
	if err != nil {
		return "", false
	}
	return cleanKeepTrailing(d), true
}

// expressRaw: route on the path as received, still encoded, without
// removing dot segments (Express, Node's http). Decoded here only where the
// encoding cannot change the path's structure: a route literal would have
// to be written encoded to match otherwise, and the tests' routes are ASCII.
func expressRaw(escaped string) (string, bool) {
	return escaped, true
}

// servletPathParams: Tomcat and Spring drop everything from ';' to the end
// of each segment, then decode and normalise.
func servletPathParams(escaped string) (string, bool) {
	segs := strings.Split(escaped, "/")
	for i, s := range segs {
		if j := strings.IndexByte(s, ';'); j >= 0 {
			segs[i] = s[:j]
		}
	}
	d, err := url.PathUnescape(strings.Join(segs, "/"))
	if err != nil {
		return "", false
	}
	return cleanKeepTrailing(d), true
}

// iisBackslash: decode, read '\' as '/', normalise, and compare without case
// (the caller lower-cases routes too).
func iisBackslash(escaped string) (string, bool) {
	d, err := url.PathUnescape(escaped)
	if err != nil {
		return "", false
	}
	d = strings.ReplaceAll(d, `\`, "/")
	return strings.ToLower(cleanKeepTrailing(d)), true
}

// doubleDecode: a stack that decodes twice (a proxy that decodes, then a
// framework that decodes again).
func doubleDecode(escaped string) (string, bool) {
	d, err := url.PathUnescape(escaped)
	if err != nil {
		return "", false
	}
	if d2, err := url.PathUnescape(d); err == nil {
		d = d2
	}
	return cleanKeepTrailing(d), true
}

// nfkcNormalize: decode, then Unicode compatibility normalisation (NFKC),
// as Java's Normalizer or .NET's best-fit mappings may apply, then
// normalise the path. Its result is compared by structure, not text: NFKC
// changes letters too (½ becomes 1⁄2).
func nfkcNormalize(escaped string) (string, bool) {
	d, err := url.PathUnescape(escaped)
	if err != nil {
		return "", false
	}
	return cleanKeepTrailing(strings.ReplaceAll(norm.NFKC.String(d), `\`, "/")), true
}

func cleanKeepTrailing(p string) string {
	if p == "" {
		return "/"
	}
	c := path.Clean(p)
	if strings.HasSuffix(p, "/") && c != "/" {
		c += "/"
	}
	return c
}
