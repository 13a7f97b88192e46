/* segue.core: the host's runtime for the Lua half (the scripts under
 * scripts/segue). Translation only: argument checks, tables <-> JSON trees,
 * callbacks into Lua. What to do with a backend or an update is decided in
 * Lua. This file: logging, events, embedded scripts; see core.h. */
#include <lauxlib.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core.h"
#include "embedded_scripts.h"
#include "flubber_codec.h"

/* ---- logging, events ------------------------------------------------------ */

/* log(level, msg [, key, value]...): fields are rendered before msg. */
static int l_log(lua_State *L) {
  static const char *const levels[] = {"error", "warn", "info", "debug", NULL};
  int lvl = luaL_checkoption(L, 1, NULL, levels);
  const char *msg = luaL_checkstring(L, 2);
  sg__lenv *h = sg__lenv_check(L);
  if (!sg__log_enabled(&h->log, (sg_log_level)lvl)) return 0;
  const char *kv[33];
  int n = 0;
  for (int i = 3; i + 1 <= lua_gettop(L) && n < 32; i += 2) {
    kv[n++] = luaL_checkstring(L, i);
    kv[n++] = luaL_checkstring(L, i + 1);
  }
  kv[n] = NULL;
  sg__log_fields(&h->log, (sg_log_level)lvl, kv, msg);
  return 0;
}

static int l_log_level(lua_State *L) {
  sg__lenv *h = sg__lenv_check(L);
  if (!lua_isnoneornil(L, 1)) {
    int lvl = sg__log_level_parse(luaL_checkstring(L, 1));
    luaL_argcheck(L, lvl >= 0, 1, "expected error, warn, info or debug");
    h->log.level = lvl;
  }
  lua_pushstring(L, sg__log_level_name(h->log.level));
  return 1;
}

/* report(message): an error no Lua caller can receive (one escaping a
 * coroutine, a handler or a timer callback) goes to the embedder's
 * error_cb as SG_ELUA, and to the log. */
static int l_report(lua_State *L) {
  sg__lenv_report(sg__lenv_check(L), SG_ELUA, luaL_checkstring(L, 1));
  return 0;
}

static int l_set_handler(lua_State *L) {
  sg__lenv *h = sg__lenv_check(L);
  luaL_checktype(L, 1, LUA_TFUNCTION);
  lua_settop(L, 1);
  luaL_unref(L, LUA_REGISTRYINDEX, h->handler_ref);
  h->handler_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  return 0;
}

static const sg__embedded_script *find_embedded(int kind, const char *name) {
  for (const sg__embedded_script *s = sg__embedded_scripts; s->name; s++)
    if (s->kind == kind && strcmp(s->name, name) == 0) return s;
  return NULL;
}

/* builtin_backend(name) -> source, path | nil */
static int l_builtin_backend(lua_State *L) {
  const sg__embedded_script *s = find_embedded(SG_EMBED_backend, luaL_checkstring(L, 1));
  if (!s) return 0;
  lua_pushlstring(L, s->source, s->length);
  lua_pushstring(L, s->path);
  return 2;
}

/* embedded_source(module) -> source | nil: for `segue config --default`. */
static int l_embedded_source(lua_State *L) {
  const sg__embedded_script *s = find_embedded(SG_EMBED_module, luaL_checkstring(L, 1));
  if (!s) return 0;
  lua_pushlstring(L, s->source, s->length);
  return 1;
}

/* web_file(name) -> content | nil: a file of the web client (web/). */
static int l_web_file(lua_State *L) {
  const sg__embedded_script *s = find_embedded(SG_EMBED_web, luaL_checkstring(L, 1));
  if (!s) return 0;
  lua_pushlstring(L, s->source, s->length);
  return 1;
}

static int l_expected_response(lua_State *L) {
  const char *r = sg__fl_expected_response(luaL_checkstring(L, 1));
  if (!r) return 0;
  lua_pushstring(L, r);
  return 1;
}

/* ---- the sandbox of rules and config ---------------------------------------
 * sandbox_enter(what, max_instructions, max_memory, max_string, max_subject):
 * until the matching sandbox_leave, Lua code may run max_instructions more
 * instructions ("<what> stopped after N instructions", raised again at every
 * later hook tick), the heap may grow by max_memory bytes (allocations past
 * it fail: "not enough memory"), string.rep results and pattern subjects are
 * bounded. Nested runs keep the tighter bounds. */
static size_t tighter(size_t current, size_t wanted) {
  return current && current < wanted ? current : wanted;
}

