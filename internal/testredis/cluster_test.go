package testredis

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// TestCluster checks that StartCluster gives a working three-primary
// cluster whose keys spread over every node, and that a killed node that
// comes back (with its nodes.conf) makes the cluster healthy again.
func TestCluster(t *testing.T) {
	start := time.Now()
	c := StartCluster(t, "--appendonly", "yes", "--appendfsync", "always")
	t.Logf("cluster up in %s", time.Since(start).Round(time.Millisecond))
	if len(c.URLs()) != 3 || c.URLs()[0] != "redis://"+c.Nodes[0].Addr() {
		t.Fatalf("URLs %v", c.URLs())
	}
	rdb := c.Client(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for i := range 60 {
		if err := rdb.Set(ctx, fmt.Sprintf("k%d", i), i, 0).Err(); err != nil {
			t.Fatal(err)
		}
	}
	perNode := 0
	for _, n := range c.Nodes {
		nc := redis.NewClient(&redis.Options{Addr: n.Addr()})
		size := nc.DBSize(ctx).Val()
		nc.Close()
		if size == 0 {
			t.Errorf("node %s holds no key: slots are not spread", n.Addr())
		}
		perNode += int(size)
	}
	if perNode != 60 {
		t.Errorf("nodes hold %d keys in all, want 60", perNode)
	}

	victim := c.NodeFor(t, "k1")
	victim.Stop()
	if err := rdb.Get(ctx, "k1").Err(); err == nil {
		t.Error("read a key of a stopped node")
	}
	victim.Restart()
	c.WaitHealthy(20 * time.Second)
	deadline := time.Now().Add(10 * time.Second)
	for {
		v, err := rdb.Get(ctx, "k1").Result()
		if err == nil {
			if v != "1" {
				t.Fatalf("k1 = %q after restart, want 1 (appendonly)", v)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("k1 unreadable after the node came back: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestSentinel checks that StartSentinel monitors a replicated primary and
// that Failover swaps the roles with the data intact.
func TestSentinel(t *testing.T) {
	start := time.Now()
	s := StartSentinel(t, "mymaster")
	t.Logf("sentinel up in %s", time.Since(start).Round(time.Millisecond))
	if s.URL() != "redis+sentinel://"+s.Addr()+"/mymaster/0" {
		t.Errorf("URL %q", s.URL())
	}
	primary, err := s.PrimaryAddr()
	if err != nil || primary != s.Nodes[0].Addr() {
		t.Fatalf("primary %q %v, want %s", primary, err, s.Nodes[0].Addr())
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	p := redis.NewClient(&redis.Options{Addr: primary})
	defer p.Close()
	if err := p.Set(ctx, "k", "v", 0).Err(); err != nil {
		t.Fatal(err)
	}
	if n, err := p.Wait(ctx, 1, 5*time.Second).Result(); err != nil || n != 1 {
		t.Fatalf("WAIT: %d %v", n, err)
	}

	start = time.Now()
	newPrimary := s.Failover()
	t.Logf("failover in %s", time.Since(start).Round(time.Millisecond))
	ctx, cancel = context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if newPrimary != s.Nodes[1].Addr() {
		t.Fatalf("new primary %s, want the replica %s", newPrimary, s.Nodes[1].Addr())
	}
	np := redis.NewClient(&redis.Options{Addr: newPrimary})
	defer np.Close()
	if v := np.Get(ctx, "k").Val(); v != "v" {
		t.Errorf("k = %q on the new primary", v)
	}
	if err := np.Set(ctx, "k2", "v2", 0).Err(); err != nil {
		t.Errorf("new primary refuses writes: %v", err)
	}
	// The sentinel demotes the former primary when it next polls it (up to
	// 10 s); not waited for here.
}
