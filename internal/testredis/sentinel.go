package testredis

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// sentinelTimeout bounds waiting for the sentinel to see the replica and
// for a failover to complete.
const sentinelTimeout = 30 * time.Second

// Sentinel is a Redis Sentinel deployment of real processes owned by one
// test: a primary, a replica of it and one sentinel (quorum 1) monitoring
// them under MasterName.
type Sentinel struct {
	t          testing.TB
	MasterName string
	// Nodes are the data nodes: Nodes[0] starts as the primary, Nodes[1] as
	// its replica. After a failover the roles are swapped; see Primary.
	Nodes    []*Server
	Sentinel *Server
}

// StartSentinel launches a primary and a replica (extra args appended to
// both) and a sentinel (`redis-server sentinel.conf --sentinel`, the mode
// Debian's redis-sentinel package runs) on free loopback ports, and waits
// until the sentinel knows the replica as healthy, so that a failover can
// succeed. It calls t.Fatalf if that takes more than 30 seconds.
func StartSentinel(t testing.TB, masterName string, args ...string) *Sentinel {
	t.Helper()
	s := &Sentinel{t: t, MasterName: masterName}
	// Full syncs start at once instead of after the default 5 s delay.
	args = append([]string{"--repl-diskless-sync-delay", "0"}, args...)
	primary := Start(t, args...)
	replica := Start(t, append([]string{"--replicaof", "127.0.0.1", strconv.Itoa(primary.Port())}, args...)...)
	s.Nodes = []*Server{primary, replica}
	// The sentinel finds replicas in the primary's INFO, which it reads at
	// start and then every 10 s: start it once the replica is linked.
	deadline := time.Now().Add(sentinelTimeout)
	for !replicaLinked(replica.Addr(), primary.Addr()) || !replicaAcks(primary.Addr()) {
		if time.Now().After(deadline) {
			t.Fatalf("testredis: replica %s did not sync with %s within %s", replica.Addr(), primary.Addr(), sentinelTimeout)
		}
		time.Sleep(20 * time.Millisecond)
	}

	dir := t.TempDir()
	conf := filepath.Join(dir, "sentinel.conf")
	cfg := fmt.Sprintf("sentinel monitor %[1]s 127.0.0.1 %[2]d 1\n"+
		"sentinel down-after-milliseconds %[1]s 1000\n"+
		"sentinel failover-timeout %[1]s 10000\n"+
		"sentinel parallel-syncs %[1]s 1\n", masterName, primary.Port())
	if err := os.WriteFile(conf, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	s.Sentinel = startServer(t, dir, conf, []string{"--sentinel"})
	s.waitReplicaKnown(replica.Addr())
	return s
}

// Addr is the sentinel's address.
func (s *Sentinel) Addr() string { return s.Sentinel.Addr() }

// URL is the redis+sentinel:// URL of the monitored primary, database 0.
func (s *Sentinel) URL() string {
	return "redis+sentinel://" + s.Sentinel.Addr() + "/" + s.MasterName + "/0"
}

// sentinelClient is a client of the sentinel process itself.
func (s *Sentinel) sentinelClient() *redis.SentinelClient {
	return redis.NewSentinelClient(&redis.Options{Addr: s.Sentinel.Addr(), DialTimeout: time.Second})
}

// PrimaryAddr returns the primary's address as the sentinel reports it.
func (s *Sentinel) PrimaryAddr() (string, error) {
	sc := s.sentinelClient()
	defer sc.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	hp, err := sc.GetMasterAddrByName(ctx, s.MasterName).Result()
	if err != nil {
		return "", err
	}
	if len(hp) != 2 {
		return "", fmt.Errorf("GET-MASTER-ADDR-BY-NAME: %v", hp)
	}
	return net.JoinHostPort(hp[0], hp[1]), nil
}

// waitReplicaKnown waits until the sentinel lists the replica at addr with
// a working link to its primary.
func (s *Sentinel) waitReplicaKnown(addr string) {
	s.t.Helper()
	sc := s.sentinelClient()
	defer sc.Close()
	deadline := time.Now().Add(sentinelTimeout)
	var last any
	for time.Now().Before(deadline) {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		replicas, err := sc.Replicas(ctx, s.MasterName).Result()
		cancel()
		last = err
		if err == nil {
			last = replicas
			for _, r := range replicas {
				if net.JoinHostPort(r["ip"], r["port"]) == addr && r["flags"] == "slave" && r["master-link-status"] == "ok" {
					return
				}
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	s.t.Fatalf("testredis: sentinel does not see replica %s as healthy after %s: %v", addr, sentinelTimeout, last)
}

// role returns the ROLE of the node at addr ("master" or "slave").
func role(addr string) (string, error) {
	rdb := redis.NewClient(&redis.Options{Addr: addr, MaxRetries: -1, DialTimeout: 500 * time.Millisecond})
	defer rdb.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	v, err := rdb.Do(ctx, "ROLE").Slice()
	if err != nil {
		return "", err
	}
	r, _ := v[0].(string)
	return r, nil
}

// WaitReplica waits until the data node at addr is a replica of the
// current primary with its link up, and calls t.Fatalf after 30 seconds.
func (s *Sentinel) WaitReplica(addr string) {
	s.t.Helper()
	deadline := time.Now().Add(sentinelTimeout)
	for {
		primary, err := s.PrimaryAddr()
		if err == nil && replicaLinked(addr, primary) {
			return
		}
		if time.Now().After(deadline) {
			s.t.Fatalf("testredis: %s is not a linked replica of %s after %s (%v)", addr, primary, sentinelTimeout, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// replicaAcks reports whether a write to the primary at addr is
// acknowledged by a replica within 100ms (Redis WAIT). Just after its first
// sync a linked replica may not acknowledge anything for a while.
func replicaAcks(addr string) bool {
	rdb := redis.NewClient(&redis.Options{Addr: addr, MaxRetries: -1, DialTimeout: 500 * time.Millisecond})
	defer rdb.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	var wait *redis.Cmd
	_, err := rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
		p.Set(ctx, "testredis:replication-probe", time.Now().UnixNano(), 0)
		wait = p.Do(ctx, "WAIT", 1, 100)
		return nil
	})
	return err == nil && wait.Val() == int64(1)
}

// replicaLinked reports whether the node at addr is a replica of primary
// with its replication link up.
func replicaLinked(addr, primary string) bool {
	rdb := redis.NewClient(&redis.Options{Addr: addr, MaxRetries: -1, DialTimeout: 500 * time.Millisecond})
	defer rdb.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	info, err := rdb.Info(ctx, "replication").Result()
	if err != nil {
		return false
	}
	host, port, _ := net.SplitHostPort(primary)
	return strings.Contains(info, "role:slave") && strings.Contains(info, "master_host:"+host+"\r\n") &&
		strings.Contains(info, "master_port:"+port+"\r\n") && strings.Contains(info, "master_link_status:up")
}

// Failover forces a failover with `SENTINEL FAILOVER <name>` and waits
// until the sentinel reports the former replica as primary and that node
// answers ROLE master. It returns the new primary's address and calls
// t.Fatalf after 30 seconds. The sentinel demotes the former primary only
// when it next polls it (within about 10 s); WaitReplica waits for that.
func (s *Sentinel) Failover() string {
	s.t.Helper()
	old, err := s.PrimaryAddr()
	if err != nil {
		s.t.Fatalf("testredis: primary before failover: %v", err)
	}
	sc := s.sentinelClient()
	defer sc.Close()
	deadline := time.Now().Add(sentinelTimeout)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		err := sc.Failover(ctx, s.MasterName).Err()
		cancel()
		if err == nil {
			break
		}
		// -NOGOODSLAVE while the sentinel re-checks the replica: try again.
		if time.Now().After(deadline) {
			s.t.Fatalf("testredis: SENTINEL FAILOVER %s: %v", s.MasterName, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
	for {
		addr, err := s.PrimaryAddr()
		if err == nil && addr != old {
			if r, err := role(addr); err == nil && r == "master" {
				return addr
			}
		}
		if time.Now().After(deadline) {
			s.t.Fatalf("testredis: failover of %s did not complete within %s (primary %s, %v)", s.MasterName, sentinelTimeout, addr, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
