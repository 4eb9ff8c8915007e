package keystore

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// TestBoltSnapshot copies a store while keys are being created: the copy
// opens as a key store holding every key created before the snapshot
// began, and each of its keys is found by digest.
func TestBoltSnapshot(t *testing.T) {
	s := newBoltStore(t)
	var before []*Key
	for range 20 {
		k := newKey(t, "alice", time.Now())
		mustCreate(t, s, k)
		before = append(before, k)
	}
	var wg sync.WaitGroup
	stop := make(chan struct{})
	ctx := ctxT(t)
	wg.Add(1)
	go func() { // concurrent writers are not held up, and do not tear the copy
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			default:
				if err := s.Create(ctx, newKey(t, "bob", time.Now())); err != nil {
					t.Error(err)
					return
				}
			}
		}
	}()
	var buf bytes.Buffer
	var announced int64
	n, err := s.Snapshot(&buf, func(size int64) { announced = size })
	close(stop)
	wg.Wait()
	if err != nil || n != int64(buf.Len()) || n != announced {
		t.Fatalf("Snapshot: %d bytes (announced %d, buffer %d): %v", n, announced, buf.Len(), err)
	}
	copyPath := filepath.Join(t.TempDir(), "copy.db")
	if err := os.WriteFile(copyPath, buf.Bytes(), 0o600); err != nil {
		t.Fatal(err)
	}
	info, err := InspectBolt(copyPath, time.Second)
	if err != nil || info.Keys < len(before) {
		t.Fatalf("InspectBolt of the copy: %+v %v", info, err)
	}
	c, err := NewBolt(BoltOptions{Path: copyPath})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	for _, k := range before {
		got, err := c.ByDigest(ctxT(t), k.Digest)
		if err != nil || got.ID != k.ID {
			t.Errorf("key %s in the copy: %v %v", k.ID, got, err)
		}
	}
}

// TestBoltFileHelpers: a file another handle holds can be neither
// snapshotted from the file nor locked; a file that is no key store is
// refused by InspectBolt.
func TestBoltFileHelpers(t *testing.T) {
	s := newBoltStore(t)
	path := s.db.Path()
	if _, err := SnapshotBoltFile(path, &bytes.Buffer{}, 100*time.Millisecond); err == nil || !strings.Contains(err.Error(), "locked") {
		t.Errorf("SnapshotBoltFile of a held file: %v", err)
	}
	if _, err := LockBolt(path, 100*time.Millisecond); err == nil || !strings.Contains(err.Error(), "locked") {
		t.Errorf("LockBolt of a held file: %v", err)
	}
	s.Close()
	var buf bytes.Buffer
	if _, err := SnapshotBoltFile(path, &buf, time.Second); err != nil || buf.Len() == 0 {
		t.Errorf("SnapshotBoltFile of a released file: %d bytes, %v", buf.Len(), err)
	}
	release, err := LockBolt(path, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := NewBolt(BoltOptions{Path: path, Timeout: 100 * time.Millisecond}); err == nil {
		t.Error("NewBolt opened a file LockBolt holds")
	}
	if err := release(); err != nil {
		t.Fatal(err)
	}

	junk := filepath.Join(t.TempDir(), "junk")
	if err := os.WriteFile(junk, bytes.Repeat([]byte("x"), 8192), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := InspectBolt(junk, time.Second); err == nil {
		t.Error("InspectBolt accepted a file that is no bbolt file")
	}
}
