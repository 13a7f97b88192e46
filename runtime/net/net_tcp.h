/* Client stream connections for Lua backends: TCP with DNS resolution, a
 * connect time-out and optional TLS (net_tls.h), or an already open file
 * descriptor (a terminal or pipe, e.g. stdin). Input is buffered here and
 * taken out as lines (with a maximum length) or as byte chunks; reading
 * pauses while the buffer is full (backpressure towards the peer).
 *
 * Contract (libuv's): the caller allocates the conn; a successful
 * sg__net_connect or sg__net_open_fd pairs with sg__net_close, which is
 * asynchronous and releases every byte the conn allocated before close_cb
 * runs. Functions return 0 or a negative code (SG_E* or UV_E*); when
 * sg__net_connect fails, no callback runs and no close is needed. Callbacks
 * never run from inside a call of this API, and none runs after
 * sg__net_close. */
#ifndef SEGUE_NET_TCP_H
#define SEGUE_NET_TCP_H
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "net_tls.h"

#define SG_NET_DEFAULT_TIMEOUT_MS 30000
#define SG_NET_DEFAULT_MAX_LINE 65536
#define SG_NET_READ_CHUNK 65536

typedef struct sg__net_conn sg__net_conn;

typedef struct {
  uint64_t timeout_ms;     /* resolve + connect + TLS handshake; 0: 30 s */
  int tls;                 /* wrap the connection in TLS */
  const char *servername;  /* TLS name to send and verify; NULL: the host */
  int verify;              /* TLS: check the chain and the name */
  const char *ca_file;     /* TLS: trust only the CAs in this PEM file */
  const char *pin;         /* TLS: SHA-256 of the one certificate accepted */
  size_t max_line;         /* longest line sg__net_read_line accepts; 0: 64 KiB */
} sg__net_options;

typedef struct {
  /* The connection is open (status 0) or failed (sg__net_error says why;
   * the caller still closes it). Once per sg__net_connect. */
  void (*on_connect)(sg__net_conn *c, int status);
  /* New input or the end of it: call sg__net_read_line / sg__net_read_bytes. */
  void (*on_readable)(sg__net_conn *c);
  /* Every queued write has been handed to the kernel. */
  void (*on_drain)(sg__net_conn *c);
} sg__net_events;

typedef void (*sg__net_close_cb)(sg__net_conn *c);

struct sg__net_conn {
  void *data;  /* the embedder's */
  /* private */
  uv_loop_t *loop;
  union {
    uv_handle_t handle;
    uv_stream_t stream;
    uv_tcp_t tcp;
    uv_pipe_t pipe;
    uv_tty_t tty;
  } s;
  uv_timer_t timer;
  uv_getaddrinfo_t gai;
  uv_connect_t connect_req;
  struct addrinfo *addrs, *next_addr;
  sg__tls *tls;
  const sg__net_events *ev;
  int phase;                /* see net_tcp.c */
  int stream_open;          /* s is initialized and not being closed */
  int reading;
  int status;               /* sticky end of input: UV_EOF or an error */
  unsigned pending;         /* close callbacks and requests still to come */
  unsigned writes;          /* write requests in flight */
  size_t max_line;
  uint64_t timeout_ms;
  char *buf;                /* input: buf[off, off + len) */
  size_t off, len, cap, scanned;
  sg__net_close_cb close_cb;
  char host[256];           /* as connected to: the default TLS name */
  char where[300];          /* "host:port", for messages */
  char error[512];
  char chunk[SG_NET_READ_CHUNK];
};

/* Resolves `host` and connects to it on `port`; on_connect follows.
 * `opts` may be NULL (defaults, no TLS) and is read before this returns;
 * `ev` must outlive the conn. SG_EINVAL for a bad argument; a resolver
 * error code when the lookup cannot start. */
int sg__net_connect(uv_loop_t *loop, sg__net_conn *c, const char *host, int port,
                   const sg__net_options *opts, const sg__net_events *ev);

/* Upgrades an open plain connection to TLS (STARTTLS): the handshake
 * starts at once and on_connect follows again, with 0 once it completed or
 * the failure (then the conn is unusable; close it). Uses the TLS fields of
 * `opts` (servername NULL: the host connected to). SG_EINVAL when the conn
 * is not open, already TLS, or was opened on an fd; SG_EPROTO when input is
 * buffered that nobody read: bytes that came before the handshake must not
 * pass as protected ones. */
int sg__net_starttls(sg__net_conn *c, const sg__net_options *opts);

/* Reads from `fd`, a terminal or a pipe (not a regular file: SG_EINVAL).
 * The conn is open at once (no on_connect). sg__net_close closes fd. */
int sg__net_open_fd(uv_loop_t *loop, sg__net_conn *c, int fd, size_t max_line,
                   const sg__net_events *ev);

/* Takes the next line out of the input, without its "\n" or "\r\n": 1 and
 * *line and *len set (valid until the next call into this API or the next loop
 * turn), 0 when no line is complete yet (on_readable follows), or the end:
 * UV_EOF (an unterminated last line is returned as a line first), SG_ELIMIT
 * (a line longer than max_line; sticky), or the read error. */
int sg__net_read_line(sg__net_conn *c, const char **line, size_t *len);

/* Like sg__net_read_line for whatever input is buffered (at most
 * SG_NET_READ_CHUNK bytes per call). */
int sg__net_read_bytes(sg__net_conn *c, const char **data, size_t *len);

/* Makes on_readable run on a later loop turn, so a caller that finds input
 * already buffered can still answer its own callback asynchronously. Only
 * for an open conn; no-op otherwise. */
void sg__net_notify(sg__net_conn *c);

/* Queues data (copied) for sending. UV_ENOTCONN when not open, the write
 * error once one happened, SG_EPROTO when TLS refused. */
int sg__net_write(sg__net_conn *c, const char *data, size_t len);

/* Bytes queued but not yet handed to the kernel. */
size_t sg__net_write_queue_size(const sg__net_conn *c);

/* Why the last failure happened ("connect to h:1: connection refused"). */
const char *sg__net_error(const sg__net_conn *c);

/* Closes the conn; pending reads end, pending writes are dropped. */
void sg__net_close(sg__net_conn *c, sg__net_close_cb close_cb);

#endif
