package apikeys

import (
	"errors"
	"fmt"
	"net/http"
	"strings"
)

// hopByHopHeaders are removed by every proxy on the way (RFC 9110 §7.6.1),
// so a key sent in one could not reach the guard reliably; key_header may
// not name one.
var hopByHopHeaders = []string{"Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization",
	"Proxy-Connection", "Te", "Trailer", "Transfer-Encoding", "Upgrade", "Host", "Cookie"}

// validateKeyHeader checks key_header: a valid header name that is not
// Authorization, an identity header or a hop-by-hop header.
func (h *Handler) validateKeyHeader() error {
	name := h.KeyHeader
	if name == "" {
		return nil
	}
	if !validHeaderName(name) {
		return fmt.Errorf("apikeys: key_header %q is not a valid header name", name)
	}
	ids := h.IdentityHeaders
	for _, taken := range []string{"Authorization", ids.ID, ids.Owner, ids.Scopes, ids.Meta, ids.Plan} {
		if sameHeaderLoosely(name, taken) {
			return fmt.Errorf("apikeys: key_header cannot be %s: the gateway sets or consumes that header itself", taken)
		}
	}
	for _, hop := range hopByHopHeaders {
		if sameHeaderLoosely(name, hop) {
			return fmt.Errorf("apikeys: key_header cannot be %s, a header proxies remove or rewrite", hop)
		}
	}
	return nil
}

// errAmbiguousCredentials answers a request that sends a key both ways.
var errAmbiguousCredentials = errors.New("ambiguous")

// requestKey returns the API key the request presents: the Authorization
// bearer token, or, with key_header set, that header's single value. ok is
// false when neither is present; err is errAmbiguousCredentials when both
// are. It does not allocate.
func (h *Handler) requestKey(r *http.Request) (token string, ok bool, err error) {
	if h.KeyHeader == "" {
		token, ok = bearerToken(r)
		return token, ok, nil
	}
	vals, present := r.Header[h.KeyHeader]
	if !present {
		token, ok = bearerToken(r)
		return token, ok, nil
	}
	if _, auth := r.Header["Authorization"]; auth {
		return "", false, errAmbiguousCredentials
	}
	if len(vals) != 1 {
		return "", true, nil // present but not one value: malformed
	}
	return strings.TrimSpace(vals[0]), true, nil
}
