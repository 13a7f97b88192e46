#include "listener.h"

#include <stddef.h>
#include <stdlib.h>

#include "address.h"
#include "segue.h"

#define LISTENER_OF(h) ((sg__listener *)((char *)(h) - offsetof(sg__listener, tcp)))

static void maybe_drained(sg__listener *l) {
  if (l->closing && l->tcp_closed && l->pending == 0) l->drained(l);
}

int sg__listener_init(sg__listener *l, uv_loop_t *loop, void *owner,
                      void (*drained)(sg__listener *l)) {
  l->loop = loop;
  l->pending = 0;
  l->conns = NULL;
  l->listening = l->closing = l->tcp_closed = 0;
  l->drained = drained;
  int rc = uv_tcp_init(loop, &l->tcp);
  if (rc) return rc;
  l->tcp.data = owner;
  return 0;
}

int sg__listener_listen(sg__listener *l, const char *address, uv_connection_cb on_connection) {
  struct sockaddr_storage ss;
  if (!address || l->closing || l->listening) return SG_EINVAL;
  int rc = sg__address_parse(address, &ss);
  if (rc) return rc;
  if ((rc = uv_tcp_bind(&l->tcp, (const struct sockaddr *)&ss, 0))) return rc;
  if ((rc = uv_listen((uv_stream_t *)&l->tcp, 511, on_connection))) return rc;
  l->listening = 1;
  return 0;
}

int sg__listener_port(const sg__listener *l) {
  return l->listening ? sg__address_port(&l->tcp) : UV_EINVAL;
}

static void on_rejected_closed(uv_handle_t *h) {
  sg__listener *l = h->data;
  free(h);
  sg__listener_release(l);
}

void sg__listener_reject(sg__listener *l) {
  uv_tcp_t *t = malloc(sizeof *t);
  if (!t || uv_tcp_init(l->loop, t) != 0) {
    free(t);
    return;
  }
  t->data = l;
  uv_accept((uv_stream_t *)&l->tcp, (uv_stream_t *)t);
  l->pending++;
  uv_close((uv_handle_t *)t, on_rejected_closed);
}

void sg__listener_add(sg__listener *l, sg__lconn *lc, uv_tcp_t *tcp, uv_timer_t *timer, void *data) {
  uv_tcp_init(l->loop, tcp);
  uv_timer_init(l->loop, timer);
  tcp->data = timer->data = data;
  lc->open_handles = 2;
  lc->prev = NULL;
  lc->next = l->conns;
  if (lc->next) lc->next->prev = lc;
  l->conns = lc;
  l->pending++;
}

int sg__listener_conn_closed(sg__listener *l, sg__lconn *lc) {
  if (--lc->open_handles > 0) return 0;
  if (lc->prev) lc->prev->next = lc->next;
  else l->conns = lc->next;
  if (lc->next) lc->next->prev = lc->prev;
  return 1;
}

void sg__listener_release(sg__listener *l) {
  l->pending--;
  maybe_drained(l);
}

static void on_listener_closed(uv_handle_t *h) {
  sg__listener *l = LISTENER_OF(h);
  l->tcp_closed = 1;
  maybe_drained(l);
}

int sg__listener_close(sg__listener *l) {
  if (l->closing) return 0;
  l->closing = 1;
  uv_close((uv_handle_t *)&l->tcp, on_listener_closed);
  return 1;
}
