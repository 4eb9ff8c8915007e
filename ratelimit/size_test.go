package ratelimit

import (
	"testing"
	"unsafe"
)

// TestStateLayout: a state is four cache lines and its quota slots each
// one (see state).
func TestStateLayout(t *testing.T) {
	var st state
	if s := unsafe.Sizeof(st); s != 256 {
		t.Errorf("state is %d bytes, want 256", s)
	}
	if s := unsafe.Sizeof(st.q[0]); s != 64 {
		t.Errorf("quotaSlot is %d bytes, want 64", s)
	}
	if o := unsafe.Offsetof(st.q); o%64 != 0 {
		t.Errorf("the quota slots start at byte %d, not on a cache line", o)
	}
}
