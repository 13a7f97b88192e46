/* The backend protocol session, shared by every transport (see backend.h). */
#include "backend.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { REQ_QUEUED = 1, REQ_INFLIGHT, REQ_RETRY_WAIT, REQ_DONE };

struct sg__request {
  sg__backend *b;
  cJSON *body;            /* owned RequestBody, or NULL while `text` holds it */
  char *text;             /* owned JSON text of a RequestBody made by segue (request_text) */
  size_t text_len;
  const char *type;       /* body's variant, inside body */
  const char *expect;     /* the answering ResponseBody variant */
  uint32_t seq;
  int tries;
  int where;
  size_t weight;          /* about the bytes of its line (queue accounting) */
  int timed;              /* in the backend's time-out list */
  uint64_t due;           /* loop time of the time-out, or of the retry */
  sg__request_cb cb;
  void *ud;
  sg__request *next;       /* queue link, or bucket chain */
  sg__request *tprev, *tnext;  /* the time-out list */
};

static const char *const state_names[] = {"stopped", "starting", "running",
                                          "backoff", "stopping", "failed"};

const char *sg__backend_state_name(sg__backend_state s) {
  return (unsigned)s < sizeof state_names / sizeof *state_names ? state_names[s] : "?";
}

void sg__backend_config_defaults(sg__backend_config *c) {
  memset(c, 0, sizeof *c);
  c->init_timeout_ms = 10000;
  c->request_timeout_ms = 30000;
  c->stop_grace_ms = 5000;
  c->backoff_initial_ms = 100;
  c->backoff_max_doublings = 10;
  c->retry_max_tries = 10;
  c->retry_initial_ms = 100;
  c->max_value_bytes = SG_FL_DEFAULT_MAX_VALUE;
  c->max_queue_bytes = (size_t)16 << 20;
  c->limits.max_depth = SG_FL_DEFAULT_MAX_DEPTH;
  c->limits.max_attachment_bytes = SG_FL_DEFAULT_MAX_ATTACHMENT;
}

void sg__backend_log(const sg__backend *b, sg_log_level lvl, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  sg__logv(b->log, lvl, "backend", b->name, fmt, ap);
  va_end(ap);
}

static void set_state(sg__backend *b, sg__backend_state s, const char *reason) {
  if (b->state == s) return;
  b->state = s;
  if (b->ev && b->ev->on_state) b->ev->on_state(b, s, reason);
}

/* ---- the in-flight table: sequence number -> request --------------------- */

static sg__request **bucket_of(sg__backend *b, uint32_t seq) {
  return &b->buckets[(seq * 2654435761u) & (b->nbuckets - 1)];
}

static sg__request *inflight_find(sg__backend *b, uint32_t seq) {
  for (sg__request *r = *bucket_of(b, seq); r; r = r->next)
    if (r->seq == seq) return r;
  return NULL;
}

static int inflight_grow(sg__backend *b) {
  uint32_t n = b->nbuckets ? b->nbuckets * 2 : 64;
  sg__request **nb = calloc(n, sizeof *nb);
  if (!nb) return SG_ENOMEM;
  sg__request **old = b->buckets;
  uint32_t oldn = b->nbuckets;
  b->buckets = nb;
  b->nbuckets = n;
  for (uint32_t i = 0; i < oldn; i++) {
    for (sg__request *r = old[i], *next; r; r = next) {
      next = r->next;
      sg__request **slot = bucket_of(b, r->seq);
      r->next = *slot;
      *slot = r;
    }
  }
  free(old);
  return 0;
}

int sg__backend_in_flight(sg__backend *b, uint32_t seq) {
  return b->nbuckets > 0 && inflight_find(b, seq) != NULL;
}

static void inflight_remove(sg__backend *b, sg__request *req) {
  for (sg__request **p = bucket_of(b, req->seq); *p; p = &(*p)->next) {
    if (*p == req) {
      *p = req->next;
      req->next = NULL;
      b->inflight--;
      return;
    }
  }
}

/* The next free sequence number: wraps at 2^32 and skips any in flight. */
static uint32_t next_seq(sg__backend *b) {
  while (inflight_find(b, b->next_seq)) b->next_seq++;
  return b->next_seq++;
}

