/* A streaming JSON framer: finds the boundaries of JSON values in a byte
 * stream (values split across reads, several per read, with or without
 * whitespace or newlines between them, pretty-printed across lines), so that
 * cJSON parses exactly one complete value at a time. It tracks depth, string
 * and escape state only; it does not validate the value (cJSON does).
 *
 * Offsets are absolute byte offsets in the stream since sg__framer_init
 * (0-based), so errors can name where a bad byte was.
 *
 * Memory: every value is copied into one buffer owned by the framer, grown
 * by doubling and never past max_value_bytes + 1 (the NUL); sg__framer_free
 * releases it. */
#ifndef SEGUE_JSON_FRAMER_H
#define SEGUE_JSON_FRAMER_H
#include <stddef.h>
#include <stdint.h>

/* Called once per complete value: `value` (not NUL-terminated in general,
 * though buffer[len] is a NUL the framer adds) and `len` bytes, starting at
 * stream offset `offset`. Borrowed for the call. A non-zero return stops
 * sg__framer_feed, which returns it; the rest of that chunk is not consumed,
 * so the caller must treat it as fatal (or sg__framer_reset). The callback
 * must not feed, finish, reset or free this framer. */
typedef int (*sg__framer_cb)(void *ud, const char *value, size_t len, uint64_t offset);

typedef struct sg__framer {
  size_t max_value_bytes;  /* a value longer than this is a violation */
  int max_depth;           /* nesting deeper than this is a violation */
  /* private */
  char *buf;               /* bytes of the value being accumulated */
  size_t len, cap;
  uint64_t offset;         /* stream offset of the next byte fed */
  uint64_t value_start;
  int depth, state;
  int failed;              /* 0, or the error every later feed returns */
  char err[256];           /* set when feed returns SG_EPROTO (or SG_ENOMEM) */
  uint64_t err_offset;     /* stream offset of the byte where the violation was seen */
} sg__framer;

/* max_value_bytes 0 selects 64 MiB, max_depth <= 0 selects 64. */
void sg__framer_init(sg__framer *f, size_t max_value_bytes, int max_depth);
void sg__framer_free(sg__framer *f);
/* Forgets any partial value and the error; offsets restart at 0. */
void sg__framer_reset(sg__framer *f);

/* Feeds `len` bytes. Returns 0, a callback's non-zero return, or SG_EPROTO
 * when a byte cannot start a value, a value exceeds max_value_bytes or
 * max_depth; then f->err says what and where ("unexpected byte 'x' (0x78)
 * where a JSON value must start at byte offset 42", "value starting at
 * byte offset 0 exceeds the limit of 16 bytes", "value starting at byte
 * offset 0 nests deeper than 64 levels at byte offset 64") and every later
 * feed returns SG_EPROTO until sg__framer_reset. SG_ENOMEM if the buffer
 * cannot grow (also sticky). */
int sg__framer_feed(sg__framer *f, const char *data, size_t len,
                   sg__framer_cb cb, void *ud);
/* End of stream: SG_EPROTO ("stream ended inside a value that started at
 * byte offset N") if a value is incomplete, else 0. A bare number or literal
 * at the end of the stream is delivered here. */
int sg__framer_finish(sg__framer *f, sg__framer_cb cb, void *ud);

#endif
