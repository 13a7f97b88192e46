/* The flubber protocol codec: every variant round-trips to its canonical
 * text, normalization fills defaults, and each kind of bad input is refused
 * with the path and message a backend author would need. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>
#include <sodium.h>

#include "flubber_codec.h"
#include "json_framer.h"
#include "segue.h"
#include "tap.h"

static char err[512];

/* validate + encode of `in` as `kind`; the line without its '\n' (static
 * buffer), or "error: <message>". */
static const char *normalized(const char *in, sg__fl_kind kind, const sg__fl_limits *lim) {
  static char out[8192];
  cJSON *v = cJSON_Parse(in);
  if (!v) return "error: test input is not JSON";
  int rc = sg__fl_validate(v, kind, lim, err, sizeof err);
  size_t len = 0;
  char *line = rc == 0 ? sg__fl_encode_line(v, &len) : NULL;
  if (rc != 0) snprintf(out, sizeof out, "error: %s", err);
  else if (!line || len != strlen(line) || line[len - 1] != '\n') snprintf(out, sizeof out, "bad line");
  else snprintf(out, sizeof out, "%.*s", (int)len - 1, line);
  free(line);
  cJSON_Delete(v);
  return out;
}

/* The validation error for `in`, or "ok". */
static const char *refusal(const char *in, sg__fl_kind kind, const sg__fl_limits *lim) {
  const char *r = normalized(in, kind, lim);
  return strncmp(r, "error: ", 7) == 0 ? r + 7 : "ok";
}

/* Canonical text goes through unchanged. */
static int round_trips(const char *canonical, sg__fl_kind kind) {
  const char *got = normalized(canonical, kind, NULL);
  if (strcmp(got, canonical) == 0) return 1;
  fprintf(stderr, "  in:  %s\n  out: %s\n", canonical, got);
  return 0;
}

#define MSG "{\"id\":\"m1\",\"sender\":\"@u\",\"recipient\":\"#r\",\"attachments\":[{\"mime\":" \
            "\"image/png\",\"data\":\"aGVsbG8=\"}],\"content\":{\"type\":\"Text\",\"value\":"  \
            "\"hi\"},\"create_time\":1700000000000,\"edit_time\":1700000000001,\"extra\":"  \
            "{\"k\":[1,2.5]}}"
#define ROOM "{\"id\":\"#r\",\"parent\":\"#p\",\"name\":\"r\",\"sendable\":false}"