/* ---- request lists: waiting for the backend to run, or for a retry -------- */

static void list_push(struct sg__reqlist *l, sg__request *req) {
  req->next = NULL;
  if (l->tail) l->tail->next = req;
  else l->head = req;
  l->tail = req;
}

static void list_remove(struct sg__reqlist *l, sg__request *req) {
  sg__request *prev = NULL;
  for (sg__request *r = l->head; r; prev = r, r = r->next) {
    if (r != req) continue;
    if (prev) prev->next = r->next;
    else l->head = r->next;
    if (l->tail == r) l->tail = prev;
    r->next = NULL;
    return;
  }
}

static sg__request *list_take(struct sg__reqlist *l) {
  sg__request *all = l->head;
  l->head = l->tail = NULL;
  return all;
}

/* `queue` with its weight kept in b->queue_bytes. */
static void queue_remove(sg__backend *b, sg__request *req) {
  list_remove(&b->queue, req);
  b->queue_bytes -= req->weight;
}

static sg__request *queue_take(sg__backend *b) {
  b->queue_bytes = 0;
  return list_take(&b->queue);
}

/* About the bytes of v's JSON text: strings and keys, plus a little per
 * value. Recursion is bounded by the validated depth. */
static size_t json_weight(const cJSON *v) {
  size_t w = 8 + (v->string ? strlen(v->string) : 0);
  if (cJSON_IsString(v) && v->valuestring) w += strlen(v->valuestring);
  for (const cJSON *c = v->child; c; c = c->next) w += json_weight(c);
  return w;
}

/* ---- time-outs: one timer per backend ------------------------------------ *
 * Every request queued or in flight waits the same request_timeout_ms, so
 * appending at the tail keeps the time-out list ordered by due time; the
 * retrying list is kept ordered by its (shorter, varying) backoff. One timer
 * per backend fires for the earliest of both heads. */

static void deadline_fired(uv_timer_t *t);

static void timed_remove(sg__backend *b, sg__request *req) {
  if (!req->timed) return;
  if (req->tprev) req->tprev->tnext = req->tnext;
  else b->timed.head = req->tnext;
  if (req->tnext) req->tnext->tprev = req->tprev;
  else b->timed.tail = req->tprev;
  req->tprev = req->tnext = NULL;
  req->timed = 0;
}

static void timed_append(sg__backend *b, sg__request *req) {
  timed_remove(b, req);
  req->due = uv_now(b->loop) + b->cfg.request_timeout_ms;
  req->tprev = b->timed.tail;
  req->tnext = NULL;
  if (b->timed.tail) b->timed.tail->tnext = req;
  else b->timed.head = req;
  b->timed.tail = req;
  req->timed = 1;
}

/* Starts the timer for the earliest due time, unless it fires before that
 * already (then it re-arms when it fires). */
static void arm(sg__backend *b) {
  uint64_t due = UINT64_MAX;
  if (b->timed.head) due = b->timed.head->due;
  if (b->retrying.head && b->retrying.head->due < due) due = b->retrying.head->due;
  if (uv_is_closing((uv_handle_t *)&b->deadline)) return;
  if (due == UINT64_MAX) {
    if (b->deadline_armed) uv_timer_stop(&b->deadline);
    b->deadline_armed = 0;
    return;
  }
  if (b->deadline_armed && b->deadline_due <= due) return;
  uint64_t now = uv_now(b->loop);
  uv_timer_start(&b->deadline, deadline_fired, due > now ? due - now : 0, 0);
  b->deadline_armed = 1;
  b->deadline_due = due;
}

/* ---- completion ----------------------------------------------------------- */

static void detach(sg__request *req) {
  sg__backend *b = req->b;
  if (req->where == REQ_INFLIGHT) inflight_remove(b, req);
  else if (req->where == REQ_QUEUED) queue_remove(b, req);
  else if (req->where == REQ_RETRY_WAIT) list_remove(&b->retrying, req);
  timed_remove(b, req);
  req->where = REQ_DONE;
}

static void release_request(sg__request *req) {
  cJSON_Delete(req->body);
  free(req->text);
  free(req);
}

