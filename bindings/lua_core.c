/* segue.core: the host's runtime for the Lua half (the scripts under
 * scripts/segue). Translation only: argument checks, tables <-> JSON trees,
 * callbacks into Lua. What to do with a backend or an update is decided in
 * Lua. This file: logging, events, embedded scripts; see core.h. */
#include <lauxlib.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <ctype.h>
#include <string.h>

#include "core.h"
#include "embedded_scripts.h"
#include "flubber_codec.h"

/* ---- logging, events ------------------------------------------------------ */

/* log(level, msg [, key, value]...): fields are rendered before msg. */
static int l_log(lua_State *L) {
  static const char *const levels[] = {"error", "warn", "info", "debug", NULL};
  int lvl = luaL_checkoption(L, 1, NULL, levels);
  const char *msg = luaL_checkstring(L, 2);
  sg__lenv *h = sg__lenv_check(L);
  if (!sg__log_enabled(&h->log, (sg_log_level)lvl)) return 0;
  const char *kv[33];
  int n = 0;
  for (int i = 3; i + 1 <= lua_gettop(L) && n < 32; i += 2) {
    kv[n++] = luaL_checkstring(L, i);
    kv[n++] = luaL_checkstring(L, i + 1);
  }
  kv[n] = NULL;
  sg__log_fields(&h->log, (sg_log_level)lvl, kv, msg);
  return 0;
}

static int l_log_level(lua_State *L) {
  sg__lenv *h = sg__lenv_check(L);
  if (!lua_isnoneornil(L, 1)) {
    int lvl = sg__log_level_parse(luaL_checkstring(L, 1));
    luaL_argcheck(L, lvl >= 0, 1, "expected error, warn, info or debug");
    h->log.level = lvl;
  }
  lua_pushstring(L, sg__log_level_name(h->log.level));
  return 1;
}

/* report(message): an error no Lua caller can receive (one escaping a
 * coroutine, a handler or a timer callback) goes to the embedder's
 * error_cb as SG_ELUA, and to the log. */
static int l_report(lua_State *L) {
  sg__lenv_report(sg__lenv_check(L), SG_ELUA, luaL_checkstring(L, 1));
  return 0;
}

static int l_set_handler(lua_State *L) {
  sg__lenv *h = sg__lenv_check(L);
  luaL_checktype(L, 1, LUA_TFUNCTION);
  lua_settop(L, 1);
  luaL_unref(L, LUA_REGISTRYINDEX, h->handler_ref);
  h->handler_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  return 0;
}

static const sg__embedded_script *find_embedded(int kind, const char *name) {
  for (const sg__embedded_script *s = sg__embedded_scripts; s->name; s++)
    if (s->kind == kind && strcmp(s->name, name) == 0) return s;
  return NULL;
}

/* builtin_backend(name) -> source, path | nil */
static int l_builtin_backend(lua_State *L) {
  const sg__embedded_script *s = find_embedded(SG_EMBED_backend, luaL_checkstring(L, 1));
  if (!s) return 0;
  lua_pushlstring(L, s->source, s->length);
  lua_pushstring(L, s->path);
  return 2;
}

/* embedded_source(module) -> source | nil: for `segue config --default`. */
static int l_embedded_source(lua_State *L) {
  const sg__embedded_script *s = find_embedded(SG_EMBED_module, luaL_checkstring(L, 1));
  if (!s) return 0;
  lua_pushlstring(L, s->source, s->length);
  return 1;
}

/* web_file(name) -> content | nil: a file of the web client (web/). */
static int l_web_file(lua_State *L) {
  const sg__embedded_script *s = find_embedded(SG_EMBED_web, luaL_checkstring(L, 1));
  if (!s) return 0;
  lua_pushlstring(L, s->source, s->length);
  return 1;
}

static int l_expected_response(lua_State *L) {
  const char *r = sg__fl_expected_response(luaL_checkstring(L, 1));
  if (!r) return 0;
  lua_pushstring(L, r);
  return 1;
}

/* ---- the sandbox of rules and config ---------------------------------------
 * sandbox_enter(what, max_instructions, max_memory, max_string, max_subject):
 * until the matching sandbox_leave, Lua code may run max_instructions more
 * instructions ("<what> stopped after N instructions", raised again at every
 * later hook tick), the heap may grow by max_memory bytes (allocations past
 * it fail: "not enough memory"), string.rep results and pattern subjects are
 * bounded. Nested runs keep the tighter bounds. */
static size_t tighter(size_t current, size_t wanted) {
  return current && current < wanted ? current : wanted;
}

/* Works while the host closes too (a closing handler may run rules). */
static sg__lenv *sandbox_env(lua_State *L) {
  sg__lenv *e = sg__lenv_of(L);
  if (!e) luaL_error(L, "this needs the segue host (run under `segue`)");
  return e;
}

