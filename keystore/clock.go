package keystore

import (
	"sync/atomic"
	"time"
)

// idleClock is a coarse clock (see [CacheOptions.Now]) that stops ticking
// while nobody reads it. Reading it costs an atomic load instead of a clock
// read; a goroutine reads the time every resolution while it is being read,
// and after parkAfter ticks without a read it parks until the next read,
// which reads the time itself and wakes it. A clock that ticks for ever
// costs a server with no traffic a wake-up every 10ms: about 0.8% of a core
// on the development machine, more than everything else the cache does
// while idle.
type idleClock struct {
	now       atomic.Int64 // unix nanoseconds, as of the last tick
	read      atomic.Bool  // read since the last tick
	parked    atomic.Bool  // the goroutine waits for a read
	wake      chan struct{}
	res       time.Duration
	parkAfter int
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
		t := time.Now().UnixNano()
		c.now.Store(t)
		if c.parked.CompareAndSwap(true, false) {
			select {
			case c.wake <- struct{}{}:
			default:
			}
		}
		return t
	}
	if !c.read.Load() {
		c.read.Store(true) // written once a tick, not on every read
	}
	return c.now.Load()
}

// Tick implements otter's Clock: the ticks of its periodic clean-up.
func (c *idleClock) Tick(d time.Duration) <-chan time.Time { return time.Tick(d) }

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
		c.parked.Store(true)
		<-c.wake // the reader that cleared parked stored the time
		unread = 0
		t.Reset(c.res)
	}
}
