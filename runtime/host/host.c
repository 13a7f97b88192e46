/* The host: owns the lua_State and the backends, on the embedder's loop.
 * Policy (config, which backends, what happens to updates) is Lua's: the
 * host hands events to `segue.boot` and the handler it registered. */
#include "host.h"

#include <errno.h>
#include <pthread.h>
#include <lauxlib.h>
#include <lualib.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "bindings.h"
#include "embedded_scripts.h"
#include "lua_json.h"

const sg__logger *sg__host_logger(const sg_host *h) { return &h->env.log; }

static void on_lua_error(sg__lenv *e, int err, const char *message) {
  sg_host *h = (sg_host *)e;
  if (h->error_cb) h->error_cb(h->error_data, err, message);
}

int sg__host_push_handler(sg_host *h, const char *event) {
  if (h->env.handler_ref == LUA_NOREF) return -1;
  lua_rawgeti(h->env.L, LUA_REGISTRYINDEX, h->env.handler_ref);
  lua_pushstring(h->env.L, event);
  return 0;
}

/* package.preload loader for an embedded script: upvalue 1 is its entry. */
static int load_embedded(lua_State *L) {
  const sg__embedded_script *s = lua_touserdata(L, lua_upvalueindex(1));
  char chunk[256];
  snprintf(chunk, sizeof chunk, "@%s", s->path);
  if (luaL_loadbuffer(L, s->source, s->length, chunk) != LUA_OK) return lua_error(L);
  lua_pushstring(L, s->name);
  /* require runs loaders protected already; pcall keeps this file free of
   * raw calls, and the error goes on unchanged. */
  if (lua_pcall(L, 1, 1, 0) != LUA_OK) return lua_error(L);
  return 1;
}

static void register_preloads(lua_State *L) {
  luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_PRELOAD_TABLE);
  for (const sg__binding *b = sg__bindings; b->name; b++) {
    lua_pushcfunction(L, b->open);
    lua_setfield(L, -2, b->name);
  }
  for (const sg__embedded_script *s = sg__embedded_scripts; s->name; s++) {
    if (s->kind != SG_EMBED_module) continue;
    lua_pushlightuserdata(L, (void *)s);
    lua_pushcclosure(L, load_embedded, 1);
    lua_setfield(L, -2, s->name);
  }
  lua_pop(L, 1);
}

/* The accounting allocator: counts the heap in env.mem_used and refuses to
 * grow it past env.mem_limit while a sandbox sets one (Lua then collects
 * garbage and retries, and raises "not enough memory" if that is not enough:
 * always inside a protected call, as sandboxes run only there). Shrinking
 * never fails. */
static void *host_alloc(void *ud, void *ptr, size_t osize, size_t nsize) {
  sg__lenv *e = ud;
  size_t old = ptr ? osize : 0;
  if (nsize == 0) {
    free(ptr);
    e->mem_used -= old;
    return NULL;
  }
  if (e->mem_limit && nsize > old && e->mem_used - old + nsize > e->mem_limit) {
    e->mem_exceeded = 1;
    return NULL;
  }
  void *p = realloc(ptr, nsize);
  if (p) e->mem_used = e->mem_used - old + nsize;
  return p;
}

/* ---- interrupting Lua from a signal --------------------------------------
 * As the standalone lua interpreter does, with a grace: SIGINT/SIGTERM
 * arriving while Lua runs set the count hook on the running thread
 * (sg__lenv_interrupt). A call that returns to C within
 * SG_LENV_INTERRUPT_GRACE_MS (a message being routed) is not cut short;
 * Lua still running then is interrupted, and again at every later tick
 * until the outermost call returns to C, so a pcall that catches it is
 * interrupted again. The loop then sees the signal (libuv's handler,
 * chained) and stops segue. A second signal while the first is still
 * pending (Lua in its grace, or that escaped the hook) exits at once. */
static sg_host *interrupt_host;
static pthread_t interrupt_thread;  /* the loop's, where Lua runs */
static struct sigaction prev_action[65];