static void every_variant_round_trips(void) {
  static const char *const requests[] = {
      "{\"sequence_number\":0,\"body\":{\"type\":\"MessageGetBefore\",\"value\":\"m1\"}}",
      "{\"sequence_number\":1,\"body\":{\"type\":\"MessageGet\",\"value\":\"m1\"}}",
      "{\"sequence_number\":2,\"body\":{\"type\":\"MessageSend\",\"value\":{\"recipient\":\"#g\","
      "\"attachments\":[{\"mime\":\"text/plain; charset=utf-8\",\"data\":\"\"}],\"content\":"
      "{\"type\":\"Text\",\"value\":\"hi\"},\"extra\":null}}}",
      "{\"sequence_number\":3,\"body\":{\"type\":\"RoomGet\",\"value\":\"#r\"}}",
      "{\"sequence_number\":4,\"body\":{\"type\":\"RoomCreate\",\"value\":{\"parent\":null,"
      "\"name\":\"r\",\"sendable\":true}}}",
      "{\"sequence_number\":5,\"body\":{\"type\":\"RoomLookup\",\"value\":\"#general\"}}",
      "{\"sequence_number\":6,\"body\":{\"type\":\"RoomJoin\",\"value\":\"#r\"}}",
      "{\"sequence_number\":4294967295,\"body\":{\"type\":\"RoomLeave\",\"value\":\"#r\"}}"};
  static const char *const responses[] = {
      "{\"sequence_number\":0,\"body\":{\"type\":\"Success\",\"value\":null}}",
      "{\"sequence_number\":1,\"body\":{\"type\":\"Message\",\"value\":" MSG "}}",
      "{\"sequence_number\":2,\"body\":{\"type\":\"Room\",\"value\":" ROOM "}}",
      "{\"sequence_number\":3,\"body\":{\"type\":\"MessageID\",\"value\":\"m1\"}}",
      "{\"sequence_number\":4,\"body\":{\"type\":\"RoomID\",\"value\":\"#r\"}}",
      "{\"sequence_number\":5,\"body\":{\"type\":\"Error\",\"value\":{\"message\":\"boom\","
      "\"debug_info\":{\"code\":7},\"retry\":true}}}"};
  static const char *const updates[] = {
      "{\"type\":\"RoomUpsert\",\"value\":" ROOM "}",
      "{\"type\":\"RoomDelete\",\"value\":\"#r\"}",
      "{\"type\":\"MessageUpsert\",\"value\":" MSG "}",
      "{\"type\":\"MessageDelete\",\"value\":\"m1\"}"};
  static const char *const contents[] = {
      "{\"type\":\"Text\",\"value\":\"plain \\\"quoted\\\" \xc3\xa9\"}",
      "{\"type\":\"Bold\",\"value\":{\"type\":\"Text\",\"value\":\"b\"}}",
      "{\"type\":\"Italic\",\"value\":{\"type\":\"Text\",\"value\":\"i\"}}",
      "{\"type\":\"Underline\",\"value\":{\"type\":\"Text\",\"value\":\"u\"}}",
      "{\"type\":\"Crossout\",\"value\":{\"type\":\"Text\",\"value\":\"c\"}}",
      "{\"type\":\"Concat\",\"value\":[{\"type\":\"Text\",\"value\":\"a\"},{\"type\":\"Bold\","
      "\"value\":{\"type\":\"Italic\",\"value\":{\"type\":\"Text\",\"value\":\"b\"}}}]}",
      "{\"type\":\"Concat\",\"value\":[]}",
      "{\"type\":\"Emote\",\"value\":\"wave\"}",
      "{\"type\":\"MessageLink\",\"value\":\"m1\"}",
      "{\"type\":\"RoomLink\",\"value\":\"#r\"}",
      "{\"type\":\"UserLink\",\"value\":\"@u\"}",
      "{\"type\":\"UrlLink\",\"value\":\"https://example.org/\"}"};
  for (size_t i = 0; i < sizeof requests / sizeof *requests; i++)
    CHECK(round_trips(requests[i], SG_FL_REQUEST));
  for (size_t i = 0; i < sizeof responses / sizeof *responses; i++)
    CHECK(round_trips(responses[i], SG_FL_RESPONSE));
  for (size_t i = 0; i < sizeof updates / sizeof *updates; i++)
    CHECK(round_trips(updates[i], SG_FL_UPDATE));
  for (size_t i = 0; i < sizeof contents / sizeof *contents; i++)
    CHECK(round_trips(contents[i], SG_FL_MESSAGE_CONTENT));
  CHECK(round_trips("{\"type\":\"RoomJoin\",\"value\":\"#r\"}", SG_FL_REQUEST_BODY));
  CHECK(round_trips("{\"type\":\"Success\",\"value\":null}", SG_FL_RESPONSE_BODY));
}

typedef struct codec_case {
  sg__fl_kind kind;
  const char *in, *want;
} codec_case;

static void check_cases(const codec_case *cs, size_t n,
                        const char *(*run)(const char *, sg__fl_kind, const sg__fl_limits *)) {
  for (size_t i = 0; i < n; i++) CHECK_STR(run(cs[i].in, cs[i].kind, NULL), cs[i].want);
}

