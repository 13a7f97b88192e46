/* The store on SQLite. See store.h for the contract and docs/postbox.md for
 * the schema. */
#include "store.h"

#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "segue.h"
#include "store_pg.h"
#include "store_wal.h"

#define STMT_CACHE 96

struct sg__store {
  sg__pg *pg;  /* the postgresql engine, or NULL: SQLite */
  sqlite3 *db;
  sg__wal *wal;  /* the WAL's checkpoints, off this thread (store_wal.h) */
  struct {
    const char *sql;
    sqlite3_stmt *st;
  } stmts[STMT_CACHE];
  int nstmts;
  int batch;         /* a batch transaction is open (sg__store_batch) */
  int batch_writer;  /* inside a write that joins it (message log, id maps) */
  unsigned batch_gen;  /* counts the batches opened */
  /* inbox_push_async: the peer whose row the open batch already upserted
   * (batch_gen then), so a turn's Pushes from one peer upsert it once */
  unsigned pushed_gen;
  char pushed_peer[256];
  /* Callbacks of batched writes (the postbox's): `pending` wait for the
   * batch's commit; `ready` know their outcome and run in sg__store_commit. */
  struct deferred *pending, **pending_tail, *ready, **ready_tail;
  char errmsg[512];
};

typedef struct deferred {
  struct deferred *next;
  sg__store_reply_cb cb;
  void *ud;
  int err;
  int64_t count, num;
  char msg[512];
} deferred;

/* The batch ended (committed: err 0, or rolled back): its callbacks know. */
static void settle_pending(sg__store *s, int err) {
  for (deferred *d = s->pending; d; d = d->next) {
    d->err = err;
    if (err) snprintf(d->msg, sizeof d->msg, "%s", s->errmsg);
  }
  if (s->pending) {
    *s->ready_tail = s->pending;
    s->ready_tail = s->pending_tail;
  }
  s->pending = NULL;
  s->pending_tail = &s->pending;
}

static void run_ready(sg__store *s) {
  deferred *d;
  while ((d = s->ready)) {
    s->ready = d->next;
    if (!s->ready) s->ready_tail = &s->ready;
    sg__store_reply r = {0};
    r.err = d->err;
    r.message = d->err ? d->msg : NULL;
    r.count = d->count;
    r.num = d->num;
    d->cb(d->ud, &r);
    free(d);
  }
}

int sg__store_pending(const sg__store *s) { return s->batch || s->pending || s->ready; }

/* Forward migrations: entry i takes the schema from version i to i + 1.
 * Never edit a released entry; append a new one (and bump
 * SG_STORE_SCHEMA_VERSION). The postbox tables are here from the start so
 * the federation work needs no migration of its own. */
static const char *const migrations[SG_STORE_SCHEMA_VERSION] = {
    /* 0 -> 1 */
    "CREATE TABLE msg_map("
    "  origin_backend TEXT NOT NULL, origin_id TEXT NOT NULL,"
    "  copy_backend TEXT NOT NULL, copy_id TEXT NOT NULL,"
    "  room TEXT, created INTEGER NOT NULL,"
    "  UNIQUE (copy_backend, copy_id));"
    "CREATE INDEX msg_map_origin ON msg_map(origin_backend, origin_id);"
    "CREATE TABLE messages("
    "  backend TEXT NOT NULL, id TEXT NOT NULL, room TEXT, sender TEXT,"
    "  content_json TEXT, create_time INTEGER, edit_time INTEGER,"
    "  deleted INTEGER NOT NULL DEFAULT 0,"
    "  origin_backend TEXT, origin_id TEXT,"
    "  PRIMARY KEY (backend, id));"
    "CREATE INDEX messages_room ON messages(backend, room, create_time);"
    "CREATE TABLE kv(key TEXT PRIMARY KEY, value TEXT);"
    "CREATE TABLE peers("
    "  server_id TEXT PRIMARY KEY, public_key BLOB, first_seen INTEGER NOT NULL,"
    "  last_push INTEGER, last_push_in INTEGER, last_pull INTEGER,"
    "  last_served INTEGER, last_error TEXT, last_error_time INTEGER);"
    /* AUTOINCREMENT: a seq is never reused, even after the queue emptied, so
     * a Pull response can be acknowledged by its last seq without ambiguity. */
    "CREATE TABLE outbox("
    "  seq INTEGER PRIMARY KEY AUTOINCREMENT,"
    "  peer TEXT NOT NULL REFERENCES peers(server_id) ON UPDATE CASCADE,"
    "  event BLOB NOT NULL, created INTEGER NOT NULL);"
    "CREATE INDEX outbox_peer ON outbox(peer, seq);"
    "CREATE TABLE inbox("
    "  seq INTEGER PRIMARY KEY AUTOINCREMENT,"
    "  peer TEXT NOT NULL REFERENCES peers(server_id) ON UPDATE CASCADE,"
    "  event BLOB NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,"
    "  last_error TEXT, received INTEGER NOT NULL);"
    "CREATE TABLE dead_letters("
    "  id INTEGER PRIMARY KEY AUTOINCREMENT, peer TEXT NOT NULL,"
    "  direction TEXT NOT NULL CHECK (direction IN ('in', 'out')),"
    "  event BLOB NOT NULL, error TEXT, attempts INTEGER NOT NULL DEFAULT 0,"
    "  created INTEGER NOT NULL, died INTEGER NOT NULL);",
    /* 1 -> 2: several instances on one database (docs/scaling.md). */
    "CREATE TABLE instances(name TEXT PRIMARY KEY, info TEXT, seen INTEGER NOT NULL);"
    "CREATE TABLE leases(name TEXT PRIMARY KEY, holder TEXT NOT NULL,"
    "  expires INTEGER NOT NULL);",
    /* 2 -> 3: the client API (docs/api.md): users and their tokens (hashes
     * only), the durable event log the stream replays, the rooms backends
     * announced, read marks for unread counts, and attachments in the log. */
    "CREATE TABLE api_users("
    "  name TEXT PRIMARY KEY, admin INTEGER NOT NULL DEFAULT 0, created INTEGER NOT NULL);"
    "CREATE TABLE api_tokens("
    "  hash TEXT PRIMARY KEY,"
    "  user_name TEXT NOT NULL REFERENCES api_users(name) ON DELETE CASCADE,"
    "  created INTEGER NOT NULL);"
    "CREATE INDEX api_tokens_user ON api_tokens(user_name);"
    "CREATE TABLE api_events("
    "  id INTEGER PRIMARY KEY AUTOINCREMENT, backend TEXT NOT NULL, type TEXT NOT NULL,"
    "  value_json TEXT NOT NULL, time INTEGER NOT NULL);"
    "CREATE TABLE api_rooms("
    "  backend TEXT NOT NULL, id TEXT NOT NULL, name TEXT, PRIMARY KEY (backend, id));"
    "CREATE TABLE api_reads("
    "  user_name TEXT NOT NULL REFERENCES api_users(name) ON DELETE CASCADE,"
    "  backend TEXT NOT NULL, room TEXT NOT NULL, last_time INTEGER NOT NULL,"
    "  PRIMARY KEY (user_name, backend, room));"
    "ALTER TABLE messages ADD COLUMN attachments_json TEXT;",
    /* 3 -> 4: the key each event append carries (sg__store_write_key), so
     * an append run again after a lost connection is not a second event. */
    "ALTER TABLE api_events ADD COLUMN write_key TEXT;"
    "CREATE UNIQUE INDEX api_events_write_key ON api_events(write_key);",
    /* 4 -> 5: the same for the postbox's queues, where PostgreSQL alone
     * fills it (an append is a benchmark row; SQLite never runs one twice,
     * and the partial index holds no entry for its NULLs). */
    "ALTER TABLE outbox ADD COLUMN write_key TEXT;"
    "CREATE UNIQUE INDEX outbox_write_key ON outbox(write_key) WHERE write_key IS NOT NULL;"
    "ALTER TABLE inbox ADD COLUMN write_key TEXT;"
    "CREATE UNIQUE INDEX inbox_write_key ON inbox(write_key) WHERE write_key IS NOT NULL;",
};

void sg__store_write_key(char out[SG_STORE_WRITE_KEY_LEN]) {
  static char prefix[33];
  static uint64_t next;
  if (!prefix[0]) {
    unsigned char r[16];
    /* Without the system's randomness (never on Linux >= 3.17): the time and
     * pid, unique enough between the instances of one database. */
    if (uv_random(NULL, NULL, r, sizeof r, 0, NULL) != 0) {
      uint64_t a = uv_hrtime(), b = (uint64_t)uv_os_getpid() << 32 ^ (uint64_t)sg__store_now_ms();
      memcpy(r, &a, 8);
      memcpy(r + 8, &b, 8);
    }
    for (int i = 0; i < 16; i++) snprintf(prefix + 2 * i, 3, "%02x", r[i]);
  }
  snprintf(out, SG_STORE_WRITE_KEY_LEN, "%s-%llx", prefix, (unsigned long long)++next);
}

int64_t sg__store_now_ms(void) {
  uv_timeval64_t tv;
  if (uv_gettimeofday(&tv) != 0) return 0;
  return (int64_t)tv.tv_sec * 1000 + tv.tv_usec / 1000;
}

const char *sg__store_errmsg(const sg__store *s) { return s ? s->errmsg : ""; }
static int sg__store_fail(sg__store *s) {
  snprintf(s->errmsg, sizeof s->errmsg, "%s", sqlite3_errmsg(s->db));
  return SG_ESTORE;
}

/* The cached prepared statement for `sql` (a string constant: the cache is
 * keyed by its address), or NULL with the error in errmsg. Users bind every
 * parameter and reset it after use, so no read transaction stays open. */
static sqlite3_stmt *stmt_get(sg__store *s, const char *sql) {
  if (!s->db) {
    snprintf(s->errmsg, sizeof s->errmsg,
             "the postgresql engine has only the asynchronous operations");
    return NULL;
  }
  for (int i = 0; i < s->nstmts; i++)
    if (s->stmts[i].sql == sql) return s->stmts[i].st;
  if (s->nstmts == STMT_CACHE) {
    snprintf(s->errmsg, sizeof s->errmsg, "statement cache full (%d)", STMT_CACHE);
    return NULL;
  }
  sqlite3_stmt *st;
  if (sqlite3_prepare_v3(s->db, sql, -1, SQLITE_PREPARE_PERSISTENT, &st, NULL) != SQLITE_OK) {
    sg__store_fail(s);
    return NULL;
  }
  s->stmts[s->nstmts].sql = sql;
  s->stmts[s->nstmts++].st = st;
  return st;
}

/* The batch's BEGIN and COMMIT, cached (sqlite3_exec parses them each
 * time, and a batch is opened and committed every loop turn). */
static const char SQL_BEGIN[] = "BEGIN";
static const char SQL_COMMIT[] = "COMMIT";
static int run(sg__store *s, sqlite3_stmt *st);

static int commit_now(sg__store *s) {
  sqlite3_stmt *st = stmt_get(s, SQL_COMMIT);
  return st ? run(s, st) : SG_ESTORE;
}

/* A statement that writes, other than the router's own (batch_writer),
 * commits an open batch first: what others write and acknowledge is never
 * held back in a batch (see sg__store_batch). */
static sqlite3_stmt *sg__store_stmt(sg__store *s, const char *sql) {
  sqlite3_stmt *st = stmt_get(s, sql);
  if (st && s->batch && !s->batch_writer && !sqlite3_stmt_readonly(st)) {
    s->batch = 0;
    if (commit_now(s) != 0) {
      sqlite3_exec(s->db, "ROLLBACK", NULL, NULL, NULL);
      settle_pending(s, SG_ESTORE);
      return NULL;
    }
    settle_pending(s, 0);
  }
  return st;
}

/* Binds strings to ?1..?n; NULL binds SQL NULL. */
static void bind_texts(sqlite3_stmt *st, const char *const *v, int n) {
  for (int i = 0; i < n; i++) {
    if (v[i]) sqlite3_bind_text(st, i + 1, v[i], -1, SQLITE_TRANSIENT);
    else sqlite3_bind_null(st, i + 1);
  }
}

