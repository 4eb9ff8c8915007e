package main

// This file is the load generator: a minimal HTTP/1.1 keep-alive client
// (pre-built request bytes, responses parsed only as far as their status
// and length), so that on a 2-core machine as little CPU as possible goes
// to generating load. Closed loop measures peak throughput; open loop sends
// at a fixed rate on a fixed schedule and measures each latency from the
// time the request was due, so a stalled server cannot hide its latency
// (no coordinated omission).

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// target is a server to load and the requests to send it, one per API key;
// requests are picked with a Zipf distribution over the keys.
type target struct {
	addr     string
	requests [][]byte
}

func newTarget(addr, path string, keys []string) *target {
	t := &target{addr: addr}
	for _, k := range keys {
		t.requests = append(t.requests, []byte("GET "+path+" HTTP/1.1\r\nHost: "+addr+
			"\r\nUser-Agent: apikeys-bench\r\nAuthorization: Bearer "+k+"\r\n\r\n"))
	}
	return t
}

// picker draws key indexes from a Zipf distribution (s = zipfS): a few keys
// get most requests, as with real API clients.
type picker struct{ z *rand.Zipf }

const zipfS = 1.1

func newPicker(seed uint64, n int) *picker {
	r := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	return &picker{z: rand.NewZipf(r, zipfS, 1, uint64(n-1))}
}

func (p *picker) next() int { return int(p.z.Uint64()) }

// client is one keep-alive connection.
type client struct {
	addr string
	c    net.Conn
	r    *bufio.Reader
}

func (c *client) dial() error {
	conn, err := net.DialTimeout("tcp", c.addr, 2*time.Second)
	if err != nil {
		return err
	}
	if c.c != nil {
		c.c.Close()
	}
	c.c = conn
	if c.r == nil {
		c.r = bufio.NewReaderSize(conn, 16<<10)
	} else {
		c.r.Reset(conn)
	}
	return nil
}

func (c *client) close() {
	if c.c != nil {
		c.c.Close()
	}
}

var errResponse = errors.New("malformed response")

// do sends req and reads the response; it returns the status code. On an
// I/O error the connection is re-dialled for the next request.
func (c *client) do(req []byte) (int, error) {
	if c.c == nil {
		if err := c.dial(); err != nil {
			return 0, err
		}
	}
	status, err := c.roundTrip(req)
	if err != nil {
		c.close()
		c.c = nil
	}
	return status, err
}

func (c *client) roundTrip(req []byte) (int, error) {
	_ = c.c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.c.Write(req); err != nil {
		return 0, err
	}
	line, err := c.r.ReadSlice('\n')
	if err != nil {
		return 0, err
	}
	if len(line) < 12 || !bytes.HasPrefix(line, []byte("HTTP/1.1 ")) {
		return 0, errResponse
	}
	status, err := strconv.Atoi(string(line[9:12]))
	if err != nil {
		return 0, errResponse
	}
	length, closeAfter := -1, false
	for {
		line, err = c.r.ReadSlice('\n')
		if err != nil {
			return 0, err
		}
		if len(line) <= 2 {
			break
		}
		name, value, ok := bytes.Cut(line, []byte(":"))
		if !ok {
			return 0, errResponse
		}
		value = bytes.TrimSpace(value)
		switch {
		case bytes.EqualFold(name, []byte("Content-Length")):
			if length, err = strconv.Atoi(string(value)); err != nil {
				return 0, errResponse
			}
		case bytes.EqualFold(name, []byte("Transfer-Encoding")):
			return 0, fmt.Errorf("%w: chunked responses are not supported", errResponse)
		case bytes.EqualFold(name, []byte("Connection")) && bytes.EqualFold(value, []byte("close")):
			closeAfter = true
		}
	}
	if length < 0 {
		return 0, fmt.Errorf("%w: no Content-Length", errResponse)
	}
	if _, err := c.r.Discard(length); err != nil {
		return 0, err
	}
	if closeAfter {
		c.close()
		c.c = nil
	}
	return status, nil
}

