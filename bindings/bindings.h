/* The Lua modules implemented in C. The host registers each in
 * package.preload under its name, so `require "segue.json"` works in the
 * host, in `segue exec` scripts and in busted specs alike. */
#ifndef SEGUE_BINDINGS_H
#define SEGUE_BINDINGS_H
#include <lua.h>
#include <lauxlib.h>

typedef struct {
  const char *name;
  lua_CFunction open;
} sg_binding;

/* Terminated by {NULL, NULL}. */
extern const sg_binding sg__bindings[];

/* Registers the metatable `name` (once): `methods` (may be NULL) become its
 * __index table, `meta` its metamethods ({"__gc", fn}, ...). Leaves the
 * stack as it was. */
void sg__lua_class(lua_State *L, const char *name, const luaL_Reg *methods,
                   const luaL_Reg *meta);

int luaopen_segue_core(lua_State *L);     /* bindings/lua_core.c */
int luaopen_segue_json(lua_State *L);     /* bindings/lua_json.c */
int luaopen_segue_loop(lua_State *L);     /* bindings/lua_loop.c */
int luaopen_segue_fs(lua_State *L);       /* bindings/lua_fs.c */
int luaopen_segue_harmony(lua_State *L);  /* bindings/lua_harmony.c */
int luaopen_segue_federation(lua_State *L);  /* bindings/lua_federation.c */
int luaopen_segue_store(lua_State *L);    /* bindings/lua_store.c */
int luaopen_segue_postbox_core(lua_State *L);  /* bindings/lua_postbox.c */
int luaopen_segue_net(lua_State *L);      /* bindings/lua_net.c */

#endif
