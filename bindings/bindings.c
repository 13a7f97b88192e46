/* The C Lua modules, registered in package.preload by the host. */
#include "bindings.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- the owner's environment ---------------------------------------------- */

static const char lenv_key = 'e';

/* ---- the count hook: instruction limits and interrupts --------------------
 * In Lua 5.4 any count hook, whatever its period, makes the VM trap every
 * instruction of the thread it is set on (luaG_traceexec), so it is set
 * only where it is needed: on the running thread while a sandbox's
 * instruction limit or an interrupt is in force (sync_hook, called where
 * Lua starts or goes on running: sg__lenv_pcall, sg__lenv_resume,
 * coroutine.resume/wrap, sandbox_enter/leave). e->running names that
 * thread, so an interrupt (a signal handler: lua_sethook may be called
 * asynchronously) sets the hook on it and its next instruction traps; a
 * thread left with a hook nobody needs removes it at its next tick.
 *
 * The hook, every SG_LENV_HOOK_PERIOD instructions: an interrupt, then the
 * sandbox's instruction limit. Raises only in Lua functions. Once tripped,
 * it raises again on every tick, so a pcall that catches the error gains
 * nothing. An interrupt is raised only once SG_LENV_INTERRUPT_GRACE_MS
 * passed since the hook first saw it: a callback that ends by itself
 * meanwhile (a message being routed) is not cut in the middle, and the
 * loop then stops segue; Lua that loops on is stopped after the grace. */
static void count_hook(lua_State *L, lua_Debug *ar);

/* The interrupt has waited its grace (the first call starts it). */
static int interrupt_due(sg__lenv *e) {
  uint64_t now = uv_hrtime();
  if (!e->interrupt_seen) e->interrupt_seen = now;
  return now - e->interrupt_seen >= (uint64_t)SG_LENV_INTERRUPT_GRACE_MS * 1000000u;
}

static void set_count_hook(lua_State *L, int count) {
  if (lua_gethook(L) != count_hook || lua_gethookcount(L) != count)
    lua_sethook(L, count_hook, LUA_MASKCOUNT, count);
}

/* L's hook as e asks now (L runs Lua, or is about to). Removing it is
 * checked again after: a signal between the check and the removal must
 * not be lost. */
static void sync_hook(sg__lenv *e, lua_State *L) {
  if (e->interrupted) {
    set_count_hook(L, interrupt_due(e) ? 1 : SG_LENV_HOOK_PERIOD);
  } else if (e->instr_limit) {
    if (lua_gethook(L) != count_hook) lua_sethook(L, count_hook, LUA_MASKCOUNT, SG_LENV_HOOK_PERIOD);
  } else if (lua_gethook(L) == count_hook) {
    lua_sethook(L, NULL, 0, 0);
    /* Unconditionally: a signal's lua_sethook can land between the fields
     * the removal writes, leaving count_hook set but masked off. */
    if (e->interrupted) lua_sethook(L, count_hook, LUA_MASKCOUNT, 1);
  }
}

static void count_hook(lua_State *L, lua_Debug *ar) {
  sg__lenv *e = *(sg__lenv **)lua_getextraspace(L);
  if (!e) {
    lua_sethook(L, NULL, 0, 0);
    return;
  }
  if (e->interrupted && interrupt_due(e)) {
    /* Every instruction from now on: the code around a pcall that caught
     * it is interrupted too, not only the loop inside. */
    set_count_hook(L, 1);
    luaL_error(L, "interrupted by signal %d", (int)e->interrupted);
  }
  if (e->interrupted && lua_gethookcount(L) != SG_LENV_HOOK_PERIOD) {  /* in its grace */
    lua_sethook(L, count_hook, LUA_MASKCOUNT, SG_LENV_HOOK_PERIOD);
    return;
  }
  if (e->instr_limit == 0) {  /* nothing asks for it any more */
    sync_hook(e, L);
    return;
  }
  if (lua_gethookcount(L) != SG_LENV_HOOK_PERIOD) {  /* back from an interrupt */
    lua_sethook(L, count_hook, LUA_MASKCOUNT, SG_LENV_HOOK_PERIOD);
    return;
  }
  e->instr_count += SG_LENV_HOOK_PERIOD;
  if (e->instr_count <= e->instr_limit) return;
  if (!e->tripped[0] || e->tripped[0] == '?') {
    const char *what = e->tripped[0] == '?' ? e->tripped + 1 : "Lua code";
    char where[160] = "";
    if (lua_getinfo(L, "Sl", ar) && ar->currentline > 0)
      snprintf(where, sizeof where, "%s:%d: ", ar->short_src, ar->currentline);
    char msg[sizeof e->tripped];
    snprintf(msg, sizeof msg, "%s%s stopped after %llu instructions", where, what,
             (unsigned long long)e->instr_limit);
    memcpy(e->tripped, msg, sizeof msg);
  }
  luaL_error(L, "%s", e->tripped);
}