/* Hands the outcome to the caller once, then releases the request. */
static void complete(sg__request *req, int err, const cJSON *body, const char *msg) {
  detach(req);
  if (req->cb) req->cb(req->ud, err, body, msg);
  release_request(req);
}

static void fail_list(sg__backend *b, sg__request *list, int err, const char *msg) {
  while (list) {
    sg__request *next = list->next;
    timed_remove(b, list);
    list->where = REQ_DONE;
    list->next = NULL;
    if (list->cb) list->cb(list->ud, err, NULL, msg);
    release_request(list);
    list = next;
  }
}

/* Detaches every in-flight request first: callbacks may make new requests. */
static void fail_inflight(sg__backend *b, int err, const char *msg) {
  sg__request *list = NULL;
  for (uint32_t i = 0; i < b->nbuckets; i++) {
    for (sg__request *r = b->buckets[i], *next; r; r = next) {
      next = r->next;
      r->next = list;
      list = r;
    }
    b->buckets[i] = NULL;
  }
  b->inflight = 0;
  fail_list(b, list, err, msg);
}

/* Requests waiting for a start or a retry fail only when the backend is
 * gone for good; a restart sends them. */
static void fail_waiting(sg__backend *b, int err, const char *msg) {
  fail_list(b, queue_take(b), err, msg);
  fail_list(b, list_take(&b->retrying), err, msg);
}

/* ---- sending -------------------------------------------------------------- */

static void transmit(sg__backend *b, sg__request *req) {
  if (b->nbuckets == 0 || b->inflight >= b->nbuckets) {
    if (inflight_grow(b) != 0) {
      complete(req, SG_ENOMEM, NULL, "out of memory");
      return;
    }
  }
  req->seq = next_seq(b);
  sg__request **slot = bucket_of(b, req->seq);
  req->next = *slot;
  *slot = req;
  b->inflight++;
  req->where = REQ_INFLIGHT;
  req->tries++;
  timed_append(b, req);

  int rc = SG_ENOMEM;
  if (req->text && !b->tp->send_text) {
    /* A transport that takes values: the text becomes one, once. */
    req->body = cJSON_ParseWithLength(req->text, req->text_len);
    free(req->text);
    req->text = NULL;
  }
  if (req->text) {
    rc = b->tp->send_text(b, req->seq, req->text, req->text_len);
  } else if (req->body) {
    cJSON *msg = cJSON_CreateObject();
    if (msg && cJSON_AddNumberToObject(msg, "sequence_number", req->seq) &&
        cJSON_AddItemReferenceToObject(msg, "body", req->body))
      rc = b->tp->send(b, msg);
    cJSON_Delete(msg);
  }
  if (rc == SG_ELIMIT) {
    char why[256];
    snprintf(why, sizeof why, "backend %s's queue is full (max_queue_bytes = %zu)", b->name,
             b->cfg.max_queue_bytes);
    complete(req, SG_ELIMIT, NULL, why);
  } else if (rc != 0) {
    sg__backend_violation(b, "cannot write to the backend");
  }
}

static void flush_queue(sg__backend *b) {
  int sent = 0;
  while (b->queue.head && b->state == SG_BACKEND_RUNNING) {
    sg__request *req = b->queue.head;
    queue_remove(b, req);
    transmit(b, req);
    sent = 1;
  }
  /* The time-out counts from the transmission, as the timer is started
   * now: a time-out due at the same millisecond as a timer started later
   * (the child's end of stdout) still fires first. */
  if (sent && !b->closing) {
    b->deadline_armed = 0;
    arm(b);
  }
}

static void kick_fired(uv_timer_t *t) { flush_queue(t->data); }

/* Requests always wait for the next loop turn: a backend in the same process
 * may answer inside send, and the caller must hear back only after its
 * request call returned. Requests made in one turn go out together. */
static void send_or_queue(sg__backend *b, sg__request *req) {
  list_push(&b->queue, req);
  b->queue_bytes += req->weight;
  req->where = REQ_QUEUED;
  timed_append(b, req);
  arm(b);
  if (b->state == SG_BACKEND_RUNNING && !uv_is_active((uv_handle_t *)&b->kick))
    uv_timer_start(&b->kick, kick_fired, 0, 0);
}