static int l_sandbox_enter(lua_State *L) {
  sg__lenv *e = sandbox_env(L);
  const char *what = luaL_checkstring(L, 1);
  lua_Integer instr = luaL_checkinteger(L, 2), mem = luaL_checkinteger(L, 3),
              str = luaL_checkinteger(L, 4), subj = luaL_checkinteger(L, 5);
  luaL_argcheck(L, instr > 0 && mem > 0 && str > 0 && subj > 0, 2, "bounds must be positive");
  int max = (int)(sizeof e->sandbox_saved / sizeof *e->sandbox_saved);
  if (e->sandbox_depth >= max) return luaL_error(L, "sandboxes nested deeper than %d", max);
  if (e->tripped[0] && e->tripped[0] != '?') return luaL_error(L, "%s", e->tripped);
  struct sg__sandbox_frame *f = &e->sandbox_saved[e->sandbox_depth++];
  f->mem_limit = e->mem_limit;
  f->max_string = e->max_string;
  f->max_subject = e->max_subject;
  f->instr_count = e->instr_count;
  f->instr_limit = e->instr_limit;
  f->mem_exceeded = e->mem_exceeded;
  memcpy(f->tripped, e->tripped, sizeof f->tripped);
  e->mem_limit = tighter(e->mem_limit, e->mem_used + (size_t)mem);
  e->max_string = tighter(e->max_string, (size_t)str);
  e->max_subject = tighter(e->max_subject, (size_t)subj);
  e->instr_count = 0;
  e->instr_limit = (uint64_t)instr;
  /* "?what": not tripped yet; the hook writes the message when it trips */
  snprintf(e->tripped, sizeof e->tripped, "?%s", what);
  e->mem_exceeded = 0;
  sg__lenv_sync_hook(L);
  return 0;
}

/* sandbox_leave() -> the limit's message or false, whether the memory bound
 * was hit: what happened since the matching enter */
static int l_sandbox_leave(lua_State *L) {
  sg__lenv *e = sandbox_env(L);
  int exceeded = e->mem_exceeded;
  if (e->tripped[0] && e->tripped[0] != '?') lua_pushstring(L, e->tripped);
  else lua_pushboolean(L, 0);
  if (e->sandbox_depth > 0) {
    const struct sg__sandbox_frame *f = &e->sandbox_saved[--e->sandbox_depth];
    e->mem_limit = f->mem_limit;
    e->max_string = f->max_string;
    e->max_subject = f->max_subject;
    e->instr_count = f->instr_count + e->instr_count;  /* the outer run goes on counting */
    e->instr_limit = f->instr_limit;
    e->mem_exceeded = f->mem_exceeded || exceeded;
    memcpy(e->tripped, f->tripped, sizeof e->tripped);
  }
  sg__lenv_sync_hook(L);
  lua_pushboolean(L, exceeded);
  return 2;
}

/* sandbox_state() -> limit message or false, memory bound hit, signal
 * number or false: what a sandboxed pcall must not swallow. */
static int l_sandbox_state(lua_State *L) {
  sg__lenv *e = sandbox_env(L);
  if (e->tripped[0] && e->tripped[0] != '?') lua_pushstring(L, e->tripped);
  else lua_pushboolean(L, 0);
  lua_pushboolean(L, e->mem_exceeded);
  if (e->interrupted) lua_pushinteger(L, e->interrupted);
  else lua_pushboolean(L, 0);
  return 3;
}

/* ---- rules: bridge{...} ------------------------------------------------------
 * rule_bridge(t, default_format, level, kept, token) -> bridge | nil: the bridge
 * record rules.lua's bridge{...} makes from t, built here because a rules
 * file of a thousand bridges runs it a thousand times per reload. It
 * answers only for a valid plain table (no metatables): anything else
 * returns nil and rules.lua's Lua version raises the exact error.
 *
 * The record: { kind = "bridge", where = "src:line", endpoints = {
 * {backend=, room=, mode=, format=, key=}... }, options..., sig =, hash = }.
 * sig identifies the definition (every option and endpoint, in order) and
 * hash is a 64-bit hash of it; neither when the bridge has a filter or
 * rewrite (functions cannot be compared) or a definition over 2 KiB.
 * `kept` (a table or nil) maps hash -> a record of the running rules: a
 * bridge whose sig equals one there is that record (its `where` updated to
 * this line), once per load: its field `taken` is set to `token` (a
 * value of this load only); nothing new is made for it, and what the
 * router keyed on it stays valid. `where` names
 * the function `level` calls up (1: the caller of the bridge function that
 * rule_bridge_maker made). */
enum { BK_STRING, BK_FUNCTION, BK_NUMBER };
static const char *const fallbacks[] = {"drop", "pass", NULL};
static const char *const edits[] = {"resend", "ignore", NULL};
static const char *const deletes[] = {"ignore", "notice", NULL};
static const char *const longs[] = {"split", "cut", NULL};
static const char *const modes[] = {"both", "in", "out", NULL};
static const struct bridge_key {
  const char *name;
  int type;
  const char *const *choices;
  const char *dflt;  /* set when absent (format: the default format) */
} bridge_keys[] = {
    {"name", BK_STRING, NULL, NULL},
    {"format", BK_STRING, NULL, NULL},
    {"filter", BK_FUNCTION, NULL, NULL},
    {"rewrite", BK_FUNCTION, NULL, NULL},
    {"fallback", BK_STRING, fallbacks, "drop"},
    {"edits", BK_STRING, edits, "resend"},
    {"deletes", BK_STRING, deletes, "ignore"},
    {"max_attachment_bytes", BK_NUMBER, NULL, NULL},
    {"long", BK_STRING, longs, NULL},
};
#define N_BRIDGE_KEYS ((int)(sizeof bridge_keys / sizeof *bridge_keys))
#define FORMAT_KEY 1

