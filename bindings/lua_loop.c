/* segue.loop: timers and the clock on the host's uv loop, and (for
 * `segue exec` scripts and specs only) running that loop from the top level.
 * A timer's userdata holds a pointer to C memory, never the uv handle itself,
 * so Lua's GC cannot free memory libuv still uses (luv's model). */
#include <lauxlib.h>
#include <stdlib.h>

#include "bindings.h"
#include "host.h"

#define TIMER_MT "segue.timer"

typedef struct ltimer {
  uv_timer_t handle;
  sg_host *h;
  int cb_ref;     /* the callback */
  int self_ref;   /* keeps the userdata alive while the timer is active */
  int closed;
  int handle_gone, userdata_gone;  /* freed when both are true */
} ltimer;

static void timer_freed(uv_handle_t *handle) {
  ltimer *t = handle->data;
  t->handle_gone = 1;
  if (t->userdata_gone) free(t);
}

/* Releases the Lua references now (the state may be gone by the time the
 * close callback runs) and the C memory in the close callback. */
static void timer_close(lua_State *L, ltimer *t, int unref) {
  if (t->closed) return;
  t->closed = 1;
  uv_timer_stop(&t->handle);
  if (unref) {
    luaL_unref(L, LUA_REGISTRYINDEX, t->cb_ref);
    luaL_unref(L, LUA_REGISTRYINDEX, t->self_ref);
  }
  uv_close((uv_handle_t *)&t->handle, timer_freed);
}

static void timer_fired(uv_timer_t *handle) {
  ltimer *t = handle->data;
  lua_State *L = t->h->L;
  if (!L || t->closed) return;
  lua_rawgeti(L, LUA_REGISTRYINDEX, t->cb_ref);
  int oneshot = uv_timer_get_repeat(handle) == 0;
  if (oneshot) {
    /* Closed before the call: the callback may drop its last reference. */
    lua_rawgeti(L, LUA_REGISTRYINDEX, t->self_ref);
    timer_close(L, t, 1);
    lua_pop(L, 1);
  }
  sg__host_pcall(t->h, 0, 0, "timer callback");
}

static ltimer **check_timer(lua_State *L) { return luaL_checkudata(L, 1, TIMER_MT); }

/* timer(ms, repeat_ms, fn) -> timer */
static int l_timer(lua_State *L) {
  sg_host *h = sg__host_from_lua(L);
  if (!h) return luaL_error(L, "segue.loop needs the segue host");
  lua_Integer ms = luaL_checkinteger(L, 1);
  lua_Integer rep = luaL_optinteger(L, 2, 0);
  luaL_checktype(L, 3, LUA_TFUNCTION);
  luaL_argcheck(L, ms >= 0, 1, "must not be negative");
  luaL_argcheck(L, rep >= 0, 2, "must not be negative");
  if (h->closing) return luaL_error(L, "the host is closing");
  ltimer **ud = lua_newuserdatauv(L, sizeof *ud, 0);
  *ud = NULL;
  luaL_setmetatable(L, TIMER_MT);
  ltimer *t = calloc(1, sizeof *t);
  if (!t) return luaL_error(L, "out of memory");
  *ud = t;
  t->h = h;
  uv_timer_init(h->loop, &t->handle);
  t->handle.data = t;
  lua_pushvalue(L, 3);
  t->cb_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_pushvalue(L, -1);
  t->self_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  uv_timer_start(&t->handle, timer_fired, (uint64_t)ms, (uint64_t)rep);
  return 1;
}

static int l_timer_stop(lua_State *L) {
  ltimer **ud = check_timer(L);
  if (*ud) timer_close(L, *ud, 1);
  return 0;
}

static int l_timer_active(lua_State *L) {
  ltimer **ud = check_timer(L);
  lua_pushboolean(L, *ud && !(*ud)->closed);
  return 1;
}

static int l_timer_gc(lua_State *L) {
  ltimer **ud = check_timer(L);
  ltimer *t = *ud;
  *ud = NULL;
  if (!t) return 0;
  timer_close(L, t, 0);
  t->userdata_gone = 1;
  if (t->handle_gone) free(t);
  return 0;
}

static int l_now(lua_State *L) {
  sg_host *h = sg__host_from_lua(L);
  lua_pushinteger(L, h ? (lua_Integer)uv_now(h->loop) : 0);
  return 1;
}

static int l_hrtime(lua_State *L) {
  lua_pushinteger(L, (lua_Integer)uv_hrtime());
  return 1;
}

/* run([mode]) -> alive: runs the loop from the top level of a script. uv_run
 * is not reentrant, so this refuses to run inside a loop callback. */
