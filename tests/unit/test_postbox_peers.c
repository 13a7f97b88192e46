/* A postbox and a federation that know thousands of peers: the lookups by
 * id (runtime/harmony/idmap.c) find the right peer whatever the number,
 * through renames (the old id's peer is gone, the id may come back as a new
 * peer), and the done marks of every peer that delivered from memory in one
 * loop turn are all written (the turn's list, not a walk of every peer).
 * Costs are measured with callgrind outside the tests (docs/postbox.md). */
#include <sqlite3.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#include "federation.h"
#include "idmap.h"
#include "postbox.h"
#include "segue.h"
#include "sql_peek.h"
#include "tap.h"

#define PEERS 3000
#define RENAMED 300

static uv_loop_t loop;
static sg__store *store;
static sg__postbox *pb;
static char dir[] = "/tmp/segue-test-peers-XXXXXX";
static char path[300];
static char ids[PEERS][40];

/* ---- the map itself ---------------------------------------------------------- */

static void test_idmap(void) {
  sg__idmap m;
  CHECK(sg__idmap_init(&m) == 0);
  int *vals = calloc(PEERS, sizeof *vals);
  for (int i = 0; i < PEERS; i++) CHECK(sg__idmap_put(&m, ids[i], &vals[i]) == 0);
  CHECK(sg__idmap_count(&m) == PEERS);
  int wrong = 0;
  for (int i = 0; i < PEERS; i++) wrong += sg__idmap_get(&m, ids[i]) != &vals[i];
  CHECK(wrong == 0);
  CHECK(sg__idmap_get(&m, "nobody.example:1") == NULL);
  /* replacing keeps one entry; removing with another value removes nothing */
  CHECK(sg__idmap_put(&m, ids[5], &vals[6]) == 0);
  CHECK(sg__idmap_count(&m) == PEERS && sg__idmap_get(&m, ids[5]) == &vals[6]);
  sg__idmap_remove(&m, ids[5], &vals[5]);
  CHECK(sg__idmap_get(&m, ids[5]) == &vals[6]);
  /* every other one removed: the rest still found */
  for (int i = 0; i < PEERS; i += 2) sg__idmap_remove(&m, ids[i], NULL);
  CHECK(sg__idmap_count(&m) == PEERS / 2);
  wrong = 0;
  for (int i = 0; i < PEERS; i++)
    wrong += sg__idmap_get(&m, ids[i]) != (i % 2 ? &vals[i == 5 ? 6 : i] : NULL);
  CHECK(wrong == 0);
  sg__idmap_free(&m);
  sg__idmap_free(&m);  /* twice is harmless */
  CHECK(sg__idmap_get(&m, ids[1]) == NULL);
  free(vals);
}

/* ---- the postbox --------------------------------------------------------------- */

/* The fake transport: each Push is answered by the test; each delivery
 * checks that the event names the peer it came from. */
static void *calls[PEERS * 2];
static int ncalls, push_mismatch, deliver_mismatch, delivered, acked, stored_n, renamed_n;

static int t_push(void *ud, const char *peer, const uint8_t *ev, size_t len, void *call) {
  (void)ud;
  /* the event is "to:<peer>" */
  if (len != strlen(peer) + 3 || memcmp(ev + 3, peer, len - 3) != 0) push_mismatch++;
  calls[ncalls++] = call;
  return 0;
}

static void answer_pushes(void) {
  int n = ncalls;
  ncalls = 0;
  for (int i = 0; i < n; i++) sg__postbox_push_done(pb, calls[i], 0, NULL);
}

static int t_deliver(void *ud, const char *peer, const uint8_t *ev, size_t len, char *err,
                     size_t errlen) {
  (void)ud;
  (void)err;
  (void)errlen;
  /* the event is "from:<peer>" */
  if (len != strlen(peer) + 5 || memcmp(ev + 5, peer, len - 5) != 0) deliver_mismatch++;
  delivered++;
  return 0;
}

static void on_ack(void *ud, int err, int how, const char *m) {
  (void)ud;
  (void)m;
  if (!err && how == SG_POSTBOX_PUSHED) acked++;
}

static void on_stored(void *ud, int err) {
  (void)ud;
  if (!err) stored_n++;
}

static void on_renamed(void *ud, int err) {
  (void)ud;
  if (!err) renamed_n++;
}

static long long q(const char *sql) { return sql_int(path, sql); }

/* Runs the loop (answering Pushes) until *n reaches `want`, at most 20 s. */
static void run_until(const int *n, int want) {
  uint64_t end = uv_now(&loop) + 20000;
  while (*n < want && uv_now(&loop) < end) {
    uv_run(&loop, UV_RUN_NOWAIT);
    answer_pushes();
    if (*n < want) usleep(200);
    uv_update_time(&loop);
  }
}

/* A few more turns: the turn's statements committed. */
static void settle(void) {
  for (int i = 0; i < 20; i++) {
    uv_run(&loop, UV_RUN_NOWAIT);
    answer_pushes();
    usleep(1000);
    uv_update_time(&loop);
  }
}

