/* The flubber backend protocol codec: a table of types (objects, adjacently
 * tagged unions, arrays, scalars) walked over a cJSON tree.
 *
 * Like serde, which the Rust crate uses, unknown object fields are ignored;
 * normalization then drops them and puts the known fields in declaration
 * order, so encode(validate(x)) is the canonical text. */
#include "flubber_codec.h"

#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <sodium.h>

#include "segue.h"

/* ---- types ---------------------------------------------------------------- */

/* One node of an error path; the chain lives on the C stack, so a path costs
 * nothing until an error prints it. */
typedef struct fl_path {
  const struct fl_path *up; /* NULL at the root */
  const char *key;          /* NULL: the array element `index` */
  size_t index;
  int depth;                /* containers around this node */
} fl_path;

typedef struct fl_ctx {
  int max_depth;
  size_t max_attachment;
  char *err;
  size_t errlen;
} fl_ctx;

typedef struct fl_type fl_type;
typedef int (*fl_check)(fl_ctx *c, cJSON *v, const fl_type *t, const fl_path *p);

typedef struct fl_field {
  const char *name;
  const fl_type *type;
  cJSON *(*dflt)(void);     /* NULL: required */
} fl_field;

typedef struct fl_variant {
  const char *name;
  const fl_type *payload;   /* NULL: no payload; value null or absent */
  const char *answer;       /* RequestBody: the ResponseBody variant answering it */
} fl_variant;

struct fl_type {
  fl_check check;
  const char *expected;        /* for "expected X, found Y" */
  const fl_field *fields;      /* objects; ends with a NULL name */
  const fl_variant *variants;  /* unions; ends with a NULL name */
  const fl_type *elem;         /* arrays */
  int rebase;                  /* a body union: its variant name roots error paths */
};

#define FL_MAX_FIELDS 8
#define B64_CHUNK 4096 /* base64 characters decoded at a time */

static int check_string(fl_ctx *c, cJSON *v, const fl_type *t, const fl_path *p);
static int check_opt_string(fl_ctx *c, cJSON *v, const fl_type *t, const fl_path *p);
static int check_u32(fl_ctx *c, cJSON *v, const fl_type *t, const fl_path *p);
static int check_i64(fl_ctx *c, cJSON *v, const fl_type *t, const fl_path *p);
static int check_bool(fl_ctx *c, cJSON *v, const fl_type *t, const fl_path *p);
static int check_null(fl_ctx *c, cJSON *v, const fl_type *t, const fl_path *p);
static int check_any(fl_ctx *c, cJSON *v, const fl_type *t, const fl_path *p);
static int check_version(fl_ctx *c, cJSON *v, const fl_type *t, const fl_path *p);
static int check_protocol_version(fl_ctx *c, cJSON *v, const fl_type *t, const fl_path *p);
static int check_mime(fl_ctx *c, cJSON *v, const fl_type *t, const fl_path *p);
static int check_base64(fl_ctx *c, cJSON *v, const fl_type *t, const fl_path *p);
static int check_array(fl_ctx *c, cJSON *v, const fl_type *t, const fl_path *p);
static int check_object(fl_ctx *c, cJSON *v, const fl_type *t, const fl_path *p);
static int check_union(fl_ctx *c, cJSON *v, const fl_type *t, const fl_path *p);

/* Designated initializers throughout: the tables stay short and -Wextra
 * does not ask for every member. */
#define SCALAR(fn, what) {.check = fn, .expected = what}
#define OBJECT(f) {.check = check_object, .expected = "an object", .fields = f}
#define ARRAY(of) {.check = check_array, .expected = "an array", .elem = of}
#define UNION(v, root) {.check = check_union, .expected = "an object", .variants = v, .rebase = root}
#define FIELD(n, t) {.name = n, .type = t}
#define OPTIONAL(n, t, d) {.name = n, .type = t, .dflt = d}
#define VARIANT(n, t) {.name = n, .payload = t}
#define REQUEST(n, t, answered_by) {.name = n, .payload = t, .answer = answered_by}
#define END {.name = NULL}

static const fl_type t_string = SCALAR(check_string, "a string");
static const fl_type t_opt_string = SCALAR(check_opt_string, "a string or null");
static const fl_type t_u32 = SCALAR(check_u32, "an unsigned 32-bit integer");
static const fl_type t_i64 = SCALAR(check_i64, "a 64-bit integer within +-2^53");
static const fl_type t_bool = SCALAR(check_bool, "a boolean");
static const fl_type t_null = SCALAR(check_null, "null");
static const fl_type t_any = SCALAR(check_any, "a JSON value");
static const fl_type t_version = {.check = check_version,
                                  .expected = "an array of 3 unsigned 32-bit integers",
                                  .elem = &t_u32};
static const fl_type t_protocol_version = {.check = check_protocol_version,
                                           .expected = "[0, 1, x]", .elem = &t_u32};
