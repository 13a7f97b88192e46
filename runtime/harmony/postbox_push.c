/* A federation's Pushes stored by a postbox (postbox_push.h). */
#include "postbox_push.h"

#include <stdlib.h>

#include <protobuf-c/protobuf-c.h>

#include "hrpc_errors.h"
#include "protocol/sync/v1/sync.pb-c.h"
#include "segue.h"

/* The tag of PushRequest's field 1 (event), length-delimited: (1 << 3) | 2.
 * tests/unit/test_postbox_push.c checks the field number against the
 * descriptor. */
#define EVENT_TAG 0x0a

int sg__postbox_push_event_span(const uint8_t *body, size_t body_len, size_t *off, size_t *len) {
  if (!body || body_len < 2 || body[0] != EVENT_TAG) return 0;
  /* The length, a varint of at most 5 bytes: protobuf-c refuses a longer
   * length prefix and keeps 32 bits of it, so a value past 32 bits is not
   * what it decoded (let the packing path have it). */
  uint64_t n = 0;
  size_t i = 1;
  for (int sh = 0;; sh += 7) {
    if (i >= body_len || sh > 28) return 0;  /* truncated, or over-long */
    uint8_t b = body[i++];
    n |= (uint64_t)(b & 0x7f) << sh;
    if (!(b & 0x80)) break;
  }
  if (n > UINT32_MAX || n != body_len - i) return 0;  /* anything after it, or short */
  *off = i;
  *len = (size_t)n;
  return 1;
}

static void push_stored(void *ud, int err) {
  sg__hrpc_request *req = ud;
  sg__postbox *pb = req->data;  /* alive: the postbox answers before it goes */
  if (err) {
    const char *why = sg__postbox_errmsg(pb);
    sg__hrpc_respond_error(req, 500, SG__HRPC_INTERNAL, *why ? why : sg_strerror(err), NULL, 0);
  } else {
    sg__hrpc_respond(req, (const uint8_t *)"", 0);  /* an empty PushResponse */
  }
}

/* The Event's bytes: the body's own, else packed from the decode into
 * small[512] or, when larger, into *packed (the caller frees it). NULL: out
 * of memory. */
static const uint8_t *event_bytes(const Protocol__Sync__V1__PushRequest *push,
                                  const sg__hrpc_request *req, uint8_t small[512],
                                  uint8_t **packed, size_t *n) {
  size_t off;
  if (sg__postbox_push_event_span(req->body, req->body_len, &off, n)) return req->body + off;
  *n = protobuf_c_message_get_packed_size(&push->event->base);
  uint8_t *out = *n > 512 ? (*packed = malloc(*n)) : small;
  if (out) protobuf_c_message_pack(&push->event->base, out);
  return out;
}

/* An accepted Push (federation.h's push handler). */
static void push_in(sg__federation *f, sg__fed_method m, const char *server_id,
                    const ProtobufCMessage *msg, sg__hrpc_request *req, void *ud) {
  sg__postbox_pushes *s = ud;
  sg__postbox *pb = s->pb;
  (void)m;
  if (!pb || sg__postbox_closing(pb)) {
    sg__hrpc_respond_error(req, 503, SG__HRPC_UNAVAILABLE, "the postbox is closed", NULL, 0);
    return;
  }
  unsigned char pk[SG_KEYS_PUBLIC_BYTES];
  if (sg__federation_key_get(f, server_id, pk) == 0) sg__postbox_key_remember(pb, server_id, pk);
  uint64_t before = sg__postbox_pushed_at(pb, server_id);
  uint8_t small[512], *packed = NULL;
  size_t n;
  const uint8_t *ev = event_bytes((const Protocol__Sync__V1__PushRequest *)msg, req, small,
                                  &packed, &n);
  if (!ev) {
    sg__hrpc_respond_error(req, 500, SG__HRPC_INTERNAL, "out of memory", NULL, 0);
    return;
  }
  req->data = pb;
  int rc = sg__postbox_receive_push(pb, server_id, ev, n, push_stored, req);
  free(packed);
  if (rc) sg__hrpc_respond_error(req, 500, SG__HRPC_INTERNAL, sg__postbox_errmsg(pb), NULL, 0);
  if (s->pushed
      && (!before || sg__postbox_pushed_at(pb, server_id) - before >= SG_POSTBOX_PUSHED_EVERY_MS))
    s->pushed(s->ud, server_id);  /* last: it may stop this or close the postbox */
}

void sg__postbox_serve_pushes(sg__postbox_pushes *s, sg__postbox *pb, sg__federation *f,
                             sg__postbox_pushed_cb pushed, void *ud) {
  sg__postbox_serve_pushes_stop(s);
  s->pb = pb;
  s->fed = f;
  s->pushed = pushed;
  s->ud = ud;
  sg__federation_set_push_handler(f, push_in, s);
}

void sg__postbox_serve_pushes_stop(sg__postbox_pushes *s) {
  if (s->fed) sg__federation_clear_push_handler(s->fed, push_in, s);
  s->pb = NULL;
  s->fed = NULL;
  s->pushed = NULL;
  s->ud = NULL;
}
