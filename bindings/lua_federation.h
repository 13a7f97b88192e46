/* segue.federation's userdata, shared with bindings/lua_postbox.c, which
 * takes the federation's Pushes in C (pb:serve_pushes). */
#ifndef SEGUE_LUA_FEDERATION_H
#define SEGUE_LUA_FEDERATION_H
#include <lua.h>
#include "federation.h"

/* The open federation of the segue.federation object at `idx`; raises if it
 * is not one or was closed. Borrowed: keep a reference to the Lua value for
 * as long as it is used (its memory lives as long as the userdata). */
sg__federation *sg__lua_check_federation(lua_State *L, int idx);

/* The same without raising: NULL when the value at `idx` is not a
 * segue.federation, or it was collected (its memory may be gone: safe from
 * a __gc at lua_close) or closed. */
sg__federation *sg__lua_to_federation(lua_State *L, int idx);

#endif
