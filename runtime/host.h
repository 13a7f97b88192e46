/* The host's internals, shared by runtime/host.c and the bindings that need
 * the host behind a lua_State. The public API is in include/segue.h. */
#ifndef SEGUE_HOST_H
#define SEGUE_HOST_H
#include <lua.h>
#include "segue.h"
#include "backend.h"

typedef struct sg_host_backend sg_host_backend;

struct sg_host_backend {
  sg_backend b;
  sg_host *host;
  sg_host_backend *next;
  int driver_ref;          /* Lua backends: the driver table (registry ref) */
  void *cbackend;          /* C backends: the sg_cbackend */
};

struct sg_host {
  void *data;
  uv_loop_t *loop;
  sg_logger log;
  char *data_dir;
  void (*error_cb)(void *data, int err, const char *message);
  void *error_data;
  lua_State *L;
  int handler_ref;          /* Lua function(event, ...) receiving host events */
  sg_host_backend *backends;
  int closing;
  int started;              /* sg_host_start succeeded: new C backends start at once */
  unsigned backends_open;
  void (*close_cb)(void *data);
  void *close_data;
  void (*stop_cb)(sg_host *host);
  unsigned stops_pending;
  uv_idle_t reaper;
  char last_error[1024];    /* the message of the last failed boot call */         /* frees the host after its last handle closed */
};

/* The host owning L (set when the host created it). */
sg_host *sg__host_from_lua(lua_State *L);

/* Calls the function below `nargs` arguments on L's stack in protected mode
 * with a traceback; on error logs it (with `what`), tells error_cb, leaves
 * nothing and returns SG_ELUA; else leaves `nres` results and returns 0. */
int sg__host_pcall(sg_host *h, int nargs, int nres, const char *what);

/* Reports an error no Lua caller can receive (log + error_cb). */
void sg__host_report(sg_host *h, int err, const char *message);

/* Creates a backend named `name` with transport `tp` (transport_data set by
 * `attach(b, attach_arg)` if given). SG_EEXIST if the name is taken. */
int sg__host_add_backend(sg_host *h, const char *name, const sg_transport *tp,
                         const sg_backend_config *cfg,
                         int (*attach)(sg_backend *b, const void *arg),
                         const void *attach_arg, sg_host_backend **out);
sg_host_backend *sg__host_find_backend(sg_host *h, const char *name);
/* Stops and removes a backend; its memory is freed asynchronously. */
void sg__host_remove_backend(sg_host *h, sg_host_backend *hb);

/* Pushes the host event handler and the event name; returns 0 if there is a
 * handler (then push arguments and call sg__host_pcall with nargs + 1). */
int sg__host_push_handler(sg_host *h, const char *event);

/* Calls segue.boot.<fn>(argv...) (strings), which returns true or nil, err
 * [, code]: 0, the code, or SG_ECONFIG. For the CLI. */
int sg__host_call_boot(sg_host *h, const char *fn, const char *const *argv, int argc);

/* The Lua transport, implemented by bindings/lua_core.c. */
extern const sg_transport sg__lua_transport;

#endif
