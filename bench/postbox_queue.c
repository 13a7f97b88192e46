/* Queue append+drain rate of the postbox on SQLite through its real path
 * (sg__postbox_push, pull_begin/pull_end on a loop: the appends and deletes
 * of a loop turn share one transaction, acknowledged after its commit),
 * against raw SQLite INSERTs (one transaction each, same pragmas) in the
 * same run.
 *   postbox_queue DIR SECONDS -> "postbox_rate baseline_rate" (events/s)
 *   postbox_queue DIR SECONDS DSN -> "postbox_rate" on PostgreSQL (its own
 *   peer's queue, so several processes at once measure instances side by
 *   side; bench/store_pg.py) */
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "postbox.h"
#include "segue.h"

/* A typical serialized Event: UserAddedToGuild{user_id, guild_id}. */
static const uint8_t EVENT[] = {0x12, 0x10, 0x08, 0xb9, 0x60, 0x10, 0xc8, 0xd3, 0x9a,
                                0x07, 0x08, 0x01, 0x10, 0x02, 0x08, 0x03, 0x10, 0x04};

static double now_s(void) { return (double)uv_hrtime() / 1e9; }

static int refuse(void *ud, const char *peer, const uint8_t *ev, size_t len, void *call) {
  (void)ud, (void)peer, (void)ev, (void)len, (void)call;
  return SG_EHTTP;  /* the peer is down: everything goes to the queue */
}
static int ignore(void *ud, const char *peer, const uint8_t *ev, size_t len, char *e, size_t n) {
  (void)ud, (void)peer, (void)ev, (void)len, (void)e, (void)n;
  return 0;
}
static long acks;
static void acked(void *ud, int err, int how, const char *msg) {
  (void)how;
  if (err) {
    fprintf(stderr, "push: %s\n", msg);
    exit(1);
  }
  (void)ud;
  acks++;
}

static sg__postbox_batch *got;
static void batch_cb(void *ud, int err, sg__postbox_batch *b) {
  (void)ud;
  if (err) exit(1);
  got = b;
}

/* Rows in the peer's queue, as the store says (-1 until it answered). */
static int64_t queued;
static const char *queued_peer;
static void peers_cb(void *ud, int err, const char *msg, const sg__postbox_peer_status *st,
                     size_t n) {
  (void)ud;
  if (err) {
    fprintf(stderr, "peers: %s\n", msg);
    exit(1);
  }
  queued = 0;
  for (size_t i = 0; i < n; i++)
    if (strcmp(st[i].server_id, queued_peer) == 0) queued = st[i].queued;
}

/* Through the real postbox path: sg__postbox_push to a peer that is down
 * (everything goes to the durable queue, acknowledged after the commit of
 * the loop turn's batch), then drained as the peer's Pulls would (a batch
 * read, then deleted once "written"). */
static double postbox_rate(const char *dir, const char *dsn, double secs) {
  char path[512], err[600], peer[128];
  snprintf(path, sizeof path, "%s/postbox.db", dir);
  /* One queue per process: several at once on PostgreSQL do not share one. */
  snprintf(peer, sizeof peer, "peer-%d.example:2289", (int)uv_os_getpid());
  sg__store *s;
  uv_loop_t loop;
  sg__postbox *pb;
  uv_loop_init(&loop);
  sg__store_config c = {.engine = dsn ? "postgresql" : "sqlite", .path = path, .dsn = dsn,
                        .loop = &loop};
  if (sg__store_open_with(&c, &s, err, sizeof err)) {
    fprintf(stderr, "%s\n", err);
    exit(1);
  }
  sg__postbox_transport tp = {refuse, ignore, NULL};
  sg__postbox_options o;
  sg__postbox_options_default(&o);
  o.push_tries = 1;
  o.queue_limit = 1u << 30;
  sg__postbox_new(&loop, s, &tp, &o, &pb);
  long n = 0;
  double t0 = now_s();
  while (now_s() - t0 < secs) {
    for (int i = 0; i < 1000; i++) {
      if (sg__postbox_push(pb, peer, EVENT, sizeof EVENT, acked, NULL) < 0) {
        fprintf(stderr, "push: %s\n", sg__postbox_errmsg(pb));
        exit(1);
      }
    }
    n += 1000;
    while (acks < n) uv_run(&loop, UV_RUN_ONCE);  /* acknowledged: committed */
    for (;;) {  /* drain as a peer's Pulls would */
      got = NULL;
      sg__postbox_pull_begin(pb, peer, 512 * 1024, batch_cb, NULL);
      while (!got) uv_run(&loop, UV_RUN_ONCE);
      size_t k = got->n;
      sg__postbox_pull_end(pb, got, 0);
      if (k) continue;  /* the next Pull waits for this one's delete */
      queued = -1;      /* empty: drained, or the last delete still runs */
      queued_peer = peer;
      sg__postbox_peers(pb, peers_cb, NULL);
      while (queued < 0) uv_run(&loop, UV_RUN_ONCE);
      if (queued == 0) break;
    }
  }
  double rate = (double)n / (now_s() - t0);
  sg__postbox_close(pb, NULL, NULL);
  sg__store_close(s);  /* PostgreSQL: its connections' handles close in the loop */
  uv_run(&loop, UV_RUN_DEFAULT);
  uv_loop_close(&loop);
  return rate;
}

static double baseline_rate(const char *dir, double secs) {
  char path[512];
  snprintf(path, sizeof path, "%s/baseline.db", dir);
  sqlite3 *db;
  sqlite3_stmt *st;
  sqlite3_open(path, &db);
  sqlite3_exec(db, "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;"
               "CREATE TABLE q(seq INTEGER PRIMARY KEY, peer TEXT, event BLOB, created INTEGER)",
               NULL, NULL, NULL);
  sqlite3_prepare_v2(db, "INSERT INTO q(peer, event, created) VALUES (?1, ?2, ?3)", -1, &st, NULL);
  long n = 0;
  double t0 = now_s();
  while (now_s() - t0 < secs) {
    for (int i = 0; i < 1000; i++, n++) {
      sqlite3_bind_text(st, 1, "peer.example:2289", -1, SQLITE_STATIC);
      sqlite3_bind_blob(st, 2, EVENT, sizeof EVENT, SQLITE_STATIC);
      sqlite3_bind_int64(st, 3, n);
      if (sqlite3_step(st) != SQLITE_DONE) exit(1);
      sqlite3_reset(st);
    }
  }
  double rate = (double)n / (now_s() - t0);
  sqlite3_finalize(st);
  sqlite3_close(db);
  return rate;
}

int main(int argc, char **argv) {
  if (argc < 3) return 2;
  double secs = atof(argv[2]);
  if (argc > 3) {  /* PostgreSQL: the postbox's rate only */
    printf("%.0f\n", postbox_rate(argv[1], argv[3], secs));
    return 0;
  }
  printf("%.0f %.0f\n", postbox_rate(argv[1], NULL, secs), baseline_rate(argv[1], secs));
  return 0;
}
