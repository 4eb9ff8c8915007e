package apikeys

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"go.uber.org/zap"

	"github.com/caddy-apikeys/caddy-apikeys/keystore"
	"github.com/caddy-apikeys/caddy-apikeys/secretscanning"
)

// Secret scanning actions.
const (
	LeakActionRevoke = "revoke"
	LeakActionReport = "report"
	// LeakActionDisable suspends a leaked key (PATCH `enabled: false`):
	// it is refused with 403 key_disabled until its owner enables it
	// again (after checking the leak) or revokes it.
	LeakActionDisable = "disable"
)

// Limits of the secret scanning endpoint.
const (
	// secretScanningPath is the endpoint, below the management path.
	secretScanningPath = "/secret-scanning"
	// maxReportBytes bounds a report's body.
	maxReportBytes = 4 << 20
	// maxReportTokens bounds the tokens of one report.
	maxReportTokens = 5000
	// leakWorkers is how many tokens of a report are looked up at once.
	leakWorkers = 8
)

// SecretScanning turns on the GitHub secret scanning partner endpoint,
// `POST <management_path>/secret-scanning`. GitHub calls it with the keys
// it found in public code, signed with its published key; each key of
// this gateway among them is revoked (or disabled, or only reported),
// logged at Info and emitted as the Caddy event `apikeys.leaked`.
type SecretScanning struct {
	// PublicKeys is where GitHub's public keys come from: a URL serving
	// GitHub's key list (https://api.github.com/meta/public_keys/secret_scanning),
	// or a file holding that JSON or PEM public keys. Placeholders are
	// resolved. Required.
	PublicKeys string `json:"public_keys"`
	// Action is what happens to a leaked key: "revoke", "disable" (the
	// owner can enable it again) or "report" (log and emit the event
	// only). Default: "revoke".
	Action string `json:"action,omitempty"`
	// Refresh is how often the key list is reloaded. Default: 1h.
	Refresh caddy.Duration `json:"refresh,omitempty"`

	verifier *secretscanning.Verifier
}

// provisionSecretScanning loads GitHub's key list and keeps it fresh for
// as long as the config runs.
func (h *Handler) provisionSecretScanning(ctx caddy.Context) error {
	ss := h.SecretScanning
	if ss == nil {
		return nil
	}
	switch ss.Action {
	case "":
		ss.Action = LeakActionRevoke
	case LeakActionRevoke, LeakActionDisable, LeakActionReport:
	default:
		return fmt.Errorf("apikeys: secret_scanning action must be revoke, disable or report, got %q", ss.Action)
	}
	if ss.Refresh < 0 {
		return errors.New("apikeys: secret_scanning refresh must not be negative")
	}
	src := caddy.NewReplacer().ReplaceKnown(ss.PublicKeys, "")
	logger := h.logger.Named("secret_scanning")
	v, err := secretscanning.New(ctx, secretscanning.Options{
		Source:  src,
		Refresh: time.Duration(ss.Refresh),
		OnError: func(err error) {
			logger.Error("loading GitHub's secret scanning public keys failed; the keys loaded before stay in use", zap.Error(err))
		},
	})
	if err != nil {
		return fmt.Errorf("apikeys: secret_scanning: %w", err)
	}
	ss.verifier = v
	go v.Run(ctx) // until the config is unloaded
	return nil
}

// isSecretScanningPath reports whether p is the secret scanning endpoint
// and it is turned on.
func (h *Handler) isSecretScanningPath(p string) bool {
	return h.SecretScanning != nil && h.SecretScanning.verifier != nil &&
		len(p) == len(h.ManagementPath)+len(secretScanningPath) &&
		strings.HasPrefix(p, h.ManagementPath) && strings.HasSuffix(p, secretScanningPath)
}

