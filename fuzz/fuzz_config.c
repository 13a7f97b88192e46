/* Fuzz target: config loading, the way the CLI and embedders do it:
 * sg_host_new, then sg_host_load_config_string with the input as the
 * config's Lua source, a reload when it loaded, and sg_host_close. It must
 * never crash and never leak, only return an error; the host must close
 * completely (the loop ends).
 *
 * A config is Lua code, so a config can loop for ever or ask for all the
 * memory there is, and segue does not bound either when it loads one (see
 * docs/hardening.md). This harness bounds both around the call, so that
 * fuzzing looks for crashes rather than rediscovering `while true do end`:
 * a count hook raises an error once an instruction budget is spent (and at
 * every instruction after, so that a pcall in the config cannot swallow it
 * for ever), and an allocator refuses to grow the Lua heap past a budget. */
#include <lauxlib.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fuzz_common.h"
#include "host.h"
#include "segue.h"

#define INSTRUCTION_BUDGET 20000000
#define HOOK_EVERY 1000
#define HEAP_BUDGET ((size_t)64 << 20)  /* on top of what the host uses */

static uv_loop_t loop;
static char data_dir[64];

typedef struct budget {
  lua_Alloc base;
  void *base_ud;
  size_t used, limit;
  long instructions;
} budget;

static void *budget_alloc(void *ud, void *ptr, size_t osize, size_t nsize) {
  budget *b = ud;
  size_t old = ptr ? osize : 0;  /* without ptr, osize is a type tag */
  if (nsize > old && b->used + (nsize - old) > b->limit) return NULL;
  void *p = b->base(b->base_ud, ptr, osize, nsize);
  if (p || nsize == 0) b->used = b->used - (old < b->used ? old : b->used) + nsize;
  return p;
}

/* The Lua interpreter is a system library without coverage instrumentation,
 * and the config checker is Lua: lines run (source, line) are fed to
 * libFuzzer as extra counters, so that inputs reaching new checker code are
 * kept. */
__attribute__((section("__libfuzzer_extra_counters"), used))
static uint8_t lua_lines[1 << 14];

static void count_line(lua_State *L, lua_Debug *ar) {
  uint32_t h = 2166136261u;
  lua_getinfo(L, "S", ar);
  for (const char *s = ar->source; *s; s++) h = (h ^ (uint8_t)*s) * 16777619u;
  h = (h ^ (uint32_t)ar->currentline) * 16777619u;
  lua_lines[h % sizeof lua_lines]++;
}

static void budget_hook(lua_State *L, lua_Debug *ar) {
  if (ar->event == LUA_HOOKLINE) {
    count_line(L, ar);
    return;
  }
  void *ud;
  lua_getallocf(L, &ud);
  budget *b = ud;
  b->instructions += HOOK_EVERY;
  if (b->instructions < INSTRUCTION_BUDGET) return;
  lua_sethook(L, budget_hook, LUA_MASKCOUNT | LUA_MASKLINE, 1);
  luaL_error(L, "fuzz harness: instruction budget spent");
}

static void budget_install(lua_State *L, budget *b) {
  b->base = lua_getallocf(L, &b->base_ud);
  b->used = (size_t)lua_gc(L, LUA_GCCOUNT) * 1024 + (size_t)lua_gc(L, LUA_GCCOUNTB);
  b->limit = b->used + HEAP_BUDGET;
  b->instructions = 0;
  lua_setallocf(L, budget_alloc, b);
  lua_sethook(L, budget_hook, LUA_MASKCOUNT | LUA_MASKLINE, HOOK_EVERY);
}

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
  FUZZ_REQUIRE(rc == 0 || rc == SG_ELUA || h->last_error[0], "%s failed without a message", what);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  sg_host_options opts = {sizeof opts, data_dir, SG_LOG_DEBUG, fuzz_log_line, NULL, NULL, NULL};
  sg_host *h;
  budget b;
  int closed = 0;
  FUZZ_REQUIRE(sg_host_new(&loop, &opts, &h) == 0, "sg_host_new");
  budget_install(h->L, &b);
  int rc = sg_host_load_config_string(h, "fuzz.lua", (const char *)data, size);
  check_result(h, rc, "load");
  if (rc == 0) check_result(h, sg_host_reload(h), "reload");
  sg_host_close(h, host_closed, &closed);
  uv_run(&loop, UV_RUN_DEFAULT);
  FUZZ_REQUIRE(closed, "the host did not close");
  return 0;
}
