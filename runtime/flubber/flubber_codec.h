/* The flubber backend protocol 0.1.0 codec (spec/backend-protocol.md):
 * strict validation of every type and variant, both directions, over cJSON
 * trees. A validated tree is normalized: optional fields get their defaults
 * (extra: null, debug_info: null, retry: false, value: null for Success),
 * so encode(decode(x)) is canonical. Unknown object fields are ignored, as
 * serde does, and dropped by the normalization, which also puts the known
 * fields in declaration order; a missing required field, a repeated field,
 * a wrong type or an unknown variant is an error.
 *
 * Errors name the field path and what was expected. A path starts at the
 * message's own variant (the body of a Request or Response, or the Update)
 * once its type is known, else at the kind's name:
 *   MessageSend.value.content.value[2].type: unknown variant "Blink"
 *   MessageSend.value.recipient: missing field
 *   MessageUpsert.value.id: expected a string, found null
 *   Room.value.sendable: expected a boolean, found number 3
 *   Response.sequence_number: expected an unsigned 32-bit integer, found -1
 *   Request.body.type: unknown variant "Foo"
 *   InitInfo.protocol_version: expected [0, 1, x], found [0, 2, 0]
 *   MessageContent.value.value.value.(55 more).value.value.value.value.value.value:
 *     nested deeper than 64 levels
 * (a wrong type says "found <type> <value>", a number out of range only
 * "found <value>"; a very deep path keeps its first and last steps).
 * Parse errors name the stream byte offset:
 *   invalid JSON at byte offset 213 (near "value: \"Hello, w")
 *   invalid JSON at byte offset 40: unexpected control byte 0x0a
 *   invalid JSON at byte offset 64: nested deeper than 64 levels
 *
 * Numbers: cJSON keeps them as doubles, so integer fields are exact only
 * within +-2^53; int64 fields (create_time, edit_time) are limited to that.
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
} sg__fl_kind;

/* A zero field selects its default. */
typedef struct sg__fl_limits {
  int max_depth;                 /* JSON nesting (MessageContent recursion too); default 64 */
  size_t max_attachment_bytes;   /* decoded bytes of one attachment; default 16 MiB */
} sg__fl_limits;

#define SG_FL_DEFAULT_MAX_DEPTH 64
#define SG_FL_DEFAULT_MAX_ATTACHMENT (16u << 20)
#define SG_FL_DEFAULT_MAX_VALUE (64u << 20)

/* Validates `v` as `kind` and normalizes it in place (adds defaults). `lim`
 * may be NULL (defaults). Returns 0, or SG_EPROTO with "path: message" in
 * err (always NUL-terminated, truncated to errlen); SG_ENOMEM if adding a
 * default failed, SG_EINVAL for a NULL tree or an unknown kind. On error the
 * tree may be partly normalized; it stays a valid tree for cJSON_Delete. */
int sg__fl_validate(cJSON *v, sg__fl_kind kind, const sg__fl_limits *lim,
                   char *err, size_t errlen);

/* Parses one framed value (json[0..len)) that a backend sent, which started at
 * stream offset `offset`, classifies it (a Response if it is an object with
 * both "sequence_number" and "body", else an Update; or an InitInfo when
 * `expect_init` is non-zero) and validates it. Returns the tree (caller
 * frees with cJSON_Delete) and sets *kind, or NULL with the error in err
 * (byte offsets are stream offsets). json need not be NUL-terminated; only
 * whitespace may follow the value. Besides what cJSON rejects, a strict
 * reader's rules apply: no control bytes outside JSON whitespace, no raw
 * control characters in strings, no "\u0000" (cJSON would cut the string
 * there), no byte order mark, valid UTF-8 in strings. */
/* What a value a backend sent is: its first value is the InitInfo
 * (`expect_init`), later ones a Response when they carry sequence_number and
 * body, else an Update. The one rule, for every transport. */
sg__fl_kind sg__fl_classify_backend(const cJSON *v, int expect_init);

cJSON *sg__fl_decode_backend(const char *json, size_t len, uint64_t offset,
                            int expect_init, const sg__fl_limits *lim,
                            sg__fl_kind *kind, char *err, size_t errlen);

/* The same for a value the server sent (a Request), as a standalone backend
 * reads it. */
cJSON *sg__fl_decode_request(const char *json, size_t len, uint64_t offset,
                            const sg__fl_limits *lim, char *err, size_t errlen);

/* The only non-Error ResponseBody variant that answers RequestBody variant
 * `request_type` ("RoomLookup" -> "RoomID"), or NULL if unknown. */
const char *sg__fl_expected_response(const char *request_type);

/* Encodes `v` as one line: unformatted JSON and '\n'. Returns a malloc'd
 * NUL-terminated string (free with free()) and its length in *len, or NULL
 * on out of memory. Does not validate. Numbers that cJSON 1.7 would print
 * inexactly or in exponent form (integers from 1e15 up, some fractions) are
 * written exactly, so 9007199254740992 stays 9007199254740992. */
char *sg__fl_encode_line(const cJSON *v, size_t *len);

#endif
