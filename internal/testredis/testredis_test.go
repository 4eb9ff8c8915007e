package testredis

import (
	"context"
	"strings"
	"testing"
	"time"
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

func TestPauseResume(t *testing.T) {
	srv := Start(t)
	srv.Pause()
	start := time.Now()
	if err := ping(srv.Addr()); err == nil {
		t.Fatal("a paused server answered PING")
	}
	if d := time.Since(start); d < 150*time.Millisecond {
		t.Errorf("PING failed after %s: the paused server should hang, not refuse", d)
	}
	srv.Resume()
	if err := ping(srv.Addr()); err != nil {
		t.Fatalf("PING after Resume: %v", err)
	}
}
