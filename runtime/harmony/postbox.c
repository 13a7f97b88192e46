/* The postbox's delivery rules on the store. See postbox.h for the contract
 * and docs/postbox.md for why each rule is there. */
#include "postbox.h"

#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "segue.h"

/* An event in memory: waiting for a Push, or a held inbound Push. */
typedef struct item {
  struct item *next;
  uint8_t *event;
  size_t len;
  void (*cb)(void);  /* sg__postbox_push_cb or sg__postbox_stored_cb */
  void *ud;
} item;

typedef struct item_list {
  item *head, *tail;
  unsigned count;
} item_list;

typedef struct peer {
  struct peer *next;
  sg__postbox *pb;
  char *id;
  item_list out;        /* head is being Pushed when `pushing` or backing off */
  unsigned tries;
  int pushing;          /* a transport->push is outstanding */
  uv_timer_t push_timer;
  int serving;          /* a Pull response of this peer is being written */
  int held;
  item_list held_in;
  uv_timer_t deliver_timer;
  int delivering;       /* guards against a handler re-entering delivery */
  int timers_closed;    /* freed when both timers closed */
  int64_t queued;       /* rows in the outbox, cached: -1 until counted */
} peer;

struct sg__postbox {
  uv_loop_t *loop;
  sg__store *store;
  sg__postbox_transport tp;
  sg__postbox_options opt;
  peer *peers;
  unsigned handles;     /* timers still to close */
  int closing;
  void (*close_cb)(void *data);
  void *close_data;
  char errmsg[512];
};

struct batch {
  sg__postbox_batch pub;
  peer *p;
  int64_t last_seq, dropped;
  uint8_t **events;
  size_t *lens;
};

void sg__postbox_options_default(sg__postbox_options *o) {
  o->push_tries = 5;
  o->push_backoff_ms = 200;
  o->queue_limit = 10000;
  o->deliver_tries = 5;
  o->deliver_backoff_ms = 1000;
}

const char *sg__postbox_errmsg(const sg__postbox *pb) { return pb->errmsg; }

static int fail(sg__postbox *pb, int err, const char *msg) {
  snprintf(pb->errmsg, sizeof pb->errmsg, "%s", msg ? msg : sg_strerror(err));
  return err;
}

static int store_fail(sg__postbox *pb, int err) {
  return fail(pb, err, sg__store_errmsg(pb->store));
}

/* ---- statements ---------------------------------------------------------- */

static const char SQL_PEER_ADD[] =
    "INSERT INTO peers(server_id, first_seen) VALUES (?1, ?2) ON CONFLICT DO NOTHING";
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
static const char SQL_INBOX_FAILED[] =
    "UPDATE inbox SET attempts = attempts + 1, last_error = ?2 WHERE seq = ?1";
static const char SQL_INBOX_DEAD[] =
    "INSERT INTO dead_letters(peer, direction, event, error, attempts, created, died)"
    " SELECT peer, 'in', event, last_error, attempts, received, ?2 FROM inbox WHERE seq = ?1";
static const char SQL_PEER_STAMP[] =  /* ?2 names the column: see stamp() */
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

enum { STAMP_PUSH, STAMP_PULL, STAMP_PUSH_IN, STAMP_SERVED };

/* Binds the peer id as ?1 and returns the statement, or NULL (errmsg set). */
static sqlite3_stmt *stmt_for(sg__postbox *pb, const char *sql, const char *id) {
  sqlite3_stmt *st = sg__store_stmt(pb->store, sql);
  if (!st) {
    store_fail(pb, SG_ESTORE);
    return NULL;
  }
  sqlite3_bind_text(st, 1, id, -1, SQLITE_TRANSIENT);
  return st;
}

/* Steps a statement that returns no row, resets it. */
static int run(sg__postbox *pb, sqlite3_stmt *st) {
  int rc = sqlite3_step(st);
  sqlite3_reset(st);
  if (rc == SQLITE_DONE) return 0;
  return fail(pb, SG_ESTORE, sqlite3_errmsg(sg__store_db(pb->store)));
}