static void on_interrupt(int signum) {
  int saved = errno;
  if (!pthread_equal(pthread_self(), interrupt_thread)) {
    /* Another thread took it (a pool worker): the handler must run where
     * Lua runs, so it sets the hook without racing the VM. */
    pthread_kill(interrupt_thread, signum);
    errno = saved;
    return;
  }
  sg_host *h = interrupt_host;
  if (h && h->env.L && h->env.busy > 0 && h->env.running) {  /* Lua runs, not the loop */
    if (h->env.interrupted) {
      static const char msg[] = "segue: second signal while Lua runs, exiting now\n";
      ssize_t w = write(2, msg, sizeof msg - 1);
      (void)w;
      _exit(1);
    }
    sg__lenv_interrupt(&h->env, signum);
  }
  if (signum > 0 && signum < 65) {
    struct sigaction *p = &prev_action[signum];
    if (p->sa_flags & SA_SIGINFO) {
      if (p->sa_sigaction) p->sa_sigaction(signum, NULL, NULL);
    } else if (p->sa_handler != SIG_DFL && p->sa_handler != SIG_IGN && p->sa_handler) {
      p->sa_handler(signum);
    }
  }
  errno = saved;
}

void sg__host_catch_interrupts(sg_host *h, const int *signums, int n) {
  interrupt_host = h;
  interrupt_thread = pthread_self();
  for (int i = 0; i < n; i++) {
    if (signums[i] <= 0 || signums[i] >= 65) continue;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_interrupt;
    sigfillset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;
    sigaction(signums[i], &sa, &prev_action[signums[i]]);
  }
}

static int open_lua(sg_host *h) {
  lua_State *L = luaL_newstate();
  if (!L) return SG_ENOMEM;
  h->env.L = L;
  h->env.mem_used = (size_t)lua_gc(L, LUA_GCCOUNT, 0) * 1024 + (size_t)lua_gc(L, LUA_GCCOUNTB, 0);
  lua_setallocf(L, host_alloc, &h->env);
  luaL_openlibs(L);
  sg__lenv_set(L, &h->env);
  sg__lenv_bound_strings(L, &h->env);
  register_preloads(L);
  /* segue.boot is the Lua half of the host: it must load. */
  lua_getglobal(L, "require");
  lua_pushliteral(L, "segue.boot");
  return sg__lenv_pcall(&h->env, 1, 0, "loading segue.boot");
}

static void remove_backend(sg__lenv *e, sg__backend *b);
static void store_settled(sg__lenv *e);

/* ---- life cycle -------------------------------------------------------- */

int sg_host_new(uv_loop_t *loop, const sg_host_options *opts, sg_host **out) {
  sg_host_options o = {sizeof o, NULL, -1, NULL, NULL, NULL, NULL};
  if (!loop || !out) return SG_EINVAL;
  if (opts) memcpy(&o, opts, opts->size < sizeof o ? opts->size : sizeof o);
  sg_host *h = calloc(1, sizeof *h);
  if (!h) return SG_ENOMEM;
  h->env.loop = loop;
  h->env.handler_ref = LUA_NOREF;
  h->env.log.level = o.log_level >= 0 ? o.log_level : SG_LOG_INFO;
  h->env.log.cb = o.log_cb;
  h->env.log.data = o.log_data;
  h->error_cb = o.error_cb;
  h->env.on_error = on_lua_error;
  h->env.add_backend = sg__host_add_backend;
  h->env.remove_backend = remove_backend;
  h->error_data = o.error_data;
  uv_idle_init(loop, &h->reaper);
  h->reaper.data = h;
  uv_timer_init(loop, &h->hold);
  h->hold.data = h;
  h->env.store_settled = store_settled;
  int rc = open_lua(h);
  if (rc != 0) {
    h->env.closing = 1;
    sg_host_close(h, NULL, NULL);
    return rc;
  }
  /* Options given in C win over the config's. */
  if (o.data_dir || o.log_level >= 0) {
    const char *argv[2] = {o.data_dir ? o.data_dir : "",
                           o.log_level >= 0 ? sg__log_level_name(o.log_level) : ""};
    rc = sg__host_call_boot(h, "set_overrides", argv, 2);
    if (rc != 0) {
      h->env.closing = 1;
      sg_host_close(h, NULL, NULL);
      return rc;
    }
  }
  *out = h;
  return 0;
}