/* The strings bridge{...} reads and writes, upvalues of the bridge function
 * from BRIDGE_UP on (pushing one is no lookup in Lua's string table; a
 * thousand bridges set 20 thousand fields). BS_OPTION + i: bridge_keys[i]'s
 * name; BS_DFLT + i: its default (nil if none). */
enum {
  BS_KIND, BS_WHERE, BS_ENDPOINTS, BS_SIG, BS_HASH, BS_TAKEN, BS_KEY, BS_BACKEND, BS_ROOM,
  BS_MODE, BS_FORMAT, BS_BRIDGE, BS_BOTH, BS_OPTION, BS_DFLT = BS_OPTION + N_BRIDGE_KEYS,
  BS_COUNT = BS_DFLT + N_BRIDGE_KEYS
};
static const char *const bridge_strings[BS_OPTION] = {
    "kind", "where", "endpoints", "sig", "hash", "taken", "key", "backend", "room", "mode", "format",
    "bridge", "both"};
#define BRIDGE_UP 5 /* after default_format, kept, token, fallback */
#define BSTR(L, k) lua_pushvalue((L), lua_upvalueindex(BRIDGE_UP + (k)))

/* Whether the Lua string at idx is one of choices (its whole length: an
 * embedded NUL makes it none). */
static int one_of(lua_State *L, int idx, const char *const *choices) {
  size_t len;
  const char *s = lua_tolstring(L, idx, &len);
  for (; *choices; choices++)
    if (strlen(*choices) == len && memcmp(s, *choices, len) == 0) return 1;
  return 0;
}

/* Lua's %w (C locale), _, - and . */
static int backend_char(unsigned char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' ||
         c == '-' || c == '.';
}

/* The length of the backend of "backend:room", or 0 when s is not that. */
static size_t endpoint_split(const char *s, size_t len) {
  size_t i = 0;
  while (i < len && backend_char((unsigned char)s[i])) i++;
  if (i == 0 || i + 1 >= len || s[i] != ':') return 0;
  return i;
}

/* A bridge's signature, built in a fixed buffer: too long, it has none. */
typedef struct {
  char b[2048];
  size_t n;
  int over;
} sigbuf;

static void sig_bytes(sigbuf *g, const void *p, size_t len) {
  if (g->over || len > sizeof g->b - g->n) {
    g->over = 1;
    return;
  }
  memcpy(g->b + g->n, p, len);
  g->n += len;
}

static void sig_str(sigbuf *g, char tag, const char *s, size_t len) {
  uint32_t n = (uint32_t)len;
  sig_bytes(g, &tag, 1);
  sig_bytes(g, &n, sizeof n);
  sig_bytes(g, s, len);
}

/* Checks the endpoint value at the top and adds it to the signature: 1
 * when the fast path takes it. Pops it. */
static int endpoint_sig(lua_State *L, sigbuf *g) {
  int t = lua_type(L, -1), ok = 0;
  if (t == LUA_TSTRING) {
    size_t len;
    const char *s = lua_tolstring(L, -1, &len);
    ok = endpoint_split(s, len) != 0;
    sig_str(g, 'e', s, len);
  } else if (t == LUA_TTABLE && !lua_getmetatable(L, -1)) {
    if (lua_rawgeti(L, -1, 1) == LUA_TSTRING) {
      size_t len;
      const char *s = lua_tolstring(L, -1, &len);
      ok = endpoint_split(s, len) != 0;
      sig_str(g, 'e', s, len);
    }
    lua_pop(L, 1);
    if (ok) {
      BSTR(L, BS_MODE);
      int mt = lua_rawget(L, -2);  /* no metatable: raw */
      ok = mt == LUA_TNIL || (mt == LUA_TSTRING && one_of(L, -1, modes));
      if (ok && mt == LUA_TSTRING) sig_str(g, 'm', lua_tostring(L, -1), lua_rawlen(L, -1));
      lua_pop(L, 1);
    }
    if (ok) {
      BSTR(L, BS_FORMAT);
      int ft = lua_rawget(L, -2);
      ok = ft == LUA_TNIL || ft == LUA_TSTRING;
      if (ft == LUA_TSTRING) sig_str(g, 'f', lua_tostring(L, -1), lua_rawlen(L, -1));
      lua_pop(L, 1);
    }
    sig_bytes(g, "t", 1);
  } else if (t == LUA_TTABLE) {
    lua_pop(L, 1);  /* its metatable */
  }
  lua_pop(L, 1);
  return ok;
}