void sg__lenv_interrupt(sg__lenv *e, int signum) {
  e->interrupted = signum;
  lua_State *L = e->running;
  if (L) lua_sethook(L, count_hook, LUA_MASKCOUNT, 1);
}

void sg__lenv_sync_hook(lua_State *L) {
  sg__lenv *e = *(sg__lenv **)lua_getextraspace(L);
  if (e) sync_hook(e, L);
}

lua_State *sg__lenv_wait_begin(sg__lenv *e) {
  lua_State *L = e->running;
  e->running = NULL;
  return L;
}

void sg__lenv_wait_end(sg__lenv *e, lua_State *L) {
  e->running = L;
  if (L) sync_hook(e, L);
}

/* L runs Lua from now on (after `prev`, which it returns). */
static lua_State *run_on(sg__lenv *e, lua_State *L) {
  lua_State *prev = e->running;
  e->running = L;
  sync_hook(e, L);
  return prev;
}

/* Back on `prev` (NULL: back in C). */
static void back_to(sg__lenv *e, lua_State *prev) {
  e->running = prev;
  if (prev) sync_hook(e, prev);
}

/* coroutine.resume and coroutine.wrap as Lua's own, but keeping e->running
 * (a coroutine resumed from Lua is otherwise invisible to C). Resumes co
 * with the narg values on top of L; moves its results, or its error, to L:
 * returns the number of results, or -1 on an error. */
/* co as coroutine.status sees it from L. */
typedef enum { CO_RUNNING, CO_SUSPENDED, CO_NORMAL, CO_DEAD } co_state;
static const char *const co_state_names[] = {"running", "suspended", "normal", "dead"};

static co_state co_status(lua_State *L, lua_State *co) {
  lua_Debug ar;
  if (co == L) return CO_RUNNING;
  switch (lua_status(co)) {
    case LUA_YIELD: return CO_SUSPENDED;
    case LUA_OK:
      if (lua_getstack(co, 0, &ar)) return CO_NORMAL;  /* it resumed another */
      return lua_gettop(co) == 0 ? CO_DEAD : CO_SUSPENDED;
    default: return CO_DEAD;  /* an error */
  }
}

static int resume_from_lua(lua_State *L, lua_State *co, int narg) {
  const char *why = NULL;
  co_state st = co_status(L, co);
  if (st == CO_DEAD) why = "cannot resume dead coroutine";
  else if (st != CO_SUSPENDED) why = "cannot resume non-suspended coroutine";
  else if (!lua_checkstack(co, narg)) why = "too many arguments to resume";
  if (why) {
    lua_pushstring(L, why);
    return -1;
  }
  lua_xmove(L, co, narg);
  sg__lenv *e = *(sg__lenv **)lua_getextraspace(L);
  if (e) run_on(e, co);
  int nres = 0;
  int status = lua_resume(co, L, narg, &nres);
  if (e) back_to(e, L);  /* the caller goes on */
  if (status == LUA_OK || status == LUA_YIELD) {
    if (!lua_checkstack(L, nres + 1)) {
      lua_pop(co, nres);
      lua_pushliteral(L, "too many results to resume");
      return -1;
    }
    lua_xmove(co, L, nres);
    return nres;
  }
  lua_xmove(co, L, 1);  /* the error */
  return -1;
}

static int co_resume(lua_State *L) {
  lua_State *co = lua_tothread(L, 1);
  luaL_argexpected(L, co, 1, "coroutine");
  int r = resume_from_lua(L, co, lua_gettop(L) - 1);
  lua_pushboolean(L, r >= 0);
  lua_insert(L, r >= 0 ? -r - 1 : -2);
  return r >= 0 ? r + 1 : 2;
}

/* Closes co (its pending to-be-closed variables run on it: tracked as
 * running, so a signal or the instruction limit reaches them). */
#if LUA_VERSION_RELEASE_NUM >= 50406
#define reset_thread(co, from) lua_closethread(co, from)
#else
#define reset_thread(co, from) lua_resetthread(co)
#endif
static int close_thread(lua_State *L, lua_State *co) {
  sg__lenv *e = *(sg__lenv **)lua_getextraspace(L);
  if (e) run_on(e, co);
  int status = reset_thread(co, L);
  if (e) back_to(e, L);
  return status;
}

