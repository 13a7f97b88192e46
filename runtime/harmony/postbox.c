/* The postbox's delivery rules on the store's asynchronous operations, one
 * code path for SQLite and PostgreSQL. See postbox.h for the contract and
 * docs/postbox.md (the rules) and docs/scaling.md (several instances) for
 * why each rule is there. */
#include "postbox.h"

#include "idmap.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "segue.h"

/* An event in memory: waiting for a Push, or a held inbound Push. */
typedef struct item {
  struct item *next;
  uint8_t *event;
  size_t len;
  int64_t seq;       /* in a peer's in_mem: its inbox seq */
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
  char *out_claim, *in_claim;  /* "postbox.out/<id>", "postbox.in/<id>" */
  /* outbound */
  item_list out;        /* head is being Pushed when `pushing` or backing off */
  unsigned tries;
  int pushing;          /* a transport->push is outstanding */
  int backing_off;      /* push_timer runs */
  int busy;             /* a claim, count or spill of the outbound side runs */
  unsigned spilling;    /* events of the spill that runs */
  int refused;          /* another instance holds the outbound claim: spill */
  uint64_t refused_since;  /* uv_now of the first refusal of this wait, or 0 */
  int claimed;          /* we hold the outbound claim */
  uint64_t claimed_at;  /* uv_now of the last claim or renewal */
  int64_t queued;       /* rows in the outbox as far as we know: -1 unknown */
  uv_timer_t push_timer;
  int serving;          /* a Pull response of this peer is being written */
  /* inbound */
  int held;
  item_list held_in;
  uv_timer_t deliver_timer;
  int delivering;       /* the delivery loop runs (a store call or the handler) */
  int in_claimed;
  uint64_t in_claimed_at;
  int in_head, head_again;  /* trampoline: SQLite answers before the call returns */
  /* One writer (SQLite): the inbox's events of this peer are also kept in
   * memory, so a delivery reads nothing back. `mirror` while in_mem holds
   * exactly the peer's inbox (set when a read found it empty with no
   * append outstanding; dropped, and the store read again, after anything
   * else: a failed delivery, a Pull's batch, a rename, past MIRROR_MAX). */
  int mirror;
  item_list in_mem;
  unsigned appending;   /* inbox appends not answered yet */
  int64_t done_upto;    /* delivered from in_mem up to this seq, not deleted yet
                         * (one statement at the end of the turn), or 0 */
  struct peer *done_next;  /* in pb->dones while done_listed */
  int done_listed;
  int key_known;
  uint8_t key[32];      /* the key last persisted or read */
  uint64_t pushed_at;   /* uv_now of its last Push to us */
  uint64_t stamped_at;  /* uv_now of the last last_push_in written, or 0 */
  int gone;             /* renamed away: kept until the postbox goes, out of
                         * pb->index */
} peer;

struct sg__postbox {
  uv_loop_t *loop;
  sg__store *store;
  sg__postbox_transport tp;
  sg__postbox_options opt;
  char *instance;
  int multi;            /* the store is shared (PostgreSQL): claims matter */
  peer *peers;          /* every peer, gone ones too (closing walks them) */
  sg__idmap index;      /* id -> its peer that is not gone: no walk per call */
  peer *last;           /* the peer found last (a Push asks for it ~4 times), not gone */
  uv_idle_t commit_idle;  /* SQLite: commits the turn's batch */
  peer *dones;          /* the peers whose done_upto was set this turn */
  uv_timer_t scan_timer;  /* shared store: inboxes whose instance died */
  unsigned handles;     /* handles still to close */
  unsigned calls;       /* store calls not answered yet */
  int closing, closed;
  void (*close_cb)(void *data);
  void *close_data;
  char errmsg[512];
};

struct batch {
  sg__postbox_batch pub;
  peer *p;
  int64_t *seqs;
  uint8_t **events;
  size_t *lens;
};

void sg__postbox_options_default(sg__postbox_options *o) {
  o->push_tries = 5;
  o->push_backoff_ms = 200;
  o->queue_limit = 10000;
  o->deliver_tries = 5;
  o->deliver_backoff_ms = 1000;
  o->claim_ms = 10000;
  o->instance = NULL;
}

const char *sg__postbox_errmsg(const sg__postbox *pb) { return pb->errmsg; }

int sg__postbox_closing(const sg__postbox *pb) { return pb->closing; }

static int fail(sg__postbox *pb, int err, const char *msg) {
  snprintf(pb->errmsg, sizeof pb->errmsg, "%s", msg ? msg : sg_strerror(err));
  return err;
}

/* ---- store calls ------------------------------------------------------------
 * Every call is counted until its callback ran, so the postbox's memory
 * stays until the last answer (PostgreSQL answers after close too). On
 * SQLite a batched write's callback waits for the commit, which the idle
 * handle makes at the end of the loop turn. */

static void maybe_free(sg__postbox *pb);

static void dones_write(sg__postbox *pb);

static void commit_turn(uv_idle_t *h) {
  sg__postbox *pb = h->data;
  dones_write(pb);
  sg__store_flush(pb->store);
  if (!sg__store_pending(pb->store)) uv_idle_stop(h);
}

/* Before a store call. */
static void call_begin(sg__postbox *pb) { pb->calls++; }

/* After the call returned rc (its callback may have run). */
static int call_sent(sg__postbox *pb, int rc) {
  if (rc != 0) {
    pb->calls--;
    fail(pb, rc, sg__store_errmsg(pb->store));
  }
  if (!pb->closed && sg__store_pending(pb->store)) uv_idle_start(&pb->commit_idle, commit_turn);
  return rc;
}

