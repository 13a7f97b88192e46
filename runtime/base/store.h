/* The store: durable state of a segue instance (message id maps, the room and
 * message log, key/value settings, federation peers and their queues).
 *
 * SQLite is behind this small interface so that another engine (PostgreSQL
 * for several instances sharing queues) can be added without touching the
 * callers. Contract:
 * - Every function returning int returns 0 or a negative SG_E* code; every
 *   SQLite failure is SG_ESTORE and sg__store_errmsg() says why (SQLite's own
 *   message). A lookup that finds nothing is not an error: it returns
 *   SG_STORE_NOTFOUND (1, positive, so `if (rc < 0)` still means failure).
 * - Strings passed in are copied by SQLite; strings passed to callbacks are
 *   borrowed for the call; strings returned through `char **` are malloc'd
 *   and the caller frees them.
 * - Writes that belong together happen in one transaction.
 * - A store is used from one thread (the loop's). */
#ifndef SEGUE_STORE_H
#define SEGUE_STORE_H
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

typedef struct sg__store sg__store;

/* The schema version this build migrates to (PRAGMA user_version). */
#define SG_STORE_SCHEMA_VERSION 5

/* A key naming one write for as long as it may be run again (the
 * PostgreSQL engine re-sends a statement whose connection broke, since it
 * may have committed): 128 random bits drawn once per process, '-', a
 * counter. Stored in a unique column, it makes the write idempotent
 * (docs/scaling.md "Writes run again"). */
#define SG_STORE_WRITE_KEY_LEN 52
void sg__store_write_key(char out[SG_STORE_WRITE_KEY_LEN]);

/* Returned by lookups that find nothing. */
#define SG_STORE_NOTFOUND 1

/* Opens (creating if needed) the database at `path`, in WAL mode with
 * foreign keys on and a busy timeout, and applies the pending migrations,
 * one transaction each. On failure *out is NULL and `err` says why. */
int sg__store_open(const char *path, sg__store **out, char *err, size_t errlen);
/* Commits an open batch, finalizes the cached statements, waits for a WAL
 * checkpoint under way on the checkpoint thread and stops it, and closes the
 * database. NULL is fine. */
void sg__store_close(sg__store *s);
/* The message of the last failed call on `s` ("" if none); borrowed. */
const char *sg__store_errmsg(const sg__store *s);

/* Milliseconds since the Unix epoch: the store's time stamps. */
int64_t sg__store_now_ms(void);

/* Runs `fn(s, ud)` inside one transaction (a savepoint, so calls nest):
 * committed if fn returns 0, rolled back (and fn's code returned) if not. */
int sg__store_atomic(sg__store *s, int (*fn)(sg__store *s, void *ud), void *ud);

/* Batching: sg__store_batch opens one transaction (if none is open) that the
 * writes after it share until sg__store_commit, so a loop turn's message
 * log and id maps cost one commit instead of one each; reads on this store
 * see them at once. Whoever batches commits at the end of the turn and
 * acknowledges what the batch holds only after the commit. Only the
 * message log and id maps (log_message, log_delete, map_put) join an open
 * batch; any other write (any statement that is not read-only, and every
 * sg__store_atomic) commits it first, so what others write and acknowledge
 * is durable when their call returns. An engine without batching makes both
 * no-ops. */
int sg__store_batch(sg__store *s);
int sg__store_commit(sg__store *s);
/* Commits an open batch and runs the callbacks of batched _async writes
 * that know their outcome (sg__store_commit leaves them for this, so they
 * never run inside someone else's commit: the postbox flushes from its own
 * end-of-turn handle). */
int sg__store_flush(sg__store *s);

/* ---- message id maps ----------------------------------------------------- */

/* Records that message (copy_backend, copy_id) is a copy of (origin_backend,
 * origin_id), made in `room` (may be NULL). A copy has one origin: putting
 * the same copy again with another origin is SG_EEXIST. */
int sg__store_map_put(sg__store *s, const char *origin_backend, const char *origin_id,
                     const char *copy_backend, const char *copy_id, const char *room);
/* Is (backend, id) a copy? 0 and the origin (malloc'd, caller frees) if so;
 * SG_STORE_NOTFOUND and NULLs if not; or an error. */
