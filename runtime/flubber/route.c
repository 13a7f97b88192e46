/* The router's hot path in C (see route.h). */
#include "route.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "segue.h"

/* ---- a string-keyed hash map (keys are "a\0b") ---------------------------- */

typedef struct ment {
  struct ment *next;
  uint64_t hash;
  void *val;
  int64_t num;
  size_t klen;
  char key[];
} ment;

typedef struct smap {
  ment **b;
  size_t nb, n;
} smap;

static uint64_t hash2(const char *a, const char *b) {
  uint64_t h = 1469598103934665603ull;
  for (; *a; a++) h = (h ^ (unsigned char)*a) * 1099511628211ull;
  h = (h ^ 0xff) * 1099511628211ull;
  for (; b && *b; b++) h = (h ^ (unsigned char)*b) * 1099511628211ull;
  return h;
}

static int key_is(const ment *e, const char *a, size_t la, const char *b, size_t lb) {
  return e->klen == la + 1 + lb && memcmp(e->key, a, la) == 0 && e->key[la] == '\0' &&
         memcmp(e->key + la + 1, b, lb) == 0;
}

static ment *smap_find(const smap *m, const char *a, const char *b) {
  if (!m->nb) return NULL;
  uint64_t h = hash2(a, b);
  size_t la = strlen(a), lb = b ? strlen(b) : 0;
  for (ment *e = m->b[h & (m->nb - 1)]; e; e = e->next)
    if (e->hash == h && key_is(e, a, la, b ? b : "", lb)) return e;
  return NULL;
}

static int smap_grow(smap *m) {
  size_t nb = m->nb ? m->nb * 2 : 64;
  ment **b = calloc(nb, sizeof *b);
  if (!b) return -1;
  for (size_t i = 0; i < m->nb; i++) {
    for (ment *e = m->b[i], *next; e; e = next) {
      next = e->next;
      e->next = b[e->hash & (nb - 1)];
      b[e->hash & (nb - 1)] = e;
    }
  }
  free(m->b);
  m->b = b;
  m->nb = nb;
  return 0;
}

/* dst (empty) becomes a copy of src's entries (values shared, not copied):
 * same buckets, hashes kept, no lookups. -1 out of memory (dst is then
 * what was copied so far, for smap_free). */
static int smap_clone(smap *dst, const smap *src) {
  if (!src->nb) return 0;
  dst->b = calloc(src->nb, sizeof *dst->b);
  if (!dst->b) return -1;
  dst->nb = src->nb;
  for (size_t i = 0; i < src->nb; i++) {
    for (const ment *e = src->b[i]; e; e = e->next) {
      size_t size = sizeof *e + e->klen + 1;
      ment *n = malloc(size);
      if (!n) return -1;
      memcpy(n, e, size);
      n->next = dst->b[i];
      dst->b[i] = n;
      dst->n++;
    }
  }
  return 0;
}

/* The entry of (a, b), made (val NULL, num 0) if absent; NULL out of memory. */
static ment *smap_get(smap *m, const char *a, const char *b, int *made) {
  ment *e = smap_find(m, a, b);
  if (made) *made = 0;
  if (e) return e;
  if (m->n >= m->nb && smap_grow(m) != 0) return NULL;
  size_t la = strlen(a), lb = b ? strlen(b) : 0;
  e = calloc(1, sizeof *e + la + lb + 2);
  if (!e) return NULL;
  e->hash = hash2(a, b);
  e->klen = la + 1 + lb;
  memcpy(e->key, a, la + 1);
  if (lb) memcpy(e->key + la + 1, b, lb);
  e->next = m->b[e->hash & (m->nb - 1)];
  m->b[e->hash & (m->nb - 1)] = e;
  m->n++;
  if (made) *made = 1;
  return e;
}

static void *smap_remove(smap *m, const char *a, const char *b) {
  if (!m->nb) return NULL;
  uint64_t h = hash2(a, b);
  size_t la = strlen(a), lb = b ? strlen(b) : 0;
  for (ment **p = &m->b[h & (m->nb - 1)]; *p; p = &(*p)->next) {
    ment *e = *p;
    if (e->hash == h && key_is(e, a, la, b ? b : "", lb)) {
      *p = e->next;
      void *v = e->val;
      free(e);
      m->n--;
      return v;
    }
  }
  return NULL;
}

static void smap_free(smap *m, void (*free_val)(void *)) {
  for (size_t i = 0; i < m->nb; i++) {
    for (ment *e = m->b[i], *next; e; e = next) {
      next = e->next;
      if (free_val && e->val) free_val(e->val);
      free(e);
    }
  }
  free(m->b);
  memset(m, 0, sizeof *m);
}

/* ---- state ------------------------------------------------------------------ */

typedef struct held {
  struct held *next;
  cJSON *update;
  uint64_t after;           /* sends up to this number must be done first */
  sg__route_table *table;   /* the rules it arrived under */
} held;

typedef struct bcount {
  uint64_t in, sent, sent_total;
  char *first_origin, *first_dest, *first_room;  /* set with the first copy sent */
  int dirty;
} bcount;

/* Per backend: as a destination (copies in flight, updates held, sources
 * paused for it), as a source (paused), and its counters. */
