/* The flubber backend protocol 0.1.0 codec (spec/backend-protocol.md):
 * strict validation of every type and variant, both directions, over cJSON
 * trees. A validated tree is normalized: optional fields get their defaults
 * (extra: null, debug_info: null, retry: false, value: null for Success),
 * so encode(decode(x)) is canonical.
 *
 * Errors name the field path and what was expected, rooted at the innermost
 * tagged variant of the message:
 *   MessageSend.value.content.value[2].type: unknown variant "Blink"
 *   Response.sequence_number: expected an unsigned 32-bit integer, found -1
 *   InitInfo.protocol_version: expected [0, 1, x], found [0, 2, 0]
 * Parse errors name the byte offset:
 *   invalid JSON at byte offset 57: ...
 */
#ifndef SEGUE_FLUBBER_CODEC_H
#define SEGUE_FLUBBER_CODEC_H
#include <stddef.h>
#include <stdint.h>
#include <cjson/cJSON.h>

typedef enum {
  SG_FL_INIT_INFO,
  SG_FL_REQUEST,        /* {"sequence_number", "body": RequestBody} */
  SG_FL_RESPONSE,       /* {"sequence_number", "body": ResponseBody} */
  SG_FL_UPDATE,
  SG_FL_REQUEST_BODY,
  SG_FL_RESPONSE_BODY,
  SG_FL_MESSAGE_CONTENT
} sg_fl_kind;

typedef struct sg_fl_limits {
  int max_depth;                 /* JSON nesting (MessageContent recursion too); default 64 */
  size_t max_attachment_bytes;   /* decoded bytes of one attachment; default 16 MiB */
} sg_fl_limits;

#define SG_FL_DEFAULT_MAX_DEPTH 64
#define SG_FL_DEFAULT_MAX_ATTACHMENT (16u << 20)
#define SG_FL_DEFAULT_MAX_VALUE (64u << 20)

/* Validates `v` as `kind` and normalizes it in place (adds defaults). `lim`
 * may be NULL (defaults). Returns 0, or SG_EPROTO with "path: message" in
 * err (always NUL-terminated, truncated to errlen). */
int sg_fl_validate(cJSON *v, sg_fl_kind kind, const sg_fl_limits *lim,
                   char *err, size_t errlen);

/* Parses one framed value (json[0..len)) that a backend sent, which started at
 * stream offset `offset`, classifies it (a Response if it is an object with
 * both "sequence_number" and "body", else an Update; or an InitInfo when
 * `expect_init` is non-zero) and validates it. Returns the tree (caller
 * frees with cJSON_Delete) and sets *kind, or NULL with the error in err
 * (byte offsets are stream offsets). */
cJSON *sg_fl_decode_backend(const char *json, size_t len, uint64_t offset,
                            int expect_init, const sg_fl_limits *lim,
                            sg_fl_kind *kind, char *err, size_t errlen);

/* The same for a value the server sent (a Request), as a standalone backend
 * reads it. */
cJSON *sg_fl_decode_request(const char *json, size_t len, uint64_t offset,
                            const sg_fl_limits *lim, char *err, size_t errlen);

/* The only non-Error ResponseBody variant that answers RequestBody variant
 * `request_type` ("RoomLookup" -> "RoomID"), or NULL if unknown. */
const char *sg_fl_expected_response(const char *request_type);

/* Encodes `v` as one line: unformatted JSON and '\n'. Returns a malloc'd
 * NUL-terminated string (free with free()) and its length in *len, or NULL
 * on out of memory. Does not validate. */
char *sg_fl_encode_line(const cJSON *v, size_t *len);

#endif