int sg__store_map_origin(sg__store *s, const char *backend, const char *id,
                        char **origin_backend, char **origin_id);
/* Calls cb(ud, copy_backend, copy_id, room) for every copy of the origin,
 * oldest first; room may be NULL. A non-zero return from cb stops the walk
 * and is returned. */
typedef int (*sg__store_copy_cb)(void *ud, const char *backend, const char *id,
                                const char *room);
int sg__store_map_copies(sg__store *s, const char *origin_backend, const char *origin_id,
                        sg__store_copy_cb cb, void *ud);
/* Both at once, in one statement (the router's hot path, SQLite only):
 * whether (backend, id) is a copy, and whether it has copies. */
int sg__store_map_known(sg__store *s, const char *backend, const char *id, int *is_copy,
                        int *has_copies);

/* ---- the room and message log --------------------------------------------- */

/* Inserts a message or, if (backend, id) is known, updates its content and
 * edit time (an edit); room, sender and create time of the first version stay. */
int sg__store_log_message(sg__store *s, const char *backend, const char *id,
                         const char *room, const char *sender, const char *content_json,
                         int64_t create_time, int64_t edit_time);
/* The same for a (backend, id) that sg__store_map_known, in the same batch,
 * found to be no copy: it skips looking up the origin the row would record
 * (the router's hot path; one index search fewer per message). */
int sg__store_log_message_no_copy(sg__store *s, const char *backend, const char *id,
                                  const char *room, const char *sender,
                                  const char *content_json, int64_t create_time,
                                  int64_t edit_time);
/* Marks a message deleted (kept, content cleared). SG_STORE_NOTFOUND
 * if unknown. */
int sg__store_log_delete(sg__store *s, const char *backend, const char *id);
/* The logged message's edit time (0: never edited), or SG_STORE_NOTFOUND. */
int sg__store_message_edit_time(sg__store *s, const char *backend, const char *id,
                               int64_t *edit_time);

typedef struct sg__store_message {
  const char *backend, *id, *room, *sender, *content_json; /* content: NULL if deleted */
  int64_t create_time, edit_time;  /* edit_time: 0 if never edited */
  int deleted;
  const char *attachments_json;    /* NULL if not logged (sg__store_messages_before only) */
} sg__store_message;
/* Calls cb for the last `limit` messages of `room` in `backend`, oldest
 * first (limit <= 0: all). The message is borrowed for the call. */
typedef int (*sg__store_message_cb)(void *ud, const sg__store_message *m);
int sg__store_messages(sg__store *s, const char *backend, const char *room, int limit,
                      sg__store_message_cb cb, void *ud);

/* ---- key/value settings ------------------------------------------------------ */

/* 0 and a malloc'd copy of the value (caller frees), SG_STORE_NOTFOUND and
 * NULL if unset. */
int sg__store_kv_get(sg__store *s, const char *key, char **value);
/* value NULL deletes the key. */
int sg__store_kv_set(sg__store *s, const char *key, const char *value);

/* ---- federation peers ------------------------------------------------------ */

/* Creates the peer's row (first_seen now) unless it exists. */
int sg__store_peer_add(sg__store *s, const char *peer);
/* 0 if the peer has a row, SG_STORE_NOTFOUND if not. */
int sg__store_peer_known(sg__store *s, const char *peer);

typedef enum {
  SG_STORE_STAMP_PUSH,     /* we Pushed to the peer */
  SG_STORE_STAMP_PULL,     /* we Pulled from the peer */
  SG_STORE_STAMP_PUSH_IN,  /* the peer Pushed to us */
  SG_STORE_STAMP_SERVED    /* we served the peer a Pull */
} sg__store_stamp;
/* Sets one time stamp of the peer's row to now. */
int sg__store_peer_stamp(sg__store *s, const char *peer, sg__store_stamp which);
/* Records the peer's last error (copied) and its time. */
int sg__store_peer_error(sg__store *s, const char *peer, const char *error);
/* The peer's Ed25519 public key: 0, or SG_STORE_NOTFOUND when none is kept. */
int sg__store_peer_key_get(sg__store *s, const char *peer, uint8_t key[32]);
/* The peer's row must exist (sg__store_peer_add). */
int sg__store_peer_key_set(sg__store *s, const char *peer, const uint8_t key[32]);

