package jwtauth

import (
	"context"
	"crypto"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/MicahParks/jwkset"
	"github.com/MicahParks/keyfunc/v3"
	"github.com/golang-jwt/jwt/v5"
	"golang.org/x/time/rate"
)

// JWKS tuning. Why not keyfunc.NewDefaultCtx: it fetches the set
// synchronously inside the constructor (up to a minute), refreshes unknown
// key IDs on the request goroutine (a slow JWKS server stalls that request
// for the whole HTTP timeout), rate-limits them to one per 5 minutes and
// logs refresh failures through slog. Instead the pieces are assembled here:
//
//   - jwkset.NewStorageFromHTTP (HTTPClientStorageOptions: Client, Ctx,
//     HTTPTimeout, NoErrorReturnFirstHTTPReq, RefreshInterval,
//     RefreshErrorHandler, Storage) owns fetching and the periodic refresh
//     goroutine; it runs in the background so New never blocks for long.
//   - jwkset.NewHTTPClient (HTTPClientOptions: RefreshUnknownKID,
//     RateLimitWaitMax) performs unknown-kid refreshes, rate-limited by
//     unknownKIDRefreshEvery. It is only ever called from a background
//     goroutine, and only when the limiter has a token, so its limiter wait
//     never blocks.
//   - keyfunc.New over the in-memory key storage resolves keys for Verify;
//     these reads never touch the network.
const (
	// jwksRefreshInterval is the periodic refresh interval.
	jwksRefreshInterval = 5 * time.Minute
	// unknownKIDRefreshEvery is the minimum spacing of refreshes caused by
	// tokens naming an unknown kid (or arriving while no key is loaded).
	unknownKIDRefreshEvery = time.Minute
	// unknownKIDWait is how long the Verify call that triggered such a
	// refresh waits for it before giving up; every other call with an
	// unknown kid fails immediately.
	unknownKIDWait = 300 * time.Millisecond
	// initialFetchWait bounds how long New waits for the first fetch.
	initialFetchWait = 3 * time.Second
	// defaultHTTPTimeout bounds each fetch unless HTTPClient has a timeout.
	defaultHTTPTimeout = 10 * time.Second
	// maxJWKSBytes caps the size of a JWKS response.
	maxJWKSBytes = 1 << 20
	// maxRedirects caps the redirects followed for one JWKS fetch.
	maxRedirects = 5
)

var (
	errJWKSTooLarge = errors.New("jwtauth: JWKS response too large")
	errNeedRefresh  = errors.New("jwtauth: key not in JWKS")
)

// keyError is returned by key functions; its text is a safe reason.
type keyError struct{ reason string }

func (e *keyError) Error() string { return e.reason }

// jwksSource holds the keys of one JWKS URL.
type jwksSource struct {
	ctx     context.Context
	cancel  context.CancelFunc
	url     string
	client  *http.Client
	timeout time.Duration
	store   *trackingStorage
	kf      keyfunc.Keyfunc
	limiter *rate.Limiter

	mu        sync.Mutex
	refresher jwkset.Storage // nil until the first fetch is over
	inflight  chan struct{}  // non-nil while a fetch runs; closed when done
	closed    bool
	wg        sync.WaitGroup
}

// trackingStorage is the in-memory key storage. jwkset calls KeyReplaceAll
// after every successful fetch, which clears the last fetch error.
type trackingStorage struct {
	*jwkset.MemoryJWKSet
	lastErr atomic.Pointer[string]
}

func (t *trackingStorage) KeyReplaceAll(ctx context.Context, given []jwkset.JWK) error {
	t.lastErr.Store(nil)
	return t.MemoryJWKSet.KeyReplaceAll(ctx, given)
}

func (t *trackingStorage) fetchFailed(_ context.Context, err error) {
	d := describeFetchError(err)
	t.lastErr.Store(&d)
}

func startJWKS(parent context.Context, rawURL string, client *http.Client) (*jwksSource, error) {
	timeout := defaultHTTPTimeout
	if client == nil {
		client = &http.Client{Timeout: defaultHTTPTimeout}
	} else if client.Timeout > 0 {
		timeout = client.Timeout
	}
	limited := *client
	limited.Transport = limitTransport{base: client.Transport}
	if userCheck := client.CheckRedirect; userCheck != nil {
		limited.CheckRedirect = func(req *http.Request, via []*http.Request) error {
			if err := checkRedirect(req, via); err != nil {
				return err
			}
			return userCheck(req, via)
		}
	} else {
		limited.CheckRedirect = checkRedirect
	}

	store := &trackingStorage{MemoryJWKSet: jwkset.NewMemoryStorage()}
	ctx, cancel := context.WithCancel(parent)
	kf, err := keyfunc.New(keyfunc.Options{
		Ctx:          ctx,
		Storage:      store,
		UseWhitelist: []jwkset.USE{jwkset.UseSig, ""}, // never verify with "enc" keys
	})
	if err != nil {
		cancel()
		return nil, configErrorf("JWKS key function: %v", err)
	}
	s := &jwksSource{
		ctx:     ctx,
		cancel:  cancel,
		url:     rawURL,
		client:  &limited,
		timeout: timeout,
		store:   store,
		kf:      kf,
		limiter: rate.NewLimiter(rate.Every(unknownKIDRefreshEvery), 1),
	}

	ready := make(chan struct{})
	s.inflight = ready
	s.wg.Add(1)
	go s.load(ready)

	timer := time.NewTimer(initialFetchWait)
	defer timer.Stop()
	select {
	case <-ready:
	case <-timer.C:
	case <-ctx.Done():
	}
	return s, nil
}

