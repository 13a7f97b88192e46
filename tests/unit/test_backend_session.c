/* The backend-protocol session (runtime/flubber/backend.c) against an in-memory
 * transport: sequence numbers wrap and skip those in flight, answers reach
 * the right caller, retries, time-outs, violations and restarts. */
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "tap.h"

typedef struct {
  uint32_t seqs[64];
  char types[64][32];
  int sent, starts, stops;
} fake;

static fake F;

static int fake_start(sg__backend *b) {
  F.starts++;
  cJSON *init = cJSON_Parse("{\"backend_name\":\"t\",\"backend_version\":[1,0,0],"
                            "\"protocol_version\":[0,1,0]}");
  sg__backend_on_value(b, SG_FL_INIT_INFO, init);
  return 0;
}

static int fake_send(sg__backend *b, const cJSON *req) {
  (void)b;
  F.seqs[F.sent] = (uint32_t)cJSON_GetNumberValue(cJSON_GetObjectItem(req, "sequence_number"));
  const cJSON *body = cJSON_GetObjectItem(req, "body");
  snprintf(F.types[F.sent], sizeof F.types[0], "%s", cJSON_GetObjectItem(body, "type")->valuestring);
  F.sent++;
  return 0;
}

static void fake_stop(sg__backend *b, int graceful) {
  (void)graceful;
  F.stops++;
  sg__backend_on_exit(b, "stopped by the test");
}

static const sg__transport fake_tp = {
    .kind = "fake", .start = fake_start, .send = fake_send, .stop = fake_stop};

typedef struct {
  int calls, err;
  char body[256], msg[256];
} outcome;

static void done(void *ud, int err, const cJSON *body, const char *msg) {
  outcome *o = ud;
  o->calls++;
  o->err = err;
  char *s = body ? cJSON_PrintUnformatted(body) : NULL;
  snprintf(o->body, sizeof o->body, "%s", s ? s : "");
  snprintf(o->msg, sizeof o->msg, "%s", msg ? msg : "");
  free(s);
}

static void respond(sg__backend *b, uint32_t seq, const char *body) {
  char text[512];
  snprintf(text, sizeof text, "{\"sequence_number\":%u,\"body\":%s}", seq, body);
  sg__backend_on_value(b, SG_FL_RESPONSE, cJSON_Parse(text));
}

static int request(sg__backend *b, const char *json, outcome *o) {
  char err[256];
  cJSON *body = cJSON_Parse(json);
  int rc = sg__backend_request(b, body, done, o, err, sizeof err);
  cJSON_Delete(body);
  return rc;
}

static int closed;
static void on_closed(sg__backend *b) { (void)b; closed = 1; }
static const sg__backend_events events = {NULL, NULL, on_closed};
static const sg__logger quiet = {SG_LOG_ERROR, NULL, NULL};

static const char *lookup = "{\"type\":\"RoomLookup\",\"value\":\"#a\"}";

/* Runs the loop while `cond` holds, for at most 10 s of loop time, so a
 * broken expectation fails the test instead of hanging it. */
#define RUN_WHILE(loop, cond)                                               \
  do {                                                                     \
    uint64_t until_ = uv_now(loop) + 10000;                                \
    while ((cond) && uv_now(loop) < until_) {                              \
      uv_update_time(loop);                                                \
      uv_run(loop, UV_RUN_NOWAIT);                                         \
    }                                                                      \
    CHECK(!(cond));                                                        \
  } while (0)

static void test_sequence_numbers(uv_loop_t *loop, sg__backend *b) {
  outcome o[4] = {{0}};
  b->next_seq = 0xFFFFFFFEu;
  for (int i = 0; i < 3; i++) CHECK(request(b, lookup, &o[i]) == 0);
  CHECK(o[0].calls == 0);  /* never from inside the request call */
  uv_run(loop, UV_RUN_NOWAIT);
  CHECK(F.sent == 3);
  CHECK(F.seqs[0] == 0xFFFFFFFEu && F.seqs[1] == 0xFFFFFFFFu && F.seqs[2] == 0);
  /* 0xFFFFFFFF still in flight: wrapping onto it skips it */
  respond(b, 0xFFFFFFFEu, "{\"type\":\"RoomID\",\"value\":\"!one\"}");
  respond(b, 0, "{\"type\":\"RoomID\",\"value\":\"!three\"}");
  b->next_seq = 0xFFFFFFFFu;
  CHECK(request(b, lookup, &o[3]) == 0);
  uv_run(loop, UV_RUN_NOWAIT);
  CHECK(F.seqs[3] == 0);
  CHECK_STR(o[0].body, "{\"type\":\"RoomID\",\"value\":\"!one\"}");
  CHECK_STR(o[2].body, "{\"type\":\"RoomID\",\"value\":\"!three\"}");
  respond(b, 0xFFFFFFFFu, "{\"type\":\"RoomID\",\"value\":\"!two\"}");
  respond(b, 0, "{\"type\":\"RoomID\",\"value\":\"!four\"}");
  CHECK_STR(o[1].body, "{\"type\":\"RoomID\",\"value\":\"!two\"}");
  CHECK_STR(o[3].body, "{\"type\":\"RoomID\",\"value\":\"!four\"}");
  for (int i = 0; i < 4; i++) CHECK(o[i].calls == 1 && o[i].err == 0);
}