static void normalization_fills_defaults_and_drops_unknown_fields(void) {
  static const codec_case cases[] = {
    {SG_FL_MESSAGE_CONTENT,
     "{\"type\":\"Text\",\"value\":\"\\u00e9\\n\"}",
     "{\"type\":\"Text\",\"value\":\"\xc3\xa9\\n\"}"},
    {SG_FL_RESPONSE_BODY,
     "{\"type\":\"Success\"}",
     "{\"type\":\"Success\",\"value\":null}"},
    {SG_FL_REQUEST_BODY,
     "{\"value\":\"#r\",\"colour\":\"red\",\"type\":\"RoomGet\"}",
     "{\"type\":\"RoomGet\",\"value\":\"#r\"}"},
    {SG_FL_RESPONSE_BODY,
     "{\"type\":\"Error\",\"value\":{\"message\":\"x\"}}",
     "{\"type\":\"Error\",\"value\":{\"message\":\"x\",\"debug_info\":null,"
     "\"retry\":false}}"},
    {SG_FL_UPDATE,
     "{\"type\":\"RoomUpsert\",\"value\":{\"sendable\":true,\"name\":\"n\","
     "\"colour\":1,\"id\":\"#r\"}}",
     "{\"type\":\"RoomUpsert\",\"value\":{\"id\":\"#r\",\"parent\":null,\"name\":\"n\","
     "\"sendable\":true}}"},
    {SG_FL_REQUEST,
     "{\"body\":{\"type\":\"MessageSend\",\"value\":{\"recipient\":\"#g\","
     "\"attachments\":[],\"content\":{\"type\":\"Text\",\"value\":\"x\"}}},"
     "\"sequence_number\":-0}",
     "{\"sequence_number\":0,\"body\":{\"type\":\"MessageSend\",\"value\":{\"recipient\":"
     "\"#g\",\"attachments\":[],\"content\":{\"type\":\"Text\",\"value\":\"x\"},"
     "\"extra\":null}}}"},
  };
  check_cases(cases, sizeof cases / sizeof *cases, normalized);
}

static void expected_responses(void) {
  CHECK_STR(sg__fl_expected_response("MessageGetBefore"), "Success");
  CHECK_STR(sg__fl_expected_response("MessageGet"), "Message");
  CHECK_STR(sg__fl_expected_response("MessageSend"), "MessageID");
  CHECK_STR(sg__fl_expected_response("RoomGet"), "Room");
  CHECK_STR(sg__fl_expected_response("RoomCreate"), "RoomID");
  CHECK_STR(sg__fl_expected_response("RoomLookup"), "RoomID");
  CHECK_STR(sg__fl_expected_response("RoomJoin"), "Success");
  CHECK_STR(sg__fl_expected_response("RoomLeave"), "Success");
  CHECK(sg__fl_expected_response("Blink") == NULL);
  CHECK(sg__fl_expected_response(NULL) == NULL);
}

static void init_info_versions(void) {
  static const struct {
    const char *backend_version, *protocol_version, *want;
  } cases[] = {
      {"[0,0,1]", "[0,1,0]", "ok"},
      {"[4294967295,0,1]", "[0,1,7]", "ok"},
      {"[0,0,1]", "[0,2,0]", "InitInfo.protocol_version: expected [0, 1, x], found [0, 2, 0]"},
      {"[0,0,1]", "[1,1,0]", "InitInfo.protocol_version: expected [0, 1, x], found [1, 1, 0]"},
      {"[0,0,1]", "[0,1]",
       "InitInfo.protocol_version: expected [0, 1, x], found an array of 2 elements"},
      {"[0,0,-1]", "[0,1,0]",
       "InitInfo.backend_version[2]: expected an unsigned 32-bit integer, found -1"},
      {"\"1.0\"", "[0,1,0]",
       "InitInfo.backend_version: expected an array of 3 unsigned 32-bit integers, found "
       "string \"1.0\""},
      {"[0,0,1,2]", "[0,1,0]",
       "InitInfo.backend_version: expected an array of 3 unsigned 32-bit integers, found "
       "an array of 4 elements"},
  };
  char s[256];
  for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
    snprintf(s, sizeof s,
             "{\"backend_name\":\"Example\",\"backend_version\":%s,\"protocol_version\":%s}",
             cases[i].backend_version, cases[i].protocol_version);
    CHECK_STR(refusal(s, SG_FL_INIT_INFO, NULL), cases[i].want);
  }
  CHECK_STR(refusal("{\"backend_version\":[0,0,1],\"protocol_version\":[0,1,0]}",
                    SG_FL_INIT_INFO, NULL),
            "InitInfo.backend_name: missing field");
}

#define SEND(content)                                                                      \
  "{\"sequence_number\":5,\"body\":{\"type\":\"MessageSend\",\"value\":{\"recipient\":\"#g\"," \
  "\"attachments\":[],\"content\":" content "}}}"

