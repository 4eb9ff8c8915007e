package keystore

import (
	"context"
	"errors"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/caddy-apikeys/caddy-apikeys/internal/testredis"
)

func TestParseSentinelURL(t *testing.T) {
	o, err := ParseRedisOptions(RedisOptions{URLs: []string{
		"redis+sentinel://u:pw@s1:26380,s2,[::1]:26381/my%20master/3?pool_size=7&sentinel_password=sp&max_retries=2",
	}})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(o.Addrs, []string{"s1:26380", "s2:26379", "[::1]:26381"}) || o.MasterName != "my master" ||
		o.DB != 3 || o.Username != "u" || o.Password != "pw" || o.SentinelPassword != "sp" || o.SentinelUsername != "" ||
		o.PoolSize != 7 || o.MaxRetries != 2 || o.IsClusterMode || o.TLSConfig != nil {
		t.Errorf("got %+v", o)
	}
	if o.DialTimeout != DefaultRedisDialTimeout || !o.ContextTimeoutEnabled || o.DialerRetries != 1 {
		t.Errorf("defaults not applied: %+v", o)
	}
	c := redis.NewUniversalClient(o)
	defer c.Close()
	if rc, ok := c.(*redis.Client); !ok || !strings.Contains(rc.String(), "FailoverClient") {
		t.Errorf("a Sentinel URL gave %T %v, want a failover client", c, c)
	}

	o, err = ParseRedisOptions(RedisOptions{URLs: []string{"redis+sentinel://127.0.0.1/mymaster"}})
	if err != nil || o.DB != 0 || o.MaxRetries != DefaultRedisMaxRetries || o.Addrs[0] != "127.0.0.1:26379" {
		t.Errorf("minimal URL: %+v %v", o, err)
	}

	const secret = "hunter2-very-secret"
	for name, urls := range map[string][]string{
		"no master":       {"redis+sentinel://u:" + secret + "@s1:26379"},
		"empty master":    {"redis+sentinel://u:" + secret + "@s1:26379/"},
		"too many parts":  {"redis+sentinel://u:" + secret + "@s1:26379/m/0/x"},
		"bad db":          {"redis+sentinel://u:" + secret + "@s1:26379/m/x"},
		"bad port":        {"redis+sentinel://u:" + secret + "@s1:99999/m"},
		"empty host":      {"redis+sentinel://u:" + secret + "@s1,,s2/m"},
		"unknown option":  {"redis+sentinel://u:" + secret + "@s1/m?bogus=1"},
		"with cluster":    {"redis+sentinel://u:" + secret + "@s1/m", "redis://h2"},
		"cluster first":   {"redis://h2", "redis+sentinel://u:" + secret + "@s1/m"},
		"tls":             {"rediss+sentinel://u:" + secret + "@s1/m"},
		"bad query":       {"redis+sentinel://u:" + secret + "@s1/m?a=%zz"},
		"sentinel secret": {"redis+sentinel://s1/m?sentinel_password=" + secret + "&bogus=1"},
	} {
		t.Run("error "+name, func(t *testing.T) {
			_, err := ParseRedisOptions(RedisOptions{URLs: urls})
			if err == nil {
				t.Fatalf("%v accepted", urls)
			}
			if strings.Contains(err.Error(), secret) {
				t.Errorf("error reveals the password: %v", err)
			}
		})
	}
}

// TestRedisSentinelConformance runs the Store contract through a
// redis+sentinel:// URL against a real primary, replica and sentinel.
func TestRedisSentinelConformance(t *testing.T) {
	sen := testredis.StartSentinel(t, "apikeys-primary")
	runConformance(t, backend{newStore: func(t *testing.T) Store {
		return newRedisStoreURLs(t, []string{sen.URL()}, RedisOptions{})
	}})
}

