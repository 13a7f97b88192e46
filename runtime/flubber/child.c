/* Child-process transport (see child.h). A run of the child owns a process
 * handle and three pipes; the run ends, and the backend hears of it, only
 * once all four are closed, so no callback arrives after the backend moved
 * on to the next run. */
#include "child.h"

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "json_framer.h"

extern char **environ;

typedef struct child_run child_run;

/* One request line on its way to the child's stdin. */
typedef struct pending_line {
  struct pending_line *next;
  uint32_t seq;
  size_t len;
  char *data;
} pending_line;

/* Lines a write at a time: at most this many, and this many bytes (past
 * the first line), go to one uv_write; what a write holds cannot be taken
 * back when its requests time out. */
#define WRITE_BATCH 64
#define WRITE_BATCH_BYTES ((size_t)256 << 10)

typedef struct child {
  char **argv;              /* cmd, args..., NULL */
  char **env;               /* merged environment */
  char *cwd;
  child_run *run;           /* the current run, or NULL */
} child;

struct child_run {
  sg__backend *b;
  uv_process_t proc;
  uv_pipe_t in, out, err;
  uv_timer_t timer;          /* stop escalation, and the exit->EOF grace */
  sg__framer framer;
  char errline[1024];        /* a partial stderr line */
  size_t errlen;
  int open_handles;
  int exited, out_eof, stopping, signalled;
  int paused;                /* flow control: stdout not read for now */
  int64_t exit_status;
  int term_signal;
  char reason[256];          /* why the run ended, for the log */
  /* stdin: lines wait here (oldest first) while a write is in progress;
   * `queued` counts their bytes and the write's. The backend bounds it
   * (cfg.max_queue_bytes); a line whose request timed out before it was
   * written is dropped (drop_stale), so a child that never reads costs at
   * most the bound. */
  pending_line *head, *tail, *batch;
  size_t queued, batch_bytes;
  int writing;
  uv_write_t wreq;
  uv_buf_t bufs[WRITE_BATCH];
  char rbuf[65536];          /* one read buffer for stdout and stderr: both
                                consume what they read before returning */
};

static child *child_of(const sg__backend *b) { return b->transport_data; }

/* ---- spec -> argv/env ---------------------------------------------------- */

static char **strv_dup(const char *first, const char *const *rest, const char *const *base) {
  size_t n = (first ? 1 : 0), m = 0;
  for (const char *const *p = rest; p && *p; p++) n++;
  for (const char *const *p = base; p && *p; p++) m++;
  char **v = calloc(n + m + 1, sizeof *v);
  if (!v) return NULL;
  size_t i = 0;
  if (first) v[i++] = strdup(first);
  for (const char *const *p = base; p && *p; p++) v[i++] = strdup(*p);
  for (const char *const *p = rest; p && *p; p++) v[i++] = strdup(*p);
  return v;
}

static void strv_free(char **v) {
  for (char **p = v; p && *p; p++) free(*p);
  free(v);
}

/* Our environment with the spec's entries replacing any of the same name. */
static char **merge_env(const char *const *extra) {
  size_t n = 0;
  for (char **p = environ; *p; p++) n++;
  const char **kept = calloc(n + 1, sizeof *kept);
  if (!kept) return NULL;
  size_t k = 0;
  for (char **p = environ; *p; p++) {
    size_t klen = strcspn(*p, "=");
    int overridden = 0;
    for (const char *const *e = extra; e && *e && !overridden; e++)
      overridden = strncmp(*e, *p, klen) == 0 && (*e)[klen] == '=';
    if (!overridden) kept[k++] = *p;
  }
  char **merged = strv_dup(NULL, extra, kept);
  free(kept);
  return merged;
}

int sg__child_attach(sg__backend *b, const sg__child_spec *spec) {
  child *c = calloc(1, sizeof *c);
  if (!c) return SG_ENOMEM;
  c->argv = strv_dup(spec->cmd, spec->args, NULL);
  c->env = merge_env(spec->env);
  c->cwd = spec->cwd ? strdup(spec->cwd) : NULL;
  if (!c->argv || !c->env || (spec->cwd && !c->cwd)) {
    strv_free(c->argv);
    strv_free(c->env);
    free(c->cwd);
    free(c);
    return SG_ENOMEM;
  }
  b->transport_data = c;
  return 0;
}

int sg__child_pid(const sg__backend *b) {
  child *c = child_of(b);
  return c && c->run && !c->run->exited ? c->run->proc.pid : 0;
}

/* ---- the end of a run ---------------------------------------------------- */

static void free_lines(pending_line *l) {
  while (l) {
    pending_line *next = l->next;
    free(l->data);
    free(l);
    l = next;
  }
}

