package apikeys

import (
	"context"
	"errors"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
	berrors "go.etcd.io/bbolt/errors"
	"go.uber.org/zap"

	"github.com/caddy-apikeys/caddy-apikeys/keystore"
)

// This file holds what happens between provisioning and serving: the
// `apikeys` app, which makes a store file held by another process fail
// `caddy run` but not `caddy validate`, and the start-up check of the
// store.
//
// `caddy validate` (and `caddy adapt --validate`) provision a config and
// clean it up without starting its apps; `caddy run` and reloads start
// them. Caddy's own http app follows that split: listeners are bound in
// Start, so validating a config never conflicts with the Caddy that
// serves it. A bbolt file is like a listener, one process at a time, but
// the handler needs its store while provisioning (the cache, the
// auto-generated secret beside the file). So a handler provisions with the
// file when it can, and when another process holds it, with a stand-in
// store that answers every call with that error; the handler registers the
// error with the app, whose Start fails: `caddy run` still refuses to start
// on a file another Caddy holds, while `caddy validate` reports it as a
// warning. Reloads within one process reuse the open handle (see stores)
// and never meet the lock.

func init() {
	caddy.RegisterModule(new(App))
}

// App is the `apikeys` Caddy app. It has no configuration: handlers load it
// to report a key store they could not open while provisioning, and its
// Start fails with that error, so the config does not run.
type App struct {
	mu      sync.Mutex
	blocked []error
}

// CaddyModule returns the Caddy module information.
func (*App) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "apikeys",
		New: func() caddy.Module { return new(App) },
	}
}

// block records a store that could not be opened, for Start to report.
func (a *App) block(err error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.blocked = append(a.blocked, err)
}

// Start fails if a handler of this config could not open its store.
func (a *App) Start() error {
	a.mu.Lock()
	defer a.mu.Unlock()
	return errors.Join(a.blocked...)
}

// Stop does nothing.
func (a *App) Stop() error { return nil }

// isLocked reports whether err is a bbolt file held by another process.
func isLocked(err error) bool { return errors.Is(err, berrors.ErrTimeout) }

// pingedStores holds the pool keys of the stores checkStoreAtStart has
// pinged in this process.
var pingedStores sync.Map

// checkStoreAtStart pings the store once, bounded by store_timeout, and logs
// a warning when it does not answer: Caddy starts anyway (keys the cache
// knows keep working, the rest get 503 until the store answers), so the
// warning is how an operator, or `caddy validate`, hears of it.
func (h *Handler) checkStoreAtStart(kind string) {
	ctx, cancel := context.WithTimeout(context.Background(), h.storeTimeout)
	defer cancel()
	if err := h.store.Ping(ctx); err != nil {
		h.logger.Warn("key store unreachable at start: guarded requests with keys not yet cached and every key-management request get 503 store_unavailable until it answers",
			zap.String("store", kind), zap.Error(err))
	}
}

// unavailableStore stands in for a store that could not be opened: every
// call fails with err (and the guard answers 503, as during an outage).
type unavailableStore struct{ err error }

var _ keystore.Store = unavailableStore{}

func (s unavailableStore) Create(context.Context, *keystore.Key) error { return s.err }
func (s unavailableStore) CreateLimited(context.Context, *keystore.Key, int, time.Time) error {
	return s.err
}
func (s unavailableStore) CountLive(context.Context, string, time.Time) (int, error) { return 0, s.err }
func (s unavailableStore) ByDigest(context.Context, keystore.Digest) (*keystore.Key, error) {
	return nil, s.err
}
func (s unavailableStore) Get(context.Context, string) (*keystore.Key, error) { return nil, s.err }
func (s unavailableStore) List(context.Context, string, string, int) ([]*keystore.Key, string, error) {
	return nil, "", s.err
}
func (s unavailableStore) Revoke(context.Context, string, time.Time) (*keystore.Key, error) {
	return nil, s.err
}
func (s unavailableStore) Update(context.Context, string, func(*keystore.Key) error) (*keystore.Key, error) {
	return nil, s.err
}
func (s unavailableStore) RecordUsage(context.Context, map[string]time.Time) error { return s.err }
func (s unavailableStore) CountOwner(context.Context, string) (int, error)         { return 0, s.err }
func (s unavailableStore) ReserveIdempotency(context.Context, string, *keystore.IdempotencyRecord, time.Duration) (*keystore.IdempotencyRecord, error) {
	return nil, s.err
}
func (s unavailableStore) GetIdempotency(context.Context, string) (*keystore.IdempotencyRecord, error) {
	return nil, s.err
}
func (s unavailableStore) ReplaceIdempotency(context.Context, string, string, *keystore.IdempotencyRecord, time.Duration) error {
	return s.err
}
func (s unavailableStore) DeleteIdempotency(context.Context, string, string) error { return s.err }
func (s unavailableStore) Ping(context.Context) error                              { return s.err }
func (s unavailableStore) Close() error                                            { return nil }

// Interface guards.
var (
	_ caddy.App    = (*App)(nil)
	_ caddy.Module = (*App)(nil)
)