typedef struct sg__store_peer {
  const char *server_id;
  int64_t queued, inbox;  /* rows in the outbox and in the inbox */
  int64_t first_seen, last_push, last_push_in, last_pull, last_served, last_error_time;
  const char *last_error;  /* NULL if none */
} sg__store_peer;
/* Calls cb for every peer, by server id; the row is borrowed for the call. A
 * non-zero return from cb stops the walk and is returned. */
int sg__store_peers(sg__store *s, int (*cb)(void *ud, const sg__store_peer *p), void *ud);
/* Everything held under `old_id` (queue, inbox, key unless new_id has one,
 * message maps) moves to `new_id`, whose row must exist; old_id's row goes.
 * One transaction. */
int sg__store_peer_rename(sg__store *s, const char *old_id, const char *new_id);

/* ---- the postbox's queues ------------------------------------------------------ */

/* An event of a queue, borrowed for the call: its sequence number (never
 * reused), its bytes, and (inbox only) how many deliveries failed. A non-zero
 * return stops the walk and is returned (a positive one as 0: "enough"). */
typedef int (*sg__store_event_cb)(void *ud, int64_t seq, const uint8_t *event, size_t len,
                                 int64_t attempts);

/* Rows in the peer's outbound queue. */
int sg__store_outbox_count(sg__store *s, const char *peer, int64_t *n);
/* Appends `n` events to the peer's outbound queue, in order, all or none. */
int sg__store_outbox_add(sg__store *s, const char *peer, const uint8_t *const *events,
                        const size_t *lens, size_t n);
/* Calls cb for the peer's queued events, oldest first, while their bytes stay
 * within max_bytes (the first event always). */
int sg__store_outbox_head(sg__store *s, const char *peer, size_t max_bytes,
                         sg__store_event_cb cb, void *ud);
/* The events up to `last_seq` leave the peer's queue and its last_served is
 * stamped, one transaction; *dropped (may be NULL) says how many left. */
int sg__store_outbox_drop(sg__store *s, const char *peer, int64_t last_seq, int64_t *dropped);

/* Appends `n` received events to the peer's inbox, in order, all or none. */
int sg__store_inbox_add(sg__store *s, const char *peer, const uint8_t *const *events,
                       const size_t *lens, size_t n);
/* Calls cb once with the oldest event of the peer's inbox; SG_STORE_NOTFOUND
 * if it is empty. */
int sg__store_inbox_head(sg__store *s, const char *peer, sg__store_event_cb cb, void *ud);

/* ---- instances and leases (several segue instances on one database) ---------- */

/* Records that `instance` is alive now, with `info` (JSON, may be NULL). */
int sg__store_instance_beat(sg__store *s, const char *instance, const char *info);
/* Takes or renews the lease `name` for `instance` for ttl_ms: it is taken
 * when free, expired or already ours. *holder (malloc'd, caller frees) is who
 * holds it afterwards: compare it with `instance`. */
int sg__store_lease_claim(sg__store *s, const char *name, const char *instance, int64_t ttl_ms,
                         char **holder);
/* Gives the lease up if `instance` holds it. */
int sg__store_lease_release(sg__store *s, const char *name, const char *instance);

typedef struct sg__store_instance {
  const char *name, *info;  /* info: NULL if none */
  int64_t seen;             /* last beat, ms since the epoch (the database's clock) */
} sg__store_instance;
typedef struct sg__store_lease {
  const char *name, *holder;
  int64_t expires;          /* ms since the epoch (the database's clock) */
} sg__store_lease;

/* ---- engines and asynchronous calls -----------------------------------------
 * sg__store_open opens SQLite. sg__store_open_with opens either engine:
 * "sqlite" (the default) or "postgresql" (libpq on the loop: connections are
 * made and queries run without blocking, on a small pool; a connection lost
 * (the server restarted) is made again and what it was running is retried;
 * migrations run at the first connection under an advisory lock).
 * The _async operations work on both engines, with one callback type: on
 * SQLite the callback runs before the call returns, on PostgreSQL on a later
 * loop turn; callers write one code path. The synchronous operations above
 * are SQLite's only (SG_EINVAL on PostgreSQL). A call that returns non-zero
 * never calls its callback. */