/* Replaces the (checked) endpoint value at the top by its record. */
static void endpoint_record(lua_State *L) {
  int spec = lua_gettop(L);
  int tbl = lua_type(L, spec) == LUA_TTABLE;
  if (tbl) lua_rawgeti(L, spec, 1);
  else lua_pushvalue(L, spec);
  int key = lua_gettop(L);
  size_t len;
  const char *s = lua_tolstring(L, key, &len);
  size_t blen = endpoint_split(s, len);
  lua_createtable(L, 0, 5);
  int rec = lua_gettop(L);
  BSTR(L, BS_KEY);
  lua_pushvalue(L, key);
  lua_rawset(L, rec);
  BSTR(L, BS_BACKEND);
  lua_pushlstring(L, s, blen);
  lua_rawset(L, rec);
  BSTR(L, BS_ROOM);
  lua_pushlstring(L, s + blen + 1, len - blen - 1);
  lua_rawset(L, rec);
  BSTR(L, BS_MODE);
  if (tbl) {
    BSTR(L, BS_MODE);
    if (lua_rawget(L, spec) != LUA_TSTRING) {
      lua_pop(L, 1);
      BSTR(L, BS_BOTH);
    }
  } else {
    BSTR(L, BS_BOTH);
  }
  lua_rawset(L, rec);
  if (tbl) {
    BSTR(L, BS_FORMAT);
    BSTR(L, BS_FORMAT);
    if (lua_rawget(L, spec) == LUA_TSTRING) lua_rawset(L, rec);
    else lua_pop(L, 2);
  }
  lua_replace(L, spec);
  lua_settop(L, spec);
}

/* FNV-1a's constants, 8 bytes a step (a collision costs only a compare) */
static uint64_t sig_hash(const char *p, size_t n) {
  uint64_t h = 14695981039346656037ULL ^ n, w;
  for (; n >= 8; p += 8, n -= 8) {
    memcpy(&w, p, 8);
    h = (h ^ w) * 1099511628211ULL;
    h ^= h >> 29;
  }
  w = 0;
  memcpy(&w, p, n);
  h = (h ^ w) * 1099511628211ULL;
  return h ^ (h >> 32);
}

/* "short_src:line" into buf (size LUA_IDSIZE + 24) */
static size_t format_where(char *buf, const lua_Debug *ar) {
  size_t n = strlen(ar->short_src);
  memcpy(buf, ar->short_src, n);
  buf[n++] = ':';
  char digits[24];
  int d = 0;
  unsigned long v = ar->currentline > 0 ? (unsigned long)ar->currentline : 0;
  do digits[d++] = (char)('0' + v % 10); while ((v /= 10) && d < (int)sizeof digits);
  if (ar->currentline < 0) buf[n++] = '-', digits[0] = '1', d = 1;
  while (d) buf[n++] = digits[--d];
  buf[n] = '\0';
  return n;
}

