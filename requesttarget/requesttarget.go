// Package requesttarget decides whether an HTTP request's path is in the
// one canonical form that every common backend reads the same way, and
// matches path patterns against such paths.
//
// A gateway that authorises a request by its path must decide on the path
// the backend will act on. Backends disagree about everything RFC 3986
// leaves open or that their framework adds: Go's http.ServeMux and nginx
// remove dot segments, Express routes on the still-encoded path, Tomcat and
// Spring drop `;` path parameters (so `..;` is `..`), IIS-style servers
// read `\` as `/`, and some stacks decode twice. Rather than guess which
// reading a backend uses, [Check] accepts only paths on which they all
// agree and refuses the rest:
//
//   - the path starts with `/` and has no empty segment (`//`), except that
//     it may end with `/`;
//   - no segment is `.` or `..`, nor any other run of dots only (`...`,
//     which Windows path handling may shorten to `..`);
//   - no `;`, literal or encoded (a path-parameter delimiter to Servlet
//     containers);
//   - no encoded `/`, `\`, `%`, `?`, `#` (encoded separators and double
//     encoding), unless [Options.AllowEncodedSlash] allows `%2F`;
//   - no percent-encoded unreserved character (`%2E` for `.`, `%41` for
//     `A`): RFC 3986 §6.2.2.2 makes it equal to the plain character, and
//     backends that route on the encoded path would not see it so;
//   - no encoded control character (`%00`–`%1F`, `%7F`), no malformed
//     escape, and the decoded path is valid UTF-8 (which refuses overlong
//     forms such as `%C0%AE`) with no character that Unicode compatibility
//     normalisation (NFKC) turns into a dot or separator (`%EF%BC%8E`,
//     FULLWIDTH FULL STOP);
//   - every literal byte is one RFC 3986 allows in a path (unreserved,
//     sub-delimiters other than `;`, `:` and `@`).
//
// A path that passes decodes to the same segments under all of those
// readings, so a decision made on its decoded form ([url.URL.Path]) holds
// for the backend.
package requesttarget

import (
	"bytes"
	"errors"
	"strings"
	"sync"
	"unicode/utf8"

	"golang.org/x/text/unicode/norm"
)

// Options relax Check for backends whose API needs it.
type Options struct {
	// AllowEncodedSlash lets a segment hold `%2F` (an encoded `/`), for
	// APIs that carry slashes inside one path parameter. Backends differ on
	// such paths: Go's ServeMux and Express keep `%2F` inside the segment,
	// while backends that decode before routing (and proxies that decode)
	// split the segment there. Check still refuses dot segments and empty
	// segments on both readings, and callers must authorise the request
	// under both ([SplitView] gives the reading that keeps the segment).
	AllowEncodedSlash bool
}

// The reasons Check refuses a path. Each is a sentence fit for a client.
var (
	ErrNotAbsolute      = errors.New("the path must start with /")
	ErrEmptySegment     = errors.New("the path has an empty segment (//)")
	ErrDotSegment       = errors.New("the path has a segment of dots only (. or ..)")
	ErrSemicolon        = errors.New("the path has a ; (a path-parameter delimiter to some backends)")
	ErrEncodedSeparator = errors.New("the path has an encoded /, \\, %, ? or # (an encoded separator or double encoding)")
	ErrNeedlessEncoding = errors.New("the path percent-encodes a character that needs no encoding (letters, digits, - . _ ~)")
	ErrControl          = errors.New("the path has an encoded control character")
	ErrBadEscape        = errors.New("the path has a malformed percent-encoding")
	ErrInvalidUTF8      = errors.New("the path does not decode to valid UTF-8")
	ErrIllegalByte      = errors.New("the path has a character that must be percent-encoded")
	ErrCompatSeparator  = errors.New("the path has a character that Unicode compatibility normalisation (NFKC) turns into . / \\ % ; ? or # (a fullwidth dot, say)")
)

// compatSeparator reports whether the UTF-8 encoded rune b becomes a
// separator or dot under NFKC, as it does for backends that normalise
// paths (Java's Normalizer, .NET's best-fit mappings): U+FF0E FULLWIDTH
// FULL STOP is ".", U+2025 TWO DOT LEADER is "..", U+FF0F is "/". It does
// not allocate (see compatSeparators).
func compatSeparator(b []byte) bool {
	r, _ := utf8.DecodeRune(b)
	compatOnce.Do(findCompatSeparators)
	_, found := compatSeparators[r]
	return found
}

var (
	compatOnce sync.Once
	// compatSeparators are the runes whose NFKC form holds one of
	// ./\%;?# (about a hundred: fullwidth and small forms, dot leaders,
	// enclosed numbers with a full stop, ...). Found once, on first use,
	// by normalising every rune up to U+1FFFF: compatibility mappings to
	// ASCII punctuation stop there.
	compatSeparators map[rune]struct{}
)

func findCompatSeparators() {
	compatSeparators = make(map[rune]struct{})
	var buf [utf8.UTFMax]byte
	for r := rune(0x80); r <= 0x1FFFF; r++ {
		n := utf8.EncodeRune(buf[:], r)
		if norm.NFKC.IsNormal(buf[:n]) {
			continue
		}
		if bytes.ContainsAny(norm.NFKC.Bytes(buf[:n]), `./\%;?#`) {
			compatSeparators[r] = struct{}{}
		}
	}
}

