/* Fuzz target: the backend protocol's read path, as a child's stdout meets
 * it: the JSON framer, fed in arbitrary splits, then the codec.
 *
 * Input: byte 0 picks the split pattern (bits 0-5) and small limits (bit 7);
 * the rest is the stream. Besides the sanitizers, two properties abort:
 * - splitting does not matter: fed in pieces, the framer frames the same
 *   values at the same offsets and fails with the same message as when fed
 *   the whole stream at once;
 * - decoding is canonical: a value that decodes (as a backend's value, an
 *   InitInfo, a Request, or any kind through sg__fl_validate) encodes to a
 *   line that decodes again as the same kind and encodes to the same bytes. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "flubber_codec.h"
#include "fuzz_common.h"
#include "json_framer.h"
#include "segue.h"

/* What a framer run produced, as bytes to compare: every value with its
 * offset, then the result code and error text. */
typedef struct trace {
  char *p;
  size_t len, cap;
  size_t values_len;  /* p[0..values_len): the values; then code and error */
} trace;

static void trace_add(trace *t, const void *data, size_t n) {
  if (t->len + n > t->cap) {
    size_t cap = t->cap ? t->cap : 256;
    while (cap < t->len + n) cap *= 2;
    t->p = realloc(t->p, cap);
    FUZZ_REQUIRE(t->p != NULL, "out of memory");
    t->cap = cap;
  }
  memcpy(t->p + t->len, data, n);
  t->len += n;
}

static int record_value(void *ud, const char *value, size_t len, uint64_t offset) {
  trace *t = ud;
  trace_add(t, &offset, sizeof offset);
  trace_add(t, &len, sizeof len);
  trace_add(t, value, len);
  return 0;
}

static void record_end(trace *t, const sg__framer *f, int rc) {
  t->values_len = t->len;
  trace_add(t, &rc, sizeof rc);
  trace_add(t, f->err, strlen(f->err));
}

typedef struct limits {
  size_t max_value;
  sg__fl_limits fl;
} limits;

/* A tiny xorshift: the split pattern must be a function of the input. */
static uint32_t next_rand(uint32_t *s) {
  *s ^= *s << 13;
  *s ^= *s >> 17;
  *s ^= *s << 5;
  return *s;
}

/* Feeds the stream in pieces of 1..max_piece bytes (0: all at once). */
static void frame(const char *s, size_t n, const limits *lim, unsigned max_piece, trace *t) {
  sg__framer f;
  uint32_t seed = max_piece * 2654435761u + 1;
  int rc = 0;
  sg__framer_init(&f, lim->max_value, lim->fl.max_depth);
  for (size_t at = 0; at < n && rc == 0;) {
    size_t piece = max_piece ? 1 + next_rand(&seed) % max_piece : n;
    if (piece > n - at) piece = n - at;
    rc = sg__framer_feed(&f, s + at, piece, record_value, t);
    at += piece;
  }
  if (rc == 0) rc = sg__framer_finish(&f, record_value, t);
  record_end(t, &f, rc);
  sg__framer_free(&f);
}

/* The ways a value is decoded: as a backend's value (classified, or the
 * first one: InitInfo), as a Request, or parsed and validated as a kind. */
enum { AS_BACKEND, AS_INIT, AS_REQUEST, AS_KIND };

static cJSON *decode_as(int how, sg__fl_kind *kind, const char *s, size_t n,
                        const limits *lim, char *err, size_t errlen) {
  switch (how) {
    case AS_BACKEND: return sg__fl_decode_backend(s, n, 0, 0, &lim->fl, kind, err, errlen);
    case AS_INIT: return sg__fl_decode_backend(s, n, 0, 1, &lim->fl, kind, err, errlen);
    case AS_REQUEST: *kind = SG_FL_REQUEST; return sg__fl_decode_request(s, n, 0, &lim->fl, err, errlen);
    default: break;
  }
  cJSON *v = cJSON_ParseWithLength(s, n);
  if (v && sg__fl_validate(v, *kind, &lim->fl, err, errlen) != 0) {
    cJSON_Delete(v);
    v = NULL;
  }
  return v;
}

