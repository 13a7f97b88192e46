/* The store's asynchronous operations, the same checks for every engine:
 * tests/unit/test_store_async.c runs them on SQLite, tests/pg/pg_store_check.c
 * on a real PostgreSQL. Each call's outcome is recorded by its callback and
 * checked once the loop ran it (at once on SQLite, later on PostgreSQL). */
#ifndef SEGUE_STORE_ASYNC_CHECKS_H
#define SEGUE_STORE_ASYNC_CHECKS_H
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "segue.h"
#include "store.h"
#include "tap.h"

static uv_loop_t *chk_loop;
static int chk_pending;

/* What one call answered, copied out of the borrowed reply. */
typedef struct {
  int done, err;
  char text0[256], text1[256], rows[1024], message[512];
  size_t n;
  int64_t count, num, seqs[8], attempts[8], push_in[8];
  int has_key;
  uint8_t key[32];
} outcome;

static void keep(char *dst, size_t cap, const char *src) {
  snprintf(dst, cap, "%s", src ? src : "(null)");
}

static void rowcat(outcome *o, const char *a, const char *b) {
  size_t l = strlen(o->rows);
  snprintf(o->rows + l, sizeof o->rows - l, "%s/%s;", a ? a : "-", b ? b : "-");
}

static void record(void *ud, const sg__store_reply *r) {
  outcome *o = ud;
  o->done = 1;
  o->err = r->err;
  o->n = r->n;
  keep(o->text0, sizeof o->text0, r->text[0]);
  keep(o->text1, sizeof o->text1, r->text[1]);
  keep(o->message, sizeof o->message, r->message);
  o->rows[0] = '\0';
  for (size_t i = 0; i < r->n; i++) {
    if (r->copies) rowcat(o, r->copies[i].backend, r->copies[i].id);
    if (r->messages) rowcat(o, r->messages[i].id, r->messages[i].content_json);
    if (r->instances) rowcat(o, r->instances[i].name, r->instances[i].info);
    if (r->leases) rowcat(o, r->leases[i].name, r->leases[i].holder);
    if (r->events) {
      char ev[64];
      snprintf(ev, sizeof ev, "%.*s", (int)r->events[i].len, (const char *)r->events[i].event);
      rowcat(o, ev, NULL);
      if (i < 8) {
        o->seqs[i] = r->events[i].seq;
        o->attempts[i] = r->events[i].attempts;
      }
    }
    if (r->users) {
      char u[64];
      snprintf(u, sizeof u, "%d,%d", r->users[i].admin, r->users[i].tokens);
      rowcat(o, r->users[i].name, u);
    }
    if (r->api_events) {
      char ev[64];
      snprintf(ev, sizeof ev, "%s:%s", r->api_events[i].backend, r->api_events[i].type);
      rowcat(o, ev, r->api_events[i].value_json);
      if (i < 8) o->seqs[i] = r->api_events[i].id;
    }
    if (r->rooms) {
      char rm[96];
      snprintf(rm, sizeof rm, "%s,%lld", r->rooms[i].name ? r->rooms[i].name : "-",
               (long long)r->rooms[i].unread);
      rowcat(o, r->rooms[i].id, rm);
    }
    if (r->peers) {
      char q[64];
      snprintf(q, sizeof q, "%lld,%lld,%s", (long long)r->peers[i].queued,
               (long long)r->peers[i].inbox, r->peers[i].last_error ? r->peers[i].last_error : "-");
      rowcat(o, r->peers[i].server_id, q);
      if (i < 8) o->push_in[i] = r->peers[i].last_push_in;
    }
  }
  o->count = r->count;
  o->num = r->num;
  o->has_key = r->key != NULL;
  if (r->key) memcpy(o->key, r->key, 32);
  chk_pending--;
}

static sg__store *chk_store;  /* SQLite: batched writes answer at its flush */

