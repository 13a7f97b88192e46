/* The Lua modules implemented in C. The host registers each in
 * package.preload under its name, so `require "segue.json"` works in the
 * host, in `segue exec` scripts and in busted specs alike. */
#ifndef SEGUE_BINDINGS_H
#define SEGUE_BINDINGS_H
#include <lua.h>
#include <lauxlib.h>
#include <signal.h>
#include <uv.h>

#include "backend.h"  /* flubber: the backends segue.core manages */
#include "log.h"      /* base */
#include "segue.h"

typedef struct {
  const char *name;
  lua_CFunction open;
} sg__binding;

/* ---- what the bindings need from the owner of the lua_State -------------
 * The owner (the host) fills one sg__lenv, stores it with sg__lenv_set and
 * keeps it alive while L lives. Bindings never see the owner's own struct:
 * this is the whole interface, so the arrow stays host -> bindings. */
typedef struct sg__lenv sg__lenv;
struct sg__lenv {
  lua_State *L;              /* NULL once the state is being closed */
  uv_loop_t *loop;
  sg__logger log;
  int closing;               /* the owner is closing: refuse new work */
  int handler_ref;           /* segue.core.set_handler's function (registry ref) */
  int loop_depth;            /* > 0 while a script runs the loop (segue.loop.run):
                                the owner must not close L until it is back to 0 */
  /* Store calls made and not answered yet, on every store opened through
   * segue.store (whoever made them: scripts, the router, a postbox). The
   * owner holds the close of L while > 0, for a bounded time, so what was
   * written before a stop reaches the store (docs/scaling.md). segue.store
   * calls store_settled (may be NULL) when it falls to 0, from inside a
   * store callback: the owner must not close L from there. */
  unsigned store_ops;
  void (*store_settled)(sg__lenv *e);
  /* Errors no Lua caller can receive: already logged; may be NULL. */
  void (*on_error)(sg__lenv *e, int err, const char *message);
  /* The backends, linked through sg__backend.next; the owner allocates and
   * frees them (add/remove), so it can keep its own data beside each. */
  sg__backend *backends;
  int (*add_backend)(sg__lenv *e, const char *name, const sg__transport *tp,
                     const sg__backend_config *cfg,
                     int (*attach)(sg__backend *b, const void *arg), const void *attach_arg,
                     sg__backend **out);
  void (*remove_backend)(sg__lenv *e, sg__backend *b);
  /* ---- the sandbox of rules and config (docs/hardening.md) ----------------
   * The owner's allocator counts the Lua heap in mem_used and refuses to grow
   * it past mem_limit (0: no limit), setting mem_exceeded. The string
   * functions refuse a string.rep result over max_string and pattern
   * subjects over max_subject (0: no bound). The count hook (bindings.c:
   * on the running thread while a limit or an interrupt is in force, every
   * SG_LENV_HOOK_PERIOD instructions) counts instructions against
   * instr_limit and, once past it, raises `tripped` on every later tick. segue.core.sandbox_enter/leave set these around a run
   * of rules or config; sg__lenv_pcall clears what an error left set when
   * it returns to C. */
  size_t mem_used, mem_limit;
  int mem_exceeded;
  size_t max_string, max_subject;
  uint64_t instr_count, instr_limit;
  char tripped[256];           /* "" or the limit's message */
  int sandbox_depth;
  struct sg__sandbox_frame {
    size_t mem_limit, max_string, max_subject;
    uint64_t instr_count, instr_limit;
    int mem_exceeded;
    char tripped[256];
  } sandbox_saved[8];
  /* Lua calls in progress from C (sg__lenv_pcall), and a signal that asked
   * to interrupt them (sg__lenv_interrupt; the count hook raises it;
   * cleared when the outermost call returns). */
  volatile sig_atomic_t busy, interrupted;
  uint64_t interrupt_seen;      /* uv_hrtime when the hook first saw it, or 0 */
  lua_State *volatile running;  /* the thread running Lua (NULL: none, or C waits) */
};

