#!/usr/bin/env bash
# End-to-end test of the apikeys handler in a real Caddy binary built by
# xcaddy from this checkout.
#
#   scripts/e2e-xcaddy.sh
#
# It installs xcaddy (pinned, cached), builds Caddy with the xcaddy command
# README.md shows (which must pin the Caddy version go.mod requires), from
# the repository root, starts a gateway
# (apikeys + reverse_proxy) and a backend that echoes the identity headers,
# all on 127.0.0.1, then mints a key with a dashboard JWT from
# `caddy apikeys dev-token` and exercises it with curl.
#
# Output: one `ok - ...` / `not ok - ...` line per check, then
# `e2e: N passed, M failed`. Exit status is non-zero if any check failed or
# the build failed.
#
# Environment (all optional):
#   XCADDY_VERSION   xcaddy version to install (default v0.4.5)
#   E2E_CADDY_BIN    use this already-built Caddy binary and skip the build
#   XDG_CACHE_HOME   xcaddy is cached under ${XDG_CACHE_HOME:-~/.cache}/caddy-apikeys
#
# Needs: go, curl, python3 (or jq for JSON); openssl is optional.

set -euo pipefail

SCRIPT_PATH=${BASH_SOURCE[0]}
# Follow a symlink to the script, so the repo root is found from anywhere.
if resolved=$(readlink -f -- "$SCRIPT_PATH" 2>/dev/null) && [[ -n $resolved ]]; then
	SCRIPT_PATH=$resolved
fi
SCRIPT_DIR=$(cd -- "$(dirname -- "$SCRIPT_PATH")" && pwd -P)
REPO_ROOT=$(cd -- "$SCRIPT_DIR/.." && pwd -P)

XCADDY_VERSION=${XCADDY_VERSION:-v0.4.5}
CACHE_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/caddy-apikeys"
XCADDY_DIR="$CACHE_DIR/xcaddy-$XCADDY_VERSION"
XCADDY="$XCADDY_DIR/xcaddy"
OWNER=e2e-user
MODULE_ID=http.handlers.apikeys

START_SECONDS=$SECONDS
PASSED=0
FAILED=0
SUMMARY_DONE=0
CADDY_PID=""
BUILD_PID=""
TMP_DIR=""

log() { printf '# %s\n' "$*"; }

pass() {
	PASSED=$((PASSED + 1))
	printf 'ok - %s\n' "$*"
}

fail() {
	FAILED=$((FAILED + 1))
	printf 'not ok - %s\n' "$*"
}

# check <description> <command>...: runs the command, records ok/not ok.
check() {
	local desc=$1
	shift
	if "$@"; then pass "$desc"; else fail "$desc"; fi
}

summary() {
	SUMMARY_DONE=1
	log "total time $((SECONDS - START_SECONDS))s"
	printf 'e2e: %d passed, %d failed\n' "$PASSED" "$FAILED"
}

show_caddy_log() {
	if [[ -n $TMP_DIR && -s $TMP_DIR/caddy.log ]]; then
		log "last lines of the Caddy log:"
		tail -n 40 "$TMP_DIR/caddy.log" | sed 's/^/#   /'
	fi
}

# bail <description>: records a failed check that the rest depends on, and
# stops.
bail() {
	fail "$*"
	show_caddy_log
	exit 1
}

