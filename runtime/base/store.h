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

typedef struct sg__store sg__store;

/* The schema version this build migrates to (PRAGMA user_version). */
#define SG_STORE_SCHEMA_VERSION 1

/* Returned by lookups that find nothing. */
#define SG_STORE_NOTFOUND 1

/* Opens (creating if needed) the database at `path`, in WAL mode with
 * foreign keys on and a busy timeout, and applies the pending migrations,
 * one transaction each. On failure *out is NULL and `err` says why. */
int sg__store_open(const char *path, sg__store **out, char *err, size_t errlen);
/* Finalizes the cached statements and closes the database. NULL is fine. */
void sg__store_close(sg__store *s);
/* The message of the last failed call on `s` ("" if none); borrowed. */
const char *sg__store_errmsg(const sg__store *s);

/* For the store's own modules (runtime/postbox.c) and tests only; callers of
 * the interface never need these. sg__store_stmt returns the cached prepared
 * statement for `sql` (a string constant: the cache is keyed by its address),
 * reset, or NULL with the error in sg__store_errmsg(). The caller binds every
 * parameter (bindings persist between uses) and resets it after use, so no
 * read transaction stays open. */
struct sqlite3;
struct sqlite3_stmt;
struct sqlite3 *sg__store_db(sg__store *s);
struct sqlite3_stmt *sg__store_stmt(sg__store *s, const char *sql);
/* Records SQLite's current error message on `s` and returns SG_ESTORE. */
int sg__store_fail(sg__store *s);
/* Milliseconds since the Unix epoch: the store's time stamps. */
int64_t sg__store_now_ms(void);

/* Runs `fn(s, ud)` inside one transaction (a savepoint, so calls nest):
 * committed if fn returns 0, rolled back (and fn's code returned) if not. */
int sg__store_atomic(sg__store *s, int (*fn)(sg__store *s, void *ud), void *ud);

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

/* ---- the room and message log --------------------------------------------- */

/* Inserts a message or, if (backend, id) is known, updates its content and
 * edit time (an edit); room, sender and create time of the first version stay. */
int sg__store_log_message(sg__store *s, const char *backend, const char *id,
                         const char *room, const char *sender, const char *content_json,
                         int64_t create_time, int64_t edit_time);
/* Marks a message deleted (kept, content cleared). SG_STORE_NOTFOUND
 * if unknown. */
int sg__store_log_delete(sg__store *s, const char *backend, const char *id);

typedef struct sg__store_message {
  const char *backend, *id, *room, *sender, *content_json; /* content: NULL if deleted */
  int64_t create_time, edit_time;  /* edit_time: 0 if never edited */
  int deleted;
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

#endif