static int push_to(const char *peer) {
  char ev[64];
  snprintf(ev, sizeof ev, "to:%.60s", peer);
  return sg__postbox_push(pb, peer, (const uint8_t *)ev, strlen(ev), on_ack, NULL);
}

static int push_from(const char *peer) {
  char ev[64];
  snprintf(ev, sizeof ev, "from:%.58s", peer);
  return sg__postbox_receive_push(pb, peer, (const uint8_t *)ev, strlen(ev), on_stored, NULL);
}

/* Every peer Pushes to us and we Push to every peer, all in one turn. */
static void round_all(const char *what) {
  int d = delivered, a = acked, s = stored_n, bad = 0;
  for (int i = 0; i < PEERS; i++) bad += push_from(ids[i]) != 0 || push_to(ids[i]) != 0;
  CHECK(bad == 0);
  run_until(&delivered, d + PEERS);
  run_until(&acked, a + PEERS);
  if (delivered != d + PEERS || acked != a + PEERS)
    fprintf(stderr, "# %s: %d delivered, %d pushed, %d stored\n", what, delivered - d, acked - a,
            stored_n - s);
  CHECK(delivered == d + PEERS);
  CHECK(acked == a + PEERS);
  CHECK(stored_n == s + PEERS);
  CHECK(push_mismatch == 0);
  CHECK(deliver_mismatch == 0);
}

static void test_many_peers(void) {
  char err[600];
  snprintf(path, sizeof path, "%s/segue.db", dir);
  CHECK(sg__store_open(path, &store, err, sizeof err) == 0);
  sg__postbox_transport tp = {t_push, t_deliver, NULL};
  sg__postbox_options o;
  sg__postbox_options_default(&o);
  CHECK(sg__postbox_new(&loop, store, &tp, &o, &pb) == 0);

  round_all("first round");  /* each inbox read from the store, then seen empty */
  CHECK(q("SELECT count(*) FROM peers") == PEERS);
  int unstamped = 0;
  for (int i = 0; i < PEERS; i++) unstamped += sg__postbox_pushed_at(pb, ids[i]) == 0;
  CHECK(unstamped == 0);
  CHECK(sg__postbox_pushed_at(pb, "nobody.example:1") == 0);
  settle();
  CHECK(q("SELECT count(*) FROM inbox") == 0);

  /* Second round: every peer delivers from memory in the same turns, each
   * marking what it delivered; every mark is written at the turn's end. */
  round_all("from memory");
  settle();
  CHECK(q("SELECT count(*) FROM inbox") == 0);
  CHECK(q("SELECT count(*) FROM outbox") == 0);

  /* Renames: the old id's peer is gone (not found: pushed_at 0), the new
   * id is another peer, and the old id may come back as a new peer. */
  int r = renamed_n, bad = 0;
  char newid[RENAMED][48];
  for (int i = 0; i < RENAMED; i++) {
    snprintf(newid[i], sizeof newid[i], "moved%d.example:2289", i);
    bad += sg__postbox_rename_peer(pb, ids[i], newid[i], on_renamed, NULL) != 0;
  }
  CHECK(bad == 0);
  run_until(&renamed_n, r + RENAMED);
  CHECK(renamed_n == r + RENAMED);
  int still = 0, fresh = 0;
  for (int i = 0; i < RENAMED; i++) {
    still += sg__postbox_pushed_at(pb, ids[i]) != 0;
    fresh += sg__postbox_pushed_at(pb, newid[i]) != 0;
  }
  CHECK(still == 0);  /* the old ids' peers are gone */
  CHECK(fresh == 0);  /* the new ids' are new peers */
  CHECK(sg__postbox_pushed_at(pb, ids[RENAMED]) != 0);  /* the others untouched */
  CHECK(q("SELECT count(*) FROM peers WHERE server_id LIKE 'moved%'") == RENAMED);
  CHECK(q("SELECT count(*) FROM peers") == PEERS);
  /* Pushes to and from the new ids land on them, and the old ids come back
   * as peers of their own. */
  int d = delivered, a = acked;
  for (int i = 0; i < RENAMED; i++) {
    bad += push_from(newid[i]) != 0 || push_to(newid[i]) != 0;
    bad += push_from(ids[i]) != 0 || push_to(ids[i]) != 0;
  }
  CHECK(bad == 0);
  run_until(&delivered, d + 2 * RENAMED);
  run_until(&acked, a + 2 * RENAMED);
  CHECK(delivered == d + 2 * RENAMED);
  CHECK(acked == a + 2 * RENAMED);
  CHECK(push_mismatch == 0 && deliver_mismatch == 0);
  int back = 0;
  for (int i = 0; i < RENAMED; i++)
    back += sg__postbox_pushed_at(pb, ids[i]) != 0 && sg__postbox_pushed_at(pb, newid[i]) != 0;
  CHECK(back == RENAMED);
  CHECK(q("SELECT count(*) FROM peers") == PEERS + RENAMED);
  settle();
  CHECK(q("SELECT count(*) FROM inbox") == 0);

  /* Held: only that peer's Pushes wait. */
  int s = stored_n;
  CHECK(sg__postbox_hold(pb, ids[PEERS - 1]) == 0);
  CHECK(push_from(ids[PEERS - 1]) == 0 && push_from(ids[PEERS - 2]) == 0);
  run_until(&stored_n, s + 1);
  settle();
  CHECK(stored_n == s + 1);
  CHECK(sg__postbox_release(pb, ids[PEERS - 1]) == 0);
  run_until(&stored_n, s + 2);
  CHECK(stored_n == s + 2);

  sg__postbox_close(pb, NULL, NULL);
  uv_run(&loop, UV_RUN_DEFAULT);
  pb = NULL;
  sg__store_close(store);
  store = NULL;
}

