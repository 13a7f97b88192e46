/* segue.loop: timers, file watchers and the clock on the host's uv loop, and
 * (for `segue exec` scripts and specs only) running that loop from the top
 * level. A handle's userdata holds a pointer to C memory, never the uv handle
 * itself, so Lua's GC cannot free memory libuv still uses (luv's model). */
#include <lauxlib.h>
#include <stdio.h>
#include <stdlib.h>

#include "bindings.h"

#define TIMER_MT "segue.timer"
#define WATCH_MT "segue.watcher"

/* Every Lua-visible handle: an sg__lown (bindings.h) first, the uv handle
 * after; refs[CB] is its callback. */
enum { CB = 0 };
typedef struct lhandle {
  sg__lown own;
  union {
    uv_handle_t handle;
    uv_timer_t timer;
    uv_fs_event_t fs_event;
  } u;
} lhandle;

static void handle_freed(uv_handle_t *handle) { sg__lown_c_done(handle->data); }

static void handle_close(lhandle *lh) {
  if (sg__lown_close(&lh->own)) uv_close(&lh->u.handle, handle_freed);
}

/* Pushes a new userdata of metatable `mt` owning a new lhandle whose
 * callback is the function at `fn_idx`; the caller initializes the handle
 * and then calls handle_ready. */
static lhandle *handle_new(lua_State *L, const char *mt, int fn_idx) {
  sg__lenv *e = sg__lenv_check(L);
  if (e->closing) luaL_error(L, "the host is closing");
  lhandle *lh = sg__lown_new(L, e, mt, sizeof *lh);
  sg__lown_ref(L, &lh->own, CB, fn_idx);
  return lh;
}

/* The handle is initialized: it closes with the others from now on. */
static void handle_ready(lua_State *L, lhandle *lh, int keep_alive) {
  lh->u.handle.data = lh;
  if (keep_alive) sg__lown_pin(L, &lh->own, -1);
}

static lhandle **check_handle(lua_State *L) {
  lhandle **ud = luaL_testudata(L, 1, TIMER_MT);
  if (!ud) ud = luaL_testudata(L, 1, WATCH_MT);
  luaL_argcheck(L, ud != NULL, 1, "expected a timer or watcher");
  return ud;
}

static int l_handle_stop(lua_State *L) {
  lhandle **ud = check_handle(L);
  if (*ud) handle_close(*ud);
  return 0;
}

static int l_handle_active(lua_State *L) {
  lhandle **ud = check_handle(L);
  lua_pushboolean(L, *ud && !(*ud)->own.closed);
  return 1;
}

static int l_handle_gc(lua_State *L) {
  lhandle **ud = check_handle(L);
  lhandle *lh = *ud;
  *ud = NULL;
  if (lh && sg__lown_gc(&lh->own)) uv_close(&lh->u.handle, handle_freed);
  return 0;
}

/* ---- timers --------------------------------------------------------------- */

static void timer_fired(uv_timer_t *handle) {
  lhandle *t = handle->data;
  sg__lenv *e = t->own.e;
  lua_State *L = e->L;
  if (!L || t->own.closed) return;
  sg__lown_push(L, &t->own, CB);
  if (uv_timer_get_repeat(handle) == 0) {
    /* Closed before the call: the callback may drop its last reference. */
    lua_rawgeti(L, LUA_REGISTRYINDEX, t->own.self_ref);
    handle_close(t);
    lua_pop(L, 1);
  }
  sg__lenv_pcall(e, 0, 0, "timer callback");
}

/* timer(ms, repeat_ms, fn) -> timer */
static int l_timer(lua_State *L) {
  lua_Integer ms = luaL_checkinteger(L, 1);
  lua_Integer rep = luaL_optinteger(L, 2, 0);
  luaL_checktype(L, 3, LUA_TFUNCTION);
  luaL_argcheck(L, ms >= 0, 1, "must not be negative");
  luaL_argcheck(L, rep >= 0, 2, "must not be negative");
  lhandle *t = handle_new(L, TIMER_MT, 3);
  uv_timer_init(t->own.e->loop, &t->u.timer);
  handle_ready(L, t, 1);
  uv_timer_start(&t->u.timer, timer_fired, (uint64_t)ms, (uint64_t)rep);
  return 1;
}

