/* The C Lua modules, registered in package.preload by the host. */
#include "bindings.h"

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

const sg_binding sg__bindings[] = {
    {"segue.core", luaopen_segue_core},
    {"segue.json", luaopen_segue_json},
    {"segue.loop", luaopen_segue_loop},
    {"segue.fs", luaopen_segue_fs},
    {"segue.harmony", luaopen_segue_harmony},
    {"segue.federation", luaopen_segue_federation},
    {"segue.store", luaopen_segue_store},
    {"segue.postbox_core", luaopen_segue_postbox_core},
    {"segue.net", luaopen_segue_net},
    {NULL, NULL},
};