/* Steps a statement that returns no rows, then resets it. */
static int run(sg__store *s, sqlite3_stmt *st) {
  int rc = sqlite3_step(st);
  int err = rc == SQLITE_DONE ? 0 : sg__store_fail(s);
  sqlite3_reset(st);
  sqlite3_clear_bindings(st);
  return err;
}

static char *dup_column(sqlite3_stmt *st, int col) {
  const unsigned char *t = sqlite3_column_text(st, col);
  return t ? strdup((const char *)t) : NULL;
}

static int exec(sg__store *s, const char *sql) {
  return sqlite3_exec(s->db, sql, NULL, NULL, NULL) == SQLITE_OK ? 0 : sg__store_fail(s);
}

int sg__store_batch(sg__store *s) {
  if (!s->db || s->batch) return 0;
  sqlite3_stmt *st = stmt_get(s, SQL_BEGIN);
  int err = st ? run(s, st) : SG_ESTORE;
  if (err == 0) {
    s->batch = 1;
    s->batch_gen++;
  }
  return err;
}

/* Commits an open batch; its callbacks learn the outcome but run only in
 * sg__store_commit, never inside another store call. */
static int commit_batch(sg__store *s) {
  if (!s->db || !s->batch) return 0;
  s->batch = 0;
  int err = commit_now(s);
  if (err) sqlite3_exec(s->db, "ROLLBACK", NULL, NULL, NULL);
  settle_pending(s, err);
  return err;
}

int sg__store_commit(sg__store *s) { return commit_batch(s); }

int sg__store_flush(sg__store *s) {
  int err = commit_batch(s);
  run_ready(s);
  return err;
}

/* keep_batch: the writes join an open batch (the router's own writes);
 * otherwise the batch is committed first (see store.h). */
static const char SQL_SAVEPOINT[] = "SAVEPOINT sg__atomic";
static const char SQL_RELEASE[] = "RELEASE sg__atomic";

/* A cached statement: SAVEPOINT and RELEASE run for every id map the router
 * writes, and sqlite3_exec would parse them each time. */
static int exec_cached(sg__store *s, const char *sql) {
  sqlite3_stmt *st = stmt_get(s, sql);
  return st ? run(s, st) : SG_ESTORE;
}

static int atomic_impl(sg__store *s, int (*fn)(sg__store *s, void *ud), void *ud,
                       int keep_batch) {
  if (!s->db) return sg__store_stmt(s, "") ? 0 : SG_EINVAL;
  int err = keep_batch ? 0 : commit_batch(s);
  if (err) return err;
  err = exec_cached(s, SQL_SAVEPOINT);
  if (err) return err;
  err = fn(s, ud);
  if (err == 0) return exec_cached(s, SQL_RELEASE);
  /* Keep fn's error and message; the rollback of a savepoint cannot fail in a
   * way we could do anything about. */
  sqlite3_exec(s->db, "ROLLBACK TO sg__atomic; RELEASE sg__atomic", NULL, NULL, NULL);
  return err;
}

int sg__store_atomic(sg__store *s, int (*fn)(sg__store *s, void *ud), void *ud) {
  return atomic_impl(s, fn, ud, 0);
}

/* ---- opening and migrations ---------------------------------------------- */

static int pragma_int(sg__store *s, const char *sql, int *out) {
  sqlite3_stmt *st;
  if (sqlite3_prepare_v2(s->db, sql, -1, &st, NULL) != SQLITE_OK) return sg__store_fail(s);
  int rc = sqlite3_step(st);
  *out = rc == SQLITE_ROW ? sqlite3_column_int(st, 0) : 0;
  sqlite3_finalize(st);
  return rc == SQLITE_ROW ? 0 : sg__store_fail(s);
}

static int migrate_one(sg__store *s, int to) {
  char bump[64];
  snprintf(bump, sizeof bump, "PRAGMA user_version = %d", to);
  int err = exec(s, "BEGIN IMMEDIATE");
  if (err) return err;
  /* user_version is in the database header, so it commits (or rolls back)
   * with the migration's own statements. */
  if ((err = exec(s, migrations[to - 1])) || (err = exec(s, bump))
      || (err = exec(s, "COMMIT"))) {
    char keep[sizeof s->errmsg + 32];
    snprintf(keep, sizeof keep, "migration %d: %s", to, s->errmsg);
    sqlite3_exec(s->db, "ROLLBACK", NULL, NULL, NULL);
    memcpy(s->errmsg, keep, sizeof s->errmsg - 1);  /* may cut the message's end */
    s->errmsg[sizeof s->errmsg - 1] = '\0';
  }
  return err;
}

static int migrate(sg__store *s) {
  int version, err = pragma_int(s, "PRAGMA user_version", &version);
  if (err) return err;
  if (version > SG_STORE_SCHEMA_VERSION) {
    snprintf(s->errmsg, sizeof s->errmsg,
             "schema version %d is newer than this segue's (%d)", version,
             SG_STORE_SCHEMA_VERSION);
    return SG_ESTORE;
  }
  for (int v = version + 1; v <= SG_STORE_SCHEMA_VERSION && !err; v++) err = migrate_one(s, v);
  return err;
}

static int configure(sg__store *s) {
  int err, fk;
  sqlite3_busy_timeout(s->db, SG_STORE_BUSY_TIMEOUT_MS);
  /* WAL: readers never block the writer; synchronous=NORMAL keeps every
   * committed transaction across a crash or kill -9 of the process (only a
   * power loss may lose the last ones). */
  if ((err = exec(s, "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;"
                     "PRAGMA foreign_keys = ON")))
    return err;
  if ((err = pragma_int(s, "PRAGMA foreign_keys", &fk))) return err;
  if (!fk) {
    snprintf(s->errmsg, sizeof s->errmsg, "this SQLite has no foreign key support");
    return SG_ESTORE;
  }
  return migrate(s);
}

static int open_sqlite(const sg__store_config *c, sg__store **out, char *err, size_t errlen) {
  *out = NULL;
  sg__store *s = calloc(1, sizeof *s);
  if (!s) {
    snprintf(err, errlen, "out of memory");
    return SG_ENOMEM;
  }
  s->pending_tail = &s->pending;
  s->ready_tail = &s->ready;
  int flags = SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX;
  /* No memory statistics (nothing reads them): with them on, every SQLite
   * allocation takes a global mutex, ~3% of a routed message's work. Only
   * possible before SQLite initializes, which the first open does; later
   * calls fail harmlessly. */
  static int configured;
  if (!configured++) sqlite3_config(SQLITE_CONFIG_MEMSTATUS, 0);
  int rc = sqlite3_open_v2(c->path, &s->db, flags, NULL);
  if (rc != SQLITE_OK || configure(s) != 0) {
    if (rc != SQLITE_OK) sg__store_fail(s);
    snprintf(err, errlen, "%s: %s", c->path, s->errmsg);
    sg__store_close(s);
    return SG_ESTORE;
  }
  if (sg__wal_start(s->db, c->path, c->log, c->wal_pages, c->wal_limit, &s->wal) != 0) {
    snprintf(err, errlen, "%s: out of memory", c->path);
    sg__store_close(s);
    return SG_ENOMEM;
  }
  *out = s;
  return 0;
}

int sg__store_open(const char *path, sg__store **out, char *err, size_t errlen) {
  sg__store_config c = {0};
  c.path = path;
  return open_sqlite(&c, out, err, errlen);
}

sg__wal *sg__store_wal(sg__store *s) { return s->wal; }

void sg__store_close(sg__store *s) {
  if (!s) return;
  if (s->pg) sg__pg_close(s->pg);
  if (s->db) sg__store_flush(s);  /* and what waited for it hears */
  for (int i = 0; i < s->nstmts; i++) sqlite3_finalize(s->stmts[i].st);
  sg__wal_stop(s->wal);  /* waits for a checkpoint under way; before the db goes */
  sqlite3_close(s->db);  /* db may be NULL after a failed malloc: a no-op */
  free(s);
}

/* ---- message id maps ----------------------------------------------------- */

static const char SQL_MAP_PUT[] =
    "INSERT INTO msg_map(origin_backend, origin_id, copy_backend, copy_id, room, created)"
    " VALUES (?1, ?2, ?3, ?4, ?5, ?6)"
    " ON CONFLICT (copy_backend, copy_id) DO NOTHING";
/* The log row of the copy learns its origin in the same transaction. */
static const char SQL_MAP_LOG_ORIGIN[] =
    "UPDATE messages SET origin_backend = ?1, origin_id = ?2"
    " WHERE backend = ?3 AND id = ?4";
static const char SQL_MAP_ORIGIN[] =
    "SELECT origin_backend, origin_id FROM msg_map WHERE copy_backend = ?1 AND copy_id = ?2";
static const char SQL_MAP_COPIES[] =
    "SELECT copy_backend, copy_id, room FROM msg_map"
    " WHERE origin_backend = ?1 AND origin_id = ?2 ORDER BY rowid";

typedef struct {
  const char *v[5];
} map_args;

/* A repeated put of the same pair is fine (a retried send); a copy claimed
 * by another origin is a caller bug worth reporting. */
static int map_check_same(sg__store *s, const map_args *a) {
  char *ob, *oi;
  int err = sg__store_map_origin(s, a->v[2], a->v[3], &ob, &oi);
  if (err == 0 && (strcmp(ob, a->v[0]) != 0 || strcmp(oi, a->v[1]) != 0)) {
    snprintf(s->errmsg, sizeof s->errmsg, "%s/%s is already a copy of %s/%s", a->v[2],
             a->v[3], ob, oi);
    err = SG_EEXIST;
  }
  free(ob);
  free(oi);
  return err;
}

static int map_put_tx(sg__store *s, void *ud) {
  const map_args *a = ud;
  sqlite3_stmt *put = sg__store_stmt(s, SQL_MAP_PUT);
  sqlite3_stmt *log = sg__store_stmt(s, SQL_MAP_LOG_ORIGIN);
  if (!put || !log) return SG_ESTORE;
  bind_texts(put, a->v, 5);
  sqlite3_bind_int64(put, 6, sg__store_now_ms());
  int err = run(s, put);
  if (err) return err;
  if (sqlite3_changes(s->db) == 0) return map_check_same(s, a);
  bind_texts(log, a->v, 4);
  return run(s, log);
}

int sg__store_map_put(sg__store *s, const char *origin_backend, const char *origin_id,
                     const char *copy_backend, const char *copy_id, const char *room) {
  map_args a = {{origin_backend, origin_id, copy_backend, copy_id, room}};
  s->batch_writer++;
  int err = atomic_impl(s, map_put_tx, &a, 1);
  s->batch_writer--;
  return err;
}

int sg__store_map_origin(sg__store *s, const char *backend, const char *id,
                        char **origin_backend, char **origin_id) {
  *origin_backend = *origin_id = NULL;
  sqlite3_stmt *st = sg__store_stmt(s, SQL_MAP_ORIGIN);
  if (!st) return SG_ESTORE;
  bind_texts(st, (const char *[]){backend, id}, 2);
  int rc = sqlite3_step(st), err = SG_STORE_NOTFOUND;
  if (rc == SQLITE_ROW) {
    *origin_backend = dup_column(st, 0);
    *origin_id = dup_column(st, 1);
    err = *origin_backend && *origin_id ? 0 : SG_ENOMEM;
  } else if (rc != SQLITE_DONE) {
    err = sg__store_fail(s);
  }
  sqlite3_reset(st);
  if (err < 0) {
    free(*origin_backend);
    free(*origin_id);
    *origin_backend = *origin_id = NULL;
  }
  return err;
}

int sg__store_map_copies(sg__store *s, const char *origin_backend, const char *origin_id,
                        sg__store_copy_cb cb, void *ud) {
  sqlite3_stmt *st = sg__store_stmt(s, SQL_MAP_COPIES);
  if (!st) return SG_ESTORE;
  bind_texts(st, (const char *[]){origin_backend, origin_id}, 2);
  int rc, err = 0;
  while (!err && (rc = sqlite3_step(st)) == SQLITE_ROW)
    err = cb(ud, (const char *)sqlite3_column_text(st, 0),
             (const char *)sqlite3_column_text(st, 1), (const char *)sqlite3_column_text(st, 2));
  if (!err && rc != SQLITE_DONE) err = sg__store_fail(s);
  sqlite3_reset(st);
  return err;
}