/* coroutine.close as Lua's own, through close_thread. */
static int co_close(lua_State *L) {
  lua_State *co = lua_tothread(L, 1);
  luaL_argexpected(L, co, 1, "coroutine");
  co_state st = co_status(L, co);
  if (st == CO_RUNNING || st == CO_NORMAL)
    return luaL_error(L, "cannot close a %s coroutine", co_state_names[st]);
  if (close_thread(L, co) == LUA_OK) {
    lua_pushboolean(L, 1);
    return 1;
  }
  lua_pushboolean(L, 0);
  lua_xmove(co, L, 1);  /* the error */
  return 2;
}

static int co_wrapped(lua_State *L) {
  lua_State *co = lua_tothread(L, lua_upvalueindex(1));
  int r = resume_from_lua(L, co, lua_gettop(L));
  if (r >= 0) return r;
  int status = lua_status(co);
  if (status != LUA_OK && status != LUA_YIELD) {  /* it died: close what it left open */
    status = close_thread(L, co);
    lua_xmove(co, L, 1);
  }
  if (status != LUA_ERRMEM && lua_type(L, -1) == LUA_TSTRING) {  /* where, as Lua's wrap */
    luaL_where(L, 1);
    lua_insert(L, -2);
    lua_concat(L, 2);
  }
  return lua_error(L);
}

static int co_wrap(lua_State *L) {
  luaL_checktype(L, 1, LUA_TFUNCTION);
  lua_State *co = lua_newthread(L);
  lua_pushvalue(L, 1);
  lua_xmove(L, co, 1);
  lua_pushcclosure(L, co_wrapped, 1);
  return 1;
}

void sg__lenv_set(lua_State *L, sg__lenv *e) {
  lua_pushlightuserdata(L, e);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &lenv_key);
  *(sg__lenv **)lua_getextraspace(L) = e;
  if (lua_getglobal(L, "coroutine") == LUA_TTABLE) {
    static const luaL_Reg co_fns[] = {
        {"resume", co_resume}, {"wrap", co_wrap}, {"close", co_close}, {NULL, NULL}};
    luaL_setfuncs(L, co_fns, 0);
  }
  lua_pop(L, 1);
}

sg__lenv *sg__lenv_of(lua_State *L) {
  lua_rawgetp(L, LUA_REGISTRYINDEX, &lenv_key);
  sg__lenv *e = lua_touserdata(L, -1);
  lua_pop(L, 1);
  return e;
}

sg__lenv *sg__lenv_check(lua_State *L) {
  sg__lenv *e = sg__lenv_of(L);
  if (!e) luaL_error(L, "this needs the segue host (run under `segue`)");
  return e;
}

sg__backend *sg__lenv_find_backend(sg__lenv *e, const char *name) {
  for (sg__backend *b = e->backends; b; b = b->next)
    if (strcmp(b->name, name) == 0) return b;
  return NULL;
}

static int traceback(lua_State *L) {
  const char *msg = lua_tostring(L, 1);
  if (!msg) msg = lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, 1));
  luaL_traceback(L, L, msg, 1);
  return 1;
}

void sg__lenv_report(sg__lenv *e, int err, const char *message) {
  sg__log(&e->log, SG_LOG_ERROR, NULL, NULL, "%s", message);
  if (e->on_error) e->on_error(e, err, message);
}

/* Back in C from the outermost call: nothing of a sandbox or an interrupt
 * may outlive it (an error can skip segue.core.sandbox_leave). */
static void outermost_returned(sg__lenv *e) {
  if (e->sandbox_depth) {
    e->sandbox_depth = 0;
    e->mem_limit = e->max_string = e->max_subject = 0;
    e->instr_count = e->instr_limit = 0;
    e->tripped[0] = '\0';
    e->mem_exceeded = 0;
  }
  e->interrupted = 0;
  e->interrupt_seen = 0;
  e->running = NULL;
}

int sg__lenv_pcall_raw(sg__lenv *e, int nargs, int nres) {
  if (e->busy == 0) outermost_returned(e);
  e->busy++;
  lua_State *prev = run_on(e, e->L);
  int rc = lua_pcall(e->L, nargs, nres, 0);
  if (--e->busy == 0) outermost_returned(e);
  else back_to(e, prev);
  return rc;
}