/* The stack: t, default_format, level, kept, token (checked by the maker). */
static int rule_bridge(lua_State *L) {
  int level = (int)lua_tointeger(L, 3);
  lua_settop(L, 5);
  if (lua_type(L, 1) != LUA_TTABLE || lua_getmetatable(L, 1)) return 0;
  sigbuf g;
  g.n = 0;
  g.over = 0;
  /* the endpoints: 1..n until the first nil, as ipairs */
  lua_Integer n = 0;
  for (;;) {
    if (lua_rawgeti(L, 1, n + 1) == LUA_TNIL) {
      lua_pop(L, 1);
      break;
    }
    if (!endpoint_sig(L, &g)) return 0;
    n++;
  }
  if (n < 2) return 0;
  /* the options: known, of their type, a known choice */
  int has_fn = 0, set = 0;
  lua_pushinteger(L, n);  /* after the endpoints (t[n] is one) */
  while (lua_next(L, 1)) {
    if (lua_isinteger(L, -2)) {
      lua_pop(L, 1);
      continue;
    }
    if (lua_type(L, -2) != LUA_TSTRING) return 0;
    size_t klen;
    const char *k = lua_tolstring(L, -2, &klen);
    int i = 0;
    while (i < N_BRIDGE_KEYS &&
           (strlen(bridge_keys[i].name) != klen || memcmp(k, bridge_keys[i].name, klen) != 0))
      i++;
    if (i == N_BRIDGE_KEYS) return 0;
    int vt = lua_type(L, -1);
    int ok = bridge_keys[i].type == BK_STRING     ? vt == LUA_TSTRING
             : bridge_keys[i].type == BK_FUNCTION ? vt == LUA_TFUNCTION
                                                   : vt == LUA_TNUMBER;
    if (ok && bridge_keys[i].choices) ok = one_of(L, -1, bridge_keys[i].choices);
    if (!ok) return 0;
    if (vt == LUA_TFUNCTION) has_fn = 1;
    set |= 1 << i;
    lua_pop(L, 1);
  }
  /* the options in a fixed order, for the signature */
  for (int i = 0; i < N_BRIDGE_KEYS && !has_fn; i++) {
    if (!(set & (1 << i))) {
      sig_bytes(&g, "-", 1);
      continue;
    }
    BSTR(L, BS_OPTION + i);
    if (lua_rawget(L, 1) == LUA_TSTRING) {
      size_t len;
      const char *s = lua_tolstring(L, -1, &len);
      sig_str(&g, 's', s, len);
    } else if (lua_isinteger(L, -1)) {
      lua_Integer v = lua_tointeger(L, -1);
      sig_bytes(&g, "i", 1);
      sig_bytes(&g, &v, sizeof v);
    } else {
      lua_Number v = lua_tonumber(L, -1);
      sig_bytes(&g, "n", 1);
      sig_bytes(&g, &v, sizeof v);
    }
    lua_pop(L, 1);
  }
  if (!(set & (1 << FORMAT_KEY))) {  /* the default format is part of the definition */
    size_t len;
    const char *s = lua_tolstring(L, 2, &len);
    sig_str(&g, 'd', s, len);
  }
  int has_sig = !has_fn && !g.over;
  lua_Integer hash = has_sig ? (lua_Integer)sig_hash(g.b, g.n) : 0;
  char where[LUA_IDSIZE + 24];
  size_t wlen = 5;
  memcpy(where, "rules", 6);
  lua_Debug ar;
  if (lua_getstack(L, level, &ar) && lua_getinfo(L, "Sl", &ar)) wlen = format_where(where, &ar);
  /* a bridge of the running rules with this very definition, not taken yet */
  if (has_sig && lua_istable(L, 4) && !lua_isnil(L, 5) && lua_rawgeti(L, 4, hash) == LUA_TTABLE) {
    size_t olen;
    BSTR(L, BS_SIG);
    lua_rawget(L, 6);
    const char *osig = lua_type(L, -1) == LUA_TSTRING ? lua_tolstring(L, -1, &olen) : NULL;
    int same = osig && olen == g.n && memcmp(osig, g.b, g.n) == 0;
    lua_pop(L, 1);
    BSTR(L, BS_TAKEN);
    lua_rawget(L, 6);
    if (same && !lua_rawequal(L, -1, 5)) {
      lua_pop(L, 1);
      BSTR(L, BS_TAKEN);
      lua_pushvalue(L, 5);
      lua_rawset(L, 6);
      BSTR(L, BS_WHERE);
      lua_rawget(L, 6);
      size_t owlen;
      const char *ow = lua_type(L, -1) == LUA_TSTRING ? lua_tolstring(L, -1, &owlen) : NULL;
      int moved = !ow || owlen != wlen || memcmp(ow, where, wlen) != 0;
      lua_pop(L, 1);
      if (moved) {
        BSTR(L, BS_WHERE);
        lua_pushlstring(L, where, wlen);
        lua_rawset(L, 6);
      }
      return 1;
    }
  }
  lua_settop(L, 5);
  /* a new record */
  lua_createtable(L, 0, 13);  /* 6: the bridge */
  BSTR(L, BS_KIND);
  BSTR(L, BS_BRIDGE);
  lua_rawset(L, 6);
  BSTR(L, BS_WHERE);
  lua_pushlstring(L, where, wlen);
  lua_rawset(L, 6);
  BSTR(L, BS_ENDPOINTS);
  lua_createtable(L, (int)n, 0);
  for (lua_Integer i = 1; i <= n; i++) {
    lua_rawgeti(L, 1, i);
    endpoint_record(L);
    lua_rawseti(L, -2, i);
  }
  lua_rawset(L, 6);
  for (int i = 0; i < N_BRIDGE_KEYS; i++) {
    const struct bridge_key *k = &bridge_keys[i];
    BSTR(L, BS_OPTION + i);
    if (set & (1 << i)) {
      BSTR(L, BS_OPTION + i);
      lua_rawget(L, 1);
    } else if (k->dflt) {
      BSTR(L, BS_DFLT + i);
    } else if (i == FORMAT_KEY) {
      lua_pushvalue(L, 2);
    } else {
      lua_pop(L, 1);
      continue;
    }
    lua_rawset(L, 6);
  }
  if (has_sig) {
    BSTR(L, BS_SIG);
    lua_pushlstring(L, g.b, g.n);
    lua_rawset(L, 6);
    BSTR(L, BS_HASH);
    lua_pushinteger(L, hash);
    lua_rawset(L, 6);
  }
  return 1;
}

/* bridge(t): rule_bridge's record, or what the fallback returns for t. */
static int l_bridge(lua_State *L) {
  lua_settop(L, 1);
  luaL_checkstack(L, 24, "bridge");  /* rule_bridge's slots */
  lua_pushvalue(L, lua_upvalueindex(1));  /* default_format */
  lua_pushinteger(L, 1);                  /* `where`: bridge's caller */
  lua_pushvalue(L, lua_upvalueindex(2));  /* kept */
  lua_pushvalue(L, lua_upvalueindex(3));  /* token */
  if (rule_bridge(L)) return 1;
  lua_pushvalue(L, lua_upvalueindex(4));
  lua_pushvalue(L, 1);
  lua_pushinteger(L, 3);  /* fallback(t, 3): 3 is bridge's caller seen from the fallback */
  if (lua_pcall(L, 2, 1, 0) != LUA_OK) return lua_error(L);  /* its error is the caller's */
  return 1;
}

/* rule_bridge_maker(default_format, kept, token, fallback) -> bridge: the
 * bridge{...} of one load, in C (no Lua frame per bridge: a rules file
 * runs it a thousand times, inside the sandbox's count hook). */
static int l_rule_bridge_maker(lua_State *L) {
  luaL_checkstring(L, 1);
  if (!lua_isnoneornil(L, 2)) luaL_checktype(L, 2, LUA_TTABLE);
  luaL_checkany(L, 3);
  luaL_checktype(L, 4, LUA_TFUNCTION);
  lua_settop(L, 4);
  luaL_checkstack(L, BS_COUNT, "bridge strings");
  for (int i = 0; i < BS_OPTION; i++) lua_pushstring(L, bridge_strings[i]);
  for (int i = 0; i < N_BRIDGE_KEYS; i++) lua_pushstring(L, bridge_keys[i].name);
  for (int i = 0; i < N_BRIDGE_KEYS; i++) {
    if (bridge_keys[i].dflt) lua_pushstring(L, bridge_keys[i].dflt);
    else lua_pushnil(L);
  }
  lua_pushcclosure(L, l_bridge, 4 + BS_COUNT);
  return 1;
}