/* Works while the host closes too (a closing handler may run rules). */
static sg__lenv *sandbox_env(lua_State *L) {
  sg__lenv *e = sg__lenv_of(L);
  if (!e) luaL_error(L, "this needs the segue host (run under `segue`)");
  return e;
}

static int l_sandbox_enter(lua_State *L) {
  sg__lenv *e = sandbox_env(L);
  const char *what = luaL_checkstring(L, 1);
  lua_Integer instr = luaL_checkinteger(L, 2), mem = luaL_checkinteger(L, 3),
              str = luaL_checkinteger(L, 4), subj = luaL_checkinteger(L, 5);
  luaL_argcheck(L, instr > 0 && mem > 0 && str > 0 && subj > 0, 2, "bounds must be positive");
  int max = (int)(sizeof e->sandbox_saved / sizeof *e->sandbox_saved);
  if (e->sandbox_depth >= max) return luaL_error(L, "sandboxes nested deeper than %d", max);
  if (e->tripped[0] && e->tripped[0] != '?') return luaL_error(L, "%s", e->tripped);
  struct sg__sandbox_frame *f = &e->sandbox_saved[e->sandbox_depth++];
  f->mem_limit = e->mem_limit;
  f->max_string = e->max_string;
  f->max_subject = e->max_subject;
  f->instr_count = e->instr_count;
  f->instr_limit = e->instr_limit;
  f->mem_exceeded = e->mem_exceeded;
  memcpy(f->tripped, e->tripped, sizeof f->tripped);
  e->mem_limit = tighter(e->mem_limit, e->mem_used + (size_t)mem);
  e->max_string = tighter(e->max_string, (size_t)str);
  e->max_subject = tighter(e->max_subject, (size_t)subj);
  e->instr_count = 0;
  e->instr_limit = (uint64_t)instr;
  /* "?what": not tripped yet; the hook writes the message when it trips */
  snprintf(e->tripped, sizeof e->tripped, "?%s", what);
  e->mem_exceeded = 0;
  return 0;
}

/* sandbox_leave() -> the limit's message or false, whether the memory bound
 * was hit: what happened since the matching enter */
static int l_sandbox_leave(lua_State *L) {
  sg__lenv *e = sandbox_env(L);
  int exceeded = e->mem_exceeded;
  if (e->tripped[0] && e->tripped[0] != '?') lua_pushstring(L, e->tripped);
  else lua_pushboolean(L, 0);
  if (e->sandbox_depth > 0) {
    const struct sg__sandbox_frame *f = &e->sandbox_saved[--e->sandbox_depth];
    e->mem_limit = f->mem_limit;
    e->max_string = f->max_string;
    e->max_subject = f->max_subject;
    e->instr_count = f->instr_count + e->instr_count;  /* the outer run goes on counting */
    e->instr_limit = f->instr_limit;
    e->mem_exceeded = f->mem_exceeded || exceeded;
    memcpy(e->tripped, f->tripped, sizeof e->tripped);
  }
  lua_pushboolean(L, exceeded);
  return 2;
}

/* sandbox_state() -> limit message or false, memory bound hit, signal
 * number or false: what a sandboxed pcall must not swallow. */
static int l_sandbox_state(lua_State *L) {
  sg__lenv *e = sandbox_env(L);
  if (e->tripped[0] && e->tripped[0] != '?') lua_pushstring(L, e->tripped);
  else lua_pushboolean(L, 0);
  lua_pushboolean(L, e->mem_exceeded);
  if (e->interrupted) lua_pushinteger(L, e->interrupted);
  else lua_pushboolean(L, 0);
  return 3;
}

/* memory() -> bytes of Lua heap in use (as the host's allocator counts) */
static int l_memory(lua_State *L) {
  lua_pushinteger(L, (lua_Integer)sandbox_env(L)->mem_used);
  return 1;
}

int luaopen_segue_core(lua_State *L) {
  static const luaL_Reg fns[] = {
      {"log", l_log},
      {"log_level", l_log_level},
      {"set_handler", l_set_handler},
      {"report", l_report},
      {"builtin_backend", l_builtin_backend},
      {"embedded_source", l_embedded_source},
      {"web_file", l_web_file},
      {"expected_response", l_expected_response},
      {"sandbox_enter", l_sandbox_enter},
      {"sandbox_leave", l_sandbox_leave},
      {"sandbox_state", l_sandbox_state},
      {"memory", l_memory},
      {NULL, NULL}};
  luaL_newlib(L, fns);
  sg__core_open_backends(L);
  sg__core_open_stdio(L);
  sg__core_open_route(L);
  lua_pushstring(L, sg_version_string());
  lua_setfield(L, -2, "version");
  return 1;
}
