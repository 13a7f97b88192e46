/* The store on PostgreSQL, through libpq, on the libuv loop: nothing here
 * blocks. Connections are started with PQconnectStart and driven by
 * PQconnectPoll from a uv_poll_t on PQsocket; queries are sent with
 * PQsendQueryParams and read with PQconsumeInput/PQisBusy/PQgetResult when
 * the socket is readable. A small pool of connections takes calls from one
 * FIFO queue. A connection that breaks (the server restarted) is made again
 * with a backoff and the call it was running goes back to the head of the
 * queue: nothing waiting is lost. The first connection runs the migrations,
 * in one transaction under an advisory lock, so instances starting together
 * migrate once. See docs/scaling.md. */
#include "store_pg.h"

#include <libpq-fe.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pq_lazy.h"
#include "segue.h"

#define MAX_PARAMS 12
#define BACKOFF_MIN_MS 50
#define BACKOFF_MAX_MS 1000
/* Consecutive failed connection attempts after which waiting calls fail:
 * quickly when the server was never reached (a wrong dsn), after about a
 * minute when it was (a restart takes seconds). */
#define GIVE_UP_NEVER 2
#define GIVE_UP_SEEN 120

/* The database's clock, so instances on several machines agree on leases. */
#define NOW_MS "(extract(epoch from clock_timestamp()) * 1000)::bigint"
#define ADVISORY_KEY "7365677565"  /* "segue" */

typedef struct req req;
typedef void (*parse_fn)(req *q, PGresult *res, sg__store_reply *r);

struct req {
  req *next;   /* in the queue of calls waiting for a connection */
  req *onext;  /* in the list of calls not answered yet, in call order */
  int done;    /* answered by the server (res) or failed (err) */
  int err;
  PGresult *res;
  const char *sql;
  int nparams;
  char *params[MAX_PARAMS];
  parse_fn parse;
  int write;   /* changes the database: runs alone, in order */
  sg__store_reply_cb cb;
  void *ud;
  void *rows;  /* freed after the callback */
  char msg[512];
};

typedef struct conn {
  struct sg__pg *pg;
  PGconn *c;
  uv_poll_t *poll;
  int fd;
  enum { C_DOWN, C_CONNECTING, C_READY, C_BUSY } state;
  req *cur;
  PGresult *res;
  int migrating;
} conn;

struct sg__pg {
  uv_loop_t *loop;
  char *dsn;
  unsigned n;
  conn *conns;
  req *head, *tail;
  uv_timer_t retry;
  uint64_t backoff;
  int migrated;       /* 0: not yet, 1: running, 2: done */
  int ever_ready;
  unsigned failures;  /* consecutive failed connection attempts */
  int closing;
  unsigned handles;
  unsigned reads, writes;  /* calls running */
  req *ohead, *otail;      /* calls not answered yet, in call order */
  int delivering;
  void (*busy)(void *ud, int delta);  /* sg__pg_set_busy; NULL once closing */
  void *busy_ud;
  char errmsg[512];
  char fatal[512];    /* set: every call fails with this (migration refused) */
};

static void dispatch(sg__pg *pg);
static void conn_start(conn *c);

/* ---- requests ------------------------------------------------------------- */

static void req_free(req *q) {
  for (int i = 0; i < q->nparams; i++) free(q->params[i]);
  free(q->rows);
  if (q->res) PQclear(q->res);
  free(q);
}

/* Answers are delivered in the order the calls were made, whichever
 * connection finished first: a caller's later call never overtakes an
 * earlier one (the router's per-backend order rests on it), as on SQLite. */
static void deliver_ready(sg__pg *pg) {
  if (pg->delivering) return;  /* a callback made a call: the loop below goes on */
  pg->delivering = 1;
  while (pg->ohead && pg->ohead->done) {
    req *q = pg->ohead;
    pg->ohead = q->onext;
    if (!pg->ohead) pg->otail = NULL;
    /* Counted off before the callback, which may let go of what busy_ud is. */
    if (pg->busy) pg->busy(pg->busy_ud, -1);
    sg__store_reply r = {0};
    if (q->err) {
      r.err = q->err;
      r.message = q->msg;
    } else {
      q->parse(q, q->res, &r);
      if (r.err < 0 && !r.message) r.message = q->msg;
    }
    q->cb(q->ud, &r);
    req_free(q);
  }
  pg->delivering = 0;
}

static void reply_error(sg__pg *pg, req *q, int err, const char *msg) {
  q->done = 1;
  q->err = err;
  if (msg != q->msg) snprintf(q->msg, sizeof q->msg, "%s", msg);
  deliver_ready(pg);
}

/* A call left a connection (answered, or back in the queue). */
static void ran(sg__pg *pg, req *q) {
  if (!q->parse) return;
  if (q->write) pg->writes--;
  else pg->reads--;
}

static void enqueue_tail(sg__pg *pg, req *q) {
  q->next = NULL;
  if (pg->tail) pg->tail->next = q;
  else pg->head = q;
  pg->tail = q;
}

static void enqueue_head(sg__pg *pg, req *q) {
  q->next = pg->head;
  pg->head = q;
  if (!pg->tail) pg->tail = q;
}

static req *dequeue(sg__pg *pg) {
  req *q = pg->head;
  if (!q) return NULL;
  pg->head = q->next;
  if (!pg->head) pg->tail = NULL;
  q->next = NULL;
  return q;
}

static void fail_waiting(sg__pg *pg, int err, const char *msg) {
  req *q;
  while ((q = dequeue(pg))) reply_error(pg, q, err, msg);
}

/* A call: `sql` with `n` text parameters (NULL: SQL NULL), read by `parse`. */
static int submit(sg__pg *pg, const char *sql, parse_fn parse, sg__store_reply_cb cb, void *ud,
                  int n, const char *const *params) {
  if (pg->closing) return SG_ECLOSING;
  req *q = calloc(1, sizeof *q);
  if (!q) return SG_ENOMEM;
  q->sql = sql;
  q->parse = parse;
  q->write = strncmp(sql, "SELECT", 6) != 0;
  q->cb = cb;
  q->ud = ud;
  q->nparams = n;
  for (int i = 0; i < n; i++)
    if (params[i] && !(q->params[i] = strdup(params[i]))) {
      req_free(q);
      return SG_ENOMEM;
    }
  if (pg->otail) pg->otail->onext = q;
  else pg->ohead = q;
  pg->otail = q;
  if (pg->busy) pg->busy(pg->busy_ud, 1);
  if (pg->fatal[0]) {
    reply_error(pg, q, SG_ESTORE, pg->fatal);
    return 0;
  }
  enqueue_tail(pg, q);
  dispatch(pg);
  return 0;
}

/* ---- connections ---------------------------------------------------------- */

static void poll_closed(uv_handle_t *h) {
  sg__pg *pg = h->data;
  free(h);
  if (--pg->handles == 0 && pg->closing) {
    free(pg->dsn);
    free(pg->conns);
    free(pg);
  }
}

static void unwatch(conn *c) {
  if (!c->poll) return;
  c->poll->data = c->pg;
  uv_close((uv_handle_t *)c->poll, poll_closed);
  c->poll = NULL;
}

static void conn_io(uv_poll_t *h, int status, int events);

static int watch(conn *c, int events) {
  int fd = PQsocket(c->c);
  if (c->poll && c->fd != fd) unwatch(c);
  if (!c->poll) {
    c->poll = malloc(sizeof *c->poll);
    if (!c->poll) return SG_ENOMEM;
    int rc = uv_poll_init(c->pg->loop, c->poll, fd);
    if (rc < 0) {
      free(c->poll);
      c->poll = NULL;
      return rc;
    }
    c->pg->handles++;
    c->fd = fd;
    c->poll->data = c;
  }
  return uv_poll_start(c->poll, events, conn_io);
}

static void retry_fired(uv_timer_t *t) {
  sg__pg *pg = t->data;
  for (unsigned i = 0; i < pg->n && !pg->closing; i++)
    if (pg->conns[i].state == C_DOWN) conn_start(&pg->conns[i]);
}

/* The connection is gone (or never came): what it ran goes back to the head
 * of the queue, and it is made again after a backoff. */
