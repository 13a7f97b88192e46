/* The host's internals, shared by the files of runtime/host. The public API
 * is in include/segue.h; what the CLI may call is in cli.h. The host is the
 * only C that sees Lua: it owns the lua_State, gives the bindings their
 * environment (bindings.h: sg__lenv) and owns the backends. */
#ifndef SEGUE_HOST_H
#define SEGUE_HOST_H
#include <lua.h>

#include "backend.h"
#include "bindings.h"
#include "cli.h"
#include "segue.h"

struct sg_host {
  sg__lenv env;             /* first: what the bindings see (loop, log, L, backends) */
  void *data;
  void (*error_cb)(void *data, int err, const char *message);
  void *error_data;
  int started;              /* sg_host_start succeeded: new C backends start at once */
  unsigned backends_open;   /* added and not yet freed */
  void (*close_cb)(void *data);
  void *close_data;
  void (*stop_cb)(sg_host *host);
  unsigned stops_pending;
  uv_idle_t reaper;         /* frees the host after its last handle closed */
  uv_timer_t hold;          /* holds the close of L for store calls (maybe_free_host) */
  uint64_t hold_until;      /* its deadline (loop time) */
  int hold_state;           /* 0: not yet, 1: holding, 2: done */
  char last_error[1024];    /* the message of the last failed boot call */
};

/* Adds a backend named `name` with transport `tp` (transport_data set by
 * `attach(b, attach_arg)` if given). SG_EEXIST if the name is taken. */
int sg__host_add_backend(sg__lenv *e, const char *name, const sg__transport *tp,
                         const sg__backend_config *cfg,
                         int (*attach)(sg__backend *b, const void *arg),
                         const void *attach_arg, sg__backend **out);

/* C backends (cbackend.c): the transport of sg_host_add_cbackend. */
extern const sg__transport sg__c_transport;

/* Pushes the host event handler and the event name; returns 0 if there is a
 * handler (then push arguments and call sg__lenv_pcall with nargs + 1). */
int sg__host_push_handler(sg_host *h, const char *event);

#endif
