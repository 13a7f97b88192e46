/* The router's hot path in C (issue 13): the bookkeeping of copies in flight
 * per destination backend, the updates held for the echo check, flow
 * control, the "edits seen" memory, and a compiled route table that carries
 * a plain message (a Text without attachments, new, not a copy) of a
 * compiled room straight to its destinations' requests.
 *
 * Policy stays in Lua (scripts/segue/router.lua): the router decides which
 * rooms are compiled and what their copies look like (destination room id,
 * prefix pieces, the destination's length limit), and hands the table over
 * through segue.core (bindings/core_route.c). Everything the table cannot
 * carry exactly as the Lua router would (an edit, a replay, a copy, content
 * other than Text, attachments, a copy over its destination's length, a
 * room not compiled) goes to Lua, in order: every update of a backend
 * passes through sg__route_update, which holds it while copies to that
 * backend are in flight (their echoes may arrive before the ids that
 * recognise them), then routes it here or passes it on.
 *
 * What the C path does per message is what router.lua does for the same
 * message: the message log and the id map in the store (the turn's batch),
 * provenance (extra.segue_origin on every copy), the per-destination bound
 * (MAX_IN_FLIGHT, a loss counted), pausing the source at PAUSE_AT, the
 * counters (drained by Lua once per loop turn) and losses reported to Lua as
 * they happen. No Lua runs for such a message. */
#ifndef SEGUE_ROUTE_H
#define SEGUE_ROUTE_H
#include <stddef.h>
#include <stdint.h>
#include <cjson/cJSON.h>
#include <uv.h>

#include "backend.h"
#include "store.h"

typedef struct sg__route sg__route;
typedef struct sg__route_table sg__route_table;

/* A copy made in C that failed (for the Lua side's counters and log). */
typedef struct sg__route_failure {
  const char *bridge, *origin, *id, *dest, *room, *key;
  const char *code;     /* the error's name: "ELIMIT", "ETIMEDOUT", ... */
  const char *message;  /* "ENAME: what happened" */
  uint64_t t0;          /* uv_hrtime() when the request was made */
} sg__route_failure;

typedef struct sg__route_hooks {
  void *ud;
  sg__backend *(*find)(void *ud, const char *name);
  /* A loss counted in C (reason as in router.lua's lost()). */
  void (*lost)(void *ud, const char *reason, const char *where, const char *id, const char *why);
  void (*copy_failed)(void *ud, const sg__route_failure *f);
  /* Once per loop turn in which the C path counted something. */
  void (*flush)(void *ud);
  /* A table nobody uses any more: its owner may go. */
  void (*table_gone)(void *ud, void *owner);
} sg__route_hooks;

typedef struct sg__route_limits {
  uint64_t max_in_flight, max_held, pause_at, pause_ms, edits_kept;
} sg__route_limits;

/* One destination of a compiled room. prefix: n_prefix pieces, a NULL piece
 * stands for the sender. */
typedef struct sg__route_target_spec {
  const char *bridge, *dest, *room, *room_id, *key;
  const char *const *prefix;
  size_t n_prefix;
  uint64_t max_length;  /* 0: none */
  int bytes;            /* the limit counts bytes, else UTF-8 characters */
  int first_of_bridge;  /* the first target of its bridge (counts the bridge's "in") */
} sg__route_target_spec;

/* The counters of a loop turn, drained by Lua (sg__route_drain). */
typedef struct sg__route_count {
  const char *name;
  uint64_t in, sent;
  const char *first_origin, *first_dest, *first_room;  /* the first copy sent, if any */
} sg__route_count;

/* Updates for Lua go to the backend's ev->on_update, with
 * sg__route_dispatching() telling the rule set they belong to. */
int sg__route_new(uv_loop_t *loop, const sg__route_hooks *hooks, const sg__logger *log,
                  sg__route **out);
/* Fails what is in flight (as the backends would), drops what is held,
 * frees once its timers closed. No hook runs after this. */
