/* The store's PostgreSQL engine against a real server (driven by
 * tests/integration/test_store_pg.py, which starts the server):
 *   pg_store_check DSN DSN2 RESTART-COMMAND...
 * - the engine-neutral checks (store_async_checks.h) on DSN;
 * - three stores opening DSN2 (a fresh database) at once migrate it once
 *   (the advisory lock; the test reads segue_schema afterwards);
 * - a stream of writes with the server restarted in the middle (RESTART-
 *   COMMAND, spawned on the loop): every write is acknowledged and then
 *   read back: the engine reconnected and lost nothing;
 * - the busy hook (sg__store_set_busy) counts every call made and counts it
 *   off just before its answer; a close drops what is left without it;
 * - a postbox closed while the store has not answered a Pull yet hands out
 *   no batch (nobody would end it) and the events stay queued. */
#include <stdio.h>

#include "postbox.h"
#include "store_async_checks.h"

#define WRITES 3000
#define IN_FLIGHT 40
#define RESTART_AT 600

static sg__store *load_store;
static int issued, acked, failed, restart_status = -1, restarting;
static char **restart_argv;
static uv_process_t restart_proc;

static void restart_exited(uv_process_t *p, int64_t status, int sig) {
  restart_status = (int)status + sig;
  uv_close((uv_handle_t *)p, NULL);
}

static void issue(void);

/* The busy hook's count, and how often it disagreed with the calls out. */
static int busy_now, busy_max, busy_wrong;
static void count_busy(void *ud, int delta) {
  (void)ud;
  busy_now += delta;
  if (busy_now > busy_max) busy_max = busy_now;
  if (busy_now < 0) busy_wrong++;
}

static void write_done(void *ud, const sg__store_reply *r) {
  (void)ud;
  if (busy_now != issued - acked - 1) busy_wrong++;  /* this one counted off already */
  if (r->err) {
    failed++;
    fprintf(stderr, "write failed: %s\n", r->message);
  }
  acked++;
  if (acked == RESTART_AT && !restarting) {
    restarting = 1;
    uv_process_options_t o = {.exit_cb = restart_exited, .file = restart_argv[0],
                              .args = restart_argv};
    uv_stdio_container_t io[3] = {{.flags = UV_IGNORE}, {.flags = UV_INHERIT_FD, .data.fd = 2},
                                  {.flags = UV_INHERIT_FD, .data.fd = 2}};
    o.stdio = io;
    o.stdio_count = 3;
    int rc = uv_spawn(chk_loop, &restart_proc, &o);
    if (rc) fprintf(stderr, "cannot spawn the restart: %s\n", uv_strerror(rc));
    CHECK(rc == 0);
  }
  issue();
}

static void issue(void) {
  while (issued < WRITES && issued - acked < IN_FLIGHT) {
    char k[32], v[32];
    snprintf(k, sizeof k, "load.%05d", issued);
    snprintf(v, sizeof v, "v%d", issued);
    issued++;
    CHECK(sg__store_kv_set_async(load_store, k, v, write_done, NULL) == 0);
  }
}

static int read_ok, read_done;
static void read_back(void *ud, const sg__store_reply *r) {
  char want[32];
  snprintf(want, sizeof want, "v%d", (int)(intptr_t)ud);
  if (r->err == 0 && r->text[0] && strcmp(r->text[0], want) == 0) read_ok++;
  read_done++;
}

/* ---- a Pull answered after its postbox began closing ---------------- */

static int refuse_push(void *ud, const char *peer, const uint8_t *ev, size_t len, void *call) {
  (void)ud, (void)peer, (void)ev, (void)len, (void)call;
  return SG_EHTTP;  /* the peer is down: the event is queued */
}
static int no_deliver(void *ud, const char *peer, const uint8_t *ev, size_t len, char *err,
                      size_t errlen) {
  (void)ud, (void)peer, (void)ev, (void)len, (void)err, (void)errlen;
  return 0;
}
static int queued_acks, pb_closed_n, batch_calls, batch_err_seen;
static sg__postbox_batch *batch_seen;
static void on_queued(void *ud, int err, int how, const char *message) {
  (void)ud, (void)message;
  if (err == 0 && how == SG_POSTBOX_QUEUED) queued_acks++;
}
static void on_pb_closed(void *ud) { (void)ud, pb_closed_n++; }
static void on_pull(void *ud, int err, sg__postbox_batch *b) {
  (void)ud;
  batch_calls++;
  batch_err_seen = err;
  batch_seen = b;
}
static void run_until_flag(int *flag, int want) {
  uint64_t end = uv_now(chk_loop) + 20000;
  while (*flag < want && uv_now(chk_loop) < end) {
    uv_run(chk_loop, UV_RUN_ONCE);
    uv_update_time(chk_loop);
  }
}
static sg__postbox *new_postbox(sg__store *s) {
  sg__postbox_transport tp = {refuse_push, no_deliver, NULL};
  sg__postbox_options o;
  sg__postbox_options_default(&o);
  o.instance = "check";
  sg__postbox *pb = NULL;
  CHECK(sg__postbox_new(chk_loop, s, &tp, &o, &pb) == 0);
  return pb;
}