#define SG_LENV_HOOK_PERIOD 1000
/* How long Lua that a signal interrupts may still run: a callback that
 * ends within it is not cut short (see bindings.c, the count hook). */
#define SG_LENV_INTERRUPT_GRACE_MS 1000

/* Stores e for L and every thread made from it (Lua's extra space), and
 * replaces coroutine.resume and coroutine.wrap by versions that keep
 * e->running (call it after luaL_openlibs). */
void sg__lenv_set(lua_State *L, sg__lenv *e);
/* Asks the Lua running now (e->busy > 0) to stop: sets e->interrupted and
 * the count hook on e->running, which raises "interrupted by signal N"
 * once SG_LENV_INTERRUPT_GRACE_MS passed (a call that returns to C before
 * is not cut short), and again on every later tick until the outermost
 * call returns to C. Safe in a signal handler. */
void sg__lenv_interrupt(sg__lenv *e, int signum);
/* Around C that waits while Lua called it (segue.loop.run): Lua does not
 * run meanwhile, except what the loop calls back (a signal then stops the
 * loop rather than interrupting Lua); begin returns the running thread,
 * which end gets back (and its hook as the limits ask then). */
lua_State *sg__lenv_wait_begin(sg__lenv *e);
void sg__lenv_wait_end(sg__lenv *e, lua_State *L);
/* Sets or removes the count hook of L (the running thread) as its owner's
 * limits ask now: after segue.core.sandbox_enter/leave change them. */
void sg__lenv_sync_hook(lua_State *L);
/* The environment of L, or NULL when L has no owner (plain `lua`). */
sg__lenv *sg__lenv_of(lua_State *L);
/* The environment of L; raises when there is none. Functions that start
 * new work also check e->closing. */
sg__lenv *sg__lenv_check(lua_State *L);
sg__backend *sg__lenv_find_backend(sg__lenv *e, const char *name);

/* Calls the function below `nargs` arguments on e->L's stack in protected
 * mode with a traceback; on error reports it (with `what`), leaves nothing
 * and returns SG_ELUA; else leaves `nres` results and returns 0. Every call
 * from C into Lua goes through here. */
int sg__lenv_pcall(sg__lenv *e, int nargs, int nres, const char *what);
/* Wraps string.rep, find, match, gmatch and gsub of L's string library so
 * they honour e->max_string and e->max_subject (the string metatable shares
 * the table, so method calls are covered too). */
void sg__lenv_bound_strings(lua_State *L, sg__lenv *e);
/* lua_pcall(e->L, nargs, nres, 0) counted as a call from C (so a signal
 * can interrupt it and what a sandbox left set is cleared after it), for C
 * that wants the error itself: it stays on the stack as lua_pcall leaves
 * it. Returns lua_pcall's status. */
int sg__lenv_pcall_raw(sg__lenv *e, int nargs, int nres);
/* Resumes the coroutine on e->L's stack below its `nargs` arguments (which
 * move to it) and pops it; an error that escapes it is reported with its
 * traceback (returns SG_ELUA), as sg__lenv_pcall does for functions. */
int sg__lenv_resume(sg__lenv *e, int nargs);
/* Logs an error no Lua caller can receive and tells the owner. */
void sg__lenv_report(sg__lenv *e, int err, const char *message);

/* ---- the failure convention (docs/design.md) ------------------------------
 * A fallible Lua function returns its results, or fail, "ENAME: message",
 * "ENAME" with the SG_E* (or UV_E*) name; misuse (a wrong argument type) raises. */
int sg__lua_fail(lua_State *L, int err, const char *msg);
/* 0 -> true; else sg__lua_fail(L, err, NULL). */
int sg__lua_result(lua_State *L, int err);

/* ---- the life of C memory behind a Lua userdata --------------------------
 * A handle's userdata holds a pointer to C memory, never the uv handle
 * itself (luv's model), so Lua's GC cannot free memory libuv still uses.
 * That memory starts with an sg__lown and is freed when both owners let go:
 * the C side ended (the uv close callback ran) and the userdata was
 * collected, whichever comes last. Registry references (callbacks, and the
 * userdata itself while the handle is open) are released by sg__lown_close:
 * from Lua, or from the C side's close callback just before sg__lown_c_done
 * (it touches the state only while the state and the userdata live). */