static void error_paths(void) {
  static const codec_case cases[] = {
    {SG_FL_REQUEST,
     SEND("{\"type\":\"Concat\",\"value\":[{\"type\":\"Text\",\"value\":\"a\"},"
          "{\"type\":\"Bold\",\"value\":{\"type\":\"Text\",\"value\":\"b\"}},"
          "{\"type\":\"Blink\",\"value\":\"c\"}]}"),
     "MessageSend.value.content.value[2].type: unknown variant \"Blink\""},
    {SG_FL_REQUEST,
     "{\"sequence_number\":5,\"body\":{\"type\":\"MessageSend\",\"value\":{"
     "\"attachments\":[],\"content\":{\"type\":\"Text\",\"value\":\"x\"}}}}",
     "MessageSend.value.recipient: missing field"},
    {SG_FL_REQUEST,
     SEND("{\"value\":\"x\"}"),
     "MessageSend.value.content.type: missing field"},
    {SG_FL_REQUEST,
     SEND("{\"type\":\"Bold\"}"),
     "MessageSend.value.content.value: missing field"},
    {SG_FL_RESPONSE,
     "{\"sequence_number\":1}",
     "Response.body: missing field"},
    {SG_FL_RESPONSE,
     "{\"sequence_number\":1,\"body\":\"x\"}",
     "Response.body: expected an object, found string \"x\""},
    {SG_FL_REQUEST,
     "{\"sequence_number\":1,\"body\":{\"type\":\"Foo\"}}",
     "Request.body.type: unknown variant \"Foo\""},
    {SG_FL_UPDATE,
     "{\"type\":\"Foo\",\"value\":1}",
     "Update.type: unknown variant \"Foo\""},
    {SG_FL_UPDATE,
     "[]",
     "Update: expected an object, found an array"},
    {SG_FL_REQUEST_BODY,
     "{\"type\":1}",
     "RequestBody.type: expected a string, found number 1"},
    {SG_FL_REQUEST_BODY,
     "{\"type\":\"RoomGet\",\"value\":3}",
     "RoomGet.value: expected a string, found number 3"},
    {SG_FL_REQUEST_BODY,
     "{\"type\":\"RoomGet\",\"type\":\"RoomJoin\",\"value\":\"#r\"}",
     "RequestBody.type: duplicate field"},
    {SG_FL_RESPONSE_BODY,
     "{\"type\":\"Success\",\"value\":5}",
     "Success.value: expected null, found number 5"},
    {SG_FL_UPDATE,
     "{\"type\":\"MessageUpsert\",\"value\":{\"id\":null}}",
     "MessageUpsert.value.id: expected a string, found null"},
    {SG_FL_RESPONSE_BODY,
     "{\"type\":\"Room\",\"value\":{\"id\":\"#r\",\"name\":\"n\",\"sendable\":3}}",
     "Room.value.sendable: expected a boolean, found number 3"},
    {SG_FL_REQUEST_BODY,
     "{\"type\":\"RoomCreate\",\"value\":{\"parent\":1,\"name\":\"n\","
     "\"sendable\":true}}",
     "RoomCreate.value.parent: expected a string or null, found number 1"},
    {SG_FL_RESPONSE_BODY,
     "{\"type\":\"Error\",\"value\":{\"message\":\"m\",\"retry\":\"yes\"}}",
     "Error.value.retry: expected a boolean, found string \"yes\""},
    {SG_FL_MESSAGE_CONTENT,
     "{\"type\":\"Text\",\"value\":[\"a\"]}",
     "MessageContent.value: expected a string, found an array"},
  };
  check_cases(cases, sizeof cases / sizeof *cases, refusal);
}

/* Message times: int64 on the wire, exact in cJSON only within +-2^53. */
static void message_times(void) {
  char s[1024];
  const char *times[][2] = {{"1.5", "found 1.5"},
                            {"9007199254740994", "found 9007199254740994"},
                            {"true", "found boolean true"}};
  for (size_t i = 0; i < 3; i++) {
    snprintf(s, sizeof s,
             "{\"type\":\"MessageUpsert\",\"value\":{\"id\":\"m\",\"sender\":\"u\",\"recipient\":"
             "\"r\",\"attachments\":[],\"content\":{\"type\":\"Text\",\"value\":\"x\"},"
             "\"create_time\":%s,\"edit_time\":0}}", times[i][0]);
    char want[256];
    snprintf(want, sizeof want,
             "MessageUpsert.value.create_time: expected a 64-bit integer within +-2^53, %s",
             times[i][1]);
    CHECK_STR(refusal(s, SG_FL_UPDATE, NULL), want);
  }
}

