#!/bin/sh
# Builds the benchmarks' standalone C tools into DIR (bench/run, bench/push.sh
# and their rows use them; tests/integration/test_bench_build.py builds and
# runs each for a moment, so that a tool that stops building breaks the
# suite, not a later bench run):
#   bench_backend, relay_baseline     backends and the line relay (router, roundtrip)
#   push_load, uv_http_baseline       Push load generator and trivial responder
#   push_verify, push_tokens          Ed25519 verify rate; signed tokens
#   cpu_slices                        how steady the machine's speed is (machine.row)
#
#   bench/build_tools.sh DIR
set -eu
d=$(realpath -m "$1")
cd "$(dirname "$0")"
mkdir -p "$d"
cc -O2 -Wall -o "$d/bench_backend" bench_backend.c
cc -O2 -Wall -o "$d/relay_baseline" relay_baseline.c
cc -O2 -Wall -o "$d/push_load" push_load.c
cc -O2 -Wall -o "$d/uv_http_baseline" uv_http_baseline.c $(pkg-config --cflags --libs libuv)
cc -O2 -Wall -pthread -o "$d/push_verify" push_verify.c $(pkg-config --cflags --libs libsodium)
cc -O2 -Wall -o "$d/push_tokens" push_tokens.c $(pkg-config --cflags --libs libsodium)
cc -O2 -Wall -o "$d/cpu_slices" cpu_slices.c