static const char SQL_MAP_KNOWN[] =
    "SELECT EXISTS (SELECT 1 FROM msg_map WHERE copy_backend = ?1 AND copy_id = ?2),"
    " EXISTS (SELECT 1 FROM msg_map WHERE origin_backend = ?1 AND origin_id = ?2)";

int sg__store_map_known(sg__store *s, const char *backend, const char *id, int *is_copy,
                        int *has_copies) {
  sqlite3_stmt *st = sg__store_stmt(s, SQL_MAP_KNOWN);
  if (!st) return SG_ESTORE;
  bind_texts(st, (const char *[]){backend, id}, 2);
  int err = 0;
  if (sqlite3_step(st) == SQLITE_ROW) {
    *is_copy = sqlite3_column_int(st, 0);
    *has_copies = sqlite3_column_int(st, 1);
  } else {
    err = sg__store_fail(s);
  }
  sqlite3_reset(st);
  return err;
}

/* ---- the room and message log --------------------------------------------- */

static const char SQL_LOG_UPSERT[] =
    "INSERT INTO messages(backend, id, room, sender, content_json, create_time, edit_time,"
    "  origin_backend, origin_id)"
    " SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, m.origin_backend, m.origin_id"
    " FROM (SELECT 1) LEFT JOIN msg_map m ON m.copy_backend = ?1 AND m.copy_id = ?2"
    " WHERE true"  /* disambiguates ON CONFLICT after a SELECT (SQLite's grammar) */
    " ON CONFLICT (backend, id) DO UPDATE SET content_json = excluded.content_json,"
    "  edit_time = excluded.edit_time";
/* The same for a message known to be no copy: no origin to look up. */
static const char SQL_LOG_UPSERT_NO_COPY[] =
    "INSERT INTO messages(backend, id, room, sender, content_json, create_time, edit_time)"
    " VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)"
    " ON CONFLICT (backend, id) DO UPDATE SET content_json = excluded.content_json,"
    "  edit_time = excluded.edit_time";
static const char SQL_LOG_DELETE[] =
    "UPDATE messages SET deleted = 1, content_json = NULL WHERE backend = ?1 AND id = ?2";
static const char SQL_LOG_ROOM[] =
    "SELECT backend, id, room, sender, content_json, create_time, edit_time, deleted FROM"
    " (SELECT rowid AS r, * FROM messages WHERE backend = ?1 AND room IS ?2"
    "  ORDER BY create_time DESC, rowid DESC LIMIT ?3)"
    " ORDER BY create_time, r";

static int log_upsert(sg__store *s, const char *sql, const char *backend, const char *id,
                      const char *room, const char *sender, const char *content_json,
                      int64_t create_time, int64_t edit_time) {
  sqlite3_stmt *st = stmt_get(s, sql);  /* joins an open batch */
  if (!st) return SG_ESTORE;
  bind_texts(st, (const char *[]){backend, id, room, sender, content_json}, 5);
  sqlite3_bind_int64(st, 6, create_time);
  if (edit_time) sqlite3_bind_int64(st, 7, edit_time);
  else sqlite3_bind_null(st, 7);
  return run(s, st);
}

int sg__store_log_message(sg__store *s, const char *backend, const char *id,
                         const char *room, const char *sender, const char *content_json,
                         int64_t create_time, int64_t edit_time) {
  return log_upsert(s, SQL_LOG_UPSERT, backend, id, room, sender, content_json, create_time,
                    edit_time);
}

int sg__store_log_message_no_copy(sg__store *s, const char *backend, const char *id,
                                  const char *room, const char *sender,
                                  const char *content_json, int64_t create_time,
                                  int64_t edit_time) {
  return log_upsert(s, SQL_LOG_UPSERT_NO_COPY, backend, id, room, sender, content_json,
                    create_time, edit_time);
}

static const char SQL_LOG_EDIT_TIME[] =
    "SELECT edit_time FROM messages WHERE backend = ?1 AND id = ?2";

int sg__store_message_edit_time(sg__store *s, const char *backend, const char *id,
                               int64_t *edit_time) {
  *edit_time = 0;
  sqlite3_stmt *st = sg__store_stmt(s, SQL_LOG_EDIT_TIME);
  if (!st) return SG_ESTORE;
  bind_texts(st, (const char *[]){backend, id}, 2);
  int rc = sqlite3_step(st), err = SG_STORE_NOTFOUND;
  if (rc == SQLITE_ROW) {
    *edit_time = sqlite3_column_int64(st, 0);  /* NULL (never edited): 0 */
    err = 0;
  } else if (rc != SQLITE_DONE) {
    err = sg__store_fail(s);
  }
  sqlite3_reset(st);
  return err;
}

int sg__store_log_delete(sg__store *s, const char *backend, const char *id) {
  sqlite3_stmt *st = stmt_get(s, SQL_LOG_DELETE);  /* joins an open batch */
  if (!st) return SG_ESTORE;
  bind_texts(st, (const char *[]){backend, id}, 2);
  int err = run(s, st);
  return err ? err : sqlite3_changes(s->db) ? 0 : SG_STORE_NOTFOUND;
}

static const char *col_text(sqlite3_stmt *st, int col) {
  return (const char *)sqlite3_column_text(st, col);
}

int sg__store_messages(sg__store *s, const char *backend, const char *room, int limit,
                      sg__store_message_cb cb, void *ud) {
  sqlite3_stmt *st = sg__store_stmt(s, SQL_LOG_ROOM);
  if (!st) return SG_ESTORE;
  bind_texts(st, (const char *[]){backend, room}, 2);
  sqlite3_bind_int(st, 3, limit > 0 ? limit : -1);
  int rc, err = 0;
  while (!err && (rc = sqlite3_step(st)) == SQLITE_ROW) {
    sg__store_message m = {col_text(st, 0), col_text(st, 1), col_text(st, 2),
                          col_text(st, 3), col_text(st, 4), sqlite3_column_int64(st, 5),
                          sqlite3_column_int64(st, 6), sqlite3_column_int(st, 7), NULL};
    err = cb(ud, &m);
  }
  if (!err && rc != SQLITE_DONE) err = sg__store_fail(s);
  sqlite3_reset(st);
  return err;
}

/* ---- key/value settings ------------------------------------------------------ */

static const char SQL_KV_GET[] = "SELECT value FROM kv WHERE key = ?1";
static const char SQL_KV_SET[] =
    "INSERT INTO kv(key, value) VALUES (?1, ?2)"
    " ON CONFLICT (key) DO UPDATE SET value = excluded.value";
static const char SQL_KV_DEL[] = "DELETE FROM kv WHERE key = ?1";

int sg__store_kv_get(sg__store *s, const char *key, char **value) {
  *value = NULL;
  sqlite3_stmt *st = sg__store_stmt(s, SQL_KV_GET);
  if (!st) return SG_ESTORE;
  bind_texts(st, &key, 1);
  int rc = sqlite3_step(st), err = SG_STORE_NOTFOUND;
  if (rc == SQLITE_ROW) {
    *value = dup_column(st, 0);
    err = *value ? 0 : SG_STORE_NOTFOUND;  /* a NULL value reads as unset */
  } else if (rc != SQLITE_DONE) {
    err = sg__store_fail(s);
  }
  sqlite3_reset(st);
  return err;
}

int sg__store_kv_set(sg__store *s, const char *key, const char *value) {
  sqlite3_stmt *st = sg__store_stmt(s, value ? SQL_KV_SET : SQL_KV_DEL);
  if (!st) return SG_ESTORE;
  bind_texts(st, (const char *[]){key, value}, value ? 2 : 1);
  return run(s, st);
}

/* ---- federation peers ------------------------------------------------------ */

static const char SQL_PEER_ADD[] =
    "INSERT INTO peers(server_id, first_seen) VALUES (?1, ?2) ON CONFLICT DO NOTHING";
static const char SQL_PEER_KNOWN[] = "SELECT count(*) FROM peers WHERE server_id = ?1";
static const char SQL_PEER_STAMP[] =  /* ?2 names the column: sg__store_stamp */
    "UPDATE peers SET last_push = CASE ?2 WHEN 0 THEN ?3 ELSE last_push END,"
    " last_pull = CASE ?2 WHEN 1 THEN ?3 ELSE last_pull END,"
    " last_push_in = CASE ?2 WHEN 2 THEN ?3 ELSE last_push_in END,"
    " last_served = CASE ?2 WHEN 3 THEN ?3 ELSE last_served END"
    " WHERE server_id = ?1";
static const char SQL_PEER_ERROR[] =
    "UPDATE peers SET last_error = ?2, last_error_time = ?3 WHERE server_id = ?1";
static const char SQL_PEERS[] =
    "SELECT server_id, first_seen, last_push, last_push_in, last_pull, last_served,"
    " last_error, last_error_time,"
    " (SELECT count(*) FROM outbox o WHERE o.peer = server_id),"
    " (SELECT count(*) FROM inbox i WHERE i.peer = server_id)"
    " FROM peers ORDER BY server_id";
static const char SQL_KEY_GET[] = "SELECT public_key FROM peers WHERE server_id = ?1";
static const char SQL_KEY_SET[] = "UPDATE peers SET public_key = ?2 WHERE server_id = ?1";
/* Renaming: the old id's queue and inbox join the new id's (order kept by
 * seq), its key is kept unless the new id has one (the newer), its row goes.
 * Message maps name backends, and a Harmony peer's backend is its server id. */
static const char *const SQL_RENAME[] = {
    "UPDATE peers SET public_key = coalesce(public_key,"
    " (SELECT public_key FROM peers WHERE server_id = ?1)) WHERE server_id = ?2",
    "UPDATE outbox SET peer = ?2 WHERE peer = ?1",
    "UPDATE inbox SET peer = ?2 WHERE peer = ?1",
    "DELETE FROM peers WHERE server_id = ?1",
    "UPDATE OR IGNORE msg_map SET origin_backend = ?2 WHERE origin_backend = ?1",
    "UPDATE OR IGNORE msg_map SET copy_backend = ?2 WHERE copy_backend = ?1",
};

/* The cached statement with ?1 bound to `text`, or NULL (errmsg set). */
static sqlite3_stmt *stmt1(sg__store *s, const char *sql, const char *text) {
  sqlite3_stmt *st = sg__store_stmt(s, sql);
  if (st) bind_texts(st, &text, 1);
  return st;
}

int sg__store_peer_add(sg__store *s, const char *peer) {
  sqlite3_stmt *st = stmt1(s, SQL_PEER_ADD, peer);
  if (!st) return SG_ESTORE;
  sqlite3_bind_int64(st, 2, sg__store_now_ms());
  return run(s, st);
}

int sg__store_peer_known(sg__store *s, const char *peer) {
  sqlite3_stmt *st = stmt1(s, SQL_PEER_KNOWN, peer);
  if (!st) return SG_ESTORE;
  int rc = sqlite3_step(st);
  int err = rc != SQLITE_ROW ? sg__store_fail(s)
            : sqlite3_column_int64(st, 0) > 0 ? 0 : SG_STORE_NOTFOUND;
  sqlite3_reset(st);
  return err;
}

int sg__store_peer_stamp(sg__store *s, const char *peer, sg__store_stamp which) {
  sqlite3_stmt *st = stmt1(s, SQL_PEER_STAMP, peer);
  if (!st) return SG_ESTORE;
  sqlite3_bind_int(st, 2, (int)which);
  sqlite3_bind_int64(st, 3, sg__store_now_ms());
  return run(s, st);
}

int sg__store_peer_error(sg__store *s, const char *peer, const char *error) {
  sqlite3_stmt *st = sg__store_stmt(s, SQL_PEER_ERROR);
  if (!st) return SG_ESTORE;
  bind_texts(st, (const char *[]){peer, error}, 2);
  sqlite3_bind_int64(st, 3, sg__store_now_ms());
  return run(s, st);
}

int sg__store_peer_key_get(sg__store *s, const char *peer, uint8_t key[32]) {
  sqlite3_stmt *st = stmt1(s, SQL_KEY_GET, peer);
  if (!st) return SG_ESTORE;
  int rc = sqlite3_step(st), err = SG_STORE_NOTFOUND;
  if (rc == SQLITE_ROW && sqlite3_column_bytes(st, 0) == 32) {
    memcpy(key, sqlite3_column_blob(st, 0), 32);
    err = 0;
  } else if (rc != SQLITE_ROW && rc != SQLITE_DONE) {
    err = sg__store_fail(s);
  }
  sqlite3_reset(st);
  return err;
}