int sg__lenv_pcall(sg__lenv *e, int nargs, int nres, const char *what) {
  lua_State *L = e->L;
  if (e->busy == 0) outermost_returned(e);  /* a signal that came too late */
  int base = lua_gettop(L) - nargs;
  lua_pushcfunction(L, traceback);
  lua_insert(L, base);
  e->busy++;
  lua_State *prev = run_on(e, L);
  int rc = lua_pcall(L, nargs, nres, base);
  if (--e->busy == 0) outermost_returned(e);
  else back_to(e, prev);
  lua_remove(L, base);
  if (rc == LUA_OK) return 0;
  char buf[4096];
  snprintf(buf, sizeof buf, "%s: %s", what, lua_tostring(L, -1));
  lua_pop(L, 1);
  sg__lenv_report(e, SG_ELUA, buf);
  return SG_ELUA;
}

int sg__lenv_resume(sg__lenv *e, int nargs) {
  lua_State *L = e->L;
  lua_State *co = lua_tothread(L, -1 - nargs);
  lua_xmove(L, co, nargs);
  int nres = 0, err = 0;
  if (e->busy == 0) outermost_returned(e);
  e->busy++;  /* Lua runs: a signal interrupts it, a sandbox ends with it */
  lua_State *prev = run_on(e, co);
  int rc = lua_resume(co, L, nargs, &nres);
  if (--e->busy == 0) outermost_returned(e);
  else back_to(e, prev);
  if (rc == LUA_OK || rc == LUA_YIELD) {
    lua_pop(co, nres);
  } else {
    luaL_traceback(L, co, lua_tostring(co, -1), 0);
    sg__lenv_report(e, SG_ELUA, lua_tostring(L, -1));
    lua_pop(L, 1);
    err = SG_ELUA;
  }
  lua_pop(L, 1);  /* the thread, anchored on L while it ran */
  return err;
}

/* ---- the life of C memory behind a userdata ------------------------------- */

void sg__lown_init(sg__lown *o, sg__lenv *e) {
  memset(o, 0, sizeof *o);
  o->e = e;
  o->self_ref = LUA_NOREF;
  for (int i = 0; i < SG__LOWN_REFS; i++) o->refs[i] = LUA_NOREF;
}

void sg__lown_ref(lua_State *L, sg__lown *o, int slot, int idx) {
  lua_pushvalue(L, idx);
  luaL_unref(L, LUA_REGISTRYINDEX, o->refs[slot]);
  o->refs[slot] = luaL_ref(L, LUA_REGISTRYINDEX);
}

void sg__lown_push(lua_State *L, const sg__lown *o, int slot) {
  lua_rawgeti(L, LUA_REGISTRYINDEX, o->refs[slot]);
}

void sg__lown_pin(lua_State *L, sg__lown *o, int idx) {
  lua_pushvalue(L, idx);
  luaL_unref(L, LUA_REGISTRYINDEX, o->self_ref);
  o->self_ref = luaL_ref(L, LUA_REGISTRYINDEX);
}

int sg__lown_close(sg__lown *o) {
  if (o->closed) return 0;
  o->closed = 1;
  lua_State *L = o->e->L;
  if (L && !o->lua_gone) {
    for (int i = 0; i < SG__LOWN_REFS; i++) luaL_unref(L, LUA_REGISTRYINDEX, o->refs[i]);
    luaL_unref(L, LUA_REGISTRYINDEX, o->self_ref);
  }
  for (int i = 0; i < SG__LOWN_REFS; i++) o->refs[i] = LUA_NOREF;
  o->self_ref = LUA_NOREF;
  return 1;
}

void sg__lown_c_done(sg__lown *o) {
  o->c_gone = 1;
  if (o->lua_gone) free(o);
}

int sg__lown_gc(sg__lown *o) {
  o->lua_gone = 1;
  if (sg__lown_close(o)) return 1;
  if (o->c_gone) free(o);
  return 0;
}

void *sg__lown_new(lua_State *L, sg__lenv *e, const char *mt, size_t size) {
  void **ud = lua_newuserdatauv(L, sizeof *ud, 0);
  *ud = NULL;
  luaL_setmetatable(L, mt);
  sg__lown *o = calloc(1, size);
  if (!o) luaL_error(L, "out of memory");
  sg__lown_init(o, e);
  *ud = o;
  return o;
}

void *sg__lown_get(lua_State *L, int idx, const char *mt) {
  return *(void **)luaL_checkudata(L, idx, mt);
}

void *sg__lown_take(lua_State *L, int idx, const char *mt) {
  void **ud = luaL_checkudata(L, idx, mt);
  void *o = *ud;
  *ud = NULL;
  return o;
}

