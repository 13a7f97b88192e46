/* The store's PostgreSQL engine (store_pg.c), for store.c only: callers use
 * store.h. Each function is the PostgreSQL side of the sg__store_*_async call
 * of the same name, with the same contract. */
#ifndef SEGUE_STORE_PG_H
#define SEGUE_STORE_PG_H
#include <uv.h>

#include "store.h"

typedef struct sg__pg sg__pg;

/* Starts `pool` connections to `dsn` on `loop` (without waiting for them);
 * calls queue until a connection is up and the migrations ran. */
int sg__pg_open(uv_loop_t *loop, const char *dsn, unsigned pool, sg__pg **out, char *err,
                size_t errlen);
/* Calls still waiting or running complete with SG_ECANCELED; memory goes
 * once the handles closed. The busy hook is not called from here on. */
void sg__pg_close(sg__pg *pg);
/* See sg__store_set_busy. */
void sg__pg_set_busy(sg__pg *pg, void (*busy)(void *ud, int delta), void *ud);

int sg__pg_kv_get(sg__pg *pg, const char *key, sg__store_reply_cb cb, void *ud);
int sg__pg_kv_set(sg__pg *pg, const char *key, const char *value, sg__store_reply_cb cb,
                  void *ud);
int sg__pg_map_put(sg__pg *pg, const char *ob, const char *oi, const char *cb_, const char *ci,
                   const char *room, sg__store_reply_cb cb, void *ud);
int sg__pg_map_origin(sg__pg *pg, const char *backend, const char *id, sg__store_reply_cb cb,
                      void *ud);
int sg__pg_map_copies(sg__pg *pg, const char *ob, const char *oi, sg__store_reply_cb cb,
                      void *ud);
int sg__pg_log_message(sg__pg *pg, const char *backend, const char *id, const char *room,
                       const char *sender, const char *content_json, int64_t create_time,
                       int64_t edit_time, sg__store_reply_cb cb, void *ud);
int sg__pg_log_delete(sg__pg *pg, const char *backend, const char *id, sg__store_reply_cb cb,
                      void *ud);
int sg__pg_message_edit_time(sg__pg *pg, const char *backend, const char *id,
                             sg__store_reply_cb cb, void *ud);
int sg__pg_messages(sg__pg *pg, const char *backend, const char *room, int limit,
                    sg__store_reply_cb cb, void *ud);
int sg__pg_instance_beat(sg__pg *pg, const char *instance, const char *info,
                         sg__store_reply_cb cb, void *ud);
int sg__pg_instances(sg__pg *pg, sg__store_reply_cb cb, void *ud);
int sg__pg_leases(sg__pg *pg, sg__store_reply_cb cb, void *ud);
int sg__pg_lease_claim(sg__pg *pg, const char *name, const char *instance, int64_t ttl_ms,
                       sg__store_reply_cb cb, void *ud);
int sg__pg_lease_release(sg__pg *pg, const char *name, const char *instance,
                         sg__store_reply_cb cb, void *ud);

/* The client API's operations (store.h: "the client API's operations on both
 * engines"). */
int sg__pg_user_add(sg__pg *pg, const char *name, int admin, const char *token_hash,
                    sg__store_reply_cb cb, void *ud);
int sg__pg_user_remove(sg__pg *pg, const char *name, sg__store_reply_cb cb, void *ud);
int sg__pg_users(sg__pg *pg, sg__store_reply_cb cb, void *ud);
int sg__pg_token_user(sg__pg *pg, const char *token_hash, sg__store_reply_cb cb, void *ud);
int sg__pg_event_append(sg__pg *pg, const sg__store_api_event *ev, sg__store_reply_cb cb,
                        void *ud);
int sg__pg_events_after(sg__pg *pg, int64_t after, int limit, sg__store_reply_cb cb, void *ud);
int sg__pg_events_prune(sg__pg *pg, int64_t keep, sg__store_reply_cb cb, void *ud);
int sg__pg_events_last(sg__pg *pg, sg__store_reply_cb cb, void *ud);
int sg__pg_rooms(sg__pg *pg, const char *user, sg__store_reply_cb cb, void *ud);
int sg__pg_read_mark(sg__pg *pg, const char *user, const char *backend, const char *room,
                     int64_t time, sg__store_reply_cb cb, void *ud);
int sg__pg_messages_before(sg__pg *pg, const char *backend, const char *room,
                           const char *before_id, int limit, sg__store_reply_cb cb, void *ud);
int sg__pg_kv_set_held(sg__pg *pg, const char *key, const char *value, const char *lease,
                       const char *instance, sg__store_reply_cb cb, void *ud);
int sg__pg_peer_add(sg__pg *pg, const char *peer, sg__store_reply_cb cb, void *ud);
int sg__pg_peer_stamp(sg__pg *pg, const char *peer, sg__store_stamp which, sg__store_reply_cb cb,
                      void *ud);
int sg__pg_peer_error(sg__pg *pg, const char *peer, const char *error, sg__store_reply_cb cb,
                      void *ud);
int sg__pg_peer_key_get(sg__pg *pg, const char *peer, sg__store_reply_cb cb, void *ud);
int sg__pg_peer_key_set(sg__pg *pg, const char *peer, const uint8_t key[32],
                        sg__store_reply_cb cb, void *ud);
int sg__pg_peers(sg__pg *pg, sg__store_reply_cb cb, void *ud);
int sg__pg_peer_rename(sg__pg *pg, const char *old_id, const char *new_id, sg__store_reply_cb cb,
                       void *ud);
int sg__pg_outbox_count(sg__pg *pg, const char *peer, sg__store_reply_cb cb, void *ud);
int sg__pg_queue_add(sg__pg *pg, int outbox, const char *peer, const uint8_t *const *events,
                     const size_t *lens, size_t n, sg__store_reply_cb cb, void *ud);
int sg__pg_outbox_head(sg__pg *pg, const char *peer, size_t max_bytes, sg__store_reply_cb cb,
                       void *ud);
int sg__pg_outbox_drop(sg__pg *pg, const char *peer, const int64_t *seqs, size_t n,
                       sg__store_reply_cb cb, void *ud);
int sg__pg_inbox_push(sg__pg *pg, const char *peer, const uint8_t *event, size_t len,
                      int stamp, sg__store_reply_cb cb, void *ud);
int sg__pg_inbox_head(sg__pg *pg, const char *peer, sg__store_reply_cb cb, void *ud);
int sg__pg_inbox_done(sg__pg *pg, int64_t seq, sg__store_reply_cb cb, void *ud);
int sg__pg_inbox_done_upto(sg__pg *pg, const char *peer, int64_t seq, sg__store_reply_cb cb,
                           void *ud);
int sg__pg_inbox_failed(sg__pg *pg, int64_t seq, const char *why, int64_t attempts, int dead,
                        sg__store_reply_cb cb, void *ud);
int sg__pg_claim(sg__pg *pg, const char *name, const char *instance, int64_t ttl_ms,
                 sg__store_reply_cb cb, void *ud);

#endif