/* Runs the loop until every call answered, at most `ms`. */
static void settle(uint64_t ms) {
  uint64_t end = uv_now(chk_loop) + ms;
  if (chk_store) sg__store_flush(chk_store);
  while (chk_pending > 0 && uv_now(chk_loop) < end) {
    uv_run(chk_loop, UV_RUN_ONCE);
    uv_update_time(chk_loop);
  }
}

#define CALL(o, expr)          \
  do {                         \
    memset(&(o), 0, sizeof(o)); \
    chk_pending++;             \
    int rc_ = (expr);          \
    CHECK(rc_ == 0);           \
    if (rc_) chk_pending--;    \
  } while (0)

static void check_async_ops(sg__store *s) {
  outcome a, b, c, d, e;
  /* kv */
  CALL(a, sg__store_kv_get_async(s, "nope", record, &a));
  CALL(b, sg__store_kv_set_async(s, "server_id", "a.example:2289", record, &b));
  CALL(c, sg__store_kv_get_async(s, "server_id", record, &c));
  settle(20000);
  CHECK(a.done && a.err == SG_STORE_NOTFOUND);
  CHECK(b.done && b.err == 0);
  CHECK(c.done && c.err == 0);
  CHECK_STR(c.text0, "a.example:2289");
  CALL(a, sg__store_kv_set_async(s, "server_id", NULL, record, &a));
  CALL(b, sg__store_kv_get_async(s, "server_id", record, &b));
  settle(20000);
  CHECK(a.err == 0 && b.err == SG_STORE_NOTFOUND);

  /* message id maps: one origin per copy, copies oldest first */
  CALL(a, sg__store_map_put_async(s, "irc", "m1", "harmony", "h1", "#a", record, &a));
  CALL(b, sg__store_map_put_async(s, "irc", "m1", "notes", "n1", NULL, record, &b));
  CALL(c, sg__store_map_put_async(s, "irc", "m1", "harmony", "h1", "#a", record, &c));
  CALL(d, sg__store_map_put_async(s, "irc", "m2", "harmony", "h1", "#a", record, &d));
  settle(20000);
  CHECK(a.err == 0 && b.err == 0 && c.err == 0);
  CHECK(d.err == SG_EEXIST);
  CHECK(strstr(d.message, "already a copy") != NULL);
  CALL(a, sg__store_map_origin_async(s, "harmony", "h1", record, &a));
  CALL(b, sg__store_map_origin_async(s, "irc", "m1", record, &b));
  CALL(c, sg__store_map_copies_async(s, "irc", "m1", record, &c));
  settle(20000);
  CHECK(a.err == 0);
  CHECK_STR(a.text0, "irc");
  CHECK_STR(a.text1, "m1");
  CHECK(b.err == SG_STORE_NOTFOUND);
  CHECK(c.err == 0 && c.n == 2);
  CHECK_STR(c.rows, "harmony/h1;notes/n1;");

  /* the message log: insert, edit, delete, the last N of a room */
  CALL(a, sg__store_log_message_async(s, "irc", "m1", "#a", "ann", "\"hi\"", 1000, 0, record, &a));
  CALL(b, sg__store_log_message_async(s, "irc", "m2", "#a", "bob", "\"yo\"", 2000, 0, record, &b));
  CALL(c, sg__store_log_message_async(s, "irc", "m3", "#b", "bob", "\"x\"", 1500, 0, record, &c));
  CALL(d, sg__store_log_message_async(s, "irc", "m1", "#a", "ann", "\"hi!\"", 9, 3000, record, &d));
  settle(20000);
  CHECK(a.err == 0 && b.err == 0 && c.err == 0 && d.err == 0);
  CALL(a, sg__store_log_delete_async(s, "irc", "m2", record, &a));
  CALL(b, sg__store_log_delete_async(s, "irc", "nope", record, &b));
  CALL(c, sg__store_messages_async(s, "irc", "#a", 0, record, &c));
  CALL(d, sg__store_messages_async(s, "irc", "#a", 1, record, &d));
  settle(20000);
  CHECK(a.err == 0 && b.err == SG_STORE_NOTFOUND);
  CHECK(c.err == 0);
  CHECK_STR(c.rows, "m1/\"hi!\";m2/-;");
  CHECK_STR(d.rows, "m2/-;");
  /* the edit time a message was last logged with (a replay after a restart) */
  CALL(a, sg__store_message_edit_time_async(s, "irc", "m1", record, &a));
  CALL(b, sg__store_message_edit_time_async(s, "irc", "m3", record, &b));
  CALL(c, sg__store_message_edit_time_async(s, "irc", "nope", record, &c));
  settle(20000);
  CHECK(a.err == 0 && a.num == 3000);
  CHECK(b.err == 0 && b.num == 0);
  CHECK(c.err == SG_STORE_NOTFOUND);

  /* instances and leases */
  CALL(a, sg__store_instance_beat_async(s, "one", "{\"pid\":1}", record, &a));
  CALL(b, sg__store_instance_beat_async(s, "two", NULL, record, &b));
  CALL(c, sg__store_lease_claim_async(s, "backend:irc", "one", 60000, record, &c));
  CALL(d, sg__store_lease_claim_async(s, "backend:irc", "two", 60000, record, &d));
  CALL(e, sg__store_lease_claim_async(s, "backend:mem", "two", 1, record, &e));
  settle(20000);
  CHECK(a.err == 0 && b.err == 0);
  CHECK(c.err == 0 && d.err == 0 && e.err == 0);
  CHECK_STR(c.text0, "one");
  CHECK_STR(d.text0, "one");  /* taken: two does not get it */
  CHECK_STR(e.text0, "two");
  uv_sleep(20);               /* backend:mem's lease (1 ms) expires */
  CALL(a, sg__store_lease_claim_async(s, "backend:mem", "one", 60000, record, &a));
  CALL(b, sg__store_lease_claim_async(s, "backend:irc", "one", 60000, record, &b));  /* renew */
  CALL(c, sg__store_instances_async(s, record, &c));
  CALL(d, sg__store_leases_async(s, record, &d));
  settle(20000);
  CHECK_STR(a.text0, "one");
  CHECK_STR(b.text0, "one");
  CHECK_STR(c.rows, "one/{\"pid\":1};two/-;");
  CHECK_STR(d.rows, "backend:irc/one;backend:mem/one;");
  CALL(a, sg__store_lease_release_async(s, "backend:irc", "two", record, &a));  /* not its own */
  CALL(b, sg__store_lease_release_async(s, "backend:mem", "one", record, &b));
  CALL(c, sg__store_leases_async(s, record, &c));
  settle(20000);
  CHECK(a.err == 0 && b.err == 0);
  CHECK_STR(c.rows, "backend:irc/one;");
  CHECK(chk_pending == 0);
}