typedef struct bstate {
  struct bstate *next;
  char *name;
  uint64_t next_n, low, count;
  uint8_t *live;
  uint64_t cap;             /* of live: a ring indexed by n & (cap - 1) */
  held *hhead, *htail;
  uint64_t nheld;
  struct bstate **sources;  /* paused because of copies in flight to this one */
  size_t nsources, capsources;
  uint64_t paused_since;    /* 0: not paused */
  int releasing;
  bcount c;
  uint64_t req_n;
  double req_sum;
  uint64_t req_b[32];
} bstate;

typedef struct target {
  char *bridge, *dest, *room, *room_id, *key;
  char **prefix;            /* NULL pieces: the sender */
  size_t nprefix;
  uint64_t max_length;
  int bytes, first_of_bridge;
  bstate *d;
  bcount *bc;
} target;

typedef struct croom {
  int refs;                 /* tables holding it (a new rule set shares unchanged rooms) */
  size_t n;
  target t[];
} croom;

struct sg__route_table {
  sg__route *r;
  int refs;
  void *owner;
  smap rooms;
};

struct sg__route {
  uv_loop_t *loop;
  sg__route_hooks h;
  const sg__logger *log;
  sg__route_limits lim;
  double bounds[32];
  size_t nbounds;
  sg__store *store;
  int memory;               /* no store: the id maps below stand in for it */
  smap mem_origin;          /* (copy backend, copy id) -> mcopy of the origin */
  smap mem_copies;          /* (origin backend, origin id) -> mcopy list, oldest first */
  int enabled, closing;
  bstate *states;
  sg__route_table *cur;
  void *dispatching;
  smap edits, edits_old;
  uint64_t edits_n;
  smap bridges;             /* name -> bcount */
  uint64_t bridged, pauses, carried;
  int store_dirty, counts_dirty;
  uv_timer_t flush_timer, pause_timer;
  int open_handles;
  uint64_t live_copies;     /* copies in flight from C (their callbacks hold r) */
};

typedef struct copy {
  sg__route *r;
  sg__route_table *t;
  const target *tg;
  bstate *src, *d;
  uint64_t n, t0;
  char id[];
} copy;