#define SG__LOWN_REFS 4
typedef struct sg__lown {
  sg__lenv *e;
  int self_ref;              /* the userdata, while open (sg__lown_pin) */
  int refs[SG__LOWN_REFS];   /* callbacks; LUA_NOREF when unused */
  unsigned closed : 1;       /* sg__lown_close ran: no more calls into Lua */
  unsigned c_gone : 1, lua_gone : 1;
} sg__lown;

void sg__lown_init(sg__lown *o, sg__lenv *e);
/* refs[slot] = a reference to the value at idx (replacing the old one). */
void sg__lown_ref(lua_State *L, sg__lown *o, int slot, int idx);
/* Pushes refs[slot] (nil when unset). */
void sg__lown_push(lua_State *L, const sg__lown *o, int slot);
/* Keeps the userdata at idx alive until sg__lown_close. */
void sg__lown_pin(lua_State *L, sg__lown *o, int idx);
/* Releases every reference (when the state still lives); returns 0 when it
 * was already closed, 1 when this call closed it (then close the C side). */
int sg__lown_close(sg__lown *o);
/* The C side ended (from its close callback): frees `o` if Lua let go too. */
void sg__lown_c_done(sg__lown *o);
/* From __gc: Lua let go (references are not touched: the state may be
 * closing). Returns 1 when this closed it: the caller closes the C side now
 * and its close callback frees `o`; 0 when it was closed already (`o` is
 * freed here if the C side ended too: do not touch it after). */
int sg__lown_gc(sg__lown *o);
/* Pushes a new userdata of metatable `mt` holding a pointer to `size`
 * zeroed bytes, which start with an sg__lown initialized for e; raises when
 * out of memory. */
void *sg__lown_new(lua_State *L, sg__lenv *e, const char *mt, size_t size);
/* The memory behind the userdata at idx (of metatable mt): NULL after __gc. */
void *sg__lown_get(lua_State *L, int idx, const char *mt);
/* For __gc: the memory behind the userdata at idx, which no longer points
 * to it (NULL when it was taken already). */
void *sg__lown_take(lua_State *L, int idx, const char *mt);
/* The C side never started (its init failed): frees o, which the userdata
 * at idx (from sg__lown_new) no longer points to. */
void sg__lown_discard(lua_State *L, int idx, sg__lown *o);

/* Terminated by {NULL, NULL}. */
extern const sg__binding sg__bindings[];

/* Registers the metatable `name` (once): `methods` (may be NULL) become its
 * __index table, `meta` its metamethods ({"__gc", fn}, ...). Leaves the
 * stack as it was. */
void sg__lua_class(lua_State *L, const char *name, const luaL_Reg *methods,
                   const luaL_Reg *meta);

int luaopen_segue_core(lua_State *L);     /* bindings/lua_core.c */
int luaopen_segue_json(lua_State *L);     /* bindings/lua_json.c */
int luaopen_segue_loop(lua_State *L);     /* bindings/lua_loop.c */
int luaopen_segue_fs(lua_State *L);       /* bindings/lua_fs.c */
int luaopen_segue_harmony_core(lua_State *L);/* bindings/lua_harmony.c */
int luaopen_segue_federation_core(lua_State *L);  /* bindings/lua_federation.c */
int luaopen_segue_store(lua_State *L);    /* bindings/lua_store.c */
int luaopen_segue_postbox_core(lua_State *L);  /* bindings/lua_postbox.c */
int luaopen_segue_net(lua_State *L);      /* bindings/lua_net.c */
int luaopen_segue_crypto(lua_State *L);   /* bindings/lua_crypto.c */
int luaopen_segue_xml(lua_State *L);      /* bindings/lua_xml.c */
int luaopen_segue_http_core(lua_State *L);  /* bindings/lua_http.c */

#endif
