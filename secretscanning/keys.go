package secretscanning

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Defaults of [Options].
const (
	// DefaultRefresh is how often the key list is fetched again in the
	// background.
	DefaultRefresh = time.Hour
	// DefaultMinRefetch is the least time between two fetches that an
	// unknown key identifier triggers.
	DefaultMinRefetch = time.Minute
	// DefaultFetchTimeout bounds one fetch of the key list.
	DefaultFetchTimeout = 10 * time.Second
	// MaxKeyListBytes is the largest key list read.
	MaxKeyListBytes = 1 << 20
	// maxIdentifierLen bounds the identifier header; GitHub's are 64 hex.
	maxIdentifierLen = 128
	// maxSignatureLen bounds the signature header; a P-256 ASN.1
	// signature is at most 72 bytes, 96 in base64.
	maxSignatureLen = 256
)

// Errors of [Verifier.Verify]. All but ErrNoKeys mean the report must be
// refused as not coming from GitHub.
var (
	// ErrMissingSignature means a signature header is absent or empty.
	ErrMissingSignature = errors.New("secretscanning: missing signature headers")
	// ErrUnknownKey means no published key has the identifier, even after
	// a refresh of the key list.
	ErrUnknownKey = errors.New("secretscanning: unknown public key identifier")
	// ErrBadSignature means the signature is not valid base64 ASN.1 DER or
	// does not verify over the body with the identified key.
	ErrBadSignature = errors.New("secretscanning: signature does not verify")
	// ErrNoKeys means no key list could be loaded yet: nothing can be
	// verified until a fetch succeeds.
	ErrNoKeys = errors.New("secretscanning: no public key list loaded")
)

// Options configures a [Verifier].
type Options struct {
	// Source is where the keys come from: an https:// URL serving GitHub's
	// key list format (http:// only for a loopback host), or a file
	// holding either that JSON or one or more PEM public keys. Keys from
	// a PEM file are pinned: a signature that verifies with any of them
	// is accepted, whatever identifier the request names.
	Source string
	// Client fetches URL sources. Default: a client with no timeout of
	// its own (each fetch is bounded by FetchTimeout).
	Client *http.Client
	// Refresh is how often Run reloads the source. Default: DefaultRefresh.
	Refresh time.Duration
	// MinRefetch is the least time between reloads triggered by an
	// unknown key identifier. Default: DefaultMinRefetch.
	MinRefetch time.Duration
	// FetchTimeout bounds one reload. Default: DefaultFetchTimeout.
	FetchTimeout time.Duration
	// OnError, if set, is told of reloads that failed (the keys loaded
	// before stay in use). Errors never hold key material.
	OnError func(error)
	// Now is the clock. Default: time.Now.
	Now func() time.Time
}

// keySet is one loaded key list.
type keySet struct {
	byID   map[string]*ecdsa.PublicKey
	pinned []*ecdsa.PublicKey // from a PEM file: match any identifier
}

func (s *keySet) empty() bool { return s == nil || len(s.byID) == 0 && len(s.pinned) == 0 }

// Verifier checks report signatures against GitHub's published keys, kept
// fresh in the background and reloaded (at most once per MinRefetch) when
// a report names an identifier it does not know. It is safe for
// concurrent use.
type Verifier struct {
	opts  Options
	isURL bool
	keys  atomic.Pointer[keySet]

	fetchMu      sync.Mutex // one reload at a time
	lastOnDemand time.Time  // last reload for an unknown identifier; guarded by fetchMu
	etag         string     // guarded by fetchMu
	fetches      atomic.Int64
}

