package testredis

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// clusterTimeout is how long StartCluster waits for the cluster to form.
const clusterTimeout = 15 * time.Second

// Cluster is a throwaway Redis Cluster of masters without replicas, owned by
// one test.
type Cluster struct {
	Nodes []*Server
}

// StartCluster launches n (at least 1) cluster-enabled redis-servers (see
// [Start]), splits the 16384 hash slots evenly between them, joins them and
// waits until every node reports cluster_state:ok. It needs Redis 7.0 or
// later (--cluster-port, CLUSTER ADDSLOTSRANGE) and calls t.Fatalf if the
// cluster does not form within 15 seconds.
func StartCluster(t testing.TB, n int) *Cluster {
	t.Helper()
	if n < 1 {
		t.Fatalf("testredis: a cluster needs at least one node, got %d", n)
	}
	c := &Cluster{}
	var firstBus int
	for i := range n {
		bus, err := freePort()
		if err != nil {
			t.Fatalf("testredis: find a free port: %v", err)
		}
		if i == 0 {
			firstBus = bus
		}
		c.Nodes = append(c.Nodes, Start(t,
			"--cluster-enabled", "yes",
			"--cluster-config-file", "nodes.conf",
			"--cluster-port", strconv.Itoa(bus),
			"--cluster-node-timeout", "5000",
		))
	}

	ctx, cancel := context.WithTimeout(context.Background(), clusterTimeout)
	defer cancel()
	clients := make([]*redis.Client, n)
	for i, node := range c.Nodes {
		clients[i] = node.Client(t)
	}
	const slots = 16384
	for i, cl := range clients {
		first, last := i*slots/n, (i+1)*slots/n-1
		if err := cl.Do(ctx, "CLUSTER", "ADDSLOTSRANGE", first, last).Err(); err != nil {
			t.Fatalf("testredis: cluster addslotsrange on %s: %v", c.Nodes[i].Addr(), err)
		}
	}
	for i := 1; i < n; i++ {
		// The bus port must be given: it is not the default port+10000.
		if err := clients[i].Do(ctx, "CLUSTER", "MEET", "127.0.0.1", c.Nodes[0].port, firstBus).Err(); err != nil {
			t.Fatalf("testredis: cluster meet from %s: %v", c.Nodes[i].Addr(), err)
		}
	}

	for {
		ok := true
		for _, cl := range clients {
			info, err := cl.ClusterInfo(ctx).Result()
			if err != nil || !strings.Contains(info, "cluster_state:ok") ||
				!strings.Contains(info, fmt.Sprintf("cluster_known_nodes:%d\r\n", n)) {
				ok = false
				break
			}
		}
		if ok {
			return c
		}
		select {
		case <-ctx.Done():
			t.Fatalf("testredis: the cluster of %d nodes did not form within %s", n, clusterTimeout)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// URLs returns a redis:// URL for each node, the seed list of a cluster
// client.
func (c *Cluster) URLs() []string {
	out := make([]string, len(c.Nodes))
	for i, node := range c.Nodes {
		out[i] = "redis://" + node.Addr()
	}
	return out
}
