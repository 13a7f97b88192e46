/* segue.core: the host's runtime for the Lua half (the scripts under scripts/segue).
 * Translation only: argument checks, tables <-> JSON trees, callbacks into
 * Lua. What to do with a backend or an update is decided in Lua. */
#include <lauxlib.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bindings.h"
#include "child.h"
#include "embedded_scripts.h"
#include "host.h"
#include "lua_json.h"
#include "stdio_channel.h"

static sg_host *host_of(lua_State *L) {
  sg_host *h = sg__host_from_lua(L);
  if (!h) luaL_error(L, "segue.core needs the segue host (run under `segue`)");
  return h;
}

/* World failures: nil, "ENAME: message", "ENAME" (luv's convention). */
static int push_fail(lua_State *L, int err, const char *msg) {
  luaL_pushfail(L);
  lua_pushfstring(L, "%s: %s", sg_err_name(err), msg ? msg : sg_strerror(err));
  lua_pushstring(L, sg_err_name(err));
  return 3;
}

static sg_host_backend *check_backend(lua_State *L, int idx) {
  const char *name = luaL_checkstring(L, idx);
  sg_host_backend *hb = sg__host_find_backend(host_of(L), name);
  if (!hb) luaL_error(L, "no backend named '%s'", name);
  return hb;
}

/* ---- logging, events ------------------------------------------------------ */

/* log(level, msg [, key, value]...): fields are rendered before msg. */
static int l_log(lua_State *L) {
  static const char *const levels[] = {"error", "warn", "info", "debug", NULL};
  int lvl = luaL_checkoption(L, 1, NULL, levels);
  const char *msg = luaL_checkstring(L, 2);
  sg_host *h = host_of(L);
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
  sg_host *h = host_of(L);
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
  sg__host_report(host_of(L), SG_ELUA, luaL_checkstring(L, 1));
  return 0;
}

static int l_set_handler(lua_State *L) {
  sg_host *h = host_of(L);
  luaL_checktype(L, 1, LUA_TFUNCTION);
  lua_settop(L, 1);
  luaL_unref(L, LUA_REGISTRYINDEX, h->handler_ref);
  h->handler_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  return 0;
}

/* ---- backend configuration ------------------------------------------------ */

static uint64_t opt_ms(lua_State *L, int idx, const char *key, uint64_t dflt) {
  if (!lua_istable(L, idx)) return dflt;
  lua_getfield(L, idx, key);
  uint64_t v = dflt;
  if (!lua_isnil(L, -1)) {
    lua_Integer i = lua_tointeger(L, -1);
    if (i <= 0) luaL_error(L, "%s must be a positive integer", key);
    v = (uint64_t)i;
  }
  lua_pop(L, 1);
  return v;
}

/* Reads limits and time-outs from the table at idx (keys as in the config). */
static void check_backend_config(lua_State *L, int idx, sg_backend_config *c) {
  sg__backend_config_defaults(c);
  c->init_timeout_ms = opt_ms(L, idx, "init_timeout_ms", c->init_timeout_ms);
  c->request_timeout_ms = opt_ms(L, idx, "request_timeout_ms", c->request_timeout_ms);
  c->stop_grace_ms = opt_ms(L, idx, "stop_grace_ms", c->stop_grace_ms);
  c->backoff_initial_ms = opt_ms(L, idx, "restart_backoff_ms", c->backoff_initial_ms);
  c->backoff_max_doublings = (int)opt_ms(L, idx, "restart_max_doublings", 11) - 1;
  c->retry_max_tries = (int)opt_ms(L, idx, "retry_max_tries", (uint64_t)c->retry_max_tries);
  c->retry_initial_ms = opt_ms(L, idx, "retry_backoff_ms", c->retry_initial_ms);
  c->max_value_bytes = opt_ms(L, idx, "max_line_bytes", c->max_value_bytes);
  c->limits.max_depth = (int)opt_ms(L, idx, "max_depth", (uint64_t)c->limits.max_depth);
  c->limits.max_attachment_bytes =
      opt_ms(L, idx, "max_attachment_bytes", c->limits.max_attachment_bytes);
}

