package apikeys

// This file keeps one rate limiter per store, in the store's pool entry:
// Caddy provisions a new Handler on every config reload, and the limiter's
// state (buckets, counts not yet flushed) must outlive it, or every reload
// would reset every rate limit. The handler passes its own compiled
// Policy values on each call, so a reload that changes a plan's numbers
// applies to every key at once.

import (
	"errors"
	"fmt"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/caddy-apikeys/caddy-apikeys/keystore"
	"github.com/caddy-apikeys/caddy-apikeys/ratelimit"
)

// limiterSlot holds a store's limiter, created on first use by a config
// that has limited plans, and closed with the store.
type limiterSlot struct {
	mu  sync.Mutex
	lim *ratelimit.Limiter
}

// get returns the slot's limiter, creating it on the store's database
// (the Redis client and namespace, or the bbolt file) with clock now.
func (s *limiterSlot) get(store keystore.Store, now func() time.Time, logger *zap.Logger) (*ratelimit.Limiter, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.lim != nil {
		return s.lim, nil
	}
	backend, err := limiterBackend(store)
	if err != nil {
		return nil, err
	}
	lim, err := ratelimit.New(ratelimit.Options{Backend: backend, Now: now, Logger: logger})
	if err != nil {
		return nil, fmt.Errorf("apikeys: rate limiter: %w", err)
	}
	s.lim = lim
	return lim, nil
}

// close flushes and stops the limiter, if one was created.
func (s *limiterSlot) close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.lim == nil {
		return nil
	}
	err := s.lim.Close()
	s.lim = nil
	return err
}

// errNoLimiterBackend: package ratelimit has no backend for this store.
var errNoLimiterBackend = errors.New("apikeys: rate limiting is not available on this store")

// limiterBackend returns the ratelimit.Backend that keeps a store's
// metering state beside its keys: in the same Redis (under the store's
// namespace) or the same bbolt file.
func limiterBackend(store keystore.Store) (ratelimit.Backend, error) {
	if c, ok := store.(*keystore.CachedStore); ok {
		store = c.Inner()
	}
	switch s := store.(type) {
	case *keystore.BoltStore:
		b, err := ratelimit.NewBoltBackend(s.DB())
		if err != nil {
			return nil, fmt.Errorf("apikeys: rate limiter: %w", err)
		}
		return b, nil
	case *keystore.RedisStore:
		// Keys under the store's namespace (`<ns>:rl:…`), on its client.
		return ratelimit.NewRedisBackend(s.Client(), s.Namespace()), nil
	}
	return nil, fmt.Errorf("%w (%T)", errNoLimiterBackend, store)
}
