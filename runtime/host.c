/* The host: owns the lua_State and the backends, on the embedder's loop.
 * Policy (config, which backends, what happens to updates) is Lua's: the
 * host hands events to `segue.boot` and the handler it registered. */
#include "host.h"

#include <lauxlib.h>
#include <lualib.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bindings.h"
#include "embedded_scripts.h"
#include "lua_json.h"

static const char host_key = 'h';

sg_host *sg__host_from_lua(lua_State *L) {
  lua_rawgetp(L, LUA_REGISTRYINDEX, &host_key);
  sg_host *h = lua_touserdata(L, -1);
  lua_pop(L, 1);
  return h;
}

/* ---- Lua plumbing ------------------------------------------------------ */

static int traceback(lua_State *L) {
  const char *msg = lua_tostring(L, 1);
  if (!msg) msg = lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, 1));
  luaL_traceback(L, L, msg, 1);
  return 1;
}

void sg__host_report(sg_host *h, int err, const char *message) {
  sg__log(&h->log, SG_LOG_ERROR, NULL, NULL, "%s", message);
  if (h->error_cb) h->error_cb(h->error_data, err, message);
}

int sg__host_pcall(sg_host *h, int nargs, int nres, const char *what) {
  lua_State *L = h->L;
  int base = lua_gettop(L) - nargs;
  lua_pushcfunction(L, traceback);
  lua_insert(L, base);
  int rc = lua_pcall(L, nargs, nres, base);
  lua_remove(L, base);
  if (rc == LUA_OK) return 0;
  char buf[4096];
  snprintf(buf, sizeof buf, "%s: %s", what, lua_tostring(L, -1));
  lua_pop(L, 1);
  sg__host_report(h, SG_ELUA, buf);
  return SG_ELUA;
}

int sg__host_push_handler(sg_host *h, const char *event) {
  if (h->handler_ref == LUA_NOREF) return -1;
  lua_rawgeti(h->L, LUA_REGISTRYINDEX, h->handler_ref);
  lua_pushstring(h->L, event);
  return 0;
}

/* package.preload loader for an embedded script: upvalue 1 is its entry. */
static int load_embedded(lua_State *L) {
  const sg_embedded_script *s = lua_touserdata(L, lua_upvalueindex(1));
  char chunk[256];
  snprintf(chunk, sizeof chunk, "@%s", s->path);
  if (luaL_loadbuffer(L, s->source, s->length, chunk) != LUA_OK) return lua_error(L);
  lua_pushstring(L, s->name);
  lua_call(L, 1, 1);
  return 1;
}

static void register_preloads(lua_State *L) {
  luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_PRELOAD_TABLE);
  for (const sg_binding *b = sg__bindings; b->name; b++) {
    lua_pushcfunction(L, b->open);
    lua_setfield(L, -2, b->name);
  }
  for (const sg_embedded_script *s = sg__embedded_scripts; s->name; s++) {
    if (s->kind != SG_EMBED_module) continue;
    lua_pushlightuserdata(L, (void *)s);
    lua_pushcclosure(L, load_embedded, 1);
    lua_setfield(L, -2, s->name);
  }
  lua_pop(L, 1);
}

static int open_lua(sg_host *h) {
  lua_State *L = luaL_newstate();
  if (!L) return SG_ENOMEM;
  h->L = L;
  luaL_openlibs(L);
  lua_pushlightuserdata(L, h);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &host_key);
  register_preloads(L);
  /* segue.boot is the Lua half of the host: it must load. */
  lua_getglobal(L, "require");
  lua_pushliteral(L, "segue.boot");
  return sg__host_pcall(h, 1, 0, "loading segue.boot");
}

/* ---- life cycle -------------------------------------------------------- */

