// Package testredis runs a throwaway redis-server for tests.
//
// Each [Start] launches its own server on a free loopback port, with no
// persistence, in a temporary directory, and stops it when the test ends.
// Tests that need Redis fail (never skip) when redis-server is missing, so a
// green run always means the Redis code was exercised.
//
//	srv := testredis.Start(t)
//	rdb := srv.Client(t)
package testredis

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// startTimeout is how long Start and Restart wait for the server to answer
// PING.
const startTimeout = 5 * time.Second

// Server is a running redis-server owned by one test.
type Server struct {
	t    testing.TB
	bin  string
	port int
	dir  string
	conf string // config file given before the flags, or ""
	args []string

	mu   sync.Mutex
	proc *process // nil while stopped
}

// process is one run of redis-server.
type process struct {
	cmd  *exec.Cmd
	out  *lockedBuffer // its stdout and stderr, for failure messages
	done chan struct{} // closed when it has exited
	err  error         // its exit status, set before done is closed
}

// Start launches redis-server on a free 127.0.0.1 port with persistence off
// (--save "" --appendonly no) and extra command-line args appended (for
// example "--requirepass", "secret"). It waits until the server answers PING
// and registers a cleanup that kills it. It calls t.Fatalf if redis-server is
// not on PATH or does not come up within 5 seconds.
func Start(t testing.TB, args ...string) *Server {
	t.Helper()
	return startServer(t, t.TempDir(), "", args)
}

// startServer is Start with a working directory and an optional config
// file (read before the command-line flags).
func startServer(t testing.TB, dir, conf string, args []string) *Server {
	t.Helper()
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		t.Fatalf("testredis: redis-server not found on PATH (%v); these tests need a local Redis, e.g. `apt-get install redis-server`", err)
	}
	s := &Server{t: t, bin: bin, dir: dir, conf: conf, args: args}
	t.Cleanup(s.Stop)

	// A port picked by the kernel may be taken again before redis-server
	// binds it; try a few times.
	var lastErr error
	for range 3 {
		port, err := freePort()
		if err != nil {
			t.Fatalf("testredis: find a free port: %v", err)
		}
		s.port = port
		if lastErr = s.start(); lastErr == nil {
			return s
		}
	}
	t.Fatalf("testredis: %v", lastErr)
	return nil
}

// freePort asks the kernel for an unused loopback TCP port.
func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// start launches the process on s.port and waits for PING.
func (s *Server) start() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.proc != nil {
		return errors.New("redis-server is already running")
	}

	var argv []string
	if s.conf != "" {
		argv = append(argv, s.conf)
	}
	argv = append(argv,
		"--port", strconv.Itoa(s.port),
		"--bind", "127.0.0.1",
		"--save", "",
		"--appendonly", "no",
		"--protected-mode", "no",
		"--dir", s.dir,
	)
	argv = append(argv, s.args...)
	cmd := exec.Command(s.bin, argv...)
	cmd.Dir = s.dir
	p := &process{cmd: cmd, out: &lockedBuffer{}, done: make(chan struct{})}
	cmd.Stdout, cmd.Stderr = p.out, p.out
	setParentDeathSignal(cmd)
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start redis-server: %w", err)
	}
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()

	deadline := time.Now().Add(startTimeout)
	for {
		if ready(s.Addr()) {
			s.proc = p
			return nil
		}
		select {
		case <-p.done:
			return fmt.Errorf("redis-server exited during startup (%v); output:\n%s", p.err, p.out.tail())
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			_ = cmd.Process.Kill()
			<-p.done
			return fmt.Errorf("redis-server on %s did not answer PING within %s; output:\n%s", s.Addr(), startTimeout, p.out.tail())
		}
	}
}

// ready reports whether the server at addr answers PING. An error reply
// counts (with --requirepass the answer is -NOAUTH), except -LOADING, which
// means the server is still starting.
func ready(addr string) bool {
	err := ping(addr)
	var reply replyError
	if errors.As(err, &reply) {
		return !strings.HasPrefix(string(reply), "-LOADING")
	}
	return err == nil
}

// replyError is a reply to PING other than +PONG.
type replyError string

func (e replyError) Error() string { return "unexpected PING reply " + strconv.Quote(string(e)) }

// ping sends an inline PING and expects +PONG.
func ping(addr string) error {
	conn, err := net.DialTimeout("tcp", addr, 200*time.Millisecond)
	if err != nil {
		return err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(200 * time.Millisecond))
	if _, err := conn.Write([]byte("PING\r\n")); err != nil {
		return err
	}
	line, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil {
		return err
	}
	if line = strings.TrimSpace(line); line != "+PONG" {
		return replyError(line)
	}
	return nil
}

// Addr returns the server address, "127.0.0.1:<port>".
func (s *Server) Addr() string {
	return net.JoinHostPort("127.0.0.1", strconv.Itoa(s.port))
}

// URL returns a redis:// URL for database 0 of the server.
func (s *Server) URL() string {
	return "redis://" + s.Addr() + "/0"
}

// Port returns the server's TCP port.
func (s *Server) Port() int { return s.port }

// Running reports whether the server process is up (started and not
// stopped).
func (s *Server) Running() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.proc != nil
}

// Stop kills the server (SIGKILL, as a crash would) and waits for it to
// exit. Stopping a stopped server does nothing. The port stays reserved for
// Restart only in the sense that Restart uses it again; another process
// could take it meanwhile.
func (s *Server) Stop() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.proc == nil {
		return
	}
	_ = s.proc.cmd.Process.Kill()
	<-s.proc.done
	s.proc = nil
}

// Restart stops the server if it is running and starts a fresh one on the
// same port, in the same directory, with the same arguments (so with no
// data unless Start enabled persistence, e.g. "--appendonly", "yes"). It
// calls t.Fatalf if the server does not come back. Call it from the test's
// goroutine.
func (s *Server) Restart() {
	s.t.Helper()
	s.Stop()
	if err := s.start(); err != nil {
		s.t.Fatalf("testredis: restart: %v", err)
	}
}

// Client returns a go-redis client for database 0 of the server, closed when
// the test ends. It pings the server first and calls t.Fatalf if that fails.
func (s *Server) Client(t testing.TB) *redis.Client {
	t.Helper()
	c := redis.NewClient(&redis.Options{Addr: s.Addr()})
	t.Cleanup(func() { _ = c.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
	defer cancel()
	if err := c.Ping(ctx).Err(); err != nil {
		t.Fatalf("testredis: ping %s: %v", s.Addr(), err)
	}
	return c
}

// lockedBuffer is a bytes.Buffer safe for the concurrent writes of a
// process's stdout and stderr.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

// tail returns the last few KiB written, enough to explain a failed start.
func (b *lockedBuffer) tail() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	const max = 4 << 10
	out := b.buf.Bytes()
	if len(out) > max {
		out = out[len(out)-max:]
	}
	return string(out)
}

// Pause stops the server process with SIGSTOP: it keeps its port and
// connections but answers nothing, like a hung or partitioned server.
// Resume continues it; the test's cleanup resumes it before killing it.
func (s *Server) Pause() {
	s.t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.proc == nil {
		s.t.Fatal("testredis: Pause of a stopped server")
	}
	if err := s.proc.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		s.t.Fatalf("testredis: pause: %v", err)
	}
	s.t.Cleanup(s.Resume)
}

// Resume continues a paused server (SIGCONT). Resuming a running or stopped
// server does nothing.
func (s *Server) Resume() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.proc != nil {
		_ = s.proc.cmd.Process.Signal(syscall.SIGCONT)
	}
}