/* A NULL-terminated array of strings from the sequence at idx, pushed as a
 * userdata so Lua frees it. */
static const char **check_strings(lua_State *L, int idx, const char *what) {
  if (lua_isnoneornil(L, idx)) return NULL;
  luaL_checktype(L, idx, LUA_TTABLE);
  lua_Integer n = luaL_len(L, idx);
  const char **v = lua_newuserdatauv(L, (size_t)(n + 1) * sizeof *v, 0);
  for (lua_Integer i = 1; i <= n; i++) {
    lua_rawgeti(L, idx, i);
    if (!lua_isstring(L, -1)) luaL_error(L, "%s[%d] must be a string", what, (int)i);
    v[i - 1] = lua_tostring(L, -1);
    lua_pop(L, 1);  /* still referenced by the table */
  }
  v[n] = NULL;
  return v;
}

static int attach_child(sg_backend *b, const void *spec) { return sg__child_attach(b, spec); }

/* add_process_backend(name, {cmd=, args={}, env={"K=V"}, cwd=}, limits) */
static int l_add_process_backend(lua_State *L) {
  sg_host *h = host_of(L);
  const char *name = luaL_checkstring(L, 1);
  luaL_checktype(L, 2, LUA_TTABLE);
  sg_backend_config cfg;
  check_backend_config(L, 3, &cfg);
  lua_getfield(L, 2, "cmd");
  lua_getfield(L, 2, "args");
  lua_getfield(L, 2, "env");
  lua_getfield(L, 2, "cwd");
  sg_child_spec spec = {luaL_checkstring(L, 4), check_strings(L, 5, "args"),
                        check_strings(L, 6, "env"), luaL_optstring(L, 7, NULL)};
  int rc = sg__host_add_backend(h, name, &sg__child_transport, &cfg, attach_child, &spec, NULL);
  if (rc != 0) return push_fail(L, rc, NULL);
  lua_pushboolean(L, 1);
  return 1;
}

/* add_lua_backend(name, driver{start, deliver, stop}, limits) */
static int l_add_lua_backend(lua_State *L) {
  sg_host *h = host_of(L);
  const char *name = luaL_checkstring(L, 1);
  luaL_checktype(L, 2, LUA_TTABLE);
  sg_backend_config cfg;
  check_backend_config(L, 3, &cfg);
  sg_host_backend *hb;
  int rc = sg__host_add_backend(h, name, &sg__lua_transport, &cfg, NULL, NULL, &hb);
  if (rc != 0) return push_fail(L, rc, NULL);
  lua_pushvalue(L, 2);
  hb->driver_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_pushboolean(L, 1);
  return 1;
}

static int l_start_backend(lua_State *L) {
  int rc = sg__backend_start(&check_backend(L, 1)->b);
  if (rc != 0) return push_fail(L, rc, NULL);
  lua_pushboolean(L, 1);
  return 1;
}

static int l_stop_backend(lua_State *L) {
  sg__backend_stop(&check_backend(L, 1)->b, NULL);
  return 0;
}

static int l_remove_backend(lua_State *L) {
  sg_host_backend *hb = check_backend(L, 1);
  sg__host_remove_backend(host_of(L), hb);
  return 0;
}