int sg_host_new(uv_loop_t *loop, const sg_host_options *opts, sg_host **out) {
  sg_host_options o = {sizeof o, NULL, -1, NULL, NULL, NULL, NULL};
  if (!loop || !out) return SG_EINVAL;
  if (opts) memcpy(&o, opts, opts->size < sizeof o ? opts->size : sizeof o);
  sg_host *h = calloc(1, sizeof *h);
  if (!h) return SG_ENOMEM;
  h->loop = loop;
  h->handler_ref = LUA_NOREF;
  h->log.level = o.log_level >= 0 ? o.log_level : SG_LOG_INFO;
  h->log.cb = o.log_cb;
  h->log.data = o.log_data;
  h->error_cb = o.error_cb;
  h->error_data = o.error_data;
  h->data_dir = strdup(o.data_dir ? o.data_dir : "");
  uv_idle_init(loop, &h->reaper);
  h->reaper.data = h;
  int rc = h->data_dir ? open_lua(h) : SG_ENOMEM;
  if (rc != 0) {
    h->closing = 1;
    sg_host_close(h, NULL, NULL);
    return rc;
  }
  /* Options given in C win over the config's. */
  if (o.data_dir || o.log_level >= 0) {
    lua_getglobal(h->L, "require");
    lua_pushliteral(h->L, "segue.boot");
    lua_call(h->L, 1, 1);
    lua_getfield(h->L, -1, "set_overrides");
    lua_remove(h->L, -2);
    lua_createtable(h->L, 0, 2);
    if (o.data_dir) { lua_pushstring(h->L, o.data_dir); lua_setfield(h->L, -2, "data_dir"); }
    if (o.log_level >= 0) {
      lua_pushstring(h->L, sg__log_level_name(o.log_level));
      lua_setfield(h->L, -2, "log_level");
    }
    sg__host_pcall(h, 1, 0, "segue.boot.set_overrides");
  }
  *out = h;
  return 0;
}

void *sg_host_get_data(const sg_host *h) { return h->data; }
void sg_host_set_data(sg_host *h, void *data) { h->data = data; }
uv_loop_t *sg_host_loop(const sg_host *h) { return h->loop; }
const char *sg_host_last_error(const sg_host *h) { return h->last_error; }

/* Calls segue.boot.<fn>(args...) which returns true or nil, err. */
static int boot_call(sg_host *h, const char *fn, int nargs) {
  lua_State *L = h->L;
  if (h->closing) {
    lua_pop(L, nargs);
    return SG_ECLOSING;
  }
  lua_getglobal(L, "require");
  lua_pushliteral(L, "segue.boot");
  if (lua_pcall(L, 1, 1, 0) != LUA_OK) {
    lua_pop(L, 1 + nargs);
    return SG_ELUA;
  }
  lua_getfield(L, -1, fn);
  lua_remove(L, -2);
  lua_insert(L, -1 - nargs);
  char what[64];
  snprintf(what, sizeof what, "segue.boot.%s", fn);
  if (sg__host_pcall(h, nargs, 2, what) != 0) return SG_ELUA;
  int ok = lua_toboolean(L, -2);
  int code = SG_ECONFIG;
  snprintf(h->last_error, sizeof h->last_error, "%s", ok ? "" : luaL_optstring(L, -1, "failed"));

  lua_pop(L, 2);
  return ok ? 0 : code;
}

int sg__host_call_boot(sg_host *h, const char *fn, const char *const *argv, int argc) {
  luaL_checkstack(h->L, argc + 8, "arguments");
  for (int i = 0; i < argc; i++) lua_pushstring(h->L, argv[i]);
  return boot_call(h, fn, argc);
}

int sg_host_load_config_file(sg_host *h, const char *path) {
  if (!path) return SG_EINVAL;
  lua_pushstring(h->L, path);
  return boot_call(h, "load_config_file", 1);
}

int sg_host_load_config_string(sg_host *h, const char *chunkname, const char *src, size_t len) {
  if (!src) return SG_EINVAL;
  lua_pushstring(h->L, chunkname ? chunkname : "config");
  lua_pushlstring(h->L, src, len);
  return boot_call(h, "load_config_string", 2);
}