/* First column of the first row as an integer; -1 (errmsg set) on failure. */
static int64_t run_int(sg__postbox *pb, sqlite3_stmt *st) {
  int rc = sqlite3_step(st);
  int64_t v = rc == SQLITE_ROW ? sqlite3_column_int64(st, 0) : -1;
  if (rc != SQLITE_ROW) fail(pb, SG_ESTORE, sqlite3_errmsg(sg__store_db(pb->store)));
  sqlite3_reset(st);
  return v;
}

static int stamp(sg__postbox *pb, const char *id, int which) {
  sqlite3_stmt *st = stmt_for(pb, SQL_PEER_STAMP, id);
  if (!st) return SG_ESTORE;
  sqlite3_bind_int(st, 2, which);
  sqlite3_bind_int64(st, 3, sg__store_now_ms());
  return run(pb, st);
}

static int record_error(sg__postbox *pb, const char *id, const char *error) {
  sqlite3_stmt *st = stmt_for(pb, SQL_PEER_ERROR, id);
  if (!st) return SG_ESTORE;
  sqlite3_bind_text(st, 2, error, -1, SQLITE_TRANSIENT);
  sqlite3_bind_int64(st, 3, sg__store_now_ms());
  return run(pb, st);
}

/* Appends one event to `sql`'s table (outbox or inbox) for peer `id`. */
static int append(sg__postbox *pb, const char *sql, const char *id, const uint8_t *ev,
                  size_t len) {
  sqlite3_stmt *st = stmt_for(pb, sql, id);
  if (!st) return SG_ESTORE;
  sqlite3_bind_blob64(st, 2, ev, len, SQLITE_STATIC);
  sqlite3_bind_int64(st, 3, sg__store_now_ms());
  return run(pb, st);
}

/* ---- peers in memory ------------------------------------------------------- */

static void item_push(item_list *l, item *it) {
  it->next = NULL;
  if (l->tail) l->tail->next = it;
  else l->head = it;
  l->tail = it;
  l->count++;
}

static item *item_shift(item_list *l) {
  item *it = l->head;
  if (!it) return NULL;
  l->head = it->next;
  if (!l->head) l->tail = NULL;
  l->count--;
  return it;
}

static item *item_new(const uint8_t *ev, size_t len, void (*cb)(void), void *ud) {
  item *it = calloc(1, sizeof *it);
  if (!it) return NULL;
  it->event = malloc(len ? len : 1);
  if (!it->event) {
    free(it);
    return NULL;
  }
  if (len) memcpy(it->event, ev, len);
  it->len = len;
  it->cb = cb;
  it->ud = ud;
  return it;
}

static void item_free(item *it) {
  free(it->event);
  free(it);
}

static void timer_closed(uv_handle_t *h) {
  peer *p = h->data;
  sg__postbox *pb = p->pb;
  if (++p->timers_closed == 2) {
    free(p->id);
    free(p);
  }
  if (--pb->handles == 0) {
    void (*cb)(void *) = pb->close_cb;
    void *data = pb->close_data;
    free(pb);
    if (cb) cb(data);
  }
}

static peer *find_peer(sg__postbox *pb, const char *id) {
  for (peer *p = pb->peers; p; p = p->next)
    if (strcmp(p->id, id) == 0) return p;
  return NULL;
}

/* The peer's state, created (in memory and in the peers table) if new. */
static peer *get_peer(sg__postbox *pb, const char *id) {
  peer *p = find_peer(pb, id);
  if (p) return p;
  sqlite3_stmt *st = stmt_for(pb, SQL_PEER_ADD, id);
  if (!st) return NULL;
  sqlite3_bind_int64(st, 2, sg__store_now_ms());
  if (run(pb, st) != 0) return NULL;
  p = calloc(1, sizeof *p);
  if (!p || !(p->id = strdup(id))) {
    free(p);
    fail(pb, SG_ENOMEM, NULL);
    return NULL;
  }
  p->pb = pb;
  p->queued = -1;
  uv_timer_init(pb->loop, &p->push_timer);
  uv_timer_init(pb->loop, &p->deliver_timer);
  p->push_timer.data = p->deliver_timer.data = p;
  pb->handles += 2;
  p->next = pb->peers;
  pb->peers = p;
  return p;
}

/* ---- outbound ---------------------------------------------------------------- */

/* Counted once, then kept up to date by every change to the peer's rows:
 * a count per push would cost a scan of the queue. */