static void check_pull_at_close(sg__store *s) {
  sg__postbox *pb = new_postbox(s);
  CHECK(sg__postbox_push(pb, "late.example:1", (const uint8_t *)"ev1", 3, on_queued, NULL) == 0);
  run_until_flag(&queued_acks, 1);
  CHECK(queued_acks == 1);
  /* The Pull's claim is on its way to the server when the postbox closes. */
  CHECK(sg__postbox_pull_begin(pb, "late.example:1", 1 << 20, on_pull, NULL) == 0);
  CHECK(batch_calls == 0);
  sg__postbox_close(pb, on_pb_closed, NULL);
  run_until_flag(&pb_closed_n, 1);
  CHECK(pb_closed_n == 1);
  CHECK(batch_calls == 1);
  CHECK(batch_err_seen == SG_ECANCELED && batch_seen == NULL);
  /* Still queued: the next postbox serves it. */
  pb = new_postbox(s);
  batch_calls = 0;
  CHECK(sg__postbox_pull_begin(pb, "late.example:1", 1 << 20, on_pull, NULL) == 0);
  run_until_flag(&batch_calls, 1);
  CHECK(batch_err_seen == 0 && batch_seen && batch_seen->n == 1);
  if (batch_seen) {
    CHECK(batch_seen->n == 1 && memcmp(batch_seen->events[0], "ev1", 3) == 0);
    CHECK(sg__postbox_pull_end(pb, batch_seen, 0) == 0);
  }
  sg__postbox_close(pb, on_pb_closed, NULL);
  run_until_flag(&pb_closed_n, 2);
  CHECK(pb_closed_n == 2);
}

static sg__store *open_pg(const char *dsn) {
  char err[600];
  sg__store *s = NULL;
  sg__store_config c = {.engine = "postgresql", .dsn = dsn, .loop = chk_loop, .pool = 3};
  int rc = sg__store_open_with(&c, &s, err, sizeof err);
  if (rc) fprintf(stderr, "open: %s\n", err);
  CHECK(rc == 0);
  return s;
}

int main(int argc, char **argv) {
  if (argc < 4) {
    fprintf(stderr, "usage: pg_store_check DSN DSN2 RESTART-COMMAND...\n");
    return 2;
  }
  uv_loop_t loop;
  uv_loop_init(&loop);
  chk_loop = &loop;
  restart_argv = argv + 3;

  sg__store *s = open_pg(argv[1]);
  CHECK(sg__store_is_async(s));
  CHECK_STR(sg__store_engine(s), "postgresql");
  check_async_ops(s);
  check_postbox_ops(s);
  check_api_ops(s);
  check_pull_at_close(s);
  /* The synchronous operations are SQLite's: refused, never a crash. */
  char *v = NULL;
  CHECK(sg__store_kv_get(s, "x", &v) == SG_ESTORE);
  CHECK(strstr(sg__store_errmsg(s), "asynchronous") != NULL);

  /* Three instances starting together on a fresh database. */
  sg__store *m[3];
  outcome mo[3];
  for (int i = 0; i < 3; i++) m[i] = open_pg(argv[2]);
  for (int i = 0; i < 3; i++) CALL(mo[i], sg__store_kv_get_async(m[i], "x", record, &mo[i]));
  settle(30000);
  for (int i = 0; i < 3; i++) {
    CHECK(mo[i].done && mo[i].err == SG_STORE_NOTFOUND);
    if (mo[i].err < 0) fprintf(stderr, "migrate %d: %s\n", i, mo[i].message);
    sg__store_close(m[i]);
  }

  /* The stream, and the restart in its middle. */
  load_store = s;
  sg__store_set_busy(s, count_busy, NULL);
  issue();
  uint64_t end = uv_now(&loop) + 90000;
  while ((acked < WRITES || restart_status < 0) && uv_now(&loop) < end) {
    uv_run(&loop, UV_RUN_ONCE);
    uv_update_time(&loop);
  }
  fprintf(stderr, "writes: %d acknowledged, %d failed; restart exit %d\n", acked, failed,
          restart_status);
  CHECK(acked == WRITES);
  CHECK(failed == 0);
  CHECK(restart_status == 0);
  for (int i = 0; i < WRITES; i++) {
    char k[32];
    snprintf(k, sizeof k, "load.%05d", i);
    CHECK(sg__store_kv_get_async(s, k, read_back, (void *)(intptr_t)i) == 0);
  }
  end = uv_now(&loop) + 60000;
  while (read_done < WRITES && uv_now(&loop) < end) {
    uv_run(&loop, UV_RUN_ONCE);
    uv_update_time(&loop);
  }
  fprintf(stderr, "read back: %d of %d\n", read_ok, WRITES);
  CHECK(read_ok == WRITES);
  fprintf(stderr, "busy: at most %d, %d wrong, %d at the end\n", busy_max, busy_wrong, busy_now);
  CHECK(busy_wrong == 0);
  CHECK(busy_max >= IN_FLIGHT);
  CHECK(busy_now == 0);

  /* Closed with calls out: they hear SG_ECANCELED at once; the hook is not
   * called (the caller knows how many it had out). */
  outcome out[5];
  for (int i = 0; i < 5; i++) CALL(out[i], sg__store_kv_set_async(s, "late", "x", record, &out[i]));
  CHECK(busy_now == 5);
  sg__store_close(s);
  for (int i = 0; i < 5; i++) CHECK(out[i].done && out[i].err == SG_ECANCELED);
  CHECK(busy_now == 5);
  uv_run(&loop, UV_RUN_DEFAULT);
  CHECK(uv_loop_close(&loop) == 0);
  return tap_done();
}