int sg_host_load_script(sg_host *h, const char *path) {
  if (!path) return SG_EINVAL;
  lua_pushstring(h->L, path);
  return boot_call(h, "load_script", 1);
}

/* C backends are not in the config, so segue.boot does not know them: they
 * start here, after the scripts that will receive their updates. */
int sg_host_start(sg_host *h) {
  int rc = boot_call(h, "start", 0);
  if (rc != 0) return rc;
  h->started = 1;
  for (sg_host_backend *hb = h->backends; hb; hb = hb->next)
    if (hb->cbackend && hb->b.state == SG_BACKEND_STOPPED && !hb->b.stop_for_good)
      sg__backend_start(&hb->b);
  return 0;
}

int sg_host_reload(sg_host *h) { return boot_call(h, "reload", 0); }

static void backend_stopped(sg_backend *b) {
  sg_host *h = ((sg_host_backend *)b)->host;
  if (h->stops_pending && --h->stops_pending == 0 && h->stop_cb) {
    void (*cb)(sg_host *) = h->stop_cb;
    h->stop_cb = NULL;
    cb(h);
  }
}

int sg_host_stop(sg_host *h, void (*cb)(sg_host *host)) {
  if (h->stop_cb) return SG_EINVAL;
  h->stop_cb = cb;
  h->stops_pending = 1;  /* held until every stop was asked */
  if (sg__host_push_handler(h, "stopping") == 0) sg__host_pcall(h, 1, 0, "stopping handler");
  for (sg_host_backend *hb = h->backends; hb; hb = hb->next) {
    h->stops_pending++;
    sg__backend_stop(&hb->b, backend_stopped);
  }
  backend_stopped(&(sg_host_backend){.host = h}.b);
  return 0;
}

/* ---- backends ---------------------------------------------------------- */

static void on_update(sg_backend *b, const cJSON *update) {
  sg_host *h = ((sg_host_backend *)b)->host;
  if (sg__host_push_handler(h, "update") != 0) return;
  lua_pushstring(h->L, b->name);
  sg__lua_push_json(h->L, update);
  sg__host_pcall(h, 3, 0, "update handler");
}

static void on_state(sg_backend *b, sg_backend_state s, const char *reason) {
  sg_host *h = ((sg_host_backend *)b)->host;
  if (h->closing || sg__host_push_handler(h, "backend") != 0) return;
  lua_pushstring(h->L, b->name);
  lua_pushstring(h->L, sg__backend_state_name(s));
  if (reason) lua_pushstring(h->L, reason);
  else lua_pushnil(h->L);
  sg__host_pcall(h, 4, 0, "backend state handler");
}

static void maybe_free_host(sg_host *h);

static void on_closed(sg_backend *b) {
  sg_host_backend *hb = (sg_host_backend *)b;
  sg_host *h = hb->host;
  if (hb->driver_ref != LUA_NOREF && h->L) luaL_unref(h->L, LUA_REGISTRYINDEX, hb->driver_ref);
  free(hb);
  h->backends_open--;
  if (h->closing) maybe_free_host(h);
}

/* The backend's timer data is the backend, which is the start of hb. */
static void free_unattached(uv_handle_t *timer) { free(timer->data); }

static const sg_backend_events host_events = {on_update, on_state, on_closed};

sg_host_backend *sg__host_find_backend(sg_host *h, const char *name) {
  for (sg_host_backend *hb = h->backends; hb; hb = hb->next)
    if (strcmp(hb->b.name, name) == 0) return hb;
  return NULL;
}