/* backends() -> { {name=, kind=, state=, restarts=, pid=, inflight=}, ... } */
static int l_backends(lua_State *L) {
  sg_host *h = host_of(L);
  lua_newtable(L);
  int i = 1;
  for (sg_host_backend *hb = h->backends; hb; hb = hb->next) {
    lua_createtable(L, 0, 6);
    lua_pushstring(L, hb->b.name);
    lua_setfield(L, -2, "name");
    lua_pushstring(L, hb->b.tp->kind);
    lua_setfield(L, -2, "kind");
    lua_pushstring(L, sg__backend_state_name(hb->b.state));
    lua_setfield(L, -2, "state");
    lua_pushinteger(L, (lua_Integer)hb->b.restarts);
    lua_setfield(L, -2, "restarts");
    lua_pushinteger(L, (lua_Integer)hb->b.inflight);
    lua_setfield(L, -2, "inflight");
    if (hb->b.tp == &sg__child_transport) {
      lua_pushinteger(L, sg__child_pid(&hb->b));
      lua_setfield(L, -2, "pid");
    }
    lua_rawseti(L, -2, i++);
  }
  return 1;
}

/* ---- requests -------------------------------------------------------------- */

typedef struct {
  sg_host *h;
  int cb_ref;
} lua_request;

static void lua_request_done(void *ud, int err, const cJSON *body, const char *msg) {
  lua_request *r = ud;
  sg_host *h = r->h;
  lua_State *L = h->L;
  if (L) {
    lua_rawgeti(L, LUA_REGISTRYINDEX, r->cb_ref);
    luaL_unref(L, LUA_REGISTRYINDEX, r->cb_ref);
    int n;
    if (err == 0) {
      sg__lua_push_json(L, body);
      n = 1;
    } else {
      lua_pushnil(L);
      lua_pushfstring(L, "%s: %s", sg_err_name(err), msg ? msg : sg_strerror(err));
      lua_pushstring(L, sg_err_name(err));
      if (body) sg__lua_push_json(L, body);
      else lua_pushnil(L);
      n = 4;
    }
    sg__host_pcall(h, n, 0, "request callback");
  }
  free(r);
}

/* request(name, body, cb) -> true | nil, err, code; cb(body) or cb(nil, err, code, error_body) */
static int l_request(lua_State *L) {
  sg_host *h = host_of(L);
  const char *name = luaL_checkstring(L, 1);
  luaL_checktype(L, 2, LUA_TTABLE);
  luaL_checktype(L, 3, LUA_TFUNCTION);
  sg_host_backend *hb = sg__host_find_backend(h, name);
  if (!hb) {
    char msg[256];
    snprintf(msg, sizeof msg, "no backend named '%s'", name);
    return push_fail(L, SG_ENOBACKEND, msg);
  }
  char err[512];
  cJSON *body = sg__lua_to_json(L, 2, err, sizeof err);
  if (!body) return push_fail(L, SG_EPROTO, err);
  lua_request *r = malloc(sizeof *r);
  if (!r) {
    cJSON_Delete(body);
    return luaL_error(L, "out of memory");
  }
  r->h = h;
  lua_pushvalue(L, 3);
  r->cb_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  int rc = sg__backend_request(&hb->b, body, lua_request_done, r, err, sizeof err);
  cJSON_Delete(body);
  if (rc != 0) {
    luaL_unref(L, LUA_REGISTRYINDEX, r->cb_ref);
    free(r);
    return push_fail(L, rc, err);
  }
  lua_pushboolean(L, 1);
  return 1;
}

/* ---- the Lua transport: backends written in Lua, in-process ---------------- */

/* Calls driver[fn](args on the stack) for backend hb; returns 0 or SG_ELUA. */
static int call_driver(sg_host_backend *hb, const char *fn, int nargs) {
  lua_State *L = hb->host->L;
  lua_rawgeti(L, LUA_REGISTRYINDEX, hb->driver_ref);
  lua_getfield(L, -1, fn);
  lua_remove(L, -2);
  lua_insert(L, -1 - nargs);
  char what[160];
  snprintf(what, sizeof what, "Lua backend %s: %s", hb->b.name, fn);
  return sg__host_pcall(hb->host, nargs, 0, what);
}

static int lua_tp_start(sg_backend *b) {
  sg_host_backend *hb = (sg_host_backend *)b;
  if (!hb->host->L) return SG_ECLOSING;
  return call_driver(hb, "start", 0);
}

