package apikeys

import (
	"context"
	"runtime"
	"strconv"
	"testing"
	"time"

	"github.com/caddy-apikeys/caddy-apikeys/internal/testredis"
	"github.com/caddy-apikeys/caddy-apikeys/keystore"
)

// BenchmarkCacheFootprint measures what each cached key record costs the
// garbage collector: live heap bytes and heap objects per record (which the
// GC marks on every cycle), and the time of a full collection with 10,000
// records cached. Records are read from a real redis-server, as in
// production.
//
//	go test -run '^$' -bench CacheFootprint -benchtime 1x .
func BenchmarkCacheFootprint(b *testing.B) {
	const n = 10_000
	srv := testredis.Start(b)
	h := benchHandler(b, &StoreConfig{Type: "redis", URLs: []string{srv.URL()}}, nil)
	raw, err := keystore.NewRedis(keystore.RedisOptions{URLs: []string{srv.URL()}})
	if err != nil {
		b.Fatal(err)
	}
	defer raw.Close()
	ctx := context.Background()
	digests := make([]keystore.Digest, n)
	created := time.Now().UTC().Truncate(time.Millisecond)
	for i := range digests {
		token, err := keystore.Mint(h.KeyPrefix)
		if err != nil {
			b.Fatal(err)
		}
		id, err := keystore.NewKeyID()
		if err != nil {
			b.Fatal(err)
		}
		k := &keystore.Key{ID: id, Owner: "user_" + strconv.Itoa(i%500), Name: "service key " + strconv.Itoa(i),
			Prefix: keystore.DisplayPrefix(h.KeyPrefix, token), Digest: h.hasher.Digest(token), CreatedAt: created}
		if i%2 == 1 {
			k.Scopes = []string{"analytics:read", "events:write"}
			exp := created.Add(90 * 24 * time.Hour)
			k.ExpiresAt = &exp
		}
		if err := raw.Create(ctx, k); err != nil {
			b.Fatal(err)
		}
		digests[i] = k.Digest
	}
	// The records are read into the cache once; the loop only repeats
	// the measurement of the full collection.
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	for _, d := range digests {
		if _, err := h.cache.Lookup(ctx, d); err != nil {
			b.Fatal(err)
		}
	}
	runtime.GC()
	runtime.ReadMemStats(&after)
	b.ResetTimer()
	for b.Loop() {
		runtime.GC()
	}
	runtime.KeepAlive(h)
	b.ReportMetric(float64(after.HeapAlloc-before.HeapAlloc)/n, "B/record")
	b.ReportMetric(float64(after.HeapObjects-before.HeapObjects)/n, "objects/record")
}
