/* The Lua modules implemented in C. The host registers each in
 * package.preload under its name, so `require "segue.json"` works in the
 * host, in `segue exec` scripts and in busted specs alike. */
#ifndef SEGUE_BINDINGS_H
#define SEGUE_BINDINGS_H
#include <lua.h>
#include <lauxlib.h>
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
};

void sg__lenv_set(lua_State *L, sg__lenv *e);
/* The environment of L, or NULL when L has no owner (plain `lua`). */
sg__lenv *sg__lenv_of(lua_State *L);
/* The environment of L; raises when there is none or it is closing. */
sg__lenv *sg__lenv_check(lua_State *L);
sg__backend *sg__lenv_find_backend(sg__lenv *e, const char *name);

/* Calls the function below `nargs` arguments on e->L's stack in protected
 * mode with a traceback; on error reports it (with `what`), leaves nothing
 * and returns SG_ELUA; else leaves `nres` results and returns 0. Every call
 * from C into Lua goes through here. */
int sg__lenv_pcall(sg__lenv *e, int nargs, int nres, const char *what);
/* Logs an error no Lua caller can receive and tells the owner. */
void sg__lenv_report(sg__lenv *e, int err, const char *message);

/* ---- the failure convention (docs/design.md) ------------------------------
 * A fallible Lua function returns its results, or fail, "ENAME: message",
 * "ENAME" with the SG_E* (or UV_E*) name; misuse (a wrong argument type) raises. */
int sg__lua_fail(lua_State *L, int err, const char *msg);
/* 0 -> true; else sg__lua_fail(L, err, NULL). */
int sg__lua_result(lua_State *L, int err);

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

#endif
