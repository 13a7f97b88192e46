/* The streaming JSON framer: value boundaries over arbitrary splits, and the
 * errors (with their stream offsets) for bytes and sizes it must refuse. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "json_framer.h"
#include "segue.h"
#include "tap.h"

/* Every delivered value, joined with '\n' (no test value contains one
 * unescaped except the pretty-printed ones, which are compared by index). */
typedef struct collected {
  char *text[512];
  uint64_t offset[512];
  int n;
  int nul_terminated; /* every value had buffer[len] == '\0' */
  int stop_at;        /* return 7 when the value with this index arrives */
} collected;

static int collect(void *ud, const char *value, size_t len, uint64_t offset) {
  collected *c = ud;
  if (value[len] != '\0') c->nul_terminated = 0;
  if (c->n < 512) {
    c->text[c->n] = malloc(len + 1);
    memcpy(c->text[c->n], value, len + 1);
    c->offset[c->n] = offset;
  }
  c->n++;
  return c->n - 1 == c->stop_at ? 7 : 0;
}

static void collected_init(collected *c) {
  memset(c, 0, sizeof *c);
  c->nul_terminated = 1;
  c->stop_at = -1;
}

static void collected_free(collected *c) {
  for (int i = 0; i < c->n && i < 512; i++) free(c->text[i]);
  collected_init(c);
}

/* Feeds the whole string in one call and finishes the stream. */
static int frame_all(sg__framer *f, const char *s, collected *c) {
  int rc = sg__framer_feed(f, s, strlen(s), collect, c);
  return rc ? rc : sg__framer_finish(f, collect, c);
}

/* Frames `stream` fed in `chunk`-byte pieces (0: all at once) and finishes;
 * true if exactly the n values `want` arrived, each at the stream offset
 * where it next occurs, NUL-terminated. `before_finish` values must have
 * arrived before sg__framer_finish (the rest wait for the end of stream). */
static int frames_to(const char *stream, size_t chunk, const char *const *want, int n,
                     int before_finish) {
  sg__framer f;
  collected c;
  size_t len = strlen(stream);
  int ok = 1;
  collected_init(&c);
  sg__framer_init(&f, 0, 0);
  if (chunk == 0) chunk = len;
  for (size_t at = 0; at < len && ok; at += chunk)
    ok = sg__framer_feed(&f, stream + at, len - at < chunk ? len - at : chunk, collect, &c) == 0;
  ok = ok && c.n == before_finish && sg__framer_finish(&f, collect, &c) == 0 && c.n == n;
  const char *from = stream;
  for (int i = 0; ok && i < n; i++) {
    const char *where = strstr(from, want[i]);
    ok = where && strcmp(c.text[i], want[i]) == 0 && c.offset[i] == (uint64_t)(where - stream);
    from = where ? where + strlen(want[i]) : from;
  }
  if (!ok)
    for (int i = 0; i < c.n && i < 512; i++)
      fprintf(stderr, "  value %d at %llu: %s\n", i, (unsigned long long)c.offset[i], c.text[i]);
  ok = ok && c.nul_terminated;
  collected_free(&c);
  sg__framer_free(&f);
  return ok;
}

static void one_value_byte_by_byte(void) {
  const char *v[] = {"{\"a\": [1, 2, {\"b\": \"}\"}], \"c\": \"x\\\"y\", \"d\": -1.5e3}"};
  CHECK(frames_to(v[0], 1, v, 1, 1));
}

static void several_values_in_one_feed(void) {
  const char *want[] = {"{\"a\":1}", "[2]", "\"s\"", "3", "true", "null"};
  /* The trailing space ends "null", so all six arrive before finish. */
  CHECK(frames_to(" {\"a\":1}\n[2]\r\n\t\"s\" 3 true null ", 0, want, 6, 6));
}

static void values_without_separators(void) {
  const char *want[] = {"{}", "[]", "{\"x\":1}", "\"a\"", "\"b\"", "[0]", "12", "{\"k\":true}",
                        "7"};
  CHECK(frames_to("{}[]{\"x\":1}\"a\"\"b\"[0]12{\"k\":true}7", 0, want, 9, 8));
}

static void pretty_printed_values(void) {
  const char *want[] = {
      "{\n  \"type\": \"Concat\",\n  \"value\": [\n    {\n      \"type\": \"Text\",\n"
      "      \"value\": \"a\"\n    }\n  ]\n}",
      "[\n  1,\n  [\n    2\n  ]\n]"};
  char s[256];
  snprintf(s, sizeof s, "%s\n\n%s\n", want[0], want[1]);
  CHECK(frames_to(s, 0, want, 2, 2));
  CHECK(frames_to(s, 5, want, 2, 2));
}

static void strings_with_braces_quotes_and_backslashes(void) {
  /* {"a":"}{][","b":"\"}","c":"\\","d":"\\\""}  then  "}\\"  then  [1] */
  const char *want[] = {"{\"a\":\"}{][\",\"b\":\"\\\"}\",\"c\":\"\\\\\",\"d\":\"\\\\\\\"\"}",
                        "\"}\\\\\"", "[1]"};
  char s[128];
  snprintf(s, sizeof s, "%s%s%s", want[0], want[1], want[2]);
  for (size_t chunk = 1; chunk <= 4; chunk++) /* splits land inside escapes */
    CHECK(frames_to(s, chunk, want, 3, 3));
}

