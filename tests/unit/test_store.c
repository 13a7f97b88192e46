/* The store on SQLite: schema and pragmas, maps, the message log, kv. Each
 * outcome is read back from the database file, not from a return code only. */
#include <sqlite3.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "segue.h"
#include "store.h"
#include "sql_peek.h"
#include "tap.h"

static char dir[] = "/tmp/segue-test-store-XXXXXX";
static char path[256];

static sg__store *open_ok(void) {
  sg__store *s = NULL;
  char err[600] = "";
  int rc = sg__store_open(path, &s, err, sizeof err);
  if (rc != 0) fprintf(stderr, "open: %s\n", err);
  CHECK(rc == 0 && s != NULL);
  return s;
}

/* One integer from a query, through a connection of its own. */
static long long query_int(const char *sql) { return sql_int(path, sql); }

static void test_schema(void) {
  sg__store *s = open_ok();
  CHECK(query_int("PRAGMA user_version") == SG_STORE_SCHEMA_VERSION);
  CHECK(query_int("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name IN"
                  " ('msg_map','messages','kv','peers','outbox','inbox','dead_letters')") == 7);
  CHECK(sg__store_kv_set(s, "marker", "kept") == 0);
  sg__store_close(s);
  /* WAL is a property of the file: a fresh connection sees it. */
  sqlite3 *db;
  sqlite3_stmt *st;
  CHECK(sqlite3_open(path, &db) == SQLITE_OK);
  CHECK(sqlite3_prepare_v2(db, "PRAGMA journal_mode", -1, &st, NULL) == SQLITE_OK);
  CHECK(sqlite3_step(st) == SQLITE_ROW);
  CHECK_STR((const char *)sqlite3_column_text(st, 0), "wal");
  sqlite3_finalize(st);
  sqlite3_close(db);

  /* Reopening migrates nothing again and keeps the data. */
  s = open_ok();
  char *v = NULL;
  CHECK(sg__store_kv_get(s, "marker", &v) == 0);
  CHECK_STR(v, "kept");
  free(v);
  CHECK(query_int("PRAGMA user_version") == SG_STORE_SCHEMA_VERSION);
  /* foreign_keys is per connection: check the store's own. A queue for a
   * peer without a row is refused. */
  const uint8_t *ev = (const uint8_t *)"x";
  size_t len = 1;
  CHECK(sg__store_outbox_add(s, "nobody:1", &ev, &len, 1) == SG_ESTORE);
  sg__store_close(s);
  CHECK(query_int("SELECT count(*) FROM outbox") == 0);
}

static void test_newer_schema_refused(void) {
  char newer[300];
  snprintf(newer, sizeof newer, "%s/newer.db", dir);
  sqlite3 *db;
  CHECK(sqlite3_open(newer, &db) == SQLITE_OK);
  CHECK(sqlite3_exec(db, "PRAGMA user_version = 99", NULL, NULL, NULL) == SQLITE_OK);
  sqlite3_close(db);
  sg__store *s = (sg__store *)1;
  char err[600] = "";
  CHECK(sg__store_open(newer, &s, err, sizeof err) == SG_ESTORE);
  CHECK(s == NULL);
  CHECK(strstr(err, "newer") != NULL);
}

static int collect(void *ud, const char *backend, const char *id, const char *room) {
  char *out = ud;
  size_t n = strlen(out);
  snprintf(out + n, 256 - n, "%s/%s@%s;", backend, id, room ? room : "-");
  return 0;
}

static void test_maps(void) {
  sg__store *s = open_ok();
  CHECK(sg__store_map_put(s, "irc", "m1", "harmony", "h1", "#a") == 0);
  CHECK(sg__store_map_put(s, "irc", "m1", "notes", "n1", NULL) == 0);
  /* The same pair again (a retried send) is fine; another origin is not. */
  CHECK(sg__store_map_put(s, "irc", "m1", "harmony", "h1", "#a") == 0);
  CHECK(sg__store_map_put(s, "irc", "m2", "harmony", "h1", "#a") == SG_EEXIST);
  CHECK(strstr(sg__store_errmsg(s), "already a copy") != NULL);
  CHECK(query_int("SELECT count(*) FROM msg_map") == 2);

  char *ob, *oi;
  CHECK(sg__store_map_origin(s, "harmony", "h1", &ob, &oi) == 0);
  CHECK_STR(ob, "irc");
  CHECK_STR(oi, "m1");
  free(ob);
  free(oi);
  CHECK(sg__store_map_origin(s, "irc", "m1", &ob, &oi) == SG_STORE_NOTFOUND);
  CHECK(ob == NULL && oi == NULL);

  char copies[256] = "";
  CHECK(sg__store_map_copies(s, "irc", "m1", collect, copies) == 0);
  CHECK_STR(copies, "harmony/h1@#a;notes/n1@-;");
  sg__store_close(s);
}

