/* The SQLite store's WAL checkpoints (runtime/base/store_wal.h): done by the
 * checkpoint thread, not by the thread that commits; bounded when that
 * thread cannot keep up; stopped cleanly by a close; its errors logged with
 * the database's path. Outcomes are read from the files: the database file
 * alone (without its WAL) holds the rows once they are copied back, and the
 * WAL file's size is the most it ever held. */
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <uv.h>

#include "log.h"
#include "segue.h"
#include "store.h"
#include "store_wal.h"
#include "tap.h"

#define FRAME_BYTES (4096 + 24) /* a WAL frame: its header and a 4 KiB page */
#define WAIT_MS 20000

static char dir[] = "/tmp/segue-test-wal-XXXXXX";
static char path[256], wal[300];

static long long file_size(const char *p) {
  struct stat st;
  return stat(p, &st) == 0 ? (long long)st.st_size : -1;
}

static long long wal_frames(void) {
  long long n = file_size(wal);
  return n > 32 ? (n - 32) / FRAME_BYTES : 0;
}

static sg__store *open_with(unsigned pages, unsigned limit, const sg__logger *log) {
  sg__store_config c = {0};
  c.path = path;
  c.wal_pages = pages;
  c.wal_limit = limit;
  c.log = log;
  sg__store *s = NULL;
  char err[600] = "";
  int rc = sg__store_open_with(&c, &s, err, sizeof err);
  if (rc != 0) fprintf(stderr, "open: %s\n", err);
  CHECK(rc == 0 && s != NULL && sg__store_wal(s) != NULL);
  return s;
}

/* Rows of about half a page each, one commit each. */
static void write_rows(sg__store *s, const char *prefix, int from, int n) {
  char key[64], value[2048];
  for (int i = from; i < from + n; i++) {
    snprintf(key, sizeof key, "%s%d", prefix, i);
    memset(value, 'a' + i % 26, sizeof value - 1);
    value[sizeof value - 1] = '\0';
    CHECK(sg__store_kv_set(s, key, value) == 0);
  }
}

/* Rows with `prefix` in the database file at `p`, opened alone: a copy of
 * segue.db without its WAL sees only what was checkpointed. */
static long long rows_in(const char *p, const char *prefix) {
  /* read-write: a WAL-mode file needs its -shm, which a reader may create */
  sqlite3 *db;
  sqlite3_stmt *st;
  long long v = -1;
  if (sqlite3_open_v2(p, &db, SQLITE_OPEN_READWRITE, NULL) == SQLITE_OK
      && sqlite3_prepare_v2(db, "SELECT count(*) FROM kv WHERE key LIKE ?1 || '%'", -1, &st,
                            NULL) == SQLITE_OK) {
    sqlite3_bind_text(st, 1, prefix, -1, SQLITE_STATIC);
    if (sqlite3_step(st) == SQLITE_ROW) v = sqlite3_column_int64(st, 0);
    sqlite3_finalize(st);
  }
  sqlite3_close(db);
  return v;
}

static long long rows_in_file_alone(const char *prefix) {
  char copy[320];
  snprintf(copy, sizeof copy, "%s/alone.db", dir);
  FILE *in = fopen(path, "rb"), *out = fopen(copy, "wb");
  char buf[65536];
  size_t n;
  while (in && out && (n = fread(buf, 1, sizeof buf, in)) > 0) fwrite(buf, 1, n, out);
  if (in) fclose(in);
  if (out) fclose(out);
  long long v = rows_in(copy, prefix);
  unlink(copy);
  strcat(copy, "-wal");
  unlink(copy);
  copy[strlen(copy) - 4] = '\0';
  strcat(copy, "-shm");
  unlink(copy);
  return v;
}

static void remove_db(void) {
  char p[320];
  unlink(path);
  unlink(wal);
  snprintf(p, sizeof p, "%s-shm", path);
  unlink(p);
}

/* Past the threshold the committing thread does not checkpoint (held: the
 * database file stays as it was); released, the thread copies the pages back
 * while this thread makes no store call; the next commits reuse the WAL
 * from its start; nothing is lost across close and reopen. */
