/* segue.loop: timers, file watchers and the clock on the host's uv loop, and
 * (for `segue exec` scripts and specs only) running that loop from the top
 * level. A handle's userdata holds a pointer to C memory, never the uv handle
 * itself, so Lua's GC cannot free memory libuv still uses (luv's model). */
#include <lauxlib.h>
#include <stdlib.h>

#include "bindings.h"

#define TIMER_MT "segue.timer"
#define WATCH_MT "segue.watcher"

/* Every Lua-visible handle: its memory is freed once both the uv close
 * callback ran and the userdata was collected, whichever comes last. */
typedef struct lhandle {
  union {
    uv_handle_t handle;
    uv_timer_t timer;
    uv_fs_event_t fs_event;
  } u;
  sg__lenv *h;
  int cb_ref;     /* the callback */
  int self_ref;   /* keeps the userdata alive while the handle is active */
  int closed, handle_gone, userdata_gone;
} lhandle;

static void handle_freed(uv_handle_t *handle) {
  lhandle *lh = handle->data;
  lh->handle_gone = 1;
  if (lh->userdata_gone) free(lh);
}

/* Releases the Lua references now (the state may be gone by the time the
 * close callback runs) and the C memory in the close callback. */
static void handle_close(lua_State *L, lhandle *lh, int unref) {
  if (lh->closed) return;
  lh->closed = 1;
  if (unref) {
    luaL_unref(L, LUA_REGISTRYINDEX, lh->cb_ref);
    luaL_unref(L, LUA_REGISTRYINDEX, lh->self_ref);
  }
  uv_close(&lh->u.handle, handle_freed);
}

/* Pushes a new userdata of metatable `mt` owning a new lhandle whose
 * callback is the function at `fn_idx`; the caller initializes the handle
 * and then calls handle_ready. */
static lhandle *handle_new(lua_State *L, const char *mt, int fn_idx) {
  sg__lenv *h = sg__lenv_of(L);
  if (!h) luaL_error(L, "segue.loop needs the segue host");
  if (h->closing) luaL_error(L, "the host is closing");
  lhandle **ud = lua_newuserdatauv(L, sizeof *ud, 0);
  *ud = NULL;
  luaL_setmetatable(L, mt);
  lhandle *lh = calloc(1, sizeof *lh);
  if (!lh) luaL_error(L, "out of memory");
  lh->h = h;
  lh->cb_ref = lh->self_ref = LUA_NOREF;
  lua_pushvalue(L, fn_idx);
  lh->cb_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  *ud = lh;
  return lh;
}

/* The handle is initialized: it closes with the others from now on. */
static void handle_ready(lua_State *L, lhandle *lh, int keep_alive) {
  lh->u.handle.data = lh;
  if (keep_alive) {
    lua_pushvalue(L, -1);
    lh->self_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  }
}

static lhandle **check_handle(lua_State *L) {
  lhandle **ud = luaL_testudata(L, 1, TIMER_MT);
  if (!ud) ud = luaL_testudata(L, 1, WATCH_MT);
  luaL_argcheck(L, ud != NULL, 1, "expected a timer or watcher");
  return ud;
}

static int l_handle_stop(lua_State *L) {
  lhandle **ud = check_handle(L);
  if (*ud) handle_close(L, *ud, 1);
  return 0;
}

static int l_handle_active(lua_State *L) {
  lhandle **ud = check_handle(L);
  lua_pushboolean(L, *ud && !(*ud)->closed);
  return 1;
}

static int l_handle_gc(lua_State *L) {
  lhandle **ud = check_handle(L);
  lhandle *lh = *ud;
  *ud = NULL;
  if (!lh) return 0;
  handle_close(L, lh, 0);
  lh->userdata_gone = 1;
  if (lh->handle_gone) free(lh);
  return 0;
}

/* ---- timers --------------------------------------------------------------- */

static void timer_fired(uv_timer_t *handle) {
  lhandle *t = handle->data;
  lua_State *L = t->h->L;
  if (!L || t->closed) return;
  lua_rawgeti(L, LUA_REGISTRYINDEX, t->cb_ref);
  if (uv_timer_get_repeat(handle) == 0) {
    /* Closed before the call: the callback may drop its last reference. */
    lua_rawgeti(L, LUA_REGISTRYINDEX, t->self_ref);
    handle_close(L, t, 1);
    lua_pop(L, 1);
  }
  sg__lenv_pcall(t->h, 0, 0, "timer callback");
}

/* timer(ms, repeat_ms, fn) -> timer */
static int l_timer(lua_State *L) {
  lua_Integer ms = luaL_checkinteger(L, 1);
  lua_Integer rep = luaL_optinteger(L, 2, 0);
  luaL_checktype(L, 3, LUA_TFUNCTION);
  luaL_argcheck(L, ms >= 0, 1, "must not be negative");
  luaL_argcheck(L, rep >= 0, 2, "must not be negative");
  lhandle *t = handle_new(L, TIMER_MT, 3);
  uv_timer_init(t->h->loop, &t->u.timer);
  handle_ready(L, t, 1);
  uv_timer_start(&t->u.timer, timer_fired, (uint64_t)ms, (uint64_t)rep);
  return 1;
}

/* ---- file watching ---------------------------------------------------------- */

static void watch_fired(uv_fs_event_t *handle, const char *filename, int events, int status) {
  lhandle *w = handle->data;
  lua_State *L = w->h->L;
  if (!L || w->closed) return;
  lua_rawgeti(L, LUA_REGISTRYINDEX, w->cb_ref);
  if (filename) lua_pushstring(L, filename);
  else lua_pushnil(L);
  lua_pushinteger(L, status < 0 ? status : events);
  sg__lenv_pcall(w->h, 2, 0, "watch callback");
}

/* watch(path, fn) -> watcher | nil, err: fn(filename, events) on each change
 * in path (a directory or a file); events < 0 is an error code. Editors
 * replace files by rename, so watch the directory to keep seeing a file.
 * Watching alone does not keep the loop alive. */
static int l_watch(lua_State *L) {
  const char *path = luaL_checkstring(L, 1);
  luaL_checktype(L, 2, LUA_TFUNCTION);
  lhandle *w = handle_new(L, WATCH_MT, 2);
  uv_fs_event_init(w->h->loop, &w->u.fs_event);
  handle_ready(L, w, 0);
  int rc = uv_fs_event_start(&w->u.fs_event, watch_fired, path, 0);
  if (rc != 0) {
    handle_close(L, w, 1);
    luaL_pushfail(L);
    lua_pushfstring(L, "%s: cannot watch %s: %s", uv_err_name(rc), path, uv_strerror(rc));
    return 2;
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
 * is not reentrant, so this refuses to run inside a loop callback. */
static int l_run(lua_State *L) {
  static int running;
  static const char *const modes[] = {"default", "once", "nowait", NULL};
  static const uv_run_mode uv_modes[] = {UV_RUN_DEFAULT, UV_RUN_ONCE, UV_RUN_NOWAIT};
  sg__lenv *h = sg__lenv_of(L);
  int mode = luaL_checkoption(L, 1, "default", modes);
  if (!h) return luaL_error(L, "segue.loop needs the segue host");
  if (running) return luaL_error(L, "segue.loop.run cannot be called from a loop callback");
  running = 1;
  int alive = uv_run(h->loop, uv_modes[mode]);
  running = 0;
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