static int64_t queue_len(sg__postbox *pb, peer *p) {
  if (p->queued < 0) {
    sqlite3_stmt *st = stmt_for(pb, SQL_QUEUE_LEN, p->id);
    p->queued = st ? run_int(pb, st) : -1;
  }
  return p->queued;
}

static void start_push(peer *p);

static int spill_tx(sg__store *s, void *ud) {
  (void)s;
  peer *p = ud;
  for (item *it = p->out.head; it; it = it->next) {
    int err = append(p->pb, SQL_QUEUE_ADD, p->id, it->event, it->len);
    if (err) return err;
  }
  return 0;
}

/* The waiting events (the one that failed first) go to the durable queue,
 * all or none, and their callers hear how it went. */
static void spill(peer *p, const char *why) {
  sg__postbox *pb = p->pb;
  int err = sg__store_atomic(pb->store, spill_tx, p);
  const char *msg = err ? pb->errmsg : why;
  if (!err && p->queued >= 0) p->queued += p->out.count;
  record_error(pb, p->id, why);
  item *it;
  while ((it = item_shift(&p->out))) {
    ((sg__postbox_push_cb)it->cb)(it->ud, err, SG_POSTBOX_QUEUED, msg);
    item_free(it);
  }
  p->tries = 0;
}

static void push_timer_fired(uv_timer_t *t) { start_push(t->data); }

static void push_failed(peer *p, const char *why) {
  if (++p->tries >= p->pb->opt.push_tries || p->pb->closing) {
    spill(p, why);
    return;
  }
  uint64_t delay = p->pb->opt.push_backoff_ms << (p->tries - 1 < 16 ? p->tries - 1 : 16);
  uv_timer_start(&p->push_timer, push_timer_fired, delay, 0);
}

static void start_push(peer *p) {
  item *it = p->out.head;
  if (!it || p->pushing) return;
  p->pushing = 1;
  int err = p->pb->tp.push(p->pb->tp.ud, p->id, it->event, it->len, p);
  if (err) {
    p->pushing = 0;
    push_failed(p, sg_strerror(err));
  }
}

void sg__postbox_push_done(sg__postbox *pb, void *call, int err, const char *message) {
  peer *p = call;
  p->pushing = 0;
  if (err) {
    push_failed(p, message ? message : sg_strerror(err));
    return;
  }
  stamp(pb, p->id, STAMP_PUSH);
  p->tries = 0;
  item *it = item_shift(&p->out);
  if (!it) return;  /* closed while the transport was still pushing: spilled */
  ((sg__postbox_push_cb)it->cb)(it->ud, 0, SG_POSTBOX_PUSHED, "pushed");
  item_free(it);
  if (pb->closing) spill(p, "closing");
  else start_push(p);
}

int sg__postbox_push(sg__postbox *pb, const char *id, const uint8_t *event, size_t len,
                    sg__postbox_push_cb cb, void *ud) {
  if (pb->closing) return fail(pb, SG_ECLOSING, NULL);
  peer *p = get_peer(pb, id);
  if (!p) return SG_ESTORE;
  int64_t queued = queue_len(pb, p);
  if (queued < 0) return SG_ESTORE;
  if (queued + p->out.count >= pb->opt.queue_limit) {
    snprintf(pb->errmsg, sizeof pb->errmsg, "%s: queue full (%u events)", id,
             pb->opt.queue_limit);
    return SG_ELIMIT;
  }
  /* Order: while anything is queued, nothing is Pushed. */
  if (queued > 0) {
    int err = append(pb, SQL_QUEUE_ADD, id, event, len);
    if (err) return err;
    p->queued++;
    return SG_POSTBOX_QUEUED;
  }
  item *it = item_new(event, len, (void (*)(void))cb, ud);
  if (!it) return fail(pb, SG_ENOMEM, NULL);
  item_push(&p->out, it);
  if (p->out.count == 1) start_push(p);
  return 0;
}

/* ---- serving Pulls ------------------------------------------------------------- */

static void batch_free(struct batch *b) {
  for (size_t i = 0; i < b->pub.n; i++) free(b->events[i]);
  free(b->events);
  free(b->lens);
  free(b);
}

