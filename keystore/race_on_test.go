//go:build race

package keystore

// raceEnabled reports whether the race detector is on. Under it sync.Pool
// randomly drops items, so pooled code allocates and allocation counts
// are meaningless.
const raceEnabled = true
