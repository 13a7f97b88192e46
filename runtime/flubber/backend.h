/* A supervised backend, whatever carries its messages (a child process, a Lua
 * script in-process, C functions of an embedder): the session of the backend
 * protocol lives here once for all of them. It owns the InitInfo handshake and
 * its time-out, sequence numbers (uint32, wrapping, never reusing one in
 * flight), per-request time-outs, retries of `retry: true` errors with
 * exponential backoff, validation of every value the backend sends, and
 * restarts with backoff after an exit, crash or protocol violation.
 *
 * A transport only moves validated values: it delivers Requests to its
 * backend and reports what the backend sent with sg__backend_on_value(), and
 * its end with sg__backend_on_exit(). */
#ifndef SEGUE_BACKEND_H
#define SEGUE_BACKEND_H
#include <stdint.h>
#include <cjson/cJSON.h>
#include <uv.h>
#include "segue.h"
#include "log.h"
#include "flubber_codec.h"

typedef struct sg__backend sg__backend;
typedef struct sg__request sg__request;

typedef enum {
  SG_BACKEND_STOPPED = 0,  /* not started yet, or stopped for good */
  SG_BACKEND_STARTING,     /* started, waiting for InitInfo */
  SG_BACKEND_RUNNING,
  SG_BACKEND_BACKOFF,      /* exited; waiting to restart */
  SG_BACKEND_STOPPING,     /* asked to stop (for good, or to restart) */
  SG_BACKEND_FAILED        /* gave up after too many restarts */
} sg__backend_state;

const char *sg__backend_state_name(sg__backend_state s);

typedef struct sg__transport {
  const char *kind;  /* "process", "lua", "c" */
  /* Starts the backend; it must later report values or its exit. A non-zero
   * return counts as an exit (the backend is restarted with backoff). */
  int (*start)(sg__backend *b);
  /* Delivers one validated Request (borrowed). Non-zero: the transport is
   * broken; the backend treats it as a violation. */
  int (*send)(sg__backend *b, const cJSON *request);
  /* The same for a Request whose body is JSON text (borrowed), for
   * transports that write text. May be NULL (the text is parsed for send). */
  int (*send_text)(sg__backend *b, uint32_t seq, const char *body, size_t len);
  /* Stops the backend (gracefully when `graceful`); it must end with exactly
   * one sg__backend_on_exit(), possibly before returning. */
  void (*stop)(sg__backend *b, int graceful);
  /* Releases the transport's memory; the backend is stopped. May be NULL. */
  void (*free)(sg__backend *b);
  /* Stops (paused != 0) or resumes reading what the backend sends: flow
   * control towards a backend that floods. May be NULL (cannot pause). */
  void (*pause)(sg__backend *b, int paused);
  /* Bytes sent and not yet taken by the backend (a pipe's write queue), for
   * cfg.max_queue_bytes. May be NULL (the transport holds nothing). */
  size_t (*queued_bytes)(sg__backend *b);
  /* Requests left the in-flight table (timed out): drop what of theirs the
   * transport still holds unsent (sg__backend_in_flight tells). May be NULL. */
  void (*drop_stale)(sg__backend *b);
} sg__transport;

typedef struct sg__backend_config {
  uint64_t init_timeout_ms;     /* InitInfo must arrive within; default 10 s */
  uint64_t request_timeout_ms;  /* per try; default 30 s */
  uint64_t stop_grace_ms;       /* stdin closed -> SIGTERM -> SIGKILL; default 5 s */
  uint64_t backoff_initial_ms;  /* default 100 */
  int backoff_max_doublings;    /* default 10: 100 ms .. 102.4 s, then give up */
  int retry_max_tries;          /* default 10 */
  uint64_t retry_initial_ms;    /* default 100, doubling */
  size_t max_value_bytes;       /* framer limit; default 64 MiB */
  /* Bound on requests waiting for the backend, in bytes: queued here and
   * held by the transport unread. A request that would pass it fails at
   * once with SG_ELIMIT (one request alone always goes). Default 16 MiB. */
  size_t max_queue_bytes;
  sg__fl_limits limits;
} sg__backend_config;

void sg__backend_config_defaults(sg__backend_config *c);

/* What the backend tells its owner (the host). */
typedef struct sg__backend_events {
  /* An Update the backend sent (validated, borrowed). */
  void (*on_update)(sg__backend *b, const cJSON *update);
  /* A state change; `reason` is a human sentence or NULL. */
  void (*on_state)(sg__backend *b, sg__backend_state s, const char *reason);
  /* The backend was freed (after sg__backend_close). */
  void (*on_closed)(sg__backend *b);
} sg__backend_events;

/* Request completion: see sg_response_cb in segue.h. `body` is borrowed. */
typedef void (*sg__request_cb)(void *ud, int err, const cJSON *body, const char *msg);