/* First thing in a callback: the answer came. */
static void call_done(sg__postbox *pb) { pb->calls--; }

/* Last thing in a callback. */
static void call_end(sg__postbox *pb) {
  if (pb->closed) maybe_free(pb);
}

#define CALL(pb, expr) (call_begin(pb), call_sent(pb, (expr)))

/* Fire and forget: the peers' bookkeeping. */
static void ignored(void *ud, const sg__store_reply *r) {
  sg__postbox *pb = ud;
  (void)r;
  call_done(pb);
  call_end(pb);
}

/* The events a peer's delivery took from memory leave the inbox: one
 * statement, before anything reads the inbox again and at the turn's end. */
static void done_write(peer *p) {
  if (!p->done_upto) return;
  int64_t seq = p->done_upto;
  p->done_upto = 0;
  CALL(p->pb, sg__store_inbox_done_upto_async(p->pb->store, p->id, seq, ignored, p->pb));
}

/* Only the peers listed when their done_upto was set: the turn's cost does
 * not grow with the peers known. The list is taken first, so a peer listed
 * again while this runs goes on the next one. */
static void dones_write(sg__postbox *pb) {
  peer *p = pb->dones;
  pb->dones = NULL;
  while (p) {
    peer *next = p->done_next;
    p->done_next = NULL;
    p->done_listed = 0;
    done_write(p);
    p = next;
  }
}

static void done_mark(peer *p, int64_t seq) {
  sg__postbox *pb = p->pb;
  p->done_upto = seq;
  if (!p->done_listed) {
    p->done_listed = 1;
    p->done_next = pb->dones;
    pb->dones = p;
  }
}

static void stamp(sg__postbox *pb, const char *id, sg__store_stamp which) {
  CALL(pb, sg__store_peer_stamp_async(pb->store, id, which, ignored, pb));
}