typedef struct sg__store_config {
  const char *engine;  /* "sqlite" (NULL: the default) or "postgresql" */
  const char *path;    /* sqlite: the database file */
  const char *dsn;     /* postgresql: a libpq connection string or URI */
  uv_loop_t *loop;     /* postgresql: the loop the connections live on */
  unsigned pool;       /* postgresql: connections, default 3 */
  const struct sg__logger *log;  /* sqlite: for the checkpoint thread's errors; NULL: stderr */
  unsigned wal_pages, wal_limit; /* sqlite: checkpoint thresholds (store_wal.h); 0: defaults */
} sg__store_config;
int sg__store_open_with(const sg__store_config *c, sg__store **out, char *err, size_t errlen);
/* SQLite: the WAL's checkpointer (store_wal.h: tests hold it); NULL on PostgreSQL. */
struct sg__wal *sg__store_wal(sg__store *s);
/* 1 on PostgreSQL: callbacks of _async calls run later. */
int sg__store_is_async(const sg__store *s);
/* "sqlite" or "postgresql". */
const char *sg__store_engine(const sg__store *s);
/* busy(ud, +1) when a call is made that will be answered on a later loop
 * turn, busy(ud, -1) just before its callback runs; whoever made the call
 * (a script, the router, a postbox). So an owner can let the calls it made
 * before a stop finish before it closes the store (docs/scaling.md, "a
 * clean stop"). Never called after sg__store_close, which drops what is
 * left (its callbacks hear SG_ECANCELED). SQLite never calls it: its calls
 * are answered before they return, and sg__store_close commits a batch. */
void sg__store_set_busy(sg__store *s, void (*busy)(void *ud, int delta), void *ud);

typedef struct sg__store_copy {
  const char *backend, *id, *room;
} sg__store_copy;

/* Rows of the client API's listings (users, events_after, rooms). */
typedef struct sg__store_user {
  const char *name;
  int admin, tokens;
  int64_t created;
} sg__store_user;
typedef struct sg__store_api_event_row {
  int64_t id;
  const char *backend, *type, *value_json;
} sg__store_api_event_row;
typedef struct sg__store_room {
  const char *backend, *id, *name;  /* name: NULL if never announced */
  int64_t unread;
} sg__store_room;

/* The outcome of an _async call, borrowed for the callback. */
typedef struct sg__store_reply {
  int err;              /* 0, SG_STORE_NOTFOUND, or < 0 (then `message` says why) */
  const char *message;
  const char *text[2];  /* kv_get: the value; map_origin: backend, id; lease_claim: holder;
                           token_user: the user's name */
  int64_t num;          /* event_append, events_last: an event id; token_user: admin;
                         * inbox_push: the event's seq */
  size_t n;             /* rows of the list below that the call fills */
  const sg__store_copy *copies;          /* map_copies */
  const sg__store_message *messages;     /* messages, messages_before */
  const sg__store_instance *instances;   /* instances */
  const sg__store_lease *leases;         /* leases */
  const sg__store_user *users;           /* users */
  const sg__store_api_event_row *api_events; /* events_after */
  const sg__store_room *rooms;           /* rooms */
  int64_t count;        /* outbox_count; outbox_add: the peer's queue afterwards;
                         * outbox_drop: rows that left */
  const struct sg__store_event *events;  /* outbox_head, inbox_head */
  const sg__store_peer *peers;           /* peers */
  const uint8_t *key;   /* peer_key_get: 32 bytes */
} sg__store_reply;
typedef void (*sg__store_reply_cb)(void *ud, const sg__store_reply *r);

int sg__store_kv_get_async(sg__store *s, const char *key, sg__store_reply_cb cb, void *ud);
int sg__store_kv_set_async(sg__store *s, const char *key, const char *value,
                          sg__store_reply_cb cb, void *ud);
int sg__store_map_put_async(sg__store *s, const char *origin_backend, const char *origin_id,
                           const char *copy_backend, const char *copy_id, const char *room,
                           sg__store_reply_cb cb, void *ud);
int sg__store_map_origin_async(sg__store *s, const char *backend, const char *id,
                              sg__store_reply_cb cb, void *ud);
