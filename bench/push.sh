#!/bin/sh
# Push requests per second through segue's whole inbound path (HTTP parse,
# token parse + admit, signature check, protobuf decode, Lua handler and
# segue.emit, PushResponse), with keep-alive connections from a small C load
# generator, in two cases against the ceiling that matters for each, both
# measured in the same run:
#   - the same token on every request (a peer reuses its token within the
#     window): the verified-token cache answers the signature check, so the
#     ceiling is a trivial libuv HTTP responder (bench/uv_http_baseline.c)
#     under the same load, measured just before and just after (the mean);
#   - a fresh token per request (bench/push_tokens.c makes distinct tokens
#     with valid signatures): every request costs an Ed25519 verify, so the
#     ceiling is libsodium's single-core verify rate (bench/push_verify.c),
#     measured just before and just after the fresh-token runs, and their
#     mean taken: this VM's speed moves from one minute to the next, and a
#     baseline measured once, away from the run, moved the ratio with it.
#     A last row sets the 64-connection rate against every core verifying
#     at once: the share of the machine's whole verify capacity segue turns
#     into Pushes (the rest is HTTP, the store, the kernel's TCP, and the
#     load generator, which shares the cores).
#
# The fresh-token case runs twice: with CONNECTIONS, and with MANY. Eight
# connections in a closed loop measure latency more than capacity: each
# waits for its answer while its signature check is on a pool thread, so
# both cores idle part of the time; MANY peers offer enough requests to keep
# them busy, which is what the verify-rate ceiling is about.
#
#   bench/push.sh [SECONDS] [CONNECTIONS] [MANY]   (default 3 s, 8 and 64 connections)
# Uses $SEGUE, else build/RelWithDebInfo/segue (built with ./build.sh).
# BENCH_ROWS=1 prints rows for bench/run instead of the table.
set -eu
cd "$(dirname "$0")/.."
secs=${1:-${BENCH_SECONDS:-3}}
conns=${2:-8}
many=${3:-64}
SEGUE=$(realpath -m "${SEGUE:-build/RelWithDebInfo/segue}")
[ -x "$SEGUE" ] || { ./build.sh build >/dev/null; SEGUE=$(realpath build/RelWithDebInfo/segue); }
tmp=$(mktemp -d)
pids=""
cleanup() { for p in $pids; do kill "$p" 2>/dev/null || true; done; rm -rf "$tmp"; }
trap cleanup EXIT INT TERM

sh bench/build_tools.sh "$tmp"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_up() { # port
  for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:$1/healthz" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "push.sh: nothing answers on port $1" >&2; cat "$tmp/segue.log" >&2; exit 1
}

# segue signs its own tokens: its peers entry points at itself, so the one
# key fetch goes to its own Key endpoint.
sport=$(free_port)
id="bench.example:2289"
cat > "$tmp/segue.lua" <<CFG
data_dir = "$tmp/data"
server_id = "$id"
listen = "127.0.0.1:$sport"
log_level = "warn"
federation = { peers = { ["$id"] = "http://127.0.0.1:$sport" } }
CFG
"$SEGUE" key "$tmp/segue.lua" >/dev/null
cat > "$tmp/token.lua" <<LUA
local h = require("segue").harmony
local secret = assert(io.open("$tmp/data/harmony.key", "rb")):read("a")
local body = h.encode("protocol.sync.v1.PushRequest", { event = { user_invited =
  { user_id = -1, inviter_id = 42, invite_id = "bench-invite" } } })
print(h.token_create(secret, "$id", os.time(), "$id"))
print((body:gsub(".", function(c) return ("%02x"):format(c:byte()) end)))
LUA
"$SEGUE" exec "$tmp/token.lua" > "$tmp/token"
token=$(sed -n 1p "$tmp/token")
body=$(sed -n 2p "$tmp/token")
path=/protocol.sync.v1.PostboxService/Push

"$SEGUE" run "$tmp/segue.lua" 2>"$tmp/segue.log" &
pids="$pids $!"
wait_up "$sport"
# one request first: the key fetch is not part of the steady state
"$tmp/push_load" "$sport" 0.2 1 "$path" "$token" "$body" >/dev/null
bport=$(free_port)
"$tmp/uv_http_baseline" "$bport" &
pids="$pids $!"
wait_up "$bport"
# the responder just before and just after the reused-token run, as the
# verify rate around the fresh-token runs
base_before=$("$tmp/push_load" "$bport" "$secs" "$conns" "$path" "$token" "$body")
push=$("$tmp/push_load" "$sport" "$secs" "$conns" "$path" "$token" "$body")
base_after=$("$tmp/push_load" "$bport" "$secs" "$conns" "$path" "$token" "$body")
base=$(awk -v a="$base_before" -v b="$base_after" 'BEGIN { printf "%.0f", (a + b) / 2 }')
# fresh tokens: more than the requests a run makes at the verify rate; and
# others (a second earlier) for the second run, none of them verified before
n_tokens=$(awk -v s="$secs" 'BEGIN { printf "%d", s * 40000 }')
"$tmp/push_tokens" "$tmp/data/harmony.key" "$id" "$id" "$(date +%s)" "$n_tokens" > "$tmp/tokens"
"$tmp/push_tokens" "$tmp/data/harmony.key" "$id" "$id" "$(( $(date +%s) - 1 ))" "$n_tokens" > "$tmp/tokens2"
verify_before=$("$tmp/push_verify" "$secs")
fresh=$("$tmp/push_load" "$sport" "$secs" "$conns" "$path" "@$tmp/tokens" "$body")
fresh_many=$("$tmp/push_load" "$sport" "$secs" "$many" "$path" "@$tmp/tokens2" "$body")
verify_after=$("$tmp/push_verify" "$secs")
verify=$(awk -v a="$verify_before" -v b="$verify_after" 'BEGIN { printf "%.0f", (a + b) / 2 }')
cores=$(nproc)
verify_all=$("$tmp/push_verify" "$secs" "$cores")

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", a / b }'; }
if [ "${BENCH_ROWS:-}" = 1 ]; then
  echo "Push requests, token reused, $conns keep-alive connections|$push|$base|trivial libuv HTTP responder|/s"
  echo "Push requests, a fresh token each, $conns connections|$fresh|$verify|libsodium Ed25519 verify, 1 core|/s"
  echo "Push requests, a fresh token each, $many connections|$fresh_many|$verify|libsodium Ed25519 verify, 1 core|/s"
  echo "Push requests, a fresh token each, $many connections (all cores)|$fresh_many|$verify_all|libsodium Ed25519 verify, $cores threads at once|/s"
  exit 0
fi
echo "Push over hRPC: $secs s per measurement, $conns keep-alive connections, $(nproc) cores"
echo
echo "| measurement | per second | segue Push is |"
echo "|---|---|---|"
echo "| segue Push, token reused (verified-token cache) | $push | $(ratio "$push" "$base") of the responder |"
echo "| segue Push, a fresh token each (Ed25519 verify each) | $fresh | $(ratio "$fresh" "$verify") of the verify rate |"
echo "| segue Push, a fresh token each, $many connections | $fresh_many | $(ratio "$fresh_many" "$verify") of the verify rate, $(ratio "$fresh_many" "$verify_all") of every core verifying |"
echo "| trivial libuv HTTP responder (mean of before and after) | $base | |"
echo "| libsodium Ed25519 verify, 1 core (mean of before and after) | $verify | |"
echo "| libsodium Ed25519 verify, $cores threads at once | $verify_all | |"