static void record_error(sg__postbox *pb, const char *id, const char *error) {
  CALL(pb, sg__store_peer_error_async(pb->store, id, error, ignored, pb));
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

static void mirror_drop(peer *p) {
  item *it;
  p->mirror = 0;
  while ((it = item_shift(&p->in_mem))) item_free(it);
}

static void peer_free(peer *p) {
  mirror_drop(p);
  free(p->id);
  free(p->out_claim);
  free(p->in_claim);
  free(p);
}

static void maybe_free(sg__postbox *pb) {
  if (!pb->closed || pb->handles || pb->calls) return;
  while (pb->peers) {
    peer *p = pb->peers;
    pb->peers = p->next;
    peer_free(p);
  }
  sg__idmap_free(&pb->index);
  void (*cb)(void *) = pb->close_cb;
  void *data = pb->close_data;
  free(pb->instance);
  free(pb);
  if (cb) cb(data);
}

static void handle_closed(uv_handle_t *h) {
  sg__postbox *pb = h->data;
  pb->handles--;
  maybe_free(pb);
}

static void peer_timer_closed(uv_handle_t *h) {
  sg__postbox *pb = ((peer *)h->data)->pb;
  pb->handles--;
  maybe_free(pb);
}

/* The peer of `id` that is not gone, by hash (pb->index). */
static peer *find_peer(sg__postbox *pb, const char *id) {
  peer *p = pb->last;
  if (p && strcmp(p->id, id) == 0) return p;
  if ((p = sg__idmap_get(&pb->index, id))) pb->last = p;
  return p;
}

static char *claim_name(const char *kind, const char *id) {
  size_t n = strlen(kind) + strlen(id) + 1;
  char *s = malloc(n);
  if (s) snprintf(s, n, "%s%s", kind, id);
  return s;
}

/* The peer's state, created in memory if new (its row is created by the
 * first write that needs it: appends create it, and a stamp of an unknown
 * peer is a no-op, added first here). */
static peer *get_peer(sg__postbox *pb, const char *id) {
  peer *p = find_peer(pb, id);
  if (p) return p;
  p = calloc(1, sizeof *p);
  if (!p || !(p->id = strdup(id)) || !(p->out_claim = claim_name("postbox.out/", id))
      || !(p->in_claim = claim_name("postbox.in/", id))) {
    if (p) peer_free(p);
    fail(pb, SG_ENOMEM, NULL);
    return NULL;
  }
  if (sg__idmap_put(&pb->index, p->id, p)) {
    peer_free(p);
    fail(pb, SG_ENOMEM, NULL);
    return NULL;
  }
  if (CALL(pb, sg__store_peer_add_async(pb->store, id, ignored, pb))) {
    sg__idmap_remove(&pb->index, p->id, p);
    peer_free(p);
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

static int stale(sg__postbox *pb, uint64_t at) {
  return pb->multi && uv_now(pb->loop) - at >= pb->opt.claim_ms / 3;
}

/* ---- outbound ---------------------------------------------------------------- */

static void advance(peer *p);
static void push_timer_fired(uv_timer_t *t);

typedef struct spill_call {
  peer *p;
  item_list items;
} spill_call;

static void spilled(void *ud, const sg__store_reply *r) {
  spill_call *c = ud;
  peer *p = c->p;
  sg__postbox *pb = p->pb;
  call_done(pb);
  if (r->err == 0) p->queued = r->count;
  else fail(pb, r->err, r->message);
  item *it;
  while ((it = item_shift(&c->items))) {
    ((sg__postbox_push_cb)it->cb)(it->ud, r->err < 0 ? r->err : 0, SG_POSTBOX_QUEUED,
                                  r->err < 0 ? r->message : "queued");
    item_free(it);
  }
  free(c);
  p->busy = 0;
  p->spilling = 0;
  p->refused = 0;
  advance(p);
  call_end(pb);
}

/* The waiting events (the head first) go to the durable queue, all or
 * none, and their callers hear how it went once that committed. */
static void spill(peer *p, const char *why) {
  sg__postbox *pb = p->pb;
  size_t n = p->out.count, i = 0;
  spill_call *c = calloc(1, sizeof *c);
  const uint8_t **events = malloc((n ? n : 1) * sizeof *events);
  size_t *lens = malloc((n ? n : 1) * sizeof *lens);
  if (why) record_error(pb, p->id, why);
  p->tries = 0;
  if (!c || !events || !lens) {
    free(c);
    free(events);
    free(lens);
    item *it;
    while ((it = item_shift(&p->out))) {
      ((sg__postbox_push_cb)it->cb)(it->ud, SG_ENOMEM, SG_POSTBOX_QUEUED, "out of memory");
      item_free(it);
    }
    return;
  }
  c->p = p;
  c->items = p->out;
  p->spilling = p->out.count;
  p->out = (item_list){0};
  for (item *it = c->items.head; it; it = it->next, i++) {
    events[i] = it->event;
    lens[i] = it->len;
  }
  p->busy = 1;
  int rc = CALL(pb, sg__store_outbox_add_async(pb->store, p->id, events, lens, n, spilled, c));
  free(events);
  free(lens);
  if (rc) {
    sg__store_reply r = {.err = rc, .message = pb->errmsg};
    call_begin(pb);  /* spilled() counts it done */
    spilled(c, &r);
  }
}

static void counted(void *ud, const sg__store_reply *r) {
  peer *p = ud;
  sg__postbox *pb = p->pb;
  call_done(pb);
  p->busy = 0;
  if (r->err == 0) p->queued = r->count;
  else p->refused = 1;  /* cannot tell: the queue keeps the order */
  advance(p);
  call_end(pb);
}

static void claimed(void *ud, const sg__store_reply *r) {
  peer *p = ud;
  sg__postbox *pb = p->pb;
  call_done(pb);
  p->busy = 0;
  uint64_t now = uv_now(pb->loop);
  if (r->err == 0) {
    if (!p->claimed) p->queued = -1;  /* count it now that we hold it */
    p->claimed = 1;
    p->claimed_at = now;
    p->refused_since = 0;
  } else if (r->err == SG_STORE_NOTFOUND && !pb->closing
             && (!p->refused_since || now - p->refused_since < pb->opt.claim_ms / 3)) {
    /* Another instance Pushes to this peer: wait a little for its turn to
     * end rather than queue at once (a queue stops every instance's Pushes
     * until the peer Pulls, and a peer that never had a Push from us does
     * not know to Pull). */
    p->claimed = 0;
    if (!p->refused_since) p->refused_since = now;
    uint64_t delay = pb->opt.claim_ms / 20;
    p->backing_off = 1;
    uv_timer_start(&p->push_timer, push_timer_fired, delay < 20 ? 20 : delay > 200 ? 200 : delay, 0);
    call_end(pb);
    return;
  } else {
    p->claimed = 0;
    p->refused = 1;
    p->refused_since = 0;
  }
  advance(p);
  call_end(pb);
}

static void claim_out(peer *p) {
  sg__postbox *pb = p->pb;
  p->busy = 1;
  if (CALL(pb, sg__store_claim_async(pb->store, p->out_claim, pb->instance,
                                     (int64_t)pb->opt.claim_ms, claimed, p))) {
    p->busy = 0;
    p->refused = 1;
    advance(p);
  }
}

/* Nothing to Push and nothing being served: the claim goes, so another
 * instance may Push or serve; what we knew of the queue may change. */
static void release_out(peer *p) {
  sg__postbox *pb = p->pb;
  if (!p->claimed || !pb->multi || p->serving) return;
  p->claimed = 0;
  p->queued = -1;
  CALL(pb, sg__store_claim_release_async(pb->store, p->out_claim, pb->instance, ignored, pb));
}

static void push_timer_fired(uv_timer_t *t) {
  peer *p = t->data;
  p->backing_off = 0;
  advance(p);
}

static void start_push(peer *p) {
  item *it = p->out.head;
  p->pushing = 1;
  int err = p->pb->tp.push(p->pb->tp.ud, p->id, it->event, it->len, p);
  if (err) sg__postbox_push_done(p->pb, p, err, sg_strerror(err));
}

/* The outbound side's next step: one store call or Push at a time per peer,
 * so events leave (Pushed or queued) in the order they came. */
static void advance(peer *p) {
  sg__postbox *pb = p->pb;
  if (p->busy || p->pushing || p->backing_off) return;
  if (!p->out.head) {
    release_out(p);
    return;
  }
  if (pb->closing) {
    spill(p, NULL);
    return;
  }
  if (p->refused) {  /* another instance Pushes to this peer: queue */
    spill(p, NULL);
    return;
  }
  if (!p->claimed || stale(pb, p->claimed_at)) {
    claim_out(p);
    return;
  }
  if (p->queued < 0) {
    p->busy = 1;
    if (CALL(pb, sg__store_outbox_count_async(pb->store, p->id, counted, p))) {
      p->busy = 0;
      spill(p, NULL);
    }
    return;
  }
  /* Order: while anything is queued, nothing is Pushed. */
  if (p->queued > 0) spill(p, NULL);
  else start_push(p);
}

void sg__postbox_push_done(sg__postbox *pb, void *call, int err, const char *message) {
  peer *p = call;
  p->pushing = 0;
  if (err) {
    const char *why = message ? message : sg_strerror(err);
    if (++p->tries >= pb->opt.push_tries || pb->closing) {
      spill(p, why);
      return;
    }
    uint64_t delay = pb->opt.push_backoff_ms << (p->tries - 1 < 16 ? p->tries - 1 : 16);
    p->backing_off = 1;
    uv_timer_start(&p->push_timer, push_timer_fired, delay, 0);
    return;
  }
  stamp(pb, p->id, SG_STORE_STAMP_PUSH);
  p->tries = 0;
  item *it = item_shift(&p->out);
  if (it) {
    ((sg__postbox_push_cb)it->cb)(it->ud, 0, SG_POSTBOX_PUSHED, "pushed");
    item_free(it);
  }
  advance(p);
}

int sg__postbox_push(sg__postbox *pb, const char *id, const uint8_t *event, size_t len,
                    sg__postbox_push_cb cb, void *ud) {
  if (pb->closing) return fail(pb, SG_ECLOSING, NULL);
  peer *p = get_peer(pb, id);
  if (!p) return SG_ENOMEM;
  int64_t queued = p->queued > 0 ? p->queued : 0;
  if (queued + p->spilling + p->out.count >= pb->opt.queue_limit) {
    snprintf(pb->errmsg, sizeof pb->errmsg, "%s: queue full (%u events)", id,
             pb->opt.queue_limit);
    return SG_ELIMIT;
  }
  item *it = item_new(event, len, (void (*)(void))cb, ud);
  if (!it) return fail(pb, SG_ENOMEM, NULL);
  item_push(&p->out, it);
  advance(p);
  return 0;
}

/* ---- serving Pulls ------------------------------------------------------------- */

static void batch_free(struct batch *b) {
  for (size_t i = 0; i < b->pub.n; i++) free(b->events[i]);
  free(b->events);
  free(b->lens);
  free(b->seqs);
  free(b);
}

typedef struct pull_call {
  struct batch *b;
  size_t max_bytes;
  sg__postbox_batch_cb cb;
  void *ud;
} pull_call;

static void pull_answer(pull_call *c, int err) {
  struct batch *b = c->b;
  /* Answered after the postbox began closing: nobody would end the batch
   * (its owner, a Lua state, may be gone), so it is not handed out; the
   * events stay queued for the next Pull. */
  if (!err && b->p->pb->closing) err = SG_ECANCELED;
  if (err || !b->pub.n) b->p->serving = 0;
  if (err) {
    batch_free(b);
    b = NULL;
  }
  sg__postbox_batch_cb cb = c->cb;
  void *ud = c->ud;
  free(c);
  cb(ud, err, b ? &b->pub : NULL);
}

static void head_read(void *ud, const sg__store_reply *r) {
  pull_call *c = ud;
  struct batch *b = c->b;
  peer *p = b->p;
  sg__postbox *pb = p->pb;
  call_done(pb);
  int err = r->err < 0 ? fail(pb, r->err, r->message) : 0;
  size_t n = err ? 0 : r->n;
  if (n) {
    b->events = calloc(n, sizeof *b->events);
    b->lens = calloc(n, sizeof *b->lens);
    b->seqs = calloc(n, sizeof *b->seqs);
    if (!b->events || !b->lens || !b->seqs) err = fail(pb, SG_ENOMEM, NULL);
  }
  for (size_t i = 0; !err && i < n; i++) {
    const sg__store_event *e = &r->events[i];
    if (!(b->events[i] = malloc(e->len ? e->len : 1))) {
      err = fail(pb, SG_ENOMEM, NULL);
      break;
    }
    if (e->len) memcpy(b->events[i], e->event, e->len);
    b->lens[i] = e->len;
    b->seqs[i] = e->seq;
    b->pub.n = i + 1;
  }
  b->pub.events = (const uint8_t **)b->events;
  b->pub.lens = b->lens;
  pull_answer(c, err);  /* frees b on error */
  if (!p->serving) advance(p);
  call_end(pb);
}

static void serve_claimed(void *ud, const sg__store_reply *r) {
  pull_call *c = ud;
  peer *p = c->b->p;
  sg__postbox *pb = p->pb;
  call_done(pb);
  if (r->err != 0) {  /* another instance serves or Pushes: nothing here */
    pull_answer(c, 0);
  } else {
    if (!p->claimed) p->queued = -1;
    p->claimed = 1;
    p->claimed_at = uv_now(pb->loop);
    if (pb->closing)
      pull_answer(c, SG_ECANCELED);
    else if (CALL(pb, sg__store_outbox_head_async(pb->store, p->id, c->max_bytes, head_read, c)))
      pull_answer(c, SG_ESTORE);
  }
  call_end(pb);
}

int sg__postbox_pull_begin(sg__postbox *pb, const char *id, size_t max_bytes,
                          sg__postbox_batch_cb cb, void *ud) {
  peer *p = get_peer(pb, id);
  if (!p) return SG_ENOMEM;
  struct batch *b = calloc(1, sizeof *b);
  pull_call *c = calloc(1, sizeof *c);
  if (!b || !c) {
    free(b);
    free(c);
    return fail(pb, SG_ENOMEM, NULL);
  }
  b->p = p;
  *c = (pull_call){b, max_bytes, cb, ud};
  /* A second Pull while the first response is on its way gets nothing, so
   * no event goes out twice. */
  if (p->serving) {
    free(c);
    cb(ud, 0, &b->pub);
    return 0;
  }
  p->serving = 1;
  int rc = p->claimed && !stale(pb, p->claimed_at)
               ? CALL(pb, sg__store_outbox_head_async(pb->store, id, max_bytes, head_read, c))
               : CALL(pb, sg__store_claim_async(pb->store, p->out_claim, pb->instance,
                                                (int64_t)pb->opt.claim_ms, serve_claimed, c));
  if (rc) {
    p->serving = 0;
    free(c);
    free(b);
    return rc;
  }
  return 0;
}

static void dropped(void *ud, const sg__store_reply *r) {
  peer *p = ud;
  sg__postbox *pb = p->pb;
  call_done(pb);
  p->serving = 0;
  if (r->err < 0) record_error(pb, p->id, r->message);
  else if (p->queued >= 0) p->queued = p->queued > r->count ? p->queued - r->count : 0;
  advance(p);
  call_end(pb);
}

int sg__postbox_pull_end(sg__postbox *pb, sg__postbox_batch *batch, int status) {
  struct batch *b = (struct batch *)batch;
  peer *p = b->p;
  int rc = 0;
  if (b->pub.n) {
    if (status == 0) {
      rc = CALL(pb, sg__store_outbox_drop_async(pb->store, p->id, b->seqs, b->pub.n, dropped, p));
      if (rc) p->serving = 0;
    } else {
      p->serving = 0;
      advance(p);
    }
  }
  batch_free(b);
  return rc;
}

/* ---- inbound ------------------------------------------------------------------- */

static void deliver_timer_fired(uv_timer_t *t);
static void fetch_head(peer *p);

static void schedule_delivery(peer *p, uint64_t delay) {
  if (p->pb->closing || p->held || p->gone) return;
  /* a turn's Pushes each ask for it: one timer move is enough */
  if (delay == 0 && uv_is_active((uv_handle_t *)&p->deliver_timer) &&
      uv_timer_get_due_in(&p->deliver_timer) == 0)
    return;
  uv_timer_start(&p->deliver_timer, deliver_timer_fired, delay, 0);
}

/* The loop stops: the inbox is empty, or it waits for a retry. */
static void delivery_stops(peer *p, int empty) {
  sg__postbox *pb = p->pb;
  p->delivering = 0;
  if (empty && p->in_claimed && pb->multi) {
    p->in_claimed = 0;
    CALL(pb, sg__store_claim_release_async(pb->store, p->in_claim, pb->instance, ignored, pb));
  }
}

static void in_claimed(void *ud, const sg__store_reply *r) {
  peer *p = ud;
  sg__postbox *pb = p->pb;
  call_done(pb);
  if (r->err != 0) {
    /* Another instance delivers; ask again later, so the inbox of one that
     * died is taken over once its claim expired. */
    p->in_claimed = 0;
    delivery_stops(p, 0);
    schedule_delivery(p, pb->opt.claim_ms / 2);
  } else {
    p->in_claimed = 1;
    p->in_claimed_at = uv_now(pb->loop);
    p->head_again = 0;
    fetch_head(p);
  }
  call_end(pb);
}

/* Hands one event to the application (outside any store call: the handler
 * may use the store) and settles it: done, or one more failed attempt, and
 * past deliver_tries dead_letters. The next head is read after the write:
 * both engines see it. */
static void deliver_one(peer *p, int64_t seq, const uint8_t *event, size_t len,
                        int64_t attempts, int from_memory) {
  sg__postbox *pb = p->pb;
  char why[256] = "handler failed";
  int err = pb->tp.deliver(pb->tp.ud, p->id, event, len, why, sizeof why);
  if (err == 0) {
    if (from_memory) {  /* deleted with the others of the turn */
      done_mark(p, seq);
      if (!pb->closed) uv_idle_start(&pb->commit_idle, commit_turn);
    } else {
      CALL(pb, sg__store_inbox_done_async(pb->store, seq, ignored, pb));
    }
    fetch_head(p);
    return;
  }
  mirror_drop(p);  /* its attempts are the store's to count */
  done_write(p);
  record_error(pb, p->id, why);
  int dead = attempts + 1 >= pb->opt.deliver_tries;
  CALL(pb, sg__store_inbox_failed_async(pb->store, seq, why, attempts, dead, ignored, pb));
  if (dead) {
    fetch_head(p);  /* dead: the next one */
  } else {
    delivery_stops(p, 0);
    schedule_delivery(p, pb->opt.deliver_backoff_ms << (attempts < 16 ? attempts : 16));
  }
}

static void head_arrived(void *ud, const sg__store_reply *r) {
  peer *p = ud;
  sg__postbox *pb = p->pb;
  call_done(pb);
  if (pb->closing || p->gone) {
    delivery_stops(p, 0);
  } else if (r->err == SG_STORE_NOTFOUND) {
    /* empty, and nothing on its way in: from now on memory knows it */
    if (!pb->multi && !p->appending) p->mirror = 1;
    delivery_stops(p, 1);
  } else if (r->err < 0) {
    record_error(pb, p->id, r->message);
    delivery_stops(p, 0);
    schedule_delivery(p, pb->opt.deliver_backoff_ms);
  } else {
    const sg__store_event *e = &r->events[0];
    deliver_one(p, e->seq, e->event, e->len, e->attempts, 0);
  }
  call_end(pb);
}

static void fetch_head(peer *p) {
  sg__postbox *pb = p->pb;
  p->head_again = 1;
  if (p->in_head) return;  /* inside the loop below: it goes on */
  p->in_head = 1;
  while (p->head_again) {
    p->head_again = 0;
    if (pb->closing || p->held || p->gone) {
      delivery_stops(p, 0);
      break;
    }
    if (p->mirror) {  /* one writer: the head is in memory */
      item *it = item_shift(&p->in_mem);
      if (!it) {
        delivery_stops(p, 1);
        break;
      }
      deliver_one(p, it->seq, it->event, it->len, 0, 1);
      item_free(it);
      continue;
    }
    if (stale(pb, p->in_claimed_at)) {  /* renew it before it lapses */
      if (CALL(pb, sg__store_claim_async(pb->store, p->in_claim, pb->instance,
                                         (int64_t)pb->opt.claim_ms, in_claimed, p)))
        delivery_stops(p, 0);
      break;
    }
    done_write(p);  /* what memory delivered is gone before the store is read */
    if (CALL(pb, sg__store_inbox_head_async(pb->store, p->id, head_arrived, p))) {
      delivery_stops(p, 0);
      schedule_delivery(p, pb->opt.deliver_backoff_ms);
    }
  }
  p->in_head = 0;
}

static void deliver_timer_fired(uv_timer_t *t) {
  peer *p = t->data;
  sg__postbox *pb = p->pb;
  if (p->delivering || p->held || pb->closing) return;
  p->delivering = 1;
  if (pb->multi && !p->in_claimed) {
    if (CALL(pb, sg__store_claim_async(pb->store, p->in_claim, pb->instance,
                                       (int64_t)pb->opt.claim_ms, in_claimed, p)))
      delivery_stops(p, 0);
    return;
  }
  if (!pb->multi) p->in_claimed_at = uv_now(pb->loop);
  fetch_head(p);
}

#define MIRROR_MAX 1024  /* events of a peer's inbox kept in memory, at most */
#define STAMP_EVERY_MS 1000  /* a peer's last_push_in is this fresh, at least */

typedef struct store_call {
  peer *p;
  sg__postbox_stored_cb cb;
  void *ud;
  int pushed;        /* by inbox_push: its seq is the reply's num */
  size_t len;
  uint8_t event[];   /* pushed on one writer: the event, for in_mem */
} store_call;

static void stored(void *ud, const sg__store_reply *r) {
  store_call *c = ud;
  peer *p = c->p;
  sg__postbox *pb = p->pb;
  call_done(pb);
  p->appending--;
  if (r->err < 0) {
    fail(pb, r->err, r->message);
    mirror_drop(p);
  } else {
    if (p->mirror) {
      item *it = c->pushed && p->in_mem.count < MIRROR_MAX
                     ? item_new(c->event, c->len, NULL, NULL) : NULL;
      if (it) {
        it->seq = r->num;
        item_push(&p->in_mem, it);
      } else {
        mirror_drop(p);
      }
    }
    schedule_delivery(p, 0);
  }
  if (c->cb) c->cb(c->ud, r->err < 0 ? r->err : 0);
  free(c);
  call_end(pb);
}

static store_call *store_call_new(peer *p, const uint8_t *event, size_t len,
                                  sg__postbox_stored_cb cb, void *ud) {
  size_t keep = event && !p->pb->multi ? len : 0;
  store_call *c = malloc(sizeof *c + keep);
  if (!c) return NULL;
  *c = (store_call){p, cb, ud, event != NULL, keep};
  if (keep) memcpy(c->event, event, keep);
  return c;
}

static int store_received(peer *p, const uint8_t *const *events, const size_t *lens, size_t n,
                          sg__postbox_stored_cb cb, void *ud) {
  sg__postbox *pb = p->pb;
  store_call *c = store_call_new(p, NULL, 0, cb, ud);
  if (!c) return fail(pb, SG_ENOMEM, NULL);
  p->appending++;
  int rc = CALL(pb, sg__store_inbox_add_async(pb->store, p->id, events, lens, n, stored, c));
  if (rc) {
    p->appending--;
    free(c);
  }
  return rc;
}

/* A Push's event: the peer's row, its last_push_in and the event in one call. */
static int store_pushed(peer *p, const uint8_t *event, size_t len, sg__postbox_stored_cb cb,
                        void *ud) {
  sg__postbox *pb = p->pb;
  store_call *c = store_call_new(p, event, len, cb, ud);
  if (!c) return fail(pb, SG_ENOMEM, NULL);
  p->appending++;
  /* last_push_in is written at most every STAMP_EVERY_MS: a commit that
   * writes it writes the peers row's page too */
  uint64_t now = uv_now(pb->loop);
  int stamp = !p->stamped_at || now - p->stamped_at >= STAMP_EVERY_MS;
  if (stamp) p->stamped_at = now;
  int rc = CALL(pb, sg__store_inbox_push_async(pb->store, p->id, event, len, stamp, stored, c));
  if (rc) {
    p->appending--;
    free(c);
  }
  return rc;
}

int sg__postbox_receive(sg__postbox *pb, const char *id, const uint8_t *const *events,
                       const size_t *lens, size_t n, sg__postbox_stored_cb cb, void *ud) {
  peer *p = get_peer(pb, id);
  if (!p) return SG_ENOMEM;
  if (n == 0) {
    cb(ud, 0);
    return 0;
  }
  return store_received(p, events, lens, n, cb, ud);
}

int sg__postbox_receive_push(sg__postbox *pb, const char *id, const uint8_t *event,
                            size_t len, sg__postbox_stored_cb cb, void *ud) {
  peer *p = get_peer(pb, id);
  if (!p) return SG_ENOMEM;
  p->pushed_at = uv_now(pb->loop);
  if (!p->held) return store_pushed(p, event, len, cb, ud);
  stamp(pb, id, SG_STORE_STAMP_PUSH_IN);
  item *it = item_new(event, len, (void (*)(void))cb, ud);
  if (!it) return fail(pb, SG_ENOMEM, NULL);
  item_push(&p->held_in, it);
  return 0;
}

uint64_t sg__postbox_pushed_at(sg__postbox *pb, const char *id) {
  peer *p = find_peer(pb, id);
  return p ? p->pushed_at : 0;
}

int sg__postbox_hold(sg__postbox *pb, const char *id) {
  peer *p = get_peer(pb, id);
  if (!p) return SG_ENOMEM;
  p->held = 1;
  return 0;
}

/* Held Pushes are stored one by one in arrival order, after what the Pull
 * brought, and each caller answers its Push once its event is stored. */
static void release_peer(peer *p) {
  p->held = 0;
  item *it;
  while ((it = item_shift(&p->held_in))) {
    const uint8_t *ev = it->event;
    sg__postbox_stored_cb cb = (sg__postbox_stored_cb)it->cb;
    int err = store_received(p, &ev, &it->len, 1, cb, it->ud);
    if (err) cb(it->ud, err);
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
  if (!get_peer(pb, id)) return SG_ENOMEM;
  if (kind == SG_POSTBOX_NOTE_ERROR) record_error(pb, id, error ? error : "error");
  else stamp(pb, id, kind == SG_POSTBOX_NOTE_PULLED ? SG_STORE_STAMP_PULL : SG_STORE_STAMP_PUSH_IN);
  return 0;
}

typedef struct peers_call {
  sg__postbox *pb;  /* NULL: no running postbox */
  sg__postbox_peers_cb cb;
  void *ud;
} peers_call;

/* The peers' rows, with what only a running postbox knows. */
static void peers_listed(void *ud, const sg__store_reply *r) {
  peers_call *c = ud;
  sg__postbox *pb = c->pb;
  if (pb) call_done(pb);
  sg__postbox_peer_status *st = r->err < 0 ? NULL : calloc(r->n ? r->n : 1, sizeof *st);
  if (r->err < 0 || !st) {
    c->cb(c->ud, r->err < 0 ? r->err : SG_ENOMEM, r->err < 0 ? r->message : "out of memory",
          NULL, 0);
  } else {
    for (size_t i = 0; i < r->n; i++) {
      const sg__store_peer *row = &r->peers[i];
      peer *p = pb ? find_peer(pb, row->server_id) : NULL;
      st[i] = (sg__postbox_peer_status){row->server_id,   row->queued,      row->inbox,
                                        p ? p->out.count : 0, row->first_seen,
                                        row->last_push,    row->last_push_in, row->last_pull,
                                        row->last_served,  row->last_error_time,
                                        row->last_error,   p ? p->held : 0};
    }
    c->cb(c->ud, 0, NULL, st, r->n);
  }
  free(st);
  free(c);
  if (pb) call_end(pb);
}

static int list_peers(sg__store *store, sg__postbox *pb, sg__postbox_peers_cb cb, void *ud) {
  peers_call *c = malloc(sizeof *c);
  if (!c) return SG_ENOMEM;
  *c = (peers_call){pb, cb, ud};
  int rc = pb ? CALL(pb, sg__store_peers_async(store, peers_listed, c))
              : sg__store_peers_async(store, peers_listed, c);
  if (rc) free(c);
  return rc;
}

int sg__postbox_peers(sg__postbox *pb, sg__postbox_peers_cb cb, void *ud) {
  return list_peers(pb->store, pb, cb, ud);
}

int sg__postbox_store_peers(sg__store *store, sg__postbox_peers_cb cb, void *ud) {
  return list_peers(store, NULL, cb, ud);
}

typedef struct key_call {
  peer *p;
  sg__postbox_key_cb cb;
  void *ud;
} key_call;

static void key_read(void *ud, const sg__store_reply *r) {
  key_call *c = ud;
  sg__postbox *pb = c->p->pb;
  call_done(pb);
  if (r->err == 0 && r->key) {
    memcpy(c->p->key, r->key, 32);
    c->p->key_known = 1;
  }
  c->cb(c->ud, r->err, r->err == 0 ? r->key : NULL);
  free(c);
  call_end(pb);
}

int sg__postbox_key_get(sg__postbox *pb, const char *id, sg__postbox_key_cb cb, void *ud) {
  peer *p = get_peer(pb, id);
  if (!p) return SG_ENOMEM;
  key_call *c = malloc(sizeof *c);
  if (!c) return fail(pb, SG_ENOMEM, NULL);
  *c = (key_call){p, cb, ud};
  int rc = CALL(pb, sg__store_peer_key_get_async(pb->store, id, key_read, c));
  if (rc) free(c);
  return rc;
}

int sg__postbox_key_remember(sg__postbox *pb, const char *id, const uint8_t key[32]) {
  peer *p = get_peer(pb, id);
  if (!p) return SG_ENOMEM;
  if (p->key_known && memcmp(p->key, key, 32) == 0) return 0;
  memcpy(p->key, key, 32);
  p->key_known = 1;
  return CALL(pb, sg__store_peer_key_set_async(pb->store, id, key, ignored, pb));
}

typedef struct rename_call {
  sg__postbox *pb;
  char *old_id, *new_id;
  sg__postbox_stored_cb cb;
  void *ud;
} rename_call;

static void renamed(void *ud, const sg__store_reply *r) {
  rename_call *c = ud;
  sg__postbox *pb = c->pb;
  call_done(pb);
  if (r->err < 0) {
    fail(pb, r->err, r->message);
  } else if (r->err == 0) {
    peer *p = find_peer(pb, c->old_id);
    if (p && !(p->out.count || p->held_in.count || p->serving || p->delivering || p->busy)) {
      p->gone = 1;  /* kept (answers may still name it) until the postbox goes */
      sg__idmap_remove(&pb->index, p->id, p);  /* the id may come back: a new peer */
      if (pb->last == p) pb->last = NULL;
      uv_timer_stop(&p->push_timer);
      uv_timer_stop(&p->deliver_timer);
    }
    peer *np = get_peer(pb, c->new_id);
    if (np) {
      np->queued = -1;  /* the old id's rows joined */
      mirror_drop(np);
      schedule_delivery(np, 0);
    }
  }
  c->cb(c->ud, r->err);
  free(c->old_id);
  free(c->new_id);
  free(c);
  call_end(pb);
}

int sg__postbox_rename_peer(sg__postbox *pb, const char *old_id, const char *new_id,
                           sg__postbox_stored_cb cb, void *ud) {
  if (strcmp(old_id, new_id) == 0) {
    cb(ud, 0);
    return 0;
  }
  peer *p = find_peer(pb, old_id);
  if (p && (p->out.count || p->held_in.count || p->serving || p->delivering || p->busy))
    return fail(pb, SG_EINVAL, "the peer has events in flight; try again");
  if (p) done_write(p);  /* delivered events do not move along */
  if (!get_peer(pb, new_id)) return SG_ENOMEM;  /* its row, before the move */
  rename_call *c = calloc(1, sizeof *c);
  if (!c || !(c->old_id = strdup(old_id)) || !(c->new_id = strdup(new_id))) {
    if (c) free(c->old_id);
    free(c);
    return fail(pb, SG_ENOMEM, NULL);
  }
  c->pb = pb;
  c->cb = cb;
  c->ud = ud;
  int rc = CALL(pb, sg__store_peer_rename_async(pb->store, old_id, new_id, renamed, c));
  if (rc) {
    free(c->old_id);
    free(c->new_id);
    free(c);
  }
  return rc;
}

/* ---- life cycle ------------------------------------------------------------------- */

/* Peers with undelivered events get a delivery: at start (a previous run
 * left them), and on a shared store every claim_ms (an instance that died
 * left them under a claim that expired). */
static void loaded(void *ud, int err, const char *message, const sg__postbox_peer_status *st,
                   size_t n) {
  sg__postbox *pb = ud;
  (void)message;
  if (err || pb->closing) return;
  for (size_t i = 0; i < n; i++) {
    if (!st[i].inbox) continue;
    peer *p = get_peer(pb, st[i].server_id);
    if (p && !p->delivering && !uv_is_active((uv_handle_t *)&p->deliver_timer))
      schedule_delivery(p, 0);
  }
}

static void scan_fired(uv_timer_t *t) {
  sg__postbox *pb = t->data;
  if (!pb->closing) sg__postbox_peers(pb, loaded, pb);
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
  if (pb->opt.claim_ms < 30) pb->opt.claim_ms = 30;
  pb->instance = strdup(pb->opt.instance ? pb->opt.instance : "segue");
  if (!pb->instance || sg__idmap_init(&pb->index)) {
    sg__idmap_free(&pb->index);
    free(pb->instance);
    free(pb);
    return SG_ENOMEM;
  }
  pb->opt.instance = NULL;
  pb->multi = sg__store_is_async(store);
  uv_idle_init(loop, &pb->commit_idle);
  pb->commit_idle.data = pb;
  uv_timer_init(loop, &pb->scan_timer);
  pb->scan_timer.data = pb;
  pb->handles = 2;
  if (pb->multi) uv_timer_start(&pb->scan_timer, scan_fired, pb->opt.claim_ms, pb->opt.claim_ms);
  int err = sg__postbox_peers(pb, loaded, pb);
  if (err) {
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
    p->backing_off = 0;
    advance(p);
    release_peer(p);
  }
  /* SQLite: what waits for the commit hears now (their callbacks may
   * write once more: the stored Pushes' deliveries are not scheduled). */
  dones_write(pb);
  for (int i = 0; i < 3 && sg__store_pending(pb->store); i++) sg__store_flush(pb->store);
  pb->closed = 1;
  for (peer *p = pb->peers; p; p = p->next) {
    if (p->claimed && pb->multi)
      CALL(pb, sg__store_claim_release_async(pb->store, p->out_claim, pb->instance, ignored, pb));
    if (p->in_claimed && pb->multi)
      CALL(pb, sg__store_claim_release_async(pb->store, p->in_claim, pb->instance, ignored, pb));
    uv_close((uv_handle_t *)&p->push_timer, peer_timer_closed);
    uv_close((uv_handle_t *)&p->deliver_timer, peer_timer_closed);
  }
  uv_close((uv_handle_t *)&pb->commit_idle, handle_closed);
  uv_close((uv_handle_t *)&pb->scan_timer, handle_closed);
}