int sg__host_add_backend(sg_host *h, const char *name, const sg_transport *tp,
                         const sg_backend_config *cfg,
                         int (*attach)(sg_backend *b, const void *arg),
                         const void *attach_arg, sg_host_backend **out) {
  if (h->closing) return SG_ECLOSING;
  if (sg__host_find_backend(h, name)) return SG_EEXIST;
  sg_host_backend *hb = calloc(1, sizeof *hb);
  if (!hb) return SG_ENOMEM;
  hb->host = h;
  hb->driver_ref = LUA_NOREF;
  int rc = sg__backend_init(h->loop, &hb->b, name, tp, cfg, &host_events, &h->log);
  if (rc != 0) {
    free(hb);
    return rc;
  }
  if (attach && (rc = attach(&hb->b, attach_arg)) != 0) {
    free(hb->b.name);
    /* uv finishes closes last-asked first: the one that frees goes first. */
    uv_close((uv_handle_t *)&hb->b.timer, free_unattached);
    uv_close((uv_handle_t *)&hb->b.kick, NULL);
    return rc;
  }
  hb->next = h->backends;
  h->backends = hb;
  h->backends_open++;
  if (out) *out = hb;
  return 0;
}

void sg__host_remove_backend(sg_host *h, sg_host_backend *hb) {
  for (sg_host_backend **p = &h->backends; *p; p = &(*p)->next) {
    if (*p == hb) {
      *p = hb->next;
      break;
    }
  }
  sg__backend_close(&hb->b);
}

/* ---- requests from C ---------------------------------------------------- */

typedef struct {
  sg_response_cb cb;
  void *data;
} c_request;

static void c_request_done(void *ud, int err, const cJSON *body, const char *msg) {
  c_request *r = ud;
  char *text = body ? cJSON_PrintUnformatted(body) : NULL;
  r->cb(r->data, err, text, msg);
  cJSON_free(text);
  free(r);
}

int sg_host_request(sg_host *h, const char *name, const char *body_json,
                    sg_response_cb cb, void *data) {
  if (!name || !body_json || !cb) return SG_EINVAL;
  if (h->closing) return SG_ECLOSING;
  sg_host_backend *hb = sg__host_find_backend(h, name);
  if (!hb) return SG_ENOBACKEND;
  cJSON *body = cJSON_Parse(body_json);
  if (!body) return SG_EPROTO;
  c_request *r = malloc(sizeof *r);
  if (!r) {
    cJSON_Delete(body);
    return SG_ENOMEM;
  }
  r->cb = cb;
  r->data = data;
  char err[512];
  int rc = sg__backend_request(&hb->b, body, c_request_done, r, err, sizeof err);
  cJSON_Delete(body);
  if (rc != 0) {
    sg__log(&h->log, SG_LOG_WARN, "backend", name, "request refused: %s", err);
    free(r);
  }
  return rc;
}

/* ---- close ------------------------------------------------------------- */

static void reaper_closed(uv_handle_t *handle) {
  sg_host *h = handle->data;
  void (*cb)(void *) = h->close_cb;
  void *data = h->close_data;
  free(h->data_dir);
  free(h);
  if (cb) cb(data);
}

/* One loop turn after the last close was asked: uv runs the close callbacks
 * of a turn at its end, so by now every handle of ours finished closing and
 * the embedder's callback may close its loop. */
static void reap(uv_idle_t *idle) {
  uv_idle_stop(idle);
  uv_close((uv_handle_t *)idle, reaper_closed);
}

static void maybe_free_host(sg_host *h) {
  if (h->backends_open > 0 || uv_is_active((uv_handle_t *)&h->reaper) ||
      uv_is_closing((uv_handle_t *)&h->reaper))
    return;
  if (h->L) {
    /* Lua objects (timers, watchers) close their handles from __gc. */
    lua_close(h->L);
    h->L = NULL;
  }
  uv_idle_start(&h->reaper, reap);
}

void sg_host_close(sg_host *h, void (*cb)(void *data), void *data) {
  if (h->close_cb || (h->closing && h->L == NULL && uv_is_closing((uv_handle_t *)&h->reaper)))
    return;
  h->closing = 1;
  h->close_cb = cb;
  h->close_data = data;
  if (h->L && sg__host_push_handler(h, "closing") == 0) sg__host_pcall(h, 1, 0, "closing handler");
  while (h->backends) {
    sg_host_backend *hb = h->backends;
    h->backends = hb->next;
    sg__backend_close(&hb->b);
  }
  maybe_free_host(h);
}