static void run_handle_closed(uv_handle_t *h) {
  child_run *r = h->data;
  if (--r->open_handles > 0) return;
  free_lines(r->head);
  free_lines(r->batch);
  sg__backend *b = r->b;
  child *c = child_of(b);
  char reason[256];
  snprintf(reason, sizeof reason, "%s", r->reason);
  sg__framer_free(&r->framer);
  if (c->run == r) c->run = NULL;
  free(r);
  sg__backend_on_exit(b, reason);
}

static void close_if_open(uv_handle_t *h) {
  if (!uv_is_closing(h)) uv_close(h, run_handle_closed);
}

static void run_finish(child_run *r) {
  uv_timer_stop(&r->timer);
  close_if_open((uv_handle_t *)&r->in);
  close_if_open((uv_handle_t *)&r->out);
  close_if_open((uv_handle_t *)&r->err);
  close_if_open((uv_handle_t *)&r->timer);
  close_if_open((uv_handle_t *)&r->proc);
}

static void describe_exit(child_run *r) {
  if (r->reason[0]) return;
  if (r->term_signal)
    snprintf(r->reason, sizeof r->reason, "was killed by signal %d (%s)", r->term_signal,
             strsignal(r->term_signal));
  else
    snprintf(r->reason, sizeof r->reason, "exited with status %lld", (long long)r->exit_status);
}

static void eof_grace_fired(uv_timer_t *t) { run_finish(t->data); }

static void alloc_buf(uv_handle_t *h, size_t suggested, uv_buf_t *buf);
static void on_stdout(uv_stream_t *s, ssize_t n, const uv_buf_t *buf);

/* The last values may still sit in the stdout pipe after the exit: read them
 * until EOF, but not for ever (a grandchild may hold the pipe open). */
static void on_proc_exit(uv_process_t *p, int64_t status, int sig) {
  child_run *r = p->data;
  r->exited = 1;
  r->exit_status = status;
  r->term_signal = sig;
  describe_exit(r);
  /* What the child wrote before it exited is read even while paused. */
  if (r->paused && !r->out_eof && !r->stopping) {
    r->paused = 0;
    uv_read_start((uv_stream_t *)&r->out, alloc_buf, on_stdout);
  }
  if (r->out_eof || r->stopping == 2) run_finish(r);
  else uv_timer_start(&r->timer, eof_grace_fired, 1000, 0);
}

/* ---- reading ------------------------------------------------------------- */

static void alloc_buf(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  (void)suggested;
  child_run *r = h->data;
  *buf = uv_buf_init(r->rbuf, sizeof r->rbuf);
}

static int on_framed(void *ud, const char *json, size_t len, uint64_t offset) {
  child_run *r = ud;
  sg__backend *b = r->b;
  char err[512];
  sg__fl_kind kind;
  int expect_init = b->state == SG_BACKEND_STARTING;
  cJSON *v = sg__fl_decode_backend(json, len, offset, expect_init, &b->cfg.limits, &kind,
                                  err, sizeof err);
  if (!v) {
    sg__backend_violation(b, err);
    return SG_EPROTO;
  }
  sg__backend_on_value(b, kind, v);
  /* The value may have ended this run (a violation): stop feeding it. */
  return child_of(b)->run == r && !r->stopping ? 0 : SG_ECANCELED;
}

static void stop_run(child_run *r, int graceful);

/* stdout ended a while ago and the process still runs: it can never answer
 * again, so it is treated as dead (and restarted). */
static void stop_run(child_run *r, int graceful);

static void eof_but_alive(uv_timer_t *t) {
  child_run *r = t->data;
  if (r->exited || r->stopping) return;
  snprintf(r->reason, sizeof r->reason, "closed its stdout but kept running");
  sg__backend_log(r->b, SG_LOG_ERROR, "%s: stopping it", r->reason);
  stop_run(r, 0);
}

static void on_stdout(uv_stream_t *s, ssize_t n, const uv_buf_t *buf) {
  child_run *r = s->data;
  if (n > 0 && !r->stopping) {
    int rc = sg__framer_feed(&r->framer, buf->base, (size_t)n, on_framed, r);
    if (rc == SG_EPROTO && r->framer.failed) sg__backend_violation(r->b, r->framer.err);
  } else if (n < 0) {
    r->out_eof = 1;
    uv_read_stop(s);
    if (n != UV_EOF) snprintf(r->reason, sizeof r->reason, "stdout: %s", uv_strerror((int)n));
    if (r->exited) run_finish(r);
    /* An exiting process closes stdout just before its exit is reported. */
    else if (!r->stopping) uv_timer_start(&r->timer, eof_but_alive, 1000, 0);
  }
}

static void log_stderr_line(child_run *r, const char *line, size_t len) {
  char msg[1100];
  snprintf(msg, sizeof msg, "%.*s", (int)len, line);
  const char *kv[] = {"backend", r->b->name, "stream", "stderr", NULL};
  sg__log_fields(r->b->log, SG_LOG_INFO, kv, msg);
}

