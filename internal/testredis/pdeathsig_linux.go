package testredis

import (
	"os/exec"
	"syscall"
)

// setParentDeathSignal makes Linux kill redis-server if the test binary dies
// without running its cleanups (a panic or a -timeout), so no server is left
// behind.
func setParentDeathSignal(cmd *exec.Cmd) {
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}