// Check returns nil when escapedPath (a request's path as sent on the wire:
// [url.URL.EscapedPath], without the query) is canonical under opts, and
// otherwise the first reason it is not. It does not allocate.
func Check(escapedPath string, opts Options) error {
	p := escapedPath
	if p == "" || p[0] != '/' {
		return ErrNotAbsolute
	}
	// The current segment (with AllowEncodedSlash: the current part between
	// any slashes): its decoded length and how many of those are dots.
	segLen, segDots := 0, 0
	// A multi-byte UTF-8 sequence being decoded from escapes.
	var pending [utf8.UTFMax]byte
	npend, need := 0, 0
	for i := 1; i < len(p); i++ {
		c := p[i]
		switch byteClass[c] {
		case classPlain:
			segLen++
			continue
		case classDot:
			segLen++
			segDots++
			continue
		case classSlash:
			if segLen == 0 {
				return ErrEmptySegment
			}
			if segLen == segDots {
				return ErrDotSegment
			}
			segLen, segDots = 0, 0
			continue
		case classSemicolon:
			return ErrSemicolon
		case classIllegal:
			return ErrIllegalByte
		}
		// An escape: %XX.
		if i+2 >= len(p) {
			return ErrBadEscape
		}
		hi, ok1 := unhex(p[i+1])
		lo, ok2 := unhex(p[i+2])
		if !ok1 || !ok2 {
			return ErrBadEscape
		}
		d := hi<<4 | lo
		i += 2
		if npend > 0 {
			// A continuation byte of a UTF-8 sequence must follow at once.
			if d&0xc0 != 0x80 {
				return ErrInvalidUTF8
			}
			pending[npend] = d
			npend++
			if npend == need {
				if !utf8.Valid(pending[:npend]) {
					return ErrInvalidUTF8
				}
				if compatSeparator(pending[:npend]) {
					return ErrCompatSeparator
				}
				npend = 0
			}
			segLen++
			continue
		}
		switch {
		case d >= 0x80:
			switch {
			case d&0xe0 == 0xc0:
				need = 2
			case d&0xf0 == 0xe0:
				need = 3
			case d&0xf8 == 0xf0:
				need = 4
			default:
				return ErrInvalidUTF8
			}
			pending[0] = d
			npend = 1
		case d < 0x20 || d == 0x7f:
			return ErrControl
		case byteClass[d] == classPlain || byteClass[d] == classDot:
			if isUnreserved(d) {
				return ErrNeedlessEncoding
			}
		case d == ';':
			return ErrSemicolon
		case d == '/':
			if !opts.AllowEncodedSlash {
				return ErrEncodedSeparator
			}
			// A part boundary on the reading that decodes %2F: neither
			// side may be empty or a dot segment.
			if segLen == 0 || i+1 == len(p) || p[i+1] == '/' {
				return ErrEmptySegment
			}
			if segLen == segDots {
				return ErrDotSegment
			}
			segLen, segDots = 0, 0
			continue
		case d == '\\' || d == '%' || d == '?' || d == '#':
			return ErrEncodedSeparator
		}
		segLen++
	}
	if npend != 0 {
		return ErrInvalidUTF8
	}
	if segLen > 0 && segLen == segDots {
		return ErrDotSegment
	}
	return nil
}

// Byte classes of a path as sent (see byteClass).
const (
	classIllegal = iota
	classPlain
	classDot
	classSlash
	classPercent
	classSemicolon
)

// byteClass sorts the bytes of a path: RFC 3986 pchar (unreserved,
// sub-delimiters, ':' and '@') are plain, except '.', '%' and ';' which
// have classes of their own; '/' separates; everything else is illegal.
var byteClass = func() (t [256]uint8) {
	for c := 0; c < 256; c++ {
		b := byte(c)
		switch {
		case isUnreserved(b) || strings.IndexByte("!$&'()*+,=:@", b) >= 0:
			t[c] = classPlain
		}
	}
	t['.'] = classDot
	t['/'] = classSlash
	t['%'] = classPercent
	t[';'] = classSemicolon
	return t
}()

// SplitView returns the path as a backend that keeps `%2F` inside a segment
// reads it: escapedPath decoded, except that each `%2F` stays as the three
// characters "%2F". ok is false when escapedPath has no encoded slash, in
// which case that reading is the plain decoded path. escapedPath must have
// passed Check.
func SplitView(escapedPath string) (view string, ok bool) {
	if !hasEncodedSlash(escapedPath) {
		return "", false
	}
	b := make([]byte, 0, len(escapedPath))
	for i := 0; i < len(escapedPath); i++ {
		c := escapedPath[i]
		if c == '%' && i+2 < len(escapedPath) {
			hi, _ := unhex(escapedPath[i+1])
			lo, _ := unhex(escapedPath[i+2])
			if d := hi<<4 | lo; d != '/' {
				b = append(b, d)
				i += 2
				continue
			}
			b = append(b, "%2F"...)
			i += 2
			continue
		}
		b = append(b, c)
	}
	return string(b), true
}

func hasEncodedSlash(s string) bool {
	for i := 0; i+2 < len(s); i++ {
		if s[i] == '%' && s[i+1] == '2' && (s[i+2] == 'f' || s[i+2] == 'F') {
			return true
		}
	}
	return false
}

func unhex(c byte) (byte, bool) {
	switch {
	case '0' <= c && c <= '9':
		return c - '0', true
	case 'a' <= c && c <= 'f':
		return c - 'a' + 10, true
	case 'A' <= c && c <= 'F':
		return c - 'A' + 10, true
	}
	return 0, false
}

// isUnreserved reports whether c is an RFC 3986 unreserved character.
func isUnreserved(c byte) bool {
	return 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' ||
		c == '-' || c == '.' || c == '_' || c == '~'
}
