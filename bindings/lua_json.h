/* JSON <-> Lua conversion, shared by the bindings and the host.
 * Lua shape: objects are tables with string keys, arrays are sequences
 * (1..n), null is nil inside objects and segue.json.null inside arrays and
 * at the top level; an empty table encodes as [] unless it carries the
 * segue.json.object metatable (json.object{}) which makes it {}. */
#ifndef SEGUE_LUA_JSON_H
#define SEGUE_LUA_JSON_H
#include <lua.h>
#include <cjson/cJSON.h>

#define SG_LUA_JSON_MAX_DEPTH 128

/* Pushes `v` as a Lua value (exactly one value; raises on out of memory or
 * nesting deeper than SG_LUA_JSON_MAX_DEPTH). */
void sg__lua_push_json(lua_State *L, const cJSON *v);

/* Converts the Lua value at `idx`. Returns a new tree (caller frees with
 * cJSON_Delete), or NULL with "path: reason" in err (functions, userdata,
 * NaN, cycles or too deep, mixed tables). Never raises except on memory. */
cJSON *sg__lua_to_json(lua_State *L, int idx, char *err, size_t errlen);

#endif
