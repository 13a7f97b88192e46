/* Pushes stored by the postbox in C (runtime/harmony/postbox_push.h): the
 * reader that finds the Event's bytes in a PushRequest body (reused as they
 * are, or packed again from the decode), then the whole path on a real
 * loop: a federation signs Pushes to another, whose postbox stores them;
 * what was stored is read back from the store's inbox, what was answered
 * from the client's callback. */
#include <protobuf-c/protobuf-c.h>
#include <sqlite3.h>
#include <stdlib.h>
#include <unistd.h>

#include "postbox_push.h"
#include "protocol/sync/v1/sync.pb-c.h"
#include "segue.h"
#include "sql_peek.h"
#include "tap.h"

#define PUSH_PATH "/protocol.sync.v1.PostboxService/Push"

static int span(const uint8_t *body, size_t n, size_t *off, size_t *len) {
  *off = *len = 999;
  return sg__postbox_push_event_span(body, n, off, len);
}

/* The Event of the tests: user_invited { user_id 7, inviter_id 8, invite_id id }. */
static size_t pack_event(const char *invite_id, uint8_t *out, size_t cap) {
  Protocol__Sync__V1__Event__UserInvited ui = PROTOCOL__SYNC__V1__EVENT__USER_INVITED__INIT;
  ui.user_id = 7;
  ui.inviter_id = 8;
  ui.invite_id = (char *)invite_id;
  Protocol__Sync__V1__Event ev = PROTOCOL__SYNC__V1__EVENT__INIT;
  ev.kind_case = PROTOCOL__SYNC__V1__EVENT__KIND_USER_INVITED;
  ev.user_invited = &ui;
  size_t n = protobuf_c_message_get_packed_size(&ev.base);
  if (n > cap) return 0;
  return protobuf_c_message_pack(&ev.base, out);
}

static void test_span(void) {
  /* The reader's tag is the descriptor's field number. */
  const ProtobufCFieldDescriptor *fd = protobuf_c_message_descriptor_get_field_by_name(
      &protocol__sync__v1__push_request__descriptor, "event");
  CHECK(fd && fd->id == 1 && fd->type == PROTOBUF_C_TYPE_MESSAGE);

  uint8_t ev[64], body[128];
  size_t n = pack_event("c", ev, sizeof ev), off, len;
  CHECK(n > 0 && n < 128);
  /* The body as protobuf-c packs it: the event's bytes are found as they are. */
  Protocol__Sync__V1__Event *dec = protocol__sync__v1__event__unpack(NULL, n, ev);
  Protocol__Sync__V1__PushRequest req = PROTOCOL__SYNC__V1__PUSH_REQUEST__INIT;
  req.event = dec;
  size_t bn = protocol__sync__v1__push_request__pack(&req, body);
  protocol__sync__v1__event__free_unpacked(dec, NULL);
  CHECK(span(body, bn, &off, &len) == 1);
  CHECK(off == 2 && len == n && memcmp(body + off, ev, n) == 0);

  /* A longer length encoding than needed (0x85 0x00 is 5) is still that field. */
  uint8_t padded[] = {0x0a, 0x85, 0x00, 1, 2, 3, 4, 5};
  CHECK(span(padded, sizeof padded, &off, &len) == 1 && off == 3 && len == 5);
  /* An empty event. */
  uint8_t empty[] = {0x0a, 0x00};
  CHECK(span(empty, sizeof empty, &off, &len) == 1 && off == 2 && len == 0);

  /* Truncated: the length's continuation bit at the end of the body, or
   * fewer bytes than it says. Nothing is reported found. */
  uint8_t trunc1[] = {0x0a, 0x80, 0x80};
  uint8_t trunc2[] = {0x0a, 0x85};
  uint8_t trunc3[] = {0x0a, 0x05, 1, 2};
  CHECK(span(trunc1, sizeof trunc1, &off, &len) == 0);
  CHECK(span(trunc2, sizeof trunc2, &off, &len) == 0);
  CHECK(span(trunc3, sizeof trunc3, &off, &len) == 0);
  CHECK(span(body, 1, &off, &len) == 0);
  CHECK(span(NULL, 0, &off, &len) == 0);
  CHECK(off == 999 && len == 999);  /* untouched when not found */

  /* Over-long: a sixth length byte (protobuf-c refuses it), and five bytes
   * whose value does not fit the 32 bits protobuf-c keeps. */
  uint8_t six[] = {0x0a, 0x81, 0x80, 0x80, 0x80, 0x80, 0x00};
  uint8_t big[] = {0x0a, 0x80, 0x80, 0x80, 0x80, 0x10};
  CHECK(span(six, sizeof six, &off, &len) == 0);
  CHECK(span(big, sizeof big, &off, &len) == 0);

  /* Another field first, after it, or the event twice (protobuf merges
   * them): not one field, so the event is packed from the decode. */
  uint8_t extra[140];
  memcpy(extra, body, bn);
  extra[bn] = 0x78;  /* field 15, varint: unknown to PushRequest */
  extra[bn + 1] = 0x01;
  CHECK(span(extra, bn + 2, &off, &len) == 0);
  uint8_t before[140] = {0x78, 0x01};
  memcpy(before + 2, body, bn);
  CHECK(span(before, bn + 2, &off, &len) == 0);
  uint8_t twice[] = {0x0a, 0x00, 0x0a, 0x00};
  CHECK(span(twice, sizeof twice, &off, &len) == 0);
  uint8_t other_type[] = {0x08, 0x01};  /* field 1 as a varint */
  CHECK(span(other_type, sizeof other_type, &off, &len) == 0);
}

