/* segue.json: JSON text <-> Lua values, and the converters the other
 * bindings use to hand protocol values to Lua (see lua_json.h). */
#include "lua_json.h"

#include <lauxlib.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "bindings.h"

/* The null sentinel and the "encode me as an object" metatable live in the
 * registry under these addresses. */
static const char null_key = 'n';
static const char object_mt_key = 'o';

static void push_null(lua_State *L) {
  lua_rawgetp(L, LUA_REGISTRYINDEX, &null_key);
}

/* Returns 0 with one value pushed, or -1 (nothing pushed beyond what the
 * caller rolls back) when `v` nests deeper than SG_LUA_JSON_MAX_DEPTH. */
static int push_json_at(lua_State *L, const cJSON *v, int depth);

static int push_container(lua_State *L, const cJSON *v, int depth) {
  int is_array = cJSON_IsArray(v);
  lua_createtable(L, is_array ? cJSON_GetArraySize(v) : 0, is_array ? 0 : 4);
  if (!is_array) {
    lua_rawgetp(L, LUA_REGISTRYINDEX, &object_mt_key);
    lua_setmetatable(L, -2);
  }
  lua_Integer i = 1;
  for (const cJSON *c = v->child; c; c = c->next) {
    if (is_array) {
      if (push_json_at(L, c, depth + 1) != 0) return -1;
      lua_rawseti(L, -2, i++);
    } else if (!cJSON_IsNull(c)) {
      if (push_json_at(L, c, depth + 1) != 0) return -1;
      lua_setfield(L, -2, c->string);
    }
  }
  return 0;
}

static int push_json_at(lua_State *L, const cJSON *v, int depth) {
  if (depth > SG_LUA_JSON_MAX_DEPTH) return -1;
  luaL_checkstack(L, 3, "JSON value");
  if (cJSON_IsString(v)) {
    lua_pushstring(L, v->valuestring);
  } else if (cJSON_IsNumber(v)) {
    double d = v->valuedouble;
    /* Integral numbers within the exact range of doubles become integers,
     * so ids and sequence numbers stay integers in Lua. */
    if (d == floor(d) && fabs(d) <= 9007199254740992.0) lua_pushinteger(L, (lua_Integer)d);
    else lua_pushnumber(L, d);
  } else if (cJSON_IsBool(v)) {
    lua_pushboolean(L, cJSON_IsTrue(v));
  } else if (cJSON_IsArray(v) || cJSON_IsObject(v)) {
    return push_container(L, v, depth);
  } else {
    push_null(L);
  }
  return 0;
}

int sg__lua_push_json(lua_State *L, const cJSON *v, char *err, size_t errlen) {
  int top = lua_gettop(L);
  if (push_json_at(L, v, 0) == 0) return 0;
  lua_settop(L, top);
  snprintf(err, errlen, "JSON nested deeper than %d levels", SG_LUA_JSON_MAX_DEPTH);
  return SG_ELIMIT;
}

/* The protected half of sg__lua_push_json_protected: arguments are the
 * value (light userdata) and the error buffer (light userdata, size). */
static int push_json_call(lua_State *L) {
  const cJSON *v = lua_touserdata(L, 1);
  char *err = lua_touserdata(L, 2);
  size_t errlen = (size_t)lua_tointeger(L, 3);
  lua_settop(L, 0);
  if (sg__lua_push_json(L, v, err, errlen) != 0) lua_pushnil(L);
  else lua_pushboolean(L, 1);
  return 2;
}

int sg__lua_push_json_protected(lua_State *L, const cJSON *v, char *err, size_t errlen) {
  if (!lua_checkstack(L, 8)) {
    snprintf(err, errlen, "Lua stack overflow converting JSON");
    return SG_ENOMEM;
  }
  err[0] = '\0';
  lua_pushcfunction(L, push_json_call);
  lua_pushlightuserdata(L, (void *)v);
  lua_pushlightuserdata(L, err);
  lua_pushinteger(L, (lua_Integer)errlen);
  if (lua_pcall(L, 3, 2, 0) != LUA_OK) {
    snprintf(err, errlen, "converting JSON to Lua: %s", lua_tostring(L, -1));
    lua_pop(L, 1);
    return SG_ENOMEM;
  }
  if (lua_isnil(L, -1)) {
    lua_pop(L, 2);
    return SG_ELIMIT;
  }
  lua_pop(L, 1);
  return 0;
}

