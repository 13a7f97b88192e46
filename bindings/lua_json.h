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

/* Pushes `v` as exactly one Lua value and returns 0; or, when `v` nests
 * deeper than SG_LUA_JSON_MAX_DEPTH, pushes nothing and returns SG_ELIMIT
 * with the reason in err. Raises only on out of memory, so call it from a
 * Lua C function (already protected); from C outside Lua use the next one. */
int sg__lua_push_json(lua_State *L, const cJSON *v, char *err, size_t errlen);

/* The same conversion, run under lua_pcall: for C that calls into Lua
 * (events, callbacks), where a raise would abort the process. 0 with one
 * value pushed, or SG_ELIMIT / SG_ENOMEM with nothing pushed and the reason
 * in err. Push the function and its other arguments, convert, then call
 * sg__lenv_pcall. */
int sg__lua_push_json_protected(lua_State *L, const cJSON *v, char *err, size_t errlen);

/* Converts the Lua value at `idx`. Returns a new tree (caller frees with
 * cJSON_Delete), or NULL with "path: reason" in err (functions, userdata,
 * NaN, cycles or too deep, mixed tables). Never raises except on memory. */
cJSON *sg__lua_to_json(lua_State *L, int idx, char *err, size_t errlen);

#endif
