/* The postbox: Harmony federation's delivery rules (spec/harmony-federation.md,
 * "Delivery rules") on top of the store, independent of HTTP. The transport
 * (hRPC client and server, tokens) is the caller's: the postbox asks it to
 * Push through sg__postbox_transport and is told about Pulls it served and
 * events it received. Events are opaque bytes (serialized protocol.sync.v1.Event).
 *
 * Outbound, per peer:
 * - An event for a peer whose durable queue is empty is Pushed, up to
 *   push_tries times with a doubling backoff. Events that arrive meanwhile
 *   wait in memory behind it, so one Push at a time and in order.
 * - When the Pushes fail, that event and every one waiting behind it are
 *   appended to the durable queue in one transaction. While the queue is not
 *   empty, new events are appended to it and nothing is Pushed.
 * - Events queued plus waiting are bounded by queue_limit: past it, push
 *   fails with SG_ELIMIT; nothing is dropped silently.
 * - A Pull is served from the queue in order; the events leave it only when
 *   the transport reports the response was written completely.
 * Inbound, per peer:
 * - Received events are stored in the inbox (durable) before anyone sees
 *   them, then handed to transport->deliver one at a time in order. A failed
 *   delivery is retried with backoff; after deliver_tries it moves to
 *   dead_letters. Never dropped.
 * - While a peer is held (its start-up Pull is running), its Pushes wait in
 *   memory, unanswered, and are stored after the Pull's events.
 *
 * Several instances on one PostgreSQL (docs/scaling.md): any instance
 * stores Pushes and serves Pulls; per peer, one instance at a time Pushes
 * and serves (the claim "postbox.out/<peer>") and one delivers its inbox
 * ("postbox.in/<peer>"). Claims are rows of the leases table taken with
 * FOR UPDATE SKIP LOCKED, held while there is work and renewed every
 * claim_ms / 3, so a killed instance's peers are taken over within about
 * claim_ms. An instance without the outbound claim appends its events to
 * the queue (the peer Pulls them); so does one whose queue is not empty.
 *
 * Every store call is asynchronous (one code path on both engines): on
 * SQLite the queue writes of a loop turn share one transaction, committed
 * by the postbox at the end of the turn, and what they acknowledge is
 * acknowledged after that commit.
 *
 * Contract (libuv's): functions return 0 or a negative SG_E* code; when one
 * that takes a callback returns anything but 0 the callback is never called
 * (it may be called before the function returns). The store is borrowed and
 * must outlive the postbox. Close the transport first (its outstanding
 * calls complete), then the postbox. Acknowledged means: the callback said
 * PUSHED or QUEUED; such an event is delivered or durably queued. */
#ifndef SEGUE_POSTBOX_H
#define SEGUE_POSTBOX_H
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "store.h"

typedef struct sg__postbox sg__postbox;

typedef struct sg__postbox_options {
  unsigned push_tries;          /* Push attempts before queueing; default 5 */
  uint64_t push_backoff_ms;     /* first retry delay, doubled each; default 200 */
  unsigned queue_limit;         /* events per peer, queued + waiting; 10000 */
  unsigned deliver_tries;       /* handler attempts before dead_letters; 5 */
  uint64_t deliver_backoff_ms;  /* first redelivery delay, doubled; 1000 */
  uint64_t claim_ms;            /* claims last this long unrenewed; 10000 */
  const char *instance;         /* this instance's name in the claims (copied) */
} sg__postbox_options;

/* Fills every field with its default. */
void sg__postbox_options_default(sg__postbox_options *o);

typedef struct sg__postbox_transport {
  /* Starts a Push of `event` (borrowed for the call) to `peer`. Must call
   * sg__postbox_push_done(pb, call, err) exactly once, later. A non-zero
   * return counts as a failed try (and push_done must not be called). */
  int (*push)(void *ud, const char *peer, const uint8_t *event, size_t len, void *call);
  /* Hands a received event to the application. 0: handled (it leaves the
   * inbox); < 0: failed, `err` says why (kept, retried, then dead-lettered). */
  int (*deliver)(void *ud, const char *peer, const uint8_t *event, size_t len, char *err,
                 size_t errlen);
  void *ud;
} sg__postbox_transport;

/* Creates a postbox on `loop` over `store` (both borrowed); the transport is
 * copied. Events a previous run left in the inbox are delivered again (once
 * the store listed the peers). */
int sg__postbox_new(uv_loop_t *loop, sg__store *store, const sg__postbox_transport *tp,
                   const sg__postbox_options *opts, sg__postbox **out);
/* Appends events still waiting for a Push to the durable queue (so a clean
 * stop loses nothing), answers them QUEUED, releases held Pushes (stored),
 * and closes; memory is freed before `cb` (may be NULL) runs. */
void sg__postbox_close(sg__postbox *pb, void (*cb)(void *data), void *data);
/* The last error message of a failed call ("" if none); borrowed. */
const char *sg__postbox_errmsg(const sg__postbox *pb);
/* Non-zero once sg__postbox_close began (the memory is still there until
 * its callback): what arrives now is not taken. */
int sg__postbox_closing(const sg__postbox *pb);

/* ---- outbound ------------------------------------------------------------ */

#define SG_POSTBOX_PUSHED 0   /* the peer answered the Push */
#define SG_POSTBOX_QUEUED 1   /* in the durable queue, for the peer to Pull */

/* err 0 and how SG_POSTBOX_PUSHED or SG_POSTBOX_QUEUED; or err < 0: not
 * delivered and not queued (a store failure), `message` says why. */