static int batch_add(struct batch *b, const void *ev, size_t len, size_t *cap) {
  if (b->pub.n == *cap) {
    size_t ncap = *cap ? *cap * 2 : 16;
    uint8_t **e = realloc(b->events, ncap * sizeof *e);
    if (e) b->events = e;
    size_t *l = e ? realloc(b->lens, ncap * sizeof *l) : NULL;
    if (!l) return SG_ENOMEM;
    b->lens = l;
    *cap = ncap;
  }
  uint8_t *copy = malloc(len ? len : 1);
  if (!copy) return SG_ENOMEM;
  if (len) memcpy(copy, ev, len);
  b->events[b->pub.n] = copy;
  b->lens[b->pub.n++] = len;
  return 0;
}

static int batch_fill(sg__postbox *pb, struct batch *b, size_t max_bytes) {
  sqlite3_stmt *st = stmt_for(pb, SQL_QUEUE_HEAD, b->p->id);
  if (!st) return SG_ESTORE;
  size_t cap = 0, bytes = 0;
  int rc, err = 0;
  while (!err && (rc = sqlite3_step(st)) == SQLITE_ROW) {
    size_t len = (size_t)sqlite3_column_bytes(st, 1);
    if (b->pub.n > 0 && bytes + len > max_bytes) break;
    err = batch_add(b, sqlite3_column_blob(st, 1), len, &cap);
    b->last_seq = sqlite3_column_int64(st, 0);
    bytes += len;
  }
  if (!err && rc != SQLITE_ROW && rc != SQLITE_DONE)
    err = fail(pb, SG_ESTORE, sqlite3_errmsg(sg__store_db(pb->store)));
  else if (err) fail(pb, err, NULL);
  sqlite3_reset(st);
  b->pub.events = (const uint8_t **)b->events;
  b->pub.lens = b->lens;
  return err;
}

int sg__postbox_pull_begin(sg__postbox *pb, const char *id, size_t max_bytes,
                          sg__postbox_batch **out) {
  *out = NULL;
  peer *p = get_peer(pb, id);
  if (!p) return SG_ESTORE;
  struct batch *b = calloc(1, sizeof *b);
  if (!b) return fail(pb, SG_ENOMEM, NULL);
  b->p = p;
  /* A second Pull while the first response is on its way gets nothing, so
   * no event goes out twice. */
  int err = p->serving ? 0 : batch_fill(pb, b, max_bytes);
  if (err) {
    batch_free(b);
    return err;
  }
  if (b->pub.n) p->serving = 1;
  *out = &b->pub;
  return 0;
}

static int drop_served(sg__postbox *pb, struct batch *b) {
  sqlite3_stmt *st = stmt_for(pb, SQL_QUEUE_DROP, b->p->id);
  if (!st) return SG_ESTORE;
  sqlite3_bind_int64(st, 2, b->last_seq);
  int err = run(pb, st);
  b->dropped = sqlite3_changes(sg__store_db(pb->store));
  return err ? err : stamp(pb, b->p->id, STAMP_SERVED);
}

static int drop_served_tx(sg__store *s, void *ud) {
  (void)s;
  struct batch *b = ud;
  return drop_served(b->p->pb, b);
}

int sg__postbox_pull_end(sg__postbox *pb, sg__postbox_batch *batch, int status) {
  struct batch *b = (struct batch *)batch;
  int err = 0;
  if (b->pub.n) {
    b->p->serving = 0;
    if (status == 0) err = sg__store_atomic(pb->store, drop_served_tx, b);
    if (status == 0 && !err && b->p->queued >= 0) b->p->queued -= b->dropped;
  }
  batch_free(b);
  return err;
}

/* ---- inbound ------------------------------------------------------------------- */

static void deliver_timer_fired(uv_timer_t *t);

static void schedule_delivery(peer *p, uint64_t delay) {
  if (!p->pb->closing && !p->held) uv_timer_start(&p->deliver_timer, deliver_timer_fired, delay, 0);
}

typedef struct {
  peer *p;
  int64_t seq, attempts;
  const char *why;
} settle_args;

/* After a failed delivery: count the attempt, and past deliver_tries move
 * the event to dead_letters; one transaction, so it is in one table only. */