/* Feeds s to a fresh framer; returns feed's result and leaves f->err set. */
static int feed_fresh(sg__framer *f, size_t max_value, int max_depth, const char *s,
                      collected *c) {
  sg__framer_init(f, max_value, max_depth);
  return sg__framer_feed(f, s, strlen(s), collect, c);
}

static void garbage_bytes(void) {
  sg__framer f;
  collected c;
  collected_init(&c);
  CHECK(feed_fresh(&f, 0, 0, "{\"a\":1}  x{}", &c) == SG_EPROTO);
  CHECK_STR(f.err, "unexpected byte 'x' (0x78) where a JSON value must start at byte offset 9");
  CHECK(f.err_offset == 9);
  CHECK(c.n == 1);
  /* Sticky until reset; then offsets restart at 0. */
  CHECK(sg__framer_feed(&f, "{}", 2, collect, &c) == SG_EPROTO);
  CHECK(sg__framer_finish(&f, collect, &c) == SG_EPROTO);
  CHECK(c.n == 1);
  sg__framer_reset(&f);
  CHECK(f.err[0] == '\0');
  CHECK(sg__framer_feed(&f, " []", 3, collect, &c) == 0);
  CHECK(c.n == 2 && c.offset[1] == 1);
  sg__framer_free(&f);

  CHECK(feed_fresh(&f, 0, 0, "}", &c) == SG_EPROTO);
  CHECK_STR(f.err, "unexpected byte '}' (0x7d) where a JSON value must start at byte offset 0");
  sg__framer_free(&f);
  CHECK(feed_fresh(&f, 0, 0, "1,2", &c) == SG_EPROTO);
  CHECK_STR(f.err, "unexpected byte ',' (0x2c) where a JSON value must start at byte offset 1");
  CHECK(c.n == 3 && strcmp(c.text[2], "1") == 0);
  sg__framer_free(&f);
  CHECK(feed_fresh(&f, 0, 0, "\xef\xbb\xbf{}", &c) == SG_EPROTO);
  CHECK_STR(f.err, "unexpected byte 0xef where a JSON value must start at byte offset 0");
  sg__framer_free(&f);
  collected_free(&c);
}

static void overlong_value(void) {
  sg__framer f;
  collected c;
  collected_init(&c);
  /* 16 bytes fit a 16-byte limit; the 17-byte value after it does not. */
  const char *fits = "[\"0123456789ab\"]", *too_long = "[\"0123456789abc\"]";
  sg__framer_init(&f, 16, 0);
  CHECK(sg__framer_feed(&f, fits, strlen(fits), collect, &c) == 0);
  CHECK(c.n == 1);
  int rc = 0;
  for (size_t i = 0; i < strlen(too_long) && rc == 0; i++)
    rc = sg__framer_feed(&f, too_long + i, 1, collect, &c);
  CHECK(rc == SG_EPROTO);
  CHECK_STR(f.err, "value starting at byte offset 16 exceeds the limit of 16 bytes");
  CHECK(f.err_offset == 32);
  CHECK(c.n == 1);
  CHECK(f.cap <= 17);
  sg__framer_free(&f);

  /* A megabyte in one chunk is refused without buffering it. */
  size_t big = 1 << 20;
  char *s = malloc(big + 1);
  memset(s, 'a', big);
  s[0] = '"';
  s[big] = '\0';
  CHECK(feed_fresh(&f, 1000, 0, s, &c) == SG_EPROTO);
  CHECK_STR(f.err, "value starting at byte offset 0 exceeds the limit of 1000 bytes");
  CHECK(f.cap <= 1001);
  free(s);
  sg__framer_free(&f);
  collected_free(&c);
}

static void too_deep(void) {
  sg__framer f;
  collected c;
  collected_init(&c);
  CHECK(feed_fresh(&f, 0, 3, "[[[1]]] {\"a\":{\"b\":[[2]]}}", &c) == SG_EPROTO);
  CHECK_STR(f.err, "value starting at byte offset 8 nests deeper than 3 levels at byte offset 19");
  CHECK(f.err_offset == 19);
  CHECK(c.n == 1 && strcmp(c.text[0], "[[[1]]]") == 0);
  sg__framer_free(&f);
  collected_free(&c);
}

static void stream_ends_inside_a_value(void) {
  sg__framer f;
  collected c;
  collected_init(&c);
  CHECK(feed_fresh(&f, 0, 0, "{} {\"a\":", &c) == 0);
  CHECK(sg__framer_finish(&f, collect, &c) == SG_EPROTO);
  CHECK_STR(f.err, "stream ended inside a value that started at byte offset 3");
  CHECK(f.err_offset == 8);
  CHECK(c.n == 1);
  sg__framer_free(&f);
  CHECK(feed_fresh(&f, 0, 0, "\"abc\\", &c) == 0);
  CHECK(sg__framer_finish(&f, collect, &c) == SG_EPROTO);
  CHECK_STR(f.err, "stream ended inside a value that started at byte offset 0");
  sg__framer_free(&f);
  collected_free(&c);
}