static void rlog(sg__route *r, sg_log_level lvl, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void rlog(sg__route *r, sg_log_level lvl, const char *fmt, ...) {
  if (!r->log) return;
  va_list ap;
  va_start(ap, fmt);
  sg__logv(r->log, lvl, "router", NULL, fmt, ap);
  va_end(ap);
}

static bstate *state_of(sg__route *r, const char *name) {
  for (bstate *s = r->states; s; s = s->next)
    if (strcmp(s->name, name) == 0) return s;
  bstate *s = calloc(1, sizeof *s);
  if (!s || !(s->name = strdup(name))) {
    free(s);
    return NULL;
  }
  s->next_n = s->low = 1;
  s->next = r->states;
  r->states = s;
  return s;
}

static bcount *bridge_count(sg__route *r, const char *name) {
  ment *e = smap_get(&r->bridges, name, NULL, NULL);
  if (!e) return NULL;
  if (!e->val) e->val = calloc(1, sizeof(bcount));
  return e->val;
}

/* ---- tables ------------------------------------------------------------------ */

static void free_room(void *p) {
  croom *rm = p;
  if (--rm->refs > 0) return;
  for (size_t i = 0; i < rm->n; i++) {
    target *t = &rm->t[i];
    free(t->bridge);
    free(t->dest);
    free(t->room);
    free(t->room_id);
    free(t->key);
    for (size_t k = 0; k < t->nprefix; k++) free(t->prefix[k]);
    free(t->prefix);
  }
  free(rm);
}

static void table_unref(sg__route_table *t) {
  if (!t || --t->refs > 0) return;
  sg__route *r = t->r;
  smap_free(&t->rooms, free_room);
  if (!r->closing && r->h.table_gone) r->h.table_gone(r->h.ud, t->owner);
  free(t);
}

int sg__route_table_begin(sg__route *r, void *owner, int inherit) {
  sg__route_table *t = calloc(1, sizeof *t);
  if (!t) return SG_ENOMEM;
  t->r = r;
  t->refs = 1;
  t->owner = owner;
  if (inherit && r->cur) {
    if (smap_clone(&t->rooms, &r->cur->rooms) != 0) {
      smap_free(&t->rooms, NULL);
      free(t);
      return SG_ENOMEM;
    }
    for (size_t i = 0; i < t->rooms.nb; i++)
      for (ment *e = t->rooms.b[i]; e; e = e->next)
        if (e->val) ((croom *)e->val)->refs++;
  }
  sg__route_table *old = r->cur;
  r->cur = t;
  table_unref(old);
  return 0;
}

static char *dup_or_empty(const char *s) { return strdup(s ? s : ""); }

int sg__route_table_put(sg__route *r, const char *backend, const char *room_id,
                        const sg__route_target_spec *spec, size_t n) {
  if (!r->cur) return SG_EINVAL;
  croom *rm = calloc(1, sizeof *rm + n * sizeof(target));
  if (!rm) return SG_ENOMEM;
  rm->refs = 1;
  rm->n = n;
  int bad = 0;
  for (size_t i = 0; i < n; i++) {
    const sg__route_target_spec *s = &spec[i];
    target *t = &rm->t[i];
    t->bridge = dup_or_empty(s->bridge);
    t->dest = dup_or_empty(s->dest);
    t->room = dup_or_empty(s->room);
    t->room_id = dup_or_empty(s->room_id);
    t->key = dup_or_empty(s->key);
    t->prefix = calloc(s->n_prefix ? s->n_prefix : 1, sizeof *t->prefix);
    t->nprefix = s->n_prefix;
    for (size_t k = 0; t->prefix && k < s->n_prefix; k++)
      if (s->prefix[k] && !(t->prefix[k] = strdup(s->prefix[k]))) bad = 1;
    t->max_length = s->max_length;
    t->bytes = s->bytes;
    t->first_of_bridge = s->first_of_bridge;
    t->d = state_of(r, t->dest);
    t->bc = bridge_count(r, t->bridge);
    if (!t->bridge || !t->dest || !t->room || !t->room_id || !t->key || !t->prefix || !t->d ||
        !t->bc)
      bad = 1;
  }
  ment *e = bad ? NULL : smap_get(&r->cur->rooms, backend, room_id, NULL);
  if (!e) {
    free_room(rm);
    return SG_ENOMEM;
  }
  if (e->val) free_room(e->val);
  e->val = rm;
  return 0;
}

void sg__route_table_drop(sg__route *r, const char *backend, const char *room_id) {
  if (!r->cur) return;
  croom *rm = smap_remove(&r->cur->rooms, backend, room_id);
  if (rm) free_room(rm);
}

void *sg__route_dispatching(const sg__route *r) { return r->dispatching; }

/* ---- the edits seen: two generations ------------------------------------------ */

int sg__route_edit_seen(sg__route *r, const char *backend, const char *id, int64_t *edit_time) {
  ment *e = smap_find(&r->edits, backend, id);
  if (!e) e = smap_find(&r->edits_old, backend, id);
  if (!e) return 0;
  *edit_time = e->num;
  return 1;
}

void sg__route_edit_note(sg__route *r, const char *backend, const char *id, int64_t edit_time) {
  ment *e = smap_find(&r->edits, backend, id);
  if (!e) {
    if (++r->edits_n > r->lim.edits_kept) {
      smap_free(&r->edits_old, NULL);
      r->edits_old = r->edits;
      memset(&r->edits, 0, sizeof r->edits);
      r->edits_n = 1;
    }
    e = smap_get(&r->edits, backend, id, NULL);
    if (!e) return;
  }
  e->num = edit_time;
}

/* ---- the id maps without a store (memory) --------------------------------------- */

typedef struct mcopy {
  struct mcopy *next;
  const char *backend, *id, *room;  /* in the same allocation, after it */
} mcopy;

static void free_mcopies(void *p) {
  for (mcopy *c = p, *next; c; c = next) {
    next = c->next;
    free(c);
  }
}

/* One allocation: the struct, then its strings. */
static mcopy *mcopy_new(const char *backend, const char *id, const char *room) {
  size_t lb = strlen(backend) + 1, li = strlen(id) + 1, lr = room ? strlen(room) + 1 : 0;
  mcopy *c = malloc(sizeof *c + lb + li + lr);
  if (!c) return NULL;
  char *at = (char *)(c + 1);
  c->next = NULL;
  c->backend = memcpy(at, backend, lb);
  c->id = memcpy(at + lb, id, li);
  c->room = room ? memcpy(at + lb + li, room, lr) : NULL;
  return c;
}

int sg__route_mem_put(sg__route *r, const char *ob, const char *oid, const char *cb,
                      const char *cid, const char *room) {
  ment *o = smap_get(&r->mem_origin, cb, cid, NULL);
  mcopy *origin = o && !o->val ? mcopy_new(ob, oid, NULL) : NULL;
  if (!o || (!o->val && !origin)) return SG_ENOMEM;
  if (origin) {
    o->val = origin;
  } else {  /* the memory store kept the last origin */
    mcopy *last = mcopy_new(ob, oid, NULL);
    if (!last) return SG_ENOMEM;
    free(o->val);
    o->val = last;
  }
  ment *l = smap_get(&r->mem_copies, ob, oid, NULL);
  mcopy *c = l ? mcopy_new(cb, cid, room) : NULL;
  if (!c) return SG_ENOMEM;
  mcopy **tail = (mcopy **)&l->val;
  while (*tail) tail = &(*tail)->next;
  *tail = c;
  return 0;
}

int sg__route_mem_origin(sg__route *r, const char *backend, const char *id, const char **ob,
                         const char **oid) {
  ment *o = smap_find(&r->mem_origin, backend, id);
  if (!o || !o->val) return SG_STORE_NOTFOUND;
  *ob = ((mcopy *)o->val)->backend;
  *oid = ((mcopy *)o->val)->id;
  return 0;
}

int sg__route_mem_copies(sg__route *r, const char *ob, const char *oid, sg__store_copy_cb cb,
                         void *ud) {
  ment *l = smap_find(&r->mem_copies, ob, oid);
  for (mcopy *c = l ? l->val : NULL; c; c = c->next) {
    int rc = cb(ud, c->backend, c->id, c->room);
    if (rc) return rc;
  }
  return 0;
}

void sg__route_set_memory(sg__route *r, int on) { r->memory = on; }

/* ---- flushing: the store's batch and the counters, once per loop turn --------- */

static void flush_fired(uv_timer_t *t) {
  sg__route *r = t->data;
  if (r->closing) return;
  if (r->store_dirty && r->store) {
    r->store_dirty = 0;
    if (sg__store_commit(r->store) < 0)
      rlog(r, SG_LOG_ERROR, "cannot commit the message log and id maps: %s",
           sg__store_errmsg(r->store));
  }
  if (r->counts_dirty) {
    r->counts_dirty = 0;
    if (r->h.flush) r->h.flush(r->h.ud);
  }
}

static void arm_flush(sg__route *r) {
  if (!uv_is_active((uv_handle_t *)&r->flush_timer) && !uv_is_closing((uv_handle_t *)&r->flush_timer))
    uv_timer_start(&r->flush_timer, flush_fired, 0, 0);
}

static void counted(sg__route *r) {
  r->counts_dirty = 1;
  arm_flush(r);
}

void sg__route_drain(sg__route *r, const sg__route_drain_cbs *cbs) {
  if (cbs->totals && (r->bridged || r->pauses || r->carried))
    cbs->totals(cbs->ud, r->bridged, r->pauses, r->carried);
  r->bridged = r->pauses = r->carried = 0;
  for (bstate *s = r->states; s; s = s->next) {
    if (s->c.in || s->c.sent) {
      sg__route_count c = {s->name, s->c.in, s->c.sent, NULL, NULL, NULL};
      if (cbs->backend) cbs->backend(cbs->ud, &c);
      s->c.in = s->c.sent = 0;
    }
    if (s->req_n) {
      if (cbs->requests) cbs->requests(cbs->ud, s->name, s->req_n, s->req_sum, s->req_b, r->nbounds);
      s->req_n = 0;
      s->req_sum = 0;
      memset(s->req_b, 0, sizeof s->req_b);
    }
  }
  for (size_t i = 0; i < r->bridges.nb; i++) {
    for (ment *e = r->bridges.b[i]; e; e = e->next) {
      bcount *b = e->val;
      if (!b || !b->dirty) continue;
      sg__route_count c = {e->key, b->in, b->sent, b->first_origin, b->first_dest, b->first_room};
      if (cbs->bridge) cbs->bridge(cbs->ud, &c);
      b->in = b->sent = 0;
      b->dirty = 0;
      free(b->first_origin);
      free(b->first_dest);
      free(b->first_room);
      b->first_origin = b->first_dest = b->first_room = NULL;
    }
  }
}

/* ---- flow control --------------------------------------------------------------- */

static void resume(sg__route *r, bstate *s) {
  if (!s->paused_since) return;
  s->paused_since = 0;
  sg__backend *b = r->h.find(r->h.ud, s->name);
  if (b) sg__backend_pause(b, 0);
}

static void pause_tick(uv_timer_t *t) {
  sg__route *r = t->data;
  uint64_t now = uv_now(r->loop);
  int any = 0;
  for (bstate *s = r->states; s; s = s->next) {
    if (s->paused_since && now - s->paused_since >= r->lim.pause_ms) resume(r, s);
    if (s->paused_since) any = 1;
  }
  if (!any) uv_timer_stop(&r->pause_timer);
}

/* The source of a copy to d stops being read: see router.lua. */
static void pause(sg__route *r, bstate *src, bstate *d) {
  if (src->paused_since || src->count > 0) return;
  sg__backend *b = r->h.find(r->h.ud, src->name);
  if (!b || !sg__backend_pause(b, 1)) return;
  src->paused_since = uv_now(r->loop);
  if (!src->paused_since) src->paused_since = 1;
  r->pauses++;
  counted(r);
  size_t i = 0;
  while (i < d->nsources && d->sources[i] != src) i++;
  if (i == d->nsources) {
    if (d->nsources == d->capsources) {
      size_t cap = d->capsources ? d->capsources * 2 : 4;
      bstate **ns = realloc(d->sources, cap * sizeof *ns);
      if (ns) {
        d->sources = ns;
        d->capsources = cap;
      }
    }
    if (d->nsources < d->capsources) d->sources[d->nsources++] = src;
  }
  if (!uv_is_active((uv_handle_t *)&r->pause_timer) && !uv_is_closing((uv_handle_t *)&r->pause_timer)) {
    uint64_t every = r->lim.pause_ms / 4 + 1;
    uv_timer_start(&r->pause_timer, pause_tick, every, every);
  }
}

/* ---- copies in flight ------------------------------------------------------------ */

static int live_mark(bstate *d, uint64_t n) {
  if (n - d->low >= d->cap) {
    uint64_t cap = d->cap ? d->cap : 64;
    while (n - d->low >= cap) cap *= 2;
    uint8_t *ring = calloc(cap, 1);
    if (!ring) return -1;
    for (uint64_t k = d->low; k < n && d->cap; k++) ring[k & (cap - 1)] = d->live[k & (d->cap - 1)];
    free(d->live);
    d->live = ring;
    d->cap = cap;
  }
  d->live[n & (d->cap - 1)] = 1;
  return 0;
}

static uint64_t begin(sg__route *r, bstate *src, bstate *d) {
  uint64_t n = d->next_n;
  if (d->count == 0) d->low = n;
  if (live_mark(d, n) != 0) return 0;
  d->next_n = n + 1;
  d->count++;
  if (d->paused_since) resume(r, d);
  if (src && d->count >= r->lim.pause_at && src != d) pause(r, src, d);
  return n;
}

static void dispatch(sg__route *r, bstate *s, sg__backend *b, cJSON *u, sg__route_table *t);

/* Copy n to d completed: the oldest number that may be in flight moves on,
 * sources resume below half of PAUSE_AT, and the updates of d that waited
 * only for sends that are done now are handled, in order. */
static void release(sg__route *r, bstate *d, uint64_t n) {
  if (n < d->low || n >= d->next_n || !d->live[n & (d->cap - 1)]) return;
  d->live[n & (d->cap - 1)] = 0;
  d->count--;
  while (d->low < d->next_n && !d->live[d->low & (d->cap - 1)]) d->low++;
  if (d->nsources && d->count <= r->lim.pause_at / 2) {
    for (size_t i = 0; i < d->nsources; i++) resume(r, d->sources[i]);
    d->nsources = 0;
  }
  if (d->releasing) return;
  d->releasing = 1;
  while (d->hhead && d->hhead->after < d->low && !r->closing) {
    held *h = d->hhead;
    d->hhead = h->next;
    if (!d->hhead) d->htail = NULL;
    d->nheld--;
    sg__backend *b = r->h.find(r->h.ud, d->name);
    if (b) dispatch(r, d, b, h->update, h->table);
    cJSON_Delete(h->update);
    table_unref(h->table);
    free(h);
  }
  d->releasing = 0;
}

uint64_t sg__route_send_begin(sg__route *r, const char *origin, const char *dest,
                              uint64_t *count) {
  bstate *d = state_of(r, dest), *src = origin ? state_of(r, origin) : NULL;
  if (!d) return 0;
  if (count) *count = d->count;
  if (d->count >= r->lim.max_in_flight) return 0;
  return begin(r, src, d);
}

void sg__route_send_end(sg__route *r, const char *dest, uint64_t n) {
  bstate *d = state_of(r, dest);
  if (d) release(r, d, n);
}

void sg__route_in_flight(sg__route *r, const char *dest, uint64_t *count, uint64_t *nheld) {
  bstate *d = state_of(r, dest);
  *count = d ? d->count : 0;
  *nheld = d ? d->nheld : 0;
}

/* ---- the compiled path ------------------------------------------------------------- */

static const char *str_field(const cJSON *o, const char *k) {
  return cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(o, k));
}