/* The postbox's operations (runtime/harmony/postbox.c): queues, inbox,
 * peers, keys, renames, claims. */
static void check_postbox_ops(sg__store *s) {
  outcome a, b, c, d, e;
  chk_store = s;
  const uint8_t *ab[2] = {(const uint8_t *)"a", (const uint8_t *)"bb"};
  const uint8_t *cc[1] = {(const uint8_t *)"c"};
  size_t ablen[2] = {1, 2}, clen[1] = {1};
  /* the outbound queue: appends in order, the count after each, the head
   * within a byte budget, drops by seq */
  CALL(a, sg__store_outbox_add_async(s, "p1.example:1", ab, ablen, 2, record, &a));
  CALL(b, sg__store_outbox_add_async(s, "p1.example:1", cc, clen, 1, record, &b));
  CALL(c, sg__store_outbox_count_async(s, "p1.example:1", record, &c));
  CALL(d, sg__store_outbox_head_async(s, "p1.example:1", 3, record, &d));
  CALL(e, sg__store_outbox_head_async(s, "p1.example:1", 1, record, &e));
  settle(20000);
  CHECK(a.err == 0 && a.count == 2);
  CHECK(b.err == 0 && b.count == 3);
  CHECK(c.err == 0 && c.count == 3);
  CHECK(d.err == 0);
  CHECK_STR(d.rows, "a/-;bb/-;");
  CHECK_STR(e.rows, "a/-;");  /* the first always, even past the budget */
  CHECK(d.seqs[0] < d.seqs[1]);
  int64_t seqs[2] = {d.seqs[0], d.seqs[1]};
  CALL(a, sg__store_outbox_drop_async(s, "p1.example:1", seqs, 2, record, &a));
  CALL(b, sg__store_outbox_head_async(s, "p1.example:1", 1000, record, &b));
  settle(20000);
  CHECK(a.err == 0 && a.count == 2);
  CHECK_STR(b.rows, "c/-;");

  /* the inbox: oldest first, failures counted, the dead move out */
  const uint8_t *xy[2] = {(const uint8_t *)"x", (const uint8_t *)"y"};
  size_t xylen[2] = {1, 1};
  CALL(a, sg__store_inbox_add_async(s, "p2.example:1", xy, xylen, 2, record, &a));
  CALL(b, sg__store_inbox_head_async(s, "p2.example:1", record, &b));
  settle(20000);
  CHECK(a.err == 0);
  CHECK(b.err == 0 && b.n == 1 && b.attempts[0] == 0);
  CHECK_STR(b.rows, "x/-;");
  int64_t x = b.seqs[0];
  CALL(a, sg__store_inbox_failed_async(s, x, "boom", 0, 0, record, &a));
  CALL(b, sg__store_inbox_head_async(s, "p2.example:1", record, &b));
  settle(20000);
  CHECK(a.err == 0 && b.attempts[0] == 1);
  /* the same failure again (a retry after a lost answer) counts once */
  CALL(a, sg__store_inbox_failed_async(s, x, "boom", 0, 0, record, &a));
  CALL(b, sg__store_inbox_head_async(s, "p2.example:1", record, &b));
  settle(20000);
  CHECK(a.err == 0 && b.attempts[0] == 1);
  CALL(a, sg__store_inbox_failed_async(s, x, "boom", 1, 1, record, &a));
  CALL(b, sg__store_inbox_head_async(s, "p2.example:1", record, &b));
  settle(20000);
  CHECK(a.err == 0);
  CHECK_STR(b.rows, "y/-;");
  CALL(a, sg__store_inbox_done_async(s, b.seqs[0], record, &a));
  CALL(c, sg__store_inbox_head_async(s, "p2.example:1", record, &c));
  settle(20000);
  CHECK(a.err == 0 && c.err == SG_STORE_NOTFOUND);

  /* a Push's event: the peer's row made (and stamped) and the event
   * appended in one call, which answers its seq; twice in one batch from
   * one peer */
  CALL(a, sg__store_inbox_push_async(s, "p4.example:1", (const uint8_t *)"m", 1, 1, record, &a));
  CALL(b, sg__store_inbox_push_async(s, "p4.example:1", (const uint8_t *)"nn", 2, 0, record, &b));
  CALL(c, sg__store_inbox_head_async(s, "p4.example:1", record, &c));
  CALL(d, sg__store_peers_async(s, record, &d));
  settle(20000);
  CHECK(a.err == 0 && b.err == 0 && a.num > 0 && b.num > a.num);
  CHECK(c.err == 0 && c.seqs[0] == a.num);
  CHECK_STR(c.rows, "m/-;");
  CHECK_STR(d.rows, "p1.example:1/1,0,-;p2.example:1/0,0,-;p4.example:1/0,2,-;");
  CHECK(d.push_in[0] == 0 && d.push_in[2] > 0);
  int64_t stamped = d.push_in[2], m_seq = a.num;
  uv_sleep(5);
  CALL(a, sg__store_inbox_done_async(s, m_seq, record, &a));
  CALL(b, sg__store_inbox_push_async(s, "p4.example:1", (const uint8_t *)"o", 1, 1, record, &b));
  settle(20000);
  int64_t o_seq = b.num;
  CALL(c, sg__store_inbox_head_async(s, "p4.example:1", record, &c));
  CALL(d, sg__store_peers_async(s, record, &d));
  settle(20000);
  CHECK(a.err == 0 && b.err == 0 && o_seq > 0);
  CHECK_STR(c.rows, "nn/-;");
  CHECK(d.push_in[2] > stamped);  /* stamped again */
  /* not stamped: the row made if new, the stamp left as it was */
  CALL(a, sg__store_inbox_push_async(s, "p5.example:1", (const uint8_t *)"q", 1, 0, record, &a));
  CALL(b, sg__store_inbox_push_async(s, "p4.example:1", (const uint8_t *)"p", 1, 0, record, &b));
  CALL(c, sg__store_peers_async(s, record, &c));
  settle(20000);
  int64_t p_seq = b.num;
  CHECK(a.err == 0 && b.err == 0);
  CHECK_STR(c.rows, "p1.example:1/1,0,-;p2.example:1/0,0,-;p4.example:1/0,3,-;p5.example:1/0,1,-;");
  CHECK(c.push_in[2] == d.push_in[2] && c.push_in[3] == 0);
  /* delivered up to a seq: those leave, in one call, the peer's only */
  CALL(a, sg__store_inbox_done_upto_async(s, "p4.example:1", o_seq, record, &a));
  CALL(b, sg__store_inbox_head_async(s, "p4.example:1", record, &b));
  CALL(c, sg__store_inbox_head_async(s, "p5.example:1", record, &c));
  settle(20000);
  CHECK(a.err == 0 && a.count == 2);  /* nn and o, not p */
  CHECK_STR(b.rows, "p/-;");
  CHECK_STR(c.rows, "q/-;");          /* another peer's lower seq stays */
  int64_t q_seq = c.seqs[0];
  CALL(a, sg__store_inbox_done_upto_async(s, "p4.example:1", p_seq, record, &a));
  CALL(b, sg__store_inbox_done_async(s, q_seq, record, &b));
  CALL(c, sg__store_inbox_head_async(s, "p4.example:1", record, &c));
  settle(20000);
  CHECK(a.err == 0 && a.count == 1 && b.err == 0 && c.err == SG_STORE_NOTFOUND);

  /* peers: bookkeeping, keys, the listing */
  uint8_t key[32];
  memset(key, 0xab, sizeof key);
  CALL(a, sg__store_peer_key_set_async(s, "p1.example:1", key, record, &a));
  CALL(b, sg__store_peer_error_async(s, "p1.example:1", "oops", record, &b));
  CALL(c, sg__store_peer_stamp_async(s, "p1.example:1", SG_STORE_STAMP_PUSH, record, &c));
  CALL(d, sg__store_peer_key_get_async(s, "p1.example:1", record, &d));
  CALL(e, sg__store_peer_key_get_async(s, "nobody.example:1", record, &e));
  settle(20000);
  CHECK(a.err == 0 && b.err == 0 && c.err == 0);
  CHECK(d.err == 0 && d.has_key && memcmp(d.key, key, 32) == 0);
  CHECK(e.err == SG_STORE_NOTFOUND && !e.has_key);
  CALL(a, sg__store_peer_add_async(s, "p3.example:1", record, &a));
  CALL(b, sg__store_peer_rename_async(s, "p1.example:1", "p3.example:1", record, &b));
  CALL(c, sg__store_peer_rename_async(s, "nobody.example:1", "z.example:1", record, &c));
  CALL(d, sg__store_peers_async(s, record, &d));
  CALL(e, sg__store_peer_key_get_async(s, "p3.example:1", record, &e));
  settle(20000);
  CHECK(a.err == 0 && b.err == 0);
  CHECK(c.err == SG_STORE_NOTFOUND);
  CHECK_STR(d.rows, "p2.example:1/0,0,-;p3.example:1/1,0,-;p4.example:1/0,0,-;p5.example:1/0,0,-;");
  CHECK(e.err == 0 && memcmp(e.key, key, 32) == 0);  /* the key moved along */

  /* claims: one holder at a time on a shared store; SQLite grants all */
  CALL(a, sg__store_claim_async(s, "postbox.out/p3", "one", 60000, record, &a));
  CALL(b, sg__store_claim_async(s, "postbox.out/p3", "two", 60000, record, &b));
  CALL(c, sg__store_claim_async(s, "postbox.out/p3", "one", 60000, record, &c));
  settle(20000);
  CHECK(a.err == 0 && c.err == 0);
  CHECK(b.err == (sg__store_is_async(s) ? SG_STORE_NOTFOUND : 0));
  CALL(a, sg__store_claim_release_async(s, "postbox.out/p3", "one", record, &a));
  CALL(b, sg__store_claim_async(s, "postbox.out/p3", "two", 60000, record, &b));
  CALL(c, sg__store_claim_async(s, "postbox.in/p3", "two", 1, record, &c));
  settle(20000);
  CHECK(a.err == 0 && b.err == 0 && c.err == 0);
  uv_sleep(20);  /* the 1 ms claim expired: anybody's */
  CALL(a, sg__store_claim_async(s, "postbox.in/p3", "one", 60000, record, &a));
  settle(20000);
  CHECK(a.err == 0);
  CHECK(chk_pending == 0);
  chk_store = NULL;
}
/* The client API's operations (docs/api.md): users and token hashes, the
 * event log with its effect on the message log, rooms and unread counts,
 * read marks, paging; and kv_set_held (the rules' state, docs/scaling.md). */
