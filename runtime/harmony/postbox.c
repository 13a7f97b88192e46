/* The postbox's delivery rules on the store. See postbox.h for the contract
 * and docs/postbox.md for why each rule is there. */
#include "postbox.h"

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

/* Failures of the store: its message becomes the postbox's. */
static int checked(sg__postbox *pb, int err) {
  return err < 0 ? store_fail(pb, err) : err;
}

static int stamp(sg__postbox *pb, const char *id, sg__store_stamp which) {
  return checked(pb, sg__store_peer_stamp(pb->store, id, which));
}

static int record_error(sg__postbox *pb, const char *id, const char *error) {
  return checked(pb, sg__store_peer_error(pb->store, id, error));
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
  if (checked(pb, sg__store_peer_add(pb->store, id)) != 0) return NULL;
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
  if (p->queued < 0 && checked(pb, sg__store_outbox_count(pb->store, p->id, &p->queued)))
    p->queued = -1;
  return p->queued;
}

static void start_push(peer *p);

/* Appends the waiting events to the durable queue, all or none. */
static int spill_all(peer *p) {
  size_t n = p->out.count, i = 0;
  const uint8_t **events = malloc((n ? n : 1) * sizeof *events);
  size_t *lens = malloc((n ? n : 1) * sizeof *lens);
  int err = events && lens ? 0 : fail(p->pb, SG_ENOMEM, NULL);
  for (item *it = p->out.head; !err && it; it = it->next, i++) {
    events[i] = it->event;
    lens[i] = it->len;
  }
  if (!err) err = checked(p->pb, sg__store_outbox_add(p->pb->store, p->id, events, lens, n));
  free(events);
  free(lens);
  return err;
}

/* The waiting events (the one that failed first) go to the durable queue,
 * all or none, and their callers hear how it went. */
static void spill(peer *p, const char *why) {
  sg__postbox *pb = p->pb;
  int err = spill_all(p);
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
  stamp(pb, p->id, SG_STORE_STAMP_PUSH);
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
    int err = checked(pb, sg__store_outbox_add(pb->store, id, &event, &len, 1));
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

typedef struct {
  struct batch *b;
  size_t cap;
} fill_args;

static int fill_one(void *ud, int64_t seq, const uint8_t *ev, size_t len, int64_t attempts) {
  (void)attempts;
  fill_args *a = ud;
  a->b->last_seq = seq;
  return batch_add(a->b, ev, len, &a->cap);
}

static int batch_fill(sg__postbox *pb, struct batch *b, size_t max_bytes) {
  fill_args a = {b, 0};
  int err = sg__store_outbox_head(pb->store, b->p->id, max_bytes, fill_one, &a);
  if (err == SG_ENOMEM) fail(pb, err, NULL);
  else checked(pb, err);
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

int sg__postbox_pull_end(sg__postbox *pb, sg__postbox_batch *batch, int status) {
  struct batch *b = (struct batch *)batch;
  int err = 0;
  if (b->pub.n) {
    b->p->serving = 0;
    if (status == 0)
      err = checked(pb, sg__store_outbox_drop(pb->store, b->p->id, b->last_seq, &b->dropped));
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
  int go_on;  /* 1: deliver the next event at once */
} deliver_args;

/* Hands one event to the application (outside any transaction: the handler
 * may use the store) and settles it: done, or one more failed attempt, and
 * past deliver_tries dead_letters. */
static int deliver_event(void *ud, int64_t seq, const uint8_t *ev, size_t len,
                         int64_t attempts) {
  deliver_args *a = ud;
  peer *p = a->p;
  sg__postbox *pb = p->pb;
  char why[256] = "handler failed";
  int err = pb->tp.deliver(pb->tp.ud, p->id, ev, len, why, sizeof why);
  if (err == 0) {
    a->go_on = checked(pb, sg__store_inbox_done(pb->store, seq)) == 0;
    return 0;
  }
  record_error(pb, p->id, why);
  int dead = attempts + 1 >= pb->opt.deliver_tries;
  if (checked(pb, sg__store_inbox_failed(pb->store, seq, why, dead)) != 0) return 0;
  if (dead) a->go_on = 1;  /* dead: the next one */
  else schedule_delivery(p, pb->opt.deliver_backoff_ms << (attempts < 16 ? attempts : 16));
  return 0;
}

/* Delivers the head of the peer's inbox. Returns 1 to go on with the next
 * event, 0 to stop (inbox empty, or a retry is scheduled). */
static int deliver_one(peer *p) {
  deliver_args a = {p, 0};
  sg__store_inbox_head(p->pb->store, p->id, deliver_event, &a);
  return a.go_on;
}

static void deliver_timer_fired(uv_timer_t *t) {
  peer *p = t->data;
  if (p->delivering || p->held) return;
  p->delivering = 1;
  while (!p->pb->closing && !p->held && deliver_one(p)) {
  }
  p->delivering = 0;
}

static int store_received(peer *p, const uint8_t *const *events, const size_t *lens, size_t n) {
  int err = checked(p->pb, sg__store_inbox_add(p->pb->store, p->id, events, lens, n));
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
  stamp(pb, id, SG_STORE_STAMP_PUSH_IN);
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
  return stamp(pb, id, kind == SG_POSTBOX_NOTE_PULLED ? SG_STORE_STAMP_PULL : SG_STORE_STAMP_PUSH_IN);
}

typedef struct {
  sg__postbox *pb;  /* NULL: no running postbox */
  int (*cb)(void *ud, const sg__postbox_peer_status *st);
  void *ud;
} walk_args;

/* A peer's row, with what only a running postbox knows. */
static int walk_one(void *ud, const sg__store_peer *r) {
  walk_args *a = ud;
  peer *p = a->pb ? find_peer(a->pb, r->server_id) : NULL;
  sg__postbox_peer_status st = {r->server_id,   r->queued,      r->inbox,
                               p ? p->out.count : 0,          r->first_seen,
                               r->last_push,    r->last_push_in, r->last_pull,
                               r->last_served,  r->last_error_time, r->last_error,
                               p ? p->held : 0};
  return a->cb(a->ud, &st);
}

static int walk_peers(sg__store *store, sg__postbox *pb,
                      int (*cb)(void *ud, const sg__postbox_peer_status *st), void *ud) {
  walk_args a = {pb, cb, ud};
  return sg__store_peers(store, walk_one, &a);
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
  return checked(pb, sg__store_peer_key_get(pb->store, id, key));
}

int sg__postbox_key_set(sg__postbox *pb, const char *id, const uint8_t key[32]) {
  if (!get_peer(pb, id)) return SG_ESTORE;
  return checked(pb, sg__store_peer_key_set(pb->store, id, key));
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
  int err = checked(pb, sg__store_peer_known(pb->store, old_id));
  if (err) return err;
  peer *np = get_peer(pb, new_id);
  if (!np) return SG_ESTORE;
  err = checked(pb, sg__store_peer_rename(pb->store, old_id, new_id));
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