void *sg_host_get_data(const sg_host *h) { return h->data; }
void sg_host_set_data(sg_host *h, void *data) { h->data = data; }
uv_loop_t *sg_host_loop(const sg_host *h) { return h->env.loop; }
const char *sg_host_last_error(const sg_host *h) { return h->last_error; }

/* Pushes require(module)[field]; 0, or SG_ELUA (logged). */
static int push_module_field(sg_host *h, const char *module, const char *field) {
  lua_State *L = h->env.L;
  lua_getglobal(L, "require");
  lua_pushstring(L, module);
  if (sg__lenv_pcall(&h->env, 1, 1, module) != 0) return SG_ELUA;
  lua_getfield(L, -1, field);
  lua_remove(L, -2);
  return 0;
}

static void push_strings(lua_State *L, const char *const *argv, int argc) {
  luaL_checkstack(L, argc + 8, "arguments");
  for (int i = 0; i < argc; i++) lua_pushstring(L, argv[i]);
}

/* Calls segue.boot.<fn>(args...) which returns true or nil, err. */
static int boot_call(sg_host *h, const char *fn, int nargs) {
  lua_State *L = h->env.L;
  if (h->env.closing) {
    lua_pop(L, nargs);
    return SG_ECLOSING;
  }
  if (push_module_field(h, "segue.boot", fn) != 0) {
    lua_pop(L, nargs);
    return SG_ELUA;
  }
  lua_insert(L, -1 - nargs);
  char what[64];
  snprintf(what, sizeof what, "segue.boot.%s", fn);
  if (sg__lenv_pcall(&h->env, nargs, 2, what) != 0) return SG_ELUA;
  int ok = lua_toboolean(L, -2);
  snprintf(h->last_error, sizeof h->last_error, "%s", ok ? "" : luaL_optstring(L, -1, "failed"));
  lua_pop(L, 2);
  return ok ? 0 : SG_ECONFIG;
}

int sg__host_call_boot(sg_host *h, const char *fn, const char *const *argv, int argc) {
  push_strings(h->env.L, argv, argc);
  return boot_call(h, fn, argc);
}

int sg__host_cli(sg_host *h, const char *const *argv, int argc) {
  lua_State *L = h->env.L;
  if (argc < 1) return -1;
  if (push_module_field(h, "segue.cli", "run") != 0) return 1;
  push_strings(L, argv, argc);
  char what[64];
  snprintf(what, sizeof what, "segue %s", argv[0]);
  if (sg__lenv_pcall(&h->env, argc, 1, what) != 0) return 1;
  int code = lua_isnil(L, -1) ? -1 : (int)lua_tointeger(L, -1);
  lua_pop(L, 1);
  return code;
}

int sg__host_exit_code(sg_host *h) {
  if (push_module_field(h, "segue.boot", "exit_code") != 0) return 1;
  int code = (int)lua_tointeger(h->env.L, -1);
  lua_pop(h->env.L, 1);
  return code;
}

int sg_host_load_config_file(sg_host *h, const char *path) {
  if (!path) return SG_EINVAL;
  lua_pushstring(h->env.L, path);
  return boot_call(h, "load_config_file", 1);
}

int sg_host_load_config_string(sg_host *h, const char *chunkname, const char *src, size_t len) {
  if (!src) return SG_EINVAL;
  lua_pushstring(h->env.L, chunkname ? chunkname : "config");
  lua_pushlstring(h->env.L, src, len);
  return boot_call(h, "load_config_string", 2);
}

int sg_host_load_script(sg_host *h, const char *path) {
  if (!path) return SG_EINVAL;
  lua_pushstring(h->env.L, path);
  return boot_call(h, "load_script", 1);
}

/* C backends are not in the config, so segue.boot does not know them: they
 * start here, after the scripts that will receive their updates. */
int sg_host_start(sg_host *h) {
  int rc = boot_call(h, "start", 0);
  if (rc != 0) return rc;
  h->started = 1;
  for (sg__backend *b = h->env.backends; b; b = b->next)
    if (b->tp == &sg__c_transport && b->state == SG_BACKEND_STOPPED && !b->stop_for_good)
      sg__backend_start(b);
  return 0;
}

