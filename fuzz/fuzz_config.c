/* Fuzz target: config loading, the way the CLI and embedders do it:
 * sg_host_new, then sg_host_load_config_string with the input as the
 * config's Lua source, a reload when it loaded, and sg_host_close. It must
 * never crash and never leak, only return an error; the host must close
 * completely (the loop ends).
 *
 * A config is Lua code, so a config can loop for ever or ask for all the
 * memory there is: the host bounds both while a config loads (an instruction
 * limit a pcall cannot swallow, and a memory budget: docs/hardening.md), so
 * the harness needs no budget of its own and fuzzing exercises those
 * limits too. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fuzz_common.h"
#include "segue.h"

static uv_loop_t loop;
static char data_dir[64];

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc;
  (void)argv;
  FUZZ_REQUIRE(uv_loop_init(&loop) == 0, "loop");
  snprintf(data_dir, sizeof data_dir, "/tmp/segue-fuzz-config-%d", (int)getpid());
  return 0;
}

static void host_closed(void *data) { *(int *)data = 1; }

static void check_result(sg_host *h, int rc, const char *what) {
  FUZZ_REQUIRE(rc == 0 || rc == SG_ECONFIG || rc == SG_ELUA || rc == SG_ECLOSING,
               "%s returned %s", what, sg_err_name(rc));
  FUZZ_REQUIRE(rc == 0 || rc == SG_ELUA || sg_host_last_error(h)[0], "%s failed without a message", what);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  sg_host_options opts = {sizeof opts, data_dir, SG_LOG_DEBUG, fuzz_log_line, NULL, NULL, NULL};
  sg_host *h;
  int closed = 0;
  FUZZ_REQUIRE(sg_host_new(&loop, &opts, &h) == 0, "sg_host_new");
  int rc = sg_host_load_config_string(h, "fuzz.lua", (const char *)data, size);
  check_result(h, rc, "load");
  if (rc == 0) check_result(h, sg_host_reload(h), "reload");
  sg_host_close(h, host_closed, &closed);
  uv_run(&loop, UV_RUN_DEFAULT);
  FUZZ_REQUIRE(closed, "the host did not close");
  return 0;
}