static int l_run(lua_State *L) {
  static int running;
  static const char *const modes[] = {"default", "once", "nowait", NULL};
  static const uv_run_mode uv_modes[] = {UV_RUN_DEFAULT, UV_RUN_ONCE, UV_RUN_NOWAIT};
  sg_host *h = sg__host_from_lua(L);
  int mode = luaL_checkoption(L, 1, "default", modes);
  if (!h) return luaL_error(L, "segue.loop needs the segue host");
  if (running) return luaL_error(L, "segue.loop.run cannot be called from a loop callback");
  running = 1;
  int alive = uv_run(h->loop, uv_modes[mode]);
  running = 0;
  lua_pushboolean(L, alive);
  return 1;
}

/* ---- file watching: watch(dir, fn(filename, events)) -> watcher ---------- */

#define WATCH_MT "segue.watcher"

typedef struct lwatch {
  uv_fs_event_t handle;
  sg_host *h;
  int cb_ref;
  int closed, handle_gone, userdata_gone;
} lwatch;

static void watch_freed(uv_handle_t *handle) {
  lwatch *w = handle->data;
  w->handle_gone = 1;
  if (w->userdata_gone) free(w);
}

static void watch_close(lua_State *L, lwatch *w, int unref) {
  if (w->closed) return;
  w->closed = 1;
  if (unref) luaL_unref(L, LUA_REGISTRYINDEX, w->cb_ref);
  uv_close((uv_handle_t *)&w->handle, watch_freed);
}

static void watch_fired(uv_fs_event_t *handle, const char *filename, int events, int status) {
  lwatch *w = handle->data;
  lua_State *L = w->h->L;
  if (!L || w->closed) return;
  lua_rawgeti(L, LUA_REGISTRYINDEX, w->cb_ref);
  if (filename) lua_pushstring(L, filename);
  else lua_pushnil(L);
  lua_pushinteger(L, status < 0 ? status : events);
  sg__host_pcall(w->h, 2, 0, "watch callback");
}

/* watch(path, fn): fn(filename, events) on each change in path (a directory
 * or a file); events < 0 is an error code. Editors replace files by rename,
 * so watch the directory to keep seeing a file. */
static int l_watch(lua_State *L) {
  sg_host *h = sg__host_from_lua(L);
  const char *path = luaL_checkstring(L, 1);
  luaL_checktype(L, 2, LUA_TFUNCTION);
  if (!h) return luaL_error(L, "segue.loop needs the segue host");
  lwatch **ud = lua_newuserdatauv(L, sizeof *ud, 0);
  *ud = NULL;
  luaL_setmetatable(L, WATCH_MT);
  lwatch *w = calloc(1, sizeof *w);
  if (!w) return luaL_error(L, "out of memory");
  w->h = h;
  uv_fs_event_init(h->loop, &w->handle);
  w->handle.data = w;
  int rc = uv_fs_event_start(&w->handle, watch_fired, path, 0);
  if (rc != 0) {
    w->userdata_gone = 1;
    w->closed = 1;
    uv_close((uv_handle_t *)&w->handle, watch_freed);
    luaL_pushfail(L);
    lua_pushfstring(L, "%s: cannot watch %s: %s", uv_err_name(rc), path, uv_strerror(rc));
    return 2;
  }
  *ud = w;
  lua_pushvalue(L, 2);
  w->cb_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  uv_unref((uv_handle_t *)&w->handle);  /* watching alone does not keep the loop alive */
  return 1;
}

static int l_watch_stop(lua_State *L) {
  lwatch **ud = luaL_checkudata(L, 1, WATCH_MT);
  if (*ud) watch_close(L, *ud, 1);
  return 0;
}

static int l_watch_gc(lua_State *L) {
  lwatch **ud = luaL_checkudata(L, 1, WATCH_MT);
  lwatch *w = *ud;
  *ud = NULL;
  if (!w) return 0;
  watch_close(L, w, 0);
  w->userdata_gone = 1;
  if (w->handle_gone) free(w);
  return 0;
}

int luaopen_segue_loop(lua_State *L) {
  static const luaL_Reg timer_methods[] = {
      {"stop", l_timer_stop}, {"close", l_timer_stop}, {"active", l_timer_active}, {NULL, NULL}};
  static const luaL_Reg fns[] = {{"timer", l_timer}, {"now", l_now}, {"hrtime", l_hrtime},
                                 {"run", l_run}, {"watch", l_watch}, {NULL, NULL}};
  static const luaL_Reg watch_methods[] = {{"stop", l_watch_stop}, {NULL, NULL}};
  if (luaL_newmetatable(L, WATCH_MT)) {
    luaL_newlib(L, watch_methods);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, l_watch_gc);
    lua_setfield(L, -2, "__gc");
  }
  lua_pop(L, 1);
  if (luaL_newmetatable(L, TIMER_MT)) {
    luaL_newlib(L, timer_methods);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, l_timer_gc);
    lua_setfield(L, -2, "__gc");
  }
  lua_pop(L, 1);
  luaL_newlib(L, fns);
  return 1;
}