static void bare_scalar_at_finish(void) {
  sg__framer f;
  collected c;
  collected_init(&c);
  CHECK(feed_fresh(&f, 0, 0, "4", &c) == 0);
  CHECK(sg__framer_feed(&f, "2", 1, collect, &c) == 0);
  CHECK(c.n == 0); /* "42" might still go on */
  CHECK(sg__framer_finish(&f, collect, &c) == 0);
  CHECK(c.n == 1);
  CHECK_STR(c.text[0], "42");
  CHECK(c.nul_terminated);
  sg__framer_free(&f);
  CHECK(feed_fresh(&f, 0, 0, "1 -1.5e+3", &c) == 0);
  CHECK(c.n == 2);
  CHECK(sg__framer_finish(&f, collect, &c) == 0);
  CHECK(c.n == 3);
  CHECK_STR(c.text[2], "-1.5e+3");
  CHECK(c.offset[2] == 2);
  sg__framer_free(&f);
  collected_free(&c);
}

static void callback_stops_the_feed(void) {
  sg__framer f;
  collected c;
  collected_init(&c);
  c.stop_at = 1;
  CHECK(feed_fresh(&f, 0, 0, "{}[]{}", &c) == 7);
  CHECK(c.n == 2);
  CHECK(f.offset == 4); /* the third value was not consumed */
  sg__framer_free(&f);
  collected_free(&c);
}

/* ---- random splits ----------------------------------------------------- */

static uint64_t rng_state = 0x9E3779B97F4A7C15u;
static uint32_t rng(void) { /* xorshift64: the same splits on every run */
  rng_state ^= rng_state << 13;
  rng_state ^= rng_state >> 7;
  rng_state ^= rng_state << 17;
  return (uint32_t)(rng_state >> 32);
}

static const char *const pieces[] = {
    "{\"sequence_number\": 1, \"body\": {\"type\": \"RoomID\", \"value\": \"#a\"}}",
    "[1, [2, [3, \"]]]\"]]]",
    "{\n  \"k\": \"\\\"{\\\\\",\n  \"v\": [\n    true\n  ]\n}",
    "\"top-level \\\" string\"",
    "-12.5e-3",
    "null",
    "{}",
};
#define NPIECES (sizeof pieces / sizeof pieces[0])

/* Up to 512 values; bare scalars are followed by whitespace, since "1" "2"
 * back to back would be the number 12. */
static char *make_stream(int n, int *which) {
  size_t cap = 1 << 16, len = 0;
  char *s = malloc(cap);
  for (int i = 0; i < n; i++) {
    which[i] = (int)(rng() % NPIECES);
    const char *sep = (rng() % 3 == 0) ? "" : (rng() % 2 ? "\n" : " \t\r\n");
    if (which[i] == 4 || which[i] == 5) sep = " ";
    len += (size_t)snprintf(s + len, cap - len, "%s%s", pieces[which[i]], sep);
  }
  return s;
}

static void random_splits_give_the_same_values(void) {
  int which[400];
  char *s = make_stream(400, which);
  size_t len = strlen(s);
  collected ref, got;
  collected_init(&ref);
  sg__framer f;
  sg__framer_init(&f, 0, 0);
  CHECK(frame_all(&f, s, &ref) == 0);
  CHECK(ref.n == 400);
  int ok = ref.n == 400;
  for (int i = 0; ok && i < 400; i++) ok = strcmp(ref.text[i], pieces[which[i]]) == 0;
  CHECK(ok);
  for (int round = 0; round < 50; round++) {
    collected_init(&got);
    sg__framer_reset(&f);
    int rc = 0;
    for (size_t at = 0; at < len && rc == 0;) {
      size_t n = 1 + rng() % (round % 2 ? 7 : 300);
      if (n > len - at) n = len - at;
      rc = sg__framer_feed(&f, s + at, n, collect, &got);
      at += n;
    }
    if (rc == 0) rc = sg__framer_finish(&f, collect, &got);
    int same = rc == 0 && got.n == ref.n;
    for (int i = 0; same && i < ref.n; i++)
      same = strcmp(got.text[i], ref.text[i]) == 0 && got.offset[i] == ref.offset[i];
    CHECK(same);
    CHECK(got.nul_terminated);
    collected_free(&got);
  }
  collected_free(&ref);
  sg__framer_free(&f);
  free(s);
}

int main(void) {
  one_value_byte_by_byte();
  several_values_in_one_feed();
  values_without_separators();
  pretty_printed_values();
  strings_with_braces_quotes_and_backslashes();
  garbage_bytes();
  overlong_value();
  too_deep();
  stream_ends_inside_a_value();
  bare_scalar_at_finish();
  callback_stops_the_feed();
  random_splits_give_the_same_values();
  return tap_done();
}