static const char *request_with_seq(const char *seq) {
  static char s[256];
  snprintf(s, sizeof s, "{\"sequence_number\":%s,\"body\":{\"type\":\"RoomJoin\",\"value\":\"#r\"}}",
           seq);
  cJSON *v = sg__fl_decode_request(s, strlen(s), 0, NULL, err, sizeof err);
  if (!v) return err;
  char *line = sg__fl_encode_line(v, NULL);
  snprintf(s, sizeof s, "%s", line);
  free(line);
  cJSON_Delete(v);
  return s;
}

static void sequence_numbers(void) {
  CHECK_STR(request_with_seq("0"),
            "{\"sequence_number\":0,\"body\":{\"type\":\"RoomJoin\",\"value\":\"#r\"}}\n");
  CHECK_STR(request_with_seq("4294967295"),
            "{\"sequence_number\":4294967295,\"body\":{\"type\":\"RoomJoin\",\"value\":\"#r\"}}\n");
  CHECK_STR(request_with_seq("-1"),
            "Request.sequence_number: expected an unsigned 32-bit integer, found -1");
  CHECK_STR(request_with_seq("4294967296"),
            "Request.sequence_number: expected an unsigned 32-bit integer, found 4294967296");
  CHECK_STR(request_with_seq("1.5"),
            "Request.sequence_number: expected an unsigned 32-bit integer, found 1.5");
  CHECK_STR(request_with_seq("\"1\""),
            "Request.sequence_number: expected an unsigned 32-bit integer, found string \"1\"");
}

static const char *attachment(const char *mime, const char *data, size_t limit) {
  static char s[16384];
  sg__fl_limits lim = {0, limit};
  snprintf(s, sizeof s,
           "{\"type\":\"MessageSend\",\"value\":{\"recipient\":\"#g\",\"attachments\":[{\"mime\":"
           "\"%s\",\"data\":\"%s\"}],\"content\":{\"type\":\"Text\",\"value\":\"x\"}}}",
           mime, data);
  return refusal(s, SG_FL_REQUEST_BODY, &lim);
}

static void attachments(void) {
  const char *bad_b64 = "MessageSend.value.attachments[0].data: invalid base64 (expected the "
                        "standard alphabet with padding)";
  CHECK_STR(attachment("image/png", "aGVsbG8=", 0), "ok");
  CHECK_STR(attachment("image/png", "aGVsbG8=", 5), "ok");
  CHECK_STR(attachment("image/png", "aGVsbG8=", 4),
            "MessageSend.value.attachments[0].data: attachment of 5 bytes exceeds the limit "
            "of 4 bytes");
  /* unpadded base64 is accepted (and padded), as the Rust decoder accepts it */
  CHECK_STR(attachment("image/png", "aGVsbG8", 0), "ok");
  CHECK_STR(attachment("image/png", "aGVsbA", 0), "ok");
  CHECK_STR(attachment("image/png", "aGVsbG8", 4),
            "MessageSend.value.attachments[0].data: attachment of 5 bytes exceeds the limit "
            "of 4 bytes");
  CHECK_STR(attachment("image/png", "aGVsb", 0),
            "MessageSend.value.attachments[0].data: invalid base64: 5 characters, not a "
            "multiple of 4 (nor unpadded base64)");
  CHECK_STR(attachment("image/png", "aGVsbG=", 0),
            "MessageSend.value.attachments[0].data: invalid base64: 7 characters, not a "
            "multiple of 4 (nor unpadded base64)");
  CHECK_STR(attachment("image/png", "aGVs*G8=", 0), bad_b64);
  CHECK_STR(attachment("image/png", "aGVs-_8=", 0), bad_b64); /* URL-safe alphabet */
  CHECK_STR(attachment("image/png", "aGVsbG9=", 0), bad_b64); /* non-zero padding bits */
  CHECK_STR(attachment("image/png", "aGVsbG8=aGVs", 0), bad_b64);
  const char *bad_mimes[] = {"png", "", "image/", "/png", "image/png extra", "image png",
                             "image/png "};
  for (size_t i = 0; i < sizeof bad_mimes / sizeof *bad_mimes; i++) {
    char want[256];
    snprintf(want, sizeof want,
             "MessageSend.value.attachments[0].mime: expected a MIME type such as "
             "\"image/png\", found string \"%s\"", bad_mimes[i]);
    CHECK_STR(attachment(bad_mimes[i], "", 0), want);
  }
  /* Large data is decoded in chunks: valid across chunk boundaries, and
   * padding that ends an inner chunk is still refused. */
  unsigned char bin[9000];
  char b64[12100];
  for (size_t i = 0; i < sizeof bin; i++) bin[i] = (unsigned char)(i * 131 + 7);
  sodium_bin2base64(b64, sizeof b64, bin, sizeof bin, sodium_base64_VARIANT_ORIGINAL);
  CHECK_STR(attachment("application/octet-stream", b64, 0), "ok");
  CHECK_STR(attachment("application/octet-stream", b64, 8999),
            "MessageSend.value.attachments[0].data: attachment of 9000 bytes exceeds the "
            "limit of 8999 bytes");
  memset(b64, 'A', 4092);
  memcpy(b64 + 4092, "QQ==QUFB", 9);
  CHECK_STR(attachment("image/png", b64, 0), bad_b64);
}