/* encode(v) decodes again as the same kind, and encodes to the same line. */
static void check_canonical(int how, sg__fl_kind kind, const cJSON *v, const limits *lim) {
  char err[512];
  size_t n1, n2;
  char *line1 = sg__fl_encode_line(v, &n1);
  FUZZ_REQUIRE(line1 != NULL, "encode failed");
  sg__fl_kind again = kind;
  cJSON *v2 = decode_as(how, &again, line1, n1, lim, err, sizeof err);
  FUZZ_REQUIRE(v2 != NULL, "the encoding of a valid value is refused: %s\nline: %s", err, line1);
  FUZZ_REQUIRE(again == kind, "kind %d became %d: %s", (int)kind, (int)again, line1);
  char *line2 = sg__fl_encode_line(v2, &n2);
  FUZZ_REQUIRE(line2 && n1 == n2 && memcmp(line1, line2, n1) == 0,
               "not canonical:\n%s%s", line1, line2 ? line2 : "(null)\n");
  free(line1);
  free(line2);
  cJSON_Delete(v2);
}

static void decode_one(int how, sg__fl_kind kind, const char *s, size_t n, const limits *lim) {
  char err[512];
  cJSON *v = decode_as(how, &kind, s, n, lim, err, sizeof err);
  if (!v) {
    FUZZ_REQUIRE(err[0] != '\0' || how == AS_KIND, "a refusal without a reason");
    return;
  }
  check_canonical(how, kind, v, lim);
  const cJSON *type = cJSON_GetObjectItemCaseSensitive(v, "type");
  if (cJSON_IsString(type)) (void)sg__fl_expected_response(type->valuestring);
  cJSON_Delete(v);
}

/* Walks a trace's values and decodes each in every way. */
static void decode_all(const trace *t, const limits *lim) {
  static const sg__fl_kind kinds[] = {SG_FL_UPDATE, SG_FL_REQUEST_BODY, SG_FL_RESPONSE_BODY,
                                     SG_FL_MESSAGE_CONTENT, SG_FL_RESPONSE};
  size_t at = 0;
  while (at < t->values_len) {
    uint64_t offset;
    size_t len;
    memcpy(&offset, t->p + at, sizeof offset);
    memcpy(&len, t->p + at + sizeof offset, sizeof len);
    const char *value = t->p + at + sizeof offset + sizeof len;
    decode_one(AS_BACKEND, SG_FL_UPDATE, value, len, lim);
    decode_one(AS_INIT, SG_FL_INIT_INFO, value, len, lim);
    decode_one(AS_REQUEST, SG_FL_REQUEST, value, len, lim);
    for (size_t k = 0; k < sizeof kinds / sizeof kinds[0]; k++)
      decode_one(AS_KIND, kinds[k], value, len, lim);
    at = (size_t)(value + len - t->p);
  }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < 1) return 0;
  limits lim = {0, {0, 0}};
  if (data[0] & 0x80) {
    lim.max_value = 512;
    lim.fl.max_depth = 8;
    lim.fl.max_attachment_bytes = 64;
  }
  const char *s = (const char *)data + 1;
  size_t n = size - 1;
  trace whole = {0}, pieces = {0};
  frame(s, n, &lim, 0, &whole);
  frame(s, n, &lim, 1 + (data[0] & 0x3f), &pieces);
  FUZZ_REQUIRE(whole.len == pieces.len && memcmp(whole.p, pieces.p, whole.len) == 0,
               "framing depends on how the stream is split (max piece %d)",
               1 + (data[0] & 0x3f));
  /* Values framed before a failure are decoded too: that is what a host does. */
  decode_all(&whole, &lim);
  free(whole.p);
  free(pieces.p);
  return 0;
}