int sg__store_peer_key_set(sg__store *s, const char *peer, const uint8_t key[32]) {
  sqlite3_stmt *st = stmt1(s, SQL_KEY_SET, peer);
  if (!st) return SG_ESTORE;
  sqlite3_bind_blob(st, 2, key, 32, SQLITE_TRANSIENT);
  return run(s, st);
}

int sg__store_peers(sg__store *s, int (*cb)(void *ud, const sg__store_peer *p), void *ud) {
  sqlite3_stmt *st = sg__store_stmt(s, SQL_PEERS);
  if (!st) return SG_ESTORE;
  int rc, err = 0;
  while (!err && (rc = sqlite3_step(st)) == SQLITE_ROW) {
    sg__store_peer p = {col_text(st, 0),
                       sqlite3_column_int64(st, 8),
                       sqlite3_column_int64(st, 9),
                       sqlite3_column_int64(st, 1),
                       sqlite3_column_int64(st, 2),
                       sqlite3_column_int64(st, 3),
                       sqlite3_column_int64(st, 4),
                       sqlite3_column_int64(st, 5),
                       sqlite3_column_int64(st, 7),
                       col_text(st, 6)};
    err = cb(ud, &p);
  }
  if (!err && rc != SQLITE_DONE) err = sg__store_fail(s);
  sqlite3_reset(st);
  return err;
}

typedef struct {
  const char *old_id, *new_id;
} rename_args;

static int rename_tx(sg__store *s, void *ud) {
  rename_args *a = ud;
  for (size_t i = 0; i < sizeof SQL_RENAME / sizeof *SQL_RENAME; i++) {
    sqlite3_stmt *st = sg__store_stmt(s, SQL_RENAME[i]);
    if (!st) return SG_ESTORE;
    bind_texts(st, (const char *[]){a->old_id, a->new_id}, 2);
    int err = run(s, st);
    if (err) return err;
  }
  return 0;
}

int sg__store_peer_rename(sg__store *s, const char *old_id, const char *new_id) {
  rename_args a = {old_id, new_id};
  return sg__store_atomic(s, rename_tx, &a);
}

/* ---- the postbox's queues ------------------------------------------------------ */

static const char SQL_QUEUE_LEN[] = "SELECT count(*) FROM outbox WHERE peer = ?1";
static const char SQL_QUEUE_ADD[] =
    "INSERT INTO outbox(peer, event, created) VALUES (?1, ?2, ?3)";
static const char SQL_QUEUE_HEAD[] =
    "SELECT seq, event FROM outbox WHERE peer = ?1 ORDER BY seq";
static const char SQL_QUEUE_DROP[] = "DELETE FROM outbox WHERE peer = ?1 AND seq <= ?2";
static const char SQL_INBOX_ADD[] =
    "INSERT INTO inbox(peer, event, received) VALUES (?1, ?2, ?3)";
static const char SQL_INBOX_HEAD[] =
    "SELECT seq, event, attempts FROM inbox WHERE peer = ?1 ORDER BY seq LIMIT 1";
static const char SQL_INBOX_DONE[] = "DELETE FROM inbox WHERE seq = ?1";
/* The attempt count is set from the one the delivery read (?3), not
 * incremented: the same failure recorded twice counts once. */
static const char SQL_INBOX_FAILED[] =
    "UPDATE inbox SET attempts = ?3 + 1, last_error = ?2 WHERE seq = ?1 AND attempts = ?3";
static const char SQL_INBOX_DEAD[] =
    "INSERT INTO dead_letters(peer, direction, event, error, attempts, created, died)"
    " SELECT peer, 'in', event, last_error, attempts, received, ?2 FROM inbox WHERE seq = ?1";

int sg__store_outbox_count(sg__store *s, const char *peer, int64_t *n) {
  *n = 0;
  sqlite3_stmt *st = stmt1(s, SQL_QUEUE_LEN, peer);
  if (!st) return SG_ESTORE;
  int rc = sqlite3_step(st);
  if (rc == SQLITE_ROW) *n = sqlite3_column_int64(st, 0);
  int err = rc == SQLITE_ROW ? 0 : sg__store_fail(s);
  sqlite3_reset(st);
  return err;
}

typedef struct {
  const char *sql, *peer;
  const uint8_t *const *events;
  const size_t *lens;
  size_t n;
} append_args;

static int append_tx(sg__store *s, void *ud) {
  append_args *a = ud;
  int64_t now = sg__store_now_ms();
  for (size_t i = 0; i < a->n; i++) {
    sqlite3_stmt *st = stmt1(s, a->sql, a->peer);
    if (!st) return SG_ESTORE;
    sqlite3_bind_blob64(st, 2, a->events[i], a->lens[i], SQLITE_STATIC);
    sqlite3_bind_int64(st, 3, now);
    int err = run(s, st);
    if (err) return err;
  }
  return 0;
}

static int append(sg__store *s, const char *sql, const char *peer,
                  const uint8_t *const *events, const size_t *lens, size_t n) {
  append_args a = {sql, peer, events, lens, n};
  /* Appends are acknowledged to their sender: never inside a batch. */
  int err = commit_batch(s);
  if (err) return err;
  return n == 1 ? append_tx(s, &a) : sg__store_atomic(s, append_tx, &a);
}

int sg__store_outbox_add(sg__store *s, const char *peer, const uint8_t *const *events,
                        const size_t *lens, size_t n) {
  return append(s, SQL_QUEUE_ADD, peer, events, lens, n);
}

int sg__store_inbox_add(sg__store *s, const char *peer, const uint8_t *const *events,
                       const size_t *lens, size_t n) {
  return append(s, SQL_INBOX_ADD, peer, events, lens, n);
}

int sg__store_outbox_head(sg__store *s, const char *peer, size_t max_bytes,
                         sg__store_event_cb cb, void *ud) {
  sqlite3_stmt *st = stmt1(s, SQL_QUEUE_HEAD, peer);
  if (!st) return SG_ESTORE;
  size_t bytes = 0, n = 0;
  int rc, err = 0;
  while (!err && (rc = sqlite3_step(st)) == SQLITE_ROW) {
    size_t len = (size_t)sqlite3_column_bytes(st, 1);
    if (n > 0 && bytes + len > max_bytes) break;
    err = cb(ud, sqlite3_column_int64(st, 0), sqlite3_column_blob(st, 1), len, 0);
    bytes += len;
    n++;
  }
  if (!err && rc != SQLITE_ROW && rc != SQLITE_DONE) err = sg__store_fail(s);
  sqlite3_reset(st);
  return err > 0 ? 0 : err;
}

typedef struct {
  const char *peer;
  int64_t last_seq, *dropped;
} drop_args;

static int drop_tx(sg__store *s, void *ud) {
  drop_args *a = ud;
  sqlite3_stmt *st = stmt1(s, SQL_QUEUE_DROP, a->peer);
  if (!st) return SG_ESTORE;
  sqlite3_bind_int64(st, 2, a->last_seq);
  int err = run(s, st);
  if (!err && a->dropped) *a->dropped = sqlite3_changes(s->db);
  return err ? err : sg__store_peer_stamp(s, a->peer, SG_STORE_STAMP_SERVED);
}

int sg__store_outbox_drop(sg__store *s, const char *peer, int64_t last_seq, int64_t *dropped) {
  drop_args a = {peer, last_seq, dropped};
  if (dropped) *dropped = 0;
  return sg__store_atomic(s, drop_tx, &a);
}

int sg__store_inbox_head(sg__store *s, const char *peer, sg__store_event_cb cb, void *ud) {
  sqlite3_stmt *st = stmt1(s, SQL_INBOX_HEAD, peer);
  if (!st) return SG_ESTORE;
  int rc = sqlite3_step(st), err = SG_STORE_NOTFOUND;
  if (rc == SQLITE_ROW) {
    /* Copy out of the statement first: cb may use the store (a handler). */
    int64_t seq = sqlite3_column_int64(st, 0), attempts = sqlite3_column_int64(st, 2);
    size_t len = (size_t)sqlite3_column_bytes(st, 1);
    uint8_t *copy = malloc(len ? len : 1);
    if (copy && len) memcpy(copy, sqlite3_column_blob(st, 1), len);
    sqlite3_reset(st);
    if (!copy) return SG_ENOMEM;
    err = cb(ud, seq, copy, len, attempts);
    free(copy);
    return err > 0 ? 0 : err;
  }
  if (rc != SQLITE_DONE) err = sg__store_fail(s);
  sqlite3_reset(st);
  return err;
}

static int run_seq(sg__store *s, const char *sql, int64_t seq) {
  sqlite3_stmt *st = sg__store_stmt(s, sql);
  if (!st) return SG_ESTORE;
  sqlite3_bind_int64(st, 1, seq);
  return run(s, st);
}

typedef struct {
  int64_t seq;
  const char *why;
  int64_t attempts;
  int dead;
} failed_args;

static int failed_tx(sg__store *s, void *ud) {
  failed_args *a = ud;
  sqlite3_stmt *st = sg__store_stmt(s, SQL_INBOX_FAILED);
  if (!st) return SG_ESTORE;
  sqlite3_bind_int64(st, 1, a->seq);
  sqlite3_bind_text(st, 2, a->why, -1, SQLITE_TRANSIENT);
  sqlite3_bind_int64(st, 3, a->attempts);
  int err = run(s, st);
  if (err || !a->dead) return err;
  if (!(st = sg__store_stmt(s, SQL_INBOX_DEAD))) return SG_ESTORE;
  sqlite3_bind_int64(st, 1, a->seq);
  sqlite3_bind_int64(st, 2, sg__store_now_ms());
  if ((err = run(s, st))) return err;
  return run_seq(s, SQL_INBOX_DONE, a->seq);
}

/* ---- instances and leases ---------------------------------------------------- */

static const char SQL_INSTANCE_BEAT[] =
    "INSERT INTO instances(name, info, seen) VALUES (?1, ?2, ?3)"
    " ON CONFLICT (name) DO UPDATE SET info = excluded.info, seen = excluded.seen";
static const char SQL_LEASE_CLAIM[] =
    "INSERT INTO leases(name, holder, expires) VALUES (?1, ?2, ?3 + ?4)"
    " ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires = excluded.expires"
    " WHERE leases.holder = excluded.holder OR leases.expires < ?3";
static const char SQL_LEASE_HOLDER[] = "SELECT holder FROM leases WHERE name = ?1";
static const char SQL_LEASE_RELEASE[] = "DELETE FROM leases WHERE name = ?1 AND holder = ?2";
static const char SQL_INSTANCES[] = "SELECT name, info, seen FROM instances ORDER BY name";
static const char SQL_LEASES[] = "SELECT name, holder, expires FROM leases ORDER BY name";

int sg__store_instance_beat(sg__store *s, const char *instance, const char *info) {
  sqlite3_stmt *st = sg__store_stmt(s, SQL_INSTANCE_BEAT);
  if (!st) return SG_ESTORE;
  bind_texts(st, (const char *[]){instance, info}, 2);
  sqlite3_bind_int64(st, 3, sg__store_now_ms());
  return run(s, st);
}

typedef struct {
  const char *name, *instance;
  int64_t ttl_ms;
  char **holder;
} claim_args;

static int claim_tx(sg__store *s, void *ud) {
  claim_args *a = ud;
  sqlite3_stmt *st = sg__store_stmt(s, SQL_LEASE_CLAIM);
  if (!st) return SG_ESTORE;
  bind_texts(st, (const char *[]){a->name, a->instance}, 2);
  sqlite3_bind_int64(st, 3, sg__store_now_ms());
  sqlite3_bind_int64(st, 4, a->ttl_ms);
  int err = run(s, st);
  if (err || !(st = stmt1(s, SQL_LEASE_HOLDER, a->name))) return err ? err : SG_ESTORE;
  err = sqlite3_step(st) == SQLITE_ROW ? 0 : sg__store_fail(s);
  if (!err && !(*a->holder = dup_column(st, 0))) err = SG_ENOMEM;
  sqlite3_reset(st);
  return err;
}

