/* segue.core, part: backends (child processes and Lua scripts), requests to
 * them, and the Lua transport (backends written in Lua, in-process). */
#include <lauxlib.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "child.h"
#include "core.h"
#include "lua_json.h"

/* The Lua transport's data: the driver table {start, deliver, stop}. */
typedef struct {
  sg__lenv *e;
  int ref;
} lua_driver;

static const sg__transport sg__lua_transport;

static int attach_driver(sg__backend *b, const void *d) {
  b->transport_data = (void *)d;
  return 0;
}

/* The backend named by argument idx, or NULL after pushing the failure
 * (nil, "ENOBACKEND: no backend named 'x'", "ENOBACKEND"): a name is data,
 * so a wrong one is a failure like any other, not a raise. */
static sg__backend *find_backend(lua_State *L, int idx) {
  const char *name = luaL_checkstring(L, idx);
  sg__backend *b = sg__lenv_find_backend(sg__lenv_check(L), name);
  if (!b) {
    char msg[256];
    snprintf(msg, sizeof msg, "no backend named '%s'", name);
    sg__lua_fail(L, SG_ENOBACKEND, msg);
  }
  return b;
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
void sg__core_check_backend_config(lua_State *L, int idx, sg__backend_config *c) {
  sg__backend_config_defaults(c);
  c->init_timeout_ms = opt_ms(L, idx, "init_timeout_ms", c->init_timeout_ms);
  c->request_timeout_ms = opt_ms(L, idx, "request_timeout_ms", c->request_timeout_ms);
  c->stop_grace_ms = opt_ms(L, idx, "stop_grace_ms", c->stop_grace_ms);
  c->backoff_initial_ms = opt_ms(L, idx, "restart_backoff_ms", c->backoff_initial_ms);
  c->backoff_max_doublings = (int)opt_ms(L, idx, "restart_max_doublings", 11) - 1;
  c->retry_max_tries = (int)opt_ms(L, idx, "retry_max_tries", (uint64_t)c->retry_max_tries);
  c->retry_initial_ms = opt_ms(L, idx, "retry_backoff_ms", c->retry_initial_ms);
  c->max_value_bytes = opt_ms(L, idx, "max_line_bytes", c->max_value_bytes);
  c->max_queue_bytes = opt_ms(L, idx, "max_queue_bytes", c->max_queue_bytes);
  uint64_t depth = opt_ms(L, idx, "max_depth", (uint64_t)c->limits.max_depth);
  /* Values go on into Lua tables: no deeper than the converter follows. */
  if (depth > SG_LUA_JSON_MAX_DEPTH) {
    sg__lenv *e = sg__lenv_of(L);
    if (e)
      sg__log(&e->log, SG_LOG_WARN, NULL, NULL,
              "max_depth %llu capped to %d (the deepest nesting Lua values are made of)",
              (unsigned long long)depth, SG_LUA_JSON_MAX_DEPTH);
    depth = SG_LUA_JSON_MAX_DEPTH;
  }
  c->limits.max_depth = (int)depth;
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

static int attach_child(sg__backend *b, const void *spec) { return sg__child_attach(b, spec); }

/* add_process_backend(name, {cmd=, args={}, env={"K=V"}, cwd=}, limits) */
static int l_add_process_backend(lua_State *L) {
  sg__lenv *h = sg__lenv_check(L);
  const char *name = luaL_checkstring(L, 1);
  luaL_checktype(L, 2, LUA_TTABLE);
  sg__backend_config cfg;
  sg__core_check_backend_config(L, 3, &cfg);
  lua_getfield(L, 2, "cmd");
  lua_getfield(L, 2, "args");
  lua_getfield(L, 2, "env");
  lua_getfield(L, 2, "cwd");
  sg__child_spec spec = {luaL_checkstring(L, 4), check_strings(L, 5, "args"),
                        check_strings(L, 6, "env"), luaL_optstring(L, 7, NULL)};
  int rc = h->add_backend(h, name, &sg__child_transport, &cfg, attach_child, &spec, NULL);
  if (rc != 0) return sg__lua_fail(L, rc, NULL);
  lua_pushboolean(L, 1);
  return 1;
}

/* add_lua_backend(name, driver{start, deliver, stop}, limits) */
static int l_add_lua_backend(lua_State *L) {
  sg__lenv *h = sg__lenv_check(L);
  const char *name = luaL_checkstring(L, 1);
  luaL_checktype(L, 2, LUA_TTABLE);
  sg__backend_config cfg;
  sg__core_check_backend_config(L, 3, &cfg);
  lua_driver *d = malloc(sizeof *d);
  if (!d) return sg__lua_fail(L, SG_ENOMEM, NULL);
  d->e = h;
  d->ref = LUA_NOREF;
  int rc = h->add_backend(h, name, &sg__lua_transport, &cfg, attach_driver, d, NULL);
  if (rc != 0) {
    free(d);
    return sg__lua_fail(L, rc, NULL);
  }
  lua_pushvalue(L, 2);
  d->ref = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_pushboolean(L, 1);
  return 1;
}

static int l_start_backend(lua_State *L) {
  sg__backend *b = find_backend(L, 1);
  if (!b) return 3;
  return sg__lua_result(L, sg__backend_start(b));
}

static int l_stop_backend(lua_State *L) {
  sg__backend *b = find_backend(L, 1);
  if (!b) return 3;
  sg__backend_stop(b, NULL);
  return sg__lua_result(L, 0);
}

static int l_remove_backend(lua_State *L) {
  sg__backend *b = find_backend(L, 1);
  if (!b) return 3;
  sg__lenv *e = sg__lenv_check(L);
  e->remove_backend(e, b);
  return sg__lua_result(L, 0);
}

/* pause_backend(name, paused) -> true if the backend's transport can pause
 * (flow control: what it sends is not read while paused). */
static int l_pause_backend(lua_State *L) {
  sg__backend *b = find_backend(L, 1);
  if (!b) return 3;
  lua_pushboolean(L, sg__backend_pause(b, lua_toboolean(L, 2)));
  return 1;
}

/* backends() -> { {name=, kind=, state=, restarts=, pid=, inflight=, queued_bytes=}, ... } */
static int l_backends(lua_State *L) {
  sg__lenv *h = sg__lenv_check(L);
  lua_newtable(L);
  int i = 1;
  for (sg__backend *b = h->backends; b; b = b->next) {
    lua_createtable(L, 0, 6);
    lua_pushstring(L, b->name);
    lua_setfield(L, -2, "name");
    lua_pushstring(L, b->tp->kind);
    lua_setfield(L, -2, "kind");
    lua_pushstring(L, sg__backend_state_name(b->state));
    lua_setfield(L, -2, "state");
    lua_pushinteger(L, (lua_Integer)b->restarts);
    lua_setfield(L, -2, "restarts");
    lua_pushinteger(L, (lua_Integer)b->inflight);
    lua_setfield(L, -2, "inflight");
    lua_pushinteger(L, (lua_Integer)sg__backend_waiting_bytes(b));
    lua_setfield(L, -2, "queued_bytes");
    if (b->tp == &sg__child_transport) {
      lua_pushinteger(L, sg__child_pid(b));
      lua_setfield(L, -2, "pid");
    }
    char err[128];  /* as announced; segue.degrade adds the defaults */
    if (b->capabilities && sg__lua_push_json(L, b->capabilities, err, sizeof err) == 0)
      lua_setfield(L, -2, "capabilities");
    lua_rawseti(L, -2, i++);
  }
  return 1;
}

/* ---- requests -------------------------------------------------------------- */

typedef struct {
  sg__lenv *h;
  int cb_ref;
} lua_request;

static void lua_request_done(void *ud, int err, const cJSON *body, const char *msg) {
  lua_request *r = ud;
  sg__lenv *h = r->h;
  lua_State *L = h->L;
  if (L) {
    lua_rawgeti(L, LUA_REGISTRYINDEX, r->cb_ref);
    luaL_unref(L, LUA_REGISTRYINDEX, r->cb_ref);
    char cerr[256];
    int n = 1;
    int crc = err == 0 ? sg__lua_push_json_protected(L, body, cerr, sizeof cerr) : 0;
    if (crc != 0) {  /* a body Lua cannot hold (too deep) fails the request */
      err = crc;
      msg = cerr;
      body = NULL;
    }
    if (err != 0) {
      lua_pushnil(L);
      lua_pushfstring(L, "%s: %s", sg_err_name(err), msg ? msg : sg_strerror(err));
      lua_pushstring(L, sg_err_name(err));
      char berr[128];
      if (!body || sg__lua_push_json_protected(L, body, berr, sizeof berr) != 0) lua_pushnil(L);
      n = 4;
    }
    sg__lenv_pcall(h, n, 0, "request callback");
  }
  free(r);
}

/* request(name, body, cb) -> true | nil, err, code; cb(body) or cb(nil, err, code, error_body) */
static int l_request(lua_State *L) {
  sg__lenv *h = sg__lenv_check(L);
  luaL_checktype(L, 2, LUA_TTABLE);
  luaL_checktype(L, 3, LUA_TFUNCTION);
  sg__backend *hb = find_backend(L, 1);
  if (!hb) return 3;
  char err[512];
  cJSON *body = sg__lua_to_json(L, 2, err, sizeof err);
  if (!body) return sg__lua_fail(L, SG_EPROTO, err);
  lua_request *r = malloc(sizeof *r);
  if (!r) {
    cJSON_Delete(body);
    return luaL_error(L, "out of memory");
  }
  r->h = h;
  lua_pushvalue(L, 3);
  r->cb_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  int rc = sg__backend_request_owned(hb, body, lua_request_done, r, err, sizeof err);
  if (rc != 0) {
    luaL_unref(L, LUA_REGISTRYINDEX, r->cb_ref);
    free(r);
    return sg__lua_fail(L, rc, err);
  }
  lua_pushboolean(L, 1);
  return 1;
}

/* ---- the Lua transport: backends written in Lua, in-process ---------------- */

/* Calls driver[fn](args on the stack) for backend b; returns 0 or SG_ELUA. */
static int call_driver(sg__backend *b, const char *fn, int nargs) {
  lua_driver *d = b->transport_data;
  lua_State *L = d->e->L;
  lua_rawgeti(L, LUA_REGISTRYINDEX, d->ref);
  lua_getfield(L, -1, fn);
  lua_remove(L, -2);
  lua_insert(L, -1 - nargs);
  char what[160];
  snprintf(what, sizeof what, "Lua backend %s: %s", b->name, fn);
  return sg__lenv_pcall(d->e, nargs, 0, what);
}

static int lua_tp_start(sg__backend *b) {
  lua_driver *d = b->transport_data;
  if (!d->e->L) return SG_ECLOSING;
  return call_driver(b, "start", 0);
}

static int lua_tp_send(sg__backend *b, const cJSON *request) {
  lua_driver *d = b->transport_data;
  if (!d->e->L) return SG_ECLOSING;
  char err[256];
  int rc = sg__lua_push_json_protected(d->e->L, request, err, sizeof err);
  if (rc != 0) {
    sg__backend_log(b, SG_LOG_ERROR, "cannot deliver a request: %s", err);
    return rc;
  }
  return call_driver(b, "deliver", 1);
}

static void lua_tp_stop(sg__backend *b, int graceful) {
  lua_driver *d = b->transport_data;
  if (d->e->L) {
    lua_pushboolean(d->e->L, graceful);
    call_driver(b, "stop", 1);
  }
  sg__backend_on_exit(b, graceful ? "script stopped" : "script stopped after a violation");
}

static void lua_tp_free(sg__backend *b) {
  lua_driver *d = b->transport_data;
  if (!d) return;
  if (d->e->L) luaL_unref(d->e->L, LUA_REGISTRYINDEX, d->ref);
  free(d);
  b->transport_data = NULL;
}

static const sg__transport sg__lua_transport = {
    .kind = "lua", .start = lua_tp_start, .send = lua_tp_send, .stop = lua_tp_stop,
    .free = lua_tp_free};

/* emit(name, value): what a Lua backend sends (InitInfo, Response, Update). */
static int l_emit(lua_State *L) {
  sg__backend *b = find_backend(L, 1);
  if (!b) return 3;
  luaL_checkany(L, 2);
  luaL_argcheck(L, b->tp == &sg__lua_transport, 1, "not a Lua backend");
  char err[512];
  cJSON *v = sg__lua_to_json(L, 2, err, sizeof err);
  sg__fl_kind kind = sg__fl_classify_backend(v, b->state == SG_BACKEND_STARTING);
  if (v && sg__fl_validate(v, kind, &b->cfg.limits, err, sizeof err) != 0) {
    cJSON_Delete(v);
    v = NULL;
  }
  if (!v) {
    sg__backend_violation(b, err);
    return sg__lua_fail(L, SG_EPROTO, err);
  }
  sg__backend_on_value(b, kind, v);
  lua_pushboolean(L, 1);
  return 1;
}


void sg__core_open_backends(lua_State *L) {
  static const luaL_Reg fns[] = {
      {"add_process_backend", l_add_process_backend},
      {"add_lua_backend", l_add_lua_backend},
      {"start_backend", l_start_backend},
      {"stop_backend", l_stop_backend},
      {"remove_backend", l_remove_backend},
      {"backends", l_backends},
      {"pause_backend", l_pause_backend},
      {"request", l_request},
      {"emit", l_emit},
      {NULL, NULL}};
  luaL_setfuncs(L, fns, 0);
}