static const fl_type t_mime = SCALAR(check_mime, "a MIME type such as \"image/png\"");
static const fl_type t_base64 = SCALAR(check_base64, "a string of standard base64");

static const fl_type t_content; /* recursive */
static const fl_type t_content_list = ARRAY(&t_content);
static const fl_variant content_variants[] = {
    VARIANT("Text", &t_string),       VARIANT("Bold", &t_content),
    VARIANT("Italic", &t_content),    VARIANT("Underline", &t_content),
    VARIANT("Crossout", &t_content),  VARIANT("Concat", &t_content_list),
    VARIANT("Emote", &t_string),      VARIANT("MessageLink", &t_string),
    VARIANT("RoomLink", &t_string),   VARIANT("UserLink", &t_string),
    VARIANT("UrlLink", &t_string),    END};
static const fl_type t_content = UNION(content_variants, 0);

static const fl_field attachment_fields[] = {
    FIELD("mime", &t_mime), FIELD("data", &t_base64), END};
static const fl_type t_attachment = OBJECT(attachment_fields);
static const fl_type t_attachments = ARRAY(&t_attachment);

static const fl_field message_fields[] = {
    FIELD("id", &t_string),           FIELD("sender", &t_string),
    FIELD("recipient", &t_string),    FIELD("attachments", &t_attachments),
    FIELD("content", &t_content),     FIELD("create_time", &t_i64),
    FIELD("edit_time", &t_i64),       OPTIONAL("extra", &t_any, cJSON_CreateNull),
    END};
static const fl_type t_message = OBJECT(message_fields);

static const fl_field new_message_fields[] = {
    FIELD("recipient", &t_string),    FIELD("attachments", &t_attachments),
    FIELD("content", &t_content),     OPTIONAL("extra", &t_any, cJSON_CreateNull),
    END};
static const fl_type t_new_message = OBJECT(new_message_fields);

static const fl_field room_fields[] = {
    FIELD("id", &t_string),           OPTIONAL("parent", &t_opt_string, cJSON_CreateNull),
    FIELD("name", &t_string),         FIELD("sendable", &t_bool),
    END};
static const fl_type t_room = OBJECT(room_fields);

static const fl_field new_room_fields[] = {
    OPTIONAL("parent", &t_opt_string, cJSON_CreateNull), FIELD("name", &t_string),
    FIELD("sendable", &t_bool),       END};
static const fl_type t_new_room = OBJECT(new_room_fields);

static const fl_field error_fields[] = {
    FIELD("message", &t_string),      OPTIONAL("debug_info", &t_any, cJSON_CreateNull),
    OPTIONAL("retry", &t_bool, cJSON_CreateFalse), END};
static const fl_type t_response_error = OBJECT(error_fields);

/* "capabilities" is segue's extension (docs/spec/backend-protocol.md):
 * free-form here, checked field by field by segue.degrade; other hosts,
 * like serde, ignore it. */
static const fl_field init_info_fields[] = {
    FIELD("backend_name", &t_string), FIELD("backend_version", &t_version),
    FIELD("protocol_version", &t_protocol_version), OPTIONAL("capabilities", &t_any, cJSON_CreateNull), END};
static const fl_type t_init_info = OBJECT(init_info_fields);

static const fl_variant request_variants[] = {
    REQUEST("MessageGetBefore", &t_string, "Success"),
    REQUEST("MessageGet", &t_string, "Message"),
    REQUEST("MessageSend", &t_new_message, "MessageID"),
    REQUEST("RoomGet", &t_string, "Room"),
    REQUEST("RoomCreate", &t_new_room, "RoomID"),
    REQUEST("RoomLookup", &t_string, "RoomID"),
    REQUEST("RoomJoin", &t_string, "Success"),
    REQUEST("RoomLeave", &t_string, "Success"),
    END};
static const fl_type t_request_body = UNION(request_variants, 1);

static const fl_variant response_variants[] = {
    VARIANT("Success", NULL),         VARIANT("Message", &t_message),
    VARIANT("Room", &t_room),         VARIANT("MessageID", &t_string),
    VARIANT("RoomID", &t_string),     VARIANT("Error", &t_response_error),
    END};
static const fl_type t_response_body = UNION(response_variants, 1);

static const fl_variant update_variants[] = {
    VARIANT("RoomUpsert", &t_room),   VARIANT("RoomDelete", &t_string),
    VARIANT("MessageUpsert", &t_message), VARIANT("MessageDelete", &t_string),
    END};
static const fl_type t_update = UNION(update_variants, 1);

static const fl_field request_fields[] = {
    FIELD("sequence_number", &t_u32), FIELD("body", &t_request_body), END};
static const fl_type t_request = OBJECT(request_fields);
static const fl_field response_fields[] = {
    FIELD("sequence_number", &t_u32), FIELD("body", &t_response_body), END};
static const fl_type t_response = OBJECT(response_fields);

/* The tag object of every union; "value" defaults to null for unit variants
 * (check_union requires it for the others). */