static void conn_down(conn *c, const char *why) {
  sg__pg *pg = c->pg;
  /* First: `why` is often PQerrorMessage's, freed with the connection. */
  snprintf(pg->errmsg, sizeof pg->errmsg, "postgresql: %s", why && *why ? why : "connection lost");
  size_t l = strlen(pg->errmsg);
  while (l && (pg->errmsg[l - 1] == '\n' || pg->errmsg[l - 1] == ' ')) pg->errmsg[--l] = '\0';
  unwatch(c);
  if (c->res) PQclear(c->res);
  c->res = NULL;
  if (c->c) PQfinish(c->c);
  c->c = NULL;
  int was_up = c->state == C_READY || c->state == C_BUSY;
  c->state = C_DOWN;
  if (c->migrating) {
    c->migrating = 0;
    pg->migrated = 0;
  }
  if (c->cur) {
    ran(pg, c->cur);
    if (c->cur->parse) enqueue_head(pg, c->cur);
    else req_free(c->cur);  /* the migration: run again by the next connection */
    c->cur = NULL;
  }
  if (pg->closing) return;
  if (!was_up) {
    pg->failures++;
    if (pg->failures >= (pg->ever_ready ? GIVE_UP_SEEN : GIVE_UP_NEVER)) {
      pg->failures = 0;
      fail_waiting(pg, SG_ESTORE, pg->errmsg);
    }
  }
  if (!uv_is_active((uv_handle_t *)&pg->retry)) {
    uv_timer_start(&pg->retry, retry_fired, was_up ? 0 : pg->backoff, 0);
    if (!was_up) pg->backoff = pg->backoff * 2 > BACKOFF_MAX_MS ? BACKOFF_MAX_MS : pg->backoff * 2;
  }
}

static void conn_start(conn *c) {
  c->c = PQconnectStart(c->pg->dsn);
  if (!c->c || PQstatus(c->c) == CONNECTION_BAD) {
    conn_down(c, c->c ? PQerrorMessage(c->c) : "out of memory");
    return;
  }
  c->state = C_CONNECTING;
  /* As if PQconnectPoll had said PGRES_POLLING_WRITING (libpq's manual). */
  if (watch(c, UV_WRITABLE) < 0) conn_down(c, "cannot poll the connection's socket");
}

static const char MIGRATE_SQL[];

static void run_next(conn *c);

static void connect_step(conn *c) {
  sg__pg *pg = c->pg;
  switch (PQconnectPoll(c->c)) {
    case PGRES_POLLING_FAILED:
      conn_down(c, PQerrorMessage(c->c));
      return;
    case PGRES_POLLING_READING:
      if (watch(c, UV_READABLE) < 0) conn_down(c, "cannot poll the connection's socket");
      return;
    case PGRES_POLLING_WRITING:
      if (watch(c, UV_WRITABLE) < 0) conn_down(c, "cannot poll the connection's socket");
      return;
    default:
      break;
  }
  if (PQsetnonblocking(c->c, 1) != 0 || watch(c, UV_READABLE) < 0) {
    conn_down(c, PQerrorMessage(c->c));
    return;
  }
  c->state = C_READY;
  pg->ever_ready = 1;
  pg->failures = 0;
  pg->backoff = BACKOFF_MIN_MS;
  run_next(c);
  dispatch(pg);
}

/* Errors that mean the connection (not the statement) failed: class 08
 * (connection exception), 57P01..57P03 (the server shuts down or starts). */
static int connection_error(PGconn *pc, PGresult *res) {
  if (PQstatus(pc) == CONNECTION_BAD) return 1;
  const char *state = res ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
  return state && (strncmp(state, "08", 2) == 0 || strncmp(state, "57P0", 4) == 0);
}

static void finish(conn *c) {
  sg__pg *pg = c->pg;
  req *q = c->cur;
  PGresult *res = c->res;
  c->cur = NULL;
  c->res = NULL;
  ran(pg, q);
  if (connection_error(c->c, res)) {
    if (q->parse) {  /* conn_down puts it back at the head */
      if (q->write) pg->writes++;
      else pg->reads++;
    }
    c->cur = q;
    if (res) PQclear(res);
    conn_down(c, PQerrorMessage(c->c));
    return;
  }
  c->state = C_READY;
  ExecStatusType st = res ? PQresultStatus(res) : PGRES_FATAL_ERROR;
  int ok = st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK;
  if (c->migrating) {
    c->migrating = 0;
    int version = ok && PQntuples(res) == 1 ? atoi(PQgetvalue(res, 0, 0)) : -1;
    if (!ok) {
      snprintf(pg->fatal, sizeof pg->fatal, "postgresql: migration: %s",
               res ? PQresultErrorMessage(res) : PQerrorMessage(c->c));
    } else if (version > SG_STORE_SCHEMA_VERSION) {
      snprintf(pg->fatal, sizeof pg->fatal,
               "postgresql: schema version %d is newer than this segue's (%d)", version,
               SG_STORE_SCHEMA_VERSION);
    }
    pg->migrated = 2;
    if (pg->fatal[0]) fail_waiting(pg, SG_ESTORE, pg->fatal);
    if (res) PQclear(res);
    req_free(q);
    dispatch(pg);
    return;
  }
  if (!ok) {
    snprintf(q->msg, sizeof q->msg, "postgresql: %s",
             res ? PQresultErrorMessage(res) : PQerrorMessage(c->c));
    size_t l = strlen(q->msg);
    while (l && q->msg[l - 1] == '\n') q->msg[--l] = '\0';
    q->err = SG_ESTORE;
  }
  q->res = res;
  q->done = 1;
  deliver_ready(pg);
  dispatch(pg);
}

static void conn_io(uv_poll_t *h, int status, int events) {
  conn *c = h->data;
  if (c->state == C_CONNECTING) {
    connect_step(c);
    return;
  }
  if (status < 0) {
    conn_down(c, uv_strerror(status));
    return;
  }
  if (events & UV_WRITABLE) {
    int f = PQflush(c->c);
    if (f < 0) {
      conn_down(c, PQerrorMessage(c->c));
      return;
    }
    if (f == 0) uv_poll_start(c->poll, UV_READABLE, conn_io);
  }
  if (!(events & UV_READABLE)) return;
  if (!PQconsumeInput(c->c)) {
    conn_down(c, PQerrorMessage(c->c));
    return;
  }
  while (c->cur && !PQisBusy(c->c)) {
    PGresult *res = PQgetResult(c->c);
    if (!res) {
      finish(c);
      return;
    }
    /* Several statements (the migration): keep the first error, else the
     * last rows. */
    ExecStatusType st = PQresultStatus(res);
    int keep_old = c->res && PQresultStatus(c->res) == PGRES_FATAL_ERROR;
    if (!keep_old && (!c->res || st == PGRES_TUPLES_OK || st == PGRES_FATAL_ERROR)) {
      if (c->res) PQclear(c->res);
      c->res = res;
    } else {
      PQclear(res);
    }
  }
  if (!c->cur && PQstatus(c->c) == CONNECTION_BAD) conn_down(c, PQerrorMessage(c->c));
}

static void send_req(conn *c, req *q) {
  if (q->parse) {
    if (q->write) c->pg->writes++;
    else c->pg->reads++;
  }
  c->cur = q;
  c->state = C_BUSY;
  int ok = q->parse ? PQsendQueryParams(c->c, q->sql, q->nparams, NULL,
                                        (const char *const *)q->params, NULL, NULL, 0)
                    : PQsendQuery(c->c, q->sql);
  if (!ok) {
    conn_down(c, PQerrorMessage(c->c));
    return;
  }
  int f = PQflush(c->c);
  if (f < 0) conn_down(c, PQerrorMessage(c->c));
  else uv_poll_start(c->poll, f ? UV_READABLE | UV_WRITABLE : UV_READABLE, conn_io);
}

/* A connection that became ready migrates first if nobody has. */
static void run_next(conn *c) {
  sg__pg *pg = c->pg;
  if (pg->migrated != 0 || c->state != C_READY) return;
  req *q = calloc(1, sizeof *q);
  if (!q) return;
  q->sql = MIGRATE_SQL;
  pg->migrated = 1;
  c->migrating = 1;
  send_req(c, q);
}

static void dispatch(sg__pg *pg) {
  if (pg->closing) return;
  for (unsigned i = 0; i < pg->n && pg->head; i++) {
    conn *c = &pg->conns[i];
    if (c->state != C_READY) continue;
    if (pg->migrated != 2) {
      run_next(c);
      continue;
    }
    /* Calls take effect in the order they were made, as on SQLite: reads
     * run side by side, a write waits for everything before it and holds
     * back everything after it. */
    if (pg->writes || (pg->head->write && pg->reads)) return;
    send_req(c, dequeue(pg));
  }
}