/* stderr is split into lines; an overlong line is logged in pieces. */
static void on_stderr(uv_stream_t *s, ssize_t n, const uv_buf_t *buf) {
  child_run *r = s->data;
  for (ssize_t i = 0; i < n; i++) {
    char ch = buf->base[i];
    if (ch == '\n' || r->errlen == sizeof r->errline) {
      log_stderr_line(r, r->errline, r->errlen);
      r->errlen = 0;
      if (ch == '\n') continue;
    }
    r->errline[r->errlen++] = ch;
  }
  if (n < 0) {
    if (r->errlen) log_stderr_line(r, r->errline, r->errlen);
    r->errlen = 0;
    uv_read_stop(s);
  }
}

/* ---- start, send, stop --------------------------------------------------- */

static int child_start(sg__backend *b) {
  child *c = child_of(b);
  child_run *r = calloc(1, sizeof *r);
  if (!r) return SG_ENOMEM;
  r->b = b;
  sg__framer_init(&r->framer, b->cfg.max_value_bytes, b->cfg.limits.max_depth);
  uv_pipe_init(b->loop, &r->in, 0);
  uv_pipe_init(b->loop, &r->out, 0);
  uv_pipe_init(b->loop, &r->err, 0);
  uv_timer_init(b->loop, &r->timer);
  r->in.data = r->out.data = r->err.data = r->timer.data = r->proc.data = r;
  r->open_handles = 4;

  uv_stdio_container_t stdio[3] = {
      {.flags = UV_CREATE_PIPE | UV_READABLE_PIPE, .data.stream = (uv_stream_t *)&r->in},
      {.flags = UV_CREATE_PIPE | UV_WRITABLE_PIPE, .data.stream = (uv_stream_t *)&r->out},
      {.flags = UV_CREATE_PIPE | UV_WRITABLE_PIPE, .data.stream = (uv_stream_t *)&r->err},
  };
  uv_process_options_t opt = {
      .exit_cb = on_proc_exit, .file = c->argv[0], .args = c->argv, .env = c->env,
      .cwd = c->cwd, .stdio_count = 3, .stdio = stdio,
  };
  c->run = r;
  int rc = uv_spawn(b->loop, &r->proc, &opt);
  if (rc != 0) {
    /* libuv initialized the process handle; close everything, report through
     * the normal exit path with the reason. */
    r->open_handles = 5;
    r->exited = 1;
    snprintf(r->reason, sizeof r->reason, "could not start %s: %s", c->argv[0], uv_strerror(rc));
    run_finish(r);
    return 0;
  }
  r->open_handles = 5;
  uv_read_start((uv_stream_t *)&r->out, alloc_buf, on_stdout);
  uv_read_start((uv_stream_t *)&r->err, alloc_buf, on_stderr);
  sg__backend_log(b, SG_LOG_DEBUG, "spawned %s pid=%d", c->argv[0], r->proc.pid);
  return 0;
}

static void write_more(child_run *r);

static void on_written(uv_write_t *w, int status) {
  child_run *r = w->handle->data;
  (void)status; /* a broken pipe shows up as the child's exit */
  free_lines(r->batch);
  r->batch = NULL;
  r->queued -= r->batch_bytes;
  r->batch_bytes = 0;
  r->writing = 0;
  if (status == 0) write_more(r);
}

/* Starts one write of the oldest waiting lines, skipping those whose
 * request is no longer in flight (timed out while waiting). */
static void write_more(child_run *r) {
  if (r->writing || !r->head || r->stopping || uv_is_closing((uv_handle_t *)&r->in)) return;
  unsigned n = 0;
  pending_line **last = &r->batch;
  while (r->head && n < WRITE_BATCH && r->batch_bytes < WRITE_BATCH_BYTES) {
    pending_line *l = r->head;
    r->head = l->next;
    if (!r->head) r->tail = NULL;
    l->next = NULL;
    if (!sg__backend_in_flight(r->b, l->seq)) {
      r->queued -= l->len;
      free_lines(l);
      continue;
    }
    r->bufs[n++] = uv_buf_init(l->data, (unsigned)l->len);
    r->batch_bytes += l->len;
    *last = l;
    last = &l->next;
  }
  if (n == 0) return;
  r->writing = 1;
  int rc = uv_write(&r->wreq, (uv_stream_t *)&r->in, r->bufs, n, on_written);
  if (rc != 0) {  /* stdin is gone: the exit is reported soon */
    r->writing = 0;
    free_lines(r->batch);
    r->batch = NULL;
    r->queued -= r->batch_bytes;
    r->batch_bytes = 0;
  }
}

