package apikeys

import (
	"bytes"
	"encoding/json"
	"io"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"

	"github.com/caddy-apikeys/caddy-apikeys/requesttarget"
)

// ServeHTTP answers the management API itself and guards every other path.
// Both first refuse a request whose path is not canonical (see package
// requesttarget), so that every decision below is made on the path the
// backend will read.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler) error {
	if len(r.TransferEncoding) > 0 && r.ProtoMajor == 1 {
		w = &closingWriter{ResponseWriterWrapper: caddyhttp.ResponseWriterWrapper{ResponseWriter: w}, body: r.Body}
	}
	if err := h.checkPath(r); err != nil {
		validationBadRequest.Inc()
		return writeError(w, &apiError{status: http.StatusBadRequest, code: "non_canonical_path",
			message: "The request path is not in canonical form: " + err.Error() + "."})
	}
	if h.isManagementPath(r.URL.Path) {
		if h.isSecretScanningPath(r.URL.Path) {
			return h.serveSecretScanning(w, r)
		}
		return h.serveManagement(w, r)
	}
	return h.guard(w, r, next)
}

// checkPath checks the path that reverse_proxy will send (the request URL's
// escaped path) for canonical form. Without a RawPath and without '%', the
// escaped path is the decoded one with only bytes escaped that Check
// refuses unescaped (or allows either way, as '!'), so the cheaper check of
// the decoded path decides unless it finds such a byte.
func (h *Handler) checkPath(r *http.Request) error {
	u := r.URL
	if u.RawPath == "" && strings.IndexByte(u.Path, '%') < 0 {
		if err := requesttarget.Check(u.Path, h.pathOpts); err != requesttarget.ErrIllegalByte {
			return err
		}
	}
	return requesttarget.Check(u.EscapedPath(), h.pathOpts)
}

// closingWriter is the response writer of a chunked HTTP/1.x request,
// which closes its connection after the response, whatever the answer:
// net/http drops a Content-Length sent beside Transfer-Encoding without
// closing (RFC 9112 §6.1 says the server MUST close then), so a front proxy
// that reads the other framing would disagree with Caddy on where the next
// request starts; and after a framing error in the chunks the rest of the
// connection cannot be trusted to start a request either.
//
// Asking net/http to close skips its drain of an unread body and closes at
// once, so a client still sending could see the connection reset before it
// reads the answer. So when the answer is the handler's own (not a proxied
// response, while the transport may still be reading the body), up to
// 256 KiB of the body are read and discarded first, and the connection is
// marked to close only if that reached the body's end. A longer body is
// left to net/http, which drains another 256 KiB and closes (gracefully)
// if the body goes on: only a chunked body of 256 to 512 KiB that a
// handler refused without reading keeps its connection.
type closingWriter struct {
	caddyhttp.ResponseWriterWrapper
	body    io.Reader // the request body as it arrived
	proxied bool      // the request went on: leave the body to the transport
	wrote   bool
}

func (w *closingWriter) WriteHeader(code int) {
	if !w.wrote {
		w.wrote = true
		closeAfter := true
		if !w.proxied && w.body != nil {
			// More than 256 KiB left: net/http closes the connection
			// itself after its own drain, which lets a client still
			// sending read the answer first.
			n, _ := io.CopyN(io.Discard, w.body, 256<<10)
			closeAfter = n < 256<<10
		}
		if closeAfter {
			w.Header().Set("Connection", "close")
		}
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *closingWriter) Write(p []byte) (int, error) {
	if !w.wrote {
		w.WriteHeader(http.StatusOK)
	}
	return w.ResponseWriter.Write(p)
}

// isManagementPath reports whether p is the management path or below it.
func (h *Handler) isManagementPath(p string) bool {
	m := h.ManagementPath
	return p == m || len(p) > len(m) && p[len(m)] == '/' && strings.HasPrefix(p, m)
}

// apiError is an error answered to the client in the JSON envelope.
type apiError struct {
	status  int
	code    string
	message string
	field   string
	header  http.Header // extra response headers, e.g. Retry-After
}

func (e *apiError) Error() string { return e.code + ": " + e.message }

// Errors shared by several endpoints.
var (
	errStoreUnavailable = &apiError{status: http.StatusServiceUnavailable, code: "store_unavailable",
		message: "The key store is unreachable right now; retry shortly.",
		header:  http.Header{"Retry-After": {"2"}}}
	errNotFound = &apiError{status: http.StatusNotFound, code: "not_found",
		message: "No such resource."}
)

// envelope is the JSON shape of every response.
type envelope struct {
	Success bool       `json:"success"`
	Data    any        `json:"data,omitempty"`
	Error   *errorBody `json:"error,omitempty"`
}

type errorBody struct {
	Code    string `json:"code"`
	Message string `json:"message"`
	Field   string `json:"field,omitempty"`
}

// writeError answers e in the error envelope.
func writeError(w http.ResponseWriter, e *apiError) error {
	for k, v := range e.header {
		w.Header()[k] = v
	}
	return writeEnvelope(w, e.status, envelope{Error: &errorBody{Code: e.code, Message: e.message, Field: e.field}})
}

// writeData answers data in the success envelope.
func writeData(w http.ResponseWriter, status int, data any) error {
	return writeEnvelope(w, status, envelope{Success: true, Data: data})
}

func writeEnvelope(w http.ResponseWriter, status int, env envelope) error {
	body, err := marshalJSON(env)
	if err != nil {
		return err
	}
	writeRaw(w, status, body)
	return nil
}

// marshalJSON encodes v without HTML escaping, so messages read as written.
func marshalJSON(v any) ([]byte, error) {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		return nil, err
	}
	return bytes.TrimSuffix(buf.Bytes(), []byte("\n")), nil
}

// writeRaw writes an already encoded JSON body.
func writeRaw(w http.ResponseWriter, status int, body []byte) {
	hdr := w.Header()
	hdr.Set("Content-Type", "application/json")
	hdr.Set("Content-Length", strconv.Itoa(len(body)))
	hdr.Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(status)
	_, _ = w.Write(body)
}

// bearerToken returns the token of the request's single
// `Authorization: Bearer` header. ok is false when there is no such header.
func bearerToken(r *http.Request) (token string, ok bool) {
	vals := r.Header["Authorization"]
	if len(vals) != 1 {
		return "", false
	}
	v := vals[0]
	const scheme = "Bearer "
	if len(v) <= len(scheme) || !strings.EqualFold(v[:len(scheme)], scheme) {
		return "", false
	}
	token = strings.TrimSpace(v[len(scheme):])
	return token, token != ""
}

// apiTimeLayout is RFC 3339 in UTC with milliseconds.
const apiTimeLayout = "2006-01-02T15:04:05.000Z"

// apiTime encodes a time as the API does: UTC, RFC 3339, milliseconds.
type apiTime struct{ time.Time }

func (t apiTime) MarshalJSON() ([]byte, error) {
	return []byte(`"` + t.UTC().Format(apiTimeLayout) + `"`), nil
}

func (t *apiTime) UnmarshalJSON(b []byte) error {
	s, err := strconv.Unquote(string(b))
	if err != nil {
		return err
	}
	t.Time, err = time.Parse(apiTimeLayout, s)
	return err
}
