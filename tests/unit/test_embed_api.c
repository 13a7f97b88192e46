/* The embedding API's contract (runtime/include/segue.h), through the public
 * header only: error names, a host on the test's own loop, requests from C,
 * C backends (round trip, seen from Lua, invalid answers), the log and error
 * callbacks, and an asynchronous close that leaves nothing on the loop. */
#define _XOPEN_SOURCE 700  /* nftw */
#include <ftw.h>
#include <segue.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "tap.h"

/* ---- a host on the test's loop ---------------------------------------------- */

typedef struct fixture {
  uv_loop_t loop;
  sg_host *host;
  char dir[64];           /* data_dir and scripts */
  int closed;             /* the host's close callback ran */
  int errors;             /* error_cb calls */
  int last_err;
  char error_text[16384];  /* every error_cb message, '\n'-separated */
  char log[1 << 16];      /* every log line, '\n'-separated */
  size_t loglen;
  int bad_lines;          /* log lines not in logfmt, or with a newline */
} fixture;

static void capture_log(void *data, sg_log_level level, const char *line) {
  fixture *fx = data;
  if (getenv("EMBED_TEST_VERBOSE")) fprintf(stderr, "%s\n", line);
  if (strncmp(line, "time=", 5) != 0 || !strstr(line, " level=") || strchr(line, '\n'))
    fx->bad_lines++;
  size_t n = strlen(line);
  if (fx->loglen + n + 2 > sizeof fx->log) return;
  memcpy(fx->log + fx->loglen, line, n);
  fx->loglen += n;
  fx->log[fx->loglen++] = '\n';
  fx->log[fx->loglen] = '\0';
}

static void capture_error(void *data, int err, const char *message) {
  fixture *fx = data;
  fx->errors++;
  fx->last_err = err;
  size_t n = strlen(fx->error_text);
  snprintf(fx->error_text + n, sizeof fx->error_text - n, "%s\n", message);
}

/* A log line containing both `a` and `b`. */
static int logged(const fixture *fx, const char *a, const char *b) {
  for (const char *line = fx->log; *line;) {
    const char *end = strchr(line, '\n');
    char one[2048];
    snprintf(one, sizeof one, "%.*s", (int)(end - line), line);
    if (strstr(one, a) && strstr(one, b)) return 1;
    line = end + 1;
  }
  return 0;
}

static void setup(fixture *fx) {
  memset(fx, 0, sizeof *fx);
  CHECK(uv_loop_init(&fx->loop) == 0);
  snprintf(fx->dir, sizeof fx->dir, "/tmp/segue-embed-test-XXXXXX");
  CHECK(mkdtemp(fx->dir) != NULL);
  sg_host_options opts = {sizeof opts, fx->dir, SG_LOG_DEBUG, capture_log, fx, capture_error, fx};
  CHECK(sg_host_new(&fx->loop, &opts, &fx->host) == 0);
}

static void noop(uv_timer_t *t) { (void)t; }

/* Runs the loop until *counter >= want or `ms` pass; a timer of ours keeps
 * it turning. */
static int run_until(fixture *fx, const int *counter, int want, uint64_t ms) {
  uv_timer_t tick;
  uv_timer_init(&fx->loop, &tick);
  uv_timer_start(&tick, noop, 5, 5);
  uint64_t deadline = uv_now(&fx->loop) + ms;
  while (*counter < want && uv_now(&fx->loop) < deadline) uv_run(&fx->loop, UV_RUN_ONCE);
  uv_close((uv_handle_t *)&tick, NULL);
  uv_run(&fx->loop, UV_RUN_NOWAIT);
  return *counter >= want;
}

static int remove_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw) {
  (void)st;
  (void)flag;
  (void)ftw;
  return remove(path);
}

/* The data directory and what segue and the tests put there. */
static int remove_tree(const char *dir) { return nftw(dir, remove_entry, 16, FTW_DEPTH | FTW_PHYS); }

static void host_closed(void *data) { ((fixture *)data)->closed++; }

static int nscripts;