// New returns a Verifier for opts.Source after one attempt to load it. A
// file that cannot be read or holds no usable key is an error. A URL that
// cannot be fetched is not (the service may be briefly down): the error is
// passed to OnError, and reports are answered with ErrNoKeys until a later
// reload succeeds.
func New(ctx context.Context, opts Options) (*Verifier, error) {
	if opts.Refresh <= 0 {
		opts.Refresh = DefaultRefresh
	}
	if opts.MinRefetch <= 0 {
		opts.MinRefetch = DefaultMinRefetch
	}
	if opts.FetchTimeout <= 0 {
		opts.FetchTimeout = DefaultFetchTimeout
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.Client == nil {
		opts.Client = &http.Client{}
	}
	// A redirect must obey the rule the source itself does (https, or
	// plain http to loopback only), or a source could hand the fetch on
	// to anywhere. The caller's client is copied, not changed.
	client := *opts.Client
	client.CheckRedirect = func(req *http.Request, via []*http.Request) error {
		if len(via) >= 10 {
			return errors.New("secretscanning: stopped after 10 redirects")
		}
		if _, err := checkSource(req.URL.String()); err != nil {
			return fmt.Errorf("secretscanning: redirect refused: %w", err)
		}
		if via[0].URL.Scheme == "https" && req.URL.Scheme != "https" {
			return errors.New("secretscanning: redirect refused: from https to plain http")
		}
		return nil
	}
	opts.Client = &client
	v := &Verifier{opts: opts}
	isURL, err := checkSource(opts.Source)
	if err != nil {
		return nil, err
	}
	v.isURL = isURL
	v.fetchMu.Lock()
	err = v.reloadLocked(ctx)
	v.fetchMu.Unlock()
	if err != nil {
		if !isURL {
			return nil, err
		}
		v.report(err)
	}
	return v, nil
}

// checkSource says whether src is a URL, and refuses plain-HTTP URLs to
// hosts other than loopback ones.
func checkSource(src string) (isURL bool, err error) {
	if src == "" {
		return false, errors.New("secretscanning: no public key source")
	}
	if !strings.Contains(src, "://") {
		return false, nil
	}
	u, err := url.Parse(src)
	if err != nil {
		return false, fmt.Errorf("secretscanning: public key source is not a valid URL: %w", err)
	}
	switch u.Scheme {
	case "https":
	case "http":
		if h := u.Hostname(); h != "localhost" && h != "127.0.0.1" && h != "::1" {
			return false, errors.New("secretscanning: a public key URL must use https (plain http only to localhost)")
		}
	default:
		return false, fmt.Errorf("secretscanning: public key URL scheme must be https, got %q", u.Scheme)
	}
	return true, nil
}

// Run reloads the key list every Refresh until ctx is done.
func (v *Verifier) Run(ctx context.Context) {
	t := time.NewTicker(v.opts.Refresh)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			v.fetchMu.Lock()
			err := v.reloadLocked(ctx)
			v.fetchMu.Unlock()
			if err != nil {
				v.report(err)
			}
		}
	}
}

// Fetches reports how many times the source was loaded (for tests and
// metrics).
func (v *Verifier) Fetches() int64 { return v.fetches.Load() }

// Verify checks that signature (base64 of an ASN.1 DER ECDSA signature)
// is the signature over body, with SHA-256, by the published key named
// keyID. An unknown keyID reloads the key list once, unless a reload was
// attempted less than MinRefetch ago.
func (v *Verifier) Verify(ctx context.Context, keyID, signature string, body []byte) error {
	if keyID == "" || signature == "" {
		return ErrMissingSignature
	}
	if len(keyID) > maxIdentifierLen || len(signature) > maxSignatureLen || !printable(keyID) {
		return ErrBadSignature
	}
	sig, err := base64.StdEncoding.DecodeString(signature)
	if err != nil {
		return ErrBadSignature
	}
	digest := sha256.Sum256(body)
	set := v.keys.Load()
	candidates := set.candidates(keyID)
	if len(candidates) == 0 {
		set = v.reloadForUnknown(ctx, keyID)
		if set.empty() {
			return ErrNoKeys
		}
		if candidates = set.candidates(keyID); len(candidates) == 0 {
			return ErrUnknownKey
		}
	}
	for _, pub := range candidates {
		if ecdsa.VerifyASN1(pub, digest[:], sig) {
			return nil
		}
	}
	return ErrBadSignature
}

// candidates are the keys a signature under keyID may verify with.
func (s *keySet) candidates(keyID string) []*ecdsa.PublicKey {
	if s == nil {
		return nil
	}
	if k, ok := s.byID[keyID]; ok {
		return []*ecdsa.PublicKey{k}
	}
	return s.pinned
}

// reloadForUnknown reloads the key list for an identifier not in it, at
// most once per MinRefetch across all callers, and returns the set to use.
func (v *Verifier) reloadForUnknown(ctx context.Context, keyID string) *keySet {
	v.fetchMu.Lock()
	defer v.fetchMu.Unlock()
	if set := v.keys.Load(); len(set.candidates(keyID)) > 0 {
		return set // another caller's reload brought it
	}
	now := v.opts.Now()
	if !v.lastOnDemand.IsZero() && now.Sub(v.lastOnDemand) < v.opts.MinRefetch {
		return v.keys.Load()
	}
	v.lastOnDemand = now
	// The reload outlives the request that asked for it: a caller that
	// hangs up must not cancel the one reload allowed per MinRefetch
	// (reloadLocked bounds it with FetchTimeout).
	if err := v.reloadLocked(context.WithoutCancel(ctx)); err != nil {
		v.report(err)
	}
	return v.keys.Load()
}

// reloadLocked loads the source and, on success, swaps the key set in.
// The caller holds fetchMu.
func (v *Verifier) reloadLocked(ctx context.Context) error {
	v.fetches.Add(1)
	ctx, cancel := context.WithTimeout(ctx, v.opts.FetchTimeout)
	defer cancel()
	var (
		set *keySet
		err error
	)
	if v.isURL {
		set, err = v.fetchURL(ctx)
	} else {
		set, err = loadFile(v.opts.Source)
	}
	if err != nil || set == nil { // nil: not modified
		return err
	}
	v.keys.Store(set)
	return nil
}

