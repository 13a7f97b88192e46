/* A federation's Pushes stored by a postbox in C, with no embedder code per
 * Push: the glue between federation.h's accepted Pushes and postbox.h's
 * inbox (postbox.h stays free of hRPC; this file knows both). For each Push
 * the federation accepted:
 * - the key that verified it is remembered (sg__postbox_key_remember: a
 *   store write only when it changed), so the next start needs no fetch;
 * - its Event's bytes are stored with sg__postbox_receive_push: the body's
 *   own bytes when the body is that one field and nothing else, else packed
 *   from the federation's one decode of it;
 * - it is answered once stored (durable): an empty PushResponse, or 500
 *   hrpc.internal-server-error saying why; 503 hrpc.unavailable once the
 *   postbox began closing;
 * - pushed(ud, server_id) runs for the peer's first Push, and for a Push
 *   that came SG_POSTBOX_PUSHED_EVERY_MS or more after the one before it:
 *   at most once a second while a peer Pushes. The Pull policy asks
 *   sg__postbox_pushed_at for the last one's time when it needs it.
 *
 * Contract (libuv's): the caller allocates the sg__postbox_pushes (zeroed,
 * or stopped) and keeps it, the postbox and the federation's memory until
 * sg__postbox_serve_pushes_stop; stop before closing the postbox. A Push
 * answered later (the store commits at the end of the loop turn) needs only
 * the postbox, which answers everything before it closes. */
#ifndef SEGUE_POSTBOX_PUSH_H
#define SEGUE_POSTBOX_PUSH_H
#include <stddef.h>
#include <stdint.h>

#include "federation.h"
#include "postbox.h"

#define SG_POSTBOX_PUSHED_EVERY_MS 1000

/* A Push from `server_id` arrived (borrowed for the call). */
typedef void (*sg__postbox_pushed_cb)(void *ud, const char *server_id);

typedef struct sg__postbox_pushes {
  void *data;  /* the embedder's; never touched */
  /* private */
  sg__postbox *pb;
  sg__federation *fed;
  sg__postbox_pushed_cb pushed;
  void *ud;
} sg__postbox_pushes;

/* Takes `f`'s accepted Pushes (federation.h's push handler, replacing any
 * other) and stores them in `pb` as above; `pushed` may be NULL. A `s`
 * already serving is stopped first. */
void sg__postbox_serve_pushes(sg__postbox_pushes *s, sg__postbox *pb, sg__federation *f,
                             sg__postbox_pushed_cb pushed, void *ud);
/* Undoes it: the federation's Pushes go to its general handler again
 * (unless another push handler replaced this one meanwhile). `s` may then
 * be freed; Pushes already taken are still answered by the postbox. */
void sg__postbox_serve_pushes_stop(sg__postbox_pushes *s);

/* Where a PushRequest's Event lies in `body`: 1 and [*off, *off + *len)
 * when the body is exactly one length-delimited field 1 (the event) and
 * nothing else; 0 when it is anything else (other fields, the field twice,
 * a truncated or over-long length), and the event must be packed from the
 * decode. protobuf-c has no public way to ask where a field's bytes are. */
int sg__postbox_push_event_span(const uint8_t *body, size_t body_len, size_t *off, size_t *len);

#endif
