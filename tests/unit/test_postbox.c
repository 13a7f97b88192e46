/* The postbox's delivery rules with a scripted transport on a real uv loop:
 * Pushes in order, spilling to the durable queue, the bound, Pulls that
 * leave the queue only once written, held Pushes, redelivery and dead
 * letters, renames. Outcomes are read from the store's tables. */
#include <sqlite3.h>
#include <stdlib.h>
#include <unistd.h>

#include "postbox.h"
#include "segue.h"
#include "sql_peek.h"
#include "tap.h"

static uv_loop_t loop;
static sg__store *store;
static sg__postbox *pb;
static char path[300];

/* The fake peer: answers each Push after a loop turn with `push_result`. */
static int push_result;
static char pushed[1024];      /* "a;b;" in the order the peer accepted them */
static char delivered[1024];   /* what deliver saw */
static int deliver_fail;       /* deliver fails while > 0 (counts down) */
static char acks[1024];        /* what push callbacks said */

typedef struct {
  uv_timer_t t;
  void *call;
  char ev[64];
} fake_call;

static void fake_closed(uv_handle_t *h) { free(h->data); }

static void fake_answer(uv_timer_t *t) {
  fake_call *c = t->data;
  if (push_result == 0) strncat(pushed, c->ev, sizeof pushed - strlen(pushed) - 1);
  sg__postbox_push_done(pb, c->call, push_result, push_result ? "peer down" : NULL);
  uv_close((uv_handle_t *)t, fake_closed);
}

static int fake_push(void *ud, const char *peer, const uint8_t *ev, size_t len, void *call) {
  (void)ud;
  (void)peer;
  fake_call *c = calloc(1, sizeof *c);
  snprintf(c->ev, sizeof c->ev, "%.*s;", (int)len, (const char *)ev);
  c->call = call;
  uv_timer_init(&loop, &c->t);
  c->t.data = c;
  uv_timer_start(&c->t, fake_answer, 1, 0);
  return 0;
}

static int fake_deliver(void *ud, const char *peer, const uint8_t *ev, size_t len, char *err,
                        size_t errlen) {
  (void)ud;
  if (deliver_fail > 0) {
    deliver_fail--;
    snprintf(err, errlen, "handler raised");
    return SG_ELUA;
  }
  size_t n = strlen(delivered);
  snprintf(delivered + n, sizeof delivered - n, "%s:%.*s;", peer, (int)len, (const char *)ev);
  return 0;
}

static void on_ack(void *ud, int err, int how, const char *message) {
  (void)message;
  size_t n = strlen(acks);
  snprintf(acks + n, sizeof acks - n, "%s=%s;", (const char *)ud,
           err ? "ERR" : how == SG_POSTBOX_PUSHED ? "pushed" : "queued");
}

/* The tables are read through a connection of the test's own: the store
 * keeps SQLite to itself. */
static long long q(const char *sql) { return sql_int(path, sql); }

static const char *q_text(const char *sql) { return sql_rows(path, sql); }

static void run_for(uint64_t ms) {
  uint64_t end = uv_now(&loop) + ms;
  while (uv_now(&loop) < end) {
    uv_run(&loop, UV_RUN_NOWAIT);
    usleep(1000);
    uv_update_time(&loop);
  }
}

/* Runs the loop until `buf` reads `want`, or 5 s passed (then the CHECK_STR
 * after it reports the difference): slack for loaded machines. */
static void run_until(const char *buf, const char *want) {
  uint64_t end = uv_now(&loop) + 5000;
  while (strcmp(buf, want) != 0 && uv_now(&loop) < end) run_for(1);
}

/* A Pull's batch: answered at once on SQLite, awaited anyway. */
static sg__postbox_batch *batch_got;
static int batch_err = 1;
static void on_batch(void *ud, int err, sg__postbox_batch *b) {
  (void)ud;
  batch_err = err;
  batch_got = b;
}

static sg__postbox_batch *pull(const char *peer, size_t max) {
  batch_got = NULL;
  batch_err = 1;
  CHECK(sg__postbox_pull_begin(pb, peer, max, on_batch, NULL) == 0);
  uint64_t end = uv_now(&loop) + 5000;
  while (batch_err == 1 && uv_now(&loop) < end) run_for(1);
  CHECK(batch_err == 0 && batch_got != NULL);
  return batch_got;
}

static int stored_calls;
static void on_stored(void *ud, int err) {
  (void)ud;
  CHECK(err == 0);
  stored_calls++;
}