static int collect_msg(void *ud, const sg__store_message *m) {
  char *out = ud;
  size_t n = strlen(out);
  snprintf(out + n, 512 - n, "%s|%s|%s|%lld|%lld|%d;", m->id, m->sender,
           m->content_json ? m->content_json : "-", (long long)m->create_time,
           (long long)m->edit_time, m->deleted);
  return 0;
}

static void test_log(void) {
  sg__store *s = open_ok();
  CHECK(sg__store_log_message(s, "irc", "m1", "#a", "ann", "\"hi\"", 1000, 0) == 0);
  CHECK(sg__store_log_message(s, "irc", "m2", "#a", "bob", "\"yo\"", 2000, 0) == 0);
  CHECK(sg__store_log_message(s, "irc", "m3", "#b", "bob", "\"elsewhere\"", 1500, 0) == 0);
  /* An edit: new content and edit time, the first version's create time. */
  CHECK(sg__store_log_message(s, "irc", "m1", "#a", "ann", "\"hi!\"", 9999, 3000) == 0);
  CHECK(query_int("SELECT count(*) FROM messages") == 3);
  CHECK(query_int("SELECT create_time FROM messages WHERE id = 'm1'") == 1000);
  CHECK(query_int("SELECT edit_time FROM messages WHERE id = 'm1'") == 3000);

  CHECK(sg__store_log_delete(s, "irc", "m2") == 0);
  CHECK(sg__store_log_delete(s, "irc", "nope") == SG_STORE_NOTFOUND);
  CHECK(query_int("SELECT deleted FROM messages WHERE id = 'm2'") == 1);
  CHECK(query_int("SELECT content_json IS NULL FROM messages WHERE id = 'm2'") == 1);

  char out[512] = "";
  CHECK(sg__store_messages(s, "irc", "#a", 0, collect_msg, out) == 0);
  CHECK_STR(out, "m1|ann|\"hi!\"|1000|3000|0;m2|bob|-|2000|0|1;");
  out[0] = '\0';
  CHECK(sg__store_messages(s, "irc", "#a", 1, collect_msg, out) == 0);
  CHECK_STR(out, "m2|bob|-|2000|0|1;");

  /* A copy logged before or after its map entry learns its origin. */
  CHECK(sg__store_map_put(s, "irc", "m1", "harmony", "h9", "#a") == 0);
  CHECK(sg__store_log_message(s, "harmony", "h9", "#a", "ann", "\"hi\"", 1001, 0) == 0);
  CHECK(sg__store_log_message(s, "harmony", "h8", "#a", "ann", "\"x\"", 1002, 0) == 0);
  CHECK(sg__store_map_put(s, "irc", "m3", "harmony", "h8", "#a") == 0);
  CHECK(query_int("SELECT count(*) FROM messages WHERE backend = 'harmony'"
                  " AND origin_backend = 'irc' AND origin_id IN ('m1', 'm3')") == 2);

  /* The hot path's variant for a message known to be no copy: the same
   * insert and edit, no origin looked up. */
  CHECK(sg__store_log_message_no_copy(s, "irc", "m4", "#a", "cy", "\"new\"", 4000, 0) == 0);
  CHECK(sg__store_log_message_no_copy(s, "irc", "m4", "#a", "cy", "\"new!\"", 9999, 4500) == 0);
  CHECK(query_int("SELECT count(*) FROM messages WHERE id = 'm4'") == 1);
  CHECK(query_int("SELECT create_time FROM messages WHERE id = 'm4'") == 4000);
  CHECK(query_int("SELECT edit_time FROM messages WHERE id = 'm4'") == 4500);
  CHECK(query_int("SELECT content_json = '\"new!\"' AND origin_id IS NULL"
                  " FROM messages WHERE id = 'm4'") == 1);
  sg__store_close(s);
}

static void test_kv(void) {
  sg__store *s = open_ok();
  char *v = (char *)"x";
  CHECK(sg__store_kv_get(s, "server_id", &v) == SG_STORE_NOTFOUND);
  CHECK(v == NULL);
  CHECK(sg__store_kv_set(s, "server_id", "a.example:2289") == 0);
  CHECK(sg__store_kv_set(s, "server_id", "b.example:2289") == 0);
  CHECK(sg__store_kv_get(s, "server_id", &v) == 0);
  CHECK_STR(v, "b.example:2289");
  free(v);
  CHECK(sg__store_kv_set(s, "server_id", NULL) == 0);
  CHECK(query_int("SELECT count(*) FROM kv WHERE key = 'server_id'") == 0);
  sg__store_close(s);
}

static int fail_after_write(sg__store *s, void *ud) {
  (void)ud;
  CHECK(sg__store_kv_set(s, "half", "done") == 0);
  return SG_ELIMIT;
}