// retry runs op until it succeeds or limit passes, and returns how long it
// took and the last error.
func retry(limit time.Duration, op func(ctx context.Context) error) (time.Duration, error) {
	start := time.Now()
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		err := op(ctx)
		cancel()
		if err == nil || time.Since(start) > limit {
			return time.Since(start), err
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestRedisSentinelFailover forces a failover (SENTINEL FAILOVER) while
// four writers create keys through a redis+sentinel:// store that waits for
// one replica (WaitReplicas 1). Keys stored before the failover still
// validate; creates succeed again after it within a bounded retry; and,
// once the sentinel has demoted the old primary (which throws away writes
// it took after the promotion), no Create that returned nil is lost.
func TestRedisSentinelFailover(t *testing.T) {
	sen := testredis.StartSentinel(t, "apikeys-primary")
	s := newRedisStoreURLs(t, []string{sen.URL()}, RedisOptions{
		DialTimeout: 300 * time.Millisecond, ReadTimeout: time.Second, WriteTimeout: 300 * time.Millisecond,
		WaitReplicas: 1, WaitTimeout: 500 * time.Millisecond,
	})
	var before []*Key
	for range 20 {
		k := newKey(t, "alice", time.Now())
		mustCreate(t, s, k)
		before = append(before, k)
	}

	var (
		mu        sync.Mutex
		acked     []*Key
		fails     int
		failedAt  time.Time // last failure
		ackedPost int       // acknowledged after the failover completed
		switched  bool
		wg        sync.WaitGroup
	)
	stop := make(chan struct{})
	for range 4 {
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				k := newKey(t, "alice", time.Now())
				ctx, cancel := context.WithTimeout(context.Background(), time.Second)
				err := s.Create(ctx, k)
				cancel()
				mu.Lock()
				if err == nil {
					acked = append(acked, k)
					if switched {
						ackedPost++
					}
				} else {
					fails++
					failedAt = time.Now()
				}
				mu.Unlock()
				time.Sleep(10 * time.Millisecond)
			}
		})
	}
	time.Sleep(300 * time.Millisecond)
	old, err := sen.PrimaryAddr()
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	newPrimary := sen.Failover()
	mu.Lock()
	switched = true
	mu.Unlock()
	t.Logf("failover %s -> %s in %s", old, newPrimary, time.Since(start).Round(time.Millisecond))

	// Creates resume once the new primary has a replica again: the old
	// primary, demoted by the sentinel when it next polls it (<= ~10 s).
	deadline := time.Now().Add(25 * time.Second)
	for {
		mu.Lock()
		n := ackedPost
		mu.Unlock()
		if n >= 20 {
			break
		}
		if time.Now().After(deadline) {
			close(stop)
			wg.Wait()
			t.Fatalf("only %d creates succeeded in the 25 s after the failover", n)
		}
		time.Sleep(50 * time.Millisecond)
	}
	close(stop)
	wg.Wait()
	t.Logf("creates: %d acknowledged, %d failed, the last failure %s after the failover began",
		len(acked), fails, failedAt.Sub(start).Round(time.Millisecond))
	sen.WaitReplica(old)

	lost := 0
	for _, k := range append(before, acked...) {
		var found error
		if _, err := retry(5*time.Second, func(ctx context.Context) error {
			_, found = s.ByDigest(ctx, k.Digest)
			if errors.Is(found, ErrNotFound) {
				return nil // an answer, not an outage
			}
			return found
		}); err != nil {
			t.Fatalf("store unavailable after the failover: %v", err)
		}
		if found != nil {
			lost++
		}
	}
	if lost > 0 {
		t.Fatalf("%d of %d acknowledged keys were lost in the failover", lost, len(before)+len(acked))
	}
	listed, err := listAllErr(s, "alice")
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range append(before, acked...) {
		if !slices.Contains(listed, k.ID) {
			t.Errorf("acknowledged key %s is not listed after the failover", k.ID)
		}
	}
	// The writes now go to the new primary.
	rdb := redis.NewClient(&redis.Options{Addr: newPrimary})
	defer rdb.Close()
	last := acked[len(acked)-1]
	if n := rdb.Exists(ctxT(t), s.digestKey(last.Digest.String())).Val(); n != 1 {
		t.Error("the last key created is not on the new primary")
	}
}

// TestRedisWaitReplicasWithoutReplica checks that with WaitReplicas set and
// no replica, Create fails within its deadline instead of acknowledging a
// write no replica holds.
func TestRedisWaitReplicasWithoutReplica(t *testing.T) {
	srv := testredis.Start(t)
	s := newRedisStore(t, srv, RedisOptions{WaitReplicas: 1, WaitTimeout: 200 * time.Millisecond})
	start := time.Now()
	err := s.Create(ctxT(t), newKey(t, "alice", time.Now()))
	if err == nil || !strings.Contains(err.Error(), "0 of 1 replicas") {
		t.Fatalf("Create without a replica: %v", err)
	}
	if errors.Is(err, ErrConflict) || errors.Is(err, ErrNotFound) {
		t.Errorf("got a sentinel error: %v", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("took %s with a 200ms wait timeout", d)
	}
	if _, err := NewRedis(RedisOptions{URLs: []string{srv.URL()}, WaitReplicas: -1}); err == nil {
		t.Error("negative WaitReplicas accepted")
	}
}