int sg__store_map_copies_async(sg__store *s, const char *origin_backend,
                              const char *origin_id, sg__store_reply_cb cb, void *ud);
int sg__store_log_message_async(sg__store *s, const char *backend, const char *id,
                               const char *room, const char *sender,
                               const char *content_json, int64_t create_time,
                               int64_t edit_time, sg__store_reply_cb cb, void *ud);
int sg__store_log_delete_async(sg__store *s, const char *backend, const char *id,
                              sg__store_reply_cb cb, void *ud);
/* num: the logged message's edit time (0: never edited); SG_STORE_NOTFOUND. */
int sg__store_message_edit_time_async(sg__store *s, const char *backend, const char *id,
                                     sg__store_reply_cb cb, void *ud);
int sg__store_messages_async(sg__store *s, const char *backend, const char *room, int limit,
                            sg__store_reply_cb cb, void *ud);
int sg__store_instance_beat_async(sg__store *s, const char *instance, const char *info,
                                 sg__store_reply_cb cb, void *ud);
int sg__store_instances_async(sg__store *s, sg__store_reply_cb cb, void *ud);
int sg__store_leases_async(sg__store *s, sg__store_reply_cb cb, void *ud);
int sg__store_lease_claim_async(sg__store *s, const char *name, const char *instance,
                               int64_t ttl_ms, sg__store_reply_cb cb, void *ud);
int sg__store_lease_release_async(sg__store *s, const char *name, const char *instance,
                                 sg__store_reply_cb cb, void *ud);

/* ---- the postbox, asynchronous (runtime/harmony/postbox.c) -----------------
 * The same operations as above, on both engines. On SQLite the queue writes
 * (outbox_add, outbox_drop, inbox_add, inbox_done, inbox_failed) join the
 * open batch, opening one if none is (sg__store_batch), and their callbacks
 * run after the commit (sg__store_flush; err is the commit's): a loop
 * turn's appends and deletes cost one transaction, and nothing is
 * acknowledged before it is durable. The peers' bookkeeping (peer_add,
 * stamps, errors, keys) joins the batch and answers at once (nobody is told
 * anything on its strength). Reads answer at once and see the batch. On
 * PostgreSQL each call is one statement (one transaction), answered after
 * it committed; calls take effect and answer in call order. */
typedef struct sg__store_event {
  int64_t seq;           /* never reused */
  const uint8_t *event;
  size_t len;
  int64_t attempts;      /* inbox: failed deliveries so far */
} sg__store_event;

/* 1 while a batch is open or callbacks of batched writes wait for
 * sg__store_flush. */
int sg__store_pending(const sg__store *s);

int sg__store_peer_add_async(sg__store *s, const char *peer, sg__store_reply_cb cb, void *ud);
int sg__store_peer_stamp_async(sg__store *s, const char *peer, sg__store_stamp which,
                              sg__store_reply_cb cb, void *ud);
int sg__store_peer_error_async(sg__store *s, const char *peer, const char *error,
                              sg__store_reply_cb cb, void *ud);
/* key: the 32 bytes, or err SG_STORE_NOTFOUND. */
int sg__store_peer_key_get_async(sg__store *s, const char *peer, sg__store_reply_cb cb,
                                void *ud);
int sg__store_peer_key_set_async(sg__store *s, const char *peer, const uint8_t key[32],
                                sg__store_reply_cb cb, void *ud);
/* peers, n: every peer by server id. */
int sg__store_peers_async(sg__store *s, sg__store_reply_cb cb, void *ud);
int sg__store_peer_rename_async(sg__store *s, const char *old_id, const char *new_id,
                               sg__store_reply_cb cb, void *ud);
/* count: rows in the peer's outbound queue. */
int sg__store_outbox_count_async(sg__store *s, const char *peer, sg__store_reply_cb cb,
                                void *ud);
/* Appends `n` events (copied) to the peer's queue, in order, all or none;
 * the peer's row is created if needed. count: the queue's rows afterwards. */
int sg__store_outbox_add_async(sg__store *s, const char *peer, const uint8_t *const *events,
                              const size_t *lens, size_t n, sg__store_reply_cb cb, void *ud);