int sg__store_lease_claim(sg__store *s, const char *name, const char *instance, int64_t ttl_ms,
                         char **holder) {
  *holder = NULL;
  claim_args a = {name, instance, ttl_ms, holder};
  int err = sg__store_atomic(s, claim_tx, &a);
  if (err) {
    free(*holder);
    *holder = NULL;
  }
  return err;
}

int sg__store_lease_release(sg__store *s, const char *name, const char *instance) {
  sqlite3_stmt *st = sg__store_stmt(s, SQL_LEASE_RELEASE);
  if (!st) return SG_ESTORE;
  bind_texts(st, (const char *[]){name, instance}, 2);
  return run(s, st);
}

/* ---- engines and asynchronous calls ------------------------------------------- */

int sg__store_open_with(const sg__store_config *c, sg__store **out, char *err, size_t errlen) {
  *out = NULL;
  if (!c->engine || strcmp(c->engine, "sqlite") == 0) {
    if (!c->path) {
      snprintf(err, errlen, "store: engine sqlite needs a path");
      return SG_EINVAL;
    }
    return open_sqlite(c, out, err, errlen);
  }
  if (strcmp(c->engine, "postgresql") != 0) {
    snprintf(err, errlen, "store: unknown engine \"%s\" (sqlite or postgresql)", c->engine);
    return SG_EINVAL;
  }
  if (!c->dsn || !c->loop) {
    snprintf(err, errlen, "store: engine postgresql needs a dsn");
    return SG_EINVAL;
  }
  sg__store *s = calloc(1, sizeof *s);
  if (!s) {
    snprintf(err, errlen, "out of memory");
    return SG_ENOMEM;
  }
  s->pending_tail = &s->pending;
  s->ready_tail = &s->ready;
  int rc = sg__pg_open(c->loop, c->dsn, c->pool ? c->pool : 3, &s->pg, err, errlen);
  if (rc < 0) {
    free(s);
    return rc;
  }
  *out = s;
  return 0;
}

int sg__store_is_async(const sg__store *s) { return s->pg != NULL; }
const char *sg__store_engine(const sg__store *s) { return s->pg ? "postgresql" : "sqlite"; }
void sg__store_set_busy(sg__store *s, void (*busy)(void *ud, int delta), void *ud) {
  if (s->pg) sg__pg_set_busy(s->pg, busy, ud);
}

/* On SQLite every _async call is the synchronous one, answered at once. */
static int answer(sg__store *s, sg__store_reply *r, int err, sg__store_reply_cb cb, void *ud) {
  r->err = err;
  r->message = err < 0 ? s->errmsg : NULL;
  cb(ud, r);
  return 0;
}

int sg__store_kv_get_async(sg__store *s, const char *key, sg__store_reply_cb cb, void *ud) {
  if (s->pg) return sg__pg_kv_get(s->pg, key, cb, ud);
  char *v;
  sg__store_reply r = {0};
  int err = sg__store_kv_get(s, key, &v);
  r.text[0] = v;
  answer(s, &r, err, cb, ud);
  free(v);
  return 0;
}

int sg__store_kv_set_async(sg__store *s, const char *key, const char *value,
                          sg__store_reply_cb cb, void *ud) {
  if (s->pg) return sg__pg_kv_set(s->pg, key, value, cb, ud);
  sg__store_reply r = {0};
  return answer(s, &r, sg__store_kv_set(s, key, value), cb, ud);
}

int sg__store_map_put_async(sg__store *s, const char *origin_backend, const char *origin_id,
                           const char *copy_backend, const char *copy_id, const char *room,
                           sg__store_reply_cb cb, void *ud) {
  if (s->pg)
    return sg__pg_map_put(s->pg, origin_backend, origin_id, copy_backend, copy_id, room, cb, ud);
  sg__store_reply r = {0};
  return answer(s, &r, sg__store_map_put(s, origin_backend, origin_id, copy_backend, copy_id, room),
                cb, ud);
}

int sg__store_map_origin_async(sg__store *s, const char *backend, const char *id,
                              sg__store_reply_cb cb, void *ud) {
  if (s->pg) return sg__pg_map_origin(s->pg, backend, id, cb, ud);
  char *ob, *oi;
  sg__store_reply r = {0};
  int err = sg__store_map_origin(s, backend, id, &ob, &oi);
  r.text[0] = ob;
  r.text[1] = oi;
  answer(s, &r, err, cb, ud);
  free(ob);
  free(oi);
  return 0;
}

/* Rows collected for one answer. */
typedef struct {
  void *rows;
  size_t n, cap, size;
  char **strings;
  size_t nstr, capstr;
} collect;

static void *collect_row(collect *c) {
  if (c->n == c->cap) {
    size_t cap = c->cap ? c->cap * 2 : 8;
    void *r = realloc(c->rows, cap * c->size);
    if (!r) return NULL;
    c->rows = r;
    c->cap = cap;
  }
  return memset((char *)c->rows + c->n++ * c->size, 0, c->size);
}

static const char *collect_str(collect *c, const char *t, int *err) {
  if (!t) return NULL;
  if (c->nstr == c->capstr) {
    size_t cap = c->capstr ? c->capstr * 2 : 16;
    char **r = realloc(c->strings, cap * sizeof *r);
    if (!r) {
      *err = SG_ENOMEM;
      return NULL;
    }
    c->strings = r;
    c->capstr = cap;
  }
  char *d = strdup(t);
  if (!d) *err = SG_ENOMEM;
  else c->strings[c->nstr++] = d;
  return d;
}

static void collect_free(collect *c) {
  for (size_t i = 0; i < c->nstr; i++) free(c->strings[i]);
  free(c->strings);
  free(c->rows);
}

static int collect_copy(void *ud, const char *backend, const char *id, const char *room) {
  collect *c = ud;
  int err = 0;
  sg__store_copy *row = collect_row(c);
  if (!row) return SG_ENOMEM;
  row->backend = collect_str(c, backend, &err);
  row->id = collect_str(c, id, &err);
  row->room = collect_str(c, room, &err);
  return err;
}

int sg__store_map_copies_async(sg__store *s, const char *origin_backend,
                              const char *origin_id, sg__store_reply_cb cb, void *ud) {
  if (s->pg) return sg__pg_map_copies(s->pg, origin_backend, origin_id, cb, ud);
  collect c = {.size = sizeof(sg__store_copy)};
  sg__store_reply r = {0};
  int err = sg__store_map_copies(s, origin_backend, origin_id, collect_copy, &c);
  r.n = c.n;
  r.copies = c.rows;
  answer(s, &r, err, cb, ud);
  collect_free(&c);
  return 0;
}

int sg__store_log_message_async(sg__store *s, const char *backend, const char *id,
                               const char *room, const char *sender,
                               const char *content_json, int64_t create_time,
                               int64_t edit_time, sg__store_reply_cb cb, void *ud) {
  if (s->pg)
    return sg__pg_log_message(s->pg, backend, id, room, sender, content_json, create_time,
                              edit_time, cb, ud);
  sg__store_reply r = {0};
  return answer(s, &r, sg__store_log_message(s, backend, id, room, sender, content_json,
                                             create_time, edit_time),
                cb, ud);
}

int sg__store_message_edit_time_async(sg__store *s, const char *backend, const char *id,
                                     sg__store_reply_cb cb, void *ud) {
  if (s->pg) return sg__pg_message_edit_time(s->pg, backend, id, cb, ud);
  sg__store_reply r = {0};
  int err = sg__store_message_edit_time(s, backend, id, &r.num);
  return answer(s, &r, err, cb, ud);
}

int sg__store_log_delete_async(sg__store *s, const char *backend, const char *id,
                              sg__store_reply_cb cb, void *ud) {
  if (s->pg) return sg__pg_log_delete(s->pg, backend, id, cb, ud);
  sg__store_reply r = {0};
  return answer(s, &r, sg__store_log_delete(s, backend, id), cb, ud);
}

static int collect_message(void *ud, const sg__store_message *m) {
  collect *c = ud;
  int err = 0;
  sg__store_message *row = collect_row(c);
  if (!row) return SG_ENOMEM;
  *row = *m;
  row->backend = collect_str(c, m->backend, &err);
  row->id = collect_str(c, m->id, &err);
  row->room = collect_str(c, m->room, &err);
  row->sender = collect_str(c, m->sender, &err);
  row->content_json = collect_str(c, m->content_json, &err);
  return err;
}

int sg__store_messages_async(sg__store *s, const char *backend, const char *room, int limit,
                            sg__store_reply_cb cb, void *ud) {
  if (s->pg) return sg__pg_messages(s->pg, backend, room, limit, cb, ud);
  collect c = {.size = sizeof(sg__store_message)};
  sg__store_reply r = {0};
  int err = sg__store_messages(s, backend, room, limit, collect_message, &c);
  r.n = c.n;
  r.messages = c.rows;
  answer(s, &r, err, cb, ud);
  collect_free(&c);
  return 0;
}

int sg__store_instance_beat_async(sg__store *s, const char *instance, const char *info,
                                 sg__store_reply_cb cb, void *ud) {
  if (s->pg) return sg__pg_instance_beat(s->pg, instance, info, cb, ud);
  sg__store_reply r = {0};
  return answer(s, &r, sg__store_instance_beat(s, instance, info), cb, ud);
}

/* Walks a three-column (text, text, integer) listing into rows laid out as
 * {const char *, const char *, int64_t}: sg__store_instance and _lease. */
typedef struct {
  const char *a, *b;
  int64_t n;
} row3;

static int walk3(sg__store *s, const char *sql, collect *c) {
  sqlite3_stmt *st = sg__store_stmt(s, sql);
  if (!st) return SG_ESTORE;
  int rc, err = 0;
  while (!err && (rc = sqlite3_step(st)) == SQLITE_ROW) {
    row3 *row = collect_row(c);
    if (!row) {
      err = SG_ENOMEM;
      break;
    }
    row->a = collect_str(c, col_text(st, 0), &err);
    row->b = collect_str(c, col_text(st, 1), &err);
    row->n = sqlite3_column_int64(st, 2);
  }
  if (!err && rc != SQLITE_DONE) err = sg__store_fail(s);
  sqlite3_reset(st);
  return err;
}

int sg__store_instances_async(sg__store *s, sg__store_reply_cb cb, void *ud) {
  if (s->pg) return sg__pg_instances(s->pg, cb, ud);
  collect c = {.size = sizeof(sg__store_instance)};
  sg__store_reply r = {0};
  int err = walk3(s, SQL_INSTANCES, &c);
  r.n = c.n;
  r.instances = c.rows;
  answer(s, &r, err, cb, ud);
  collect_free(&c);
  return 0;
}

int sg__store_leases_async(sg__store *s, sg__store_reply_cb cb, void *ud) {
  if (s->pg) return sg__pg_leases(s->pg, cb, ud);
  collect c = {.size = sizeof(sg__store_lease)};
  sg__store_reply r = {0};
  int err = walk3(s, SQL_LEASES, &c);
  r.n = c.n;
  r.leases = c.rows;
  answer(s, &r, err, cb, ud);
  collect_free(&c);
  return 0;
}

int sg__store_lease_claim_async(sg__store *s, const char *name, const char *instance,
                               int64_t ttl_ms, sg__store_reply_cb cb, void *ud) {
  if (s->pg) return sg__pg_lease_claim(s->pg, name, instance, ttl_ms, cb, ud);
  char *holder;
  sg__store_reply r = {0};
  int err = sg__store_lease_claim(s, name, instance, ttl_ms, &holder);
  r.text[0] = holder;
  answer(s, &r, err, cb, ud);
  free(holder);
  return 0;
}

int sg__store_lease_release_async(sg__store *s, const char *name, const char *instance,
                                 sg__store_reply_cb cb, void *ud) {
  if (s->pg) return sg__pg_lease_release(s->pg, name, instance, cb, ud);
  sg__store_reply r = {0};
  return answer(s, &r, sg__store_lease_release(s, name, instance), cb, ud);
}

/* ---- the postbox, asynchronous ------------------------------------------------ */

/* Writes that join the batch, opened if none is: join_begin, the write,
 * join_end(s, its result). */
