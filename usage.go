package apikeys

import (
	"context"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/caddy-apikeys/caddy-apikeys/keystore"
)

// DefaultLastUsedInterval is how often last-used times are written.
const DefaultLastUsedInterval = time.Minute

// usageRecorder coalesces last-used times: the guard notes them in memory
// and a background loop writes them once per interval, so a busy key costs
// one store write per interval however many requests it serves.
//
// The guard notes a use in the cached record itself (CachedKey.NoteUse: an
// atomic write, no lock), and the loop collects those from the cache
// (collect, CachedStore.CollectUses); touch, a lock and a map write, is for
// the uses the cache does not collect (CachedKey.UseCollected false: cache
// off, or a record that just left the cache).
type usageRecorder struct {
	store    keystore.Store
	collect  func(add func(id string, at time.Time)) // nil: only touch
	interval time.Duration
	logger   *zap.Logger

	mu      sync.Mutex
	pending map[string]time.Time

	stop chan struct{}
	done chan struct{}
	once sync.Once
}

func newUsageRecorder(store keystore.Store, collect func(func(string, time.Time)), interval time.Duration, logger *zap.Logger) *usageRecorder {
	u := &usageRecorder{store: store, collect: collect, interval: interval, logger: logger,
		pending: make(map[string]time.Time), stop: make(chan struct{}), done: make(chan struct{})}
	go u.loop()
	return u
}

// touch notes that key id was used at t. It never touches the store.
func (u *usageRecorder) touch(id string, t time.Time) {
	u.mu.Lock()
	if cur, ok := u.pending[id]; !ok || t.After(cur) {
		u.pending[id] = t
	}
	u.mu.Unlock()
}

func (u *usageRecorder) loop() {
	defer close(u.done)
	tick := time.NewTicker(u.interval)
	defer tick.Stop()
	for {
		select {
		case <-tick.C:
			u.flush()
		case <-u.stop:
			u.flush()
			return
		}
	}
}

// flush writes what was noted since the last flush. On failure the times
// are kept for the next flush, so nothing is lost to a store outage.
func (u *usageRecorder) flush() {
	u.mu.Lock()
	batch := u.pending
	u.pending = make(map[string]time.Time)
	u.mu.Unlock()
	if u.collect != nil {
		u.collect(func(id string, t time.Time) {
			if cur, ok := batch[id]; !ok || t.After(cur) {
				batch[id] = t
			}
		})
	}
	if len(batch) == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := u.store.RecordUsage(ctx, batch); err != nil {
		u.logger.Warn("writing last-used times failed; will retry", zap.Int("keys", len(batch)), zap.Error(err))
		for id, t := range batch {
			u.touch(id, t)
		}
	}
}

// close stops the loop after a last flush.
func (u *usageRecorder) close() {
	u.once.Do(func() { close(u.stop) })
	<-u.done
}