static void test_atomic_rollback(void) {
  sg__store *s = open_ok();
  CHECK(sg__store_atomic(s, fail_after_write, NULL) == SG_ELIMIT);
  CHECK(query_int("SELECT count(*) FROM kv WHERE key = 'half'") == 0);
  sg__store_close(s);
}

static void test_unwritable(void) {
  char bad[300], err[600] = "";
  snprintf(bad, sizeof bad, "%s/no/such/dir/segue.db", dir);
  sg__store *s = (sg__store *)1;
  CHECK(sg__store_open(bad, &s, err, sizeof err) == SG_ESTORE);
  CHECK(s == NULL);
  CHECK(strstr(err, bad) != NULL);
  CHECK(strstr(err, "unable to open") != NULL);
}

static int add_peer_tx(sg__store *s, void *ud) {
  return sg__store_kv_set(s, (const char *)ud, "atomic");
}

/* A batch: its writes are visible on the store at once, to other connections
 * only after the commit, in one transaction; an atomic write commits an open
 * batch first, so what it acknowledges is durable. */
static void test_batch(void) {
  sg__store *s = open_ok();
  long long before = query_int("SELECT count(*) FROM msg_map");
  CHECK(sg__store_batch(s) == 0);
  CHECK(sg__store_batch(s) == 0); /* already open: joins it */
  for (int i = 0; i < 100; i++) {
    char id[32];
    snprintf(id, sizeof id, "b%d", i);
    CHECK(sg__store_map_put(s, "irc", id, "notes", id, "#b") == 0);
  }
  char *ob = NULL, *oi = NULL;
  CHECK(sg__store_map_origin(s, "notes", "b99", &ob, &oi) == 0);
  CHECK(ob && strcmp(ob, "irc") == 0);
  free(ob);
  free(oi);
  CHECK(query_int("SELECT count(*) FROM msg_map") == before);  /* not committed */
  CHECK(sg__store_commit(s) == 0);
  CHECK(query_int("SELECT count(*) FROM msg_map") == before + 100);
  CHECK(sg__store_commit(s) == 0); /* nothing open: a no-op */

  CHECK(sg__store_batch(s) == 0);
  CHECK(sg__store_map_put(s, "irc", "c1", "notes", "c1", "#b") == 0);
  CHECK(query_int("SELECT count(*) FROM msg_map WHERE copy_id = 'c1'") == 0);
  CHECK(sg__store_atomic(s, add_peer_tx, (void *)"batch.atomic") == 0);
  CHECK(query_int("SELECT count(*) FROM msg_map WHERE copy_id = 'c1'") == 1);
  CHECK(query_int("SELECT count(*) FROM kv WHERE key = 'batch.atomic'") == 1);

  /* A queue append is acknowledged: it commits the batch before it. */
  CHECK(sg__store_batch(s) == 0);
  CHECK(sg__store_map_put(s, "irc", "c2", "notes", "c2", "#b") == 0);
  CHECK(sg__store_peer_add(s, "batch.example:1") == 0);
  const uint8_t ev[] = {1, 2, 3};
  const uint8_t *evs[] = {ev};
  size_t lens[] = {sizeof ev};
  CHECK(sg__store_outbox_add(s, "batch.example:1", evs, lens, 1) == 0);
  CHECK(query_int("SELECT count(*) FROM msg_map WHERE copy_id = 'c2'") == 1);
  CHECK(query_int("SELECT count(*) FROM outbox WHERE peer = 'batch.example:1'") == 1);

  /* Any other write commits the batch first (here a setting). */
  CHECK(sg__store_batch(s) == 0);
  CHECK(sg__store_map_put(s, "irc", "c3", "notes", "c3", "#b") == 0);
  CHECK(sg__store_log_message(s, "irc", "c3", "#b", "u", "{}", 1, 1) == 0);
  CHECK(query_int("SELECT count(*) FROM msg_map WHERE copy_id = 'c3'") == 0);
  CHECK(sg__store_kv_set(s, "batch.kv", "v") == 0);
  CHECK(query_int("SELECT count(*) FROM msg_map WHERE copy_id = 'c3'") == 1);
  CHECK(query_int("SELECT count(*) FROM messages WHERE id = 'c3'") == 1);
  CHECK(query_int("SELECT count(*) FROM kv WHERE key = 'batch.kv'") == 1);
  sg__store_close(s);
}

int main(void) {
  if (!mkdtemp(dir)) return 2;
  snprintf(path, sizeof path, "%s/segue.db", dir);
  test_schema();
  test_newer_schema_refused();
  test_maps();
  test_log();
  test_kv();
  test_atomic_rollback();
  test_batch();
  test_unwritable();
  char cmd[300];
  snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
  if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", dir);
  return tap_done();
}