static size_t units(const char *s, int bytes) {
  if (bytes) return strlen(s);
  size_t n = 0;
  for (; *s; s++) n += ((unsigned char)*s & 0xC0) != 0x80;
  return n;
}

/* A growing buffer of JSON text. */
typedef struct jbuf {
  char *s;
  size_t len, cap;
  int failed;
} jbuf;

static void jb_reserve(jbuf *b, size_t more) {
  if (b->failed || b->len + more <= b->cap) return;
  size_t cap = b->cap ? b->cap : 256;
  while (cap < b->len + more) cap *= 2;
  char *s = realloc(b->s, cap);
  if (!s) {
    b->failed = 1;
    return;
  }
  b->s = s;
  b->cap = cap;
}

static void jb_raw(jbuf *b, const char *s, size_t n) {
  jb_reserve(b, n);
  if (b->failed) return;
  memcpy(b->s + b->len, s, n);
  b->len += n;
}

#define JB_LIT(b, lit) jb_raw(b, lit, sizeof lit - 1)

/* The characters of a JSON string, escaped as cJSON prints them (UTF-8
 * passes as it is). */
static void jb_chars(jbuf *b, const char *s) {
  static const char hex[] = "0123456789abcdef";
  const char *run = s;
  for (; *s; s++) {
    unsigned char c = (unsigned char)*s;
    if (c >= 0x20 && c != '"' && c != '\\') continue;
    jb_raw(b, run, (size_t)(s - run));
    char esc[6] = {'\\', 0};
    size_t n = 2;
    switch (c) {
    case '"': esc[1] = '"'; break;
    case '\\': esc[1] = '\\'; break;
    case '\b': esc[1] = 'b'; break;
    case '\f': esc[1] = 'f'; break;
    case '\n': esc[1] = 'n'; break;
    case '\r': esc[1] = 'r'; break;
    case '\t': esc[1] = 't'; break;
    default:
      memcpy(esc, "\\u00", 4);
      esc[4] = hex[c >> 4];
      esc[5] = hex[c & 15];
      n = 6;
    }
    jb_raw(b, esc, n);
    run = s + 1;
  }
  jb_raw(b, run, (size_t)(s - run));
}