/* n nested Bold around a Text: n + 1 JSON objects. */
static char *bold_chain(int n) {
  char *s = malloc((size_t)n * 40 + 64);
  size_t len = 0;
  for (int i = 0; i < n; i++) len += (size_t)sprintf(s + len, "{\"type\":\"Bold\",\"value\":");
  len += (size_t)sprintf(s + len, "{\"type\":\"Text\",\"value\":\"x\"}");
  for (int i = 0; i < n; i++) s[len++] = '}';
  s[len] = '\0';
  return s;
}

static void depth_limits(void) {
  sg__fl_limits lim = {4, 0};
  char *ok = bold_chain(3), *deep = bold_chain(4), *deeper = bold_chain(100);
  CHECK_STR(refusal(ok, SG_FL_MESSAGE_CONTENT, &lim), "ok");
  CHECK_STR(refusal(deep, SG_FL_MESSAGE_CONTENT, &lim),
            "MessageContent.value.value.value.value: nested deeper than 4 levels");
  /* A long path keeps its ends, so the message survives. */
  CHECK_STR(refusal(deeper, SG_FL_MESSAGE_CONTENT, NULL),
            "MessageContent.value.value.value.(55 more).value.value.value.value.value.value: "
            "nested deeper than 64 levels");
  /* Decoding refuses it before cJSON builds the tree, at the 65th '{'. */
  char *req = malloc(strlen(deeper) + 256);
  sprintf(req, SEND("%s"), deeper);
  const char *brace = req;
  for (int i = 0; i < 65; i++) brace = strchr(brace, '{') + 1;
  char want[128];
  snprintf(want, sizeof want, "invalid JSON at byte offset %zu: nested deeper than 64 levels",
           (size_t)(brace - 1 - req) + 1000);
  CHECK(sg__fl_decode_request(req, strlen(req), 1000, NULL, err, sizeof err) == NULL);
  CHECK_STR(err, want);
  /* Free-form JSON is bounded too. */
  CHECK_STR(refusal("{\"type\":\"Error\",\"value\":{\"message\":\"m\",\"debug_info\":"
                    "{\"a\":[[1]]}}}", SG_FL_RESPONSE_BODY, &lim),
            "Error.value.debug_info.a[0]: nested deeper than 4 levels");
  free(ok);
  free(deep);
  free(deeper);
  free(req);
}