/* Stores pulled events and waits until they are committed. */
static void receive(const char *peer, const uint8_t *const *evs, const size_t *lens, size_t n) {
  int before = stored_calls;
  CHECK(sg__postbox_receive(pb, peer, evs, lens, n, on_stored, NULL) == 0);
  uint64_t end = uv_now(&loop) + 5000;
  while (stored_calls == before && uv_now(&loop) < end) run_for(1);
}

static int push(const char *peer, const char *ev) {
  return sg__postbox_push(pb, peer, (const uint8_t *)ev, strlen(ev), on_ack, (void *)ev);
}

static void open_postbox(unsigned limit) {
  char err[600];
  if (!store) CHECK(sg__store_open(path, &store, err, sizeof err) == 0);
  sg__postbox_transport tp = {fake_push, fake_deliver, NULL};
  sg__postbox_options o;
  sg__postbox_options_default(&o);
  o.push_backoff_ms = 2;
  o.deliver_backoff_ms = 2;
  o.deliver_tries = 3;
  o.queue_limit = limit;
  CHECK(sg__postbox_new(&loop, store, &tp, &o, &pb) == 0);
}

static void close_all(void) {
  sg__postbox_close(pb, NULL, NULL);
  uv_run(&loop, UV_RUN_DEFAULT);
  pb = NULL;
  sg__store_close(store);
  store = NULL;
}

static void reset(void) {
  pushed[0] = delivered[0] = acks[0] = '\0';
  push_result = 0;
  deliver_fail = 0;
}

static void test_push_in_order(void) {
  reset();
  CHECK(push("b:1", "e1") == 0);
  CHECK(push("b:1", "e2") == 0);
  CHECK(push("b:1", "e3") == 0);
  run_until(acks, "e1=pushed;e2=pushed;e3=pushed;");
  CHECK_STR(pushed, "e1;e2;e3;");
  CHECK_STR(acks, "e1=pushed;e2=pushed;e3=pushed;");
  CHECK(q("SELECT count(*) FROM outbox") == 0);
  CHECK(q("SELECT last_push > 0 FROM peers WHERE server_id = 'b:1'") == 1);
}

static void test_spill_then_queue(void) {
  reset();
  push_result = SG_EHTTP;
  CHECK(push("c:1", "f1") == 0);
  CHECK(push("c:1", "f2") == 0);
  run_until(acks, "f1=queued;f2=queued;");
  CHECK_STR(acks, "f1=queued;f2=queued;");
  CHECK_STR(q_text("SELECT CAST(event AS TEXT) FROM outbox WHERE peer = 'c:1' ORDER BY seq"),
            "f1;f2;");
  CHECK_STR(q_text("SELECT last_error FROM peers WHERE server_id = 'c:1'"), "peer down;");
  /* The queue is not empty: the peer is up again, but nothing is Pushed. */
  push_result = 0;
  CHECK(push("c:1", "f3") == 0);
  run_until(acks, "f1=queued;f2=queued;f3=queued;");
  run_for(20);
  CHECK_STR(pushed, "");
  CHECK(q("SELECT count(*) FROM outbox WHERE peer = 'c:1'") == 3);
}

static void test_limit(void) {
  /* c:1 holds 3 events; the limit is 4. */
  CHECK(push("c:1", "f4") == 0);
  CHECK(push("c:1", "f5") == SG_ELIMIT);
  CHECK(strstr(sg__postbox_errmsg(pb), "queue full") != NULL);
  run_until(acks, "f1=queued;f2=queued;f3=queued;f4=queued;");
  CHECK_STR(acks, "f1=queued;f2=queued;f3=queued;f4=queued;");
  CHECK(q("SELECT count(*) FROM outbox WHERE peer = 'c:1'") == 4);
}

static void test_pull(void) {
  sg__postbox_batch *b, *second;
  /* At most ~4 bytes: two events of 2 bytes. */
  b = pull("c:1", 4);
  CHECK(b->n == 2);
  CHECK(memcmp(b->events[0], "f1", 2) == 0 && memcmp(b->events[1], "f2", 2) == 0);
  /* A concurrent Pull gets nothing rather than the same events twice. */
  second = pull("c:1", 1000);
  CHECK(second->n == 0);
  CHECK(sg__postbox_pull_end(pb, second, 0) == 0);
  /* The write failed: everything stays. */
  CHECK(sg__postbox_pull_end(pb, b, SG_ECANCELED) == 0);
  run_for(5);
  CHECK(q("SELECT count(*) FROM outbox WHERE peer = 'c:1'") == 4);
  /* Written: those events leave, the rest stays in order. */
  b = pull("c:1", 4);
  CHECK(b->n == 2);
  CHECK(sg__postbox_pull_end(pb, b, 0) == 0);
  run_for(5);
  CHECK_STR(q_text("SELECT CAST(event AS TEXT) FROM outbox WHERE peer = 'c:1' ORDER BY seq"),
            "f3;f4;");
  b = pull("c:1", 1 << 20);
  CHECK(b->n == 2);
  CHECK(sg__postbox_pull_end(pb, b, 0) == 0);
  run_for(5);
  CHECK(q("SELECT count(*) FROM outbox WHERE peer = 'c:1'") == 0);
  CHECK(q("SELECT last_served > 0 FROM peers WHERE server_id = 'c:1'") == 1);
  /* Drained: Pushes again. */
  reset();
  CHECK(push("c:1", "f6") == 0);
  run_until(pushed, "f6;");
  CHECK_STR(pushed, "f6;");
}

