/* segue.store's userdata, shared with bindings/lua_postbox.c, which builds a
 * postbox on an open store. */
#ifndef SEGUE_LUA_STORE_H
#define SEGUE_LUA_STORE_H
#include <lua.h>
#include "store.h"

/* The open store of the segue.store db at `idx`; raises if it is not one or
 * if it was closed (a programmer error). Borrowed: keep a reference to the
 * Lua value (and call sg__lua_store_hold) for as long as it is used. */
sg__store *sg__lua_check_store(lua_State *L, int idx);
/* hold +1 / -1: while held, db:close() is refused (it would free a store a
 * postbox still uses); __gc always closes, since nothing can hold it then. */
void sg__lua_store_hold(lua_State *L, int idx, int delta);

#endif
