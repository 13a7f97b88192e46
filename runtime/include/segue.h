/* segue.h: the public embedding API of segue, a Lua-scriptable chat bridge host.
 *
 * Contract, after libuv's:
 * - Every function returning int returns 0 or a negative error code: one of
 *   the SG_E* codes below, or a libuv code (UV_E*) passed through unchanged.
 *   sg_err_name() and sg_strerror() describe either kind.
 * - When a function that takes a callback returns an error, the callback is
 *   never called.
 * - segue runs on the caller's uv_loop_t: it never runs, stops or closes
 *   that loop and never walks handles it did not create. Closing a host is
 *   asynchronous; its memory is released before the close callback runs.
 * - Strings passed in are copied unless stated; strings and JSON texts passed
 *   to callbacks are borrowed and valid only during the callback.
 * - Every JSON text is one value of the flubber backend protocol, the same
 *   shape as on the wire and in Lua (see spec/backend-protocol.md).
 * - Threads: a host and everything it calls back live on its loop's thread.
 *   Call sg_* functions only from that thread (from loop callbacks, or
 *   before/between uv_run calls); callbacks run only inside uv_run.
 * - Callbacks may call any sg_* function, sg_host_close included.
 * docs/embedding.md is the reference, with a complete example.
 */
#ifndef SEGUE_H
#define SEGUE_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The public API: exported from libsegue.so (everything else is hidden,
 * and internal names start with sg__, as libuv's uv__). */
#if defined(SG_BUILDING) && defined(__GNUC__)
#define SG_EXTERN __attribute__((visibility("default")))
#else
#define SG_EXTERN /* nothing */
#endif

#define SEGUE_VERSION_MAJOR 0
#define SEGUE_VERSION_MINOR 1
#define SEGUE_VERSION_PATCH 0

/* Our own error codes live far below libuv's (which are -errno and -3000..-4095). */
#define SG_ERRNO_MAP(XX)                                                       \
  XX(EINVAL, "invalid argument")                                               \
  XX(ENOMEM, "out of memory")                                                  \
  XX(EPROTO, "protocol violation")                                             \
  XX(ETIMEDOUT, "request timed out")                                           \
  XX(EBACKEND, "backend answered with an error")                               \
  XX(EDEAD, "backend is not running")                                          \
  XX(ENOBACKEND, "no such backend")                                            \
  XX(EEXIST, "name already in use")                                            \
  XX(ECONFIG, "invalid configuration")                                         \
  XX(ELUA, "Lua error")                                                        \
  XX(EAUTH, "authentication failed")                                           \
  XX(ECLOSING, "host is closing")                                              \
  XX(ELIMIT, "limit exceeded")                                                 \
  XX(ECANCELED, "request canceled")                                            \
  XX(EDECODE, "cannot decode input")                                           \
  XX(EKEY, "bad key file")                                                     \
  XX(EHTTP, "HTTP or hRPC error")                                              \
  XX(ESTORE, "store error")

#define SG__ERRNO_BASE (-30000)
typedef enum {
  SG__ERR_FIRST = SG__ERRNO_BASE,
#define XX(code, _) SG_##code,
  SG_ERRNO_MAP(XX)
#undef XX
  SG__ERR_LAST
} sg_errno_t;

/* Short name ("EPROTO", or libuv's "ECONNREFUSED"); never NULL. */
SG_EXTERN const char *sg_err_name(int err);
/* One-line description; never NULL. */
SG_EXTERN const char *sg_strerror(int err);
/* "0.1.0" */
SG_EXTERN const char *sg_version_string(void);

/* ---- logging ------------------------------------------------------------ */

typedef enum {
  SG_LOG_ERROR = 0,
  SG_LOG_WARN = 1,
  SG_LOG_INFO = 2,
  SG_LOG_DEBUG = 3
} sg_log_level;

/* A log event: `line` is the whole logfmt line without the newline
 * ("level=warn backend=irc msg=\"...\""). Borrowed for the call. */
typedef void (*sg_log_cb)(void *data, sg_log_level level, const char *line);

/* ---- the host ----------------------------------------------------------- */

typedef struct sg_host sg_host;

/* Options of sg_host_new; copied, strings included, so they may be
 * temporaries. Fields past `size` take their defaults, so a program built
 * against an older segue.h keeps working when the struct grows. */