/* ---- Lua -> JSON --------------------------------------------------------- */

/* Where the conversion is, as keys and indexes: the path is rendered only
 * when it fails (a text per field would cost more than the conversion). */
typedef struct {
  const char *key;  /* NULL: an array index */
  lua_Integer index;
} to_json_seg;

typedef struct {
  lua_State *L;
  char *err;
  size_t errlen;
  int depth;
  to_json_seg seg[SG_LUA_JSON_MAX_DEPTH + 2];
} to_json;

static cJSON *convert(to_json *t, int idx, int depth);

static cJSON *fail(to_json *t, const char *fmt, const char *what) {
  char msg[160], path[256];
  size_t n = 0;
  path[0] = '\0';
  for (int i = 0; i < t->depth && n < sizeof path; i++) {
    const to_json_seg *sg = &t->seg[i];
    int w = sg->key ? snprintf(path + n, sizeof path - n, "%s%s", n ? "." : "", sg->key)
                    : snprintf(path + n, sizeof path - n, "[%lld]", (long long)sg->index);
    if (w < 0) break;
    n += (size_t)w;
  }
  snprintf(msg, sizeof msg, fmt, what);
  snprintf(t->err, t->errlen, "%s: %s", path[0] ? path : "value", msg);
  return NULL;
}

/* Returns n > 0 for a sequence 1..n, 0 for an object, -1 for a mix. */
static lua_Integer array_length(lua_State *L, int idx) {
  lua_Integer n = 0, max = 0;
  int strings = 0;
  lua_pushnil(L);
  while (lua_next(L, idx)) {
    lua_pop(L, 1);
    if (lua_type(L, -1) == LUA_TNUMBER && lua_isinteger(L, -1) && lua_tointeger(L, -1) > 0) {
      n++;
      if (lua_tointeger(L, -1) > max) max = lua_tointeger(L, -1);
    } else {
      strings++;
    }
  }
  if (n == 0) return 0;
  return strings == 0 && max == n ? n : -1;
}

static int table_empty(lua_State *L, int idx) {
  lua_pushnil(L);
  if (!lua_next(L, idx)) return 1;
  lua_pop(L, 2);
  return 0;
}

static int is_object_marked(lua_State *L, int idx) {
  if (!lua_getmetatable(L, idx)) return 0;
  lua_rawgetp(L, LUA_REGISTRYINDEX, &object_mt_key);
  int same = lua_rawequal(L, -1, -2);
  lua_pop(L, 2);
  return same;
}

static cJSON *convert_table(to_json *t, int idx, int depth) {
  lua_State *L = t->L;
  lua_Integer n = array_length(L, idx);
  if (n < 0) return fail(t, "%s", "table mixes array and object keys");
  to_json_seg *sg = &t->seg[depth];
  if (n > 0 || (table_empty(L, idx) && !is_object_marked(L, idx))) {
    cJSON *arr = cJSON_CreateArray();
    for (lua_Integer i = 1; arr && i <= n; i++) {
      sg->key = NULL;
      sg->index = i - 1;
      t->depth = depth + 1;
      lua_rawgeti(L, idx, i);
      cJSON *item = convert(t, lua_gettop(L), depth + 1);
      lua_pop(L, 1);
      if (!item) { cJSON_Delete(arr); return NULL; }
      cJSON_AddItemToArray(arr, item);
    }
    t->depth = depth;
    return arr;
  }
  cJSON *obj = cJSON_CreateObject();
  lua_pushnil(L);
  while (obj && lua_next(L, idx)) {
    if (lua_type(L, -2) != LUA_TSTRING) {
      const char *tn = luaL_typename(L, -2);
      lua_pop(L, 2);
      cJSON_Delete(obj);
      return fail(t, "object key of type %s (keys must be strings)", tn);
    }
    const char *key = lua_tostring(L, -2);
    sg->key = key;
    t->depth = depth + 1;
    cJSON *item = convert(t, lua_gettop(L), depth + 1);
    lua_pop(L, 1);
    if (!item) { lua_pop(L, 1); cJSON_Delete(obj); return NULL; }
    cJSON_AddItemToObject(obj, key, item);
  }
  t->depth = depth;
  return obj;
}

