#!/usr/bin/env bash
# The whole test suite: vet, unit and contract tests (real Caddy, real
# redis-server, Redis Cluster and Sentinel, real backends), a few seconds of
# fuzzing per target, then an end-to-end build with xcaddy.
#
#   ./scripts/test.sh            everything (the first xcaddy build takes ~5 min)
#   SKIP_E2E=1 ./scripts/test.sh everything but the xcaddy build
#   FUZZ_SECONDS=0 ...           no fuzzing beyond the seeds (default: 3 s a target)
set -euo pipefail
cd "$(dirname "$0")/.."

# Tests start their own redis-server processes on free loopback ports:
# standalone, Cluster (created with redis-cli --cluster create) and Sentinel
# (redis-server --sentinel, the mode Debian's redis-sentinel package runs).
if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
	if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
		echo "test.sh: installing redis-server (Debian package)"
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server redis-tools >/dev/null
		# The package starts a system service; the tests do not use it.
		(service redis-server stop || true) >/dev/null 2>&1
	fi
fi
if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
	echo "test.sh: redis-server and redis-cli are required (Debian/Ubuntu: apt-get install redis-server redis-tools)" >&2
	exit 1
fi
echo "test.sh: $(redis-server --version | cut -d' ' -f1-3), $(go version)"

unformatted=$(gofmt -l $(find . -name '*.go' -not -path './.git/*'))
if [ -n "$unformatted" ]; then
	echo "test.sh: gofmt would change: $unformatted" >&2
	exit 1
fi
go vet ./...
go test -race -count=1 ./...
# The guard's benchmarks run once, so a config they build that no longer
# provisions fails here rather than in the next measurement (a few seconds;
# the limiter's and the store's take a minute even once, and are left out).
go test -run '^$' -bench . -benchtime 1x . ./requesttarget ./jwtauth ./secretscanning >/dev/null

if [ "${FUZZ_SECONDS:-3}" != 0 ]; then
	./scripts/fuzz.sh "${FUZZ_SECONDS:-3}"
fi

if [ "${SKIP_E2E:-}" != 1 ]; then
	./scripts/e2e-xcaddy.sh
fi
