package apikeys

import (
	"cmp"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/caddy-apikeys/caddy-apikeys/keystore"
)

// stores shares open stores between handler instances and across config
// reloads: on reload the new config provisions before the old one is
// cleaned up, so the Redis client or bbolt handle is reused, never reopened
// (a bbolt file cannot be opened twice).
var stores = caddy.NewUsagePool()

// pooledStore adapts a keystore.Store to caddy.Destructor. The store is
// always a *keystore.CachedStore around the Redis or bbolt store, so the
// cache (and its pub/sub subscription) lives as long as the store and is
// shared by every handler that uses the store, across reloads; so does
// the rate limiter on the store (see limiter.go), which keeps its state
// in the same Redis or bbolt file.
type pooledStore struct {
	keystore.Store
	lim limiterSlot
}

// cached returns the pooled store with its cache.
func (p *pooledStore) cached() *keystore.CachedStore { return p.Store.(*keystore.CachedStore) }

// Destruct closes the limiter (flushing its counts into the store's
// database) and then the store.
func (p *pooledStore) Destruct() error {
	lerr := p.lim.close()
	return errors.Join(lerr, p.Close())
}

// openStore opens the configured store with its cache, or takes it from the
// pool (and applies cacheOpts to its cache). With the file store and
// wantSecret set, it also returns the auto-generated secret kept beside the
// database file. noPubSub opens a Redis store whose cache neither publishes
// nor receives invalidations (a separate pool entry, since that is fixed
// when the cache is created).
func openStore(cfg *StoreConfig, repl *caddy.Replacer, wantSecret bool, cacheOpts keystore.CacheOptions, noPubSub bool) (*pooledStore, string, []byte, error) {
	newCached := func(inner keystore.Store, inval keystore.Invalidator) (caddy.Destructor, error) {
		opts := cacheOpts
		opts.Invalidator = inval
		c, err := keystore.NewCachedStore(inner, opts)
		if err != nil {
			_ = inner.Close()
			return nil, err
		}
		return &pooledStore{Store: c}, nil
	}
	// reuse applies cacheOpts to a store taken from the pool.
	reuse := func(v any, loaded bool, key string) (*pooledStore, error) {
		p := v.(*pooledStore)
		if loaded {
			if err := p.cached().Configure(cacheOpts); err != nil {
				_, _ = stores.Delete(key)
				return nil, fmt.Errorf("apikeys: cache: %w", err)
			}
		}
		return p, nil
	}
	switch cfg.Type {
	case "", "file":
		abs, err := storeFilePath(cfg, repl)
		if err != nil {
			return nil, "", nil, err
		}
		var secret []byte
		if wantSecret {
			if secret, err = loadOrCreateSecret(filepath.Join(filepath.Dir(abs), "secret")); err != nil {
				return nil, "", nil, err
			}
		}
		// One handle per file: the first config to open it sets retention.
		key := "file:" + abs
		v, loaded, err := stores.LoadOrNew(key, func() (caddy.Destructor, error) {
			s, err := keystore.NewBolt(keystore.BoltOptions{Path: abs, Retention: time.Duration(cfg.Retention)})
			if err != nil {
				return nil, err
			}
			// One process owns the file: its cache sees every write.
			return newCached(s, nil)
		})
		if err != nil {
			// The secret too: a caller that tolerates a locked file
			// (see startup.go) provisions on without the handle.
			return nil, "", secret, fmt.Errorf("apikeys: open store file %s: %w", abs, err)
		}
		c, err := reuse(v, loaded, key)
		return c, key, secret, err

	case "redis":
		routeRedisLogs.Do(func() { redis.SetLogger(redisLogger{}) })
		if wantSecret {
			return nil, "", nil, errors.New("apikeys: secret is required with the redis store (every node must derive the same digests); set it to a placeholder such as {env.APIKEYS_SECRET}")
		}
		if len(cfg.URLs) == 0 {
			return nil, "", nil, errors.New("apikeys: store redis needs at least one redis:// or rediss:// URL")
		}
		urls := make([]string, len(cfg.URLs))
		for i, u := range cfg.URLs {
			urls[i] = repl.ReplaceKnown(u, "")
			if urls[i] == "" {
				return nil, "", nil, fmt.Errorf("apikeys: store redis URL %d is empty after resolving placeholders", i+1)
			}
			if !keystore.IsSentinelURL(urls[i]) {
				if _, err := parseRedisURL(urls[i]); err != nil {
					return nil, "", nil, fmt.Errorf("apikeys: URL %d: %w", i+1, err)
				}
			}
		}
		// The pool key holds credentials; it never leaves this process.
		key := fmt.Sprintf("redis:%s|%d|%d|%d|%s", cfg.Namespace, cfg.Retention, cfg.WaitReplicas, cfg.WaitTimeout, strings.Join(urls, "|"))
		if noPubSub {
			key += "|nopubsub"
		}
		v, loaded, err := stores.LoadOrNew(key, func() (caddy.Destructor, error) {
			s, err := keystore.NewRedis(keystore.RedisOptions{URLs: urls, Namespace: cfg.Namespace, Retention: time.Duration(cfg.Retention),
				WaitReplicas: cfg.WaitReplicas, WaitTimeout: time.Duration(cfg.WaitTimeout)})
			if err != nil {
				return nil, err
			}
			var inval keystore.Invalidator
			if !noPubSub {
				inval = keystore.NewRedisInvalidator(s)
			}
			return newCached(s, inval)
		})
		if err != nil {
			// go-redis URL errors do not echo passwords, but say only which URL.
			return nil, "", nil, fmt.Errorf("apikeys: store redis: %w", err)
		}
		c, err := reuse(v, loaded, key)
		return c, key, nil, err

	default:
		return nil, "", nil, fmt.Errorf("apikeys: unknown store type %q (want file or redis)", cfg.Type)
	}
}