int sg_host_reload(sg_host *h) { return boot_call(h, "reload", 0); }

static void backend_stopped(sg__backend *b) {
  sg_host *h = b->data;
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
  if (sg__host_push_handler(h, "stopping") == 0) sg__lenv_pcall(&h->env, 1, 0, "stopping handler");
  for (sg__backend *b = h->env.backends; b; b = b->next) {
    h->stops_pending++;
    sg__backend_stop(b, backend_stopped);
  }
  backend_stopped(&(sg__backend){.data = h});
  return 0;
}

/* ---- backends ---------------------------------------------------------- */

static void on_update(sg__backend *b, const cJSON *update) {
  sg_host *h = b->data;
  if (sg__host_push_handler(h, "update") != 0) return;
  lua_pushstring(h->env.L, b->name);
  char err[256];
  if (sg__lua_push_json_protected(h->env.L, update, err, sizeof err) != 0) {
    lua_pop(h->env.L, 3);
    sg__backend_log(b, SG_LOG_ERROR, "update dropped: %s", err);
    return;
  }
  sg__lenv_pcall(&h->env, 3, 0, "update handler");
}

static void on_state(sg__backend *b, sg__backend_state s, const char *reason) {
  sg_host *h = b->data;
  if (h->env.closing || sg__host_push_handler(h, "backend") != 0) return;
  lua_pushstring(h->env.L, b->name);
  lua_pushstring(h->env.L, sg__backend_state_name(s));
  if (reason) lua_pushstring(h->env.L, reason);
  else lua_pushnil(h->env.L);
  sg__lenv_pcall(&h->env, 4, 0, "backend state handler");
}

static void maybe_free_host(sg_host *h);

static void on_closed(sg__backend *b) {
  sg_host *h = b->data;
  free(b);
  h->backends_open--;
  if (h->env.closing) maybe_free_host(h);
}

/* The backend's timer data is the backend. */
static void free_unattached(uv_handle_t *timer) { free(timer->data); }

static const sg__backend_events host_events = {on_update, on_state, on_closed};

int sg__host_add_backend(sg__lenv *e, const char *name, const sg__transport *tp,
                         const sg__backend_config *cfg,
                         int (*attach)(sg__backend *b, const void *arg),
                         const void *attach_arg, sg__backend **out) {
  sg_host *h = (sg_host *)e;
  if (e->closing) return SG_ECLOSING;
  if (sg__lenv_find_backend(e, name)) return SG_EEXIST;
  sg__backend *b = calloc(1, sizeof *b);
  if (!b) return SG_ENOMEM;
  int rc = sg__backend_init(e->loop, b, name, tp, cfg, &host_events, &e->log);
  if (rc != 0) {
    free(b);
    return rc;
  }
  b->data = h;
  if (attach && (rc = attach(b, attach_arg)) != 0) {
    free(b->name);
    /* uv finishes closes last-asked first: the one that frees goes first. */
    uv_close((uv_handle_t *)&b->timer, free_unattached);
    uv_close((uv_handle_t *)&b->kick, NULL);
    return rc;
  }
  b->next = e->backends;
  e->backends = b;
  h->backends_open++;
  if (out) *out = b;
  return 0;
}

static void remove_backend(sg__lenv *e, sg__backend *b) {
  for (sg__backend **p = &e->backends; *p; p = &(*p)->next) {
    if (*p == b) {
      *p = b->next;
      break;
    }
  }
  sg__backend_close(b);
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
  if (h->env.closing) return SG_ECLOSING;
  sg__backend *b = sg__lenv_find_backend(&h->env, name);
  if (!b) return SG_ENOBACKEND;
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
  int rc = sg__backend_request(b, body, c_request_done, r, err, sizeof err);
  cJSON_Delete(body);
  if (rc != 0) {
    sg__log(&h->env.log, SG_LOG_WARN, "backend", name, "request refused: %s", err);
    free(r);
  }
  return rc;
}

/* ---- close ------------------------------------------------------------- */