typedef struct sg_host_options {
  size_t size;               /* sizeof(sg_host_options): lets the struct grow */
  const char *data_dir;      /* NULL: the config's, else "./segue-data" */
  int log_level;             /* -1: the config's (default info); 0 is SG_LOG_ERROR */
  sg_log_cb log_cb;          /* NULL: logfmt lines on stderr */
  void *log_data;
  /* Called for an error no Lua caller can receive (an uncaught error in a
   * Lua callback, a handler that raised). The host goes on. NULL: logged.
   * err is SG_ELUA for an error raised in Lua (a segue.timer/segue.every
   * callback, a segue.on handler, a coroutine of segue.spawn); `message`
   * (borrowed) has "file:line: text" and the traceback. Also logged. */
  void (*error_cb)(void *data, int err, const char *message);
  void *error_data;
} sg_host_options;

/* Creates a host on `loop` (borrowed: it must outlive the host). `opts` may
 * be NULL (all defaults). On success *out is the host, owned by the caller
 * until sg_host_close. On failure (SG_EINVAL, SG_ENOMEM, SG_ELUA) *out is
 * untouched; what was made is released on the loop's next turn, so run the
 * loop before uv_loop_close, as after any uv_close. */
SG_EXTERN int sg_host_new(uv_loop_t *loop, const sg_host_options *opts, sg_host **out);

/* Loads and validates a config file (Lua), then creates its backends (not yet
 * started). On failure every problem is logged as "file:line: message" and
 * the host is unchanged. Once per host (then sg_host_reload). `path` is
 * borrowed for the call. Errors: SG_EINVAL, SG_ECONFIG (the problems are
 * also in sg_host_last_error), SG_ECLOSING. */
SG_EXTERN int sg_host_load_config_file(sg_host *host, const char *path);
/* Same, with the config given as Lua source text (borrowed for the call,
 * `len` bytes, no NUL needed); `chunkname` (may be NULL) names it in
 * errors ("embed.lua"). Relative paths in it start at the current directory.
 * sg_host_reload evaluates the same text again. */
SG_EXTERN int sg_host_load_config_string(sg_host *host, const char *chunkname,
                               const char *source, size_t len);
/* Runs a Lua script with the `segue` API now (like the config's `scripts`,
 * which run at sg_host_start); what it registers (segue.on handlers,
 * timers) stays until the host closes. `path` is borrowed. Errors:
 * SG_EINVAL, SG_ECONFIG (cannot read it, or it raised: logged, and in
 * sg_host_last_error), SG_ECLOSING. */
SG_EXTERN int sg_host_load_script(sg_host *host, const char *path);
/* Runs the configured scripts, then starts every configured backend and
 * every C backend. Without a loaded config, the embedded default config is
 * used. Errors: SG_ECONFIG (a script failed, the data directory cannot be
 * made), SG_ECLOSING. */
SG_EXTERN int sg_host_start(sg_host *host);
/* Reloads what is reloadable (rules, scripts); on failure the previous
 * version keeps running and the error is returned and logged.
 * Backends whose definition changed are replaced; C backends are not part
 * of the config and stay. Errors: SG_ECONFIG, SG_ECLOSING. */
SG_EXTERN int sg_host_reload(sg_host *host);
/* Stops every backend gracefully; `cb` (may be NULL) runs when all stopped.
 * Requests still in flight fail with SG_ECLOSING. SG_EINVAL if a stop is
 * already under way (then `cb` is never called). */
SG_EXTERN int sg_host_stop(sg_host *host, void (*cb)(sg_host *host));
/* Closes the host: stops backends, closes its handles and Lua state (once
 * the store calls made before were answered, up to 5 s: docs/scaling.md).
 * The host's memory is freed before `cb` runs; `cb` may be NULL.
 * Asynchronous, like uv_close: returns at once; requests in flight fail
 * with SG_ECLOSING, C backends get vt->stop and vt->closed, and `cb(data)`
 * runs on a later loop turn, after which nothing of segue's is left on the
 * loop. `host` must not be used after this call. Callable from any
 * callback, segue's own included. */
SG_EXTERN void sg_host_close(sg_host *host, void (*cb)(void *data), void *data);

/* The embedder's pointer; segue never touches it. */
SG_EXTERN void *sg_host_get_data(const sg_host *host);
SG_EXTERN void sg_host_set_data(sg_host *host, void *data);
/* The loop given to sg_host_new. */
SG_EXTERN uv_loop_t *sg_host_loop(const sg_host *host);
/* Why the last sg_host_load_*, sg_host_start or sg_host_reload call failed
 * ("" if it did not): every problem, one per line. Borrowed; valid until the
 * next call on the host. */
SG_EXTERN const char *sg_host_last_error(const sg_host *host);

/* ---- requests to any backend -------------------------------------------- */