static int join_begin(sg__store *s) {
  int err = sg__store_batch(s);
  if (!err) s->batch_writer++;
  return err;
}

static int join_end(sg__store *s, int err) {
  s->batch_writer--;
  return err;
}

#define JOIN(s, call) (join_begin(s) ? SG_ESTORE : join_end(s, (call)))

/* A batched write whose callback waits for the commit (err < 0: answered
 * at once, the batch goes on without it). */
static int deferred_answer_num(sg__store *s, int err, int64_t count, int64_t num,
                               sg__store_reply_cb cb, void *ud) {
  if (err < 0) {
    sg__store_reply r = {0};
    return answer(s, &r, err, cb, ud);
  }
  deferred *d = calloc(1, sizeof *d);
  if (!d) {
    sg__store_reply r = {0};
    snprintf(s->errmsg, sizeof s->errmsg, "out of memory");
    return answer(s, &r, SG_ENOMEM, cb, ud);
  }
  d->cb = cb;
  d->ud = ud;
  d->count = count;
  d->num = num;
  if (s->batch) {
    *s->pending_tail = d;
    s->pending_tail = &d->next;
  } else {  /* committed already (a write of others committed the batch) */
    *s->ready_tail = d;
    s->ready_tail = &d->next;
  }
  return 0;
}

static int deferred_answer(sg__store *s, int err, int64_t count, sg__store_reply_cb cb,
                           void *ud) {
  return deferred_answer_num(s, err, count, 0, cb, ud);
}

int sg__store_peer_add_async(sg__store *s, const char *peer, sg__store_reply_cb cb, void *ud) {
  if (s->pg) return sg__pg_peer_add(s->pg, peer, cb, ud);
  sg__store_reply r = {0};
  return answer(s, &r, JOIN(s, sg__store_peer_add(s, peer)), cb, ud);
}

int sg__store_peer_stamp_async(sg__store *s, const char *peer, sg__store_stamp which,
                              sg__store_reply_cb cb, void *ud) {
  if (s->pg) return sg__pg_peer_stamp(s->pg, peer, which, cb, ud);
  sg__store_reply r = {0};
  return answer(s, &r, JOIN(s, sg__store_peer_stamp(s, peer, which)), cb, ud);
}

int sg__store_peer_error_async(sg__store *s, const char *peer, const char *error,
                              sg__store_reply_cb cb, void *ud) {
  if (s->pg) return sg__pg_peer_error(s->pg, peer, error, cb, ud);
  sg__store_reply r = {0};
  return answer(s, &r, JOIN(s, sg__store_peer_error(s, peer, error)), cb, ud);
}

int sg__store_peer_key_get_async(sg__store *s, const char *peer, sg__store_reply_cb cb,
                                void *ud) {
  if (s->pg) return sg__pg_peer_key_get(s->pg, peer, cb, ud);
  uint8_t key[32];
  sg__store_reply r = {0};
  int err = sg__store_peer_key_get(s, peer, key);
  r.key = err == 0 ? key : NULL;
  return answer(s, &r, err, cb, ud);
}

int sg__store_peer_key_set_async(sg__store *s, const char *peer, const uint8_t key[32],
                                sg__store_reply_cb cb, void *ud) {
  if (s->pg) return sg__pg_peer_key_set(s->pg, peer, key, cb, ud);
  sg__store_reply r = {0};
  return answer(s, &r, JOIN(s, sg__store_peer_key_set(s, peer, key)), cb, ud);
}

static int collect_peer(void *ud, const sg__store_peer *p) {
  collect *c = ud;
  int err = 0;
  sg__store_peer *row = collect_row(c);
  if (!row) return SG_ENOMEM;
  *row = *p;
  row->server_id = collect_str(c, p->server_id, &err);
  row->last_error = collect_str(c, p->last_error, &err);
  return err;
}

int sg__store_peers_async(sg__store *s, sg__store_reply_cb cb, void *ud) {
  if (s->pg) return sg__pg_peers(s->pg, cb, ud);
  collect c = {.size = sizeof(sg__store_peer)};
  sg__store_reply r = {0};
  int err = sg__store_peers(s, collect_peer, &c);
  r.n = c.n;
  r.peers = c.rows;
  answer(s, &r, err, cb, ud);
  collect_free(&c);
  return 0;
}

int sg__store_peer_rename_async(sg__store *s, const char *old_id, const char *new_id,
                               sg__store_reply_cb cb, void *ud) {
  if (s->pg) return sg__pg_peer_rename(s->pg, old_id, new_id, cb, ud);
  sg__store_reply r = {0};
  int err = sg__store_peer_known(s, old_id);
  if (err == 0) err = sg__store_peer_rename(s, old_id, new_id);
  return answer(s, &r, err, cb, ud);
}

int sg__store_outbox_count_async(sg__store *s, const char *peer, sg__store_reply_cb cb,
                                void *ud) {
  if (s->pg) return sg__pg_outbox_count(s->pg, peer, cb, ud);
  sg__store_reply r = {0};
  int err = sg__store_outbox_count(s, peer, &r.count);
  return answer(s, &r, err, cb, ud);
}

/* Appends inside the batch: a savepoint keeps them all or none. */
static int batch_append(sg__store *s, const char *sql, const char *peer,
                        const uint8_t *const *events, const size_t *lens, size_t n) {
  int err = sg__store_peer_add(s, peer);
  if (err) return err;
  append_args a = {sql, peer, events, lens, n};
  return n == 1 ? append_tx(s, &a) : atomic_impl(s, append_tx, &a, 1);
}

int sg__store_outbox_add_async(sg__store *s, const char *peer, const uint8_t *const *events,
                              const size_t *lens, size_t n, sg__store_reply_cb cb, void *ud) {
  if (s->pg) return sg__pg_queue_add(s->pg, 1, peer, events, lens, n, cb, ud);
  int64_t count = 0;
  int err = JOIN(s, batch_append(s, SQL_QUEUE_ADD, peer, events, lens, n));
  if (!err) err = sg__store_outbox_count(s, peer, &count);
  return deferred_answer(s, err, count, cb, ud);
}

int sg__store_inbox_add_async(sg__store *s, const char *peer, const uint8_t *const *events,
                             const size_t *lens, size_t n, sg__store_reply_cb cb, void *ud) {
  if (s->pg) return sg__pg_queue_add(s->pg, 0, peer, events, lens, n, cb, ud);
  int err = JOIN(s, batch_append(s, SQL_INBOX_ADD, peer, events, lens, n));
  return deferred_answer(s, err, 0, cb, ud);
}

/* The peer's row, created if new, stamped last_push_in: one statement (or
 * only created if new: SQL_PEER_ADD, which writes no page when it is there). */
static const char SQL_PEER_PUSHED_IN[] =
    "INSERT INTO peers(server_id, first_seen, last_push_in) VALUES (?1, ?2, ?2)"
    " ON CONFLICT (server_id) DO UPDATE SET last_push_in = excluded.last_push_in";

static int pushed_in(sg__store *s, const char *peer, int stamp) {
  if (!stamp && s->pushed_gen == s->batch_gen && strcmp(s->pushed_peer, peer) == 0) return 0;
  sqlite3_stmt *st = stmt1(s, stamp ? SQL_PEER_PUSHED_IN : SQL_PEER_ADD, peer);
  if (!st) return SG_ESTORE;
  sqlite3_bind_int64(st, 2, sg__store_now_ms());
  int err = run(s, st);
  size_t n = strlen(peer);
  if (!err && n < sizeof s->pushed_peer) {
    memcpy(s->pushed_peer, peer, n + 1);
    s->pushed_gen = s->batch_gen;
  }
  return err;
}

int sg__store_inbox_push_async(sg__store *s, const char *peer, const uint8_t *event, size_t len,
                              int stamp, sg__store_reply_cb cb, void *ud) {
  if (s->pg) return sg__pg_inbox_push(s->pg, peer, event, len, stamp, cb, ud);
  if (join_begin(s)) return deferred_answer(s, SG_ESTORE, 0, cb, ud);
  int64_t seq = 0;
  int err = pushed_in(s, peer, stamp);
  sqlite3_stmt *st = err ? NULL : stmt1(s, SQL_INBOX_ADD, peer);
  if (!err && !st) err = SG_ESTORE;
  if (st) {
    sqlite3_bind_blob64(st, 2, event, len, SQLITE_STATIC);
    sqlite3_bind_int64(st, 3, sg__store_now_ms());
    err = run(s, st);
    if (!err) seq = sqlite3_last_insert_rowid(s->db);
  }
  join_end(s, 0);
  return deferred_answer_num(s, err, 0, seq, cb, ud);
}

static int collect_queued(void *ud, int64_t seq, const uint8_t *ev, size_t len,
                         int64_t attempts) {
  collect *c = ud;
  sg__store_event *row = collect_row(c);
  uint8_t *copy = row ? malloc(len ? len : 1) : NULL;
  if (!copy) return SG_ENOMEM;
  if (len) memcpy(copy, ev, len);
  *row = (sg__store_event){seq, copy, len, attempts};
  /* the bytes are freed with the strings */
  int err = 0;
  if (c->nstr == c->capstr) {
    size_t cap = c->capstr ? c->capstr * 2 : 16;
    char **r = realloc(c->strings, cap * sizeof *r);
    if (!r) err = SG_ENOMEM;
    else {
      c->strings = r;
      c->capstr = cap;
    }
  }
  if (err) {
    free(copy);
    c->n--;
    return err;
  }
  c->strings[c->nstr++] = (char *)copy;
  return 0;
}

int sg__store_outbox_head_async(sg__store *s, const char *peer, size_t max_bytes,
                               sg__store_reply_cb cb, void *ud) {
  if (s->pg) return sg__pg_outbox_head(s->pg, peer, max_bytes, cb, ud);
  collect c = {.size = sizeof(sg__store_event)};
  sg__store_reply r = {0};
  int err = sg__store_outbox_head(s, peer, max_bytes, collect_queued, &c);
  r.n = c.n;
  r.events = c.rows;
  answer(s, &r, err, cb, ud);
  collect_free(&c);
  return 0;
}

static const char SQL_QUEUE_DROP_ONE[] = "DELETE FROM outbox WHERE peer = ?1 AND seq = ?2";

int sg__store_outbox_drop_async(sg__store *s, const char *peer, const int64_t *seqs, size_t n,
                               sg__store_reply_cb cb, void *ud) {
  if (s->pg) return sg__pg_outbox_drop(s->pg, peer, seqs, n, cb, ud);
  int64_t dropped = 0;
  if (join_begin(s)) return deferred_answer(s, SG_ESTORE, 0, cb, ud);
  int err = 0;
  for (size_t i = 0; !err && i < n; i++) {
    sqlite3_stmt *st = stmt1(s, SQL_QUEUE_DROP_ONE, peer);
    if (!st) {
      err = SG_ESTORE;
      break;
    }
    sqlite3_bind_int64(st, 2, seqs[i]);
    err = run(s, st);
    if (!err) dropped += sqlite3_changes(s->db);
  }
  if (!err) err = sg__store_peer_stamp(s, peer, SG_STORE_STAMP_SERVED);
  join_end(s, 0);
  return deferred_answer(s, err, dropped, cb, ud);
}

int sg__store_inbox_head_async(sg__store *s, const char *peer, sg__store_reply_cb cb,
                              void *ud) {
  if (s->pg) return sg__pg_inbox_head(s->pg, peer, cb, ud);
  collect c = {.size = sizeof(sg__store_event)};
  sg__store_reply r = {0};
  int err = sg__store_inbox_head(s, peer, collect_queued, &c);
  r.n = c.n;
  r.events = c.rows;
  answer(s, &r, err, cb, ud);
  collect_free(&c);
  return 0;
}

int sg__store_inbox_done_async(sg__store *s, int64_t seq, sg__store_reply_cb cb, void *ud) {
  if (s->pg) return sg__pg_inbox_done(s->pg, seq, cb, ud);
  int err = JOIN(s, run_seq(s, SQL_INBOX_DONE, seq));
  return deferred_answer(s, err, 0, cb, ud);
}

static const char SQL_INBOX_DONE_UPTO[] = "DELETE FROM inbox WHERE peer = ?1 AND seq <= ?2";