/* events, n: the head of the queue, oldest first, within max_bytes (the
 * first event always). */
int sg__store_outbox_head_async(sg__store *s, const char *peer, size_t max_bytes,
                               sg__store_reply_cb cb, void *ud);
/* The events `seqs` (served by a Pull) leave the queue and last_served is
 * stamped, one transaction; count: how many left. By seq, not by range: on
 * PostgreSQL another instance's append may commit a lower seq later. */
int sg__store_outbox_drop_async(sg__store *s, const char *peer, const int64_t *seqs, size_t n,
                               sg__store_reply_cb cb, void *ud);
/* Appends `n` received events to the peer's inbox, in order, all or none;
 * the peer's row is created if needed. */
int sg__store_inbox_add_async(sg__store *s, const char *peer, const uint8_t *const *events,
                             const size_t *lens, size_t n, sg__store_reply_cb cb, void *ud);
/* A Push's event: its peer's row is created if new (and with `stamp`
 * stamped last_push_in, now) and the event appended to its inbox, in one
 * call (on SQLite a batch makes sure of a peer's row once); num: the
 * event's seq. */
int sg__store_inbox_push_async(sg__store *s, const char *peer, const uint8_t *event, size_t len,
                              int stamp, sg__store_reply_cb cb, void *ud);
/* events[0]: the oldest event of the inbox; err SG_STORE_NOTFOUND if empty. */
int sg__store_inbox_head_async(sg__store *s, const char *peer, sg__store_reply_cb cb,
                              void *ud);
int sg__store_inbox_done_async(sg__store *s, int64_t seq, sg__store_reply_cb cb, void *ud);
/* The peer's events with seq <= `seq` leave its inbox: one statement for
 * several delivered events, for the one writer of that inbox (deliveries
 * run in order; on a shared store another instance may commit a lower seq
 * later: there use inbox_done). count: how many left. */
int sg__store_inbox_done_upto_async(sg__store *s, const char *peer, int64_t seq,
                                   sg__store_reply_cb cb, void *ud);
/* A delivery failed: the event's attempts become `attempts` (the count its
 * head read) + 1 and `why` is kept; with `dead`, it moves to dead_letters, in
 * one transaction. The count is set, not added to: the same failure sent
 * twice (PostgreSQL's retry after a lost answer) counts once. */
int sg__store_inbox_failed_async(sg__store *s, int64_t seq, const char *why, int64_t attempts,
                                int dead, sg__store_reply_cb cb, void *ud);
/* Claims (or renews) `name` for `instance` for ttl_ms: err 0 when it is
 * ours afterwards, SG_STORE_NOTFOUND when another instance holds it (or is
 * claiming it right now: PostgreSQL's FOR UPDATE SKIP LOCKED, no wait).
 * Claims are rows of the leases table; an expired one is anybody's. On
 * SQLite (one instance per file) every claim is granted and nothing is
 * written. */
int sg__store_claim_async(sg__store *s, const char *name, const char *instance, int64_t ttl_ms,
                         sg__store_reply_cb cb, void *ud);
int sg__store_claim_release_async(sg__store *s, const char *name, const char *instance,
                                 sg__store_reply_cb cb, void *ud);

/* ---- the client API (runtime/base/store_api.c, docs/api.md) -------------- */

/* A user with one token, known only by its hash. SG_EEXIST if the name is
 * taken. */
int sg__store_user_add(sg__store *s, const char *name, int admin, const char *token_hash);
/* Removes the user and its tokens and read marks. SG_STORE_NOTFOUND if none. */
int sg__store_user_remove(sg__store *s, const char *name);
typedef int (*sg__store_user_cb)(void *ud, const char *name, int admin, int64_t created,
                                int tokens);
int sg__store_users(sg__store *s, sg__store_user_cb cb, void *ud);
/* The user owning a token hash: 0 and *name (malloc'd) and *admin, or
 * SG_STORE_NOTFOUND. */
int sg__store_token_user(sg__store *s, const char *token_hash, char **name, int *admin);

/* What a backend update means for the API, appended as one event in one
 * transaction with its effect on the log: a message (upsert), a delete, a
 * room (upsert) or a room delete. `value_json` is the update's value. */