static const fl_field tag_fields[] = {
    FIELD("type", &t_string), OPTIONAL("value", &t_any, cJSON_CreateNull), END};

static const struct {
  const char *root;
  const fl_type *type;
} kinds[] = {
    [SG_FL_INIT_INFO] = {"InitInfo", &t_init_info},
    [SG_FL_REQUEST] = {"Request", &t_request},
    [SG_FL_RESPONSE] = {"Response", &t_response},
    [SG_FL_UPDATE] = {"Update", &t_update},
    [SG_FL_REQUEST_BODY] = {"RequestBody", &t_request_body},
    [SG_FL_RESPONSE_BODY] = {"ResponseBody", &t_response_body},
    [SG_FL_MESSAGE_CONTENT] = {"MessageContent", &t_content},
};

/* ---- error text ------------------------------------------------------------ */

/* Appends to a fixed buffer, truncating; always NUL-terminated if cap > 0. */
typedef struct sb {
  char *s;
  size_t cap, len;
} sb;

static void sb_init(sb *b, char *s, size_t cap) {
  b->s = s;
  b->cap = s ? cap : 0;
  b->len = 0;
  if (b->cap) s[0] = '\0';
}

static void sb_vprintf(sb *b, const char *fmt, va_list ap) {
  size_t room = b->len < b->cap ? b->cap - b->len : 0;
  int n = vsnprintf(room ? b->s + b->len : NULL, room, fmt, ap);
  if (n > 0) b->len += (size_t)n;
}