static void check_api_ops(sg__store *s) {
  outcome a, b, c, d, e;
  /* users: a name once, tokens by hash, removal */
  CALL(a, sg__store_user_add_async(s, "ann", 1, "hash-ann", record, &a));
  CALL(b, sg__store_user_add_async(s, "bob", 0, "hash-bob", record, &b));
  CALL(c, sg__store_user_add_async(s, "ann", 0, "hash-other", record, &c));
  /* The same call again (what a retry after a lost connection is): done,
   * one user, one token. */
  outcome f;
  CALL(f, sg__store_user_add_async(s, "ann", 1, "hash-ann", record, &f));
  CALL(d, sg__store_users_async(s, record, &d));
  CALL(e, sg__store_token_user_async(s, "hash-ann", record, &e));
  settle(20000);
  CHECK(a.err == 0 && b.err == 0 && f.err == 0);
  CHECK(c.err == SG_EEXIST);
  CHECK_STR(c.message, "a user of that name exists");
  CHECK_STR(d.rows, "ann/1,1;bob/0,1;");
  CHECK(e.err == 0 && e.num == 1);
  CHECK_STR(e.text0, "ann");
  CALL(a, sg__store_token_user_async(s, "hash-other", record, &a));
  CALL(b, sg__store_user_remove_async(s, "bob", record, &b));
  CALL(c, sg__store_user_remove_async(s, "bob", record, &c));
  CALL(d, sg__store_token_user_async(s, "hash-bob", record, &d));
  settle(20000);
  CHECK(a.err == SG_STORE_NOTFOUND);
  CHECK(b.err == 0 && c.err == SG_STORE_NOTFOUND);
  CHECK(d.err == SG_STORE_NOTFOUND);

  /* events: increasing ids, each with its effect on the log and rooms */
  sg__store_api_event room = {.backend = "mem", .type = "RoomUpsert", .value_json = "{}",
                              .id = "!r", .room_name = "#room"};
  sg__store_api_event m1 = {.backend = "mem", .type = "MessageUpsert", .value_json = "{\"n\":1}",
                            .id = "e1", .room = "!r", .sender = "ann", .content_json = "\"one\"",
                            .attachments_json = "[]", .create_time = 5000};
  sg__store_api_event m2 = m1, m3 = m1;
  m2.id = "e2", m2.content_json = "\"two\"", m2.create_time = 6000, m2.value_json = "{\"n\":2}";
  m3.id = "e3", m3.content_json = "\"three\"", m3.create_time = 7000, m3.value_json = "{\"n\":3}";
  sg__store_api_event del = {.backend = "mem", .type = "MessageDelete", .value_json = "\"e2\"",
                             .id = "e2"};
  CALL(a, sg__store_event_append_async(s, &room, record, &a));
  CALL(b, sg__store_event_append_async(s, &m1, record, &b));
  CALL(c, sg__store_event_append_async(s, &m2, record, &c));
  CALL(d, sg__store_event_append_async(s, &m3, record, &d));
  CALL(e, sg__store_event_append_async(s, &del, record, &e));
  settle(20000);
  CHECK(a.err == 0 && b.err == 0 && c.err == 0 && d.err == 0 && e.err == 0);
  CHECK(a.num > 0 && a.num < b.num && b.num < c.num && c.num < d.num && d.num < e.num);
  int64_t first = a.num, last = e.num;
  CALL(a, sg__store_events_after_async(s, first, 2, record, &a));
  CALL(b, sg__store_events_last_async(s, record, &b));
  CALL(c, sg__store_rooms_async(s, "ann", record, &c));
  CALL(d, sg__store_messages_before_async(s, "mem", "!r", NULL, 10, record, &d));
  CALL(e, sg__store_messages_before_async(s, "mem", "!r", "e3", 1, record, &e));
  settle(20000);
  CHECK(a.err == 0 && a.n == 2);
  CHECK_STR(a.rows, "mem:MessageUpsert/{\"n\":1};mem:MessageUpsert/{\"n\":2};");
  CHECK(a.seqs[0] > first && a.seqs[1] > a.seqs[0]);
  CHECK(b.err == 0 && b.num == last);
  CHECK_STR(c.rows, "#a/-,1;#b/-,1;!r/#room,2;");  /* e2 is deleted: two unread */
  CHECK_STR(d.rows, "e1/\"one\";e2/-;e3/\"three\";");
  CHECK_STR(e.rows, "e2/-;");
  /* read marks never move back; unread counts follow them */
  CALL(a, sg__store_read_mark_async(s, "ann", "mem", "!r", 6500, record, &a));
  CALL(b, sg__store_read_mark_async(s, "ann", "mem", "!r", 1000, record, &b));
  CALL(c, sg__store_rooms_async(s, "ann", record, &c));
  CALL(d, sg__store_events_prune_async(s, 2, record, &d));
  CALL(e, sg__store_events_after_async(s, 0, 100, record, &e));
  settle(20000);
  CHECK(a.err == 0 && b.err == 0);
  CHECK_STR(c.rows, "#a/-,1;#b/-,1;!r/#room,1;");
  CHECK(d.err == 0);
  CHECK(e.n == 2 && e.seqs[1] == last);

  /* kv_set_held: written only while the instance holds the lease */
  CALL(a, sg__store_lease_claim_async(s, "state-lease", "one", 60000, record, &a));
  CALL(b, sg__store_kv_set_held_async(s, "rules.state", "{\"n\":1}", "state-lease", "one", record,
                                     &b));
  CALL(c, sg__store_kv_set_held_async(s, "rules.state", "{\"n\":2}", "state-lease", "two", record,
                                     &c));
  CALL(d, sg__store_kv_get_async(s, "rules.state", record, &d));
  settle(20000);
  CHECK(a.err == 0 && b.err == 0);
  CHECK(c.err == SG_STORE_NOTFOUND);
  CHECK_STR(d.text0, "{\"n\":1}");
  CHECK(sg__store_kv_set_held_async(s, "k", NULL, "state-lease", "one", record, &e) == SG_EINVAL);
  CHECK(chk_pending == 0);
}
#endif