static void numbers_encode_exactly(void) {
  const char *in = "{\"type\":\"MessageUpsert\",\"value\":{\"id\":\"m\",\"sender\":\"u\","
                   "\"recipient\":\"r\",\"attachments\":[],\"content\":{\"type\":\"Text\","
                   "\"value\":\"x\"},\"create_time\":9007199254740992,\"edit_time\":"
                   "1000000000000000,\"extra\":[0.30000000000000004,1e300,-2.5,12345678901234567890]}}";
  const char *out = normalized(in, SG_FL_UPDATE, NULL);
  CHECK(strstr(out, "\"create_time\":9007199254740992,") != NULL);
  CHECK(strstr(out, "\"edit_time\":1000000000000000,") != NULL);
  CHECK(strstr(out, "[0.30000000000000004,1e+300,-2.5,12345678901234567168]") != NULL);
  /* And what cJSON alone would have printed, which is why the codec steps in. */
  cJSON *n = cJSON_CreateNumber(9007199254740992.0);
  char *plain = cJSON_PrintUnformatted(n);
  CHECK_STR(plain, "9.00719925474099e+15");
  cJSON_free(plain);
  cJSON_Delete(n);
}

static void utf8_and_control_bytes(void) {
  cJSON *v = cJSON_CreateObject();
  cJSON_AddStringToObject(v, "type", "RoomGet");
  cJSON_AddStringToObject(v, "value", "a\xff");
  CHECK(sg__fl_validate(v, SG_FL_REQUEST_BODY, NULL, err, sizeof err) == SG_EPROTO);
  CHECK_STR(err, "RoomGet.value: invalid UTF-8 in a string at byte 1");
  cJSON_Delete(v);
  const char *ctl = "{\"type\":\"RoomDelete\",\"value\":\"a\nb\"}";
  CHECK(sg__fl_decode_backend(ctl, strlen(ctl), 100, 0, NULL, NULL, err, sizeof err) == NULL);
  CHECK_STR(err, "invalid JSON at byte offset 131: unexpected control byte 0x0a");
  const char *nul = "{\"type\":\"RoomDelete\",\"value\":\"a\\u0000b\"}";
  CHECK(sg__fl_decode_backend(nul, strlen(nul), 0, 0, NULL, NULL, err, sizeof err) == NULL);
  CHECK_STR(err, "invalid JSON at byte offset 31: \\u0000 in a string is not supported");
  const char *trailing = "{} x";
  CHECK(sg__fl_decode_backend(trailing, 4, 0, 0, NULL, NULL, err, sizeof err) == NULL);
  CHECK_STR(err, "invalid JSON at byte offset 3 (near \"{} x\")");
}

/* The value need not be NUL-terminated: an exact-size copy (ASan watches
 * the byte after it) decodes, and classification picks Response/Update. */
static void decodes_exactly_len_bytes(void) {
  const char *texts[] = {"{\"sequence_number\":3,\"body\":{\"type\":\"RoomID\",\"value\":\"#r\"}} ",
                         "{\"type\":\"RoomDelete\",\"value\":\"#r\"}", "42"};
  sg__fl_kind kinds[] = {SG_FL_RESPONSE, SG_FL_UPDATE, SG_FL_UPDATE};
  for (int i = 0; i < 3; i++) {
    size_t len = strlen(texts[i]);
    char *exact = malloc(len);
    memcpy(exact, texts[i], len);
    sg__fl_kind kind = SG_FL_INIT_INFO;
    cJSON *v = sg__fl_decode_backend(exact, len, 0, 0, NULL, &kind, err, sizeof err);
    CHECK((v != NULL) == (i < 2));
    CHECK(i == 2 || kind == kinds[i]);
    cJSON_Delete(v);
    free(exact);
  }
  CHECK_STR(err, "Update: expected an object, found number 42");
}

/* ---- the seed's example session ------------------------------------------ */

static char *read_fixture(const char *name) {
  const char *dir = getenv("SEGUE_SOURCE_DIR");
  char path[1024];
  snprintf(path, sizeof path, "%s/tests/fixtures/flubber/%s", dir ? dir : ".", name);
  FILE *fp = fopen(path, "rb");
  if (!fp) return NULL;
  char *s = calloc(1, 1 << 16);
  size_t n = fread(s, 1, (1 << 16) - 1, fp);
  s[n] = '\0';
  fclose(fp);
  return s;
}

typedef struct session_line {
  char who;         /* 'P' backend, 'S' server */
  size_t at, len;   /* in the text without prefixes */
} session_line;