/* rule_data_only(text) -> true when text is a rules file that is data
 * only: `return {`, then lines `bridge { item, ... }` (a trailing comma
 * allowed) where an item is a "string" or `key = "string" | digits | true
 * | false`, then `}`; blank lines and `--` comments anywhere; no backslash,
 * quote, bracket or parenthesis anywhere (no escapes, long strings,
 * calls). Each such line makes the same bridge whatever the rest of the
 * file does: a reload may run only the lines that changed (rules.lua). */
static const char *ws(const char *p, const char *e) {
  while (p < e && (*p == ' ' || *p == '\t' || *p == '\r')) p++;
  return p;
}

/* Nothing left from p to e but a `--` comment, or nothing. */
static int rest_blank(const char *p, const char *e) {
  return p == e || (e - p >= 2 && p[0] == '-' && p[1] == '-');
}

static int word(const char *p, const char *e, const char *w) {
  size_t n = strlen(w);
  return (size_t)(e - p) >= n && memcmp(p, w, n) == 0
         && (p + n == e || !(isalnum((unsigned char)p[n]) || p[n] == '_'));
}

/* One `bridge { ... }` line from p (after its indent) to e: 1 if well made. */
static int data_line(const char *p, const char *e) {
  if (!word(p, e, "bridge")) return 0;
  p = ws(p + 6, e);
  if (p == e || *p++ != '{') return 0;
  for (int items = 0;; items++) {
    p = ws(p, e);
    if (p < e && *p == '}') break;
    if (items && (p == e || *p++ != ',' || (p = ws(p, e)) == e)) return 0;
    if (*p == '}') break;  /* a trailing comma */
    if (isalpha((unsigned char)*p) || *p == '_') {  /* key = value */
      while (p < e && (isalnum((unsigned char)*p) || *p == '_')) p++;
      p = ws(p, e);
      if (p == e || *p++ != '=') return 0;
      p = ws(p, e);
      if (p == e) return 0;
      if (isdigit((unsigned char)*p)) {
        while (p < e && isdigit((unsigned char)*p)) p++;
        continue;
      }
      if (word(p, e, "true") || word(p, e, "false")) {
        p += *p == 't' ? 4 : 5;
        continue;
      }
    }
    if (p == e || *p++ != '"') return 0;
    while (p < e && *p != '"') p++;
    if (p++ == e) return 0;
  }
  p = ws(p + 1, e);
  if (p < e && *p == ',') p = ws(p + 1, e);
  return rest_blank(p, e);
}

static int l_rule_data_only(lua_State *L) {
  size_t len;
  const char *s = luaL_checklstring(L, 1, &len), *end = s + len;
  enum { BEFORE, IN, AFTER } state = BEFORE;
  int bridges = 0, ok = 1;
  for (const char *p = s; p < end && ok; p++)
    if (*p == '\\' || *p == '\'' || *p == '[' || *p == '(') ok = 0;
  for (const char *line = s; line < end && ok;) {
    const char *e = memchr(line, '\n', (size_t)(end - line));
    if (!e) e = end;
    const char *p = ws(line, e);
    if (rest_blank(p, e)) {
    } else if (state == BEFORE && word(p, e, "return")) {
      p = ws(p + 6, e);
      if (p == e || *p != '{') ok = 0;
      p = ws(p + 1, e);
      if (!rest_blank(p, e)) ok = 0;
      state = IN;
    } else if (state == IN && *p == '}') {
      p = ws(p + 1, e);
      if (!rest_blank(p, e)) ok = 0;
      state = AFTER;
    } else if (state == IN && data_line(p, e)) {
      bridges++;
    } else {
      ok = 0;
    }
    line = e + 1;
  }
  lua_pushboolean(L, ok && state == AFTER && bridges > 0);
  return 1;
}

/* rule_validate(set, file, token, backends, errors [, prev]) -> reused
 * [, by_hash]: the
 * checks rules.lua's validate makes of the bridges set[1..] (until the
 * first nil, as ipairs), in C because a rules file of a thousand bridges
 * runs them a thousand times per reload. Each entry is a bridge{...}
 * record; an unnamed one is named "bridge<i>" by its position (default_name
 * set), and one of the running rules handed out again (its `taken` is
 * token) that was named so at another position is replaced by a copy
 * named for this one; names are unique; with backends, every endpoint's
 * backend is one of them. Messages are appended to errors, in order.
 * reused: how many entries are bridges of the previous load.
 *
 * prev: the running rules, checked against the same backends. When set has
 * as many entries and each holds prev's object at its place or a bridge,
 * only those others are checked (prev's objects passed already), and the
 * names of at most 4 of them that are not prev's name there are compared
 * with all others (prev's names are unique). Else (more than 16 + n/16
 * others, or any error) all
 * entries are checked, as without prev, and by_hash (hash -> bridge of the
 * bridges that have one) is made on the way.
 * Fields are read as Lua reads them (metamethods included). */
enum { V_SET = 1, V_FILE, V_TOKEN, V_BACKENDS, V_ERRORS, V_PREV, V_NAMES, V_KEYS };
static const char *const validate_keys[] = {"kind", "name", "taken", "default_name",
                                            "where", "endpoints", "backend", "key", "hash"};