struct sg__backend {
  void *data;                 /* the owner's */
  void *transport_data;       /* the transport's */
  sg__backend *next;          /* the owner's list of backends */
  char *name;
  uv_loop_t *loop;
  const sg__logger *log;
  const sg__transport *tp;
  const sg__backend_events *ev;
  sg__backend_config cfg;
  sg__backend_state state;
  int stop_for_good;          /* a stop was asked; do not restart */
  int closing;
  int doublings;              /* restarts since the last success */
  uint64_t restarts;          /* in all */
  uint32_t next_seq;
  uv_timer_t timer;           /* init time-out and restart backoff */
  uv_timer_t kick;            /* sends queued requests on the next loop turn */
  void (*stopped_cb)(sg__backend *b);
  /* private: in-flight requests by sequence number, and those waiting */
  sg__request **buckets;
  uint32_t nbuckets, inflight;
  struct sg__reqlist { sg__request *head, *tail; } queue, retrying;
  struct sg__reqlist timed;   /* queued and in flight, by time-out (tprev/tnext) */
  uv_timer_t deadline;        /* fires for the earliest time-out or retry */
  uint64_t deadline_due;
  int deadline_armed;
  /* segue's InitInfo extension: the "capabilities" object of the last
   * InitInfo (owned; NULL when it announced none). */
  cJSON *capabilities;
  size_t queue_bytes;         /* weight of the requests in `queue` */
  /* When set, every Update goes here instead of ev->on_update (the router's
   * hot path, route.h): it returns 1 when it kept the value. */
  int (*tap)(void *tap_data, sg__backend *b, cJSON *update);
  void *tap_data;
};

/* Initializes `b` (caller allocates; free it in ev->on_closed). The name is
 * copied. Does not start it. */
int sg__backend_init(uv_loop_t *loop, sg__backend *b, const char *name,
                     const sg__transport *tp, const sg__backend_config *cfg,
                     const sg__backend_events *ev, const sg__logger *log);
int sg__backend_start(sg__backend *b);
/* Stops for good (no restart): outstanding requests fail with SG_ECLOSING
 * after the transport ends; `cb` (may be NULL) runs once it has stopped. */
void sg__backend_stop(sg__backend *b, void (*cb)(sg__backend *b));
/* Stops if needed, then frees everything and calls ev->on_closed. */
void sg__backend_close(sg__backend *b);

/* Sends RequestBody `body` (borrowed; validated here). On success `cb` is
 * called exactly once, later, never from inside this call. On failure
 * (SG_EPROTO for an invalid body, with the reason in err; SG_EDEAD when the
 * backend gave up or is stopped; SG_ELIMIT when cfg.max_queue_bytes are
 * already waiting for it) `cb` is never called. */
int sg__backend_request(sg__backend *b, const cJSON *body, sg__request_cb cb,
                        void *ud, char *err, size_t errlen);
/* The same, taking `body` over (freed here whatever happens): no copy. */
int sg__backend_request_owned(sg__backend *b, cJSON *body, sg__request_cb cb, void *ud,
                              char *err, size_t errlen);

/* The same for a RequestBody that segue made itself as canonical JSON text
 * (`text`, malloc'd, taken over; not validated again), of variant `type`
 * (a string that outlives the request): no tree is built for a transport
 * that writes text. */
int sg__backend_request_text(sg__backend *b, const char *type, char *text, size_t len,
                             sg__request_cb cb, void *ud, char *err, size_t errlen);

/* Flow control: stops reading what the backend sends (its updates and its
 * responses) until resumed; a no-op for transports that cannot pause. A
 * restart reads again. Returns 1 if the transport paused, else 0. */
int sg__backend_pause(sg__backend *b, int paused);

/* Bytes of requests waiting for the backend (queued, and held by the
 * transport unread): what cfg.max_queue_bytes bounds. */
size_t sg__backend_waiting_bytes(sg__backend *b);

/* Whether request `seq` is still waiting for its response (for
 * transports dropping what timed out). */
int sg__backend_in_flight(sg__backend *b, uint32_t seq);

/* From transports. `v` is decoded and validated (ownership passes to the
 * backend). */
void sg__backend_on_value(sg__backend *b, sg__fl_kind kind, cJSON *v);
/* The transport saw bytes it cannot accept: logged with the backend's name
 * and `reason` (which names the byte offset), then a restart. */
void sg__backend_violation(sg__backend *b, const char *reason);
/* The backend's process or script ended; `reason` for the log. */
void sg__backend_on_exit(sg__backend *b, const char *reason);

/* Log with backend=<name>. */
void sg__backend_log(const sg__backend *b, sg_log_level lvl, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

#endif
