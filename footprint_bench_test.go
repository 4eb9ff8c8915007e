package apikeys

import (
	"context"
	"fmt"
	"runtime"
	"runtime/metrics"
	"strconv"
	"testing"
	"time"

	"github.com/caddy-apikeys/caddy-apikeys/internal/testredis"
	"github.com/caddy-apikeys/caddy-apikeys/keystore"
)

// BenchmarkCacheFootprint measures what cached key records cost the
// garbage collector, which marks every live heap object on every cycle:
// the live heap bytes, heap objects and scannable bytes (of objects that
// hold pointers, which the GC scans) per record, and (as ns/op) the time of
// one full collection with none and with 10,000 records cached. The
// records are read from a real redis-server through the guard's cache, as
// in production; half are scoped and expire, owners repeat (100 of them).
//
//	go test -run '^$' -bench CacheFootprint -count 5 .
func BenchmarkCacheFootprint(b *testing.B) {
	srv := testredis.Start(b)
	raw, err := keystore.NewRedis(keystore.RedisOptions{URLs: []string{srv.URL()}})
	if err != nil {
		b.Fatal(err)
	}
	defer raw.Close()
	store := &StoreConfig{Type: "redis", URLs: []string{srv.URL()}}
	ctx := context.Background()
	var digests []keystore.Digest
	for _, n := range []int{0, 10_000} {
		b.Run(fmt.Sprintf("records=%d", n), func(b *testing.B) {
			h := benchHandler(b, store, nil)
			for len(digests) < n {
				digests = append(digests, storeFootprintKey(b, h, raw, len(digests)))
			}
			var before, after runtime.MemStats
			runtime.GC()
			runtime.ReadMemStats(&before)
			scanBefore := scannableHeap()
			for _, d := range digests[:n] {
				if _, err := h.cache.Lookup(ctx, d); err != nil {
					b.Fatal(err)
				}
			}
			runtime.GC()
			runtime.ReadMemStats(&after)
			scanAfter := scannableHeap()
			for b.Loop() {
				runtime.GC()
			}
			runtime.KeepAlive(h)
			if n > 0 {
				b.ReportMetric(float64(after.HeapAlloc-before.HeapAlloc)/float64(n), "B/record")
				b.ReportMetric(float64(after.HeapObjects-before.HeapObjects)/float64(n), "objects/record")
				b.ReportMetric(float64(scanAfter-scanBefore)/float64(n), "scan-B/record")
			}
		})
	}
}

// storeFootprintKey stores the i-th key of BenchmarkCacheFootprint behind
// the cache's back and returns its digest.
func storeFootprintKey(b *testing.B, h *Handler, raw *keystore.RedisStore, i int) keystore.Digest {
	token, err := keystore.Mint(h.KeyPrefix)
	if err != nil {
		b.Fatal(err)
	}
	id, err := keystore.NewKeyID()
	if err != nil {
		b.Fatal(err)
	}
	created := time.Now().UTC().Truncate(time.Millisecond)
	k := &keystore.Key{ID: id, Owner: "user_" + strconv.Itoa(i%100), Name: "service key " + strconv.Itoa(i),
		Prefix: keystore.DisplayPrefix(h.KeyPrefix, token), Digest: h.hasher.Digest(token), CreatedAt: created}
	if i%2 == 1 {
		k.Scopes = []string{"analytics:read", "events:write"}
		exp := created.Add(90 * 24 * time.Hour)
		k.ExpiresAt = &exp
	}
	if err := raw.Create(context.Background(), k); err != nil {
		b.Fatal(err)
	}
	return k.Digest
}

// scannableHeap returns the bytes of live heap the garbage collector scans
// for pointers (objects that hold none are only marked).
func scannableHeap() uint64 {
	m := []metrics.Sample{{Name: "/gc/scan/heap:bytes"}}
	metrics.Read(m)
	return m[0].Value.Uint64()
}