/* ---- file watching ---------------------------------------------------------- */

static void watch_fired(uv_fs_event_t *handle, const char *filename, int events, int status) {
  lhandle *w = handle->data;
  lua_State *L = w->own.e->L;
  if (!L || w->own.closed) return;
  sg__lown_push(L, &w->own, CB);
  if (filename) lua_pushstring(L, filename);
  else lua_pushnil(L);
  lua_pushinteger(L, status < 0 ? status : events);
  sg__lenv_pcall(w->own.e, 2, 0, "watch callback");
}

/* watch(path, fn) -> watcher | nil, err: fn(filename, events) on each change
 * in path (a directory or a file); events < 0 is an error code. Editors
 * replace files by rename, so watch the directory to keep seeing a file.
 * Watching alone does not keep the loop alive. */
static int l_watch(lua_State *L) {
  const char *path = luaL_checkstring(L, 1);
  luaL_checktype(L, 2, LUA_TFUNCTION);
  lhandle *w = handle_new(L, WATCH_MT, 2);
  uv_fs_event_init(w->own.e->loop, &w->u.fs_event);
  handle_ready(L, w, 0);
  int rc = uv_fs_event_start(&w->u.fs_event, watch_fired, path, 0);
  if (rc != 0) {
    handle_close(w);
    char msg[512];
    snprintf(msg, sizeof msg, "cannot watch %s: %s", path, uv_strerror(rc));
    return sg__lua_fail(L, rc, msg);
  }
  uv_unref(&w->u.handle);
  return 1;
}

/* ---- the clock and the loop ------------------------------------------------- */

static int l_now(lua_State *L) {
  sg__lenv *h = sg__lenv_of(L);
  lua_pushinteger(L, h ? (lua_Integer)uv_now(h->loop) : 0);
  return 1;
}

static int l_hrtime(lua_State *L) {
  lua_pushinteger(L, (lua_Integer)uv_hrtime());
  return 1;
}

/* run([mode]) -> alive: runs the loop from the top level of a script. uv_run
 * is not reentrant, so this refuses to run inside a loop callback. When the
 * host started closing during the turn (a signal stopped `segue exec`), it
 * raises, so the script unwinds and the host can close the Lua state. */
static int l_run(lua_State *L) {
  static const char *const modes[] = {"default", "once", "nowait", NULL};
  static const uv_run_mode uv_modes[] = {UV_RUN_DEFAULT, UV_RUN_ONCE, UV_RUN_NOWAIT};
  sg__lenv *e = sg__lenv_check(L);
  int mode = luaL_checkoption(L, 1, "default", modes);
  if (e->loop_depth) return luaL_error(L, "segue.loop.run cannot be called from a loop callback");
  if (e->closing) return luaL_error(L, "the host is closing");
  e->loop_depth++;
  lua_State *running = sg__lenv_wait_begin(e);
  int alive = uv_run(e->loop, uv_modes[mode]);
  sg__lenv_wait_end(e, running);
  e->loop_depth--;
  if (e->closing) return luaL_error(L, "the host is closing");
  lua_pushboolean(L, alive);
  return 1;
}

static void new_handle_metatable(lua_State *L, const char *name) {
  static const luaL_Reg methods[] = {
      {"stop", l_handle_stop}, {"close", l_handle_stop}, {"active", l_handle_active}, {NULL, NULL}};
  static const luaL_Reg meta[] = {{"__gc", l_handle_gc}, {NULL, NULL}};
  sg__lua_class(L, name, methods, meta);
}

int luaopen_segue_loop(lua_State *L) {
  static const luaL_Reg fns[] = {{"timer", l_timer}, {"watch", l_watch}, {"now", l_now},
                                 {"hrtime", l_hrtime}, {"run", l_run}, {NULL, NULL}};
  new_handle_metatable(L, TIMER_MT);
  new_handle_metatable(L, WATCH_MT);
  luaL_newlib(L, fns);
  return 1;
}