/* ---- the whole path ------------------------------------------------------------ */

static uv_loop_t loop;
static char dir[] = "/tmp/segue-test-postbox-push-XXXXXX";
static char db_path[300];
static sg__store *store;
static sg__postbox *pb;
static sg__federation server, client;
static sg__postbox_pushes serving;
static const sg__logger quiet = {SG_LOG_ERROR, NULL, NULL};
static char pushed_log[256];
static int delivered;

typedef struct {
  int done, err, status;
  size_t len;
  char identifier[64];
} answer;

static void answered(void *ud, int err, int status, const uint8_t *body, size_t len,
                     const char *identifier, const char *message) {
  answer *a = ud;
  (void)body;
  (void)message;
  a->done = 1;
  a->err = err;
  a->status = status;
  a->len = len;
  snprintf(a->identifier, sizeof a->identifier, "%s", identifier ? identifier : "");
}

static void on_pushed(void *ud, const char *server_id) {
  size_t n = strlen(pushed_log);
  snprintf(pushed_log + n, sizeof pushed_log - n, "%s%s;", (const char *)ud, server_id);
}

static int no_push(void *ud, const char *peer, const uint8_t *ev, size_t len, void *call) {
  (void)ud, (void)peer, (void)ev, (void)len, (void)call;
  return SG_EHTTP;
}

/* Delivery fails: the events stay in the inbox for the test to read. */
static int keep(void *ud, const char *peer, const uint8_t *ev, size_t len, char *err,
                size_t errlen) {
  (void)ud, (void)peer, (void)ev, (void)len;
  delivered++;
  snprintf(err, errlen, "kept for the test");
  return SG_ELUA;
}

static void run_until_answered(answer *a) {
  uint64_t end = uv_now(&loop) + 10000;
  while (!a->done && uv_now(&loop) < end) {
    uv_run(&loop, UV_RUN_NOWAIT);
    usleep(500);
    uv_update_time(&loop);
  }
  CHECK(a->done);
}

static answer push_body(const uint8_t *body, size_t len) {
  answer a = {0};
  CHECK(sg__federation_call(&client, "a.example:1", PUSH_PATH, body, len, answered, &a) == 0);
  run_until_answered(&a);
  return a;
}

/* The inbox's events of the client, oldest first, as hex, ';'-separated. */
static const char *inbox_hex(void) {
  return sql_rows(db_path, "SELECT hex(event) FROM inbox WHERE peer = 'b.example:1' ORDER BY seq");
}

static void hex(const uint8_t *b, size_t n, char *out) {
  for (size_t i = 0; i < n; i++) sprintf(out + 2 * i, "%02X", b[i]);
}

static void closed(sg__federation *f) { (void)f; }