void sg__lown_discard(lua_State *L, int idx, sg__lown *o) {
  void **ud = lua_touserdata(L, idx);
  if (ud && *ud == o) *ud = NULL;
  free(o);
}

/* ---- bounded string functions ------------------------------------------------
 * Each wrapper checks its bound, then runs the original C function on the
 * same stack frame (upvalue 1 is the original, upvalue 2 the environment). */

static int bound_fail(lua_State *L, const char *fn, const char *what, size_t n, size_t max) {
  return luaL_error(L, "string.%s: %s of %I bytes is over the sandbox's limit of %I bytes", fn, what,
                    (lua_Integer)n, (lua_Integer)max);
}

static int bounded_rep(lua_State *L) {
  sg__lenv *e = lua_touserdata(L, lua_upvalueindex(2));
  if (e->max_string) {
    size_t len, seplen = 0;
    luaL_checklstring(L, 1, &len);
    lua_Integer n = luaL_checkinteger(L, 2);
    luaL_optlstring(L, 3, "", &seplen);
    if (n > 0) {
      /* (len + seplen) * n, saturating: compared with a bound far below */
      double total = ((double)len + (double)seplen) * (double)n;
      if (total > (double)e->max_string)
        return bound_fail(L, "rep", "a result", total > 1e18 ? (size_t)1e18 : (size_t)total,
                          e->max_string);
    }
  }
  return lua_tocfunction(L, lua_upvalueindex(1))(L);
}

static int bounded_pattern(lua_State *L) {
  sg__lenv *e = lua_touserdata(L, lua_upvalueindex(2));
  if (e->max_subject) {
    size_t len;
    luaL_checklstring(L, 1, &len);
    /* string.find(s, p, init, true) matches plainly: no pattern to bound */
    const char *fn = lua_tostring(L, lua_upvalueindex(3));
    int plain = fn[0] == 'f' && lua_toboolean(L, 4);
    if (len > e->max_subject && !plain) return bound_fail(L, fn, "a subject", len, e->max_subject);
  }
  return lua_tocfunction(L, lua_upvalueindex(1))(L);
}

void sg__lenv_bound_strings(lua_State *L, sg__lenv *e) {
  static const char *const patterns[] = {"find", "match", "gmatch", "gsub", NULL};
  lua_getglobal(L, "string");
  if (!lua_istable(L, -1)) {
    lua_pop(L, 1);
    return;
  }
  lua_getfield(L, -1, "rep");
  lua_pushlightuserdata(L, e);
  lua_pushcclosure(L, bounded_rep, 2);
  lua_setfield(L, -2, "rep");
  for (const char *const *p = patterns; *p; p++) {
    lua_getfield(L, -1, *p);
    lua_pushlightuserdata(L, e);
    lua_pushstring(L, *p);
    lua_pushcclosure(L, bounded_pattern, 3);
    lua_setfield(L, -2, *p);
  }
  lua_pop(L, 1);
}

/* ---- the failure convention ----------------------------------------------- */

int sg__lua_fail(lua_State *L, int err, const char *msg) {
  luaL_pushfail(L);
  lua_pushfstring(L, "%s: %s", sg_err_name(err), msg && *msg ? msg : sg_strerror(err));
  lua_pushstring(L, sg_err_name(err));
  return 3;
}

int sg__lua_result(lua_State *L, int err) {
  if (err) return sg__lua_fail(L, err, NULL);
  lua_pushboolean(L, 1);
  return 1;
}

void sg__lua_class(lua_State *L, const char *name, const luaL_Reg *methods,
                   const luaL_Reg *meta) {
  if (luaL_newmetatable(L, name)) {
    if (methods) {
      lua_newtable(L);
      luaL_setfuncs(L, methods, 0);
      lua_setfield(L, -2, "__index");
    }
    luaL_setfuncs(L, meta, 0);
  }
  lua_pop(L, 1);
}

const sg__binding sg__bindings[] = {
    {"segue.core", luaopen_segue_core},
    {"segue.json", luaopen_segue_json},
    {"segue.loop", luaopen_segue_loop},
    {"segue.fs", luaopen_segue_fs},
    {"segue.harmony_core", luaopen_segue_harmony_core},
    {"segue.federation_core", luaopen_segue_federation_core},
    {"segue.store", luaopen_segue_store},
    {"segue.postbox_core", luaopen_segue_postbox_core},
    {"segue.net", luaopen_segue_net},
    {"segue.crypto", luaopen_segue_crypto},
    {"segue.xml", luaopen_segue_xml},
    {"segue.http_core", luaopen_segue_http_core},
    {NULL, NULL},
};
