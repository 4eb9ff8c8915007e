// Package testcaddy builds this repository's Caddy (cmd/caddy) and runs it
// as a real child process for tests that need more than one Caddy, a kill
// -9, or a reload from outside.
package testcaddy

import (
	"bytes"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sync"
	"syscall"
	"testing"
	"time"
)

var (
	buildOnce sync.Once
	binPath   string
	buildErr  error
)

// Binary builds cmd/caddy once per test process and returns its path. The
// Go build cache makes later builds quick.
func Binary(t testing.TB) string {
	t.Helper()
	buildOnce.Do(func() {
		_, file, _, _ := runtime.Caller(0)
		root := filepath.Join(filepath.Dir(file), "..", "..")
		dir, err := os.MkdirTemp("", "caddy-apikeys-testbin-")
		if err != nil {
			buildErr = err
			return
		}
		binPath = filepath.Join(dir, "caddy")
		cmd := exec.Command("go", "build", "-o", binPath, "./cmd/caddy")
		cmd.Dir = root
		out, err := cmd.CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("go build ./cmd/caddy: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatalf("testcaddy: %v", buildErr)
	}
	return binPath
}

// Process is a running Caddy.
type Process struct {
	t      testing.TB
	cmd    *exec.Cmd
	dir    string
	logs   *lockedBuffer
	done   chan struct{}
	exited bool
}

// Start writes caddyfile into a fresh directory, runs `caddy run` on it
// with its own data and config directories and the extra environment
// (KEY=VALUE), and waits until every address in waitAddrs accepts TCP
// connections. The process is killed when the test ends.
func Start(t testing.TB, caddyfile string, waitAddrs []string, env ...string) *Process {
	t.Helper()
	bin := Binary(t)
	dir := t.TempDir()
	cfg := filepath.Join(dir, "Caddyfile")
	if err := os.WriteFile(cfg, []byte(caddyfile), 0o600); err != nil {
		t.Fatal(err)
	}
	p := &Process{t: t, dir: dir, logs: new(lockedBuffer), done: make(chan struct{})}
	p.cmd = exec.Command(bin, "run", "--config", cfg, "--adapter", "caddyfile")
	p.cmd.Dir = dir
	p.cmd.Env = append(os.Environ(), "XDG_DATA_HOME="+filepath.Join(dir, "data"), "XDG_CONFIG_HOME="+filepath.Join(dir, "config"))
	p.cmd.Env = append(p.cmd.Env, env...)
	p.cmd.Stdout, p.cmd.Stderr = p.logs, p.logs
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := p.cmd.Start(); err != nil {
		t.Fatalf("testcaddy: start: %v", err)
	}
	go func() { _ = p.cmd.Wait(); close(p.done) }()
	t.Cleanup(p.Kill)
	deadline := time.Now().Add(20 * time.Second)
	for _, addr := range waitAddrs {
		for {
			c, err := net.DialTimeout("tcp", addr, 200*time.Millisecond)
			if err == nil {
				c.Close()
				break
			}
			select {
			case <-p.done:
				t.Fatalf("testcaddy: caddy exited during startup:\n%s", p.Logs())
			default:
			}
			if time.Now().After(deadline) {
				p.Kill()
				t.Fatalf("testcaddy: %s not listening after 20s:\n%s", addr, p.Logs())
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	return p
}

// Dir is the process's working directory (holds its Caddyfile and data).
func (p *Process) Dir() string { return p.dir }

// Logs returns everything the process printed so far.
func (p *Process) Logs() string { return p.logs.String() }

// Stop asks Caddy to shut down gracefully (SIGTERM) and waits up to 10 s.
func (p *Process) Stop() { p.signal(syscall.SIGTERM, 10*time.Second) }

// Kill ends Caddy at once (SIGKILL), as a crash would.
func (p *Process) Kill() { p.signal(syscall.SIGKILL, 5*time.Second) }

func (p *Process) signal(sig syscall.Signal, wait time.Duration) {
	select {
	case <-p.done:
		return
	default:
	}
	_ = p.cmd.Process.Signal(sig)
	select {
	case <-p.done:
	case <-time.After(wait):
		_ = p.cmd.Process.Kill()
		<-p.done
	}
}

// Reload replaces the config file and runs `caddy reload` against the
// process's admin endpoint (the Caddyfile must enable one, e.g. with
// `admin 127.0.0.1:<port>`).
func (p *Process) Reload(caddyfile string) error {
	cfg := filepath.Join(p.dir, "Caddyfile")
	if err := os.WriteFile(cfg, []byte(caddyfile), 0o600); err != nil {
		return err
	}
	out, err := exec.Command(Binary(p.t), "reload", "--config", cfg, "--adapter", "caddyfile").CombinedOutput()
	if err != nil {
		return fmt.Errorf("caddy reload: %v: %s", err, out)
	}
	return nil
}

// FreePort returns a free TCP port on 127.0.0.1.
func FreePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}