static void timed_out(sg__backend *b, sg__request *req) {
  char msg[256];
  snprintf(msg, sizeof msg, "%s request to backend %s timed out after %llu ms%s",
           req->type, b->name, (unsigned long long)b->cfg.request_timeout_ms,
           req->where == REQ_QUEUED ? " waiting for the backend to start" : "");
  sg__backend_log(b, SG_LOG_WARN, "%s", msg);
  int was_sent = req->where == REQ_INFLIGHT;
  complete(req, SG_ETIMEDOUT, NULL, msg);
  /* Its line may still wait in the transport (a backend not reading). */
  if (was_sent && b->tp->drop_stale) b->tp->drop_stale(b);
}

size_t sg__backend_waiting_bytes(sg__backend *b) {
  return b->queue_bytes + (b->tp->queued_bytes ? b->tp->queued_bytes(b) : 0);
}

static void deadline_fired(uv_timer_t *t) {
  sg__backend *b = t->data;
  uint64_t now = uv_now(b->loop);
  b->deadline_armed = 0;
  sg__request *req;
  while ((req = b->retrying.head) && req->due <= now) {
    list_remove(&b->retrying, req);
    send_or_queue(b, req);
  }
  /* Requests made by the callbacks are due later than now: this ends. */
  while ((req = b->timed.head) && req->due <= now) timed_out(b, req);
  arm(b);
}

/* The backend is gone for good (or closing): SG_EDEAD, else 0. */
static int not_running(sg__backend *b, char *err, size_t errlen) {
  if (b->closing || b->state == SG_BACKEND_FAILED ||
      (b->state == SG_BACKEND_STOPPED && b->stop_for_good) ||
      (b->state == SG_BACKEND_STOPPING && b->stop_for_good)) {
    snprintf(err, errlen, "backend %s is not running (%s)", b->name,
             sg__backend_state_name(b->state));
    return SG_EDEAD;
  }
  return 0;
}

/* Fail fast rather than hold without bound what a backend does not read. */
static int queue_full(sg__backend *b, size_t weight, char *err, size_t errlen) {
  size_t waiting = sg__backend_waiting_bytes(b);
  if (waiting > 0 && waiting + weight > b->cfg.max_queue_bytes) {
    snprintf(err, errlen, "backend %s's queue is full: %zu bytes wait to be read (max_queue_bytes = %zu)",
             b->name, waiting, b->cfg.max_queue_bytes);
    return SG_ELIMIT;
  }
  return 0;
}

int sg__backend_request_owned(sg__backend *b, cJSON *body, sg__request_cb cb, void *ud,
                              char *err, size_t errlen) {
  int rc = not_running(b, err, errlen);
  if (!rc) rc = sg__fl_validate(body, SG_FL_REQUEST_BODY, &b->cfg.limits, err, errlen);
  size_t weight = rc ? 0 : json_weight(body);
  if (!rc) rc = queue_full(b, weight, err, errlen);
  if (rc != 0) {
    cJSON_Delete(body);
    return rc;
  }
  sg__request *req = calloc(1, sizeof *req);
  if (!req) {
    cJSON_Delete(body);
    snprintf(err, errlen, "out of memory");
    return SG_ENOMEM;
  }
  req->b = b;
  req->body = body;
  req->type = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(body, "type"));
  req->expect = sg__fl_expected_response(req->type);
  req->cb = cb;
  req->ud = ud;
  req->weight = weight;
  send_or_queue(b, req);
  return 0;
}

int sg__backend_request_text(sg__backend *b, const char *type, char *text, size_t len,
                             sg__request_cb cb, void *ud, char *err, size_t errlen) {
  int rc = not_running(b, err, errlen);
  if (!rc) rc = queue_full(b, len + 8, err, errlen);
  sg__request *req = rc ? NULL : calloc(1, sizeof *req);
  if (!req) {
    free(text);
    if (!rc) snprintf(err, errlen, "out of memory");
    return rc ? rc : SG_ENOMEM;
  }
  req->b = b;
  req->text = text;
  req->text_len = len;
  req->type = type;
  req->expect = sg__fl_expected_response(type);
  req->cb = cb;
  req->ud = ud;
  req->weight = len + 8;
  send_or_queue(b, req);
  return 0;
}