static int settle_failure_tx(sg__store *s, void *ud) {
  (void)s;
  settle_args *a = ud;
  sg__postbox *pb = a->p->pb;
  sqlite3_stmt *st = sg__store_stmt(pb->store, SQL_INBOX_FAILED);
  if (!st) return store_fail(pb, SG_ESTORE);
  sqlite3_bind_int64(st, 1, a->seq);
  sqlite3_bind_text(st, 2, a->why, -1, SQLITE_TRANSIENT);
  int err = run(pb, st);
  if (err || a->attempts + 1 < pb->opt.deliver_tries) return err;
  if (!(st = sg__store_stmt(pb->store, SQL_INBOX_DEAD))) return store_fail(pb, SG_ESTORE);
  sqlite3_bind_int64(st, 1, a->seq);
  sqlite3_bind_int64(st, 2, sg__store_now_ms());
  if ((err = run(pb, st))) return err;
  if (!(st = sg__store_stmt(pb->store, SQL_INBOX_DONE))) return store_fail(pb, SG_ESTORE);
  sqlite3_bind_int64(st, 1, a->seq);
  return run(pb, st);
}

static int settle_success(peer *p, int64_t seq) {
  sqlite3_stmt *st = sg__store_stmt(p->pb->store, SQL_INBOX_DONE);
  if (!st) return store_fail(p->pb, SG_ESTORE);
  sqlite3_bind_int64(st, 1, seq);
  return run(p->pb, st);
}

/* Hands the head of the peer's inbox to the application (outside any
 * transaction: the handler may use the store). Returns 1 to go on with the
 * next event, 0 to stop (inbox empty, or a retry is scheduled). */
static int deliver_one(peer *p) {
  sg__postbox *pb = p->pb;
  sqlite3_stmt *st = stmt_for(pb, SQL_INBOX_HEAD, p->id);
  if (!st) return 0;
  if (sqlite3_step(st) != SQLITE_ROW) {
    sqlite3_reset(st);
    return 0;
  }
  settle_args a = {p, sqlite3_column_int64(st, 0), sqlite3_column_int64(st, 2), NULL};
  item *copy = item_new(sqlite3_column_blob(st, 1), (size_t)sqlite3_column_bytes(st, 1),
                        NULL, NULL);
  sqlite3_reset(st);
  if (!copy) return 0;
  char why[256] = "handler failed";
  int err = pb->tp.deliver(pb->tp.ud, p->id, copy->event, copy->len, why, sizeof why);
  item_free(copy);
  if (err == 0) return settle_success(p, a.seq) == 0;
  a.why = why;
  record_error(pb, p->id, why);
  if (sg__store_atomic(pb->store, settle_failure_tx, &a) != 0) return 0;
  if (a.attempts + 1 >= pb->opt.deliver_tries) return 1;  /* dead: the next one */
  schedule_delivery(p, pb->opt.deliver_backoff_ms << (a.attempts < 16 ? a.attempts : 16));
  return 0;
}

static void deliver_timer_fired(uv_timer_t *t) {
  peer *p = t->data;
  if (p->delivering || p->held) return;
  p->delivering = 1;
  while (!p->pb->closing && !p->held && deliver_one(p)) {
  }
  p->delivering = 0;
}

static int receive_tx(sg__store *s, void *ud) {
  (void)s;
  struct {
    peer *p;
    const uint8_t *const *ev;
    const size_t *lens;
    size_t n;
  } *a = ud;
  for (size_t i = 0; i < a->n; i++) {
    int err = append(a->p->pb, SQL_INBOX_ADD, a->p->id, a->ev[i], a->lens[i]);
    if (err) return err;
  }
  return 0;
}

static int store_received(peer *p, const uint8_t *const *events, const size_t *lens, size_t n) {
  struct {
    peer *p;
    const uint8_t *const *ev;
    const size_t *lens;
    size_t n;
  } a = {p, events, lens, n};
  int err = sg__store_atomic(p->pb->store, receive_tx, &a);
  if (!err) schedule_delivery(p, 0);
  return err;
}

int sg__postbox_receive(sg__postbox *pb, const char *id, const uint8_t *const *events,
                       const size_t *lens, size_t n) {
  peer *p = get_peer(pb, id);
  return p ? store_received(p, events, lens, n) : SG_ESTORE;
}

int sg__postbox_receive_push(sg__postbox *pb, const char *id, const uint8_t *event,
                            size_t len, sg__postbox_stored_cb cb, void *ud) {
  peer *p = get_peer(pb, id);
  if (!p) return SG_ESTORE;
  stamp(pb, id, STAMP_PUSH_IN);
  if (!p->held) {
    int err = store_received(p, &event, &len, 1);
    return err ? err : 1;
  }
  item *it = item_new(event, len, (void (*)(void))cb, ud);
  if (!it) return fail(pb, SG_ENOMEM, NULL);
  item_push(&p->held_in, it);
  return 0;
}