typedef void (*sg__postbox_push_cb)(void *ud, int err, int how, const char *message);

/* Sends `event` (copied) to `peer`: 0 (cb runs later: PUSHED, or QUEUED
 * once the append committed), SG_ELIMIT past queue_limit (as far as this
 * instance knows the queue), SG_ENOMEM, SG_ECLOSING. */
int sg__postbox_push(sg__postbox *pb, const char *peer, const uint8_t *event, size_t len,
                    sg__postbox_push_cb cb, void *ud);
/* The transport's answer to transport->push: 0 when the peer accepted it. */
void sg__postbox_push_done(sg__postbox *pb, void *call, int err, const char *message);

/* A Pull response being written: the peer's queued events, oldest first. */
typedef struct sg__postbox_batch {
  size_t n;
  const uint8_t **events;
  const size_t *lens;
} sg__postbox_batch;
/* err 0 and the batch (end it with sg__postbox_pull_end), or err < 0 and
 * NULL (the postbox's errmsg says why; SG_ECANCELED when the postbox began
 * closing before the store answered: the events stay queued). */
typedef void (*sg__postbox_batch_cb)(void *ud, int err, sg__postbox_batch *batch);
/* Takes up to `max_bytes` of event bytes (at least one event) from the head
 * of `peer`'s queue without removing them. While an earlier batch of that
 * peer is being written (here, or by another instance: the claim), the
 * batch is empty (the events go out once). */
int sg__postbox_pull_begin(sg__postbox *pb, const char *peer, size_t max_bytes,
                          sg__postbox_batch_cb cb, void *ud);
/* status 0: the response was written completely, the events leave the
 * queue (one transaction; a failure is recorded as the peer's last error);
 * else they stay. Frees the batch. */
int sg__postbox_pull_end(sg__postbox *pb, sg__postbox_batch *batch, int status);

/* ---- inbound --------------------------------------------------------------- */

/* err 0: the events are stored (answer the Push); else why not. */
typedef void (*sg__postbox_stored_cb)(void *ud, int err);
/* Stores `n` events pulled from `peer` in the inbox (one transaction), then
 * cb, and schedules their delivery. */
int sg__postbox_receive(sg__postbox *pb, const char *peer, const uint8_t *const *events,
                       const size_t *lens, size_t n, sg__postbox_stored_cb cb, void *ud);
/* A Push from `peer`: stored, then cb (answer the Push only then); while the
 * peer is held, kept in memory and stored on release. */
int sg__postbox_receive_push(sg__postbox *pb, const char *peer, const uint8_t *event,
                            size_t len, sg__postbox_stored_cb cb, void *ud);
/* uv_now of the last Push from `peer` this postbox received, 0 if none. */
uint64_t sg__postbox_pushed_at(sg__postbox *pb, const char *peer);
/* Holds `peer`'s Pushes (its start-up Pull runs) / stores them and goes on. */
int sg__postbox_hold(sg__postbox *pb, const char *peer);
int sg__postbox_release(sg__postbox *pb, const char *peer);

/* ---- peers ------------------------------------------------------------------ */

typedef enum {
  SG_POSTBOX_NOTE_PULLED,   /* a Pull from the peer succeeded */
  SG_POSTBOX_NOTE_PUSH_IN,  /* the peer Pushed to us */
  SG_POSTBOX_NOTE_ERROR     /* something about the peer failed: `error` */
} sg__postbox_note_kind;
/* Records a time stamp (now) or an error in the peer's row (created if new). */
int sg__postbox_note(sg__postbox *pb, const char *peer, sg__postbox_note_kind kind,
                    const char *error);

typedef struct sg__postbox_peer_status {
  const char *server_id;
  int64_t queued, inbox, waiting;   /* durable queue, undelivered inbox, in memory */
  int64_t first_seen, last_push, last_push_in, last_pull, last_served, last_error_time;
  const char *last_error;           /* NULL if none */
  int held;
} sg__postbox_peer_status;
/* err 0 and every peer known to the store, by server id (borrowed for the
 * call); or err < 0 (message: why). */
typedef void (*sg__postbox_peers_cb)(void *ud, int err, const char *message,
                                    const sg__postbox_peer_status *peers, size_t n);
int sg__postbox_peers(sg__postbox *pb, sg__postbox_peers_cb cb, void *ud);
/* The same from the store alone (no running postbox: waiting 0, held 0),
 * for `segue status` beside a running segue. */
int sg__postbox_store_peers(sg__store *store, sg__postbox_peers_cb cb, void *ud);

/* err 0 and the peer's persisted Ed25519 public key (32 bytes), or
 * SG_STORE_NOTFOUND and NULL, or err < 0. */
typedef void (*sg__postbox_key_cb)(void *ud, int err, const uint8_t *key);
int sg__postbox_key_get(sg__postbox *pb, const char *peer, sg__postbox_key_cb cb, void *ud);
/* Persists the key that verified the peer's request, unless it is the one
 * this postbox last persisted or read for it (no store call per request). */
int sg__postbox_key_remember(sg__postbox *pb, const char *peer, const uint8_t key[32]);

/* NotifyNewId received: everything held under `old_id` (queue, inbox, key,
 * message maps) moves to `new_id` in one transaction; cb(ud, 0) or
 * cb(ud, SG_STORE_NOTFOUND) if old_id is unknown, or an error. Refused
 * (SG_EINVAL, no cb) while old_id has events in memory. */
int sg__postbox_rename_peer(sg__postbox *pb, const char *old_id, const char *new_id,
                           sg__postbox_stored_cb cb, void *ud);

#endif