int sg__backend_request(sg__backend *b, const cJSON *body, sg__request_cb cb,
                        void *ud, char *err, size_t errlen) {
  cJSON *copy = cJSON_Duplicate(body, 1);
  if (!copy) {
    snprintf(err, errlen, "out of memory");
    return SG_ENOMEM;
  }
  return sg__backend_request_owned(b, copy, cb, ud, err, errlen);
}

int sg__backend_pause(sg__backend *b, int paused) {
  if (!b->tp->pause) return 0;
  b->tp->pause(b, paused);
  return 1;
}

/* ---- what the backend sends ----------------------------------------------- */

static void on_error_response(sg__backend *b, sg__request *req, const cJSON *body) {
  const cJSON *val = cJSON_GetObjectItemCaseSensitive(body, "value");
  const char *text = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(val, "message"));
  int retry = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(val, "retry"));
  if (retry && req->tries < b->cfg.retry_max_tries) {
    uint64_t delay = b->cfg.retry_initial_ms << (req->tries - 1);
    sg__backend_log(b, SG_LOG_DEBUG, "%s failed (try %d, retry in %llu ms): %s",
                    req->type, req->tries, (unsigned long long)delay, text);
    detach(req);
    req->where = REQ_RETRY_WAIT;
    req->due = uv_now(b->loop) + delay;
    /* Ordered by due time: from the tail, as most backoffs are alike. */
    sg__request *prev = NULL;
    for (sg__request *r = b->retrying.head; r && r->due <= req->due; r = r->next) prev = r;
    req->next = prev ? prev->next : b->retrying.head;
    if (prev) prev->next = req;
    else b->retrying.head = req;
    if (!req->next) b->retrying.tail = req;
    arm(b);
    return;
  }
  char msg[512];
  snprintf(msg, sizeof msg, "backend %s answered %s with an error%s: %s", b->name,
           req->type, retry ? " (still failing after retries)" : "", text);
  complete(req, SG_EBACKEND, body, msg);
}

static void on_response(sg__backend *b, const cJSON *v) {
  uint32_t seq = (uint32_t)cJSON_GetNumberValue(cJSON_GetObjectItemCaseSensitive(v, "sequence_number"));
  const cJSON *body = cJSON_GetObjectItemCaseSensitive(v, "body");
  const char *type = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(body, "type"));
  sg__request *req = inflight_find(b, seq);
  if (!req) {
    sg__backend_log(b, SG_LOG_WARN, "ignoring a %s response to sequence number %u, "
                    "which is not in flight", type, seq);
    return;
  }
  if (strcmp(type, "Error") == 0) {
    on_error_response(b, req, body);
    return;
  }
  if (strcmp(type, req->expect) != 0) {
    char msg[256];
    snprintf(msg, sizeof msg, "answered %s (sequence number %u) with %s, expected %s",
             req->type, seq, type, req->expect);
    complete(req, SG_EPROTO, NULL, msg);
    sg__backend_violation(b, msg);
    return;
  }
  b->doublings = 0;
  complete(req, 0, body, NULL);
}

static void on_init_info(sg__backend *b, const cJSON *v) {
  uv_timer_stop(&b->timer);
  const char *name = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(v, "backend_name"));
  const cJSON *ver = cJSON_GetObjectItemCaseSensitive(v, "backend_version");
  sg__backend_log(b, SG_LOG_INFO, "started: %s %d.%d.%d", name,
                  cJSON_GetArrayItem(ver, 0)->valueint, cJSON_GetArrayItem(ver, 1)->valueint,
                  cJSON_GetArrayItem(ver, 2)->valueint);
  /* segue's extension: what the service can do (docs/spec/backend-protocol.md).
   * Other hosts ignore the field; the router reads it through backends(). */
  cJSON_Delete(b->capabilities);
  const cJSON *caps = cJSON_GetObjectItemCaseSensitive(v, "capabilities");
  b->capabilities = cJSON_IsObject(caps) ? cJSON_Duplicate(caps, 1) : NULL;
  set_state(b, SG_BACKEND_RUNNING, NULL);
  flush_queue(b);
}