/* ---- the federation's peers entries ------------------------------------------- */

static void closed(sg__federation *f) { (void)f; }
static const sg__logger quiet = {SG_LOG_ERROR, NULL, NULL};

static void test_federation_peers(void) {
  char err[600], fdir[400], buf[300];
  snprintf(fdir, sizeof fdir, "%s/fed", dir);
  const char **pid = calloc(PEERS + 1, sizeof *pid), **purl = calloc(PEERS + 1, sizeof *purl);
  char (*urls)[48] = calloc(PEERS + 1, sizeof *urls);
  for (int i = 0; i < PEERS; i++) {
    snprintf(urls[i], sizeof urls[i], "http://10.0.%d.%d:2289", i / 250, i % 250);
    pid[i] = ids[i];
    purl[i] = urls[i];
  }
  pid[PEERS] = ids[7];  /* a second entry for one id: the first one counts */
  purl[PEERS] = "http://second.invalid";
  sg__fed_options fo = {0};
  fo.server_id = "self.example:1";
  fo.data_dir = fdir;
  fo.peer_ids = pid;
  fo.peer_urls = purl;
  fo.n_peers = PEERS + 1;
  sg__token_policy_init(&fo.policy);
  /* lists of thousands: all but the last 10 peers allowed, every third of
   * those blocked, the even ones bound (their tokens must name us) */
  const char **allow = calloc(PEERS, sizeof *allow), **block = calloc(PEERS, sizeof *block),
             **bound = calloc(PEERS, sizeof *bound);
  size_t na = 0, nb = 0, nd = 0;
  for (int i = 0; i < PEERS - 10; i++) {
    allow[na++] = ids[i];
    if (i % 3 == 0) block[nb++] = ids[i];
    if (i % 2 == 0) bound[nd++] = ids[i];
  }
  fo.policy.allow = allow;
  fo.policy.n_allow = na;
  fo.policy.block = block;
  fo.policy.n_block = nb;
  fo.policy.bound = bound;
  fo.policy.n_bound = nd;
  sg__federation f;
  CHECK(sg__federation_init(&loop, &f, &fo, &quiet, err, sizeof err) == 0);
  int wrong = 0;
  for (int i = 0; i < PEERS; i++) {
    const char *u = sg__federation_base_url(&f, ids[i], buf, sizeof buf);
    wrong += !u || strcmp(u, urls[i]) != 0;
  }
  CHECK(wrong == 0);
  CHECK_STR(sg__federation_base_url(&f, "other.example:9", buf, sizeof buf),
            "https://other.example:9");
  /* Every request is admitted against the lists (by hash): each peer gets
   * what its place on them says. */
  CHECK(f.policy.allow_map && f.policy.block_map && f.policy.bound_map);
  char why[SG_TOKEN_WHY_SIZE];
  uint64_t now = (uint64_t)time(NULL);
  wrong = 0;
  for (int i = 0; i < PEERS; i++) {
    sg__token tok = {0};
    tok.server_id = ids[i];
    tok.time = now;
    sg__token_reason want = i >= PEERS - 10 ? SG_TOKEN_HOST_NOT_ALLOWED
                            : i % 3 == 0    ? SG_TOKEN_HOST_BLOCKED
                            : i % 2 == 0    ? SG_TOKEN_AUDIENCE_REQUIRED
                                            : SG_TOKEN_OK;
    wrong += sg__token_admit(&tok, &f.policy, now, why, sizeof why) != want;
  }
  CHECK(wrong == 0);
  free(allow);
  free(block);
  free(bound);
  sg__federation_close(&f, closed);
  uv_run(&loop, UV_RUN_DEFAULT);
  free(pid);
  free(purl);
  free(urls);
}

int main(void) {
  if (!mkdtemp(dir)) return 2;
  for (int i = 0; i < PEERS; i++) snprintf(ids[i], sizeof ids[i], "peer%d.example:2289", i);
  uv_loop_init(&loop);
  test_idmap();
  test_many_peers();
  test_federation_peers();
  CHECK(uv_loop_close(&loop) == 0);
  char cmd[400];
  snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
  if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", dir);
  return tap_done();
}