static int lua_tp_send(sg_backend *b, const cJSON *request) {
  sg_host_backend *hb = (sg_host_backend *)b;
  if (!hb->host->L) return SG_ECLOSING;
  sg__lua_push_json(hb->host->L, request);
  return call_driver(hb, "deliver", 1);
}

static void lua_tp_stop(sg_backend *b, int graceful) {
  sg_host_backend *hb = (sg_host_backend *)b;
  if (hb->host->L) {
    lua_pushboolean(hb->host->L, graceful);
    call_driver(hb, "stop", 1);
  }
  sg__backend_on_exit(b, graceful ? "script stopped" : "script stopped after a violation");
}

const sg_transport sg__lua_transport = {"lua", lua_tp_start, lua_tp_send, lua_tp_stop, NULL};

/* emit(name, value): what a Lua backend sends (InitInfo, Response, Update). */
static int l_emit(lua_State *L) {
  sg_host_backend *hb = check_backend(L, 1);
  luaL_checkany(L, 2);
  luaL_argcheck(L, hb->b.tp == &sg__lua_transport, 1, "not a Lua backend");
  sg_backend *b = &hb->b;
  char err[512];
  cJSON *v = sg__lua_to_json(L, 2, err, sizeof err);
  sg_fl_kind kind = SG_FL_UPDATE;
  if (b->state == SG_BACKEND_STARTING) kind = SG_FL_INIT_INFO;
  else if (cJSON_HasObjectItem(v, "sequence_number") && cJSON_HasObjectItem(v, "body"))
    kind = SG_FL_RESPONSE;
  if (v && sg_fl_validate(v, kind, &b->cfg.limits, err, sizeof err) != 0) {
    cJSON_Delete(v);
    v = NULL;
  }
  if (!v) {
    sg__backend_violation(b, err);
    return push_fail(L, SG_EPROTO, err);
  }
  sg__backend_on_value(b, kind, v);
  lua_pushboolean(L, 1);
  return 1;
}

static const sg_embedded_script *find_embedded(int kind, const char *name) {
  for (const sg_embedded_script *s = sg__embedded_scripts; s->name; s++)
    if (s->kind == kind && strcmp(s->name, name) == 0) return s;
  return NULL;
}

/* builtin_backend(name) -> source, path | nil */
static int l_builtin_backend(lua_State *L) {
  const sg_embedded_script *s = find_embedded(SG_EMBED_backend, luaL_checkstring(L, 1));
  if (!s) return 0;
  lua_pushlstring(L, s->source, s->length);
  lua_pushstring(L, s->path);
  return 2;
}

/* embedded_source(module) -> source | nil: for `segue config --default`. */
static int l_embedded_source(lua_State *L) {
  const sg_embedded_script *s = find_embedded(SG_EMBED_module, luaL_checkstring(L, 1));
  if (!s) return 0;
  lua_pushlstring(L, s->source, s->length);
  return 1;
}

static int l_expected_response(lua_State *L) {
  const char *r = sg_fl_expected_response(luaL_checkstring(L, 1));
  if (!r) return 0;
  lua_pushstring(L, r);
  return 1;
}

/* ---- standalone: this process is the backend, on stdin/stdout -------------- */

typedef struct {
  sg_stdio_channel ch;
  sg_host *h;
  int cb_ref;
} stdio_state;

static stdio_state *the_stdio;

static void stdio_freed(uv_handle_t *handle) {
  sg_stdio_channel *ch = handle->data;
  sg_framer_free(&ch->framer);
  free(ch);
}