void sg__backend_on_value(sg__backend *b, sg__fl_kind kind, cJSON *v) {
  int live = b->state == SG_BACKEND_RUNNING || b->state == SG_BACKEND_STOPPING;
  if (kind == SG_FL_INIT_INFO && b->state == SG_BACKEND_STARTING) {
    on_init_info(b, v);
  } else if (kind == SG_FL_INIT_INFO && live) {
    sg__backend_violation(b, "sent a second InitInfo");
  } else if (kind == SG_FL_RESPONSE && live) {
    on_response(b, v);
  } else if (kind == SG_FL_UPDATE && live) {
    b->doublings = 0;
    if (b->tap) {
      if (b->tap(b->tap_data, b, v)) return;  /* kept: the tap frees it */
    } else if (b->ev && b->ev->on_update) {
      b->ev->on_update(b, v);
    }
  } else if (b->state == SG_BACKEND_STARTING) {
    sg__backend_violation(b, "sent something other than InitInfo first");
  }
  cJSON_Delete(v);
}

/* ---- life cycle ----------------------------------------------------------- */

static void init_timer_fired(uv_timer_t *t);
static void restart_timer_fired(uv_timer_t *t);

static void do_start(sg__backend *b) {
  set_state(b, SG_BACKEND_STARTING, NULL);
  uv_timer_start(&b->timer, init_timer_fired, b->cfg.init_timeout_ms, 0);
  int rc = b->tp->start(b);
  if (rc != 0) {
    char why[256];
    snprintf(why, sizeof why, "could not start: %s", sg_strerror(rc));
    sg__backend_on_exit(b, why);
  }
}

static void init_timer_fired(uv_timer_t *t) {
  sg__backend *b = t->data;
  char why[128];
  snprintf(why, sizeof why, "no InitInfo within %llu ms",
           (unsigned long long)b->cfg.init_timeout_ms);
  sg__backend_violation(b, why);
}

static void restart_timer_fired(uv_timer_t *t) {
  sg__backend *b = t->data;
  b->restarts++;
  do_start(b);
}

int sg__backend_init(uv_loop_t *loop, sg__backend *b, const char *name,
                     const sg__transport *tp, const sg__backend_config *cfg,
                     const sg__backend_events *ev, const sg__logger *log) {
  void *data = b->data;
  memset(b, 0, sizeof *b);
  b->data = data;
  b->name = strdup(name);
  if (!b->name) return SG_ENOMEM;
  b->loop = loop;
  b->tp = tp;
  b->ev = ev;
  b->log = log;
  if (cfg) b->cfg = *cfg;
  else sg__backend_config_defaults(&b->cfg);
  uv_timer_init(loop, &b->timer);
  uv_timer_init(loop, &b->kick);
  uv_timer_init(loop, &b->deadline);
  b->timer.data = b->kick.data = b->deadline.data = b;
  return 0;
}

int sg__backend_start(sg__backend *b) {
  if (b->closing) return SG_ECLOSING;
  if (b->state != SG_BACKEND_STOPPED && b->state != SG_BACKEND_FAILED) return 0;
  b->stop_for_good = 0;
  b->doublings = 0;
  do_start(b);
  return 0;
}

void sg__backend_violation(sg__backend *b, const char *reason) {
  if (b->state != SG_BACKEND_STARTING && b->state != SG_BACKEND_RUNNING) {
    sg__backend_log(b, SG_LOG_DEBUG, "protocol violation while %s: %s",
                    sg__backend_state_name(b->state), reason);
    return;
  }
  sg__backend_log(b, SG_LOG_ERROR, "protocol violation: %s", reason);
  char msg[512];
  snprintf(msg, sizeof msg, "backend %s violated the protocol: %s", b->name, reason);
  uv_timer_stop(&b->timer);
  set_state(b, SG_BACKEND_STOPPING, msg);
  fail_inflight(b, SG_EPROTO, msg);
  b->tp->stop(b, 0);
}

