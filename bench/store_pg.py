#!/usr/bin/env python3
"""Rows for bench/run (via bench/store_pg.row): the store's PostgreSQL engine
beside SQLite, measured in the same run, with 1, 2 and 3 instances (segue
processes at once on one database; their rates add up).
  - the router's store work per message (log, map_put, map_origin, map_copies)
  - messages routed between two subprocess backends through the router
  - the postbox's queue, append+drain through its real path (bench/
    postbox_queue.c: sg__postbox_push to a peer that is down, then Pulls),
    one queue per instance
SQLite is the baseline: one instance on one file (SQLite has no several
instances). PostgreSQL is a real server started here (tests/integration/
pg_server.py) on a Unix socket; skipped (no rows) without its binaries."""
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "integration"))
import pg_server  # noqa: E402

SEGUE = os.environ["SEGUE"]
SECS = int(os.environ.get("BENCH_SECONDS", "3"))
TMP = os.environ.get("BENCH_TMP") or tempfile.mkdtemp()
BACKEND = os.path.join(TMP, "bench_backend")
QUEUE = os.path.join(TMP, "postbox_queue")
ROOT = os.path.join(HERE, "..")


def build_queue():
    """bench/postbox_queue.c, built from the runtime's sources (bench/build_postbox_queue.sh)."""
    if not os.path.exists(QUEUE):
        subprocess.run(["sh", os.path.join(ROOT, "bench/build_postbox_queue.sh"), TMP], check=True)


def queue_many(where, dsn, k):
    """k processes at once, each its own peer's queue; the sum of their rates."""
    os.makedirs(where, exist_ok=True)
    args = [QUEUE, where, str(SECS)] + ([dsn] if dsn else [])
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) for _ in range(k)]
    total = 0
    for p in procs:
        out, _ = p.communicate(timeout=900)
        if p.returncode != 0:
            raise SystemExit("postbox_queue %s failed" % ("postgresql" if dsn else "sqlite"))
        total += float(out.split()[0])
    return total


def run_many(mode, engine, where, n, k):
    """k instances at once; the sum of their rates."""
    procs = [subprocess.Popen([SEGUE, "-q", "exec", os.path.join(HERE, "store_bench.lua"), mode, engine,
                               where, str(n), BACKEND], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
             for _ in range(k)]
    total = 0
    for p in procs:
        out, _ = p.communicate(timeout=900)
        if p.returncode != 0:
            raise SystemExit("store_bench %s %s failed" % (mode, engine))
        total += float(out.split()[0])
    return total


def main():
    if not os.path.exists(BACKEND):
        subprocess.run(["sh", os.path.join(ROOT, "bench/build_tools.sh"), TMP], check=True)
    if not pg_server.available():
        sys.stderr.write("store_pg: %s; no rows\n" % pg_server.MISSING)
        return
    build_queue()  # before anything is made: a failed build leaves nothing behind
    d = tempfile.mkdtemp(prefix="segue-bench-")
    try:
        pg = pg_server.PgServer()
    except BaseException:
        shutil.rmtree(d, ignore_errors=True)
        raise
    try:
        pg.start()
        sqlite_queue = queue_many(os.path.join(d, "queue"), None, 1)
        n_ops, n_route = 300 * SECS, 1000 * SECS
        sqlite_ops = run_many("ops", "sqlite", os.path.join(d, "ops.db"), n_ops, 1)
        sqlite_route = run_many("route", "sqlite", os.path.join(d, "route.db"), n_route, 1)
        for k in (1, 2, 3):
            db = "b%d" % k
            pg.psql("CREATE DATABASE %s" % db)
            dsn = pg.dsn.replace("dbname=postgres", "dbname=" + db)
            ops = run_many("ops", "postgresql", dsn, n_ops, k)
            route = run_many("route", "postgresql", dsn, n_route, k)
            print("store work per routed message, PostgreSQL, %d instance(s)|%.0f|%.0f|SQLite, 1 instance|msgs/s" % (k, ops, sqlite_ops))
            print("messages routed with the store, PostgreSQL, %d instance(s)|%.0f|%.0f|SQLite, 1 instance|msgs/s" % (k, route, sqlite_route))
            queue = queue_many(os.path.join(d, "queue%d" % k), dsn, k)
            print("postbox queue append+drain, PostgreSQL, %d instance(s)|%.0f|%.0f|SQLite, 1 instance|events/s" % (k, queue, sqlite_queue))
    finally:
        pg.cleanup()
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