typedef struct sg__store_api_event {
  const char *backend, *type, *value_json;
  /* MessageUpsert: the log row. MessageDelete and RoomDelete: id only. */
  const char *id, *room, *sender, *content_json, *attachments_json, *room_name;
  int64_t create_time, edit_time;
} sg__store_api_event;
/* Appends the event; *id (may be NULL) is its durable, increasing id. */
int sg__store_event_append(sg__store *s, const sg__store_api_event *ev, int64_t *id);
typedef int (*sg__store_api_event_cb)(void *ud, int64_t id, const char *backend, const char *type,
                                 const char *value_json);
/* Events with id > after, oldest first, at most `limit`. */
int sg__store_events_after(sg__store *s, int64_t after, int limit, sg__store_api_event_cb cb,
                          void *ud);
/* Deletes all but the newest `keep` events. */
int sg__store_events_prune(sg__store *s, int64_t keep);
/* The newest event id (0 if none). */
int sg__store_events_last(sg__store *s, int64_t *id);

/* Every room known (announced, or with logged messages): cb(backend, id,
 * name or NULL, unread for `user`: messages newer than its read mark). */
typedef int (*sg__store_room_cb)(void *ud, const char *backend, const char *id,
                                const char *name, int64_t unread);
int sg__store_rooms(sg__store *s, const char *user, sg__store_room_cb cb, void *ud);
/* Marks the room read by `user` up to `time` (never moves back). */
int sg__store_read_mark(sg__store *s, const char *user, const char *backend, const char *room,
                       int64_t time);
/* Like sg__store_messages, but only messages older than message `before_id`
 * (none when that message is not in the log). */
int sg__store_messages_before(sg__store *s, const char *backend, const char *room,
                             const char *before_id, int limit, sg__store_message_cb cb,
                             void *ud);

/* The client API's operations on both engines (see "engines and asynchronous
 * calls" above): the same contracts, answered through sg__store_reply.
 * user_add: SG_EEXIST if the name is taken; user_remove: SG_STORE_NOTFOUND if
 * unknown; token_user: text[0] the name and num the admin flag, or
 * SG_STORE_NOTFOUND; event_append and events_last: num the id. On
 * PostgreSQL every instance sees the same users, events and read marks; an
 * event's id is given when it commits, and one instance's appends commit in
 * call order (writes run one at a time), so events_after never skips one of
 * them. */
int sg__store_user_add_async(sg__store *s, const char *name, int admin, const char *token_hash,
                            sg__store_reply_cb cb, void *ud);
int sg__store_user_remove_async(sg__store *s, const char *name, sg__store_reply_cb cb, void *ud);
int sg__store_users_async(sg__store *s, sg__store_reply_cb cb, void *ud);
int sg__store_token_user_async(sg__store *s, const char *token_hash, sg__store_reply_cb cb,
                              void *ud);
int sg__store_event_append_async(sg__store *s, const sg__store_api_event *ev,
                                sg__store_reply_cb cb, void *ud);
int sg__store_events_after_async(sg__store *s, int64_t after, int limit, sg__store_reply_cb cb,
                                void *ud);
int sg__store_events_prune_async(sg__store *s, int64_t keep, sg__store_reply_cb cb, void *ud);
int sg__store_events_last_async(sg__store *s, sg__store_reply_cb cb, void *ud);
int sg__store_rooms_async(sg__store *s, const char *user, sg__store_reply_cb cb, void *ud);
int sg__store_read_mark_async(sg__store *s, const char *user, const char *backend,
                             const char *room, int64_t time, sg__store_reply_cb cb, void *ud);
int sg__store_messages_before_async(sg__store *s, const char *backend, const char *room,
                                   const char *before_id, int limit, sg__store_reply_cb cb,
                                   void *ud);

/* Sets `key` (value not NULL: SG_EINVAL) only while `instance` holds the lease
 * `name`, in one transaction: SG_STORE_NOTFOUND (nothing written) if it does
 * not. State kept by the lease's holder (the rules' state, docs/scaling.md)
 * is so never overwritten by an instance that lost the lease. */
int sg__store_kv_set_held_async(sg__store *s, const char *key, const char *value,
                               const char *lease, const char *instance, sg__store_reply_cb cb,
                               void *ud);

#endif
