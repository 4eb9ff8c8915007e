package apikeys

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"unicode/utf8"
)

// Limits of a key's metadata.
const (
	maxMetaBytes = 4 << 10 // of the canonical form
	maxMetaDepth = 3       // the object itself is level 1
)

// parseMeta validates a `meta` member and returns its canonical form: the
// compact JSON with every non-ASCII character and DEL escaped as \uXXXX,
// so that it can be sent as a header value as is. It must be an object, at
// most maxMetaDepth levels deep, without duplicate member names, and its
// canonical form at most maxMetaBytes long.
func parseMeta(raw json.RawMessage) (json.RawMessage, *apiError) {
	raw = bytes.TrimLeft(raw, " \t\r\n")
	if len(raw) == 0 || raw[0] != '{' {
		return nil, validationError("meta", "`meta` must be a JSON object.")
	}
	if aerr := checkMetaShape(raw); aerr != nil {
		return nil, aerr
	}
	var buf bytes.Buffer
	if err := json.Compact(&buf, raw); err != nil {
		return nil, validationError("meta", "`meta` must be a JSON object.")
	}
	out := asciiJSON(buf.Bytes())
	if len(out) > maxMetaBytes {
		return nil, validationError("meta", fmt.Sprintf("`meta` must be at most %d bytes as compact JSON (non-ASCII characters count as \\uXXXX escapes).", maxMetaBytes))
	}
	return out, nil
}

// checkMetaShape walks raw's tokens: depth and duplicate member names.
func checkMetaShape(raw json.RawMessage) *apiError {
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	type level struct {
		object bool
		names  map[string]struct{}
		key    bool // the next token in an object is a member name
	}
	var stack []*level
	for {
		tok, err := dec.Token()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return validationError("meta", "`meta` must be a JSON object.")
		}
		var top *level
		if len(stack) > 0 {
			top = stack[len(stack)-1]
		}
		if top != nil && top.object && top.key {
			if d, ok := tok.(json.Delim); ok && d == '}' {
				stack = stack[:len(stack)-1]
				continue
			}
			name := tok.(string)
			if _, dup := top.names[name]; dup {
				return validationError("meta", fmt.Sprintf("`meta` has member %q more than once.", truncate(name, 64)))
			}
			top.names[name] = struct{}{}
			top.key = false
			continue
		}
		if top != nil && top.object {
			top.key = true // a value was read (or starts): a name comes next
		}
		switch tok {
		case json.Delim('{'), json.Delim('['):
			if len(stack) == maxMetaDepth {
				return validationError("meta", fmt.Sprintf("`meta` may nest at most %d levels deep (the object itself counts as one).", maxMetaDepth))
			}
			l := &level{object: tok == json.Delim('{'), key: true}
			if l.object {
				l.names = make(map[string]struct{})
			}
			stack = append(stack, l)
		case json.Delim('}'), json.Delim(']'):
			stack = stack[:len(stack)-1]
		}
	}
}

// asciiJSON returns compact JSON b with every non-ASCII character, DEL and
// < > & written as \uXXXX (surrogate pairs above U+FFFF); the last three
// as encoding/json writes them, so that the stored record holds the same
// bytes. Outside strings,
// compact JSON holds only ASCII, so b's bytes can be rewritten blindly.
func asciiJSON(b []byte) []byte {
	out := make([]byte, 0, len(b))
	for len(b) > 0 {
		c := b[0]
		if c < utf8.RuneSelf && c != 0x7f && c != '<' && c != '>' && c != '&' {
			out = append(out, c)
			b = b[1:]
			continue
		}
		r, n := utf8.DecodeRune(b)
		b = b[n:]
		if r >= 0x10000 {
			r -= 0x10000
			out = fmt.Appendf(out, `\u%04x\u%04x`, 0xd800+(r>>10), 0xdc00+(r&0x3ff))
			continue
		}
		out = fmt.Appendf(out, `\u%04x`, r)
	}
	return out
}