static void reaper_closed(uv_handle_t *handle) {
  sg_host *h = handle->data;
  void (*cb)(void *) = h->close_cb;
  void *data = h->close_data;
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

/* The Lua state cannot close under a script that runs the loop itself
 * (segue.loop.run, for `segue exec`): segue.loop.run raises "the host is
 * closing" as soon as its turn ends, and the state closes on the first loop
 * turn after the script let go. */
static void retry_free(uv_idle_t *idle) {
  sg_host *h = idle->data;
  if (h->env.loop_depth > 0) return;
  uv_idle_stop(idle);
  maybe_free_host(h);
}

/* ---- a clean stop keeps what was written -------------------------------
 * Closing L closes the stores (their __gc), and a store drops the calls it
 * has not answered yet: on PostgreSQL, the writes still queued or running
 * (the rules' state written as the lease is released, the id map of a copy
 * sent just before the stop). So L's close waits until every store call
 * made before it was answered (env.store_ops, counted by segue.store), or
 * until HOLD_MS passed (a store that does not answer: the server is down);
 * then what is left is dropped, and the log says how many. Lua runs on in
 * the meantime: the answers reach their callbacks and coroutines. */
#define HOLD_MS 5000

static void hold_check(uv_timer_t *t) {
  sg_host *h = t->data;
  uint64_t now = uv_now(h->env.loop);
  if (h->env.store_ops > 0 && now < h->hold_until) {
    uv_timer_start(t, hold_check, h->hold_until - now, 0);
    return;
  }
  if (h->env.store_ops > 0)
    sg__log(&h->env.log, SG_LOG_WARN, NULL, NULL,
            "closing: %u store operation(s) still not answered after %d s: not waiting longer",
            h->env.store_ops, HOLD_MS / 1000);
  h->hold_state = 2;
  maybe_free_host(h);
}

/* The count fell to 0, inside a store callback: L closes on a later turn. */
static void store_settled(sg__lenv *e) {
  sg_host *h = (sg_host *)e;
  if (h->hold_state == 1 && uv_is_active((uv_handle_t *)&h->hold))
    uv_timer_start(&h->hold, hold_check, 0, 0);
}

/* The reaper starts once the hold timer closed: uv runs a turn's close
 * callbacks last-asked first, so closing both in one turn would free the
 * host before the timer's close finished. */
static void hold_closed(uv_handle_t *t) {
  sg_host *h = t->data;
  uv_idle_start(&h->reaper, reap);
}

static void maybe_free_host(sg_host *h) {
  if (h->backends_open > 0 || uv_is_active((uv_handle_t *)&h->reaper) ||
      uv_is_closing((uv_handle_t *)&h->reaper) || uv_is_active((uv_handle_t *)&h->hold) ||
      uv_is_closing((uv_handle_t *)&h->hold))
    return;
  if (h->env.loop_depth > 0) {
    uv_idle_start(&h->reaper, retry_free);
    return;
  }
  if (h->env.L && h->env.store_ops > 0 && h->hold_state == 0) {
    h->hold_state = 1;
    h->hold_until = uv_now(h->env.loop) + HOLD_MS;
    uv_timer_start(&h->hold, hold_check, HOLD_MS, 0);
    return;
  }
  if (h->env.L) {
    if (interrupt_host == h) interrupt_host = NULL;
    /* Lua objects (timers, watchers, stores) close their handles from __gc. */
    lua_close(h->env.L);
    h->env.L = NULL;
  }
  uv_close((uv_handle_t *)&h->hold, hold_closed);
}

void sg_host_close(sg_host *h, void (*cb)(void *data), void *data) {
  if (h->close_cb || (h->env.closing && h->env.L == NULL &&
                      (uv_is_closing((uv_handle_t *)&h->reaper) || uv_is_closing((uv_handle_t *)&h->hold))))
    return;
  h->env.closing = 1;
  h->close_cb = cb;
  h->close_data = data;
  if (h->env.L && sg__host_push_handler(h, "closing") == 0) sg__lenv_pcall(&h->env, 1, 0, "closing handler");
  while (h->env.backends) {
    sg__backend *b = h->env.backends;
    h->env.backends = b->next;
    sg__backend_close(b);
  }
  maybe_free_host(h);
}