// result is what one measured run produced.
type result struct {
	Requests  int64         `json:"requests"`
	Errors    int64         `json:"errors"` // I/O errors and non-200 answers
	Duration  time.Duration `json:"duration_ns"`
	RPS       float64       `json:"rps"`
	P50       time.Duration `json:"p50_ns"`
	P90       time.Duration `json:"p90_ns"`
	P99       time.Duration `json:"p99_ns"`
	P999      time.Duration `json:"p999_ns"`
	Max       time.Duration `json:"max_ns"`
	Behind    int64         `json:"behind"` // open loop: requests sent more than 1ms late
	RedisCmds int64         `json:"redis_commands"`
}

// closedLoop keeps conns requests in flight for d and reports throughput.
func closedLoop(t *target, conns int, d time.Duration, seed uint64) result {
	var (
		wg       sync.WaitGroup
		requests atomic.Int64
		errs     atomic.Int64
		stop     atomic.Bool
		mu       sync.Mutex
		lats     []time.Duration
	)
	start := time.Now()
	for w := range conns {
		wg.Go(func() {
			c := &client{addr: t.addr}
			defer c.close()
			p := newPicker(seed+uint64(w), len(t.requests))
			local := make([]time.Duration, 0, 1<<14)
			for !stop.Load() {
				t0 := time.Now()
				status, err := c.do(t.requests[p.next()])
				local = append(local, time.Since(t0))
				requests.Add(1)
				if err != nil || status != 200 {
					errs.Add(1)
					if err != nil {
						time.Sleep(time.Millisecond)
					}
				}
			}
			mu.Lock()
			lats = append(lats, local...)
			mu.Unlock()
		})
	}
	time.Sleep(d)
	stop.Store(true)
	wg.Wait()
	elapsed := time.Since(start)
	r := result{Requests: requests.Load(), Errors: errs.Load(), Duration: elapsed}
	r.RPS = float64(r.Requests) / elapsed.Seconds()
	r.setPercentiles(lats)
	return r
}

// openLoop sends rate requests a second for d on a fixed schedule over up
// to conns connections, and measures each latency from the request's due
// time.
func openLoop(t *target, rate float64, conns int, d time.Duration, seed uint64) result {
	n := int(rate * d.Seconds())
	interval := time.Duration(float64(time.Second) / rate)
	jobs := make(chan time.Duration, n)
	var (
		wg     sync.WaitGroup
		errs   atomic.Int64
		behind atomic.Int64
		mu     sync.Mutex
		lats   = make([]time.Duration, 0, n)
	)
	start := time.Now()
	for range conns {
		wg.Go(func() {
			c := &client{addr: t.addr}
			defer c.close()
			local := make([]time.Duration, 0, n/conns+1)
			for due := range jobs {
				// The key is picked by the request's number, so every
				// configuration gets the same sequence.
				i := int(due / interval)
				status, err := c.do(t.requests[keyOrder[i%len(keyOrder)]%len(t.requests)])
				local = append(local, time.Since(start)-due)
				if err != nil || status != 200 {
					errs.Add(1)
				}
			}
			mu.Lock()
			lats = append(lats, local...)
			mu.Unlock()
		})
	}
	for i := range n {
		due := time.Duration(i) * interval
		if wait := due - time.Since(start); wait > 0 {
			time.Sleep(wait)
		} else if wait < -time.Millisecond {
			behind.Add(1)
		}
		jobs <- due
	}
	close(jobs)
	wg.Wait()
	elapsed := time.Since(start)
	r := result{Requests: int64(n), Errors: errs.Load(), Duration: elapsed, Behind: behind.Load()}
	r.RPS = float64(n) / elapsed.Seconds()
	r.setPercentiles(lats)
	return r
}

// keyOrder is a fixed Zipf-distributed sequence of key indexes for the
// open-loop runs (set by main).
var keyOrder []int

func zipfSequence(n, keys int, seed uint64) []int {
	p := newPicker(seed, keys)
	out := make([]int, n)
	for i := range out {
		out[i] = p.next()
	}
	return out
}

func (r *result) setPercentiles(lats []time.Duration) {
	if len(lats) == 0 {
		return
	}
	slices.Sort(lats)
	at := func(q float64) time.Duration {
		i := int(q*float64(len(lats))+0.999999) - 1
		return lats[max(0, min(i, len(lats)-1))]
	}
	r.P50, r.P90, r.P99, r.P999, r.Max = at(0.50), at(0.90), at(0.99), at(0.999), lats[len(lats)-1]
}