static void jb_str(jbuf *b, const char *s) {
  JB_LIT(b, "\"");
  jb_chars(b, s);
  JB_LIT(b, "\"");
}

/* The MessageSend of a copy, as the router makes it: Concat [Text prefix,
 * Text text], extra.segue_origin; fields in the codec's order. */
static char *copy_body(const target *tg, const char *origin, const char *id, const char *sender,
                       const char *text, size_t *len) {
  jbuf b = {0};
  jb_reserve(&b, 256 + strlen(text));
  JB_LIT(&b, "{\"type\":\"MessageSend\",\"value\":{\"recipient\":");
  jb_str(&b, tg->room_id);
  JB_LIT(&b, ",\"attachments\":[],\"content\":{\"type\":\"Concat\",\"value\":[{\"type\":\"Text\",\"value\":\"");
  for (size_t k = 0; k < tg->nprefix; k++) jb_chars(&b, tg->prefix[k] ? tg->prefix[k] : sender);
  JB_LIT(&b, "\"},{\"type\":\"Text\",\"value\":");
  jb_str(&b, text);
  JB_LIT(&b, "}]},\"extra\":{\"segue_origin\":{\"backend\":");
  jb_str(&b, origin);
  JB_LIT(&b, ",\"id\":");
  jb_str(&b, id);
  JB_LIT(&b, "}}}}");
  if (b.failed) {
    free(b.s);
    return NULL;
  }
  *len = b.len;
  return b.s;
}

