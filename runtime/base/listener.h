/* The listening half the servers share (hRPC, the client API): the socket,
 * refusing a connection when there is no room, and knowing when closing is
 * done. Each server counts its own connections' handles in `pending` too
 * (sg__listener_release when each is closed), so that `drained` runs once,
 * after close, when the last handle is gone. */
#ifndef SEGUE_LISTENER_H
#define SEGUE_LISTENER_H
#include <uv.h>

/* What every connection of a server keeps for the listener: its place in
 * the list of open connections, and how many of its handles are open. */
typedef struct sg__lconn sg__lconn;
struct sg__lconn {
  sg__lconn *next, *prev;
  int open_handles;
};

typedef struct sg__listener sg__listener;
struct sg__listener {
  uv_loop_t *loop;
  uv_tcp_t tcp;        /* tcp.data is the owner's (sg__listener_init) */
  sg__lconn *conns;    /* every connection whose handles are not all closed */
  unsigned pending;    /* handles still to close besides tcp */
  int listening, closing, tcp_closed;
  void (*drained)(sg__listener *l);
};

/* Prepares the socket; `owner` becomes tcp.data (for the connection
 * callback), `drained` (required) runs once closing has finished. On
 * failure (libuv's error) nothing needs closing. */
int sg__listener_init(sg__listener *l, uv_loop_t *loop, void *owner,
                      void (*drained)(sg__listener *l));
/* Binds and listens on "host:port" (sg__address_parse). SG_EINVAL when the
 * address is malformed or the listener closing or listening already, else
 * libuv's bind/listen error. */
int sg__listener_listen(sg__listener *l, const char *address, uv_connection_cb on_connection);
/* The bound port, or UV_EINVAL when not listening. */
int sg__listener_port(const sg__listener *l);
/* No room for the connection waiting: accepts it (to take it off the
 * backlog) and closes it at once. */
void sg__listener_reject(sg__listener *l);
/* A new connection: initializes its two handles (their data is `data`),
 * adds it to `conns` and counts it in `pending`. */
void sg__listener_add(sg__listener *l, sg__lconn *lc, uv_tcp_t *tcp, uv_timer_t *timer, void *data);
/* From the close callback of both handles: 1 when this was the last (lc
 * is out of `conns`: free the connection, then sg__listener_release). */
int sg__listener_conn_closed(sg__listener *l, sg__lconn *lc);
/* One of the owner's handles counted in `pending` has closed. */
void sg__listener_release(sg__listener *l);
/* Stops listening; `drained` runs once the socket and every pending handle
 * are closed. Idempotent: returns 1 when this call started closing. */
int sg__listener_close(sg__listener *l);

#endif
