/* Streaming JSON framer: a byte-wise state machine that only tracks what it
 * needs to see where a top-level value ends (container depth, strings,
 * escapes, bare scalar tokens). cJSON validates the value afterwards. */
#include "json_framer.h"

#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "segue.h"

#define FRAMER_DEFAULT_MAX_VALUE ((size_t)64 << 20)
#define FRAMER_DEFAULT_MAX_DEPTH 64
#define FRAMER_MIN_CAP 256

enum {
  ST_BETWEEN,    /* between top-level values */
  ST_CONTAINER,  /* inside an object or array, f->depth levels deep */
  ST_STRING,     /* inside a string (top-level or nested) */
  ST_ESCAPE,     /* the byte after a backslash in a string */
  ST_BARE        /* a top-level number or literal */
};

/* What one byte did. */
enum {
  STEP_ERROR = -1,
  STEP_SKIP,       /* whitespace between values */
  STEP_IN,         /* part of the current value */
  STEP_END,        /* the last byte of the current value */
  STEP_END_BEFORE  /* the value ended just before this byte, which is not consumed */
};

static int framer_fail(sg__framer *f, uint64_t at, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static int framer_fail(sg__framer *f, uint64_t at, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(f->err, sizeof f->err, fmt, ap);
  va_end(ap);
  f->err_offset = at;
  f->failed = SG_EPROTO;
  return STEP_ERROR;
}

static int is_ws(unsigned char c) { return c == ' ' || c == '\t' || c == '\r' || c == '\n'; }

static int starts_bare(unsigned char c) {
  return c == '-' || (c >= '0' && c <= '9') || c == 't' || c == 'f' || c == 'n';
}

/* A superset of what can continue a number or literal: the token must end at
 * the first byte that cannot belong to it, and cJSON rejects a bad token. */
static int continues_bare(unsigned char c) {
  return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
         c == '.' || c == '+' || c == '-';
}

static int open_level(sg__framer *f, uint64_t at) {
  if (f->depth >= f->max_depth)
    return framer_fail(f, at,
                       "value starting at byte offset %" PRIu64
                       " nests deeper than %d levels at byte offset %" PRIu64,
                       f->value_start, f->max_depth, at);
  f->depth++;
  f->state = ST_CONTAINER;
  return STEP_IN;
}

static int step_between(sg__framer *f, unsigned char c, uint64_t at) {
  if (is_ws(c)) return STEP_SKIP;
  f->value_start = at;
  if (c == '{' || c == '[') return open_level(f, at);
  if (c == '"') {
    f->state = ST_STRING;
    return STEP_IN;
  }
  if (starts_bare(c)) {
    f->state = ST_BARE;
    return STEP_IN;
  }
  if (c >= 0x20 && c < 0x7f)
    return framer_fail(f, at,
                       "unexpected byte '%c' (0x%02x) where a JSON value must start"
                       " at byte offset %" PRIu64, c, c, at);
  return framer_fail(f, at,
                     "unexpected byte 0x%02x where a JSON value must start at byte offset %" PRIu64,
                     c, at);
}

static int step_container(sg__framer *f, unsigned char c, uint64_t at) {
  if (c == '"') {
    f->state = ST_STRING;
  } else if (c == '{' || c == '[') {
    return open_level(f, at);
  } else if ((c == '}' || c == ']') && --f->depth == 0) {
    f->state = ST_BETWEEN;
    return STEP_END;
  }
  return STEP_IN;
}

static int step(sg__framer *f, unsigned char c, uint64_t at) {
  switch (f->state) {
  case ST_BETWEEN: return step_between(f, c, at);
  case ST_CONTAINER: return step_container(f, c, at);
  case ST_STRING:
    if (c == '\\') {
      f->state = ST_ESCAPE;
    } else if (c == '"') {
      f->state = f->depth ? ST_CONTAINER : ST_BETWEEN;
      return f->depth ? STEP_IN : STEP_END;
    }
    return STEP_IN;
  case ST_ESCAPE: f->state = ST_STRING; return STEP_IN;
  default:
    if (continues_bare(c)) return STEP_IN;
    f->state = ST_BETWEEN;
    return STEP_END_BEFORE;
  }
}

/* Doubling growth, capped: callers check the value limit before appending,
 * so the buffer never exceeds max_value_bytes + 1. */
static int reserve(sg__framer *f, size_t need) {
  if (need <= f->cap) return 0;
  size_t cap = f->cap ? f->cap : FRAMER_MIN_CAP;
  while (cap < need) cap = cap > SIZE_MAX / 2 ? need : cap * 2;
  if (cap > f->max_value_bytes + 1) cap = f->max_value_bytes + 1;
  char *buf = realloc(f->buf, cap);
  if (!buf) return SG_ENOMEM;
  f->buf = buf;
  f->cap = cap;
  return 0;
}

static int append(sg__framer *f, const char *p, size_t n) {
  if (reserve(f, f->len + n + 1) != 0) {
    snprintf(f->err, sizeof f->err, "out of memory buffering a value of %zu bytes", f->len + n);
    return f->failed = SG_ENOMEM;
  }
  memcpy(f->buf + f->len, p, n);
  f->len += n;
  f->buf[f->len] = '\0';
  return 0;
}

static int deliver(sg__framer *f, const char *p, size_t n, sg__framer_cb cb, void *ud) {
  int rc = append(f, p, n);
  if (rc != 0) return rc;
  size_t len = f->len;
  f->len = 0;
  return cb ? cb(ud, f->buf, len, f->value_start) : 0;
}

void sg__framer_init(sg__framer *f, size_t max_value_bytes, int max_depth) {
  memset(f, 0, sizeof *f);
  f->max_value_bytes = max_value_bytes ? max_value_bytes : FRAMER_DEFAULT_MAX_VALUE;
  if (f->max_value_bytes > SIZE_MAX - 1) f->max_value_bytes = SIZE_MAX - 1;
  f->max_depth = max_depth > 0 ? max_depth : FRAMER_DEFAULT_MAX_DEPTH;
  f->state = ST_BETWEEN;
}

void sg__framer_free(sg__framer *f) {
  free(f->buf);
  f->buf = NULL;
  f->cap = 0;
  sg__framer_reset(f);
}

void sg__framer_reset(sg__framer *f) {
  f->len = 0;
  f->offset = 0;
  f->value_start = 0;
  f->depth = 0;
  f->state = ST_BETWEEN;
  f->failed = 0;
  f->err[0] = '\0';
  f->err_offset = 0;
}

int sg__framer_feed(sg__framer *f, const char *data, size_t len, sg__framer_cb cb, void *ud) {
  size_t i = 0, span = 0; /* data[span..i) belongs to the current value */
  int rc = 0;
  if (f->failed) return f->failed;
  while (i < len && rc == 0) {
    int between = f->state == ST_BETWEEN;
    int r = step(f, (unsigned char)data[i], f->offset + i);
    if (r == STEP_ERROR) {
      rc = SG_EPROTO;
      break;
    }
    if (r == STEP_SKIP) {
      i++;
      continue;
    }
    if (between) span = i;
    if (r != STEP_END_BEFORE) {
      i++;
      if (f->len + (i - span) > f->max_value_bytes) {
        framer_fail(f, f->offset + i - 1,
                    "value starting at byte offset %" PRIu64 " exceeds the limit of %zu bytes",
                    f->value_start, f->max_value_bytes);
        rc = SG_EPROTO;
        break;
      }
      if (r == STEP_IN) continue;
    }
    rc = deliver(f, data + span, i - span, cb, ud);
  }
  if (rc == 0 && f->state != ST_BETWEEN) rc = append(f, data + span, len - span);
  f->offset += i;
  return rc;
}

int sg__framer_finish(sg__framer *f, sg__framer_cb cb, void *ud) {
  if (f->failed) return f->failed;
  if (f->state == ST_BETWEEN) return 0;
  if (f->state == ST_BARE) {
    f->state = ST_BETWEEN;
    return deliver(f, "", 0, cb, ud);
  }
  framer_fail(f, f->offset,
              "stream ended inside a value that started at byte offset %" PRIu64,
              f->value_start);
  return SG_EPROTO;
}