// serveSecretScanning answers a report from GitHub's secret scanning. It
// takes no credential but GitHub's signature over the body: no dashboard
// session, no API key.
func (h *Handler) serveSecretScanning(w http.ResponseWriter, r *http.Request) error {
	if r.Method != http.MethodPost {
		w.Header().Set("Allow", http.MethodPost)
		return writeError(w, &apiError{status: http.StatusMethodNotAllowed, code: "method_not_allowed",
			message: "This endpoint allows POST."})
	}
	tooLarge := &apiError{status: http.StatusRequestEntityTooLarge, code: "payload_too_large",
		message: fmt.Sprintf("The report is larger than %d MiB.", maxReportBytes>>20)}
	if r.ContentLength > maxReportBytes {
		return writeError(w, tooLarge)
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxReportBytes))
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return writeError(w, tooLarge)
		}
		return writeError(w, &apiError{status: http.StatusBadRequest, code: "invalid_request",
			message: "The request body could not be read."})
	}
	ss := h.SecretScanning
	err = ss.verifier.Verify(r.Context(), r.Header.Get(secretscanning.HeaderKeyIdentifier),
		r.Header.Get(secretscanning.HeaderSignature), body)
	switch {
	case errors.Is(err, secretscanning.ErrNoKeys):
		return writeError(w, &apiError{status: http.StatusServiceUnavailable, code: "key_list_unavailable",
			message: "GitHub's public keys could not be loaded yet, so the report cannot be verified; retry later.",
			header:  http.Header{"Retry-After": {"60"}}})
	case err != nil:
		h.logger.Warn("secret scanning report refused", zap.String("reason", strings.TrimPrefix(err.Error(), "secretscanning: ")),
			zap.String("remote_ip", r.RemoteAddr))
		return writeError(w, &apiError{status: http.StatusUnauthorized, code: "invalid_signature",
			message: "The report must be signed by GitHub: send the Github-Public-Key-Identifier and Github-Public-Key-Signature headers of a published key."})
	}
	matches, err := secretscanning.ParseReport(body, maxReportTokens)
	switch {
	case errors.Is(err, secretscanning.ErrTooManyMatches):
		return writeError(w, &apiError{status: http.StatusRequestEntityTooLarge, code: "too_many_tokens",
			message: fmt.Sprintf("A report may hold at most %d tokens.", maxReportTokens)})
	case err != nil:
		return writeError(w, &apiError{status: http.StatusBadRequest, code: "invalid_request",
			message: "The report must be a JSON array of {token, type, url, source} objects."})
	}
	feedback, aerr := h.handleLeaks(r, matches)
	if aerr != nil {
		return writeError(w, aerr)
	}
	out, err := marshalJSON(feedback)
	if err != nil {
		return err
	}
	w.Header().Set("Cache-Control", "no-store")
	writeRaw(w, http.StatusOK, out)
	return nil
}

// leakResult is what became of one distinct token of a report.
type leakResult struct {
	key        *keystore.Key // nil: not a key of this gateway
	wasRevoked bool          // revoked before this report
	changed    bool          // this report revoked or disabled it
	err        error         // the store failed
}

// handleLeaks looks every token up and applies the configured action to
// the keys found, then logs and emits them. A store failure answers 503
// (GitHub retries; what was already revoked stays revoked).
func (h *Handler) handleLeaks(r *http.Request, matches []secretscanning.Match) ([]secretscanning.Feedback, *apiError) {
	// Distinct tokens that can be keys, each looked up once.
	results := make(map[string]*leakResult, len(matches))
	var work []string
	for _, m := range matches {
		if _, seen := results[m.Token]; seen {
			continue
		}
		res := &leakResult{}
		results[m.Token] = res
		if keystore.Check(h.KeyPrefix, m.Token) == nil {
			work = append(work, m.Token)
		}
	}
	action := h.SecretScanning.Action
	at := h.now().UTC().Truncate(time.Millisecond)
	next := make(chan string)
	var wg sync.WaitGroup
	for range min(leakWorkers, len(work)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for token := range next {
				h.handleLeak(r.Context(), token, results[token], action, at)
			}
		}()
	}
	for _, token := range work {
		next <- token
	}
	close(next)
	wg.Wait()

	feedback := make([]secretscanning.Feedback, len(matches))
	reported := make(map[string]bool, len(results))
	for i, m := range matches {
		res := results[m.Token]
		if res.err != nil {
			h.logger.Error("secret scanning: key store lookup failed", zap.Error(res.err))
			return nil, errStoreUnavailable
		}
		label := secretscanning.FalsePositive
		if res.key != nil {
			label = secretscanning.TruePositive
		}
		feedback[i] = secretscanning.Feedback{TokenHash: secretscanning.TokenHash(m.Token), TokenType: m.Type, Label: label}
		if res.key != nil && !reported[m.Token] {
			reported[m.Token] = true
			h.reportLeak(res, m)
		}
	}
	return feedback, nil
}