static void test_invalid_body_refused(sg__backend *b) {
  outcome o = {0};
  char err[256];
  cJSON *body = cJSON_Parse("{\"type\":\"RoomLookup\",\"value\":3}");
  CHECK(sg__backend_request(b, body, done, &o, err, sizeof err) == SG_EPROTO);
  CHECK(strstr(err, "RoomLookup.value: expected a string") != NULL);
  cJSON_Delete(body);
  CHECK(o.calls == 0);
}

static void test_retry_then_success(uv_loop_t *loop, sg__backend *b) {
  outcome o = {0};
  int before = F.sent;
  CHECK(request(b, lookup, &o) == 0);
  uv_run(loop, UV_RUN_NOWAIT);
  for (int i = 0; i < 2; i++) {
    respond(b, F.seqs[F.sent - 1], "{\"type\":\"Error\",\"value\":{\"message\":\"busy\",\"retry\":true}}");
    CHECK(o.calls == 0);
    RUN_WHILE(loop, F.sent == before + 1 + i);  /* the backoff timer */
  }
  CHECK(F.sent == before + 3);
  CHECK(F.seqs[F.sent - 1] != F.seqs[F.sent - 2]);  /* a retry is a new request */
  respond(b, F.seqs[F.sent - 1], "{\"type\":\"RoomID\",\"value\":\"!ok\"}");
  CHECK(o.calls == 1 && o.err == 0);
}

static void test_wrong_variant_restarts(uv_loop_t *loop, sg__backend *b) {
  outcome o = {0}, later = {0};
  int starts = F.starts;
  CHECK(request(b, lookup, &o) == 0);
  uv_run(loop, UV_RUN_NOWAIT);
  respond(b, F.seqs[F.sent - 1], "{\"type\":\"Success\",\"value\":null}");
  CHECK(o.calls == 1 && o.err == SG_EPROTO);
  CHECK(strstr(o.msg, "with Success, expected RoomID") != NULL);
  CHECK(b->state == SG_BACKEND_BACKOFF);
  CHECK(request(b, lookup, &later) == 0);  /* waits for the restart */
  RUN_WHILE(loop, F.starts == starts);
  uv_run(loop, UV_RUN_NOWAIT);
  CHECK(b->state == SG_BACKEND_RUNNING && b->restarts == 1);
  respond(b, F.seqs[F.sent - 1], "{\"type\":\"RoomID\",\"value\":\"!back\"}");
  CHECK(later.calls == 1 && later.err == 0);
}

static void test_timeout(uv_loop_t *loop, sg__backend *b) {
  outcome o = {0};
  b->cfg.request_timeout_ms = 50;
  CHECK(request(b, lookup, &o) == 0);
  RUN_WHILE(loop, o.calls == 0);
  CHECK(o.err == SG_ETIMEDOUT);
  CHECK(strstr(o.msg, "timed out after 50 ms") != NULL);
  /* the late answer is ignored, not fatal */
  respond(b, F.seqs[F.sent - 1], "{\"type\":\"RoomID\",\"value\":\"!late\"}");
  CHECK(o.calls == 1 && b->state == SG_BACKEND_RUNNING);
}

int main(void) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  sg__backend *b = calloc(1, sizeof *b);
  sg__backend_config cfg;
  sg__backend_config_defaults(&cfg);
  cfg.retry_initial_ms = 1;
  cfg.backoff_initial_ms = 1;
  cfg.request_timeout_ms = 5000;  /* slow machines (valgrind) must not time out */
  CHECK(sg__backend_init(&loop, b, "t", &fake_tp, &cfg, &events, &quiet) == 0);
  CHECK(sg__backend_start(b) == 0);
  CHECK(b->state == SG_BACKEND_RUNNING);
  test_sequence_numbers(&loop, b);
  test_invalid_body_refused(b);
  test_retry_then_success(&loop, b);
  test_wrong_variant_restarts(&loop, b);
  test_timeout(&loop, b);
  outcome dead = {0};
  sg__backend_close(b);
  CHECK(request(b, lookup, &dead) == SG_EDEAD);
  uv_run(&loop, UV_RUN_DEFAULT);
  CHECK(closed == 1);
  free(b);
  CHECK(uv_loop_close(&loop) == 0);
  return tap_done();
}