static int child_send(sg__backend *b, const cJSON *request) {
  child *c = child_of(b);
  child_run *r = c->run;
  if (!r || r->stopping || uv_is_closing((uv_handle_t *)&r->in)) return SG_EDEAD;
  pending_line *l = malloc(sizeof *l);
  size_t len;
  char *text = sg__fl_encode_line(request, &len);
  if (!l || !text) {
    free(l);
    free(text);
    return SG_ENOMEM;
  }
  l->next = NULL;
  l->seq = (uint32_t)cJSON_GetNumberValue(cJSON_GetObjectItemCaseSensitive(request, "sequence_number"));
  l->len = len;
  l->data = text;
  if (r->tail) r->tail->next = l;
  else r->head = l;
  r->tail = l;
  r->queued += len;
  write_more(r);
  return 0;
}

/* {"sequence_number":N,"body":BODY}\n, as sg__fl_encode_line writes it. */
static int child_send_text(sg__backend *b, uint32_t seq, const char *body, size_t blen) {
  child_run *r = child_of(b)->run;
  if (!r || r->stopping || uv_is_closing((uv_handle_t *)&r->in)) return SG_EDEAD;
  pending_line *l = malloc(sizeof *l);
  char *text = malloc(blen + 48);
  if (!l || !text) {
    free(l);
    free(text);
    return SG_ENOMEM;
  }
  int n = snprintf(text, 48, "{\"sequence_number\":%u,\"body\":", seq);
  memcpy(text + n, body, blen);
  memcpy(text + n + blen, "}\n", 2);
  l->next = NULL;
  l->seq = seq;
  l->len = (size_t)n + blen + 2;
  l->data = text;
  if (r->tail) r->tail->next = l;
  else r->head = l;
  r->tail = l;
  r->queued += l->len;
  write_more(r);
  return 0;
}

static size_t child_queued_bytes(sg__backend *b) {
  child_run *r = child_of(b) ? child_of(b)->run : NULL;
  return r ? r->queued : 0;
}

/* Timed-out requests are the oldest: their lines are at the head. */
static void child_drop_stale(sg__backend *b) {
  child_run *r = child_of(b)->run;
  while (r && r->head && !sg__backend_in_flight(b, r->head->seq)) {
    pending_line *l = r->head;
    r->head = l->next;
    if (!r->head) r->tail = NULL;
    r->queued -= l->len;
    l->next = NULL;
    free_lines(l);
  }
}

/* Flow control: stdout is not read while paused (the child blocks writing
 * once the pipe is full). */
static void child_pause(sg__backend *b, int paused) {
  child_run *r = child_of(b)->run;
  if (!r || r->stopping || r->exited || r->out_eof || r->paused == !!paused) return;
  r->paused = !!paused;
  if (paused) uv_read_stop((uv_stream_t *)&r->out);
  else uv_read_start((uv_stream_t *)&r->out, alloc_buf, on_stdout);
}

static void escalate(uv_timer_t *t) {
  child_run *r = t->data;
  if (r->exited) return;
  int sig = r->signalled ? SIGKILL : SIGTERM;
  sg__backend_log(r->b, SG_LOG_WARN, "still running; sending %s",
                  sig == SIGKILL ? "SIGKILL" : "SIGTERM");
  uv_process_kill(&r->proc, sig);
  if (!r->signalled++) uv_timer_start(&r->timer, escalate, r->b->cfg.stop_grace_ms, 0);
}

/* Graceful: close stdin and wait; then SIGTERM; then SIGKILL, a grace time
 * apart. Not graceful (a violation): SIGTERM now, SIGKILL after the grace. */
static void stop_run(child_run *r, int graceful) {
  if (r->stopping) return;
  r->stopping = graceful ? 1 : 2;
  if (!uv_is_closing((uv_handle_t *)&r->in)) uv_close((uv_handle_t *)&r->in, run_handle_closed);
  if (r->exited) return;
  if (!graceful) {
    uv_read_stop((uv_stream_t *)&r->out);
    escalate(&r->timer);
  } else {
    uv_timer_start(&r->timer, escalate, r->b->cfg.stop_grace_ms, 0);
  }
}

static void child_stop(sg__backend *b, int graceful) {
  child_run *r = child_of(b)->run;
  if (r) stop_run(r, graceful);
  else sg__backend_on_exit(b, "was not running");
}

static void child_free(sg__backend *b) {
  child *c = child_of(b);
  if (!c) return;
  strv_free(c->argv);
  strv_free(c->env);
  free(c->cwd);
  free(c);
  b->transport_data = NULL;
}

const sg__transport sg__child_transport = {
    .kind = "process",
    .start = child_start,
    .send = child_send,
    .send_text = child_send_text,
    .stop = child_stop,
    .free = child_free,
    .pause = child_pause,
    .queued_bytes = child_queued_bytes,
    .drop_stale = child_drop_stale,
};
