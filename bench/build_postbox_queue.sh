#!/bin/sh
# bench/build_postbox_queue.sh DIR: builds DIR/postbox_queue (bench/postbox_queue.c)
# from the runtime's own sources, for bench/postbox.row and bench/store_pg.py;
# tests/integration/test_bench_build.py builds and runs it, so a source the
# postbox comes to need shows in the suite, not only in a bench run.
set -eu
cd "$(dirname "$0")/.."
d=$1
printf '#define SEGUE_VERSION "bench"\n#define SEGUE_INSTALL_PREFIX ""\n' > "$d/segue_version.h"
cc -O2 -Iruntime/base -Iruntime/harmony -Iruntime/include -I"$d" $(pkg-config --cflags libpq) \
  -o "$d/postbox_queue" bench/postbox_queue.c runtime/base/store.c runtime/base/store_wal.c \
  runtime/base/log.c runtime/base/store_pg.c runtime/base/pq_lazy.c runtime/base/dl_lazy.c \
  runtime/base/error.c \
  runtime/harmony/postbox.c runtime/harmony/idmap.c \
  -lsqlite3 -luv $(pkg-config --libs libpq libsodium)