int sg__store_inbox_done_upto_async(sg__store *s, const char *peer, int64_t seq,
                                   sg__store_reply_cb cb, void *ud) {
  if (s->pg) return sg__pg_inbox_done_upto(s->pg, peer, seq, cb, ud);
  if (join_begin(s)) return deferred_answer(s, SG_ESTORE, 0, cb, ud);
  int64_t n = 0;
  sqlite3_stmt *st = stmt1(s, SQL_INBOX_DONE_UPTO, peer);
  int err = st ? 0 : SG_ESTORE;
  if (st) {
    sqlite3_bind_int64(st, 2, seq);
    err = run(s, st);
    if (!err) n = sqlite3_changes(s->db);
  }
  join_end(s, 0);
  return deferred_answer(s, err, n, cb, ud);
}

int sg__store_inbox_failed_async(sg__store *s, int64_t seq, const char *why, int64_t attempts,
                                int dead, sg__store_reply_cb cb, void *ud) {
  if (s->pg) return sg__pg_inbox_failed(s->pg, seq, why, attempts, dead, cb, ud);
  failed_args a = {seq, why, attempts, dead};
  int err = JOIN(s, atomic_impl(s, failed_tx, &a, 1));
  return deferred_answer(s, err, 0, cb, ud);
}

int sg__store_claim_async(sg__store *s, const char *name, const char *instance, int64_t ttl_ms,
                         sg__store_reply_cb cb, void *ud) {
  if (s->pg) return sg__pg_claim(s->pg, name, instance, ttl_ms, cb, ud);
  sg__store_reply r = {0};
  r.text[0] = instance;
  return answer(s, &r, 0, cb, ud);
}

int sg__store_claim_release_async(sg__store *s, const char *name, const char *instance,
                                 sg__store_reply_cb cb, void *ud) {
  if (s->pg) return sg__pg_lease_release(s->pg, name, instance, cb, ud);
  sg__store_reply r = {0};
  return answer(s, &r, 0, cb, ud);
}

/* ==== the client API (docs/api.md): users and token hashes, the event log
 * the stream replays, rooms, read marks (their _async forms, on both engines,
 * are at the end of this file). ============================================== */

/* ---- users and tokens --------------------------------------------------------- */

static const char SQL_USER_ADD[] =
    "INSERT INTO api_users(name, admin, created) VALUES (?1, ?2, ?3)"
    " ON CONFLICT (name) DO NOTHING";
static const char SQL_TOKEN_ADD[] = "INSERT INTO api_tokens(hash, user_name, created) VALUES (?1, ?2, ?3)";
static const char SQL_USER_TOKEN[] =
    "SELECT 1 FROM api_tokens WHERE hash = ?1 AND user_name = ?2";
static const char SQL_USER_DEL[] = "DELETE FROM api_users WHERE name = ?1";
static const char SQL_USERS[] =
    "SELECT u.name, u.admin, u.created, (SELECT COUNT(*) FROM api_tokens t WHERE t.user_name = u.name)"
    " FROM api_users u ORDER BY u.name";
static const char SQL_TOKEN_USER[] =
    "SELECT u.name, u.admin FROM api_tokens t JOIN api_users u ON u.name = t.user_name WHERE t.hash = ?1";

typedef struct { const char *name, *hash; int admin; } user_args;

static int user_add_tx(sg__store *s, void *ud) {
  const user_args *a = ud;
  sqlite3_stmt *u = sg__store_stmt(s, SQL_USER_ADD), *t = sg__store_stmt(s, SQL_TOKEN_ADD);
  if (!u || !t) return SG_ESTORE;
  int64_t now = sg__store_now_ms();
  bind_texts(u, &a->name, 1);
  sqlite3_bind_int(u, 2, a->admin != 0);
  sqlite3_bind_int64(u, 3, now);
  int err = run(s, u);
  if (err) return err;
  if (sqlite3_changes(s->db) == 0) {
    /* The name is taken: by this very call if its token is there (as on
     * PostgreSQL, where the call may run again after a lost connection). */
    sqlite3_stmt *q = sg__store_stmt(s, SQL_USER_TOKEN);
    if (!q) return SG_ESTORE;
    bind_texts(q, (const char *[]){a->hash, a->name}, 2);
    int rc = sqlite3_step(q);
    err = rc == SQLITE_ROW ? 0 : rc == SQLITE_DONE ? SG_EEXIST : sg__store_fail(s);
    sqlite3_reset(q);
    return err;
  }
  bind_texts(t, (const char *[]){a->hash, a->name}, 2);
  sqlite3_bind_int64(t, 3, now);
  return run(s, t);
}

int sg__store_user_add(sg__store *s, const char *name, int admin, const char *token_hash) {
  user_args a = {name, token_hash, admin};
  return sg__store_atomic(s, user_add_tx, &a);
}

int sg__store_user_remove(sg__store *s, const char *name) {
  sqlite3_stmt *st = sg__store_stmt(s, SQL_USER_DEL);
  if (!st) return SG_ESTORE;
  bind_texts(st, &name, 1);
  int err = run(s, st);
  return err ? err : sqlite3_changes(s->db) ? 0 : SG_STORE_NOTFOUND;
}

int sg__store_users(sg__store *s, sg__store_user_cb cb, void *ud) {
  sqlite3_stmt *st = sg__store_stmt(s, SQL_USERS);
  if (!st) return SG_ESTORE;
  int rc, err = 0;
  while (!err && (rc = sqlite3_step(st)) == SQLITE_ROW)
    err = cb(ud, col_text(st, 0), sqlite3_column_int(st, 1), sqlite3_column_int64(st, 2),
             sqlite3_column_int(st, 3));
  if (!err && rc != SQLITE_DONE) err = sg__store_fail(s);
  sqlite3_reset(st);
  return err;
}

int sg__store_token_user(sg__store *s, const char *token_hash, char **name, int *admin) {
  *name = NULL;
  *admin = 0;
  sqlite3_stmt *st = sg__store_stmt(s, SQL_TOKEN_USER);
  if (!st) return SG_ESTORE;
  bind_texts(st, &token_hash, 1);
  int rc = sqlite3_step(st), err = SG_STORE_NOTFOUND;
  if (rc == SQLITE_ROW) {
    *name = strdup(col_text(st, 0));
    *admin = sqlite3_column_int(st, 1);
    err = *name ? 0 : SG_ENOMEM;
  } else if (rc != SQLITE_DONE) {
    err = sg__store_fail(s);
  }
  sqlite3_reset(st);
  return err;
}

/* ---- events ---------------------------------------------------------------------- */

static const char SQL_EVENT_ADD[] =
    "INSERT INTO api_events(backend, type, value_json, time, write_key)"
    " VALUES (?1, ?2, ?3, ?4, ?5)";
static const char SQL_EVENT_MSG[] =
    "INSERT INTO messages(backend, id, room, sender, content_json, create_time, edit_time,"
    "  attachments_json) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"
    " ON CONFLICT (backend, id) DO UPDATE SET content_json = excluded.content_json,"
    "  edit_time = excluded.edit_time, attachments_json = excluded.attachments_json";
static const char SQL_EVENT_MSG_DEL[] =
    "UPDATE messages SET deleted = 1, content_json = NULL WHERE backend = ?1 AND id = ?2";
static const char SQL_EVENT_ROOM[] =
    "INSERT INTO api_rooms(backend, id, name) VALUES (?1, ?2, ?3)"
    " ON CONFLICT (backend, id) DO UPDATE SET name = excluded.name";
static const char SQL_EVENT_ROOM_DEL[] = "DELETE FROM api_rooms WHERE backend = ?1 AND id = ?2";
static const char SQL_EVENTS_AFTER[] =
    "SELECT id, backend, type, value_json FROM api_events WHERE id > ?1 ORDER BY id LIMIT ?2";
static const char SQL_EVENTS_PRUNE[] =
    "DELETE FROM api_events WHERE id <= (SELECT MAX(id) FROM api_events) - ?1";
static const char SQL_EVENTS_LAST[] = "SELECT COALESCE(MAX(id), 0) FROM api_events";

typedef struct { const sg__store_api_event *ev; int64_t id; } event_args;

static int event_effect(sg__store *s, const sg__store_api_event *ev) {
  sqlite3_stmt *st = NULL;
  const char *t = ev->type;
  if (!ev->id) return 0;
  if (strcmp(t, "MessageUpsert") == 0) {
    if (!(st = sg__store_stmt(s, SQL_EVENT_MSG))) return SG_ESTORE;
    bind_texts(st, (const char *[]){ev->backend, ev->id, ev->room, ev->sender, ev->content_json}, 5);
    sqlite3_bind_int64(st, 6, ev->create_time);
    if (ev->edit_time) sqlite3_bind_int64(st, 7, ev->edit_time);
    else sqlite3_bind_null(st, 7);
    if (ev->attachments_json) sqlite3_bind_text(st, 8, ev->attachments_json, -1, SQLITE_TRANSIENT);
    else sqlite3_bind_null(st, 8);
  } else if (strcmp(t, "MessageDelete") == 0) {
    if (!(st = sg__store_stmt(s, SQL_EVENT_MSG_DEL))) return SG_ESTORE;
    bind_texts(st, (const char *[]){ev->backend, ev->id}, 2);
  } else if (strcmp(t, "RoomUpsert") == 0) {
    if (!(st = sg__store_stmt(s, SQL_EVENT_ROOM))) return SG_ESTORE;
    bind_texts(st, (const char *[]){ev->backend, ev->id, ev->room_name}, 3);
  } else if (strcmp(t, "RoomDelete") == 0) {
    if (!(st = sg__store_stmt(s, SQL_EVENT_ROOM_DEL))) return SG_ESTORE;
    bind_texts(st, (const char *[]){ev->backend, ev->id}, 2);
  } else {
    return 0;
  }
  return run(s, st);
}

static int event_tx(sg__store *s, void *ud) {
  event_args *a = ud;
  int err = event_effect(s, a->ev);
  if (err) return err;
  sqlite3_stmt *st = sg__store_stmt(s, SQL_EVENT_ADD);
  if (!st) return SG_ESTORE;
  bind_texts(st, (const char *[]){a->ev->backend, a->ev->type, a->ev->value_json}, 3);
  sqlite3_bind_int64(st, 4, sg__store_now_ms());
  char key[SG_STORE_WRITE_KEY_LEN];  /* never run twice here: stored as on PostgreSQL */
  sg__store_write_key(key);
  sqlite3_bind_text(st, 5, key, -1, SQLITE_TRANSIENT);
  if ((err = run(s, st))) return err;
  a->id = sqlite3_last_insert_rowid(s->db);
  return 0;
}

int sg__store_event_append(sg__store *s, const sg__store_api_event *ev, int64_t *id) {
  event_args a = {ev, 0};
  int err = sg__store_atomic(s, event_tx, &a);
  if (!err && id) *id = a.id;
  return err;
}

int sg__store_events_after(sg__store *s, int64_t after, int limit, sg__store_api_event_cb cb,
                          void *ud) {
  sqlite3_stmt *st = sg__store_stmt(s, SQL_EVENTS_AFTER);
  if (!st) return SG_ESTORE;
  sqlite3_bind_int64(st, 1, after);
  sqlite3_bind_int(st, 2, limit > 0 ? limit : -1);
  int rc, err = 0;
  while (!err && (rc = sqlite3_step(st)) == SQLITE_ROW)
    err = cb(ud, sqlite3_column_int64(st, 0), col_text(st, 1), col_text(st, 2), col_text(st, 3));
  if (!err && rc != SQLITE_DONE) err = sg__store_fail(s);
  sqlite3_reset(st);
  return err;
}

int sg__store_events_prune(sg__store *s, int64_t keep) {
  sqlite3_stmt *st = sg__store_stmt(s, SQL_EVENTS_PRUNE);
  if (!st) return SG_ESTORE;
  sqlite3_bind_int64(st, 1, keep);
  return run(s, st);
}

int sg__store_events_last(sg__store *s, int64_t *id) {
  *id = 0;
  sqlite3_stmt *st = sg__store_stmt(s, SQL_EVENTS_LAST);
  if (!st) return SG_ESTORE;
  int rc = sqlite3_step(st), err = 0;
  if (rc == SQLITE_ROW) *id = sqlite3_column_int64(st, 0);
  else err = sg__store_fail(s);
  sqlite3_reset(st);
  return err;
}

