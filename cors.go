package apikeys

import (
	"net/http"
	"net/url"
	"slices"
	"strings"
)

// CORS for the management API, so a browser dashboard on another origin
// can call it. Only origins listed in cors_origins get CORS headers.

const (
	corsMethods = "GET, POST, PATCH, DELETE"
	corsHeaders = "Authorization, Content-Type, Idempotency-Key"
	corsExpose  = "Idempotent-Replayed, Retry-After, WWW-Authenticate"
)

// preflight answers OPTIONS on the management API, never with 401:
// browsers send preflights without credentials. methods are the route's
// (nil for a path that is no route: then every method of the API).
func (h *Handler) preflight(w http.ResponseWriter, r *http.Request, methods []string) error {
	allow := corsMethods
	if methods != nil {
		allow = strings.Join(methods, ", ")
	}
	hdr := w.Header()
	origin := r.Header.Get("Origin")
	if h.corsAllowed(origin) && r.Header.Get("Access-Control-Request-Method") != "" {
		hdr.Set("Access-Control-Allow-Origin", origin)
		hdr.Set("Access-Control-Allow-Methods", allow)
		hdr.Set("Access-Control-Allow-Headers", corsHeaders)
		hdr.Set("Access-Control-Max-Age", "600")
	}
	hdr.Add("Vary", "Origin")
	hdr.Set("Allow", allow+", OPTIONS")
	w.WriteHeader(http.StatusNoContent)
	return nil
}

// corsHeaders marks an actual response readable by an allowed origin.
func (h *Handler) corsHeaders(w http.ResponseWriter, r *http.Request) {
	hdr := w.Header()
	hdr.Add("Vary", "Origin")
	if origin := r.Header.Get("Origin"); h.corsAllowed(origin) {
		hdr.Set("Access-Control-Allow-Origin", origin)
		hdr.Set("Access-Control-Expose-Headers", corsExpose)
	}
}

func (h *Handler) corsAllowed(origin string) bool {
	return origin != "" && slices.Contains(h.CORSOrigins, origin)
}

// validOrigin reports whether s is a serialized origin: scheme and host,
// nothing else.
func validOrigin(s string) bool {
	u, err := url.Parse(s)
	return err == nil && (u.Scheme == "http" || u.Scheme == "https") && u.Host != "" &&
		u.Path == "" && u.RawQuery == "" && u.Fragment == "" && u.User == nil
}
