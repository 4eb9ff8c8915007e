package testredis

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

func TestStartStopRestart(t *testing.T) {
	srv := Start(t)
	if !strings.HasPrefix(srv.Addr(), "127.0.0.1:") || srv.URL() != "redis://"+srv.Addr()+"/0" {
		t.Fatalf("Addr %q, URL %q", srv.Addr(), srv.URL())
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()

	c := srv.Client(t)
	if err := c.Set(ctx, "k", "v", 0).Err(); err != nil {
		t.Fatal(err)
	}
	// Persistence is off.
	if save := c.ConfigGet(ctx, "save").Val()["save"]; save != "" {
		t.Errorf("save = %q, want persistence off", save)
	}

	srv.Stop()
	srv.Stop() // idempotent
	if err := ping(srv.Addr()); err == nil {
		t.Fatal("server answers after Stop")
	}

	addr := srv.Addr()
	srv.Restart()
	if srv.Addr() != addr {
		t.Errorf("Restart moved from %s to %s", addr, srv.Addr())
	}
	c2 := srv.Client(t)
	if n := c2.Exists(ctx, "k").Val(); n != 0 {
		t.Errorf("data survived a restart without persistence")
	}
}

func TestStartArgs(t *testing.T) {
	srv := Start(t, "--requirepass", "pw")
	if err := ping(srv.Addr()); err == nil || !strings.Contains(err.Error(), "NOAUTH") {
		t.Errorf("PING without auth: %v, want NOAUTH", err)
	}
}

func TestTwoServers(t *testing.T) {
	a, b := Start(t), Start(t)
	if a.Addr() == b.Addr() {
		t.Fatalf("both servers on %s", a.Addr())
	}
}

func TestCluster(t *testing.T) {
	c := StartCluster(t, 3)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	rdb := redis.NewClusterClient(&redis.ClusterOptions{Addrs: []string{c.Nodes[0].Addr()}})
	defer rdb.Close()
	// Keys spread over every node.
	for i := range 100 {
		if err := rdb.Set(ctx, fmt.Sprintf("k%d", i), i, 0).Err(); err != nil {
			t.Fatal(err)
		}
	}
	for _, node := range c.Nodes {
		if n := node.Client(t).DBSize(ctx).Val(); n == 0 {
			t.Errorf("node %s holds no keys", node.Addr())
		}
	}
	if len(c.URLs()) != 3 || !strings.HasPrefix(c.URLs()[0], "redis://127.0.0.1:") {
		t.Errorf("URLs %v", c.URLs())
	}
}
