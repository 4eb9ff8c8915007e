package keystore

import (
	"sync/atomic"
	"time"
)

// idleClock is a coarse clock (see [CacheOptions.Now]) that stops ticking
// while nobody reads it. Reading it costs an atomic load instead of a clock
// read; a goroutine reads the time every resolution while it is being read,
// and after parkAfter ticks without a read it parks until reads come
// spread over time again (see parkedRead); until then each read reads the
// time itself. A clock that ticks for ever costs a server with no traffic
// a wake-up every 10ms: about 0.8% of a core on the development machine,
// more than everything else the cache does while idle.
type idleClock struct {
	now    atomic.Int64 // unix nanoseconds, as of the last tick
	read   atomic.Bool  // read since the last tick
	parked atomic.Bool  // the goroutine waits for reads
	// firstParkedRead is the time of the first of the reads that may wake
	// a parked clock (see parkedRead).
	firstParkedRead atomic.Int64
	wake            chan struct{}
	res             time.Duration
	parkAfter       int
}

// newIdleClock starts a clock of the given resolution that parks after
// parkAfter ticks without a read.
func newIdleClock(res time.Duration, parkAfter int) *idleClock {
	c := &idleClock{wake: make(chan struct{}, 1), res: res, parkAfter: parkAfter}
	c.now.Store(time.Now().UnixNano())
	go c.run()
	return c
}

// NowNano returns the time, in unix nanoseconds, to within the clock's
// resolution.
func (c *idleClock) NowNano() int64 {
	if c.parked.Load() {
		return c.parkedRead()
	}
	if !c.read.Load() {
		c.read.Store(true) // written once a tick, not on every read
	}
	return c.now.Load()
}

// wakeAfter and wakeWithin say when reads of a parked clock wake it: a
// read at least wakeAfter after an earlier one, within wakeWithin of it,
// shows reads spread over time (requests), not one burst (a background
// pass over many records, which reads the time itself and leaves the clock
// parked).
const (
	wakeAfter  = 20 * time.Millisecond
	wakeWithin = time.Second
)

// parkedRead is a read of a parked clock: the precise time, and the wake-up
// of the goroutine once reads keep coming.
func (c *idleClock) parkedRead() int64 {
	t := time.Now().UnixNano()
	c.now.Store(t)
	first := c.firstParkedRead.Load()
	switch d := time.Duration(t - first); {
	case first == 0 || d >= wakeWithin:
		c.firstParkedRead.CompareAndSwap(first, t)
	case d >= wakeAfter && c.parked.CompareAndSwap(true, false):
		select {
		case c.wake <- struct{}{}:
		default:
		}
	}
	return t
}

// Tick implements otter's Clock: the ticks of its periodic clean-up of
// expired entries, which only reclaims memory (freshness is the
// CachedStore's own), at most every 10s instead of every second.
func (c *idleClock) Tick(d time.Duration) <-chan time.Time { return time.Tick(max(d, 10*time.Second)) }

func (c *idleClock) run() {
	t := time.NewTicker(c.res)
	unread := 0
	for range t.C {
		c.now.Store(time.Now().UnixNano())
		if c.read.Swap(false) {
			unread = 0
			continue
		}
		if unread++; unread < c.parkAfter {
			continue
		}
		t.Stop()
		c.firstParkedRead.Store(0)
		c.parked.Store(true)
		<-c.wake // the reader that cleared parked stored the time
		unread = 0
		t.Reset(c.res)
	}
}
