package apikeys

import (
	"context"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/caddy-apikeys/caddy-apikeys/keystore"
)

// countingStore counts RecordUsage calls on a real store.
type countingStore struct {
	keystore.Store
	writes atomic.Int64
	mu     sync.Mutex
	perKey map[string]int
}

func (c *countingStore) RecordUsage(ctx context.Context, used map[string]time.Time) error {
	c.writes.Add(1)
	c.mu.Lock()
	for id := range used {
		c.perKey[id]++
	}
	c.mu.Unlock()
	return c.Store.RecordUsage(ctx, used)
}

// TestUsageCoalescing: a key used thousands of times is written at most
// once per interval, and pending times are flushed on close.
func TestUsageCoalescing(t *testing.T) {
	bolt, err := keystore.NewBolt(keystore.BoltOptions{Path: filepath.Join(t.TempDir(), "k.db")})
	if err != nil {
		t.Fatal(err)
	}
	defer bolt.Close()
	store := &countingStore{Store: bolt, perKey: map[string]int{}}
	key := storeKeyDirectly(t, store, "alice", time.Now().Add(time.Hour))
	hasher, _ := keystore.NewHasher([]byte(testSecret))
	ctx := context.Background()
	k, err := store.ByDigest(ctx, hasher.Digest(key))
	if err != nil {
		t.Fatal(err)
	}

	const interval = 100 * time.Millisecond
	u := newUsageRecorder(store, nil, interval, zap.NewNop())
	start := time.Now()
	var last time.Time
	for time.Since(start) < 550*time.Millisecond {
		last = time.Now()
		u.touch(k.ID, last)
	}
	u.close()
	elapsed := time.Since(start)
	maxWrites := int(elapsed/interval) + 2 // ticks plus the final flush
	if got := store.perKey[k.ID]; got < 2 || got > maxWrites {
		t.Errorf("%d writes for one key in %v, want 2..%d", got, elapsed, maxWrites)
	}
	got, err := store.Get(ctx, k.ID)
	if err != nil || got.LastUsedAt == nil || got.LastUsedAt.Before(last.Add(-time.Millisecond)) {
		t.Errorf("last_used_at = %v, want ~%v (%v)", got.LastUsedAt, last, err)
	}

	// Flushed on close even with a long interval.
	u = newUsageRecorder(store, nil, time.Hour, zap.NewNop())
	at := time.Now().Add(time.Minute)
	u.touch(k.ID, at)
	u.close()
	if got, _ := store.Get(ctx, k.ID); got.LastUsedAt == nil || !got.LastUsedAt.Equal(at.Truncate(time.Millisecond)) && !got.LastUsedAt.Equal(at) {
		t.Errorf("after close last_used_at = %v, want %v", got.LastUsedAt, at)
	}
}
