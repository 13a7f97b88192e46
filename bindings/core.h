/* segue.core is one Lua module written in four files by subject:
 * lua_core.c (logging, events, embedded scripts, the module table),
 * core_backends.c (backends, requests, the Lua transport), core_stdio.c
 * (this process as a standalone backend on stdin/stdout) and core_route.c
 * (the router's hot path). */
#ifndef SEGUE_CORE_H
#define SEGUE_CORE_H
#include "bindings.h"

/* Reads limits and time-outs from the table at idx (keys as in the config). */
void sg__core_check_backend_config(lua_State *L, int idx, sg__backend_config *c);
void sg__core_open_backends(lua_State *L);  /* adds its functions to the table on top */
void sg__core_open_stdio(lua_State *L);
void sg__core_open_route(lua_State *L);   /* the router's hot path (core_route.c) */

#endif