// handleLeak looks one well-formed token up (under every secret) and, if
// it is a key, applies action to it: revoke, or disable (a revoked or
// expired key is left as it is).
func (h *Handler) handleLeak(ctx context.Context, token string, res *leakResult, action string, at time.Time) {
	hashers := append([]*keystore.Hasher{h.hasher}, h.oldHashers...)
	for _, hs := range hashers {
		sctx, cancel := context.WithTimeout(ctx, h.storeTimeout)
		k, err := h.store.ByDigest(sctx, hs.Digest(token))
		cancel()
		if errors.Is(err, keystore.ErrNotFound) {
			continue
		}
		if err != nil {
			res.err = err
			return
		}
		res.key, res.wasRevoked = k, k.RevokedAt != nil && !at.Before(*k.RevokedAt)
		break
	}
	if res.key == nil || action == LeakActionReport || res.wasRevoked {
		return
	}
	sctx, cancel := context.WithTimeout(ctx, h.storeTimeout)
	defer cancel()
	var k *keystore.Key
	var err error
	if action == LeakActionDisable {
		var changed bool
		k, err = h.store.Update(sctx, res.key.ID, func(k *keystore.Key) error {
			changed = k.Active(at) && !k.Disabled
			if changed {
				k.Disabled = true
			}
			return nil
		})
		res.changed = err == nil && changed
	} else {
		k, err = h.store.Revoke(sctx, res.key.ID, at)
		res.changed = err == nil && k.RevokedAt != nil && k.RevokedAt.Equal(at)
	}
	switch {
	case errors.Is(err, keystore.ErrNotFound): // deleted meanwhile by retention
	case err != nil:
		res.err = err
	default:
		res.key = k
	}
}

// reportLeak logs a leaked key at Info and emits `apikeys.leaked` (and
// `apikeys.revoked` when this report revoked it), with the key's ID and
// owner, never the token.
func (h *Handler) reportLeak(res *leakResult, m secretscanning.Match) {
	k := res.key
	action := h.SecretScanning.Action
	switch {
	case action == LeakActionReport:
	case res.wasRevoked:
		action = "none (already revoked)"
	case !res.changed && action == LeakActionDisable:
		action = "none (already disabled or ended)"
	case !res.changed:
		action = "none (already ended)"
	}
	h.logger.Info("api key leaked", zap.String("key_id", k.ID), zap.String("owner", k.Owner),
		zap.String("url", m.URL), zap.String("source", m.Source), zap.String("type", m.Type),
		zap.String("action", action))
	if h.events != nil {
		h.events.Emit(h.ctx, "apikeys.leaked", map[string]any{"key_id": k.ID, "owner": k.Owner,
			"url": m.URL, "source": m.Source, "type": m.Type, "action": action})
	}
	switch {
	case !res.changed:
	case h.SecretScanning.Action == LeakActionRevoke:
		h.audit("revoked", k, zap.String("reason", "leaked"))
	case h.SecretScanning.Action == LeakActionDisable:
		h.audit("disabled", k, zap.String("reason", "leaked"))
	}
}

// unmarshalSecretScanning reads
//
//	secret_scanning [<public_keys>] {
//		public_keys <url|file>
//		action revoke|disable|report
//		refresh <duration>
//	}
func (h *Handler) unmarshalSecretScanning(d *caddyfile.Dispenser) error {
	if h.SecretScanning != nil {
		return d.Err("secret_scanning may be given only once")
	}
	ss := new(SecretScanning)
	h.SecretScanning = ss
	if d.NextArg() {
		ss.PublicKeys = d.Val()
		if d.NextArg() {
			return d.ArgErr()
		}
	}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		var err error
		switch d.Val() {
		case "public_keys":
			err = singleArg(d, &ss.PublicKeys)
		case "action":
			err = singleArg(d, &ss.Action)
			if err == nil && ss.Action != LeakActionRevoke && ss.Action != LeakActionDisable && ss.Action != LeakActionReport {
				return d.Errf("secret_scanning action must be revoke, disable or report, got %q", ss.Action)
			}
		case "refresh":
			err = durationArg(d, &ss.Refresh)
		default:
			err = d.Errf("unrecognized secret_scanning option %q", d.Val())
		}
		if err != nil {
			return err
		}
	}
	if ss.PublicKeys == "" {
		return d.Err("secret_scanning needs public_keys: https://api.github.com/meta/public_keys/secret_scanning or a file of PEM keys")
	}
	return nil
}