// storeFilePath is the absolute path of a file store's database.
func storeFilePath(cfg *StoreConfig, repl *caddy.Replacer) (string, error) {
	p := repl.ReplaceKnown(cfg.Path, "")
	if p == "" {
		p = filepath.Join(caddy.AppDataDir(), "apikeys", "keys.db")
	}
	abs, err := filepath.Abs(p)
	if err != nil {
		return "", fmt.Errorf("apikeys: store file path: %w", err)
	}
	return abs, nil
}

// cacheOptions turns the Cache config into keystore options.
func (h *Handler) cacheOptions() (keystore.CacheOptions, error) {
	opts := keystore.CacheOptions{
		StoreTimeout: h.storeTimeout,
		Observer:     newStoreObserver(h.logger),
	}
	c := h.Cache
	if c == nil {
		return opts, nil
	}
	if c.Size < 0 || c.TTL < 0 || c.Refresh < 0 || c.OutageWindow != nil && *c.OutageWindow < 0 {
		return opts, errors.New("apikeys: cache: size, ttl, refresh and outage_window must not be negative")
	}
	opts.Disabled = c.Disabled
	opts.Size = c.Size
	opts.TTL = time.Duration(c.TTL)
	opts.Refresh = time.Duration(c.Refresh)
	if c.OutageWindow != nil {
		opts.OutageWindow = time.Duration(*c.OutageWindow)
		if opts.OutageWindow == 0 {
			opts.OutageWindow = -1 // keystore: negative disables, zero is the default
		}
	}
	ttl := cmp.Or(opts.TTL, keystore.DefaultCacheTTL)
	if refresh := cmp.Or(opts.Refresh, min(keystore.DefaultCacheRefresh, ttl/2)); refresh >= ttl {
		return opts, fmt.Errorf("apikeys: cache: refresh (%s) must be less than ttl (%s)", refresh, ttl)
	}
	return opts, nil
}

// resolveSecret resolves placeholders in a configured secret. An empty
// configuration gives nil; a placeholder that resolves to nothing is an
// error, so a missing environment variable is noticed at startup.
func resolveSecret(repl *caddy.Replacer, name, configured string) ([]byte, error) {
	if configured == "" {
		return nil, nil
	}
	v, err := repl.ReplaceOrErr(configured, true, true)
	if err != nil {
		// The error names the placeholder, never its value.
		return nil, fmt.Errorf("apikeys: %s: %w", name, err)
	}
	if v == "" {
		return nil, fmt.Errorf("apikeys: %s is empty after resolving placeholders", name)
	}
	return []byte(strings.TrimRight(v, "\r\n")), nil
}

// loadOrCreateSecret reads the secret file at p, creating it with 32 random
// bytes (hex) on first use.
func loadOrCreateSecret(p string) ([]byte, error) {
	b, err := os.ReadFile(p)
	if err == nil {
		return []byte(strings.TrimSpace(string(b))), nil
	}
	if !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("apikeys: read generated secret: %w", err)
	}
	if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
		return nil, fmt.Errorf("apikeys: create data directory: %w", err)
	}
	raw := make([]byte, 32)
	if _, err := rand.Read(raw); err != nil {
		return nil, err
	}
	secret := []byte(hex.EncodeToString(raw))
	f, err := os.OpenFile(p, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if errors.Is(err, fs.ErrExist) { // another process won the race
		return loadOrCreateSecret(p)
	}
	if err != nil {
		return nil, fmt.Errorf("apikeys: create generated secret: %w", err)
	}
	if _, err := f.Write(append(secret, '\n')); err != nil {
		f.Close()
		return nil, fmt.Errorf("apikeys: write generated secret: %w", err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return nil, err
	}
	return secret, f.Close()
}

// routeRedisLogs makes go-redis log through Caddy once a Redis store is used.
var routeRedisLogs sync.Once

// redisLogger sends go-redis's own messages (dial failures, pool notes) to
// Caddy's log at Debug instead of stderr; the handler logs store failures
// itself, at Error, with context.
type redisLogger struct{}

func (redisLogger) Printf(_ context.Context, format string, v ...any) {
	if c := caddy.Log().Named("http.handlers.apikeys.redis").Check(zapcore.DebugLevel, "go-redis"); c != nil {
		c.Write(zap.String("message", fmt.Sprintf(format, v...)))
	}
}