static void copy_done(void *ud, int err, const cJSON *body, const char *msg);

static void copy_failed(sg__route *r, const target *tg, const char *origin, const char *id,
                        int err, const char *msg, uint64_t t0) {
  if (r->closing || !r->h.copy_failed) return;
  char text[768];
  snprintf(text, sizeof text, "%s: %s", sg_err_name(err), msg ? msg : sg_strerror(err));
  sg__route_failure f = {tg->bridge, origin, id, tg->dest, tg->room, tg->key,
                         sg_err_name(err), text, t0};
  r->h.copy_failed(r->h.ud, &f);
}

static void send_copy(sg__route *r, sg__route_table *t, bstate *src, const target *tg,
                      const char *id, const char *sender, const char *text) {
  bstate *d = tg->d;
  if (d->count >= r->lim.max_in_flight) {
    char why[256];
    snprintf(why, sizeof why, "%llu copies are in flight to %s already",
             (unsigned long long)d->count, tg->dest);
    if (r->h.lost) r->h.lost(r->h.ud, "overloaded", tg->key, id, why);
    return;
  }
  uint64_t n = begin(r, src, d);
  uint64_t t0 = uv_hrtime();
  size_t idlen = strlen(id), blen = 0;
  copy *c = malloc(sizeof *c + idlen + 1);
  char *body = c && n ? copy_body(tg, src->name, id, sender, text, &blen) : NULL;
  if (!body) {
    free(c);
    copy_failed(r, tg, src->name, id, SG_ENOMEM, "out of memory", t0);
    if (n) release(r, d, n);
    return;
  }
  c->r = r;
  c->t = t;
  c->tg = tg;
  c->src = src;
  c->d = d;
  c->n = n;
  c->t0 = t0;
  memcpy(c->id, id, idlen + 1);
  sg__backend *b = r->h.find(r->h.ud, tg->dest);
  char err[512];
  int rc;
  if (!b) {
    free(body);
    snprintf(err, sizeof err, "no backend named '%s'", tg->dest);
    rc = SG_ENOBACKEND;
  } else {
    t->refs++;
    r->live_copies++;
    rc = sg__backend_request_text(b, "MessageSend", body, blen, copy_done, c, err, sizeof err);
    if (rc != 0) {
      t->refs--;
      r->live_copies--;
    }
  }
  if (rc != 0) {
    free(c);
    copy_failed(r, tg, src->name, id, rc, err, t0);
    release(r, d, n);
  }
}

static void maybe_free(sg__route *r);

static void copy_done(void *ud, int err, const cJSON *body, const char *msg) {
  copy *c = ud;
  sg__route *r = c->r;
  const target *tg = c->tg;
  if (!r->closing) {
    if (err == 0) {
      r->bridged++;
      bstate *d = c->d;
      d->c.sent++;
      bcount *bc = tg->bc;
      if (bc->sent_total++ == 0 && !bc->first_origin) {
        bc->first_origin = strdup(c->src->name);
        bc->first_dest = strdup(tg->dest);
        bc->first_room = strdup(tg->room);
      }
      bc->sent++;
      bc->dirty = 1;
      double dt = (double)(uv_hrtime() - c->t0) / 1e9;
      d->req_n++;
      d->req_sum += dt;
      for (size_t i = 0; i < r->nbounds; i++)
        if (dt <= r->bounds[i]) d->req_b[i]++;
      const char *copy_id = str_field(body, "value");
      if (!r->store && r->memory) {
        if (sg__route_mem_put(r, c->src->name, c->id, tg->dest, copy_id ? copy_id : "", tg->room) < 0)
          rlog(r, SG_LOG_ERROR, "cannot record a copy: out of memory");
      } else if (r->store) {
        sg__store_batch(r->store);
        r->store_dirty = 1;
        if (sg__store_map_put(r->store, c->src->name, c->id, tg->dest, copy_id ? copy_id : "",
                              tg->room) < 0)
          rlog(r, SG_LOG_ERROR, "cannot record a copy: %s", sg__store_errmsg(r->store));
      }
      counted(r);
    } else {
      copy_failed(r, tg, c->src->name, c->id, err, msg, c->t0);
    }
    release(r, c->d, c->n);
  }
  table_unref(c->t);
  free(c);
  r->live_copies--;
  if (r->closing) maybe_free(r);
}