static void test_checkpoint_off_the_committing_thread(void) {
  /* The schema into the database file: the last connection's close
   * checkpoints. */
  sg__store_close(open_with(50, 100000, NULL));
  CHECK(rows_in_file_alone("w") == 0);
  sg__store *s = open_with(50, 100000, NULL);
  sg__wal *w = sg__store_wal(s);
  sg__wal_hold(w, 1);
  write_rows(s, "w", 0, 150);
  CHECK(wal_frames() >= 50);
  CHECK(sg__wal_done(w) == 0);
  CHECK(rows_in_file_alone("w") == 0);  /* nobody checkpointed */

  sg__wal_hold(w, 0);
  long long waited = 0;
  while (sg__wal_done(w) == 0 && waited < WAIT_MS) {
    uv_sleep(5);
    waited += 5;
  }
  CHECK(sg__wal_done(w) >= 1);
  CHECK(rows_in_file_alone("w") == 150);  /* copied back by the thread */

  /* The WAL restarts at the next commit: more rows do not grow it (without
   * the checkpoint they would add about 150 frames). */
  long long before = file_size(wal);
  write_rows(s, "x", 0, 20);
  CHECK(file_size(wal) == before);
  sg__store_close(s);

  s = open_with(50, 100000, NULL);
  CHECK(rows_in(path, "w") == 150);
  CHECK(rows_in(path, "x") == 20);
  sg__store_close(s);
  remove_db();
}

/* The checkpoint thread cannot keep up (held): the committing thread keeps
 * the WAL under its limit by checkpointing itself. */
static void test_bound_when_the_thread_cannot_checkpoint(void) {
  const unsigned limit = 120;
  sg__store *s = open_with(20, limit, NULL);
  sg__wal_hold(sg__store_wal(s), 1);
  long long most = 0;
  for (int i = 0; i < 600; i += 10) {
    write_rows(s, "b", i, 10);
    if (wal_frames() > most) most = wal_frames();
  }
  /* A commit may pass the limit by its own frames (a few here), no more. */
  CHECK(most >= limit);
  CHECK(most <= limit + 8);
  CHECK(sg__wal_done(sg__store_wal(s)) == 0);
  CHECK(rows_in_file_alone("b") > 0);  /* this thread copied them back */
  sg__store_close(s);                  /* stops a held thread */
  s = open_with(20, limit, NULL);
  CHECK(rows_in(path, "b") == 600);
  sg__store_close(s);
  remove_db();
}

/* A close while the thread may be checkpointing waits for it; nothing is
 * lost (ASan/valgrind see the rest). */
static void test_close_during_checkpoint(void) {
  for (int round = 0; round < 5; round++) {
    sg__store *s = open_with(10, 100000, NULL);
    write_rows(s, "c", round * 100, 100);
    sg__store_close(s);
  }
  CHECK(rows_in(path, "c") == 500);
  remove_db();
}

typedef struct {
  int lines;
  char line[1024];
} captured;

static void capture(void *data, sg_log_level level, const char *line) {
  captured *c = data;
  if (level <= SG_LOG_WARN && strstr(line, "checkpoint")) {
    c->lines++;
    snprintf(c->line, sizeof c->line, "%s", line);
  }
}

/* The thread's error is logged, naming the database, by the committing
 * thread at its next commit: here the thread cannot open its connection
 * (the file was renamed away). */