cleanup() {
	local rc=$?
	trap - EXIT INT TERM
	if [[ -n $BUILD_PID ]] && kill -0 "$BUILD_PID" 2>/dev/null; then
		# SIGINT makes xcaddy cancel `go build` and remove its build dir.
		# The build runs in its own process group when setsid exists, so
		# go and the compilers get the signal too.
		log "stopping the build (pid $BUILD_PID)"
		kill -INT -- "-$BUILD_PID" 2>/dev/null || kill -INT "$BUILD_PID" 2>/dev/null || true
		for _ in $(seq 1 200); do
			kill -0 "$BUILD_PID" 2>/dev/null || break
			sleep 0.1
		done
		kill -KILL -- "-$BUILD_PID" 2>/dev/null || kill -KILL "$BUILD_PID" 2>/dev/null || true
		wait "$BUILD_PID" 2>/dev/null || true
	fi
	if [[ -n $CADDY_PID ]] && kill -0 "$CADDY_PID" 2>/dev/null; then
		kill "$CADDY_PID" 2>/dev/null || true
		for _ in $(seq 1 50); do
			kill -0 "$CADDY_PID" 2>/dev/null || break
			sleep 0.1
		done
		kill -9 "$CADDY_PID" 2>/dev/null || true
		wait "$CADDY_PID" 2>/dev/null || true
	fi
	if [[ -n $TMP_DIR && -d $TMP_DIR ]]; then
		rm -rf -- "$TMP_DIR"
	fi
	if [[ $SUMMARY_DONE -eq 0 ]]; then
		if [[ $rc -ne 0 && $FAILED -eq 0 ]]; then
			fail "script ran to completion (aborted with status $rc)"
		fi
		summary
	fi
	if [[ $rc -eq 0 && $FAILED -gt 0 ]]; then
		rc=1
	fi
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

need() {
	command -v "$1" >/dev/null 2>&1 || bail "required command '$1' is installed"
}

need go
need curl
if ! command -v jq >/dev/null 2>&1; then
	need python3
fi

# json_get <file> <field> <subfield>: prints .field.subfield of a JSON file.
json_get() {
	if command -v jq >/dev/null 2>&1; then
		jq -er --arg a "$2" --arg b "$3" '.[$a][$b] // empty | strings' "$1" 2>/dev/null
	else
		python3 -c '
import json, sys
v = json.load(open(sys.argv[1]))[sys.argv[2]][sys.argv[3]]
if not isinstance(v, str) or not v:
    sys.exit(1)
print(v)' "$1" "$2" "$3" 2>/dev/null
	fi
}

random_hex32() {
	if command -v openssl >/dev/null 2>&1; then
		openssl rand -hex 32
	else
		od -An -tx1 -N32 /dev/urandom | tr -d ' \n'
		echo
	fi
}

# free_ports: prints two distinct free TCP ports on 127.0.0.1.
free_ports() {
	if command -v python3 >/dev/null 2>&1; then
		python3 -c '
import socket
socks = []
for _ in range(2):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
for s in socks:
    s.close()'
		return
	fi
	local found=() p
	while [[ ${#found[@]} -lt 2 ]]; do
		p=$((20000 + RANDOM % 40000))
		[[ ${#found[@]} -eq 1 && ${found[0]} -eq $p ]] && continue
		# A refused connection means nothing listens there.
		if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
			found+=("$p")
		fi
	done
	echo "${found[*]}"
}

# ---------------------------------------------------------------------------
# 1. Versions, xcaddy.

MODULE_PATH=$(awk '$1 == "module" { print $2; exit }' "$REPO_ROOT/go.mod")
[[ -n $MODULE_PATH ]] || bail "go.mod at $REPO_ROOT names a module"

if [[ -z ${CADDY_VERSION:-} ]]; then
	CADDY_VERSION=$(awk '{
		for (i = 1; i < NF; i++)
			if ($i == "github.com/caddyserver/caddy/v2") { print $(i + 1); exit }
	}' "$REPO_ROOT/go.mod")
fi
[[ $CADDY_VERSION == v2.* ]] || bail "go.mod requires github.com/caddyserver/caddy/v2 (got '${CADDY_VERSION}')"

TMP_DIR=$(mktemp -d "${TMPDIR:-/tmp}/caddy-apikeys-e2e.XXXXXX")
CADDY="$TMP_DIR/caddy"

log "repo: $REPO_ROOT ($MODULE_PATH)"
log "$(go version)"
log "caddy $CADDY_VERSION, xcaddy $XCADDY_VERSION, temp dir $TMP_DIR"

if [[ -n ${E2E_CADDY_BIN:-} ]]; then
	log "E2E_CADDY_BIN set: skipping the xcaddy build, using $E2E_CADDY_BIN"
	[[ -x $E2E_CADDY_BIN ]] || bail "E2E_CADDY_BIN ($E2E_CADDY_BIN) is an executable"
	cp -- "$E2E_CADDY_BIN" "$CADDY"
else
	if [[ -x $XCADDY ]]; then
		log "xcaddy already installed at $XCADDY"
	else
		log "installing xcaddy $XCADDY_VERSION into $XCADDY_DIR"
		mkdir -p -- "$XCADDY_DIR"
		# Run from the temp dir so this repo's go.mod plays no part.
		if ! (cd "$TMP_DIR" && GOBIN="$XCADDY_DIR" go install "github.com/caddyserver/xcaddy/cmd/xcaddy@$XCADDY_VERSION"); then
			bail "install xcaddy $XCADDY_VERSION"
		fi
	fi
	check "xcaddy $XCADDY_VERSION is installed" test -x "$XCADDY"

	# -------------------------------------------------------------------
	# 2. Build Caddy with this module from the local checkout, with the
	# very command README.md shows (its first `xcaddy build` line under
	# "Building Caddy with the module"), run from the repository root as
	# the README says, so the two cannot drift. Only --output is added.
	#
	# The README names the module with Go's zero pseudo-version, so the
	# replace directive xcaddy writes is versioned. With a bare `--with
	# module=path`, xcaddy >= v0.4.3 runs `go get module` (version
	# "latest"), which asks the module proxy for the module's version list;
	# that fails for a module that is not published (or when the proxy
	# answers 403 rather than 404/410).
	README_BUILD=$(awk '/^## Building Caddy with the module/ { s = 1 } s && /^xcaddy build / { print; exit }' "$REPO_ROOT/README.md")
	[[ -n $README_BUILD ]] || bail "README.md shows an xcaddy build command under 'Building Caddy with the module'"
	read -r -a build_words <<<"$README_BUILD"
	[[ ${build_words[2]:-} == "$CADDY_VERSION" ]] ||
		bail "README's xcaddy build pins caddy ${build_words[2]:-?}, go.mod requires $CADDY_VERSION"
	WITH="${build_words[*]:3}"
	log "building caddy $CADDY_VERSION --with $WITH (the first build takes minutes)"
	build_start=$SECONDS
	log "README: $README_BUILD"
	build_cmd=("$XCADDY" "${build_words[@]:1}" --output "$CADDY")
	if command -v setsid >/dev/null 2>&1; then
		# Own process group (same pid), so cleanup can stop go build too.
		build_cmd=(setsid --wait "${build_cmd[@]}")
	fi
	# xcaddy's build module and go's work dirs go under TMP_DIR too, so
	# nothing is left behind even if the build is interrupted.
	mkdir -p -- "$TMP_DIR/build"
	(cd "$REPO_ROOT" && TMPDIR="$TMP_DIR/build" exec "${build_cmd[@]}") &
	BUILD_PID=$!
	# Heartbeat, so CI logs show the build is alive during the long
	# `go build` step, which prints nothing.
	while kill -0 "$BUILD_PID" 2>/dev/null; do
		for _ in $(seq 1 30); do
			kill -0 "$BUILD_PID" 2>/dev/null || break
			sleep 1
		done
		if kill -0 "$BUILD_PID" 2>/dev/null; then
			log "still building... $((SECONDS - build_start))s"
		fi
	done
	build_rc=0
	wait "$BUILD_PID" || build_rc=$?
	BUILD_PID=""
	log "build took $((SECONDS - build_start))s (exit status $build_rc)"
	if [[ $build_rc -ne 0 || ! -x $CADDY ]]; then
		bail "xcaddy build of caddy $CADDY_VERSION with $MODULE_PATH"
	fi
	pass "xcaddy build of caddy $CADDY_VERSION with $MODULE_PATH"
fi

# Keep everything Caddy writes (autosave, storage, certs) inside the temp
# dir. Set only after the build, so go's own config (GOENV) is untouched.
export XDG_DATA_HOME="$TMP_DIR/data" XDG_CONFIG_HOME="$TMP_DIR/config"
mkdir -p -- "$XDG_DATA_HOME" "$XDG_CONFIG_HOME"

# ---------------------------------------------------------------------------
# 3. The binary.

version_out=$("$CADDY" version 2>&1) || true
log "caddy version: $version_out"
check "caddy version reports $CADDY_VERSION" grep -q -- "^$CADDY_VERSION" <<<"$version_out"

modules_out=$("$CADDY" list-modules 2>&1) || true
check "caddy list-modules contains $MODULE_ID" grep -qxF -- "$MODULE_ID" <<<"$modules_out"

if help_out=$("$CADDY" apikeys --help 2>&1); then
	check "caddy apikeys --help works and mentions dev-token" grep -q dev-token <<<"$help_out"
else
	fail "caddy apikeys --help works and mentions dev-token"
	printf '%s\n' "$help_out" | sed 's/^/#   /'
fi

# ---------------------------------------------------------------------------
# 4. Config.

read -r GW_PORT BE_PORT < <(free_ports)
[[ $GW_PORT =~ ^[0-9]+$ && $BE_PORT =~ ^[0-9]+$ ]] || bail "found two free ports on 127.0.0.1"
GW="http://127.0.0.1:$GW_PORT"
log "gateway $GW, backend http://127.0.0.1:$BE_PORT"

E2E_DASHBOARD_SECRET=$(random_hex32)
[[ $E2E_DASHBOARD_SECRET =~ ^[0-9a-f]{64}$ ]] || bail "generated a 64-hex dashboard secret"
export E2E_DASHBOARD_SECRET

CADDYFILE="$TMP_DIR/Caddyfile"
cat >"$CADDYFILE" <<EOF
{
	admin off
	persist_config off
	auto_https off
}

http://127.0.0.1:$GW_PORT {
	bind 127.0.0.1
	apikeys {
		store file "$TMP_DIR/keys.db"
		dashboard_jwt {
			secret {env.E2E_DASHBOARD_SECRET}
		}
		scope analytics:read GET /v1/analytics/*
	}
	reverse_proxy 127.0.0.1:$BE_PORT
}

http://127.0.0.1:$BE_PORT {
	bind 127.0.0.1
	respond "owner={http.request.header.X-Api-Key-Owner} id={http.request.header.X-Api-Key-Id} scopes={http.request.header.X-Api-Key-Scopes} auth={http.request.header.Authorization}" 200
}
EOF

if validate_out=$("$CADDY" validate --config "$CADDYFILE" --adapter caddyfile 2>&1); then
	pass "caddy validate accepts the Caddyfile"
else
	printf '%s\n' "$validate_out" | tail -n 20 | sed 's/^/#   /'
	bail "caddy validate accepts the Caddyfile"
fi

# ---------------------------------------------------------------------------
# 5. Start Caddy.

"$CADDY" run --config "$CADDYFILE" --adapter caddyfile >"$TMP_DIR/caddy.log" 2>&1 &
CADDY_PID=$!

up=0
for _ in $(seq 1 150); do # 15 s
	if ! kill -0 "$CADDY_PID" 2>/dev/null; then
		break
	fi
	if curl -s -o /dev/null --max-time 1 "$GW/"; then
		up=1
		break
	fi
	sleep 0.1
done
[[ $up -eq 1 ]] || bail "caddy run answers on $GW within 15s"
pass "caddy run answers on $GW"

# ---------------------------------------------------------------------------
# HTTP helper: request <method> <path> [curl args...] sets STATUS and BODY.

STATUS=""
BODY=""
request() {
	local method=$1 path=$2
	shift 2
	local out="$TMP_DIR/body"
	: >"$out"
	STATUS=$(curl -sS --max-time 10 -o "$out" -w '%{http_code}' -X "$method" "$@" "$GW$path" 2>"$TMP_DIR/curl.err") || STATUS=${STATUS:-000}
	BODY=$(cat "$out")
	if [[ $STATUS == 000 ]]; then
		log "curl $method $path failed: $(cat "$TMP_DIR/curl.err")"
	fi
}

# expect_status <description> <want>: checks STATUS, showing BODY if not.
expect_status() {
	if [[ $STATUS == "$2" ]]; then
		pass "$1"
	else
		fail "$1 (got HTTP $STATUS)"
		log "body: ${BODY:0:500}"
	fi
}

# ---------------------------------------------------------------------------
# 6. Dashboard JWT, mint a key.

if ! JWT=$("$CADDY" apikeys dev-token --config "$CADDYFILE" --owner "$OWNER" 2>"$TMP_DIR/dev-token.err"); then
	sed 's/^/#   /' "$TMP_DIR/dev-token.err"
	bail "caddy apikeys dev-token --owner $OWNER"
fi
JWT=$(printf '%s' "$JWT" | tr -d '\r\n')
if [[ $JWT =~ ^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$ ]]; then
	pass "caddy apikeys dev-token prints a JWT"
else
	bail "caddy apikeys dev-token prints a JWT (got ${#JWT} bytes that are not one)"
fi

request POST /v1/apikeys \
	-H "Authorization: Bearer $JWT" \
	-H 'Content-Type: application/json' \
	--data '{"name":"e2e","scopes":["analytics:read"]}'
expect_status "POST /v1/apikeys with the dashboard JWT answers 201" 201
printf '%s' "$BODY" >"$TMP_DIR/create.json"
KEY=$(json_get "$TMP_DIR/create.json" data key) || KEY=""
KEY_ID=$(json_get "$TMP_DIR/create.json" data key_id) || KEY_ID=""
[[ $KEY =~ ^wbk_[0-9a-f]{64}$ ]] || bail "the minted .data.key matches ^wbk_[0-9a-f]{64}\$ (got ${#KEY} bytes)"
pass "the minted .data.key matches ^wbk_[0-9a-f]{64}\$"
[[ -n $KEY_ID ]] || bail "the create response has .data.key_id"
pass "the create response has .data.key_id ($KEY_ID)"

# ---------------------------------------------------------------------------
# 7. Use the key.

request GET /v1/analytics/daily -H "Authorization: Bearer $KEY"
expect_status "GET /v1/analytics/daily with the key answers 200" 200
want="owner=$OWNER id=$KEY_ID scopes=analytics:read auth="
if [[ $BODY == "$want" ]]; then
	pass "the backend got owner=$OWNER, the key's id and scopes, and no Authorization"
else
	fail "the backend got owner=$OWNER, the key's id and scopes, and no Authorization"
	log "want: $want"
	log "got:  ${BODY:0:500}"
fi

request GET /v1/analytics/daily -H "Authorization: Bearer $KEY" \
	-H 'X-Api-Key-Owner: mallory' -H 'X-Api-Key-Id: forged'
if [[ $STATUS == 200 && $BODY == "$want" ]]; then
	pass "client-sent X-Api-Key-Owner / X-Api-Key-Id do not reach the backend"
else
	fail "client-sent X-Api-Key-Owner / X-Api-Key-Id do not reach the backend (HTTP $STATUS)"
	log "got: ${BODY:0:500}"
fi

request GET /v1/analytics/daily
expect_status "GET /v1/analytics/daily without Authorization answers 401" 401

request GET /v1/analytics/daily -H "Authorization: Bearer wbk_$(random_hex32)"
expect_status "GET /v1/analytics/daily with an unknown key answers 401" 401

request POST /v1/apikeys \
	-H "Authorization: Bearer $KEY" \
	-H 'Content-Type: application/json' \
	--data '{"name":"e2e-2","scopes":["analytics:read"]}'
expect_status "POST /v1/apikeys with the API key answers 403" 403

request POST /v1/analytics/daily -H "Authorization: Bearer $KEY" --data '{}'
expect_status "POST /v1/analytics/daily with the analytics:read key answers 403" 403

check "caddy is still running after the checks" kill -0 "$CADDY_PID"

if [[ $FAILED -gt 0 ]]; then
	show_caddy_log
fi
summary
[[ $FAILED -eq 0 ]]