int sg__postbox_hold(sg__postbox *pb, const char *id) {
  peer *p = get_peer(pb, id);
  if (!p) return SG_ESTORE;
  p->held = 1;
  return 0;
}

/* Held Pushes are stored one by one in arrival order, after what the Pull
 * brought, and each caller answers its Push. */
static void release_peer(peer *p) {
  p->held = 0;
  item *it;
  while ((it = item_shift(&p->held_in))) {
    const uint8_t *ev = it->event;
    int err = store_received(p, &ev, &it->len, 1);
    ((sg__postbox_stored_cb)it->cb)(it->ud, err);
    item_free(it);
  }
  schedule_delivery(p, 0);
}

int sg__postbox_release(sg__postbox *pb, const char *id) {
  peer *p = find_peer(pb, id);
  if (p) release_peer(p);
  return 0;
}

/* ---- peers ------------------------------------------------------------------------ */

int sg__postbox_note(sg__postbox *pb, const char *id, sg__postbox_note_kind kind,
                    const char *error) {
  if (!get_peer(pb, id)) return SG_ESTORE;
  if (kind == SG_POSTBOX_NOTE_ERROR) return record_error(pb, id, error ? error : "error");
  return stamp(pb, id, kind == SG_POSTBOX_NOTE_PULLED ? STAMP_PULL : STAMP_PUSH_IN);
}

/* The peers' rows, with what only a running postbox knows (pb may be NULL). */
static int walk_peers(sg__store *store, sg__postbox *pb,
                      int (*cb)(void *ud, const sg__postbox_peer_status *st), void *ud) {
  sqlite3_stmt *st = sg__store_stmt(store, SQL_PEERS);
  if (!st) return SG_ESTORE;
  int rc, err = 0;
  while (!err && (rc = sqlite3_step(st)) == SQLITE_ROW) {
    const char *id = (const char *)sqlite3_column_text(st, 0);
    peer *p = pb ? find_peer(pb, id) : NULL;
    sg__postbox_peer_status s = {
        id, sqlite3_column_int64(st, 8), sqlite3_column_int64(st, 9),
        p ? p->out.count : 0, sqlite3_column_int64(st, 1), sqlite3_column_int64(st, 2),
        sqlite3_column_int64(st, 3), sqlite3_column_int64(st, 4), sqlite3_column_int64(st, 5),
        sqlite3_column_int64(st, 7), (const char *)sqlite3_column_text(st, 6),
        p ? p->held : 0};
    err = cb(ud, &s);
  }
  if (!err && rc != SQLITE_DONE) err = sg__store_fail(store);
  sqlite3_reset(st);
  return err;
}

int sg__postbox_peers(sg__postbox *pb, int (*cb)(void *ud, const sg__postbox_peer_status *st),
                     void *ud) {
  int err = walk_peers(pb->store, pb, cb, ud);
  return err == SG_ESTORE ? store_fail(pb, err) : err;
}

int sg__postbox_store_peers(sg__store *store,
                           int (*cb)(void *ud, const sg__postbox_peer_status *st), void *ud) {
  return walk_peers(store, NULL, cb, ud);
}

int sg__postbox_key_get(sg__postbox *pb, const char *id, uint8_t key[32]) {
  sqlite3_stmt *st = stmt_for(pb, SQL_KEY_GET, id);
  if (!st) return SG_ESTORE;
  int rc = sqlite3_step(st), err = SG_STORE_NOTFOUND;
  if (rc == SQLITE_ROW && sqlite3_column_bytes(st, 0) == 32) {
    memcpy(key, sqlite3_column_blob(st, 0), 32);
    err = 0;
  } else if (rc != SQLITE_ROW && rc != SQLITE_DONE) {
    err = store_fail(pb, sg__store_fail(pb->store));
  }
  sqlite3_reset(st);
  return err;
}

