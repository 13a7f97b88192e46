/* The C Lua modules, registered in package.preload by the host. */
#include "bindings.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- the owner's environment ---------------------------------------------- */

static const char lenv_key = 'e';

void sg__lenv_set(lua_State *L, sg__lenv *e) {
  lua_pushlightuserdata(L, e);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &lenv_key);
}

sg__lenv *sg__lenv_of(lua_State *L) {
  lua_rawgetp(L, LUA_REGISTRYINDEX, &lenv_key);
  sg__lenv *e = lua_touserdata(L, -1);
  lua_pop(L, 1);
  return e;
}

sg__lenv *sg__lenv_check(lua_State *L) {
  sg__lenv *e = sg__lenv_of(L);
  if (!e) luaL_error(L, "this needs the segue host (run under `segue`)");
  return e;
}

sg__backend *sg__lenv_find_backend(sg__lenv *e, const char *name) {
  for (sg__backend *b = e->backends; b; b = b->next)
    if (strcmp(b->name, name) == 0) return b;
  return NULL;
}

static int traceback(lua_State *L) {
  const char *msg = lua_tostring(L, 1);
  if (!msg) msg = lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, 1));
  luaL_traceback(L, L, msg, 1);
  return 1;
}

void sg__lenv_report(sg__lenv *e, int err, const char *message) {
  sg__log(&e->log, SG_LOG_ERROR, NULL, NULL, "%s", message);
  if (e->on_error) e->on_error(e, err, message);
}

int sg__lenv_pcall(sg__lenv *e, int nargs, int nres, const char *what) {
  lua_State *L = e->L;
  int base = lua_gettop(L) - nargs;
  lua_pushcfunction(L, traceback);
  lua_insert(L, base);
  int rc = lua_pcall(L, nargs, nres, base);
  lua_remove(L, base);
  if (rc == LUA_OK) return 0;
  char buf[4096];
  snprintf(buf, sizeof buf, "%s: %s", what, lua_tostring(L, -1));
  lua_pop(L, 1);
  sg__lenv_report(e, SG_ELUA, buf);
  return SG_ELUA;
}

/* ---- the life of C memory behind a userdata ------------------------------- */

void sg__lown_init(sg__lown *o, sg__lenv *e) {
  memset(o, 0, sizeof *o);
  o->e = e;
  o->self_ref = LUA_NOREF;
  for (int i = 0; i < SG__LOWN_REFS; i++) o->refs[i] = LUA_NOREF;
}

void sg__lown_ref(lua_State *L, sg__lown *o, int slot, int idx) {
  lua_pushvalue(L, idx);
  luaL_unref(L, LUA_REGISTRYINDEX, o->refs[slot]);
  o->refs[slot] = luaL_ref(L, LUA_REGISTRYINDEX);
}

void sg__lown_push(lua_State *L, const sg__lown *o, int slot) {
  lua_rawgeti(L, LUA_REGISTRYINDEX, o->refs[slot]);
}

void sg__lown_pin(lua_State *L, sg__lown *o, int idx) {
  lua_pushvalue(L, idx);
  luaL_unref(L, LUA_REGISTRYINDEX, o->self_ref);
  o->self_ref = luaL_ref(L, LUA_REGISTRYINDEX);
}

int sg__lown_close(sg__lown *o) {
  if (o->closed) return 0;
  o->closed = 1;
  lua_State *L = o->e->L;
  if (L && !o->lua_gone) {
    for (int i = 0; i < SG__LOWN_REFS; i++) luaL_unref(L, LUA_REGISTRYINDEX, o->refs[i]);
    luaL_unref(L, LUA_REGISTRYINDEX, o->self_ref);
  }
  for (int i = 0; i < SG__LOWN_REFS; i++) o->refs[i] = LUA_NOREF;
  o->self_ref = LUA_NOREF;
  return 1;
}

void sg__lown_c_done(sg__lown *o) {
  o->c_gone = 1;
  if (o->lua_gone) free(o);
}

int sg__lown_gc(sg__lown *o) {
  o->lua_gone = 1;
  if (sg__lown_close(o)) return 1;
  if (o->c_gone) free(o);
  return 0;
}

void *sg__lown_new(lua_State *L, sg__lenv *e, const char *mt, size_t size) {
  void **ud = lua_newuserdatauv(L, sizeof *ud, 0);
  *ud = NULL;
  luaL_setmetatable(L, mt);
  sg__lown *o = calloc(1, size);
  if (!o) luaL_error(L, "out of memory");
  sg__lown_init(o, e);
  *ud = o;
  return o;
}

void *sg__lown_get(lua_State *L, int idx, const char *mt) {
  return *(void **)luaL_checkudata(L, idx, mt);
}

void *sg__lown_take(lua_State *L, int idx, const char *mt) {
  void **ud = luaL_checkudata(L, idx, mt);
  void *o = *ud;
  *ud = NULL;
  return o;
}

void sg__lown_discard(lua_State *L, int idx, sg__lown *o) {
  void **ud = lua_touserdata(L, idx);
  if (ud && *ud == o) *ud = NULL;
  free(o);
}

/* ---- the failure convention ----------------------------------------------- */

int sg__lua_fail(lua_State *L, int err, const char *msg) {
  luaL_pushfail(L);
  lua_pushfstring(L, "%s: %s", sg_err_name(err), msg && *msg ? msg : sg_strerror(err));
  lua_pushstring(L, sg_err_name(err));
  return 3;
}

int sg__lua_result(lua_State *L, int err) {
  if (err) return sg__lua_fail(L, err, NULL);
  lua_pushboolean(L, 1);
  return 1;
}

void sg__lua_class(lua_State *L, const char *name, const luaL_Reg *methods,
                   const luaL_Reg *meta) {
  if (luaL_newmetatable(L, name)) {
    if (methods) {
      lua_newtable(L);
      luaL_setfuncs(L, methods, 0);
      lua_setfield(L, -2, "__index");
    }
    luaL_setfuncs(L, meta, 0);
  }
  lua_pop(L, 1);
}

const sg__binding sg__bindings[] = {
    {"segue.core", luaopen_segue_core},
    {"segue.json", luaopen_segue_json},
    {"segue.loop", luaopen_segue_loop},
    {"segue.fs", luaopen_segue_fs},
    {"segue.harmony_core", luaopen_segue_harmony_core},
    {"segue.federation_core", luaopen_segue_federation_core},
    {"segue.store", luaopen_segue_store},
    {"segue.postbox_core", luaopen_segue_postbox_core},
    {"segue.net", luaopen_segue_net},
    {"segue.crypto", luaopen_segue_crypto},
    {"segue.xml", luaopen_segue_xml},
    {"segue.http_core", luaopen_segue_http_core},
    {NULL, NULL},
};