/* ---- rooms, read marks, paging ---------------------------------------------------- */

static const char SQL_ROOMS[] =
    "SELECT k.backend, k.id, r.name,"
    "  (SELECT COUNT(*) FROM messages m WHERE m.backend = k.backend AND m.room = k.id"
    "    AND m.deleted = 0 AND m.create_time > COALESCE((SELECT last_time FROM api_reads d"
    "      WHERE d.user_name = ?1 AND d.backend = k.backend AND d.room = k.id), 0))"
    " FROM (SELECT backend, id FROM api_rooms"
    "       UNION SELECT backend, room FROM messages WHERE room IS NOT NULL) k"
    " LEFT JOIN api_rooms r ON r.backend = k.backend AND r.id = k.id"
    " ORDER BY k.backend, k.id";
static const char SQL_READ_MARK[] =
    "INSERT INTO api_reads(user_name, backend, room, last_time) VALUES (?1, ?2, ?3, ?4)"
    " ON CONFLICT (user_name, backend, room) DO UPDATE SET last_time ="
    "  MAX(api_reads.last_time, excluded.last_time)";
static const char SQL_BEFORE[] =
    "SELECT backend, id, room, sender, content_json, create_time, edit_time, deleted,"
    "  attachments_json FROM"
    " (SELECT rowid AS r, * FROM messages WHERE backend = ?1 AND room IS ?2"
    "  AND (create_time, rowid) < (SELECT create_time, rowid FROM messages"
    "                              WHERE backend = ?1 AND id = ?4)"
    "  ORDER BY create_time DESC, rowid DESC LIMIT ?3)"
    " ORDER BY create_time, r";
static const char SQL_LAST[] =
    "SELECT backend, id, room, sender, content_json, create_time, edit_time, deleted,"
    "  attachments_json FROM"
    " (SELECT rowid AS r, * FROM messages WHERE backend = ?1 AND room IS ?2"
    "  ORDER BY create_time DESC, rowid DESC LIMIT ?3)"
    " ORDER BY create_time, r";

int sg__store_rooms(sg__store *s, const char *user, sg__store_room_cb cb, void *ud) {
  sqlite3_stmt *st = sg__store_stmt(s, SQL_ROOMS);
  if (!st) return SG_ESTORE;
  bind_texts(st, &user, 1);
  int rc, err = 0;
  while (!err && (rc = sqlite3_step(st)) == SQLITE_ROW)
    err = cb(ud, col_text(st, 0), col_text(st, 1), col_text(st, 2), sqlite3_column_int64(st, 3));
  if (!err && rc != SQLITE_DONE) err = sg__store_fail(s);
  sqlite3_reset(st);
  return err;
}

int sg__store_read_mark(sg__store *s, const char *user, const char *backend, const char *room,
                       int64_t time) {
  sqlite3_stmt *st = sg__store_stmt(s, SQL_READ_MARK);
  if (!st) return SG_ESTORE;
  bind_texts(st, (const char *[]){user, backend, room}, 3);
  sqlite3_bind_int64(st, 4, time);
  return run(s, st);
}

int sg__store_messages_before(sg__store *s, const char *backend, const char *room,
                             const char *before_id, int limit, sg__store_message_cb cb,
                             void *ud) {
  sqlite3_stmt *st = sg__store_stmt(s, before_id ? SQL_BEFORE : SQL_LAST);
  if (!st) return SG_ESTORE;
  bind_texts(st, (const char *[]){backend, room}, 2);
  sqlite3_bind_int(st, 3, limit > 0 ? limit : -1);
  if (before_id) sqlite3_bind_text(st, 4, before_id, -1, SQLITE_TRANSIENT);
  int rc, err = 0;
  while (!err && (rc = sqlite3_step(st)) == SQLITE_ROW) {
    sg__store_message m = {col_text(st, 0), col_text(st, 1), col_text(st, 2), col_text(st, 3), col_text(st, 4),
                          sqlite3_column_int64(st, 5), sqlite3_column_int64(st, 6),
                          sqlite3_column_int(st, 7), col_text(st, 8)};
    err = cb(ud, &m);
  }
  if (!err && rc != SQLITE_DONE) err = sg__store_fail(s);
  sqlite3_reset(st);
  sqlite3_clear_bindings(st);
  return err;
}

/* ---- the client API's operations, asynchronous (both engines) -------------------- */

/* answer() with a message of our own for a code SQLite did not give. */
static int answer_msg(sg__store *s, sg__store_reply *r, int err, const char *msg,
                      sg__store_reply_cb cb, void *ud) {
  r->err = err;
  r->message = err < 0 ? (msg ? msg : s->errmsg) : NULL;
  cb(ud, r);
  return 0;
}

int sg__store_user_add_async(sg__store *s, const char *name, int admin, const char *token_hash,
                            sg__store_reply_cb cb, void *ud) {
  if (s->pg) return sg__pg_user_add(s->pg, name, admin, token_hash, cb, ud);
  sg__store_reply r = {0};
  int err = sg__store_user_add(s, name, admin, token_hash);
  return answer_msg(s, &r, err, err == SG_EEXIST ? "a user of that name exists" : NULL, cb, ud);
}

int sg__store_user_remove_async(sg__store *s, const char *name, sg__store_reply_cb cb, void *ud) {
  if (s->pg) return sg__pg_user_remove(s->pg, name, cb, ud);
  sg__store_reply r = {0};
  return answer(s, &r, sg__store_user_remove(s, name), cb, ud);
}

static int collect_user(void *ud, const char *name, int admin, int64_t created, int tokens) {
  collect *c = ud;
  int err = 0;
  sg__store_user *row = collect_row(c);
  if (!row) return SG_ENOMEM;
  row->name = collect_str(c, name, &err);
  row->admin = admin;
  row->created = created;
  row->tokens = tokens;
  return err;
}

int sg__store_users_async(sg__store *s, sg__store_reply_cb cb, void *ud) {
  if (s->pg) return sg__pg_users(s->pg, cb, ud);
  collect c = {.size = sizeof(sg__store_user)};
  sg__store_reply r = {0};
  int err = sg__store_users(s, collect_user, &c);
  r.n = c.n;
  r.users = c.rows;
  answer(s, &r, err, cb, ud);
  collect_free(&c);
  return 0;
}

int sg__store_token_user_async(sg__store *s, const char *token_hash, sg__store_reply_cb cb,
                              void *ud) {
  if (s->pg) return sg__pg_token_user(s->pg, token_hash, cb, ud);
  char *name;
  int admin;
  sg__store_reply r = {0};
  int err = sg__store_token_user(s, token_hash, &name, &admin);
  r.text[0] = name;
  r.num = admin;
  answer(s, &r, err, cb, ud);
  free(name);
  return 0;
}

int sg__store_event_append_async(sg__store *s, const sg__store_api_event *ev,
                                sg__store_reply_cb cb, void *ud) {
  if (s->pg) return sg__pg_event_append(s->pg, ev, cb, ud);
  sg__store_reply r = {0};
  int err = sg__store_event_append(s, ev, &r.num);
  return answer(s, &r, err, cb, ud);
}

static int collect_event(void *ud, int64_t id, const char *backend, const char *type,
                         const char *value_json) {
  collect *c = ud;
  int err = 0;
  sg__store_api_event_row *row = collect_row(c);
  if (!row) return SG_ENOMEM;
  row->id = id;
  row->backend = collect_str(c, backend, &err);
  row->type = collect_str(c, type, &err);
  row->value_json = collect_str(c, value_json, &err);
  return err;
}

int sg__store_events_after_async(sg__store *s, int64_t after, int limit, sg__store_reply_cb cb,
                                void *ud) {
  if (s->pg) return sg__pg_events_after(s->pg, after, limit, cb, ud);
  collect c = {.size = sizeof(sg__store_api_event_row)};
  sg__store_reply r = {0};
  int err = sg__store_events_after(s, after, limit, collect_event, &c);
  r.n = c.n;
  r.api_events = c.rows;
  answer(s, &r, err, cb, ud);
  collect_free(&c);
  return 0;
}

int sg__store_events_prune_async(sg__store *s, int64_t keep, sg__store_reply_cb cb, void *ud) {
  if (s->pg) return sg__pg_events_prune(s->pg, keep, cb, ud);
  sg__store_reply r = {0};
  return answer(s, &r, sg__store_events_prune(s, keep), cb, ud);
}

int sg__store_events_last_async(sg__store *s, sg__store_reply_cb cb, void *ud) {
  if (s->pg) return sg__pg_events_last(s->pg, cb, ud);
  sg__store_reply r = {0};
  int err = sg__store_events_last(s, &r.num);
  return answer(s, &r, err, cb, ud);
}

static int collect_room(void *ud, const char *backend, const char *id, const char *name,
                        int64_t unread) {
  collect *c = ud;
  int err = 0;
  sg__store_room *row = collect_row(c);
  if (!row) return SG_ENOMEM;
  row->backend = collect_str(c, backend, &err);
  row->id = collect_str(c, id, &err);
  row->name = collect_str(c, name, &err);
  row->unread = unread;
  return err;
}

int sg__store_rooms_async(sg__store *s, const char *user, sg__store_reply_cb cb, void *ud) {
  if (s->pg) return sg__pg_rooms(s->pg, user, cb, ud);
  collect c = {.size = sizeof(sg__store_room)};
  sg__store_reply r = {0};
  int err = sg__store_rooms(s, user, collect_room, &c);
  r.n = c.n;
  r.rooms = c.rows;
  answer(s, &r, err, cb, ud);
  collect_free(&c);
  return 0;
}

int sg__store_read_mark_async(sg__store *s, const char *user, const char *backend,
                             const char *room, int64_t time, sg__store_reply_cb cb, void *ud) {
  if (s->pg) return sg__pg_read_mark(s->pg, user, backend, room, time, cb, ud);
  sg__store_reply r = {0};
  return answer(s, &r, sg__store_read_mark(s, user, backend, room, time), cb, ud);
}

static int collect_page_message(void *ud, const sg__store_message *m) {
  collect *c = ud;
  int err = collect_message(ud, m);
  if (err) return err;
  sg__store_message *row = (sg__store_message *)c->rows + (c->n - 1);
  row->attachments_json = collect_str(c, m->attachments_json, &err);
  return err;
}

int sg__store_messages_before_async(sg__store *s, const char *backend, const char *room,
                                   const char *before_id, int limit, sg__store_reply_cb cb,
                                   void *ud) {
  if (s->pg) return sg__pg_messages_before(s->pg, backend, room, before_id, limit, cb, ud);
  collect c = {.size = sizeof(sg__store_message)};
  sg__store_reply r = {0};
  int err = sg__store_messages_before(s, backend, room, before_id, limit, collect_page_message, &c);
  r.n = c.n;
  r.messages = c.rows;
  answer(s, &r, err, cb, ud);
  collect_free(&c);
  return 0;
}

typedef struct {
  const char *key, *value, *lease, *instance;
} held_args;

static int kv_set_held_tx(sg__store *s, void *ud) {
  held_args *a = ud;
  sqlite3_stmt *st = stmt1(s, SQL_LEASE_HOLDER, a->lease);
  if (!st) return SG_ESTORE;
  int rc = sqlite3_step(st), held = rc == SQLITE_ROW && strcmp(col_text(st, 0), a->instance) == 0;
  int err = rc == SQLITE_ROW || rc == SQLITE_DONE ? 0 : sg__store_fail(s);
  sqlite3_reset(st);
  if (err) return err;
  if (!held) return SG_STORE_NOTFOUND;
  return sg__store_kv_set(s, a->key, a->value);
}

int sg__store_kv_set_held_async(sg__store *s, const char *key, const char *value,
                               const char *lease, const char *instance, sg__store_reply_cb cb,
                               void *ud) {
  if (!value) return SG_EINVAL;
  if (s->pg) return sg__pg_kv_set_held(s->pg, key, value, lease, instance, cb, ud);
  held_args a = {key, value, lease, instance};
  sg__store_reply r = {0};
  return answer(s, &r, sg__store_atomic(s, kv_set_held_tx, &a), cb, ud);
}
