package requesttarget

import (
	"fmt"
	"path"
	"strings"
)

// Pattern is a path pattern in the syntax of Caddy's `path` matcher,
// matched case-sensitively against a decoded canonical path:
//
//   - every path
//     /exact       that path only
//     /prefix/*    paths that start with "/prefix/"
//     *.json       paths that end with ".json"
//     */admin/*    paths that contain "/admin/"
//     /v1/*/items  a glob as [path.Match] reads it (a * stays within a segment)
//
// Unlike Caddy's matcher it does not fold case: RFC 9110 §4.2.3 makes path
// comparison case-sensitive, and so are the common backends (Go's
// ServeMux, Express, Spring), so a path that matches a pattern only when
// case is ignored would reach a different handler than the one the pattern
// names. Patterns holding `%` (escaped-space matching) or `{` (placeholders)
// are refused, since canonical paths are matched decoded and rules are
// fixed at provision time.
type Pattern struct {
	kind patternKind
	s    string // the literal part, or the whole glob
}

type patternKind uint8

const (
	matchAll patternKind = iota
	matchExact
	matchPrefix
	matchSuffix
	matchContains
	matchGlob
)

// ParsePattern compiles a pattern. It fails for a malformed glob, a pattern
// that is not `*` and starts with neither `/` nor `*`, and patterns holding
// `%` or `{`.
func ParsePattern(p string) (Pattern, error) {
	switch {
	case p == "*":
		return Pattern{kind: matchAll}, nil
	case p == "":
		return Pattern{}, fmt.Errorf("empty path pattern")
	case strings.ContainsAny(p, "%{}"):
		return Pattern{}, fmt.Errorf("path pattern %q: %% escapes and placeholders are not supported (patterns match the decoded path)", p)
	case p[0] != '/' && p[0] != '*':
		return Pattern{}, fmt.Errorf("path pattern %q must start with / or *", p)
	}
	if _, err := path.Match(p, ""); err != nil {
		return Pattern{}, fmt.Errorf("path pattern %q: %w", p, err)
	}
	stars := strings.Count(p, "*")
	switch {
	case stars == 0 && !strings.ContainsAny(p, `?[\`):
		return Pattern{kind: matchExact, s: p}, nil
	case stars == 2 && p[0] == '*' && p[len(p)-1] == '*':
		return Pattern{kind: matchContains, s: p[1 : len(p)-1]}, nil
	case stars == 1 && p[0] == '*':
		return Pattern{kind: matchSuffix, s: p[1:]}, nil
	case stars == 1 && p[len(p)-1] == '*':
		return Pattern{kind: matchPrefix, s: p[:len(p)-1]}, nil
	}
	return Pattern{kind: matchGlob, s: p}, nil
}

// Match reports whether the decoded path p matches. It does not allocate.
func (pt Pattern) Match(p string) bool {
	switch pt.kind {
	case matchAll:
		return true
	case matchExact:
		return p == pt.s
	case matchPrefix:
		return strings.HasPrefix(p, pt.s)
	case matchSuffix:
		return strings.HasSuffix(p, pt.s)
	case matchContains:
		return strings.Contains(p, pt.s)
	}
	ok, _ := path.Match(pt.s, p)
	return ok
}