static void test_thread_error_is_logged(void) {
  captured got = {0};
  sg__logger log = {SG_LOG_INFO, capture, &got};
  sg__store *s = open_with(20, 100000, &log);
  sg__wal *w = sg__store_wal(s);
  char moved[320];
  snprintf(moved, sizeof moved, "%s/moved.db", dir);
  sg__wal_hold(w, 1);
  write_rows(s, "e", 0, 50);
  CHECK(rename(path, moved) == 0);
  sg__wal_hold(w, 0);
  long long waited = 0;
  while (sg__wal_done(w) == 0 && waited < WAIT_MS) {
    uv_sleep(5);
    waited += 5;
  }
  CHECK(rename(moved, path) == 0);
  CHECK(got.lines == 0);  /* logged on the committing thread, not from the thread */
  write_rows(s, "e", 50, 1);
  CHECK(got.lines == 1);
  CHECK(strstr(got.line, "level=warn") != NULL);
  CHECK(strstr(got.line, path) != NULL);
  CHECK(strstr(got.line, "cannot open") != NULL);
  sg__store_close(s);
  s = open_with(20, 100000, NULL);
  CHECK(rows_in(path, "e") == 51);
  sg__store_close(s);
  remove_db();
}

static void capture_warnings(void *data, sg_log_level level, const char *line) {
  captured *c = data;
  if (level <= SG_LOG_WARN) {
    c->lines++;
    snprintf(c->line, sizeof c->line, "%s", line);
  }
}

/* A reader that keeps its snapshot keeps the bound's RESTART from finishing:
 * the committing thread waits for it SG_WAL_RESTART_WAIT_MS, not the 5 s
 * busy timeout; that is logged, and it tries again only a quarter of the
 * limit later, not at each of the commits after it; once the reader is gone
 * the next try copies every row back. */
static void test_reader_holding_its_snapshot(void) {
  captured got = {0};
  sg__logger log = {SG_LOG_INFO, capture_warnings, &got};
  const unsigned limit = 120;  /* and a small `pages`: retries do not follow it */
  sg__store *s = open_with(4, limit, &log);
  sg__wal_hold(sg__store_wal(s), 1);
  write_rows(s, "r", 0, 10);
  sqlite3 *reader = NULL;
  CHECK(sqlite3_open_v2(path, &reader, SQLITE_OPEN_READWRITE, NULL) == SQLITE_OK);
  CHECK(sqlite3_exec(reader, "BEGIN; SELECT count(*) FROM kv", NULL, NULL, NULL) == SQLITE_OK);
  int n = 10;
  uint64_t slowest = 0;
  while (got.lines == 0 && wal_frames() < 2 * limit) {
    uint64_t t = uv_hrtime();
    write_rows(s, "r", n++, 1);
    t = uv_hrtime() - t;
    if (t > slowest) slowest = t;
  }
  CHECK(got.lines == 1);
  CHECK(slowest / 1000000 >= SG_WAL_RESTART_WAIT_MS / 2);  /* it did wait for the reader, */
  CHECK(slowest / 1000000 < 2500);                         /* not the busy timeout */
  CHECK(strstr(got.line, "level=warn") != NULL && strstr(got.line, path) != NULL);
  CHECK(strstr(got.line, "trying again at") != NULL);
  /* The next commits, fewer frames than a quarter of the limit, do not try
   * again: none of them waits for the reader. */
  uint64_t t0 = uv_hrtime();
  write_rows(s, "r", n, 5);
  n += 5;
  CHECK((uv_hrtime() - t0) / 1000000 < 2500);
  CHECK(got.lines == 1);
  CHECK(sqlite3_exec(reader, "COMMIT", NULL, NULL, NULL) == SQLITE_OK);
  sqlite3_close(reader);
  int before = n;
  while (rows_in_file_alone("r") < before && n < before + 200) write_rows(s, "r", n++, 1);
  CHECK(rows_in_file_alone("r") >= before);  /* the retry copied every row back */
  CHECK(got.lines == 1);
  sg__store_close(s);
  s = open_with(4, limit, NULL);
  CHECK(rows_in(path, "r") == n);
  sg__store_close(s);
  remove_db();
}

int main(void) {
  if (!mkdtemp(dir)) return 1;
  snprintf(path, sizeof path, "%s/segue.db", dir);
  snprintf(wal, sizeof wal, "%s-wal", path);
  test_checkpoint_off_the_committing_thread();
  test_bound_when_the_thread_cannot_checkpoint();
  test_close_during_checkpoint();
  test_thread_error_is_logged();
  test_reader_holding_its_snapshot();
  rmdir(dir);
  return tap_done();
}