/* Drops the "P: " / "S: " prefixes in place; records where each line is. */
static int strip_prefixes(char *s, session_line *lines, int max) {
  char *out = s;
  int n = 0;
  for (char *line = s; *line && n < max;) {
    char *end = strchr(line, '\n');
    size_t len = end ? (size_t)(end - line) : strlen(line);
    lines[n].who = line[0];
    lines[n].at = (size_t)(out - s);
    lines[n].len = len - 3;
    memmove(out, line + 3, len - 3);
    out += len - 3;
    *out++ = '\n';
    n++;
    line += len + (end != NULL);
  }
  *out = '\0';
  return n;
}

static int count_framed(void *ud, const char *v, size_t len, uint64_t off) {
  (void)v, (void)len, (void)off;
  ++*(int *)ud;
  return 0;
}

/* S lines decode as Requests, P lines as backend values (the first an
 * InitInfo, then Responses of the variant the request before wants), except
 * the MessageSend line, whose stray quote is reported with its offset. */
static void session_lines_decode(const char *text, const session_line *lines, int n) {
  const char *expect = NULL;
  int refused = 0;
  for (int i = 0; i < n; i++) {
    const char *line = text + lines[i].at;
    sg__fl_kind kind = SG_FL_MESSAGE_CONTENT;
    cJSON *v = lines[i].who == 'S'
                   ? sg__fl_decode_request(line, lines[i].len, lines[i].at, NULL, err, sizeof err)
                   : sg__fl_decode_backend(line, lines[i].len, lines[i].at, i == 0, NULL, &kind,
                                          err, sizeof err);
    const char *bad = strstr(line, "\"value: \"Hello");
    if (bad && bad < line + lines[i].len) {
      /* cJSON reads `"value: "` as the key, then finds H where the ':'
       * must be: one byte after the quote that ended the key. */
      char want[128];
      snprintf(want, sizeof want, "invalid JSON at byte offset %zu (near \"value: \\\"Hello, w\")",
               (size_t)(bad - text) + strlen("\"value: \""));
      CHECK(v == NULL);
      CHECK_STR(err, want);
      expect = "MessageID"; /* what the backend answered anyway */
      refused++;
      cJSON_Delete(v);
      continue;
    }
    if (!v) fprintf(stderr, "  line %d: %s\n", i + 1, err);
    CHECK(v != NULL);
    const char *type =
        cJSON_GetStringValue(cJSON_GetObjectItem(cJSON_GetObjectItem(v, "body"), "type"));
    if (lines[i].who == 'S') expect = sg__fl_expected_response(type);
    else if (i == 0) CHECK(kind == SG_FL_INIT_INFO);
    else CHECK(kind == SG_FL_RESPONSE && type && expect && strcmp(type, expect) == 0);
    cJSON_Delete(v);
  }
  CHECK(refused == 1);
}

static void example_session(void) {
  char *text = read_fixture("example_session.txt");
  CHECK(text != NULL);
  if (!text) return;
  session_line lines[16];
  int n = strip_prefixes(text, lines, 16);
  CHECK(n == 7);
  session_lines_decode(text, lines, n);
  /* Through the framer as one stream: five values, then the bad line's odd
   * quote count swallows the rest, and the stream ends inside a value. */
  sg__framer f;
  int framed = 0;
  char want[128];
  sg__framer_init(&f, 0, 0);
  CHECK(sg__framer_feed(&f, text, strlen(text), count_framed, &framed) == 0);
  CHECK(framed == 5);
  CHECK(sg__framer_finish(&f, count_framed, &framed) == SG_EPROTO);
  snprintf(want, sizeof want, "stream ended inside a value that started at byte offset %zu",
           n > 5 ? lines[5].at : 0);
  CHECK_STR(f.err, want);
  sg__framer_free(&f);
  free(text);
}

int main(void) {
  every_variant_round_trips();
  normalization_fills_defaults_and_drops_unknown_fields();
  expected_responses();
  init_info_versions();
  error_paths();
  message_times();
  sequence_numbers();
  attachments();
  depth_limits();
  numbers_encode_exactly();
  utf8_and_control_bytes();
  decodes_exactly_len_bytes();
  example_session();
  return tap_done();
}