// load performs the first fetch (jwkset does it inside NewStorageFromHTTP,
// which also starts the periodic refresh goroutine) and then publishes the
// unknown-kid refresher.
func (s *jwksSource) load(ready chan struct{}) {
	defer s.wg.Done()
	httpStore, err := jwkset.NewStorageFromHTTP(s.url, jwkset.HTTPClientStorageOptions{
		Client:                    s.client,
		Ctx:                       s.ctx,
		HTTPTimeout:               s.timeout,
		NoErrorReturnFirstHTTPReq: true, // a down endpoint is not a config error
		RefreshErrorHandler:       s.store.fetchFailed,
		RefreshInterval:           jwksRefreshInterval,
		Storage:                   s.store,
	})
	var refresher jwkset.Storage
	if err == nil {
		refresher, err = jwkset.NewHTTPClient(jwkset.HTTPClientOptions{
			HTTPURLs:          map[string]jwkset.Storage{s.url: httpStore},
			RateLimitWaitMax:  s.timeout, // bounds limiter wait + fetch
			RefreshUnknownKID: s.limiter,
		})
	}
	if err != nil { // not expected: the URL was validated by New
		s.store.fetchFailed(s.ctx, err)
	}
	s.mu.Lock()
	s.refresher = refresher
	s.inflight = nil
	s.mu.Unlock()
	close(ready)
}

// triggerRefresh starts a background refresh unless one is running, the
// rate limit is exhausted or the source is closed. It returns a channel
// closed when the refresh is over, or nil if none was started. It never
// blocks on the network.
func (s *jwksSource) triggerRefresh(kid string) <-chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed || s.ctx.Err() != nil || s.inflight != nil || s.refresher == nil {
		return nil
	}
	// Peek only: jwkset's RefreshUnknownKID limiter takes the token, at
	// once because one is available. inflight serializes refreshes, so
	// nothing else can take it in between.
	if s.limiter.Tokens() < 1 {
		return nil
	}
	done := make(chan struct{})
	s.inflight = done
	refresher := s.refresher
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		ctx, cancel := context.WithTimeout(s.ctx, s.timeout)
		// The kid is unknown, so the read makes jwkset refresh the set.
		_, _ = refresher.KeyRead(ctx, kid)
		cancel()
		s.mu.Lock()
		s.inflight = nil
		s.mu.Unlock()
		close(done)
	}()
	return done
}

// keyfunc resolves the verification key of t from the loaded JWKS. For an
// unknown kid (or no keys at all) it triggers a rate-limited background
// refresh and waits for it at most unknownKIDWait.
func (s *jwksSource) keyfunc(t *jwt.Token) (any, error) {
	kid, hasKID := "", false
	if raw, ok := t.Header[jwkset.HeaderKID]; ok {
		k, ok := raw.(string)
		if !ok {
			return nil, &keyError{"kid header is not a string"}
		}
		kid, hasKID = k, true
	}
	key, err := s.lookup(t, hasKID)
	if !errors.Is(err, errNeedRefresh) {
		return key, err
	}
	if done := s.triggerRefresh(kid); done != nil {
		timer := time.NewTimer(unknownKIDWait)
		defer timer.Stop()
		select {
		case <-done:
			key, err = s.lookup(t, hasKID)
			if !errors.Is(err, errNeedRefresh) {
				return key, err
			}
		case <-timer.C:
		}
	}
	return nil, s.missingKeyError(hasKID)
}

// lookup reads the key from memory; errNeedRefresh means it is not there.
// With a kid, keyfunc resolves it (checking the JWK's "alg" and "use").
// Without one, every signing key whose "alg" is unset or equal to the
// token's is tried; keyfunc would try every key, "enc" keys included.
func (s *jwksSource) lookup(t *jwt.Token, hasKID bool) (any, error) {
	if hasKID {
		key, err := s.kf.KeyfuncCtx(s.ctx)(t)
		switch {
		case errors.Is(err, jwkset.ErrKeyNotFound):
			return nil, errNeedRefresh
		case err != nil:
			return nil, &keyError{"the JWKS key for this kid does not allow this token's algorithm or is not a signing key"}
		}
		return key, nil
	}
	all, err := s.store.KeyReadAll(s.ctx)
	if err != nil || len(all) == 0 {
		return nil, errNeedRefresh
	}
	alg := t.Method.Alg()
	var set jwt.VerificationKeySet
	for _, j := range all {
		m := j.Marshal()
		if m.USE != jwkset.UseSig && m.USE != "" {
			continue
		}
		if a := m.ALG.String(); a != "" && a != alg {
			continue
		}
		key := j.Key()
		if pk, ok := key.(interface{ Public() crypto.PublicKey }); ok {
			key = pk.Public()
		}
		set.Keys = append(set.Keys, key)
	}
	if len(set.Keys) == 0 {
		return nil, &keyError{"no JWKS signing key allows this token's algorithm (and the token names no kid)"}
	}
	return set, nil
}