void sg__route_close(sg__route *r);
void sg__route_set_limits(sg__route *r, const sg__route_limits *l);
/* Histogram bounds (seconds, ascending) of request latency, at most 32. */
void sg__route_set_buckets(sg__route *r, const double *bounds, size_t n);
/* The store the C path writes (NULL, or an engine answering later: no C
 * path, only the bookkeeping). Borrowed: the caller keeps it open. */
void sg__route_set_store(sg__route *r, sg__store *s);
/* Without a store: the id maps (origin <-> copies) kept in memory here, for
 * the C path and for the router's memory store alike (on: use them). */
void sg__route_set_memory(sg__route *r, int on);
int sg__route_mem_put(sg__route *r, const char *origin_backend, const char *origin_id,
                      const char *copy_backend, const char *copy_id, const char *room);
/* 0 and the origin (borrowed until the next put), or SG_STORE_NOTFOUND. */
int sg__route_mem_origin(sg__route *r, const char *backend, const char *id,
                         const char **origin_backend, const char **origin_id);
/* cb for every copy of the origin, oldest first (a non-zero return stops). */
int sg__route_mem_copies(sg__route *r, const char *origin_backend, const char *origin_id,
                         sg__store_copy_cb cb, void *ud);
/* Whether plain messages may be carried in C (else every update goes to Lua). */
void sg__route_enable(sg__route *r, int on);

/* Every update of a backend goes through here (sg__backend.tap). Returns 1
 * when it kept `update` (held), 0 when the caller frees it. */
int sg__route_update(void *route, sg__backend *b, cJSON *update);
/* Makes b's updates go through r. */
void sg__route_attach(sg__route *r, sg__backend *b);

/* A new table for a new rule set (owner: the caller's handle of that set),
 * which becomes the current one: empty, or with `inherit` the rooms of the
 * current one (shared, not copied: the caller puts or drops the rooms whose
 * routes changed). */
int sg__route_table_begin(sg__route *r, void *owner, int inherit);
/* Compiles room (backend, room_id) of the current table into `n` targets;
 * n == 0 with targets NULL compiles a room whose messages go nowhere;
 * sg__route_table_drop makes it go to Lua again. */
int sg__route_table_put(sg__route *r, const char *backend, const char *room_id,
                        const sg__route_target_spec *targets, size_t n);
void sg__route_table_drop(sg__route *r, const char *backend, const char *room_id);
/* The owner of the table an update passed to Lua belongs to, during the
 * pass hook; NULL outside. */
void *sg__route_dispatching(const sg__route *r);

/* Bookkeeping of copies sent from Lua. begin: the copy's number, or 0 when
 * MAX_IN_FLIGHT copies are in flight to dest already (*count says how many).
 * Pauses `origin` at PAUSE_AT. end: the copy completed (held updates of
 * dest may be handled from inside this call). */
uint64_t sg__route_send_begin(sg__route *r, const char *origin, const char *dest,
                              uint64_t *count);
void sg__route_send_end(sg__route *r, const char *dest, uint64_t n);
/* Copies in flight to `dest`, and updates of it held. */
void sg__route_in_flight(sg__route *r, const char *dest, uint64_t *count, uint64_t *held);

/* The "edits seen" memory: 1 and *edit_time if (backend, id) was noted. */
int sg__route_edit_seen(sg__route *r, const char *backend, const char *id, int64_t *edit_time);
void sg__route_edit_note(sg__route *r, const char *backend, const char *id, int64_t edit_time);

/* Counters since the last drain: bridged copies, pauses, and per backend
 * and per bridge (cb once each with a moved counter), request latency per
 * destination (cb_req). */
typedef struct sg__route_drain_cbs {
  void *ud;
  /* copies bridged, sources paused, messages carried by the compiled path */
  void (*totals)(void *ud, uint64_t bridged, uint64_t pauses, uint64_t carried);
  void (*backend)(void *ud, const sg__route_count *c);
  void (*bridge)(void *ud, const sg__route_count *c);
  void (*requests)(void *ud, const char *backend, uint64_t n, double sum_s,
                   const uint64_t *buckets, size_t nbuckets);
} sg__route_drain_cbs;
void sg__route_drain(sg__route *r, const sg__route_drain_cbs *cbs);

#endif
