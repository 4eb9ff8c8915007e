package testredis

import (
	"context"
	"fmt"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// clusterTimeout bounds creating a cluster and waiting for it to be healthy.
const clusterTimeout = 30 * time.Second

// Cluster is a Redis Cluster of real redis-server processes owned by one
// test: three primaries, no replicas, every slot assigned.
type Cluster struct {
	t     testing.TB
	Nodes []*Server
}

// StartCluster launches three `redis-server --cluster-enabled yes` nodes on
// free loopback ports (each with its own directory, nodes.conf and cluster
// bus port, and the extra args appended), joins them with `redis-cli
// --cluster create ... --cluster-replicas 0 --cluster-yes`, and waits until
// every node reports cluster_state:ok and knows all three primaries. It
// calls t.Fatalf if redis-server or redis-cli is missing or the cluster
// does not form within 30 seconds. The nodes are killed when the test ends.
//
// The node timeout is 1 s, so a killed node is noticed, and a restarted one
// readmitted, within a few seconds.
func StartCluster(t testing.TB, args ...string) *Cluster {
	t.Helper()
	cli, err := exec.LookPath("redis-cli")
	if err != nil {
		t.Fatalf("testredis: redis-cli not found on PATH (%v); cluster tests need it to create the cluster (Debian: apt-get install redis-tools)", err)
	}
	c := &Cluster{t: t}
	for range 3 {
		bus, err := freePort()
		if err != nil {
			t.Fatalf("testredis: find a free port: %v", err)
		}
		nodeArgs := append([]string{
			"--cluster-enabled", "yes",
			"--cluster-config-file", "nodes.conf",
			"--cluster-node-timeout", "1000",
			"--cluster-port", strconv.Itoa(bus),
		}, args...)
		c.Nodes = append(c.Nodes, Start(t, nodeArgs...))
	}

	ctx, cancel := context.WithTimeout(context.Background(), clusterTimeout)
	defer cancel()
	create := []string{"--cluster", "create"}
	create = append(create, c.Addrs()...)
	create = append(create, "--cluster-replicas", "0", "--cluster-yes")
	out, err := exec.CommandContext(ctx, cli, create...).CombinedOutput()
	if err != nil {
		t.Fatalf("testredis: redis-cli --cluster create: %v\n%s", err, out)
	}
	c.WaitHealthy(clusterTimeout)
	return c
}

// Addrs returns the nodes' addresses, "127.0.0.1:<port>".
func (c *Cluster) Addrs() []string {
	out := make([]string, len(c.Nodes))
	for i, n := range c.Nodes {
		out[i] = n.Addr()
	}
	return out
}

// URLs returns a redis:// URL per node: the seed URLs of a cluster client.
func (c *Cluster) URLs() []string {
	out := make([]string, len(c.Nodes))
	for i, n := range c.Nodes {
		out[i] = "redis://" + n.Addr()
	}
	return out
}

// WaitHealthy waits until every running node answers CLUSTER INFO with
// cluster_state:ok and cluster_known_nodes equal to the cluster's size, and
// calls t.Fatalf after limit. Call it from the test's goroutine.
func (c *Cluster) WaitHealthy(limit time.Duration) {
	c.t.Helper()
	deadline := time.Now().Add(limit)
	for {
		bad := c.unhealthy()
		if bad == "" {
			return
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("testredis: cluster not healthy after %s: %s", limit, bad)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// unhealthy describes the first node that is not ready, or returns "".
func (c *Cluster) unhealthy() string {
	want := "cluster_known_nodes:" + strconv.Itoa(len(c.Nodes))
	for _, n := range c.Nodes {
		if !n.Running() {
			continue
		}
		info, err := clusterInfo(n.Addr())
		if err != nil {
			return fmt.Sprintf("%s: %v", n.Addr(), err)
		}
		if !strings.Contains(info, "cluster_state:ok") || !strings.Contains(info, want) {
			return fmt.Sprintf("%s: %s", n.Addr(), strings.Join(strings.Fields(info), " "))
		}
	}
	return ""
}

// clusterInfo returns CLUSTER INFO of the node at addr.
func clusterInfo(addr string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	rdb := redis.NewClient(&redis.Options{Addr: addr, MaxRetries: -1, DialTimeout: 500 * time.Millisecond})
	defer rdb.Close()
	return rdb.ClusterInfo(ctx).Result()
}

// Client returns a cluster client seeded with every node, closed when the
// test ends.
func (c *Cluster) Client(t testing.TB) *redis.ClusterClient {
	t.Helper()
	rdb := redis.NewClusterClient(&redis.ClusterOptions{Addrs: c.Addrs()})
	t.Cleanup(func() { _ = rdb.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
	defer cancel()
	if err := rdb.Ping(ctx).Err(); err != nil {
		t.Fatalf("testredis: ping cluster: %v", err)
	}
	return rdb
}

// NodeFor returns the node that serves key's hash slot.
func (c *Cluster) NodeFor(t testing.TB, key string) *Server {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
	defer cancel()
	slot, err := c.Client(t).ClusterKeySlot(ctx, key).Result()
	if err != nil {
		t.Fatalf("testredis: CLUSTER KEYSLOT: %v", err)
	}
	for _, n := range c.Nodes {
		rdb := redis.NewClient(&redis.Options{Addr: n.Addr()})
		slots, err := rdb.ClusterSlots(ctx).Result()
		rdb.Close()
		if err != nil {
			t.Fatalf("testredis: CLUSTER SLOTS: %v", err)
		}
		for _, s := range slots {
			if int64(s.Start) <= slot && slot <= int64(s.End) && len(s.Nodes) > 0 && s.Nodes[0].Addr == n.Addr() {
				return n
			}
		}
	}
	t.Fatalf("testredis: no node serves slot %d", slot)
	return nil
}