static int any_copy(void *ud, const char *backend, const char *id, const char *copy_room) {
  (void)backend, (void)id, (void)copy_room;
  *(int *)ud = 1;
  return 1;
}

/* mapped_copy: what sg__store_map_known said of (backend, id) in this batch
 * (0: no copy, so there is no origin for the log to look up). */
static void log_message(sg__route *r, const char *backend, const char *id, const char *room,
                        const char *sender, const cJSON *content, const cJSON *m,
                        int mapped_copy) {
  char *cj = cJSON_PrintUnformatted(content);
  sg__store_batch(r->store);
  r->store_dirty = 1;
  arm_flush(r);
  int64_t created = (int64_t)cJSON_GetNumberValue(cJSON_GetObjectItemCaseSensitive(m, "create_time"));
  int64_t edited = (int64_t)cJSON_GetNumberValue(cJSON_GetObjectItemCaseSensitive(m, "edit_time"));
  if (mapped_copy)
    sg__store_log_message(r->store, backend, id, room, sender, cj, created, edited);
  else
    sg__store_log_message_no_copy(r->store, backend, id, room, sender, cj, created, edited);
  cJSON_free(cj);
}

/* A plain message of a compiled room, as router.lua's on_upsert and deliver
 * would carry it; 0 when it is for Lua (before anything was done). */
static int fast(sg__route *r, bstate *s, sg__backend *b, const cJSON *u, sg__route_table *t) {
  if (!t || !r->enabled || !(r->store || r->memory) || r->closing) return 0;
  const char *type = str_field(u, "type");
  if (!type || strcmp(type, "MessageUpsert") != 0) return 0;
  const cJSON *m = cJSON_GetObjectItemCaseSensitive(u, "value");
  const char *id = str_field(m, "id"), *sender = str_field(m, "sender");
  const char *recipient = str_field(m, "recipient");
  const cJSON *atts = cJSON_GetObjectItemCaseSensitive(m, "attachments");
  const cJSON *content = cJSON_GetObjectItemCaseSensitive(m, "content");
  if (!id || !sender || !recipient || !atts || atts->child || !content) return 0;
  ment *e = smap_find(&t->rooms, b->name, recipient);
  if (!e) return 0;
  croom *rm = e->val;
  const char *ctype = str_field(content, "type"), *text = str_field(content, "value");
  if (!ctype || strcmp(ctype, "Text") != 0 || !text) return 0;
  size_t tchars = (size_t)-1, tbytes = (size_t)-1;
  for (size_t i = 0; i < rm->n; i++) {
    const target *tg = &rm->t[i];
    if (!tg->max_length) continue;
    size_t plen = 0;
    for (size_t k = 0; k < tg->nprefix; k++) plen += units(tg->prefix[k] ? tg->prefix[k] : sender, tg->bytes);
    size_t *tl = tg->bytes ? &tbytes : &tchars;
    if (*tl == (size_t)-1) *tl = units(text, tg->bytes);
    if (plen + *tl > tg->max_length) return 0;
  }
  const cJSON *extra = cJSON_GetObjectItemCaseSensitive(m, "extra");
  const cJSON *so = cJSON_IsObject(extra) ? cJSON_GetObjectItemCaseSensitive(extra, "segue_origin") : NULL;
  int is_copy = so && !cJSON_IsNull(so) && !cJSON_IsFalse(so);
  sg__store *st = r->store;
  int mapped_copy = 0, has = 0;
  if (st) {  /* a copy? copied before (a replay)? one statement */
    if (sg__store_map_known(st, b->name, id, &mapped_copy, &has) < 0) return 0;
  } else if (!is_copy) {
    const char *ob, *oi;
    mapped_copy = sg__route_mem_origin(r, b->name, id, &ob, &oi) == 0;
  }
  is_copy = is_copy || mapped_copy;
  int64_t seen;
  if (!is_copy) {
    if (sg__route_edit_seen(r, b->name, id, &seen)) return 0;
    if (!st && sg__route_mem_copies(r, b->name, id, any_copy, &has) < 0) return 0;
    if (has) return 0;
  }
  if (!st) {  /* no store: nothing is logged */
    if (is_copy) return 1;
  } else {
    log_message(r, b->name, id, recipient, sender, content, m, mapped_copy);
    if (is_copy) return 1;
  }
  sg__route_edit_note(r, b->name, id,
                      (int64_t)cJSON_GetNumberValue(cJSON_GetObjectItemCaseSensitive(m, "edit_time")));
  s->c.in++;
  r->carried++;
  counted(r);
  /* The room's targets may change while copies go out (a held update
   * handled inside a failure): the table holds the room. */
  t->refs++;
  for (size_t i = 0; i < rm->n; i++) {
    const target *tg = &rm->t[i];
    if (tg->first_of_bridge) {
      tg->bc->in++;
      tg->bc->dirty = 1;
    }
    send_copy(r, t, s, tg, id, sender, text);
  }
  table_unref(t);
  return 1;
}