static void test_inbound_hold(void) {
  reset();
  CHECK(sg__postbox_hold(pb, "d:1") == 0);
  const char *ev = "pushed-late";
  size_t len = strlen(ev);
  CHECK(sg__postbox_receive_push(pb, "d:1", (const uint8_t *)ev, len, on_stored, NULL) == 0);
  run_for(10);
  CHECK(q("SELECT count(*) FROM inbox") == 0);  /* held, unanswered */
  const uint8_t *pulled[2] = {(const uint8_t *)"p1", (const uint8_t *)"p2"};
  size_t lens[2] = {2, 2};
  receive("d:1", pulled, lens, 2);
  run_for(10);
  CHECK_STR(delivered, "");  /* still held */
  CHECK(stored_calls == 1);  /* the Pull's; the held Push is unanswered */
  CHECK(sg__postbox_release(pb, "d:1") == 0);
  run_for(5);
  CHECK(stored_calls == 2);
  run_until(delivered, "d:1:p1;d:1:p2;d:1:pushed-late;");
  CHECK_STR(delivered, "d:1:p1;d:1:p2;d:1:pushed-late;");
  CHECK(q("SELECT count(*) FROM inbox") == 0);
  /* Not held: stored at once. */
  CHECK(sg__postbox_receive_push(pb, "d:1", (const uint8_t *)"x", 1, on_stored, NULL) == 0);
  run_until(delivered, "d:1:p1;d:1:p2;d:1:pushed-late;d:1:x;");
  CHECK_STR(delivered, "d:1:p1;d:1:p2;d:1:pushed-late;d:1:x;");
}

static void test_redelivery_and_dead_letters(void) {
  reset();
  deliver_fail = 2;  /* fails twice, then succeeds (deliver_tries is 3) */
  const uint8_t *ev[1] = {(const uint8_t *)"r1"};
  size_t len[1] = {2};
  receive("e:1", ev, len, 1);
  run_until(delivered, "e:1:r1;");
  CHECK_STR(delivered, "e:1:r1;");
  CHECK(q("SELECT count(*) FROM inbox") == 0);
  reset();
  deliver_fail = 3;  /* every try fails: dead letter, and the next one goes on */
  const uint8_t *two[2] = {(const uint8_t *)"bad", (const uint8_t *)"good"};
  size_t lens[2] = {3, 4};
  receive("e:1", two, lens, 2);
  run_until(delivered, "e:1:good;");
  CHECK_STR(delivered, "e:1:good;");
  CHECK(q("SELECT count(*) FROM inbox") == 0);
  CHECK_STR(q_text("SELECT CAST(event AS TEXT) || '/' || direction || '/' || error || '/'"
                   " || attempts FROM dead_letters"),
            "bad/in/handler raised/3;");
}

static int push_in(const char *peer, const char *ev) {
  return sg__postbox_receive_push(pb, peer, (const uint8_t *)ev, strlen(ev), on_stored, NULL);
}

/* Pushes: stored with the peer's last_push_in, delivered once each and in
 * order, also once the inbox is known to be empty (then from memory: one
 * writer), through a failed delivery (retried from the store, counted) and
 * a dead letter. */
