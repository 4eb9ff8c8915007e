//go:build !linux

package testredis

import "os/exec"

// setParentDeathSignal does nothing outside Linux: there a crashed test
// binary may leave its redis-server running.
func setParentDeathSignal(*exec.Cmd) {}