// fetchURL GETs the key list, conditionally when an ETag is known (GitHub
// does not count a 304 against its rate limit). A nil set with a nil
// error means "not modified".
func (v *Verifier) fetchURL(ctx context.Context) (*keySet, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, v.opts.Source, nil)
	if err != nil {
		return nil, fmt.Errorf("secretscanning: key list request: %w", err)
	}
	req.Header.Set("Accept", "application/json")
	if v.etag != "" && !v.keys.Load().empty() {
		req.Header.Set("If-None-Match", v.etag)
	}
	resp, err := v.opts.Client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("secretscanning: fetching the key list: %w", err)
	}
	defer resp.Body.Close()
	switch resp.StatusCode {
	case http.StatusOK:
	case http.StatusNotModified:
		return nil, nil
	default:
		return nil, fmt.Errorf("secretscanning: fetching the key list: status %d", resp.StatusCode)
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, MaxKeyListBytes+1))
	if err != nil {
		return nil, fmt.Errorf("secretscanning: reading the key list: %w", err)
	}
	if len(body) > MaxKeyListBytes {
		return nil, fmt.Errorf("secretscanning: the key list is larger than %d bytes", MaxKeyListBytes)
	}
	set, err := parseKeyList(body)
	if err != nil {
		return nil, err
	}
	v.etag = resp.Header.Get("ETag")
	return set, nil
}

// loadFile reads a key file: GitHub's JSON key list, or PEM public keys.
func loadFile(path string) (*keySet, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("secretscanning: reading the key file: %w", err)
	}
	if len(b) > MaxKeyListBytes {
		return nil, fmt.Errorf("secretscanning: the key file is larger than %d bytes", MaxKeyListBytes)
	}
	if t := strings.TrimSpace(string(b)); strings.HasPrefix(t, "{") {
		return parseKeyList(b)
	}
	set := &keySet{}
	for rest := b; ; {
		var block *pem.Block
		block, rest = pem.Decode(rest)
		if block == nil {
			break
		}
		if block.Type != "PUBLIC KEY" {
			continue
		}
		pub, err := parseP256(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("secretscanning: key file %s: %w", path, err)
		}
		set.pinned = append(set.pinned, pub)
	}
	if set.empty() {
		return nil, fmt.Errorf("secretscanning: key file %s holds no PEM public key nor a JSON key list", path)
	}
	return set, nil
}

// keyList is GitHub's key list format.
type keyList struct {
	PublicKeys []struct {
		KeyIdentifier string `json:"key_identifier"`
		Key           string `json:"key"`
		IsCurrent     bool   `json:"is_current"`
	} `json:"public_keys"`
}

// parseKeyList reads GitHub's key list. Keys that are not ECDSA P-256 are
// skipped; a list without any usable key is an error.
func parseKeyList(b []byte) (*keySet, error) {
	var list keyList
	if err := json.Unmarshal(b, &list); err != nil {
		return nil, fmt.Errorf("secretscanning: the key list is not GitHub's JSON format: %w", err)
	}
	set := &keySet{byID: make(map[string]*ecdsa.PublicKey, len(list.PublicKeys))}
	var skipped []string
	for _, k := range list.PublicKeys {
		block, _ := pem.Decode([]byte(k.Key))
		if k.KeyIdentifier == "" || block == nil {
			skipped = append(skipped, k.KeyIdentifier)
			continue
		}
		pub, err := parseP256(block.Bytes)
		if err != nil {
			skipped = append(skipped, k.KeyIdentifier)
			continue
		}
		set.byID[k.KeyIdentifier] = pub
	}
	if set.empty() {
		return nil, fmt.Errorf("secretscanning: the key list holds no usable ECDSA P-256 key (skipped %q)", skipped)
	}
	return set, nil
}

// parseP256 parses a DER SubjectPublicKeyInfo holding an ECDSA P-256 key.
func parseP256(der []byte) (*ecdsa.PublicKey, error) {
	k, err := x509.ParsePKIXPublicKey(der)
	if err != nil {
		return nil, fmt.Errorf("not a public key: %w", err)
	}
	pub, ok := k.(*ecdsa.PublicKey)
	if !ok || pub.Curve != elliptic.P256() {
		return nil, errors.New("not an ECDSA P-256 public key")
	}
	return pub, nil
}

// KeyIdentifier returns the lowercase hex SHA-256 of a public key's DER
// SubjectPublicKeyInfo: a stable name for a key, as GitHub's look.
func KeyIdentifier(pub *ecdsa.PublicKey) (string, error) {
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return "", err
	}
	sum := sha256.Sum256(der)
	return hex.EncodeToString(sum[:]), nil
}

func (v *Verifier) report(err error) {
	if v.opts.OnError != nil {
		v.opts.OnError(err)
	}
}

func printable(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] < 0x21 || s[i] > 0x7e {
			return false
		}
	}
	return true
}