static cJSON *convert(to_json *t, int idx, int depth) {
  lua_State *L = t->L;
  if (depth > SG_LUA_JSON_MAX_DEPTH) return fail(t, "nested deeper than %s levels (a cycle?)", "128");
  luaL_checkstack(L, 4, "JSON conversion");
  switch (lua_type(L, idx)) {
  case LUA_TNIL: return cJSON_CreateNull();
  case LUA_TBOOLEAN: return cJSON_CreateBool(lua_toboolean(L, idx));
  case LUA_TSTRING: {
    size_t len;
    const char *s = lua_tolstring(L, idx, &len);
    if (strlen(s) != len) return fail(t, "%s", "string contains a NUL byte");
    return cJSON_CreateString(s);
  }
  case LUA_TNUMBER: {
    if (lua_isinteger(L, idx)) return cJSON_CreateNumber((double)lua_tointeger(L, idx));
    double d = lua_tonumber(L, idx);
    if (!isfinite(d)) return fail(t, "%s", "number is not finite (NaN or inf)");
    return cJSON_CreateNumber(d);
  }
  case LUA_TTABLE: return convert_table(t, idx, depth);
  case LUA_TLIGHTUSERDATA: {
    push_null(L);
    int is_null = lua_rawequal(L, -1, idx);
    lua_pop(L, 1);
    if (is_null) return cJSON_CreateNull();
  } /* fall through */
  default: return fail(t, "cannot encode a %s as JSON", luaL_typename(L, idx));
  }
}

cJSON *sg__lua_to_json(lua_State *L, int idx, char *err, size_t errlen) {
  to_json t = {L, err, errlen, 0, {{0}}};
  int top = lua_gettop(L);
  idx = lua_absindex(L, idx);
  cJSON *v = convert(&t, idx, 0);
  lua_settop(L, top);
  return v;
}

/* ---- the module ------------------------------------------------------------ */

static int l_encode(lua_State *L) {
  luaL_checkany(L, 1);
  char err[512];
  cJSON *v = sg__lua_to_json(L, 1, err, sizeof err);
  if (!v) {
    luaL_pushfail(L);
    lua_pushstring(L, err);
    return 2;
  }
  char *s = cJSON_PrintUnformatted(v);
  cJSON_Delete(v);
  if (!s) return luaL_error(L, "out of memory");
  lua_pushstring(L, s);
  cJSON_free(s);
  return 1;
}

static int l_decode(lua_State *L) {
  size_t len;
  const char *s = luaL_checklstring(L, 1, &len);
  const char *end = NULL;
  cJSON *v = cJSON_ParseWithLengthOpts(s, len, &end, 0);
  if (v) {
    /* Only whitespace may follow the value. */
    while (end && end < s + len && strchr(" \t\r\n", *end)) end++;
    if (end != s + len) {
      cJSON_Delete(v);
      v = NULL;
    }
  }
  if (!v) {
    size_t off = end && end >= s ? (size_t)(end - s) : 0;
    luaL_pushfail(L);
    lua_pushfstring(L, "invalid JSON at byte offset %d", (int)off);
    return 2;
  }
  char err[128];
  int rc = sg__lua_push_json(L, v, err, sizeof err);
  cJSON_Delete(v);
  if (rc != 0) {
    luaL_pushfail(L);
    lua_pushstring(L, err);
    return 2;
  }
  return 1;
}

static int l_object(lua_State *L) {
  if (lua_isnoneornil(L, 1)) lua_newtable(L);
  luaL_checktype(L, 1, LUA_TTABLE);
  lua_settop(L, 1);
  lua_rawgetp(L, LUA_REGISTRYINDEX, &object_mt_key);
  lua_setmetatable(L, 1);
  return 1;
}

int luaopen_segue_json(lua_State *L) {
  static const luaL_Reg fns[] = {
      {"encode", l_encode}, {"decode", l_decode}, {"object", l_object}, {NULL, NULL}};
  lua_pushlightuserdata(L, (void *)&null_key);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &null_key);
  lua_newtable(L);
  lua_pushliteral(L, "object");
  lua_setfield(L, -2, "__name");
  lua_rawsetp(L, LUA_REGISTRYINDEX, &object_mt_key);
  luaL_newlib(L, fns);
  push_null(L);
  lua_setfield(L, -2, "null");
  return 1;
}
