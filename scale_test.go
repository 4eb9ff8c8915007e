package apikeys

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/caddy-apikeys/caddy-apikeys/keystore"
)

// redisCommandTotal sums the calls of every command Redis has run (INFO
// commandstats counts the commands scripts run too), but INFO itself.
func redisCommandTotal(t *testing.T, rdb *redis.Client) int {
	t.Helper()
	info, err := rdb.Info(context.Background(), "commandstats").Result()
	if err != nil {
		t.Fatal(err)
	}
	total := 0
	for _, line := range strings.Split(info, "\n") {
		name, rest, ok := strings.Cut(strings.TrimPrefix(strings.TrimSpace(line), "cmdstat_"), ":calls=")
		if !ok || name == "info" {
			continue
		}
		n, _ := strconv.Atoi(strings.SplitN(rest, ",", 2)[0])
		total += n
	}
	return total
}

// TestHistoryBoundedCost (invariant 8): a create and a status-filtered list
// cost the same number of Redis commands for an owner with 3,000 revoked
// keys as for an owner with none, and a create at most 20, counted by the
// Redis server (which also counts what scripts run).
//
// APIKEYS_TEST_HISTORY=100000 sets the history (for BENCHMARKS.md; a few
// minutes) and runs it on the file store too, where the times are logged
// and paging is checked (the records a listing reads are counted by
// testListFilteredBounded in keystore).
func TestHistoryBoundedCost(t *testing.T) {
	history := 3000
	kinds := []string{"redis"}
	if v, err := strconv.Atoi(os.Getenv("APIKEYS_TEST_HISTORY")); err == nil && v > 0 {
		history = v
		kinds = append(kinds, "file")
	}
	for _, kind := range kinds {
		t.Run(kind, func(t *testing.T) { testHistoryBoundedCost(t, kind, history) })
	}
}

func testHistoryBoundedCost(t *testing.T, kind string, history int) {
	g := startGateway(t, kind, "")
	var rdb *redis.Client
	if kind == "redis" {
		rdb = g.redis.Client(t)
	}

	// The busy owner: an old rotating key, then the revoked ones.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	hasher, err := keystore.NewHasher([]byte(testSecret))
	if err != nil {
		t.Fatal(err)
	}
	base := time.Now().Add(-time.Hour).UTC().Truncate(time.Millisecond)
	newRecord := func(i int) *keystore.Key {
		raw, err := keystore.Mint(keystore.DefaultPrefix)
		if err != nil {
			t.Fatal(err)
		}
		id, err := keystore.NewKeyID()
		if err != nil {
			t.Fatal(err)
		}
		return &keystore.Key{ID: id, Owner: "busy", Name: "k" + strconv.Itoa(i), Prefix: keystore.DisplayPrefix(keystore.DefaultPrefix, raw),
			Digest: hasher.Digest(raw), CreatedAt: base.Add(time.Duration(i) * time.Millisecond)}
	}
	rotating := newRecord(0)
	rotating.ReplacedBy = "key_replacement"
	if err := g.store.Create(ctx, rotating); err != nil {
		t.Fatal(err)
	}
	revokedAt := base.Add(time.Minute)
	seeded := time.Now()
	var wg sync.WaitGroup
	for w := range 16 {
		wg.Go(func() {
			for i := 1 + w; i <= history; i += 16 {
				k := newRecord(i)
				k.RevokedAt = &revokedAt
				if err := g.store.Create(ctx, k); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	t.Logf("stored %d revoked keys in %v", history, time.Since(seeded).Round(time.Millisecond))
	g.create("quiet", `{"name":"first"}`) // the quiet owner's index exists

	measure := func(what string, do func()) int {
		t.Helper()
		if rdb == nil {
			do()
			return 0
		}
		// The median of three, so that a background refresh or pub/sub
		// ping landing in one does not decide.
		var counts []int
		for range 3 {
			before := redisCommandTotal(t, rdb)
			do()
			counts = append(counts, redisCommandTotal(t, rdb)-before)
		}
		slicesSort(counts)
		t.Logf("%s: %v Redis commands", what, counts)
		return counts[1]
	}
	quietCreate := measure("create, owner with no history", func() { g.create("quiet", `{"name":"k"}`) })
	busyCreate := measure(fmt.Sprintf("create, owner with %d revoked keys", history), func() { g.create("busy", `{"name":"k"}`) })
	if rdb != nil && (busyCreate > 20 || busyCreate > quietCreate+2) {
		t.Errorf("a create costs %d Redis commands with %d revoked keys of history (%d without), want at most 20 and about the same", busyCreate, history, quietCreate)
	}

	listRotating := func(owner string) func() {
		return func() {
			l, resp := g.list(owner, "?status=rotating&limit=1")
			if resp.status != 200 {
				t.Fatalf("list: %d %s", resp.status, resp.body)
			}
			if owner == "busy" && (len(l.Keys) != 0 || l.NextCursor == nil) {
				t.Errorf("first page of the busy owner: %d keys, next %v; want none yet and a cursor", len(l.Keys), l.NextCursor)
			}
		}
	}
	quietList := measure("status list, owner with no history", listRotating("quiet"))
	busyList := measure(fmt.Sprintf("status list, owner with %d revoked keys", history), listRotating("busy"))
	// A bounded scan reads at most DefaultListScan+1 records, each an id,
	// a record and two last-use reads; every key of the history would be
	// over 12,000.
	if max := 4*(keystore.DefaultListScan+1) + 20; rdb != nil && busyList > max {
		t.Errorf("a status list costs %d Redis commands with %d revoked keys of history (%d without), want at most %d", busyList, history, quietList, max)
	}

	// Time, for BENCHMARKS.md (logged, not asserted: this machine is shared).
	timeIt := func(what string, do func()) {
		var ds []int
		for range 21 {
			start := time.Now()
			do()
			ds = append(ds, int(time.Since(start).Microseconds()))
		}
		slicesSort(ds)
		t.Logf("%s: median %dus (min %dus, max %dus) over 21", what, ds[10], ds[0], ds[20])
	}
	timeIt("create, quiet owner", func() { g.create("quiet", `{"name":"k"}`) })
	timeIt(fmt.Sprintf("create, owner with %d revoked keys", history), func() { g.create("busy", `{"name":"k"}`) })
	timeIt("status=rotating&limit=1, quiet owner", listRotating("quiet"))
	timeIt(fmt.Sprintf("status=rotating&limit=1, owner with %d revoked keys", history), listRotating("busy"))

	// Paging on finds the rotating key, once.
	found, cursor := 0, ""
	for pages := 0; pages < history; pages++ {
		l, resp := g.list("busy", "?status=rotating&limit=1"+cursor)
		if resp.status != 200 {
			t.Fatalf("list: %d %s", resp.status, resp.body)
		}
		for _, k := range l.Keys {
			if k.KeyID != rotating.ID {
				t.Errorf("status=rotating listed %s (%s)", k.KeyID, k.Status)
			}
			found++
		}
		if l.NextCursor == nil {
			break
		}
		cursor = "&cursor=" + *l.NextCursor
	}
	if found != 1 {
		t.Errorf("paging through the busy owner's rotating keys found %d, want 1", found)
	}
}

func slicesSort(v []int) {
	for i := 1; i < len(v); i++ {
		for j := i; j > 0 && v[j] < v[j-1]; j-- {
			v[j], v[j-1] = v[j-1], v[j]
		}
	}
}
