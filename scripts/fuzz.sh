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
while read -r pkg target; do
	echo "fuzz.sh: $target ($pkg) for ${seconds}s"
	go test -run '^$' -fuzz "^${target}\$" -fuzztime "${seconds}s" "$pkg"
done <<<"$targets"
echo "fuzz.sh: $(echo "$targets" | wc -l) targets fuzzed for ${seconds}s each, no failure"