func (s *jwksSource) missingKeyError(hasKID bool) error {
	keys, _ := s.store.KeyReadAll(s.ctx)
	if len(keys) == 0 {
		reason := "no JWKS signing keys loaded yet"
		if d := s.store.lastErr.Load(); d != nil {
			reason += " (last fetch: " + *d + ")"
		}
		return &keyError{reason}
	}
	if hasKID {
		return &keyError{"unknown signing key id (kid); the JWKS is re-fetched for unknown kids at most once per minute"}
	}
	return &keyError{"no usable JWKS key for this token"}
}

func (s *jwksSource) close() {
	s.cancel()
	s.mu.Lock()
	s.closed = true
	s.mu.Unlock()
	s.wg.Wait()
}

// checkJWKSURL accepts https URLs and http URLs to loopback hosts. Errors
// do not echo the URL, which may carry credentials in its query.
func checkJWKSURL(raw string) error {
	u, err := url.ParseRequestURI(raw)
	if err != nil {
		return configErrorf("JWKSURL is not an absolute URL")
	}
	if u.User != nil {
		return configErrorf("JWKSURL must not contain user info")
	}
	host := u.Hostname()
	if host == "" {
		return configErrorf("JWKSURL has no host")
	}
	switch u.Scheme {
	case "https":
		return nil
	case "http":
		if isLoopback(host) {
			return nil
		}
		return configErrorf("JWKSURL must use https (http is allowed only for loopback hosts)")
	}
	return configErrorf("JWKSURL must use https (http is allowed only for loopback hosts)")
}

func isLoopback(host string) bool {
	if strings.EqualFold(host, "localhost") {
		return true
	}
	addr, err := netip.ParseAddr(host)
	return err == nil && addr.Unmap().IsLoopback()
}

// checkRedirect applies the JWKSURL rules to redirects (of any client).
func checkRedirect(req *http.Request, via []*http.Request) error {
	if len(via) >= maxRedirects {
		return errors.New("jwtauth: too many JWKS redirects")
	}
	if checkJWKSURL(req.URL.String()) != nil {
		return errors.New("jwtauth: JWKS redirect target must use https")
	}
	return nil
}

// limitTransport caps the size of JWKS response bodies.
type limitTransport struct{ base http.RoundTripper }

func (t limitTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	base := t.base
	if base == nil {
		base = http.DefaultTransport
	}
	resp, err := base.RoundTrip(req)
	if err != nil {
		return nil, err
	}
	resp.Body = &limitedBody{ReadCloser: resp.Body, left: maxJWKSBytes}
	return resp, nil
}

type limitedBody struct {
	io.ReadCloser
	left int64
}

func (b *limitedBody) Read(p []byte) (int, error) {
	if b.left <= 0 {
		var one [1]byte
		n, err := b.ReadCloser.Read(one[:])
		if n > 0 {
			return 0, errJWKSTooLarge
		}
		return 0, err
	}
	if int64(len(p)) > b.left {
		p = p[:b.left]
	}
	n, err := b.ReadCloser.Read(p)
	b.left -= int64(n)
	return n, err
}

// describeFetchError summarizes a JWKS fetch error without echoing the URL.
func describeFetchError(err error) string {
	var (
		syntaxErr *json.SyntaxError
		typeErr   *json.UnmarshalTypeError
		urlErr    *url.Error
	)
	switch {
	case errors.Is(err, errJWKSTooLarge):
		return fmt.Sprintf("response larger than %d bytes", maxJWKSBytes)
	case errors.Is(err, jwkset.ErrInvalidHTTPStatusCode):
		_, code, _ := strings.Cut(err.Error(), jwkset.ErrInvalidHTTPStatusCode.Error()+": ")
		if n, e := strconv.Atoi(code); e == nil {
			return "HTTP status " + strconv.Itoa(n)
		}
		return "unexpected HTTP status"
	case errors.Is(err, context.DeadlineExceeded):
		return "timed out"
	case errors.Is(err, context.Canceled):
		return "canceled"
	case errors.As(err, &urlErr):
		if urlErr.Timeout() {
			return "timed out"
		}
		return "request failed"
	case errors.As(err, &syntaxErr), errors.As(err, &typeErr), errors.Is(err, io.ErrUnexpectedEOF):
		return "response is not a JWKS JSON document"
	}
	return "invalid JWKS"
}
