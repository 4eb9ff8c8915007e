package apikeys

import (
	"time"

	"go.uber.org/zap"

	"github.com/caddy-apikeys/caddy-apikeys/keystore"
)

// storeObserver receives what the cached store does (keystore.CacheObserver)
// and logs what an operator must know.
type storeObserver struct {
	logger *zap.Logger
}

func newStoreObserver(logger *zap.Logger) *storeObserver {
	return &storeObserver{logger: logger}
}

func (o *storeObserver) CacheLookup(keystore.LookupResult)      {}
func (o *storeObserver) StoreCall(string, time.Duration, error) {}
func (o *storeObserver) Invalidated(string)                     {}
func (o *storeObserver) KeyMinted()                             {}
func (o *storeObserver) KeyRevoked()                            {}

func (o *storeObserver) StoreHealth(up bool, err error) {
	if up {
		o.logger.Info("key store reachable again")
		return
	}
	o.logger.Warn("key store unreachable: keys validated recently keep working for the cache's outage_window; others get 503 until it answers", zap.Error(err))
}

func (o *storeObserver) Error(msg string, err error) {
	o.logger.Error(msg, zap.Error(err))
}

var _ keystore.CacheObserver = (*storeObserver)(nil)
