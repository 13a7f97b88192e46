/* The outbound hRPC transport: unary hRPC POSTs with libcurl's multi
 * interface, driven by the caller's uv loop (a uv_poll_t per socket curl
 * watches, one uv_timer_t for curl's time-outs). One multi handle per client,
 * so curl's connection cache reuses connections (keep-alive, TCP keepalive
 * probes on). TLS peers are always verified.
 *
 * Contract (libuv's): the caller allocates the client; sg__hrpc_client_init
 * pairs with sg__hrpc_client_close, which is asynchronous and releases every
 * byte the client allocated before its close_cb runs. Functions return 0 or
 * a negative SG_E* code; when sg__hrpc_client_call returns an error its
 * callback is never called. */
#ifndef SEGUE_HRPC_CLIENT_H
#define SEGUE_HRPC_CLIENT_H
#include <stddef.h>
#include <stdint.h>
#include <uv.h>
#include "log.h"

#define SG_HRPC_CLIENT_DEFAULT_MAX_RESPONSE_BYTES (4u * 1024 * 1024)
#define SG_HRPC_CLIENT_DEFAULT_TIMEOUT_MS 30000
#define SG_HRPC_CLIENT_MAX_CONNECT_TIMEOUT_MS 10000

/* The outcome of one call, exactly once. Everything passed is borrowed for
 * the duration of the callback.
 * - err 0: http_status 200, body/len the response (body NULL when empty).
 * - err SG_EHTTP with http_status set: the server answered another status;
 *   body/len are the raw response body (an hrpc.v1.Error when the server
 *   speaks hRPC: see sg__hrpc_error_retry_after), and error_identifier /
 *   error_message its decoded fields, or NULL / "HTTP <status>" when the body
 *   is not one.
 * - err < 0 with http_status 0: no answer. SG_ETIMEDOUT (connect or total
 *   time-out), SG_ELIMIT (the response passed max_response_bytes),
 *   SG_ECANCELED (the client was closed), SG_EHTTP (any other transport
 *   failure); error_message says what (curl's words), identifier is NULL. */
typedef void (*sg__hrpc_call_cb)(void *ud, int err, int http_status, const uint8_t *body,
                                size_t len, const char *error_identifier,
                                const char *error_message);

typedef struct sg__hrpc_client sg__hrpc_client;
typedef void (*sg__hrpc_client_close_cb)(sg__hrpc_client *client);

struct sg__hrpc_client {
  void *data;                 /* the embedder's; the client never touches it */
  size_t max_response_bytes;  /* may be changed between calls; default 4 MiB */
  /* private */
  uv_loop_t *loop;
  const sg__logger *log;
  void *multi;                /* CURLM * */
  uv_timer_t timer;
  struct sg__hrpc_call *calls;  /* outstanding, to cancel them on close */
  struct sg__hrpc_sock *socks;  /* watched sockets, to close them on close */
  unsigned pending;           /* handles still closing, besides the timer */
  int closing, timer_closed;
  sg__hrpc_client_close_cb close_cb;
};

/* Prepares `client` on `loop` (not owned). `log` is borrowed and must outlive
 * the client (NULL: stderr at info). SG_ENOMEM or SG_EHTTP (curl refused) on
 * failure; then the client needs no close. */
int sg__hrpc_client_init(uv_loop_t *loop, sg__hrpc_client *client, const sg__logger *log);

/* POSTs `body` (copied; NULL when len is 0) to base_url + path
 * ("https://chat.example.org:2289" + "/protocol.sync.v1.PostboxService/Push")
 * with Content-Type application/hrpc, and "Authorization: <auth_header>"
 * when auth_header is not NULL (copied). timeout_ms bounds the whole call
 * (0: 30 s); connecting is bounded by the smaller of it and 10 s. `cb` runs
 * once, later, never from inside this call. SG_EINVAL (a NULL URL or path, a
 * header with CR or LF), SG_ECLOSING, SG_ENOMEM, SG_EHTTP (curl refused). */
int sg__hrpc_client_call(sg__hrpc_client *client, const char *base_url, const char *path,
                        const uint8_t *body, size_t len, const char *auth_header,
                        uint64_t timeout_ms, sg__hrpc_call_cb cb, void *ud);

/* Flags of sg__hrpc_client_call_flags. */
#define SG_HRPC_CALL_PUBLIC_ONLY 1u  /* connect to no loopback, private, link-local,
                                       * multicast or unspecified address (checked on
                                       * each address the name resolves to, when
                                       * connecting: a name cannot rebind past it) */

/* sg__hrpc_client_call with `flags`; a refused address fails the call
 * SG_EHTTP ("address ... refused: not a public address"). */
int sg__hrpc_client_call_flags(sg__hrpc_client *client, const char *base_url, const char *path,
                              const uint8_t *body, size_t len, const char *auth_header,
                              uint64_t timeout_ms, unsigned flags, sg__hrpc_call_cb cb, void *ud);

/* 1 when `sa` is an address SG_HRPC_CALL_PUBLIC_ONLY refuses: IPv4
 * 0/8, 10/8, 100.64/10, 127/8, 169.254/16, 172.16/12, 192.168/16, 224/3;
 * IPv6 ::, ::1, fc00::/7, fe80::/10, ff00::/8, and IPv4-mapped forms of the
 * IPv4 ones. */
int sg__hrpc_address_is_private(const struct sockaddr *sa);

/* Decodes the RetryInfo in the details of an hrpc.v1.Error body (a 429's).
 * 0 and *seconds set, or SG_EDECODE when there is none (a RetryInfo of 0
 * seconds packs to no bytes at all, so it reads as none). */
int sg__hrpc_error_retry_after(const uint8_t *error_body, size_t len, uint32_t *seconds);

/* Completes every outstanding call with SG_ECANCELED (before this returns),
 * drops curl's connections, closes the handles; close_cb (may be NULL) runs
 * when all memory is released. No other callback runs after this returns. */
void sg__hrpc_client_close(sg__hrpc_client *client, sg__hrpc_client_close_cb close_cb);

#endif