int sg__pg_open(uv_loop_t *loop, const char *dsn, unsigned pool, sg__pg **out, char *err,
                size_t errlen) {
  *out = NULL;
  char why[300];
  if (sg__pq_load(why, sizeof why) != 0) {  /* libpq is loaded on first use */
    snprintf(err, errlen, "store: %s", why);
    return SG_EINVAL;
  }
  sg__pg *pg = calloc(1, sizeof *pg);
  if (pg) pg->conns = calloc(pool, sizeof *pg->conns);
  if (pg) pg->dsn = strdup(dsn);
  if (!pg || !pg->conns || !pg->dsn) {
    if (pg) {
      free(pg->conns);
      free(pg->dsn);
    }
    free(pg);
    snprintf(err, errlen, "out of memory");
    return SG_ENOMEM;
  }
  /* A dsn libpq cannot parse is refused now, with its message. */
  char *perr = NULL;
  PQconninfoOption *opts = PQconninfoParse(dsn, &perr);
  if (!opts) {
    snprintf(err, errlen, "store: dsn: %s", perr ? perr : "cannot parse");
    PQfreemem(perr);
    free(pg->conns);
    free(pg->dsn);
    free(pg);
    return SG_EINVAL;
  }
  PQconninfoFree(opts);
  pg->loop = loop;
  pg->n = pool;
  pg->backoff = BACKOFF_MIN_MS;
  uv_timer_init(loop, &pg->retry);
  pg->retry.data = pg;
  pg->handles = 1;
  for (unsigned i = 0; i < pool; i++) {
    pg->conns[i].pg = pg;
    pg->conns[i].state = C_DOWN;
  }
  for (unsigned i = 0; i < pool; i++) conn_start(&pg->conns[i]);
  *out = pg;
  return 0;
}

static void retry_closed(uv_handle_t *h) {
  sg__pg *pg = h->data;
  if (--pg->handles == 0) {
    free(pg->dsn);
    free(pg->conns);
    free(pg);
  }
}

void sg__pg_set_busy(sg__pg *pg, void (*busy)(void *ud, int delta), void *ud) {
  pg->busy = busy;
  pg->busy_ud = ud;
}

void sg__pg_close(sg__pg *pg) {
  pg->closing = 1;
  pg->busy = NULL;  /* the caller knows how many it drops: not counted off one by one */
  for (unsigned i = 0; i < pg->n; i++) {
    conn *c = &pg->conns[i];
    req *q = c->cur;
    c->cur = NULL;
    if (q) ran(pg, q);
    if (q && q->parse) reply_error(pg, q, SG_ECANCELED, "the store was closed");
    else if (q) req_free(q);
    unwatch(c);
    if (c->res) PQclear(c->res);
    c->res = NULL;
    if (c->c) PQfinish(c->c);
    c->c = NULL;
    c->state = C_DOWN;
  }
  fail_waiting(pg, SG_ECANCELED, "the store was closed");
  uv_close((uv_handle_t *)&pg->retry, retry_closed);
}

/* ---- migrations ------------------------------------------------------------ */

/* One transaction under an advisory lock: the versions SQLite has
 * (store.c), in PostgreSQL's dialect. seq columns give rows an order where
 * SQLite has rowid. Never edit a released version; append one. */
static const char MIGRATE_SQL[] =
    "BEGIN;"
    "SELECT pg_advisory_xact_lock(" ADVISORY_KEY ");"
    "CREATE TABLE IF NOT EXISTS segue_schema(version INTEGER NOT NULL);"
    "INSERT INTO segue_schema SELECT 0 WHERE NOT EXISTS (SELECT 1 FROM segue_schema);"
    "DO $m$ BEGIN IF (SELECT version FROM segue_schema) < 1 THEN"
    "  CREATE TABLE msg_map(seq BIGSERIAL PRIMARY KEY,"
    "    origin_backend TEXT NOT NULL, origin_id TEXT NOT NULL,"
    "    copy_backend TEXT NOT NULL, copy_id TEXT NOT NULL,"
    "    room TEXT, created BIGINT NOT NULL, UNIQUE (copy_backend, copy_id));"
    "  CREATE INDEX msg_map_origin ON msg_map(origin_backend, origin_id);"
    "  CREATE TABLE messages(seq BIGSERIAL,"
    "    backend TEXT NOT NULL, id TEXT NOT NULL, room TEXT, sender TEXT,"
    "    content_json TEXT, create_time BIGINT, edit_time BIGINT,"
    "    deleted INTEGER NOT NULL DEFAULT 0, origin_backend TEXT, origin_id TEXT,"
    "    PRIMARY KEY (backend, id));"
    "  CREATE INDEX messages_room ON messages(backend, room, create_time);"
    "  CREATE TABLE kv(key TEXT PRIMARY KEY, value TEXT);"
    "  CREATE TABLE peers(server_id TEXT PRIMARY KEY, public_key BYTEA,"
    "    first_seen BIGINT NOT NULL, last_push BIGINT, last_push_in BIGINT,"
    "    last_pull BIGINT, last_served BIGINT, last_error TEXT, last_error_time BIGINT);"
    "  CREATE TABLE outbox(seq BIGSERIAL PRIMARY KEY,"
    "    peer TEXT NOT NULL REFERENCES peers(server_id) ON UPDATE CASCADE,"
    "    event BYTEA NOT NULL, created BIGINT NOT NULL);"
    "  CREATE INDEX outbox_peer ON outbox(peer, seq);"
    "  CREATE TABLE inbox(seq BIGSERIAL PRIMARY KEY,"
    "    peer TEXT NOT NULL REFERENCES peers(server_id) ON UPDATE CASCADE,"
    "    event BYTEA NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,"
    "    last_error TEXT, received BIGINT NOT NULL);"
    "  CREATE TABLE dead_letters(id BIGSERIAL PRIMARY KEY, peer TEXT NOT NULL,"
    "    direction TEXT NOT NULL CHECK (direction IN ('in', 'out')),"
    "    event BYTEA NOT NULL, error TEXT, attempts INTEGER NOT NULL DEFAULT 0,"
    "    created BIGINT NOT NULL, died BIGINT NOT NULL);"
    "  UPDATE segue_schema SET version = 1;"
    "END IF; END $m$;"
    "DO $m$ BEGIN IF (SELECT version FROM segue_schema) < 2 THEN"
    "  CREATE TABLE instances(name TEXT PRIMARY KEY, info TEXT, seen BIGINT NOT NULL);"
    "  CREATE TABLE leases(name TEXT PRIMARY KEY, holder TEXT NOT NULL,"
    "    expires BIGINT NOT NULL);"
    "  UPDATE segue_schema SET version = 2;"
    "END IF; END $m$;"
    /* 3: the client API's tables (docs/api.md). */
    "DO $m$ BEGIN IF (SELECT version FROM segue_schema) < 3 THEN"
    "  CREATE TABLE api_users(name TEXT PRIMARY KEY, admin INTEGER NOT NULL DEFAULT 0,"
    "    created BIGINT NOT NULL);"
    "  CREATE TABLE api_tokens(hash TEXT PRIMARY KEY,"
    "    user_name TEXT NOT NULL REFERENCES api_users(name) ON DELETE CASCADE,"
    "    created BIGINT NOT NULL);"
    "  CREATE INDEX api_tokens_user ON api_tokens(user_name);"
    "  CREATE TABLE api_events(id BIGSERIAL PRIMARY KEY, backend TEXT NOT NULL,"
    "    type TEXT NOT NULL, value_json TEXT NOT NULL, time BIGINT NOT NULL);"
    "  CREATE TABLE api_rooms(backend TEXT NOT NULL, id TEXT NOT NULL, name TEXT,"
    "    PRIMARY KEY (backend, id));"
    "  CREATE TABLE api_reads("
    "    user_name TEXT NOT NULL REFERENCES api_users(name) ON DELETE CASCADE,"
    "    backend TEXT NOT NULL, room TEXT NOT NULL, last_time BIGINT NOT NULL,"
    "    PRIMARY KEY (user_name, backend, room));"
    "  ALTER TABLE messages ADD COLUMN attachments_json TEXT;"
    "  UPDATE segue_schema SET version = 3;"
    "END IF; END $m$;"
    /* 4: event appends carry a key, so one run again is not a second event. */
    "DO $m$ BEGIN IF (SELECT version FROM segue_schema) < 4 THEN"
    "  ALTER TABLE api_events ADD COLUMN write_key TEXT;"
    "  CREATE UNIQUE INDEX api_events_write_key ON api_events(write_key);"
    "  UPDATE segue_schema SET version = 4;"
    "END IF; END $m$;"
    /* 5: the same for the postbox's queues (one key per appended event). */
    "DO $m$ BEGIN IF (SELECT version FROM segue_schema) < 5 THEN"
    "  ALTER TABLE outbox ADD COLUMN write_key TEXT;"
    "  CREATE UNIQUE INDEX outbox_write_key ON outbox(write_key) WHERE write_key IS NOT NULL;"
    "  ALTER TABLE inbox ADD COLUMN write_key TEXT;"
    "  CREATE UNIQUE INDEX inbox_write_key ON inbox(write_key) WHERE write_key IS NOT NULL;"
    "  UPDATE segue_schema SET version = 5;"
    "END IF; END $m$;"
    "SELECT version FROM segue_schema;"
    "COMMIT;";

/* ---- results ------------------------------------------------------------------ */

