package keystore

import (
	"syscall"
	"testing"
	"time"
)

// TestIdleClockParks: the clock is within its resolution while read, parks
// when nobody reads it (no more wake-ups: the process uses almost no CPU),
// and a read after parking returns the current time at once.
func TestIdleClockParks(t *testing.T) {
	c := newIdleClock(time.Millisecond, 20)
	for range 50 {
		if d := time.Now().UnixNano() - c.NowNano(); d < -int64(time.Millisecond) || d > int64(50*time.Millisecond) {
			t.Fatalf("clock off by %v while read", time.Duration(d))
		}
		time.Sleep(time.Millisecond)
	}
	deadline := time.Now().Add(5 * time.Second)
	for !c.parked.Load() {
		if time.Now().After(deadline) {
			t.Fatal("the clock never parked")
		}
		time.Sleep(10 * time.Millisecond)
	}
	// Parked: 500ms without reads costs next to no CPU (a ticking 1ms
	// clock would wake up 500 times).
	cpu0 := processCPU()
	time.Sleep(500 * time.Millisecond)
	if used := processCPU() - cpu0; used > 20*time.Millisecond {
		t.Errorf("parked clock: the process used %v of CPU in 500ms", used)
	}
	// A burst of reads (a background pass) gets the precise time and
	// leaves it parked.
	for range 1000 {
		before := time.Now().UnixNano()
		if got := c.NowNano(); got < before {
			t.Fatalf("a read of the parked clock returned a stale time (%v old)", time.Duration(before-got))
		}
	}
	time.Sleep(5 * time.Millisecond)
	if !c.parked.Load() {
		t.Error("a burst of reads woke the clock")
	}
	// Reads spread over more than wakeAfter (requests) wake it.
	for range 3 {
		c.NowNano()
		time.Sleep(wakeAfter / 2)
	}
	time.Sleep(2 * time.Millisecond) // less than parkAfter ticks
	if c.parked.Load() {
		t.Error("reads spread over time did not wake the clock")
	}
	if d := time.Now().UnixNano() - c.NowNano(); d > int64(50*time.Millisecond) {
		t.Errorf("clock off by %v after waking", time.Duration(d))
	}
}

func processCPU() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
