#!/usr/bin/env bash
# Runs every fuzz target as a fuzzer for N seconds each (default 60).
#
#   ./scripts/fuzz.sh        60 s per target
#   ./scripts/fuzz.sh 5      5 s per target (what scripts/test.sh does)
#
# Plain `go test` already runs each target's seeds: the f.Add calls and the
# committed corpora in testdata/fuzz/<FuzzName>/. A failure found here is
# written to testdata/fuzz/<FuzzName>/<hash> by `go test`: fix the bug and
# commit that file, so the input stays a regression seed.
# The first run builds Caddy with fuzzing instrumentation (a few minutes).
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-60}
case $seconds in
'' | *[!0-9]*)
	echo "usage: $0 [seconds per target]" >&2
	exit 2
	;;
esac

# package and target, one pair a line
targets=$(
	for pkg in . ./keystore ./requesttarget ./secretscanning; do
		go test -list '^Fuzz' "$pkg" | grep '^Fuzz' | sed "s|^|$pkg |"
	done
)
if [ -z "$targets" ]; then
	echo "fuzz.sh: no fuzz targets found" >&2
	exit 1
fi
# Go 1.26's fuzzing coordinator can fail a target with a bare "context
# deadline exceeded" when -fuzztime ends while a worker is mid-run on a busy
# machine (golang/go#75804, fixed in Go 1.27): no input is found and none is
# written. Such a run is retried, twice at most; a run that wrote a failing
# input, or failed any other way, fails the script.
fuzz_one() {
	local pkg=$1 target=$2 log try
	log=$(mktemp)
	for try in 1 2 3; do
		if go test -run '^$' -fuzz "^${target}\$" -fuzztime "${seconds}s" "$pkg" 2>&1 | tee "$log"; then
			rm -f "$log"
			return 0
		fi
		if [ "$try" = 3 ] || ! grep -q '^    context deadline exceeded$' "$log" || grep -q 'Failing input written' "$log"; then
			rm -f "$log"
			return 1
		fi
		echo "fuzz.sh: $target stopped on Go's fuzztime deadline race (golang/go#75804), nothing found; again"
	done
}

while read -r pkg target; do
	echo "fuzz.sh: $target ($pkg) for ${seconds}s"
	fuzz_one "$pkg" "$target"
done <<<"$targets"
echo "fuzz.sh: $(echo "$targets" | wc -l) targets fuzzed for ${seconds}s each, no failure"