enum { K_KIND, K_NAME, K_TAKEN, K_DEFAULT_NAME, K_WHERE, K_ENDPOINTS, K_BACKEND, K_KEY, K_HASH };

/* pushes t[key] (t at index t, key one of validate_keys) */
static int vget(lua_State *L, int t, int key) {
  lua_pushvalue(L, V_KEYS + key);
  return lua_gettable(L, t < 0 ? t - 1 : t);
}

static void verror(lua_State *L, int parts) {
  lua_concat(L, parts);
  lua_rawseti(L, V_ERRORS, (lua_Integer)lua_rawlen(L, V_ERRORS) + 1);
}

/* "bridge<i>" into buf (32 bytes) -> its length */
static int default_name(char *buf, lua_Integer i) {
  char digits[24];
  int d = 0, n = 0;
  unsigned long long v = (unsigned long long)i;
  do digits[d++] = (char)('0' + v % 10); while ((v /= 10) && d < (int)sizeof digits);
  memcpy(buf, "bridge", 6);
  n = 6;
  while (d) buf[n++] = digits[--d];
  buf[n] = '\0';
  return n;
}

/* Checks set[i] (at index b): 0 when it is not a bridge, else 1 and the
 * final entry at b and its name pushed (2 when that name is not prev[i]'s,
 * with prev given). names: check unique names against V_NAMES. */
static int check_entry(lua_State *L, lua_Integer i, int b, int names, int check_backends) {
  int is_bridge = 0;
  if (lua_type(L, b) == LUA_TTABLE) {
    vget(L, b, K_KIND);
    size_t len;
    const char *kind = lua_type(L, -1) == LUA_TSTRING ? lua_tolstring(L, -1, &len) : NULL;
    is_bridge = kind && len == 6 && memcmp(kind, "bridge", 6) == 0;
    lua_pop(L, 1);
  }
  if (!is_bridge) {
    lua_pushfstring(L, "%s:1: entry %I is not a bridge{...}", lua_tostring(L, V_FILE), i);
    verror(L, 1);
    return 0;
  }
  char dflt[32];
  vget(L, b, K_TAKEN);
  int taken = lua_rawequal(L, -1, V_TOKEN);
  lua_pop(L, 1);
  vget(L, b, K_NAME);  /* b + 1: the name */
  if (lua_isnil(L, -1)) {
    lua_pop(L, 1);
    lua_pushlstring(L, dflt, (size_t)default_name(dflt, i));
    lua_pushvalue(L, V_KEYS + K_NAME);
    lua_pushvalue(L, -2);
    lua_settable(L, b);
    lua_pushvalue(L, V_KEYS + K_DEFAULT_NAME);
    lua_pushboolean(L, 1);
    lua_settable(L, b);
  } else if (taken) {
    vget(L, b, K_DEFAULT_NAME);
    int dflt_named = lua_toboolean(L, -1);
    lua_pop(L, 1);
    size_t len;
    const char *name = lua_type(L, -1) == LUA_TSTRING ? lua_tolstring(L, -1, &len) : NULL;
    int dlen = dflt_named ? default_name(dflt, i) : 0;
    if (dflt_named && !(name && len == (size_t)dlen && memcmp(name, dflt, len) == 0)) {
      /* a copy named for this position */
      lua_pop(L, 1);
      lua_newtable(L);
      lua_pushnil(L);
      while (lua_next(L, b)) {
        lua_pushvalue(L, -2);
        lua_insert(L, -2);
        lua_rawset(L, -4);
      }
      lua_replace(L, b);
      lua_pushlstring(L, dflt, (size_t)dlen);
      lua_pushvalue(L, V_KEYS + K_NAME);
      lua_pushvalue(L, -2);
      lua_rawset(L, b);
      lua_pushvalue(L, b);
      lua_seti(L, V_SET, i);
    }
  }
  int name = b + 1, other = 0;
  if (names) {
    lua_pushvalue(L, name);
    if (lua_rawget(L, V_NAMES) != LUA_TNIL) {
      lua_pop(L, 1);
      vget(L, b, K_WHERE);
      lua_pushliteral(L, ": duplicate bridge name ");
      lua_pushvalue(L, name);
      verror(L, 3);
    } else {
      lua_pop(L, 1);
    }
    lua_pushvalue(L, name);
    lua_pushboolean(L, 1);
    lua_rawset(L, V_NAMES);
  } else {
    lua_geti(L, V_PREV, i);
    other = lua_type(L, -1) != LUA_TTABLE || vget(L, -1, K_NAME) == LUA_TNIL ||
            !lua_rawequal(L, -1, name);
    lua_settop(L, name);
  }
  if (check_backends) {
    vget(L, b, K_ENDPOINTS);
    int eps = lua_gettop(L);
    lua_Integer m = luaL_len(L, eps);
    for (lua_Integer j = 1; j <= m; j++) {
      lua_geti(L, eps, j);
      vget(L, -1, K_BACKEND);
      lua_pushvalue(L, -1);
      if (lua_gettable(L, V_BACKENDS) == LUA_TNIL || !lua_toboolean(L, -1)) {
        lua_pop(L, 1);
        int backend = lua_gettop(L);
        vget(L, b, K_WHERE);
        lua_pushliteral(L, ": endpoint ");
        vget(L, backend - 1, K_KEY);
        lua_pushliteral(L, ": no backend named ");
        lua_pushvalue(L, backend);
        verror(L, 5);
      }
      lua_settop(L, eps);
    }
    lua_settop(L, name);
  }
  return other ? 2 : 1;
}