static void stdio_event(sg_stdio_channel *ch, const cJSON *request, const char *err) {
  stdio_state *st = (stdio_state *)ch;
  if (!st->h || !st->h->L) return;  /* the host is gone (see stdio_gc) */
  lua_State *L = st->h->L;
  lua_rawgeti(L, LUA_REGISTRYINDEX, st->cb_ref);
  if (request) sg__lua_push_json(L, request);
  else lua_pushnil(L);
  if (err) lua_pushstring(L, err);
  else lua_pushnil(L);
  sg__host_pcall(st->h, 2, 0, "standalone backend");
  if (!request && the_stdio == st) {
    luaL_unref(L, LUA_REGISTRYINDEX, st->cb_ref);
    the_stdio = NULL;
    sg_stdio_channel_close(&st->ch, stdio_freed);
  }
}

/* When the Lua state closes (the host closes) with stdin still open, the
 * channel closes without calling back: its callback would find no host. */
static int stdio_gc(lua_State *L) {
  (void)L;
  stdio_state *st = the_stdio;
  if (!st) return 0;
  the_stdio = NULL;
  st->h = NULL;
  sg_stdio_channel_close(&st->ch, stdio_freed);
  return 0;
}

/* stdio_open(fn(request | nil, err)): reads Requests from stdin. */
static int l_stdio_open(lua_State *L) {
  sg_host *h = host_of(L);
  luaL_checktype(L, 1, LUA_TFUNCTION);
  if (the_stdio) return luaL_error(L, "stdin is already open");
  sg_backend_config cfg;
  check_backend_config(L, 2, &cfg);
  stdio_state *st = calloc(1, sizeof *st);
  if (!st) return luaL_error(L, "out of memory");
  int rc = sg_stdio_channel_start(h->loop, &st->ch, 0, 1, cfg.max_value_bytes, &cfg.limits,
                                  stdio_event);
  if (rc != 0) {
    if (st->ch.in) sg_stdio_channel_close(&st->ch, stdio_freed);
    else free(st);
    return push_fail(L, rc, "stdin must be a pipe or a terminal");
  }
  /* A sentinel kept in the registry until the state closes. */
  lua_newuserdatauv(L, 1, 0);
  lua_newtable(L);
  lua_pushcfunction(L, stdio_gc);
  lua_setfield(L, -2, "__gc");
  lua_setmetatable(L, -2);
  luaL_ref(L, LUA_REGISTRYINDEX);
  st->h = h;
  lua_pushvalue(L, 1);
  st->cb_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  the_stdio = st;
  lua_pushboolean(L, 1);
  return 1;
}

/* stdio_write(value) -> true | nil, err: validated, one line on stdout. */
static int l_stdio_write(lua_State *L) {
  luaL_checkany(L, 1);
  if (!the_stdio) return push_fail(L, SG_EDEAD, "stdin/stdout are not open");
  char err[512];
  cJSON *v = sg__lua_to_json(L, 1, err, sizeof err);
  int rc = v ? sg_stdio_channel_write(&the_stdio->ch, v, err, sizeof err) : SG_EPROTO;
  cJSON_Delete(v);
  if (rc != 0) return push_fail(L, rc, err);
  lua_pushboolean(L, 1);
  return 1;
}

int luaopen_segue_core(lua_State *L) {
  static const luaL_Reg fns[] = {
      {"log", l_log},
      {"log_level", l_log_level},
      {"set_handler", l_set_handler},
      {"report", l_report},
      {"add_process_backend", l_add_process_backend},
      {"add_lua_backend", l_add_lua_backend},
      {"start_backend", l_start_backend},
      {"stop_backend", l_stop_backend},
      {"remove_backend", l_remove_backend},
      {"backends", l_backends},
      {"request", l_request},
      {"emit", l_emit},
      {"builtin_backend", l_builtin_backend},
      {"embedded_source", l_embedded_source},
      {"expected_response", l_expected_response},
      {"stdio_open", l_stdio_open},
      {"stdio_write", l_stdio_write},
      {NULL, NULL}};
  luaL_newlib(L, fns);
  lua_pushstring(L, sg_version_string());
  lua_setfield(L, -2, "version");
  return 1;
}
