// Package secretscanning implements the partner side of GitHub's secret
// scanning partner program: verifying that a report of leaked tokens was
// signed by GitHub (ECDSA P-256 with SHA-256 over the raw body, against
// GitHub's published key list), reading the report, and writing the
// partner response that labels each token a true or false positive.
//
// The package has no Caddy imports; package apikeys wires it to the key
// store. The formats follow GitHub's "Secret scanning partner program"
// documentation:
//
//	request headers  Github-Public-Key-Identifier, Github-Public-Key-Signature
//	request body     [{"token":"…","type":"…","url":"…","source":"…"}, …]
//	key list         {"public_keys":[{"key_identifier":"…","key":"-----BEGIN PUBLIC KEY-----…","is_current":true}]}
//	response body    [{"token_hash":"<sha256 hex>","token_type":"…","label":"true_positive"}, …]
package secretscanning

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
)

// Header names GitHub signs reports with.
const (
	HeaderKeyIdentifier = "Github-Public-Key-Identifier"
	HeaderSignature     = "Github-Public-Key-Signature"
)

// Labels of the partner response.
const (
	TruePositive  = "true_positive"
	FalsePositive = "false_positive"
)

// Errors of [ParseReport].
var (
	// ErrMalformedReport means the body is not a JSON array of match
	// objects with string members.
	ErrMalformedReport = errors.New("secretscanning: malformed report")
	// ErrTooManyMatches means the report holds more matches than allowed.
	ErrTooManyMatches = errors.New("secretscanning: too many matches in one report")
)

// Match is one secret GitHub found: the token, the secret type name the
// partner registered, the public URL where it was found (may be empty) and
// where on GitHub that was (content, commit, issue_comment, npm, …).
type Match struct {
	Token  string `json:"token"`
	Type   string `json:"type"`
	URL    string `json:"url"`
	Source string `json:"source"`
}

// Feedback is one element of the partner response. It names the token by
// its SHA-256 hash only, never the raw token.
type Feedback struct {
	TokenHash string `json:"token_hash"`
	TokenType string `json:"token_type"`
	Label     string `json:"label"`
}

// TokenHash returns the lowercase hex SHA-256 of token, the form GitHub
// accepts as `token_hash`.
func TokenHash(token string) string {
	sum := sha256.Sum256([]byte(token))
	return hex.EncodeToString(sum[:])
}

// ParseReport decodes the body of a report: a JSON array of at most max
// match objects. Members other than token, type, url and source are
// ignored (GitHub may add some); a match without a token is malformed.
// Call it only on a body whose signature was verified.
func ParseReport(body []byte, max int) ([]Match, error) {
	dec := json.NewDecoder(bytes.NewReader(body))
	tok, err := dec.Token()
	if err != nil {
		return nil, fmt.Errorf("%w: not JSON", ErrMalformedReport)
	}
	if d, ok := tok.(json.Delim); !ok || d != '[' {
		return nil, fmt.Errorf("%w: not a JSON array", ErrMalformedReport)
	}
	var matches []Match
	for dec.More() {
		if len(matches) == max {
			return nil, fmt.Errorf("%w (at most %d)", ErrTooManyMatches, max)
		}
		var m Match
		if err := dec.Decode(&m); err != nil {
			return nil, fmt.Errorf("%w: match %d is not an object of strings", ErrMalformedReport, len(matches)+1)
		}
		if m.Token == "" {
			return nil, fmt.Errorf("%w: match %d has no token", ErrMalformedReport, len(matches)+1)
		}
		matches = append(matches, m)
	}
	if _, err := dec.Token(); err != nil { // the closing bracket
		return nil, fmt.Errorf("%w: not JSON", ErrMalformedReport)
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, fmt.Errorf("%w: data after the array", ErrMalformedReport)
	}
	return matches, nil
}