/* Writes a Lua script into the fixture's directory; returns its path, valid
 * until the next call. */
static const char *write_script(fixture *fx, const char *source) {
  static char path[128];
  snprintf(path, sizeof path, "%s/script%d.lua", fx->dir, nscripts++);
  FILE *f = fopen(path, "w");
  CHECK(f != NULL);
  if (f) {
    fputs(source, f);
    fclose(f);
  }
  return path;
}

/* Closes the host and checks what the contract promises: the callback runs
 * once, and with our own handles closed the loop closes (nothing of segue's
 * is left on it). */
static void teardown(fixture *fx) {
  sg_host_close(fx->host, host_closed, fx);
  CHECK(fx->closed == 0);  /* asynchronous, like uv_close */
  uv_run(&fx->loop, UV_RUN_DEFAULT);
  CHECK(fx->closed == 1);
  CHECK(uv_loop_close(&fx->loop) == 0);
  CHECK(fx->bad_lines == 0);
  nscripts = 0;
  CHECK(remove_tree(fx->dir) == 0);
}

static void load_and_start(fixture *fx, const char *config) {
  CHECK(sg_host_load_config_string(fx->host, "test-config", config, strlen(config)) == 0);
  CHECK(sg_host_start(fx->host) == 0);
}

/* ---- requests and a C backend ------------------------------------------------- */

typedef struct reply {
  int calls, err;
  char body[4096], msg[1024];
} reply;

static void on_reply(void *data, int err, const char *body, const char *msg) {
  reply *r = data;
  r->calls++;
  r->err = err;
  snprintf(r->body, sizeof r->body, "%s", body ? body : "");
  snprintf(r->msg, sizeof r->msg, "%s", msg ? msg : "");
}

#define ROOM_LOOKUP(v) "{\"type\":\"RoomLookup\",\"value\":\"" v "\"}"
#define ROOM_ID(v) "{\"type\":\"RoomID\",\"value\":\"" v "\"}"

typedef struct tb {
  sg_cbackend *b;
  int starts, stops, closed;
  const char *answer;       /* answers every request with this text (NULL: later) */
  const char *early;        /* an update emitted inside start */
  int early_rc, respond_rc;
  int dead_respond_rc, dead_update_rc;  /* right after an answer that was a violation */
  int requests;
  uint32_t last_seq;
  char seen[4096];          /* every request body, '\n'-separated */
} tb;

static int tb_start(sg_cbackend *b) {
  tb *t = sg_cbackend_data(b);
  t->b = b;
  t->starts++;
  if (t->early) t->early_rc = sg_cbackend_update(b, t->early);
  return 0;
}

static void tb_request(sg_cbackend *b, uint32_t seq, const char *body) {
  tb *t = sg_cbackend_data(b);
  t->requests++;
  t->last_seq = seq;
  size_t n = strlen(t->seen);
  snprintf(t->seen + n, sizeof t->seen - n, "%s\n", body);
  if (strstr(body, "\"RoomJoin\""))
    t->respond_rc = sg_cbackend_respond(b, seq, "{\"type\":\"Success\"}");
  else if (t->answer)
    t->respond_rc = sg_cbackend_respond(b, seq, t->answer);
  if (t->respond_rc == SG_EPROTO) {
    /* Stopped now, before the restart's backoff can run (under load the
     * loop may well reach it before the test looks again). */
    t->dead_respond_rc = sg_cbackend_respond(b, seq, ROOM_ID("!late"));
    t->dead_update_rc = sg_cbackend_update(b, "{\"type\":\"RoomDelete\",\"value\":\"!r\"}");
  }
}

static void tb_stop(sg_cbackend *b) { ((tb *)sg_cbackend_data(b))->stops++; }
static void tb_closed(sg_cbackend *b) { ((tb *)sg_cbackend_data(b))->closed++; }

static const sg_backend_vtable tb_vt = {sizeof tb_vt, tb_start, tb_request, tb_stop, tb_closed};