static const char *val(PGresult *res, int row, int col) {
  return PQgetisnull(res, row, col) ? NULL : PQgetvalue(res, row, col);
}

static int64_t ival(PGresult *res, int row, int col) {
  const char *v = val(res, row, col);
  return v ? strtoll(v, NULL, 10) : 0;
}

static void parse_none(req *q, PGresult *res, sg__store_reply *r) {}

static void parse_changed(req *q, PGresult *res, sg__store_reply *r) {
  r->err = strcmp(PQcmdTuples(res), "0") == 0 ? SG_STORE_NOTFOUND : 0;
}

/* Up to two text columns of the first row; no row (or a NULL first): NOTFOUND. */
static void parse_text(req *q, PGresult *res, sg__store_reply *r) {
  if (PQntuples(res) < 1 || PQgetisnull(res, 0, 0)) {
    r->err = SG_STORE_NOTFOUND;
    return;
  }
  for (int i = 0; i < 2 && i < PQnfields(res); i++) r->text[i] = val(res, 0, i);
}

static void *rows_for(req *q, PGresult *res, size_t size, sg__store_reply *r) {
  r->n = (size_t)PQntuples(res);
  q->rows = calloc(r->n ? r->n : 1, size);
  if (!q->rows) {
    r->n = 0;
    r->err = SG_ENOMEM;
    snprintf(q->msg, sizeof q->msg, "out of memory");
  }
  return q->rows;
}

static void parse_copies(req *q, PGresult *res, sg__store_reply *r) {
  sg__store_copy *rows = rows_for(q, res, sizeof *rows, r);
  for (size_t i = 0; rows && i < r->n; i++)
    rows[i] = (sg__store_copy){val(res, (int)i, 0), val(res, (int)i, 1), val(res, (int)i, 2)};
  r->copies = rows;
}

static void parse_messages(req *q, PGresult *res, sg__store_reply *r) {
  sg__store_message *rows = rows_for(q, res, sizeof *rows, r);
  int att = PQnfields(res) > 8;  /* messages_before: with attachments */
  for (size_t i = 0; rows && i < r->n; i++) {
    int k = (int)i;
    rows[i] = (sg__store_message){val(res, k, 0),  val(res, k, 1),  val(res, k, 2),
                                 val(res, k, 3),  val(res, k, 4),  ival(res, k, 5),
                                 ival(res, k, 6), (int)ival(res, k, 7),
                                 att ? val(res, k, 8) : NULL};
  }
  r->messages = rows;
}

static void parse_instances(req *q, PGresult *res, sg__store_reply *r) {
  sg__store_instance *rows = rows_for(q, res, sizeof *rows, r);
  for (size_t i = 0; rows && i < r->n; i++)
    rows[i] = (sg__store_instance){val(res, (int)i, 0), val(res, (int)i, 1), ival(res, (int)i, 2)};
  r->instances = rows;
}

static void parse_leases(req *q, PGresult *res, sg__store_reply *r) {
  sg__store_lease *rows = rows_for(q, res, sizeof *rows, r);
  for (size_t i = 0; rows && i < r->n; i++)
    rows[i] = (sg__store_lease){val(res, (int)i, 0), val(res, (int)i, 1), ival(res, (int)i, 2)};
  r->leases = rows;
}

/* map_put: inserted?, and the origin the copy has. A copy claimed by another
 * origin is SG_EEXIST (as on SQLite); the same pair again is fine. */
static void parse_map_put(req *q, PGresult *res, sg__store_reply *r) {
  if (PQntuples(res) != 1 || ival(res, 0, 0) > 0 || PQgetisnull(res, 0, 1)) return;
  const char *ob = val(res, 0, 1), *oi = val(res, 0, 2);
  if (strcmp(ob, q->params[0]) == 0 && strcmp(oi, q->params[1]) == 0) return;
  snprintf(q->msg, sizeof q->msg, "%s/%s is already a copy of %s/%s", q->params[2],
           q->params[3], ob, oi);
  r->err = SG_EEXIST;
}

/* ---- operations -------------------------------------------------------------- */

#define P(...) (const char *const[]){__VA_ARGS__}
#define NP(...) (int)(sizeof(P(__VA_ARGS__)) / sizeof(const char *))
#define SUBMIT(pg, sql, parse, cb, ud, ...) \
  submit(pg, sql, parse, cb, ud, NP(__VA_ARGS__), P(__VA_ARGS__))

int sg__pg_kv_get(sg__pg *pg, const char *key, sg__store_reply_cb cb, void *ud) {
  return SUBMIT(pg, "SELECT value FROM kv WHERE key = $1", parse_text, cb, ud, key);
}

