/* The store's asynchronous operations on SQLite: the engine-neutral checks
 * (store_async_checks.h; the same run on PostgreSQL in tests/pg), callbacks
 * that run before the call returns, and the engine choice refusing what it
 * cannot open. */
#include <stdio.h>
#include <unistd.h>

#include "store_async_checks.h"

static void immediate(void *ud, const sg__store_reply *r) { *(int *)ud = r->err == 0 ? 1 : -1; }

int main(void) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  chk_loop = &loop;
  char dir[] = "/tmp/segue-store-async-XXXXXX", path[300], err[600];
  CHECK(mkdtemp(dir) != NULL);
  snprintf(path, sizeof path, "%s/segue.db", dir);

  sg__store *s = NULL;
  sg__store_config c = {.engine = "sqlite", .path = path, .loop = &loop};
  CHECK(sg__store_open_with(&c, &s, err, sizeof err) == 0);
  CHECK(s && !sg__store_is_async(s));
  CHECK_STR(sg__store_engine(s), "sqlite");
  /* SQLite answers before the call returns: callers may rely on it. */
  int got = 0;
  CHECK(sg__store_kv_set_async(s, "k", "v", immediate, &got) == 0);
  CHECK(got == 1);
  check_async_ops(s);
  check_postbox_ops(s);
  check_api_ops(s);
  sg__store_close(s);

  c.engine = "oracle";
  CHECK(sg__store_open_with(&c, &s, err, sizeof err) == SG_EINVAL);
  CHECK(strstr(err, "unknown engine \"oracle\"") != NULL);
  c.engine = "postgresql";
  c.dsn = "host= = =";
  CHECK(sg__store_open_with(&c, &s, err, sizeof err) == SG_EINVAL);
  CHECK(strstr(err, "dsn") != NULL);
  /* A server that is not there: the waiting call fails with libpq's reason,
   * after a couple of attempts, instead of waiting forever. */
  c.dsn = "host=/nonexistent-segue-dir dbname=x connect_timeout=2";
  CHECK(sg__store_open_with(&c, &s, err, sizeof err) == 0);
  outcome o;
  CALL(o, sg__store_kv_get_async(s, "k", record, &o));
  settle(20000);
  CHECK(o.done && o.err == SG_ESTORE);
  CHECK(strstr(o.message, "postgresql") != NULL);
  sg__store_close(s);
  uv_run(&loop, UV_RUN_DEFAULT);

  char f[400];
  snprintf(f, sizeof f, "%s/segue.db-wal", dir);
  unlink(f);
  snprintf(f, sizeof f, "%s/segue.db-shm", dir);
  unlink(f);
  unlink(path);
  rmdir(dir);
  CHECK(uv_loop_close(&loop) == 0);
  return tap_done();
}