static void schedule_restart(sg__backend *b, const char *reason) {
  if (b->doublings > b->cfg.backoff_max_doublings) {
    char msg[1024];
    snprintf(msg, sizeof msg, "backend %s gave up after %llu restarts: %s", b->name,
             (unsigned long long)b->restarts, reason);
    sg__backend_log(b, SG_LOG_ERROR, "giving up after %llu restarts", (unsigned long long)b->restarts);
    set_state(b, SG_BACKEND_FAILED, msg);
    fail_waiting(b, SG_EDEAD, msg);
    return;
  }
  uint64_t delay = b->cfg.backoff_initial_ms << b->doublings;
  b->doublings++;
  sg__backend_log(b, SG_LOG_WARN, "restarting in %llu ms", (unsigned long long)delay);
  set_state(b, SG_BACKEND_BACKOFF, reason);
  uv_timer_start(&b->timer, restart_timer_fired, delay, 0);
}

void sg__backend_on_exit(sg__backend *b, const char *reason) {
  char msg[512];
  snprintf(msg, sizeof msg, "backend %s %s", b->name, reason);
  uv_timer_stop(&b->timer);
  if (!b->stop_for_good) sg__backend_log(b, SG_LOG_WARN, "%s", reason);
  else sg__backend_log(b, SG_LOG_INFO, "stopped: %s", reason);
  fail_inflight(b, b->stop_for_good ? SG_ECLOSING : SG_EDEAD, msg);
  if (b->stop_for_good) {
    set_state(b, SG_BACKEND_STOPPED, NULL);
    fail_waiting(b, SG_ECLOSING, msg);
    void (*cb)(sg__backend *) = b->stopped_cb;
    b->stopped_cb = NULL;
    if (cb) cb(b);
    if (b->closing) sg__backend_close(b);
    return;
  }
  schedule_restart(b, msg);
}

void sg__backend_stop(sg__backend *b, void (*cb)(sg__backend *b)) {
  b->stop_for_good = 1;
  b->stopped_cb = cb;
  switch (b->state) {
  case SG_BACKEND_STARTING:
  case SG_BACKEND_RUNNING:
    uv_timer_stop(&b->timer);
    set_state(b, SG_BACKEND_STOPPING, NULL);
    b->tp->stop(b, 1);
    break;
  case SG_BACKEND_STOPPING:
    break;  /* on_exit will see stop_for_good */
  default:
    uv_timer_stop(&b->timer);
    set_state(b, b->state == SG_BACKEND_FAILED ? SG_BACKEND_FAILED : SG_BACKEND_STOPPED, NULL);
    fail_waiting(b, SG_ECLOSING, "backend stopped");
    b->stopped_cb = NULL;
    if (cb) cb(b);
  }
}

static void backend_timer_closed(uv_handle_t *h) {
  sg__backend *b = h->data;
  if (b->tp->free) b->tp->free(b);
  free(b->buckets);
  free(b->name);
  b->name = NULL;
  cJSON_Delete(b->capabilities);
  b->capabilities = NULL;
  if (b->ev && b->ev->on_closed) b->ev->on_closed(b);
}

/* The timer is closed only once the kick and the deadline are: libuv gives
 * no order among close callbacks (it runs them last-closed first), and
 * freeing `b` while a handle inside it is still on the loop's closing list
 * is a use after free. */
static void backend_deadline_closed(uv_handle_t *h) {
  sg__backend *b = h->data;
  uv_close((uv_handle_t *)&b->timer, backend_timer_closed);
}

static void backend_kick_closed(uv_handle_t *h) {
  sg__backend *b = h->data;
  uv_close((uv_handle_t *)&b->deadline, backend_deadline_closed);
}

/* Re-entered from the stop; frees once nothing is left open. */
void sg__backend_close(sg__backend *b) {
  int first = !b->closing;
  b->closing = 1;
  if (first && b->state != SG_BACKEND_STOPPED && b->state != SG_BACKEND_FAILED) {
    sg__backend_stop(b, NULL);
    /* A running backend's exit re-enters; one waiting to restart (backoff)
     * stopped at once, with no exit to come, so it goes on from here. */
    if (b->state != SG_BACKEND_STOPPED && b->state != SG_BACKEND_FAILED) return;
  }
  if (b->state == SG_BACKEND_STOPPING) return;
  if (first) {
    fail_waiting(b, SG_ECLOSING, "backend closed");
    fail_inflight(b, SG_ECLOSING, "backend closed");
  }
  if (uv_is_closing((uv_handle_t *)&b->kick)) return;
  uv_close((uv_handle_t *)&b->kick, backend_kick_closed);
}