static void sb_printf(sb *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void sb_printf(sb *b, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  sb_vprintf(b, fmt, ap);
  va_end(ap);
}

/* Shortens n to a UTF-8 character boundary of s. */
static size_t utf8_floor(const char *s, size_t n) {
  while (n > 0 && ((unsigned char)s[n] & 0xC0) == 0x80) n--;
  return n;
}

/* A quoted, escaped excerpt: at most 40 bytes of s[0..n), "..." if cut. */
static void sb_quote(sb *b, const char *s, size_t n) {
  size_t show = n > 40 ? utf8_floor(s, 40) : n;
  sb_printf(b, "\"");
  for (size_t i = 0; i < show; i++) {
    unsigned char ch = (unsigned char)s[i];
    if (ch == '"' || ch == '\\') sb_printf(b, "\\%c", ch);
    else if (ch < 0x20 || ch == 0x7f) sb_printf(b, "\\x%02x", ch);
    else sb_printf(b, "%c", ch);
  }
  sb_printf(b, show < n ? "...\"" : "\"");
}

/* The shortest "%g" text that reads back as d. */
static void format_number(char *buf, size_t cap, double d) {
  snprintf(buf, cap, "%.15g", d);
  if (strtod(buf, NULL) != d) snprintf(buf, cap, "%.17g", d);
}

static int is_str(const cJSON *v) { return cJSON_IsString(v) && v->valuestring; }

/* "number 3", "string \"x\"", "null"...; `typed` 0 drops the type word
 * for a value of the right type but out of range ("found -1"). */
static void describe(char *out, size_t cap, const cJSON *v, int typed) {
  sb b;
  sb_init(&b, out, cap);
  if (cJSON_IsNumber(v)) {
    char num[32];
    format_number(num, sizeof num, v->valuedouble);
    sb_printf(&b, "%s%s", typed ? "number " : "", num);
  } else if (is_str(v)) {
    sb_printf(&b, typed ? "string " : "");
    sb_quote(&b, v->valuestring, strlen(v->valuestring));
  } else {
    sb_printf(&b, "%s", cJSON_IsNull(v)    ? "null"
                        : cJSON_IsTrue(v)  ? "boolean true"
                        : cJSON_IsFalse(v) ? "boolean false"
                        : cJSON_IsArray(v) ? "an array"
                        : cJSON_IsObject(v) ? "an object"
                                            : "an unknown value");
  }
}

static int path_length(const fl_path *p) {
  int n = 0;
  for (; p; p = p->up) n++;
  return n;
}

#define PATH_HEAD 4
#define PATH_TAIL 6
/* Root first. A long path (deep MessageContent) keeps its head and tail so
 * the message after it survives truncation. */
static void sb_path(sb *b, const fl_path *p, int pos, int total) {
  if (p->up) sb_path(b, p->up, pos - 1, total);
  if (pos >= PATH_HEAD && pos < total - PATH_TAIL) {
    if (pos == PATH_HEAD) sb_printf(b, ".(%d more)", total - PATH_HEAD - PATH_TAIL);
  } else if (!p->key) {
    sb_printf(b, "[%zu]", p->index);
  } else {
    sb_printf(b, pos ? ".%s" : "%s", p->key);
  }
}

static int fail(fl_ctx *c, const fl_path *p, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static int fail(fl_ctx *c, const fl_path *p, const char *fmt, ...) {
  sb b;
  va_list ap;
  sb_init(&b, c->err, c->errlen);
  sb_path(&b, p, path_length(p) - 1, path_length(p));
  sb_printf(&b, ": ");
  va_start(ap, fmt);
  sb_vprintf(&b, fmt, ap);
  va_end(ap);
  return SG_EPROTO;
}

static int mismatch(fl_ctx *c, const fl_path *p, const char *expected, const cJSON *v,
                    int typed) {
  char found[192];
  describe(found, sizeof found, v, typed);
  return fail(c, p, "expected %s, found %s", expected, found);
}

/* ---- walking --------------------------------------------------------------- */

static fl_path child_of(const fl_path *up, const char *key, size_t index) {
  fl_path p = {up, key, index, up->depth + 1};
  return p;
}

static int check_at(fl_ctx *c, const fl_type *t, cJSON *v, const fl_path *up,
                    const char *key, size_t index) {
  fl_path p = child_of(up, key, index);
  return t->check(c, v, t, &p);
}

/* A container at depth d opens nesting level d + 1. */
static int enter(fl_ctx *c, const fl_path *p) {
  if (p->depth < c->max_depth) return 0;
  return fail(c, p, "nested deeper than %d levels", c->max_depth);
}

/* Length of the valid UTF-8 sequence at s (n bytes available), or 0:
 * no overlongs, surrogates or code points past U+10FFFF. */
static size_t utf8_sequence(const unsigned char *s, size_t n) {
  unsigned len, i;
  uint32_t cp, min;
  if (s[0] < 0x80) return 1;
  if (s[0] >= 0xC2 && s[0] <= 0xDF) len = 2, cp = s[0] & 0x1F, min = 0x80;
  else if ((s[0] & 0xF0) == 0xE0) len = 3, cp = s[0] & 0x0F, min = 0x800;
  else if (s[0] >= 0xF0 && s[0] <= 0xF4) len = 4, cp = s[0] & 0x07, min = 0x10000;
  else return 0;
  if (n < len) return 0;
  for (i = 1; i < len; i++) {
    if ((s[i] & 0xC0) != 0x80) return 0;
    cp = cp << 6 | (s[i] & 0x3F);
  }
  if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return 0;
  return len;
}

/* Rust strings are UTF-8: a Rust backend cannot read anything else. */
static int check_utf8(fl_ctx *c, const fl_path *p, const char *s, const char *what) {
  size_t n = strlen(s);
  for (size_t i = 0, k; i < n; i += k) {
    k = utf8_sequence((const unsigned char *)s + i, n - i);
    if (!k) return fail(c, p, "invalid UTF-8 in %s at byte %zu", what, i);
  }
  return 0;
}

/* ---- scalars --------------------------------------------------------------- */

static int check_string(fl_ctx *c, cJSON *v, const fl_type *t, const fl_path *p) {
  if (!is_str(v)) return mismatch(c, p, t->expected, v, 1);
  return check_utf8(c, p, v->valuestring, "a string");
}

static int check_opt_string(fl_ctx *c, cJSON *v, const fl_type *t, const fl_path *p) {
  return cJSON_IsNull(v) ? 0 : check_string(c, v, t, p);
}

/* Integer-valued numbers only ("1.5" is not a u32, as in serde). -0 becomes
 * 0: cJSON would print "-0", which serde reads as a float. */
static int check_integer(fl_ctx *c, cJSON *v, const fl_type *t, const fl_path *p, double lo,
                         double hi) {
  if (!cJSON_IsNumber(v)) return mismatch(c, p, t->expected, v, 1);
  double d = v->valuedouble;
  if (!(d >= lo && d <= hi && d == floor(d))) return mismatch(c, p, t->expected, v, 0);
  if (d == 0) cJSON_SetNumberHelper(v, 0);
  return 0;
}

static int check_u32(fl_ctx *c, cJSON *v, const fl_type *t, const fl_path *p) {
  return check_integer(c, v, t, p, 0, 4294967295.0);
}

/* cJSON keeps numbers as doubles, exact for integers only within +-2^53;
 * past that an i64 would be silently rounded, so it is refused instead. */
static int check_i64(fl_ctx *c, cJSON *v, const fl_type *t, const fl_path *p) {
  return check_integer(c, v, t, p, -9007199254740992.0, 9007199254740992.0);
}

static int check_bool(fl_ctx *c, cJSON *v, const fl_type *t, const fl_path *p) {
  return cJSON_IsBool(v) ? 0 : mismatch(c, p, t->expected, v, 1);
}

static int check_null(fl_ctx *c, cJSON *v, const fl_type *t, const fl_path *p) {
  return cJSON_IsNull(v) ? 0 : mismatch(c, p, t->expected, v, 1);
}

/* Free-form JSON (extra, debug_info): still bounded in depth, UTF-8 and
 * finite, so that it can be re-encoded for a strict reader. */
static int check_any(fl_ctx *c, cJSON *v, const fl_type *t, const fl_path *p) {
  if (cJSON_IsNull(v) || cJSON_IsBool(v)) return 0;
  if (is_str(v)) return check_utf8(c, p, v->valuestring, "a string");
  if (cJSON_IsNumber(v))
    return isfinite(v->valuedouble) ? 0 : mismatch(c, p, "a finite number", v, 0);
  if (!cJSON_IsArray(v) && !cJSON_IsObject(v)) return mismatch(c, p, t->expected, v, 1);
  int rc = enter(c, p);
  size_t i = 0;
  for (cJSON *it = v->child; rc == 0 && it; it = it->next, i++) {
    const char *key = cJSON_IsObject(v) ? it->string : NULL;
    if (cJSON_IsObject(v) && !key) return fail(c, p, "object member without a name");
    if (key && (rc = check_utf8(c, p, key, "a key")) != 0) break;
    rc = check_at(c, t, it, p, key, i);
  }
  return rc;
}

/* ---- attachments ----------------------------------------------------------- */

/* RFC 2045 token: printable ASCII but no space or tspecials. */
static size_t mime_token(const char *s) {
  size_t n = 0;
  while (s[n] > 0x20 && s[n] < 0x7f && !strchr("()<>@,;:\\\"/[]?=", s[n])) n++;
  return n;
}

/* type/subtype, then optionally "; parameters" in printable ASCII. */
static int looks_like_mime(const char *s) {
  size_t n = mime_token(s);
  if (n == 0 || s[n] != '/') return 0;
  s += n + 1;
  n = mime_token(s);
  if (n == 0) return 0;
  s += n;
  if (*s == '\0') return 1;
  while (*s == ' ' || *s == '\t') s++;
  if (*s != ';') return 0;
  for (; *s; s++)
    if ((unsigned char)*s < 0x20 || (unsigned char)*s >= 0x7f) return 0;
  return 1;
}

static int check_mime(fl_ctx *c, cJSON *v, const fl_type *t, const fl_path *p) {
  if (is_str(v) && looks_like_mime(v->valuestring)) return 0;
  return mismatch(c, p, t->expected, v, 1);
}

/* Decodes chunk by chunk into a stack buffer: validating an attachment
 * never allocates it. Padding may only end the last chunk. */
static int base64_valid(const char *s, size_t n) {
  unsigned char bin[B64_CHUNK / 4 * 3];
  for (size_t at = 0; at < n; at += B64_CHUNK) {
    size_t len = n - at < B64_CHUNK ? n - at : B64_CHUNK, out = 0;
    if (sodium_base642bin(bin, sizeof bin, s + at, len, NULL, &out, NULL,
                          sodium_base64_VARIANT_ORIGINAL) != 0)
      return 0;
    if (at + len < n && out != sizeof bin) return 0;
  }
  return 1;
}

static int check_base64(fl_ctx *c, cJSON *v, const fl_type *t, const fl_path *p) {
  if (!is_str(v)) return mismatch(c, p, t->expected, v, 1);
  const char *s = v->valuestring;
  size_t n = strlen(s);
  /* Unpadded base64 (as the Rust implementation's decoder accepts) is
   * padded here, so what segue passes on and writes is always padded. */
  if ((n % 4 == 2 || n % 4 == 3) && !strchr(s, '=')) {
    char padded[4096], *buf = n + 3 < sizeof padded ? padded : malloc(n + 3);
    if (!buf) return fail(c, p, "out of memory");
    memcpy(buf, s, n);
    while (n % 4) buf[n++] = '=';
    buf[n] = '\0';
    const char *set = cJSON_SetValuestring(v, buf);
    if (buf != padded) free(buf);
    if (!set) return fail(c, p, "out of memory");
    s = v->valuestring;
  }
  if (n % 4 != 0)
    return fail(c, p, "invalid base64: %zu characters, not a multiple of 4 (nor unpadded base64)", n);
  /* The size follows from the length, so an oversized one is refused unread. */
  size_t pad = n && s[n - 1] == '=' ? 1 + (s[n - 2] == '=') : 0;
  size_t size = n / 4 * 3 - pad;
  if (size > c->max_attachment)
    return fail(c, p, "attachment of %zu bytes exceeds the limit of %zu bytes", size,
                c->max_attachment);
  if (!base64_valid(s, n))
    return fail(c, p, "invalid base64 (expected the standard alphabet with padding)");
  return 0;
}

/* ---- versions -------------------------------------------------------------- */

static int check_version(fl_ctx *c, cJSON *v, const fl_type *t, const fl_path *p) {
  if (!cJSON_IsArray(v)) return mismatch(c, p, t->expected, v, 1);
  int n = cJSON_GetArraySize(v);
  if (n != 3) return fail(c, p, "expected %s, found an array of %d elements", t->expected, n);
  return check_array(c, v, t, p);
}

static int check_protocol_version(fl_ctx *c, cJSON *v, const fl_type *t, const fl_path *p) {
  int rc = check_version(c, v, t, p);
  if (rc != 0) return rc;
  double d[3];
  for (int i = 0; i < 3; i++) d[i] = cJSON_GetArrayItem(v, i)->valuedouble;
  if (d[0] == 0 && d[1] == 1) return 0;
  return fail(c, p, "expected %s, found [%.0f, %.0f, %.0f]", t->expected, d[0], d[1], d[2]);
}

/* ---- containers ------------------------------------------------------------ */

static int check_array(fl_ctx *c, cJSON *v, const fl_type *t, const fl_path *p) {
  if (!cJSON_IsArray(v)) return mismatch(c, p, t->expected, v, 1);
  int rc = enter(c, p);
  size_t i = 0;
  for (cJSON *it = v->child; rc == 0 && it; it = it->next, i++)
    rc = check_at(c, t->elem, it, p, NULL, i);
  return rc;
}

static int field_index(const fl_field *fields, const char *name) {
  for (int i = 0; name && fields[i].name; i++)
    if (strcmp(fields[i].name, name) == 0) return i;
  return -1;
}

/* Finds the known fields of object v in slot[] (by table index). Unknown
 * fields are ignored, as serde does; a repeated known field is an error, as
 * in serde. */
static int open_object(fl_ctx *c, cJSON *v, const fl_type *t, const fl_path *p,
                       const fl_field *fields, cJSON **slot) {
  if (!cJSON_IsObject(v)) return mismatch(c, p, t->expected, v, 1);
  int rc = enter(c, p);
  for (cJSON *it = v->child; rc == 0 && it; it = it->next) {
    int i = field_index(fields, it->string);
    if (i < 0) continue;
    if (slot[i]) {
      fl_path fp = child_of(p, fields[i].name, 0);
      return fail(c, &fp, "duplicate field");
    }
    slot[i] = it;
  }
  return rc;
}

/* Rebuilds v as exactly its known fields in table order, adding defaults
 * for the absent optional ones. */
static int relink(cJSON *v, const fl_field *fields, cJSON **slot) {
  /* Already so (what segue and most backends send): nothing to move. */
  cJSON *at = v->child;
  int f = 0;
  for (; fields[f].name; f++) {
    if (slot[f]) {
      if (slot[f] != at) break;
      at = at->next;
    } else if (fields[f].dflt) {
      break;
    }
  }
  if (!fields[f].name && !at) return 0;
  int rc = 0;
  for (int i = 0; fields[i].name; i++)
    if (slot[i]) cJSON_DetachItemViaPointer(v, slot[i]);
  while (v->child) cJSON_Delete(cJSON_DetachItemViaPointer(v, v->child));
  for (int i = 0; fields[i].name; i++) {
    if (slot[i]) {
      cJSON_AddItemToArray(v, slot[i]); /* keeps the item's key */
    } else if (fields[i].dflt) {
      cJSON *d = fields[i].dflt();
      if (!d || !cJSON_AddItemToObject(v, fields[i].name, d)) {
        cJSON_Delete(d);
        rc = SG_ENOMEM;
      }
    }
  }
  return rc;
}

static int check_object(fl_ctx *c, cJSON *v, const fl_type *t, const fl_path *p) {
  cJSON *slot[FL_MAX_FIELDS] = {0};
  int rc = open_object(c, v, t, p, t->fields, slot);
  for (int i = 0; rc == 0 && t->fields[i].name; i++) {
    const fl_field *f = &t->fields[i];
    fl_path fp = child_of(p, f->name, 0);
    if (slot[i]) rc = f->type->check(c, slot[i], f->type, &fp);
    else if (!f->dflt) rc = fail(c, &fp, "missing field");
  }
  return rc ? rc : relink(v, t->fields, slot);
}

static int find_variant(fl_ctx *c, const cJSON *tag, const fl_type *t, const fl_path *p,
                        const fl_variant **out) {
  fl_path tp = child_of(p, "type", 0);
  if (!tag) return fail(c, &tp, "missing field");
  if (!is_str(tag)) return mismatch(c, &tp, "a string", tag, 1);
  for (const fl_variant *var = t->variants; var->name; var++) {
    if (strcmp(var->name, tag->valuestring) == 0) {
      *out = var;
      return 0;
    }
  }
  char name[192];
  sb b;
  sb_init(&b, name, sizeof name);
  sb_quote(&b, tag->valuestring, strlen(tag->valuestring));
  return fail(c, &tp, "unknown variant %s", name);
}

/* Adjacently tagged: {"type": "<Variant>", "value": <payload>}. */
static int check_union(fl_ctx *c, cJSON *v, const fl_type *t, const fl_path *p) {
  cJSON *slot[2] = {0};
  const fl_variant *var = NULL;
  int rc = open_object(c, v, t, p, tag_fields, slot);
  if (rc == 0) rc = find_variant(c, slot[0], t, p, &var);
  if (rc != 0) return rc;
  fl_path root = {NULL, var->name, 0, p->depth};
  fl_path vp = child_of(t->rebase ? &root : p, "value", 0);
  if (!var->payload) {
    if (slot[1]) rc = check_null(c, slot[1], &t_null, &vp);
  } else if (!slot[1]) {
    rc = fail(c, &vp, "missing field");
  } else {
    rc = var->payload->check(c, slot[1], var->payload, &vp);
  }
  return rc ? rc : relink(v, tag_fields, slot);
}

/* ---- entry points ---------------------------------------------------------- */

static void ctx_init(fl_ctx *c, const sg__fl_limits *lim, char *err, size_t errlen) {
  c->max_depth = lim && lim->max_depth > 0 ? lim->max_depth : SG_FL_DEFAULT_MAX_DEPTH;
  c->max_attachment = lim && lim->max_attachment_bytes ? lim->max_attachment_bytes
                                                       : SG_FL_DEFAULT_MAX_ATTACHMENT;
  c->err = err;
  c->errlen = err ? errlen : 0;
  if (c->errlen) err[0] = '\0';
}

static int validate(fl_ctx *c, cJSON *v, sg__fl_kind kind) {
  if (!v || (unsigned)kind >= sizeof kinds / sizeof kinds[0]) {
    if (c->errlen) snprintf(c->err, c->errlen, "invalid argument");
    return SG_EINVAL;
  }
  fl_path root = {NULL, kinds[kind].root, 0, 0};
  int rc = kinds[kind].type->check(c, v, kinds[kind].type, &root);
  if (rc == SG_ENOMEM && c->errlen) snprintf(c->err, c->errlen, "out of memory");
  return rc;
}

int sg__fl_validate(cJSON *v, sg__fl_kind kind, const sg__fl_limits *lim, char *err,
                   size_t errlen) {
  fl_ctx c;
  ctx_init(&c, lim, err, errlen);
  return validate(&c, v, kind);
}

const char *sg__fl_expected_response(const char *request_type) {
  for (const fl_variant *var = request_variants; request_type && var->name; var++)
    if (strcmp(var->name, request_type) == 0) return var->answer;
  return NULL;
}

/* ---- parsing --------------------------------------------------------------- */

static int is_json_ws(unsigned char ch) {
  return ch == ' ' || ch == '\t' || ch == '\n' || ch == '\r';
}

static void parse_error(fl_ctx *c, const char *json, size_t len, uint64_t offset, size_t at) {
  size_t from = at > 8 ? at - 8 : 0;
  while (from < at && ((unsigned char)json[from] & 0xC0) == 0x80) from++;
  size_t to = len - at > 8 ? utf8_floor(json, at + 8) : len;
  if (to < from) to = from;
  sb b;
  sb_init(&b, c->err, c->errlen);
  sb_printf(&b, "invalid JSON at byte offset %" PRIu64 " (near ", offset + at);
  sb_quote(&b, json + from, to - from);
  sb_printf(&b, ")");
}

static int scan_fail(fl_ctx *c, uint64_t at, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static int scan_fail(fl_ctx *c, uint64_t at, const char *fmt, ...) {
  sb b;
  va_list ap;
  sb_init(&b, c->err, c->errlen);
  sb_printf(&b, "invalid JSON at byte offset %" PRIu64 ": ", at);
  va_start(ap, fmt);
  sb_vprintf(&b, fmt, ap);
  va_end(ap);
  return SG_EPROTO;
}

/* What cJSON accepts but a strict reader (serde_json) does not, and nesting
 * past our limit, caught before cJSON recurses into it: control bytes
 * (cJSON takes any byte <= 0x20 as whitespace and raw ones in strings),
 * "\u0000" (cJSON strings end at NUL, it would silently cut the text) and a
 * byte order mark (cJSON skips one). */
static int prescan(fl_ctx *c, const char *json, size_t len, uint64_t offset) {
  int depth = 0, in_string = 0;
  if (len >= 3 && memcmp(json, "\xEF\xBB\xBF", 3) == 0) {
    parse_error(c, json, len, offset, 0);
    return SG_EPROTO;
  }
  for (size_t i = 0; i < len; i++) {
    unsigned char ch = (unsigned char)json[i];
    if (ch < 0x20 && (in_string || !is_json_ws(ch)))
      return scan_fail(c, offset + i, "unexpected control byte 0x%02x", ch);
    if (in_string && ch == '\\') {
      if (len - i >= 6 && memcmp(json + i, "\\u0000", 6) == 0)
        return scan_fail(c, offset + i, "\\u0000 in a string is not supported");
      i++;
    } else if (ch == '"') {
      in_string = !in_string;
    } else if (!in_string && (ch == '{' || ch == '[') && ++depth > c->max_depth) {
      return scan_fail(c, offset + i, "nested deeper than %d levels", c->max_depth);
    } else if (!in_string && (ch == '}' || ch == ']')) {
      depth--;
    }
  }
  return 0;
}

/* Exactly json[0..len): the value, then only whitespace. cJSON's own
 * require_null_terminated needs json[len] == '\0', which we cannot assume. */
static cJSON *parse(fl_ctx *c, const char *json, size_t len, uint64_t offset) {
  if (prescan(c, json, len, offset) != 0) return NULL;
  const char *end = NULL;
  cJSON *v = cJSON_ParseWithLengthOpts(json, len, &end, 0);
  size_t at = end ? (size_t)(end - json) : 0;
  if (v) {
    while (at < len && is_json_ws((unsigned char)json[at])) at++;
    if (at == len) return v;
    cJSON_Delete(v);
  }
  parse_error(c, json, len, offset, at);
  return NULL;
}

sg__fl_kind sg__fl_classify_backend(const cJSON *v, int expect_init) {
  if (expect_init) return SG_FL_INIT_INFO;
  if (cJSON_IsObject(v) && cJSON_GetObjectItemCaseSensitive(v, "sequence_number") &&
      cJSON_GetObjectItemCaseSensitive(v, "body"))
    return SG_FL_RESPONSE;
  return SG_FL_UPDATE;
}

/* kind < 0: classify a backend's value (not its first). */
static cJSON *decode(const char *json, size_t len, uint64_t offset, int kind,
                     const sg__fl_limits *lim, sg__fl_kind *out, char *err, size_t errlen) {
  fl_ctx c;
  ctx_init(&c, lim, err, errlen);
  cJSON *v = parse(&c, json, len, offset);
  if (!v) return NULL;
  sg__fl_kind k = kind < 0 ? sg__fl_classify_backend(v, 0) : (sg__fl_kind)kind;
  if (validate(&c, v, k) != 0) {
    cJSON_Delete(v);
    return NULL;
  }
  if (out) *out = k;
  return v;
}

cJSON *sg__fl_decode_backend(const char *json, size_t len, uint64_t offset, int expect_init,
                            const sg__fl_limits *lim, sg__fl_kind *kind, char *err,
                            size_t errlen) {
  return decode(json, len, offset, expect_init ? (int)SG_FL_INIT_INFO : -1, lim, kind, err,
                errlen);
}

cJSON *sg__fl_decode_request(const char *json, size_t len, uint64_t offset,
                            const sg__fl_limits *lim, char *err, size_t errlen) {
  return decode(json, len, offset, SG_FL_REQUEST, lim, NULL, err, errlen);
}

/* ---- encoding -------------------------------------------------------------- */

/* cJSON 1.7 prints a number with "%1.15g" whenever that reads back within
 * one DBL_EPSILON of it, so 9007199254740992 comes out as
 * "9.00719925474099e+15" (a different number) and 1e15 as "1e+15" (which a
 * serde integer field refuses). Such numbers get an exact text instead. */
static int exact_text(double d, char *buf, size_t cap) {
  if (!isfinite(d)) return 0;
  if (d == floor(d)) {
    if (fabs(d) < 1e15 || fabs(d) >= 18446744073709551616.0) return 0;
    snprintf(buf, cap, "%.0f", d);
    return 1;
  }
  snprintf(buf, cap, "%1.15g", d);
  if (strtod(buf, NULL) == d) return 0;
  snprintf(buf, cap, "%1.17g", d);
  return 1;
}

/* Counts the numbers cJSON would misprint; with `fix`, turns each into a
 * raw node holding its exact text. -1: out of memory. */
static int exact_numbers(cJSON *n, int fix) {
  char buf[64];
  int count = 0;
  if (cJSON_IsNumber(n) && exact_text(n->valuedouble, buf, sizeof buf)) {
    if (!fix) return 1;
    char *raw = cJSON_malloc(strlen(buf) + 1);
    if (!raw) return -1;
    strcpy(raw, buf);
    n->type = cJSON_Raw | (n->type & cJSON_StringIsConst);
    n->valuestring = raw;
    return 1;
  }
  for (cJSON *it = n->child; it; it = it->next) {
    int k = exact_numbers(it, fix);
    if (k < 0) return -1;
    count += k;
    if (count && !fix) break;
  }
  return count;
}

char *sg__fl_encode_line(const cJSON *v, size_t *len) {
  cJSON *copy = NULL;
  /* exact_numbers only writes with fix set, and then to the copy. */
  if (exact_numbers((cJSON *)v, 0) > 0) {
    copy = cJSON_Duplicate(v, 1);
    if (!copy || exact_numbers(copy, 1) < 0) {
      cJSON_Delete(copy);
      return NULL;
    }
    v = copy;
  }
  char *text = cJSON_PrintUnformatted(v);
  cJSON_Delete(copy);
  if (!text) return NULL;
  size_t n = strlen(text);
  char *line = malloc(n + 2); /* the caller frees with free(), not cJSON's hooks */
  if (line) {
    memcpy(line, text, n);
    memcpy(line + n, "\n", 2);
    if (len) *len = n + 1;
  }
  cJSON_free(text);
  return line;
}