static void test_pushes_in_order(void) {
  reset();
  int before = stored_calls;
  CHECK(push_in("g:1", "a1") == 0);
  CHECK(push_in("g:1", "a2") == 0);
  CHECK(push_in("g:1", "a3") == 0);
  run_until(delivered, "g:1:a1;g:1:a2;g:1:a3;");
  CHECK_STR(delivered, "g:1:a1;g:1:a2;g:1:a3;");
  CHECK(stored_calls == before + 3);
  CHECK(q("SELECT count(*) FROM inbox") == 0);
  CHECK(q("SELECT last_push_in > 0 FROM peers WHERE server_id = 'g:1'") == 1);
  for (int round = 0; round < 2; round++) {  /* once more after the inbox was seen empty */
    reset();
    CHECK(push_in("g:1", "b1") == 0);
    run_for(1);
    CHECK(push_in("g:1", "b2") == 0);
    run_until(delivered, "g:1:b1;g:1:b2;");
    CHECK_STR(delivered, "g:1:b1;g:1:b2;");
    CHECK(q("SELECT count(*) FROM inbox") == 0);
  }
  reset();
  deliver_fail = 1;  /* b3 fails once: retried before b4 */
  CHECK(push_in("g:1", "b3") == 0);
  CHECK(push_in("g:1", "b4") == 0);
  run_until(delivered, "g:1:b3;g:1:b4;");
  CHECK_STR(delivered, "g:1:b3;g:1:b4;");
  CHECK(q("SELECT count(*) FROM inbox") == 0);
  reset();
  CHECK(push_in("g:1", "c0") == 0);
  run_until(delivered, "g:1:c0;");
  reset();
  deliver_fail = 3;  /* c1 dies (deliver_tries 3), c2 goes on */
  CHECK(push_in("g:1", "c1") == 0);
  CHECK(push_in("g:1", "c2") == 0);
  run_until(delivered, "g:1:c2;");
  CHECK_STR(delivered, "g:1:c2;");
  CHECK(q("SELECT count(*) FROM inbox") == 0);
  CHECK_STR(q_text("SELECT CAST(event AS TEXT) || '/' || attempts FROM dead_letters"
                   " WHERE peer = 'g:1'"),
            "c1/3;");
}

static int renamed_err = 99, key_err = 99;
static uint8_t key_got[32];
static void on_renamed(void *ud, int err) {
  (void)ud;
  renamed_err = err;
}
static void on_key(void *ud, int err, const uint8_t *key) {
  (void)ud;
  key_err = err;
  if (key) memcpy(key_got, key, 32);
}

static void test_rename(void) {
  reset();
  uint8_t key[32];
  memset(key, 7, sizeof key);
  CHECK(sg__postbox_key_remember(pb, "old:1", key) == 0);
  push_result = SG_EHTTP;
  CHECK(push("old:1", "o1") == 0);
  run_until(acks, "o1=queued;");
  CHECK(sg__store_map_put(store, "old:1", "m1", "irc", "i1", NULL) == 0);
  CHECK(sg__postbox_rename_peer(pb, "old:1", "new:1", on_renamed, NULL) == 0);
  run_for(5);
  CHECK(renamed_err == 0);
  CHECK(q("SELECT count(*) FROM peers WHERE server_id = 'old:1'") == 0);
  CHECK_STR(q_text("SELECT peer FROM outbox WHERE CAST(event AS TEXT) = 'o1'"), "new:1;");
  CHECK(sg__postbox_key_get(pb, "new:1", on_key, NULL) == 0);
  run_for(5);
  CHECK(key_err == 0 && memcmp(key_got, key, 32) == 0);
  CHECK_STR(q_text("SELECT origin_backend FROM msg_map WHERE copy_id = 'i1'"), "new:1;");
  CHECK(sg__postbox_rename_peer(pb, "nobody:1", "x:1", on_renamed, NULL) == 0);
  run_for(5);
  CHECK(renamed_err == SG_STORE_NOTFOUND);
}

static void test_survives_reopen(void) {
  /* Queue and inbox are durable: a new postbox delivers what was left. */
  reset();
  deliver_fail = 1000;
  const uint8_t *ev[1] = {(const uint8_t *)"left"};
  size_t len[1] = {4};
  receive("f:1", ev, len, 1);
  close_all();
  reset();
  open_postbox(4);
  run_until(delivered, "f:1:left;");
  CHECK_STR(delivered, "f:1:left;");
  CHECK(q("SELECT count(*) FROM outbox WHERE peer = 'new:1'") == 1);
}

int main(void) {
  char dir[] = "/tmp/segue-test-postbox-XXXXXX";
  if (!mkdtemp(dir)) return 2;
  snprintf(path, sizeof path, "%s/segue.db", dir);
  uv_loop_init(&loop);
  open_postbox(4);
  test_push_in_order();
  test_spill_then_queue();
  test_limit();
  test_pull();
  test_inbound_hold();
  test_redelivery_and_dead_letters();
  test_pushes_in_order();
  test_rename();
  test_survives_reopen();
  close_all();
  CHECK(uv_loop_close(&loop) == 0);
  char cmd[400];
  snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
  if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", dir);
  return tap_done();
}