static void dispatch(sg__route *r, bstate *s, sg__backend *b, cJSON *u, sg__route_table *t) {
  if (fast(r, s, b, u, t)) return;
  if (r->closing || !b->ev || !b->ev->on_update) return;
  void *prev = r->dispatching;
  r->dispatching = t ? t->owner : NULL;
  b->ev->on_update(b, u);
  r->dispatching = prev;
}

int sg__route_update(void *route, sg__backend *b, cJSON *u) {
  sg__route *r = route;
  bstate *s = r->closing ? NULL : state_of(r, b->name);
  if (!s) {
    if (b->ev && b->ev->on_update) b->ev->on_update(b, u);
    return 0;
  }
  if (s->count > 0 || s->hhead) {
    /* Our own sends to this backend are in flight: their echoes may arrive
     * before the ids we need to recognise them; wait for those ids. */
    if (s->nheld >= r->lim.max_held) {
      const cJSON *v = cJSON_GetObjectItemCaseSensitive(u, "value");
      const char *id = cJSON_IsObject(v) ? str_field(v, "id") : NULL;
      char what[512], why[256];
      snprintf(what, sizeof what, "%s:%s", b->name, id ? id : "?");
      snprintf(why, sizeof why, "%llu updates of %s wait for sends to it already",
               (unsigned long long)r->lim.max_held, b->name);
      if (r->h.lost) r->h.lost(r->h.ud, "held", b->name, what, why);
      return 0;
    }
    held *h = malloc(sizeof *h);
    if (!h) {
      dispatch(r, s, b, u, r->cur);
      return 0;
    }
    h->next = NULL;
    h->update = u;
    h->after = s->next_n - 1;
    h->table = r->cur;
    if (h->table) h->table->refs++;
    if (s->htail) s->htail->next = h;
    else s->hhead = h;
    s->htail = h;
    s->nheld++;
    return 1;
  }
  dispatch(r, s, b, u, r->cur);
  return 0;
}

void sg__route_attach(sg__route *r, sg__backend *b) {
  b->tap = sg__route_update;
  b->tap_data = r;
}

/* ---- life ----------------------------------------------------------------------- */

int sg__route_new(uv_loop_t *loop, const sg__route_hooks *hooks, const sg__logger *log,
                  sg__route **out) {
  sg__route *r = calloc(1, sizeof *r);
  if (!r) return SG_ENOMEM;
  r->loop = loop;
  r->h = *hooks;
  r->log = log;
  r->lim = (sg__route_limits){10000, 100000, 2000, 1000, 10000};
  uv_timer_init(loop, &r->flush_timer);
  uv_timer_init(loop, &r->pause_timer);
  r->flush_timer.data = r->pause_timer.data = r;
  r->open_handles = 2;
  *out = r;
  return 0;
}

void sg__route_set_limits(sg__route *r, const sg__route_limits *l) { r->lim = *l; }

void sg__route_set_buckets(sg__route *r, const double *bounds, size_t n) {
  if (n > 32) n = 32;
  memcpy(r->bounds, bounds, n * sizeof *bounds);
  r->nbounds = n;
}

void sg__route_set_store(sg__route *r, sg__store *s) {
  if (r->store && r->store_dirty) {
    sg__store_commit(r->store);
    r->store_dirty = 0;
  }
  r->store = s && !sg__store_is_async(s) ? s : NULL;
}

void sg__route_enable(sg__route *r, int on) { r->enabled = on; }

static void free_everything(sg__route *r) {
  for (bstate *s = r->states, *next; s; s = next) {
    next = s->next;
    for (held *h = s->hhead, *hn; h; h = hn) {
      hn = h->next;
      cJSON_Delete(h->update);
      table_unref(h->table);
      free(h);
    }
    free(s->live);
    free(s->sources);
    free(s->name);
    free(s);
  }
  r->states = NULL;
}

static void free_bcount(void *p) {
  bcount *b = p;
  free(b->first_origin);
  free(b->first_dest);
  free(b->first_room);
  free(b);
}

static void maybe_free(sg__route *r) {
  if (r->open_handles > 0 || r->live_copies > 0) return;
  smap_free(&r->bridges, free_bcount);
  smap_free(&r->mem_origin, free_mcopies);
  smap_free(&r->mem_copies, free_mcopies);
  free(r);
}

static void handle_closed(uv_handle_t *h) {
  sg__route *r = h->data;
  r->open_handles--;
  maybe_free(r);
}

void sg__route_close(sg__route *r) {
  if (!r || r->closing) return;
  r->closing = 1;
  /* The store may be gone already (the Lua state closes its objects in any
   * order); closing it commits its open batch. */
  r->store = NULL;
  free_everything(r);
  sg__route_table *t = r->cur;
  r->cur = NULL;
  table_unref(t);
  smap_free(&r->edits, NULL);
  smap_free(&r->edits_old, NULL);
  uv_close((uv_handle_t *)&r->flush_timer, handle_closed);
  uv_close((uv_handle_t *)&r->pause_timer, handle_closed);
}