int sg__pg_kv_set(sg__pg *pg, const char *key, const char *value, sg__store_reply_cb cb,
                  void *ud) {
  if (!value) return SUBMIT(pg, "DELETE FROM kv WHERE key = $1", parse_none, cb, ud, key);
  return SUBMIT(pg,
                "INSERT INTO kv(key, value) VALUES ($1, $2)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                parse_none, cb, ud, key, value);
}

int sg__pg_map_put(sg__pg *pg, const char *ob, const char *oi, const char *cb_, const char *ci,
                   const char *room, sg__store_reply_cb cb, void *ud) {
  /* One statement, so one transaction: the map row, and the copy's log row
   * learns its origin. */
  return SUBMIT(pg,
                "WITH ins AS (INSERT INTO msg_map(origin_backend, origin_id, copy_backend,"
                "   copy_id, room, created) VALUES ($1, $2, $3, $4, $5, " NOW_MS ")"
                "   ON CONFLICT (copy_backend, copy_id) DO NOTHING RETURNING 1),"
                " upd AS (UPDATE messages SET origin_backend = $1, origin_id = $2"
                "   WHERE backend = $3 AND id = $4 AND EXISTS (SELECT 1 FROM ins))"
                " SELECT (SELECT count(*) FROM ins), m.origin_backend, m.origin_id"
                " FROM (SELECT 1) x LEFT JOIN msg_map m"
                "   ON m.copy_backend = $3 AND m.copy_id = $4",
                parse_map_put, cb, ud, ob, oi, cb_, ci, room);
}

int sg__pg_map_origin(sg__pg *pg, const char *backend, const char *id, sg__store_reply_cb cb,
                      void *ud) {
  return SUBMIT(pg,
                "SELECT origin_backend, origin_id FROM msg_map"
                " WHERE copy_backend = $1 AND copy_id = $2",
                parse_text, cb, ud, backend, id);
}

int sg__pg_map_copies(sg__pg *pg, const char *ob, const char *oi, sg__store_reply_cb cb,
                      void *ud) {
  return SUBMIT(pg,
                "SELECT copy_backend, copy_id, room FROM msg_map"
                " WHERE origin_backend = $1 AND origin_id = $2 ORDER BY seq",
                parse_copies, cb, ud, ob, oi);
}

int sg__pg_log_message(sg__pg *pg, const char *backend, const char *id, const char *room,
                       const char *sender, const char *content_json, int64_t create_time,
                       int64_t edit_time, sg__store_reply_cb cb, void *ud) {
  char ct[24], et[24];
  snprintf(ct, sizeof ct, "%lld", (long long)create_time);
  snprintf(et, sizeof et, "%lld", (long long)edit_time);
  return SUBMIT(pg,
                "INSERT INTO messages(backend, id, room, sender, content_json, create_time,"
                "  edit_time, origin_backend, origin_id)"
                " SELECT $1::text, $2::text, $3::text, $4::text, $5::text, $6::bigint,"
                "  $7::bigint, m.origin_backend, m.origin_id"
                " FROM (SELECT 1) x LEFT JOIN msg_map m"
                "  ON m.copy_backend = $1::text AND m.copy_id = $2::text"
                " ON CONFLICT (backend, id) DO UPDATE SET content_json = excluded.content_json,"
                "  edit_time = excluded.edit_time",
                parse_none, cb, ud, backend, id, room, sender, content_json, ct,
                edit_time ? et : NULL);
}

int sg__pg_log_delete(sg__pg *pg, const char *backend, const char *id, sg__store_reply_cb cb,
                      void *ud) {
  return SUBMIT(pg,
                "UPDATE messages SET deleted = 1, content_json = NULL"
                " WHERE backend = $1 AND id = $2",
                parse_changed, cb, ud, backend, id);
}

int sg__pg_messages(sg__pg *pg, const char *backend, const char *room, int limit,
                    sg__store_reply_cb cb, void *ud) {
  char lim[16];
  snprintf(lim, sizeof lim, "%d", limit);
  return SUBMIT(pg,
                "SELECT backend, id, room, sender, content_json, create_time, edit_time, deleted"
                " FROM (SELECT * FROM messages WHERE backend = $1"
                "  AND room IS NOT DISTINCT FROM $2::text"
                "  ORDER BY create_time DESC, seq DESC LIMIT $3::bigint) t"
                " ORDER BY create_time, seq",
                parse_messages, cb, ud, backend, room, limit > 0 ? lim : NULL);
}

int sg__pg_instance_beat(sg__pg *pg, const char *instance, const char *info,
                         sg__store_reply_cb cb, void *ud) {
  return SUBMIT(pg,
                "INSERT INTO instances(name, info, seen) VALUES ($1, $2, " NOW_MS ")"
                " ON CONFLICT (name) DO UPDATE SET info = excluded.info, seen = excluded.seen",
                parse_none, cb, ud, instance, info);
}

int sg__pg_instances(sg__pg *pg, sg__store_reply_cb cb, void *ud) {
  return submit(pg, "SELECT name, info, seen FROM instances ORDER BY name", parse_instances, cb,
                ud, 0, NULL);
}

int sg__pg_leases(sg__pg *pg, sg__store_reply_cb cb, void *ud) {
  return submit(pg, "SELECT name, holder, expires FROM leases ORDER BY name", parse_leases, cb,
                ud, 0, NULL);
}

int sg__pg_lease_claim(sg__pg *pg, const char *name, const char *instance, int64_t ttl_ms,
                       sg__store_reply_cb cb, void *ud) {
  char ttl[24];
  snprintf(ttl, sizeof ttl, "%lld", (long long)ttl_ms);
  /* Taken when free, expired or ours; the row is locked by the upsert, so
   * two instances never both take it. Who holds it afterwards comes back. */
  return SUBMIT(pg,
                "WITH c AS (INSERT INTO leases(name, holder, expires)"
                "  VALUES ($1, $2, " NOW_MS " + $3::bigint)"
                "  ON CONFLICT (name) DO UPDATE SET holder = excluded.holder,"
                "   expires = excluded.expires"
                "  WHERE leases.holder = excluded.holder OR leases.expires < " NOW_MS
                "  RETURNING holder)"
                " SELECT holder FROM c UNION ALL"
                " SELECT holder FROM leases WHERE name = $1 AND NOT EXISTS (SELECT 1 FROM c)",
                parse_text, cb, ud, name, instance, ttl);
}

int sg__pg_lease_release(sg__pg *pg, const char *name, const char *instance,
                         sg__store_reply_cb cb, void *ud) {
  return SUBMIT(pg, "DELETE FROM leases WHERE name = $1 AND holder = $2", parse_none, cb, ud,
                name, instance);
}

/* ---- the client API (docs/api.md) -------------------------------------------------
 * The same tables and meaning as SQLite's (store.c). Writes that belong
 * together are one statement (data-modifying WITH), so one transaction. */

/* The first column of the first row as num (event ids, counts). */
static void parse_num(req *q, PGresult *res, sg__store_reply *r) {
  r->num = PQntuples(res) > 0 ? ival(res, 0, 0) : 0;
}

/* num as parse_num; no row: SG_STORE_NOTFOUND. */
static void parse_num_found(req *q, PGresult *res, sg__store_reply *r) {
  parse_num(q, res, r);
  if (PQntuples(res) < 1) r->err = SG_STORE_NOTFOUND;
}

int sg__pg_message_edit_time(sg__pg *pg, const char *backend, const char *id,
                             sg__store_reply_cb cb, void *ud) {
  return SUBMIT(pg,
                "SELECT COALESCE(edit_time, 0) FROM messages WHERE backend = $1 AND id = $2",
                parse_num_found, cb, ud, backend, id);
}

/* user_add's insert (one row: how many tokens it made), then its second
 * look (one row: whether the name has this call's token): the name is taken
 * by someone else only when neither (a call run again after a lost
 * connection finds its own user and token). */
static void parse_user_add(req *q, PGresult *res, sg__store_reply *r) {
  if (PQntuples(res) == 1 && (ival(res, 0, 0) > 0 || strcmp(PQgetvalue(res, 0, 0), "t") == 0))
    return;
  snprintf(q->msg, sizeof q->msg, "a user of that name exists");
  r->err = SG_EEXIST;
}

static void parse_users(req *q, PGresult *res, sg__store_reply *r) {
  sg__store_user *rows = rows_for(q, res, sizeof *rows, r);
  for (size_t i = 0; rows && i < r->n; i++) {
    int k = (int)i;
    rows[i] = (sg__store_user){val(res, k, 0), (int)ival(res, k, 1), (int)ival(res, k, 3),
                              ival(res, k, 2)};
  }
  r->users = rows;
}

static void parse_token_user(req *q, PGresult *res, sg__store_reply *r) {
  if (PQntuples(res) < 1) {
    r->err = SG_STORE_NOTFOUND;
    return;
  }
  r->text[0] = val(res, 0, 0);
  r->num = ival(res, 0, 1);
}

static void parse_api_events(req *q, PGresult *res, sg__store_reply *r) {
  sg__store_api_event_row *rows = rows_for(q, res, sizeof *rows, r);
  for (size_t i = 0; rows && i < r->n; i++) {
    int k = (int)i;
    rows[i] = (sg__store_api_event_row){ival(res, k, 0), val(res, k, 1), val(res, k, 2),
                                       val(res, k, 3)};
  }
  r->api_events = rows;
}

static void parse_rooms(req *q, PGresult *res, sg__store_reply *r) {
  sg__store_room *rows = rows_for(q, res, sizeof *rows, r);
  for (size_t i = 0; rows && i < r->n; i++) {
    int k = (int)i;
    rows[i] = (sg__store_room){val(res, k, 0), val(res, k, 1), val(res, k, 2), ival(res, k, 3)};
  }
  r->rooms = rows;
}

typedef struct user_add_call {
  sg__pg *pg;
  sg__store_reply_cb cb;
  void *ud;
  char *name, *hash;
} user_add_call;

static void user_add_free(user_add_call *u) {
  free(u->name);
  free(u->hash);
  free(u);
}

static void user_add_answer(void *ud, const sg__store_reply *r) {
  user_add_call *u = ud;
  u->cb(u->ud, r);
  user_add_free(u);
}

/* The insert made no user: the name is taken, maybe by this very call (its
 * first run committed, its answer lost). The insert's own snapshot cannot
 * tell when that run was still executing as this one began (the insert
 * waited for it): a statement of its own, begun after, can. */
static void user_add_inserted(void *ud, const sg__store_reply *r) {
  user_add_call *u = ud;
  if (r->err != SG_EEXIST ||
      SUBMIT(u->pg, "SELECT EXISTS (SELECT 1 FROM api_tokens WHERE hash = $1 AND user_name = $2)",
             parse_user_add, user_add_answer, u, u->hash, u->name) != 0)
    user_add_answer(u, r);
}

int sg__pg_user_add(sg__pg *pg, const char *name, int admin, const char *token_hash,
                    sg__store_reply_cb cb, void *ud) {
  user_add_call *u = malloc(sizeof *u);
  if (!u) return SG_ENOMEM;
  *u = (user_add_call){pg, cb, ud, strdup(name), strdup(token_hash)};
  if (!u->name || !u->hash) {
    user_add_free(u);
    return SG_ENOMEM;
  }
  /* The token's foreign key is checked at the end of the statement, when the
   * user's row is there. */
  int rc = SUBMIT(pg,
                  "WITH u AS (INSERT INTO api_users(name, admin, created)"
                  "  VALUES ($1, $2::integer, " NOW_MS ") ON CONFLICT (name) DO NOTHING"
                  "  RETURNING name),"
                  " t AS (INSERT INTO api_tokens(hash, user_name, created)"
                  "  SELECT $3, name, " NOW_MS " FROM u RETURNING 1)"
                  " SELECT count(*) FROM t",
                  parse_user_add, user_add_inserted, u, name, admin ? "1" : "0", token_hash);
  if (rc) user_add_free(u);
  return rc;
}

int sg__pg_user_remove(sg__pg *pg, const char *name, sg__store_reply_cb cb, void *ud) {
  return SUBMIT(pg, "DELETE FROM api_users WHERE name = $1", parse_changed, cb, ud, name);
}

int sg__pg_users(sg__pg *pg, sg__store_reply_cb cb, void *ud) {
  return submit(pg,
                "SELECT u.name, u.admin, u.created,"
                " (SELECT count(*) FROM api_tokens t WHERE t.user_name = u.name)"
                " FROM api_users u ORDER BY u.name",
                parse_users, cb, ud, 0, NULL);
}

int sg__pg_token_user(sg__pg *pg, const char *token_hash, sg__store_reply_cb cb, void *ud) {
  return SUBMIT(pg,
                "SELECT u.name, u.admin FROM api_tokens t JOIN api_users u"
                " ON u.name = t.user_name WHERE t.hash = $1",
                parse_token_user, cb, ud, token_hash);
}

/* The event row first, with this call's key ($1 backend, $2 type, $3 value,
 * $4 the key, then the effect's own parameters): a call run again after a
 * lost connection finds the row its first run committed (DO UPDATE locks
 * and returns it even when that run committed after this statement began)
 * and returns its id, and the effect on the log runs only with a new row
 * (xmax = 0: inserted, not updated). */
#define EVENT_INSERT \
  "WITH e AS (INSERT INTO api_events(backend, type, value_json, time, write_key)" \
  " VALUES ($1, $2, $3, " NOW_MS ", $4) ON CONFLICT (write_key)" \
  " DO UPDATE SET write_key = excluded.write_key RETURNING id, xmax = 0 AS fresh)"
#define EVENT_FRESH " EXISTS (SELECT 1 FROM e WHERE fresh)"

int sg__pg_event_append(sg__pg *pg, const sg__store_api_event *ev, sg__store_reply_cb cb,
                        void *ud) {
  const char *t = ev->type;
  char key[SG_STORE_WRITE_KEY_LEN];
  sg__store_write_key(key);
  if (ev->id && strcmp(t, "MessageUpsert") == 0) {
    char ct[24], et[24];
    snprintf(ct, sizeof ct, "%lld", (long long)ev->create_time);
    snprintf(et, sizeof et, "%lld", (long long)ev->edit_time);
    return SUBMIT(pg,
                  EVENT_INSERT ", m AS (INSERT INTO messages(backend, id, room, sender,"
                  "  content_json, create_time, edit_time, attachments_json)"
                  "  SELECT $1::text, $5::text, $6::text, $7::text, $8::text, $9::bigint,"
                  "  $10::bigint, $11::text WHERE" EVENT_FRESH
                  "  ON CONFLICT (backend, id) DO UPDATE SET content_json = excluded.content_json,"
                  "  edit_time = excluded.edit_time, attachments_json = excluded.attachments_json)"
                  " SELECT id FROM e",
                  parse_num, cb, ud, ev->backend, t, ev->value_json, key, ev->id, ev->room,
                  ev->sender, ev->content_json, ct, ev->edit_time ? et : NULL,
                  ev->attachments_json);
  }
  if (ev->id && strcmp(t, "MessageDelete") == 0)
    return SUBMIT(pg,
                  EVENT_INSERT ", m AS (UPDATE messages SET deleted = 1, content_json = NULL"
                  "  WHERE backend = $1 AND id = $5 AND" EVENT_FRESH ")"
                  " SELECT id FROM e",
                  parse_num, cb, ud, ev->backend, t, ev->value_json, key, ev->id);
  if (ev->id && strcmp(t, "RoomUpsert") == 0)
    return SUBMIT(pg,
                  EVENT_INSERT ", r AS (INSERT INTO api_rooms(backend, id, name)"
                  "  SELECT $1::text, $5::text, $6::text WHERE" EVENT_FRESH
                  "  ON CONFLICT (backend, id) DO UPDATE SET name = excluded.name)"
                  " SELECT id FROM e",
                  parse_num, cb, ud, ev->backend, t, ev->value_json, key, ev->id, ev->room_name);
  if (ev->id && strcmp(t, "RoomDelete") == 0)
    return SUBMIT(pg,
                  EVENT_INSERT ", r AS (DELETE FROM api_rooms WHERE backend = $1 AND id = $5"
                  "  AND" EVENT_FRESH ")"
                  " SELECT id FROM e",
                  parse_num, cb, ud, ev->backend, t, ev->value_json, key, ev->id);
  return SUBMIT(pg, EVENT_INSERT " SELECT id FROM e", parse_num, cb, ud, ev->backend, t,
                ev->value_json, key);
}

int sg__pg_events_after(sg__pg *pg, int64_t after, int limit, sg__store_reply_cb cb, void *ud) {
  char a[24], l[16];
  snprintf(a, sizeof a, "%lld", (long long)after);
  snprintf(l, sizeof l, "%d", limit);
  return SUBMIT(pg,
                "SELECT id, backend, type, value_json FROM api_events WHERE id > $1::bigint"
                " ORDER BY id LIMIT $2::bigint",
                parse_api_events, cb, ud, a, limit > 0 ? l : NULL);
}

int sg__pg_events_prune(sg__pg *pg, int64_t keep, sg__store_reply_cb cb, void *ud) {
  char k[24];
  snprintf(k, sizeof k, "%lld", (long long)keep);
  return SUBMIT(pg,
                "DELETE FROM api_events WHERE id <= (SELECT max(id) FROM api_events) - $1::bigint",
                parse_none, cb, ud, k);
}

int sg__pg_events_last(sg__pg *pg, sg__store_reply_cb cb, void *ud) {
  return submit(pg, "SELECT COALESCE(max(id), 0) FROM api_events", parse_num, cb, ud, 0, NULL);
}

int sg__pg_rooms(sg__pg *pg, const char *user, sg__store_reply_cb cb, void *ud) {
  return SUBMIT(pg,
                "SELECT k.backend, k.id, r.name,"
                "  (SELECT count(*) FROM messages m WHERE m.backend = k.backend AND m.room = k.id"
                "    AND m.deleted = 0 AND m.create_time > COALESCE((SELECT last_time"
                "      FROM api_reads d WHERE d.user_name = $1 AND d.backend = k.backend"
                "      AND d.room = k.id), 0))"
                " FROM (SELECT backend, id FROM api_rooms"
                "       UNION SELECT backend, room FROM messages WHERE room IS NOT NULL) k"
                " LEFT JOIN api_rooms r ON r.backend = k.backend AND r.id = k.id"
                " ORDER BY k.backend, k.id",
                parse_rooms, cb, ud, user);
}

int sg__pg_read_mark(sg__pg *pg, const char *user, const char *backend, const char *room,
                     int64_t time, sg__store_reply_cb cb, void *ud) {
  char t[24];
  snprintf(t, sizeof t, "%lld", (long long)time);
  return SUBMIT(pg,
                "INSERT INTO api_reads(user_name, backend, room, last_time)"
                " VALUES ($1, $2, $3, $4::bigint)"
                " ON CONFLICT (user_name, backend, room) DO UPDATE SET last_time ="
                "  GREATEST(api_reads.last_time, excluded.last_time)",
                parse_none, cb, ud, user, backend, room, t);
}

int sg__pg_messages_before(sg__pg *pg, const char *backend, const char *room,
                           const char *before_id, int limit, sg__store_reply_cb cb, void *ud) {
  char lim[16];
  snprintf(lim, sizeof lim, "%d", limit);
  if (!before_id)
    return SUBMIT(pg,
                  "SELECT backend, id, room, sender, content_json, create_time, edit_time,"
                  " deleted, attachments_json FROM (SELECT * FROM messages WHERE backend = $1"
                  "  AND room IS NOT DISTINCT FROM $2::text"
                  "  ORDER BY create_time DESC, seq DESC LIMIT $3::bigint) t"
                  " ORDER BY create_time, seq",
                  parse_messages, cb, ud, backend, room, limit > 0 ? lim : NULL);
  return SUBMIT(pg,
                "SELECT backend, id, room, sender, content_json, create_time, edit_time,"
                " deleted, attachments_json FROM (SELECT * FROM messages WHERE backend = $1"
                "  AND room IS NOT DISTINCT FROM $2::text"
                "  AND (create_time, seq) < (SELECT create_time, seq FROM messages"
                "                            WHERE backend = $1 AND id = $4)"
                "  ORDER BY create_time DESC, seq DESC LIMIT $3::bigint) t"
                " ORDER BY create_time, seq",
                parse_messages, cb, ud, backend, room, limit > 0 ? lim : NULL, before_id);
}

int sg__pg_kv_set_held(sg__pg *pg, const char *key, const char *value, const char *lease,
                       const char *instance, sg__store_reply_cb cb, void *ud) {
  /* The lease's row is locked (FOR SHARE) until the write commits, so a
   * takeover waits for it and then reads what was written. */
  if (!value) return SG_EINVAL;
  return SUBMIT(pg,
                "WITH h AS (SELECT 1 FROM leases WHERE name = $3 AND holder = $4 FOR SHARE)"
                " INSERT INTO kv(key, value) SELECT $1, $2 FROM h"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                parse_changed, cb, ud, key, value, lease, instance);
}

/* ---- the postbox: peers, queues, inbox, claims -------------------------------
 * Events travel as hex text (decode/encode(..., 'hex')): parameters stay
 * text, and several events go in one statement as a text[] of hex strings
 * (unnest ... WITH ORDINALITY keeps their order, so their seqs too). */

static const char HEX[] = "0123456789abcdef";

/* `n` byte strings as a PostgreSQL array literal of hex strings:
 * {"0a1b","",...}; malloc'd. */
static char *hex_array(const uint8_t *const *events, const size_t *lens, size_t n) {
  size_t total = 3;
  for (size_t i = 0; i < n; i++) total += lens[i] * 2 + 3;
  char *s = malloc(total), *w = s;
  if (!s) return NULL;
  *w++ = '{';
  for (size_t i = 0; i < n; i++) {
    if (i) *w++ = ',';
    *w++ = '"';
    for (size_t j = 0; j < lens[i]; j++) {
      *w++ = HEX[events[i][j] >> 4];
      *w++ = HEX[events[i][j] & 15];
    }
    *w++ = '"';
  }
  *w++ = '}';
  *w = '\0';
  return s;
}

static int unhex(int c) {
  return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10
                                        : c >= 'A' && c <= 'F' ? c - 'A' + 10 : 0;
}

static void parse_count(req *q, PGresult *res, sg__store_reply *r) {
  r->count = PQntuples(res) > 0 ? ival(res, 0, 0) : 0;
}

/* Rows (seq, hex event[, attempts]) into sg__store_event rows whose bytes
 * live in the same block. */
static void parse_events(req *q, PGresult *res, sg__store_reply *r) {
  size_t n = (size_t)PQntuples(res), bytes = 0;
  for (size_t i = 0; i < n; i++) bytes += (size_t)PQgetlength(res, (int)i, 1) / 2;
  q->rows = malloc(n * sizeof(sg__store_event) + bytes + 1);
  if (!q->rows) {
    r->err = SG_ENOMEM;
    snprintf(q->msg, sizeof q->msg, "out of memory");
    return;
  }
  sg__store_event *rows = q->rows;
  uint8_t *b = (uint8_t *)(rows + n);
  for (size_t i = 0; i < n; i++) {
    int k = (int)i;
    const char *h = PQgetvalue(res, k, 1);
    size_t len = (size_t)PQgetlength(res, k, 1) / 2;
    for (size_t j = 0; j < len; j++) b[j] = (uint8_t)(unhex(h[2 * j]) << 4 | unhex(h[2 * j + 1]));
    rows[i] = (sg__store_event){ival(res, k, 0), b, len,
                                PQnfields(res) > 2 ? ival(res, k, 2) : 0};
    b += len;
  }
  r->n = n;
  r->events = rows;
}

static void parse_inbox_head(req *q, PGresult *res, sg__store_reply *r) {
  parse_events(q, res, r);
  if (!r->err && r->n == 0) r->err = SG_STORE_NOTFOUND;
}

static void parse_key(req *q, PGresult *res, sg__store_reply *r) {
  if (PQntuples(res) < 1 || PQgetisnull(res, 0, 0) || PQgetlength(res, 0, 0) != 64) {
    r->err = SG_STORE_NOTFOUND;
    return;
  }
  q->rows = malloc(32);
  if (!q->rows) {
    r->err = SG_ENOMEM;
    return;
  }
  const char *h = PQgetvalue(res, 0, 0);
  uint8_t *k = q->rows;
  for (int j = 0; j < 32; j++) k[j] = (uint8_t)(unhex(h[2 * j]) << 4 | unhex(h[2 * j + 1]));
  r->key = k;
}

static void parse_peers(req *q, PGresult *res, sg__store_reply *r) {
  sg__store_peer *rows = rows_for(q, res, sizeof *rows, r);
  for (size_t i = 0; rows && i < r->n; i++) {
    int k = (int)i;
    rows[i] = (sg__store_peer){val(res, k, 0),  ival(res, k, 8),  ival(res, k, 9),
                               ival(res, k, 1), ival(res, k, 2),  ival(res, k, 3),
                               ival(res, k, 4), ival(res, k, 5),  ival(res, k, 7),
                               val(res, k, 6)};
  }
  r->peers = rows;
}

/* No row back: another instance holds the claim. */
static void parse_claim(req *q, PGresult *res, sg__store_reply *r) {
  if (PQntuples(res) < 1) r->err = SG_STORE_NOTFOUND;
  else r->text[0] = val(res, 0, 0);
}

int sg__pg_peer_add(sg__pg *pg, const char *peer, sg__store_reply_cb cb, void *ud) {
  return SUBMIT(pg,
                "INSERT INTO peers(server_id, first_seen) VALUES ($1, " NOW_MS ")"
                " ON CONFLICT DO NOTHING",
                parse_none, cb, ud, peer);
}

int sg__pg_peer_stamp(sg__pg *pg, const char *peer, sg__store_stamp which, sg__store_reply_cb cb,
                      void *ud) {
  static const char *const sql[] = {
      "UPDATE peers SET last_push = " NOW_MS " WHERE server_id = $1",
      "UPDATE peers SET last_pull = " NOW_MS " WHERE server_id = $1",
      "UPDATE peers SET last_push_in = " NOW_MS " WHERE server_id = $1",
      "UPDATE peers SET last_served = " NOW_MS " WHERE server_id = $1"};
  if ((unsigned)which > SG_STORE_STAMP_SERVED) return SG_EINVAL;
  return SUBMIT(pg, sql[which], parse_none, cb, ud, peer);
}

int sg__pg_peer_error(sg__pg *pg, const char *peer, const char *error, sg__store_reply_cb cb,
                      void *ud) {
  return SUBMIT(pg,
                "UPDATE peers SET last_error = $2, last_error_time = " NOW_MS
                " WHERE server_id = $1",
                parse_none, cb, ud, peer, error);
}

int sg__pg_peer_key_get(sg__pg *pg, const char *peer, sg__store_reply_cb cb, void *ud) {
  return SUBMIT(pg, "SELECT encode(public_key, 'hex') FROM peers WHERE server_id = $1",
                parse_key, cb, ud, peer);
}

int sg__pg_peer_key_set(sg__pg *pg, const char *peer, const uint8_t key[32],
                        sg__store_reply_cb cb, void *ud) {
  char hex[65];
  for (int i = 0; i < 32; i++) {
    hex[2 * i] = HEX[key[i] >> 4];
    hex[2 * i + 1] = HEX[key[i] & 15];
  }
  hex[64] = '\0';
  return SUBMIT(pg, "UPDATE peers SET public_key = decode($2, 'hex') WHERE server_id = $1",
                parse_none, cb, ud, peer, hex);
}

int sg__pg_peers(sg__pg *pg, sg__store_reply_cb cb, void *ud) {
  return submit(pg,
                "SELECT server_id, first_seen, last_push, last_push_in, last_pull, last_served,"
                " last_error, last_error_time,"
                " (SELECT count(*) FROM outbox o WHERE o.peer = server_id),"
                " (SELECT count(*) FROM inbox i WHERE i.peer = server_id)"
                " FROM peers ORDER BY server_id",
                parse_peers, cb, ud, 0, NULL);
}

int sg__pg_peer_rename(sg__pg *pg, const char *old_id, const char *new_id, sg__store_reply_cb cb,
                       void *ud) {
  /* One statement: the key (unless the new id has one), the queues (the
   * foreign keys are checked at its end, when the rows name new_id), the
   * message maps (a copy the new id has already stays), the old row. */
  return SUBMIT(pg,
                "WITH k AS (UPDATE peers SET public_key = coalesce(public_key,"
                "   (SELECT public_key FROM peers WHERE server_id = $1)) WHERE server_id = $2),"
                " o AS (UPDATE outbox SET peer = $2 WHERE peer = $1),"
                " i AS (UPDATE inbox SET peer = $2 WHERE peer = $1),"
                " m1 AS (UPDATE msg_map SET origin_backend = $2 WHERE origin_backend = $1),"
                " m2 AS (UPDATE msg_map m SET copy_backend = $2 WHERE copy_backend = $1"
                "   AND NOT EXISTS (SELECT 1 FROM msg_map x WHERE x.copy_backend = $2"
                "   AND x.copy_id = m.copy_id))"
                " DELETE FROM peers WHERE server_id = $1",
                parse_changed, cb, ud, old_id, new_id);
}

int sg__pg_outbox_count(sg__pg *pg, const char *peer, sg__store_reply_cb cb, void *ud) {
  return SUBMIT(pg, "SELECT count(*) FROM outbox WHERE peer = $1", parse_count, cb, ud, peer);
}

int sg__pg_queue_add(sg__pg *pg, int outbox, const char *peer, const uint8_t *const *events,
                     const size_t *lens, size_t n, sg__store_reply_cb cb, void *ud) {
  char *arr = hex_array(events, lens, n);
  if (!arr) return SG_ENOMEM;
  /* The peer's row first (the foreign key is checked at the statement's
   * end); the count is the snapshot's plus what this statement added. Each
   * event's key is the call's and its place: run again after a lost
   * connection, the statement adds none of the events the first run did. */
  char key[SG_STORE_WRITE_KEY_LEN];
  sg__store_write_key(key);
  int rc = outbox
               ? SUBMIT(pg,
                        "WITH p AS (INSERT INTO peers(server_id, first_seen)"
                        "   VALUES ($1, " NOW_MS ") ON CONFLICT DO NOTHING),"
                        " ins AS (INSERT INTO outbox(peer, event, created, write_key)"
                        "   SELECT $1, decode(e, 'hex'), " NOW_MS ", $3::text || '/' || i"
                        "   FROM unnest($2::text[]) WITH ORDINALITY AS t(e, i) ORDER BY i"
                        "   ON CONFLICT (write_key) WHERE write_key IS NOT NULL DO NOTHING"
                        "   RETURNING 1)"
                        " SELECT (SELECT count(*) FROM outbox WHERE peer = $1)"
                        "  + (SELECT count(*) FROM ins)",
                        parse_count, cb, ud, peer, arr, key)
               : SUBMIT(pg,
                        "WITH p AS (INSERT INTO peers(server_id, first_seen)"
                        "   VALUES ($1, " NOW_MS ") ON CONFLICT DO NOTHING)"
                        " INSERT INTO inbox(peer, event, received, write_key)"
                        "   SELECT $1, decode(e, 'hex'), " NOW_MS ", $3::text || '/' || i"
                        "   FROM unnest($2::text[]) WITH ORDINALITY AS t(e, i) ORDER BY i"
                        "   ON CONFLICT (write_key) WHERE write_key IS NOT NULL DO NOTHING",
                        parse_none, cb, ud, peer, arr, key);
  free(arr);
  return rc;
}

int sg__pg_outbox_head(sg__pg *pg, const char *peer, size_t max_bytes, sg__store_reply_cb cb,
                       void *ud) {
  char max[24];
  snprintf(max, sizeof max, "%zu", max_bytes);
  /* Oldest first while the bytes so far stay within max (the first always). */
  return SUBMIT(pg,
                "SELECT seq, encode(event, 'hex') FROM (SELECT seq, event,"
                "  sum(length(event)) OVER (ORDER BY seq) AS upto,"
                "  row_number() OVER (ORDER BY seq) AS k"
                "  FROM outbox WHERE peer = $1) t"
                " WHERE k = 1 OR upto <= $2::bigint ORDER BY seq",
                parse_events, cb, ud, peer, max);
}

int sg__pg_outbox_drop(sg__pg *pg, const char *peer, const int64_t *seqs, size_t n,
                       sg__store_reply_cb cb, void *ud) {
  char *arr = malloc(n * 21 + 3), *w = arr;
  if (!arr) return SG_ENOMEM;
  *w++ = '{';
  for (size_t i = 0; i < n; i++) w += sprintf(w, i ? ",%lld" : "%lld", (long long)seqs[i]);
  *w++ = '}';
  *w = '\0';
  int rc = SUBMIT(pg,
                  "WITH d AS (DELETE FROM outbox WHERE peer = $1 AND seq = ANY($2::bigint[])"
                  "   RETURNING 1),"
                  " s AS (UPDATE peers SET last_served = " NOW_MS " WHERE server_id = $1)"
                  " SELECT count(*) FROM d",
                  parse_count, cb, ud, peer, arr);
  free(arr);
  return rc;
}

#define INBOX_KEYED \
  " ON CONFLICT (write_key) WHERE write_key IS NOT NULL" \
  " DO UPDATE SET write_key = excluded.write_key RETURNING seq"

int sg__pg_inbox_push(sg__pg *pg, const char *peer, const uint8_t *event, size_t len,
                      int stamp, sg__store_reply_cb cb, void *ud) {
  char *hex = malloc(len * 2 + 1), *w = hex;
  if (!hex) return SG_ENOMEM;
  for (size_t j = 0; j < len; j++) {
    *w++ = HEX[event[j] >> 4];
    *w++ = HEX[event[j] & 15];
  }
  *w = '\0';
  /* The peer's row first (the foreign key is checked at the statement's end).
   * Run again after a lost connection, the key finds the first run's row
   * and answers its seq (DO UPDATE locks and returns it, as event_append). */
  char key[SG_STORE_WRITE_KEY_LEN];
  sg__store_write_key(key);
  int rc = stamp ? SUBMIT(pg,
                  "WITH p AS (INSERT INTO peers(server_id, first_seen, last_push_in)"
                  "   VALUES ($1, " NOW_MS ", " NOW_MS ")"
                  "   ON CONFLICT (server_id) DO UPDATE SET last_push_in = excluded.last_push_in)"
                  " INSERT INTO inbox(peer, event, received, write_key)"
                  "   VALUES ($1, decode($2, 'hex'), " NOW_MS ", $3)" INBOX_KEYED,
                  parse_num, cb, ud, peer, hex, key)
                 : SUBMIT(pg,
                  "WITH p AS (INSERT INTO peers(server_id, first_seen)"
                  "   VALUES ($1, " NOW_MS ") ON CONFLICT DO NOTHING)"
                  " INSERT INTO inbox(peer, event, received, write_key)"
                  "   VALUES ($1, decode($2, 'hex'), " NOW_MS ", $3)" INBOX_KEYED,
                  parse_num, cb, ud, peer, hex, key);
  free(hex);
  return rc;
}

int sg__pg_inbox_head(sg__pg *pg, const char *peer, sg__store_reply_cb cb, void *ud) {
  return SUBMIT(pg,
                "SELECT seq, encode(event, 'hex'), attempts FROM inbox WHERE peer = $1"
                " ORDER BY seq LIMIT 1",
                parse_inbox_head, cb, ud, peer);
}

int sg__pg_inbox_done(sg__pg *pg, int64_t seq, sg__store_reply_cb cb, void *ud) {
  char s[24];
  snprintf(s, sizeof s, "%lld", (long long)seq);
  return SUBMIT(pg, "DELETE FROM inbox WHERE seq = $1::bigint", parse_none, cb, ud, s);
}

int sg__pg_inbox_done_upto(sg__pg *pg, const char *peer, int64_t seq, sg__store_reply_cb cb,
                           void *ud) {
  char s[24];
  snprintf(s, sizeof s, "%lld", (long long)seq);
  return SUBMIT(pg,
                "WITH d AS (DELETE FROM inbox WHERE peer = $1 AND seq <= $2::bigint RETURNING 1)"
                " SELECT count(*) FROM d",
                parse_count, cb, ud, peer, s);
}

int sg__pg_inbox_failed(sg__pg *pg, int64_t seq, const char *why, int64_t attempts, int dead,
                        sg__store_reply_cb cb, void *ud) {
  char s[24], n[24];
  snprintf(s, sizeof s, "%lld", (long long)seq);
  snprintf(n, sizeof n, "%lld", (long long)attempts);
  /* The count is set from the one the delivery read: sent again after a
   * lost answer, the update finds it set and changes nothing. */
  if (!dead)
    return SUBMIT(pg,
                  "UPDATE inbox SET attempts = $3::bigint + 1, last_error = $2"
                  " WHERE seq = $1::bigint AND attempts = $3::bigint",
                  parse_none, cb, ud, s, why, n);
  /* One statement, so the event is in one table only. */
  return SUBMIT(pg,
                "WITH d AS (DELETE FROM inbox WHERE seq = $1::bigint RETURNING *)"
                " INSERT INTO dead_letters(peer, direction, event, error, attempts, created, died)"
                " SELECT peer, 'in', event, $2, $3::bigint + 1, received, " NOW_MS " FROM d",
                parse_none, cb, ud, s, why, n);
}

int sg__pg_claim(sg__pg *pg, const char *name, const char *instance, int64_t ttl_ms,
                 sg__store_reply_cb cb, void *ud) {
  char ttl[24];
  snprintf(ttl, sizeof ttl, "%lld", (long long)ttl_ms);
  /* Inserted when nobody ever claimed it; else taken when ours or expired,
   * skipping a row another instance is claiming this instant (SKIP LOCKED:
   * it will have it; we do not wait). No row back: not ours. */
  return SUBMIT(pg,
                "WITH ins AS (INSERT INTO leases(name, holder, expires)"
                "   VALUES ($1, $2, " NOW_MS " + $3::bigint)"
                "   ON CONFLICT (name) DO NOTHING RETURNING holder),"
                " cur AS (SELECT name FROM leases WHERE name = $1"
                "   AND (holder = $2 OR expires < " NOW_MS ") FOR UPDATE SKIP LOCKED),"
                " upd AS (UPDATE leases l SET holder = $2, expires = " NOW_MS " + $3::bigint"
                "   FROM cur WHERE l.name = cur.name RETURNING l.holder)"
                " SELECT holder FROM ins UNION ALL SELECT holder FROM upd",
                parse_claim, cb, ud, name, instance, ttl);
}