/* Response callback. On success err == 0 and `body_json` is the backend's
 * ResponseBody ({"type":"RoomID","value":"#a"}). On failure err < 0:
 * SG_EBACKEND (the backend's Error, after retries; body_json is that Error
 * body), SG_ETIMEDOUT, SG_EDEAD, SG_ECLOSING; `message` says which.
 * Also SG_EPROTO: the backend violated the protocol (an invalid answer, or
 * one of the wrong variant) and is being restarted. Otherwise body_json is
 * NULL on failure, and `message` is NULL on success. Both borrowed. */
typedef void (*sg_response_cb)(void *data, int err, const char *body_json,
                               const char *message);

/* Sends RequestBody `body_json` (borrowed for the call) to backend `name`:
 * any backend, configured, added from Lua or in C. Validated before it
 * leaves; it goes out on the next loop turn, so `cb(data, ...)` is called
 * exactly once, later, never from inside this call. Errors (then `cb` is
 * never called): SG_EINVAL (a NULL argument), SG_ENOBACKEND, SG_EPROTO (not
 * a valid RequestBody; the reason is logged), SG_EDEAD (the backend gave up
 * or was stopped), SG_ECLOSING, SG_ENOMEM. */
SG_EXTERN int sg_host_request(sg_host *host, const char *name, const char *body_json,
                    sg_response_cb cb, void *data);

/* ---- backends implemented in C ------------------------------------------ */

typedef struct sg_cbackend sg_cbackend;

typedef struct sg_backend_vtable {
  size_t size;  /* sizeof(sg_backend_vtable) */
  /* The backend starts: it may emit updates from now on. Return 0 or an error.
   * An error (any negative code) counts as a failed start: retried with
   * backoff, and vt->stop is not called for it. */
  int (*start)(sg_cbackend *b);
  /* A request: answer now or later with sg_cbackend_respond(b, seq, ...).
   * `body_json` is a validated RequestBody, borrowed for the call. */
  void (*request)(sg_cbackend *b, uint32_t seq, const char *body_json);
  /* The backend stops: release what `start` took. May be NULL. Requests not
   * answered yet fail for their callers; answering them later is harmless
   * (SG_EDEAD). start/stop pairs repeat when the backend is restarted after a
   * protocol violation. */
  void (*stop)(sg_cbackend *b);
  /* Since 0.1 (present if `size` covers it; may be NULL): `b` is about to be
   * freed (the host is closing, or Lua removed the backend). `b` and its name
   * are invalid once this returns; `data` is yours to free here. */
  void (*closed)(sg_cbackend *b);
} sg_backend_vtable;

/* Registers a C backend named `name` (copied) alongside the configured ones:
 * Lua sees it as any backend (segue.backend(name), kind "c" in
 * segue.backends()). It starts with sg_host_start(), or at once if the host
 * already started; its InitInfo is made for it (backend_name `name`, version
 * [0,0,0], protocol [0,1,0]). `vt` is borrowed and must outlive the backend;
 * `data` is the embedder's (sg_cbackend_data). `*out` (may be NULL) is owned
 * by the host and valid until vt->closed, or until the host's close callback.
 * Errors: SG_EINVAL (NULL or empty name, NULL vt, start or request, or a
 * vt->size too small), SG_EEXIST, SG_ECLOSING, SG_ENOMEM. */
SG_EXTERN int sg_host_add_cbackend(sg_host *host, const char *name,
                         const sg_backend_vtable *vt, void *data,
                         sg_cbackend **out);
SG_EXTERN void *sg_cbackend_data(const sg_cbackend *b);
/* Borrowed; valid as long as `b`. */
SG_EXTERN const char *sg_cbackend_name(const sg_cbackend *b);
/* Answers request `seq` with a ResponseBody (borrowed text), now or later,
 * from inside vt->request or from any loop callback. Validated like any
 * backend's value: invalid JSON or shape, or the wrong variant for the
 * request, is a protocol violation: the requests in flight fail with
 * SG_EPROTO, vt->stop is called (before this returns) and the backend is
 * restarted with backoff; then SG_EPROTO is returned. SG_EDEAD: the backend is
 * not running (the answer is dropped). An unknown `seq` is logged and
 * ignored (0), as the protocol says. */
SG_EXTERN int sg_cbackend_respond(sg_cbackend *b, uint32_t seq, const char *body_json);
/* Emits an Update ({"type":"MessageUpsert","value":{...}}, borrowed text) to
 * Lua's "update" handlers. Allowed from inside vt->start (delivered right
 * after the InitInfo) and while running; errors as sg_cbackend_respond. */
SG_EXTERN int sg_cbackend_update(sg_cbackend *b, const char *update_json);

#ifdef __cplusplus
}
#endif
#endif