static void test_served(void) {
  if (!mkdtemp(dir)) {
    CHECK(!"mkdtemp");
    return;
  }
  snprintf(db_path, sizeof db_path, "%s/segue.db", dir);
  char err[600], a_dir[400], b_dir[400], url[64];
  snprintf(a_dir, sizeof a_dir, "%s/a", dir);
  snprintf(b_dir, sizeof b_dir, "%s/b", dir);
  uv_loop_init(&loop);
  CHECK(sg__store_open(db_path, &store, err, sizeof err) == 0);
  sg__postbox_transport tp = {no_push, keep, NULL};
  sg__postbox_options o;
  sg__postbox_options_default(&o);
  o.deliver_backoff_ms = 60000;  /* one failed delivery, then nothing during the test */
  CHECK(sg__postbox_new(&loop, store, &tp, &o, &pb) == 0);

  sg__fed_options fo = {0};
  fo.server_id = "a.example:1";
  fo.data_dir = a_dir;
  fo.listen = "127.0.0.1:0";
  sg__token_policy_init(&fo.policy);
  CHECK(sg__federation_init(&loop, &server, &fo, &quiet, err, sizeof err) == 0);
  snprintf(url, sizeof url, "http://127.0.0.1:%d", sg__federation_port(&server));
  const char *ids[] = {"a.example:1"}, *urls[] = {url};
  sg__fed_options co = {0};
  co.server_id = "b.example:1";
  co.data_dir = b_dir;
  co.peer_ids = ids;
  co.peer_urls = urls;
  co.n_peers = 1;
  sg__token_policy_init(&co.policy);
  CHECK(sg__federation_init(&loop, &client, &co, &quiet, err, sizeof err) == 0);
  /* The server knows the client's key (no fetch: the client does not listen). */
  CHECK(sg__federation_key_put(&server, "b.example:1", sg__federation_public_key(&client)) == 0);

  sg__postbox_serve_pushes(&serving, pb, &server, on_pushed, (void *)"p:");
  /* The Event with a field it does not know (15, varint 1) before its own:
   * as a body's only field its bytes are stored as they came; packed from
   * the decode, protobuf-c puts the unknown field last. So the inbox tells
   * which path stored it. */
  uint8_t ev[64], body[128];
  ev[0] = 0x78;
  ev[1] = 0x01;
  size_t n = 2 + pack_event("first", ev + 2, sizeof ev - 2);
  char as_sent[200], repacked[200], want[500];
  hex(ev, n, as_sent);
  hex(ev + 2, n - 2, repacked);
  strcat(repacked, "7801");
  body[0] = 0x0a;
  body[1] = (uint8_t)n;
  memcpy(body + 2, ev, n);
  answer a = push_body(body, n + 2);
  CHECK(a.err == 0 && a.status == 200 && a.len == 0);  /* an empty PushResponse */
  CHECK_STR(pushed_log, "p:b.example:1;");  /* the peer's first Push */
  uint64_t first = sg__postbox_pushed_at(pb, "b.example:1");
  snprintf(want, sizeof want, "%s;", as_sent);
  CHECK_STR(inbox_hex(), want);

  /* The same with a field PushRequest does not know after the event: the
   * body is not one field, the event is packed from the decode. */
  body[n + 2] = 0x78;
  body[n + 3] = 0x01;
  a = push_body(body, n + 4);
  CHECK(a.err == 0 && a.status == 200 && a.len == 0);
  snprintf(want, sizeof want, "%s;%s;", as_sent, repacked);
  CHECK_STR(inbox_hex(), want);
  /* within a second of the first: pushed() did not run again (unless the
   * machine was that slow) */
  uint64_t last = sg__postbox_pushed_at(pb, "b.example:1");
  CHECK(first > 0 && last >= first);
  CHECK_STR(pushed_log, last - first < SG_POSTBOX_PUSHED_EVERY_MS
                            ? "p:b.example:1;" : "p:b.example:1;p:b.example:1;");
  size_t calls = strlen(pushed_log);
  /* A Push a second or more after the one before it: pushed() again. */
  while (uv_now(&loop) < last + SG_POSTBOX_PUSHED_EVERY_MS) {
    uv_run(&loop, UV_RUN_NOWAIT);
    usleep(2000);
    uv_update_time(&loop);
  }
  a = push_body(body, n + 2);
  CHECK(a.err == 0 && a.status == 200);
  CHECK(strlen(pushed_log) == calls + strlen("p:b.example:1;"));
  calls = strlen(pushed_log);
  CHECK(sg__postbox_pushed_at(pb, "b.example:1") >= last + SG_POSTBOX_PUSHED_EVERY_MS);

  /* The key that verified the Pushes was remembered in the store. */
  sqlite3 *db;
  sqlite3_stmt *st;
  int key_ok = 0;
  if (sqlite3_open(db_path, &db) == SQLITE_OK
      && sqlite3_prepare_v2(db, "SELECT public_key FROM peers WHERE server_id = 'b.example:1'", -1, &st,
                            NULL) == SQLITE_OK) {
    if (sqlite3_step(st) == SQLITE_ROW && sqlite3_column_bytes(st, 0) == 32)
      key_ok = memcmp(sqlite3_column_blob(st, 0), sg__federation_public_key(&client), 32) == 0;
    sqlite3_finalize(st);
  }
  sqlite3_close(db);
  CHECK(key_ok);

  /* Stopping removes only its own handler: one another part set since
   * stays (sg__federation_clear_push_handler), and goes with its own stop. */
  sg__postbox_pushes other = {0};
  sg__postbox_serve_pushes(&other, pb, &server, on_pushed, (void *)"o:");
  sg__postbox_serve_pushes_stop(&serving);
  CHECK(server.push_handler != NULL && server.push_ud == &other);
  CHECK(sg__federation_clear_push_handler(&server, server.push_handler, &serving) == 0);
  CHECK(server.push_ud == &other);
  sg__postbox_serve_pushes_stop(&other);
  /* Stopped: the federation's own handler answers (none set: 501). */
  sg__postbox_serve_pushes_stop(&serving);
  CHECK(server.push_handler == NULL);
  a = push_body(body, n + 2);
  CHECK(a.status == 501);
  CHECK(strlen(pushed_log) == calls);

  sg__postbox_close(pb, NULL, NULL);
  sg__federation_close(&client, closed);
  sg__federation_close(&server, closed);
  uv_run(&loop, UV_RUN_DEFAULT);
  pb = NULL;
  snprintf(want, sizeof want, "%s;%s;%s;", as_sent, repacked, as_sent);
  CHECK_STR(inbox_hex(), want);  /* still there: delivery kept failing */
  sg__store_close(store);
  CHECK(uv_loop_close(&loop) == 0);
  char cmd[400];
  snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
  if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", dir);
}

int main(void) {
  test_span();
  test_served();
  return tap_done();
}