/* A running host with one C backend, `name`, and no configured backend. */
static void setup_running(fixture *fx, tb *t, const char *name) {
  setup(fx);
  CHECK(sg_host_add_cbackend(fx->host, name, &tb_vt, t, NULL) == 0);
  load_and_start(fx, "backends = {}\n");
}

/* Sends `body` to `name` and runs the loop until the answer is in `r`. */
static void request_and_wait(fixture *fx, const char *name, const char *body, reply *r) {
  memset(r, 0, sizeof *r);
  CHECK(sg_host_request(fx->host, name, body, on_reply, r) == 0);
  CHECK(r->calls == 0);  /* never from inside sg_host_request */
  CHECK(run_until(fx, &r->calls, 1, 3000));
  CHECK(r->calls == 1);
}

/* Sends `body` to C backend `t` and runs the loop until it got it (it leaves
 * the answer to the test). */
static void request_pending(fixture *fx, tb *t, const char *name, const char *body, reply *r) {
  memset(r, 0, sizeof *r);
  CHECK(sg_host_request(fx->host, name, body, on_reply, r) == 0);
  CHECK(run_until(fx, &t->requests, t->requests + 1, 3000));
}

/* ---- the tests ------------------------------------------------------------------- */

static void test_errors(void) {
  CHECK_STR(sg_err_name(SG_EPROTO), "EPROTO");
  CHECK_STR(sg_strerror(SG_EPROTO), "protocol violation");
  CHECK_STR(sg_err_name(SG_ENOBACKEND), "ENOBACKEND");
  CHECK_STR(sg_strerror(SG_ECLOSING), "host is closing");
#define XX(code, msg)                       \
  CHECK_STR(sg_err_name(SG_##code), #code); \
  CHECK_STR(sg_strerror(SG_##code), msg);
  SG_ERRNO_MAP(XX)
#undef XX
  /* libuv's codes pass through unchanged. */
  CHECK_STR(sg_err_name(UV_ENOENT), "ENOENT");
  CHECK_STR(sg_strerror(UV_ENOENT), uv_strerror(UV_ENOENT));
  CHECK_STR(sg_err_name(UV_ECONNREFUSED), "ECONNREFUSED");
  CHECK((int)SG_EPROTO < (int)UV_ENOENT && (int)SG__ERR_LAST < -4096);
  CHECK(sg_err_name(-999999) != NULL && sg_strerror(-999999) != NULL);
  CHECK_STR(sg_version_string(), "0.1.0");
}

static void test_host_on_caller_loop(void) {
  sg_host *h = NULL;
  CHECK(sg_host_new(NULL, NULL, &h) == SG_EINVAL && h == NULL);
  fixture fx;
  setup(&fx);
  CHECK(sg_host_loop(fx.host) == &fx.loop);
  CHECK(sg_host_get_data(fx.host) == NULL);
  sg_host_set_data(fx.host, &fx);
  CHECK(sg_host_get_data(fx.host) == &fx);
  /* A bad config is refused with file:line and changes nothing. */
  const char *bad = "backends = { x = { script = 42 } }\n";
  CHECK(sg_host_load_config_string(fx.host, "bad.lua", bad, strlen(bad)) == SG_ECONFIG);
  CHECK(logged(&fx, "level=error", "bad.lua:1: backends.x.script: expected a string"));
  CHECK(strstr(sg_host_last_error(fx.host), "bad.lua:1: backends.x.script: expected") != NULL);
  CHECK(sg_host_reload(fx.host) == SG_ECONFIG);  /* nothing loaded yet */
  CHECK(sg_host_load_script(fx.host, "/nonexistent/rules.lua") < 0);
  load_and_start(&fx, "backends = {}\n");
  CHECK(sg_host_reload(fx.host) == 0);
  CHECK_STR(sg_host_last_error(fx.host), "");
  CHECK(logged(&fx, "level=info", "reloaded test-config"));
  teardown(&fx);
}

static void test_request_refused(void) {
  fixture fx;
  setup(&fx);
  load_and_start(&fx, "backends = {}\n");
  tb t = {0};
  CHECK(sg_host_add_cbackend(fx.host, "c1", &tb_vt, &t, NULL) == 0);
  CHECK(t.starts == 1);  /* the host runs: it starts at once */
  reply r = {0};
  CHECK(sg_host_request(fx.host, "nobody", ROOM_LOOKUP("#a"), on_reply, &r) == SG_ENOBACKEND);
  CHECK(sg_host_request(fx.host, "c1", "{\"type\":", on_reply, &r) == SG_EPROTO);
  CHECK(sg_host_request(fx.host, "c1", "{\"type\":\"Blink\",\"value\":1}", on_reply, &r) ==
        SG_EPROTO);
  CHECK(sg_host_request(fx.host, "c1", ROOM_LOOKUP("#a"), NULL, &r) == SG_EINVAL);
  int never = 0;
  run_until(&fx, &never, 1, 100);
  CHECK(r.calls == 0);  /* a refused request's callback is never called */
  CHECK(t.requests == 0);
  teardown(&fx);
}

/* Lua sees the C backend: segue.backends() lists it as kind "c", and the
 * script requests from it, naming what it saw, when the update the backend
 * emitted inside start reaches segue.on("update"). */
static const char visible_script[] =
    "local segue = require 'segue'\n"
    "segue.on('update', function(from, u)\n"
    "  if from ~= 'c1' then return end\n"
    "  local seen = {}\n"
    "  for _, b in ipairs(segue.backends()) do seen[#seen + 1] = b.name .. '=' .. b.kind end\n"
    "  table.sort(seen)\n"
    "  local r = assert(segue.backend('c1'):request { type = 'RoomLookup',\n"
    "    value = u.type .. ' ' .. u.value .. ' ' .. table.concat(seen, ',') })\n"
    "  segue.backend('c1'):request { type = 'RoomJoin', value = r.value }\n"
    "end)\n";

static void test_cbackend_round_trip(void) {
  fixture fx;
  setup(&fx);
  tb t = {.answer = ROOM_ID("!x"), .early = "{\"type\":\"RoomDelete\",\"value\":\"!early\"}"};
  sg_cbackend *b = NULL;
  CHECK(sg_host_add_cbackend(fx.host, "c1", &tb_vt, &t, &b) == 0 && b != NULL);
  CHECK_STR(sg_cbackend_name(b), "c1");
  CHECK(sg_cbackend_data(b) == &t);
  CHECK(sg_host_add_cbackend(fx.host, "c1", &tb_vt, &t, NULL) == SG_EEXIST);
  sg_backend_vtable small = {sizeof(size_t), tb_start, tb_request, NULL, NULL};
  CHECK(sg_host_add_cbackend(fx.host, "c2", &small, &t, NULL) == SG_EINVAL);
  CHECK(sg_host_add_cbackend(fx.host, "c3", NULL, &t, NULL) == SG_EINVAL);
  CHECK(sg_host_add_cbackend(fx.host, "", &tb_vt, &t, NULL) == SG_EINVAL);
  CHECK(sg_host_load_script(fx.host, write_script(&fx, visible_script)) == 0);
  CHECK(t.starts == 0);  /* C backends start with the host */
  load_and_start(&fx, "backends = { notes = { script = 'memory' } }\n");
  CHECK(t.starts == 1 && t.early_rc == 0);
  CHECK(logged(&fx, "backend=c1", "started: c1 0.0.0"));

  reply r;
  request_and_wait(&fx, "c1", ROOM_LOOKUP("#a"), &r);
  CHECK(r.err == 0);
  CHECK_STR(r.body, ROOM_ID("!x"));
  CHECK(t.respond_rc == 0);

  CHECK(run_until(&fx, &t.requests, 3, 3000));
  CHECK(strstr(t.seen, ROOM_LOOKUP("RoomDelete !early c1=c,notes=lua") "\n") != NULL);
  CHECK(strstr(t.seen, "{\"type\":\"RoomJoin\",\"value\":\"!x\"}\n") != NULL);

  /* The memory backend answers C as well. */
  request_and_wait(&fx, "notes", ROOM_LOOKUP("#general"), &r);
  CHECK(r.err == 0 && strstr(r.body, "{\"type\":\"RoomID\",\"value\":\"!general") == r.body);
  CHECK(fx.errors == 0);
  teardown(&fx);
  CHECK(t.stops == 1 && t.closed == 1);
}

/* The backend answers later, outside vt->request. */
static void test_cbackend_answers_later(void) {
  fixture fx;
  tb t = {0};
  setup_running(&fx, &t, "slow");
  reply r;
  request_pending(&fx, &t, "slow", ROOM_LOOKUP("#later"), &r);
  CHECK_STR(t.seen, ROOM_LOOKUP("#later") "\n");
  CHECK(r.calls == 0);
  CHECK(sg_cbackend_respond(t.b, t.last_seq, ROOM_ID("!later")) == 0);
  CHECK(r.calls == 1 && r.err == 0);
  CHECK_STR(r.body, ROOM_ID("!later"));
  /* A second answer to the same request is logged and ignored. */
  CHECK(sg_cbackend_respond(t.b, t.last_seq, ROOM_ID("!again")) == 0);
  CHECK(r.calls == 1);
  CHECK(logged(&fx, "level=warn", "which is not in flight"));
  teardown(&fx);
}

/* Waits for the restart after a violation (100 ms backoff, doubling). */
static void wait_restart(fixture *fx, tb *t, int starts) {
  CHECK(run_until(fx, &t->starts, starts, 3000));
  CHECK(t->starts == starts);
}

static void test_cbackend_invalid_values(void) {
  fixture fx;
  tb t = {.answer = "{\"type\":\"RoomID\""};
  setup_running(&fx, &t, "bad");

  /* Invalid JSON: the requester gets EPROTO, the backend is restarted. */
  reply r;
  request_and_wait(&fx, "bad", ROOM_LOOKUP("#a"), &r);
  CHECK(r.err == SG_EPROTO && strstr(r.msg, "violated the protocol") != NULL);
  CHECK(t.respond_rc == SG_EPROTO && t.stops == 1);
  CHECK(logged(&fx, "backend=bad", "protocol violation: invalid JSON at byte offset 16"));
  CHECK(t.dead_respond_rc == SG_EDEAD);
  CHECK(t.dead_update_rc == SG_EDEAD);
  wait_restart(&fx, &t, 2);

  /* Valid JSON, wrong variant for a RoomLookup. */
  t.answer = "{\"type\":\"Success\"}";
  request_and_wait(&fx, "bad", ROOM_LOOKUP("#b"), &r);
  CHECK(r.err == SG_EPROTO && strstr(r.msg, "with Success, expected RoomID") != NULL);
  CHECK(t.respond_rc == SG_EPROTO && t.stops == 2);
  wait_restart(&fx, &t, 3);

  /* An invalid update. */
  CHECK(sg_cbackend_update(t.b, "{\"type\":\"RoomDelete\",\"value\":7}") == SG_EPROTO);
  CHECK(logged(&fx, "protocol violation", "RoomDelete.value: expected a string"));
  CHECK(t.stops == 3);
  wait_restart(&fx, &t, 4);

  /* Inside start, an invalid update fails the start: stopped, restarted. */
  t.early = "{\"type\":\"Nope\"}";
  t.answer = ROOM_ID("!ok");
  CHECK(sg_cbackend_update(t.b, "{\"type\":\"RoomDelete\",\"value\":1}") == SG_EPROTO);
  wait_restart(&fx, &t, 5);
  CHECK(t.early_rc == SG_EPROTO && t.stops == 5);
  CHECK(logged(&fx, "backend=bad", "could not start: protocol violation"));

  /* A good start after all that answers normally. */
  t.early = NULL;
  wait_restart(&fx, &t, 6);
  request_and_wait(&fx, "bad", ROOM_LOOKUP("#c"), &r);
  CHECK(r.err == 0);
  CHECK_STR(r.body, ROOM_ID("!ok"));
  teardown(&fx);
  CHECK(t.closed == 1);
}

/* Errors no Lua caller can receive reach error_cb as SG_ELUA, and the host
 * goes on. */
static const char raising_script[] =
    "local segue = require 'segue'\n"
    "segue.timer(10, function() error('boom from a timer') end)\n"
    "require('segue.loop').timer(20, 0, function() error('boom from a raw timer') end)\n"
    "segue.on('update', function() error('boom from a handler') end)\n";

static void test_error_cb(void) {
  fixture fx;
  tb t = {.answer = ROOM_ID("!fine")};
  setup_running(&fx, &t, "c1");
  CHECK(sg_host_load_script(fx.host, write_script(&fx, raising_script)) == 0);
  CHECK(run_until(&fx, &fx.errors, 2, 3000));
  CHECK(fx.last_err == SG_ELUA);
  CHECK(strstr(fx.error_text, "script0.lua:2: boom from a timer\nstack traceback:") != NULL);
  CHECK(strstr(fx.error_text, "timer callback: ") && strstr(fx.error_text, "boom from a raw timer"));
  CHECK(logged(&fx, "level=error", "boom from a timer"));
  CHECK(sg_cbackend_update(t.b, "{\"type\":\"RoomDelete\",\"value\":\"!r\"}") == 0);
  CHECK(run_until(&fx, &fx.errors, 3, 3000));
  CHECK(fx.last_err == SG_ELUA && strstr(fx.error_text, "boom from a handler") != NULL);
  reply r;
  request_and_wait(&fx, "c1", ROOM_LOOKUP("#still"), &r);
  CHECK(r.err == 0);
  CHECK(fx.errors == 3);
  teardown(&fx);
}

/* Closing with a request in flight: it fails with ECLOSING before the
 * host's close callback, and the backend's own closed callback runs too. */
static void test_close_with_request_in_flight(void) {
  fixture fx;
  tb t = {0};
  setup_running(&fx, &t, "mute");
  reply r;
  request_pending(&fx, &t, "mute", ROOM_LOOKUP("#void"), &r);
  teardown(&fx);
  CHECK(r.calls == 1 && r.err == SG_ECLOSING);
  CHECK(t.stops == 1 && t.closed == 1);
}

/* Closing while a backend waits to restart after a violation (it has no
 * exit to come) still frees everything and calls back. */
static void test_close_during_backoff(void) {
  fixture fx;
  tb t = {0};
  setup_running(&fx, &t, "flaky");
  CHECK(sg_cbackend_update(t.b, "not json") == SG_EPROTO);
  CHECK(logged(&fx, "backend=flaky", "restarting in 100 ms"));
  teardown(&fx);
  CHECK(t.starts == 1 && t.stops == 1 && t.closed == 1);
}

/* sg_host_close from inside a response callback, as the example does. */
static void close_on_reply(void *data, int err, const char *body, const char *msg) {
  fixture *fx = data;
  (void)body;
  (void)msg;
  fx->last_err = err;
  sg_host_close(fx->host, host_closed, fx);
}

static void test_close_from_callback(void) {
  fixture fx;
  setup(&fx);
  load_and_start(&fx, "backends = { notes = { script = 'memory' } }\n");
  CHECK(sg_host_request(fx.host, "notes", ROOM_LOOKUP("#x"), close_on_reply, &fx) == 0);
  uv_run(&fx.loop, UV_RUN_DEFAULT);  /* returns once segue closed everything */
  CHECK(fx.closed == 1 && fx.last_err == 0);
  CHECK(uv_loop_close(&fx.loop) == 0);
  CHECK(remove_tree(fx.dir) == 0);
}

int main(void) {
  test_errors();
  test_host_on_caller_loop();
  test_request_refused();
  test_cbackend_round_trip();
  test_cbackend_answers_later();
  test_cbackend_invalid_values();
  test_error_cb();
  test_close_with_request_in_flight();
  test_close_during_backoff();
  test_close_from_callback();
  return tap_done();
}