static int l_rule_validate(lua_State *L) {
  luaL_checktype(L, V_SET, LUA_TTABLE);
  luaL_checkstring(L, V_FILE);
  luaL_checkany(L, V_TOKEN);
  luaL_checktype(L, V_ERRORS, LUA_TTABLE);
  int check_backends = lua_istable(L, V_BACKENDS);
  lua_settop(L, V_PREV);
  luaL_checkstack(L, 48, "rule_validate");
  lua_Integer n = luaL_len(L, V_SET);
  lua_createtable(L, 0, n > 0 && n < (1 << 20) ? (int)n : 0);  /* V_NAMES */
  for (size_t k = 0; k < sizeof validate_keys / sizeof *validate_keys; k++)
    lua_pushstring(L, validate_keys[k]);
  lua_Integer reused = 0, nerr = (lua_Integer)lua_rawlen(L, V_ERRORS);
  int base = lua_gettop(L);
  /* in place of prev: only what is not prev's object there; a few new
   * names are looked for among all the others */
  if (lua_istable(L, V_PREV) && luaL_len(L, V_PREV) == n) {
    lua_Integer renamed[4], others = 0;
    int nrenamed = 0, full = 0;
    for (lua_Integer i = 1; i <= n && !full; i++) {
      if (lua_geti(L, V_SET, i) == LUA_TNIL) {
        full = 1;
        break;
      }
      lua_geti(L, V_PREV, i);
      if (lua_rawequal(L, -1, -2)) {
        reused++;
      } else if (++others > 16 + n / 16) {
        full = 1;  /* mostly new: all of them, making by_hash */
      } else {
        lua_pop(L, 1);
        int r = check_entry(L, i, base + 1, 0, check_backends);
        if (r == 0 || (r == 2 && nrenamed == (int)(sizeof renamed / sizeof *renamed))) {
          full = 1;
        } else {
          if (r == 2) renamed[nrenamed++] = i;
          vget(L, base + 1, K_TAKEN);
          if (lua_rawequal(L, -1, V_TOKEN)) reused++;
        }
      }
      lua_settop(L, base);
    }
    for (lua_Integer j = 1; j <= n && nrenamed && !full; j++) {
      lua_geti(L, V_SET, j);
      vget(L, -1, K_NAME);
      for (int k = 0; k < nrenamed && !full; k++) {
        if (renamed[k] == j) continue;
        lua_geti(L, V_SET, renamed[k]);
        vget(L, -1, K_NAME);
        full = lua_rawequal(L, -1, base + 2);
        lua_pop(L, 2);
      }
      lua_settop(L, base);
    }
    if (!full) {
      lua_pushinteger(L, reused);
      return 1;
    }
    /* all of them, from the start (what was done stays done: names given) */
    for (lua_Integer k = (lua_Integer)lua_rawlen(L, V_ERRORS); k > nerr; k--) {
      lua_pushnil(L);
      lua_rawseti(L, V_ERRORS, k);
    }
    reused = 0;
  }
  lua_createtable(L, 0, n > 0 && n < (1 << 20) ? (int)n : 0);  /* by_hash */
  int by_hash = ++base;
  for (lua_Integer i = 1; i <= n; i++) {
    if (lua_geti(L, V_SET, i) == LUA_TNIL) break;
    if (check_entry(L, i, base + 1, 1, check_backends)) {
      vget(L, base + 1, K_TAKEN);
      if (lua_rawequal(L, -1, V_TOKEN)) reused++;
      if (vget(L, base + 1, K_HASH) != LUA_TNIL) {
        lua_pushvalue(L, base + 1);
        lua_rawset(L, by_hash);
      }
    }
    lua_settop(L, base);
  }
  lua_pushinteger(L, reused);
  lua_pushvalue(L, by_hash);
  return 2;
}

/* memory() -> bytes of Lua heap in use (as the host's allocator counts) */
static int l_memory(lua_State *L) {
  lua_pushinteger(L, (lua_Integer)sandbox_env(L)->mem_used);
  return 1;
}

int luaopen_segue_core(lua_State *L) {
  static const luaL_Reg fns[] = {
      {"log", l_log},
      {"log_level", l_log_level},
      {"set_handler", l_set_handler},
      {"report", l_report},
      {"builtin_backend", l_builtin_backend},
      {"embedded_source", l_embedded_source},
      {"web_file", l_web_file},
      {"expected_response", l_expected_response},
      {"sandbox_enter", l_sandbox_enter},
      {"sandbox_leave", l_sandbox_leave},
      {"sandbox_state", l_sandbox_state},
      {"memory", l_memory},
      {"rule_bridge_maker", l_rule_bridge_maker},
      {"rule_validate", l_rule_validate},
      {"rule_data_only", l_rule_data_only},
      {NULL, NULL}};
  luaL_newlib(L, fns);
  sg__core_open_backends(L);
  sg__core_open_stdio(L);
  sg__core_open_route(L);
  lua_pushstring(L, sg_version_string());
  lua_setfield(L, -2, "version");
  return 1;
}