int sg__postbox_key_set(sg__postbox *pb, const char *id, const uint8_t key[32]) {
  if (!get_peer(pb, id)) return SG_ESTORE;
  sqlite3_stmt *st = stmt_for(pb, SQL_KEY_SET, id);
  if (!st) return SG_ESTORE;
  sqlite3_bind_blob(st, 2, key, 32, SQLITE_STATIC);
  return run(pb, st);
}

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
static const char SQL_PEER_KNOWN[] = "SELECT count(*) FROM peers WHERE server_id = ?1";

typedef struct {
  sg__postbox *pb;
  const char *old_id, *new_id;
} rename_args;

static int rename_tx(sg__store *s, void *ud) {
  (void)s;
  rename_args *a = ud;
  for (size_t i = 0; i < sizeof SQL_RENAME / sizeof *SQL_RENAME; i++) {
    sqlite3_stmt *st = stmt_for(a->pb, SQL_RENAME[i], a->old_id);
    if (!st) return SG_ESTORE;
    sqlite3_bind_text(st, 2, a->new_id, -1, SQLITE_TRANSIENT);
    int err = run(a->pb, st);
    if (err) return err;
  }
  return 0;
}

static void forget_peer(sg__postbox *pb, peer *p) {
  for (peer **pp = &pb->peers; *pp; pp = &(*pp)->next)
    if (*pp == p) {
      *pp = p->next;
      break;
    }
  uv_close((uv_handle_t *)&p->push_timer, timer_closed);
  uv_close((uv_handle_t *)&p->deliver_timer, timer_closed);
}

int sg__postbox_rename_peer(sg__postbox *pb, const char *old_id, const char *new_id) {
  if (strcmp(old_id, new_id) == 0) return 0;
  peer *p = find_peer(pb, old_id);
  if (p && (p->out.count || p->held_in.count || p->serving || p->delivering))
    return fail(pb, SG_EINVAL, "the peer has events in flight; try again");
  sqlite3_stmt *st = stmt_for(pb, SQL_PEER_KNOWN, old_id);
  int64_t known = st ? run_int(pb, st) : -1;
  if (known <= 0) return known < 0 ? SG_ESTORE : SG_STORE_NOTFOUND;
  peer *np = get_peer(pb, new_id);
  if (!np) return SG_ESTORE;
  rename_args a = {pb, old_id, new_id};
  int err = sg__store_atomic(pb->store, rename_tx, &a);
  if (err) return err;
  if (p) forget_peer(pb, p);
  np->queued = -1;  /* the old id's rows joined */
  schedule_delivery(np, 0);
  return 0;
}

/* ---- life cycle ------------------------------------------------------------------- */

static int load_peer(void *ud, const sg__postbox_peer_status *st) {
  sg__postbox *pb = ud;
  peer *p = get_peer(pb, st->server_id);
  if (!p) return SG_ESTORE;
  if (st->inbox) schedule_delivery(p, 0);
  return 0;
}

int sg__postbox_new(uv_loop_t *loop, sg__store *store, const sg__postbox_transport *tp,
                   const sg__postbox_options *opts, sg__postbox **out) {
  *out = NULL;
  sg__postbox *pb = calloc(1, sizeof *pb);
  if (!pb) return SG_ENOMEM;
  pb->loop = loop;
  pb->store = store;
  pb->tp = *tp;
  if (opts) pb->opt = *opts;
  else sg__postbox_options_default(&pb->opt);
  if (pb->opt.push_tries == 0) pb->opt.push_tries = 1;
  if (pb->opt.deliver_tries == 0) pb->opt.deliver_tries = 1;
  int err = sg__postbox_peers(pb, load_peer, pb);
  if (err) {
    pb->closing = 1;
    sg__postbox_close(pb, NULL, NULL);
    return err;
  }
  *out = pb;
  return 0;
}

void sg__postbox_close(sg__postbox *pb, void (*cb)(void *data), void *data) {
  pb->closing = 1;
  pb->close_cb = cb;
  pb->close_data = data;
  for (peer *p = pb->peers; p; p = p->next) {
    /* A Push still outstanding completes when the transport closes; the
     * transport is closed first, so what is left waits: queue it. */
    uv_timer_stop(&p->push_timer);
    if (p->out.count) spill(p, "closing");
    release_peer(p);
  }
  if (pb->handles == 0) {
    free(pb);
    if (cb) cb(data);
    return;
  }
  while (pb->peers) forget_peer(pb, pb->peers);
}
