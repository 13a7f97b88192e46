/* segue.harmony: Harmony federation messages and tokens for Lua.
 *
 *   encode(type_name, table) -> bytes | nil, err, code
 *   decode(type_name, bytes [, {max_bytes = n}]) -> table | nil, err, code
 *   types() -> { "protocol.sync.v1.AuthData", ... }
 *   token_create(secret64_or_seed32, server_id, time [, audience]) -> header | nil, err, code
 *   token_check(header, public_key32 [, {now=, window=, unbound_window=,
 *               audience=, bound={...}, allow={...}, block={...},
 *               disabled=}]) -> server_id, time, audience
 *                            | nil, why, identifier, status
 *       (now defaults to the current time, window to 60 s, unbound_window
 *       (tokens naming no audience) to window; audience is ours: a token
 *       naming another is refused; see runtime/harmony_token.h for the
 *       refusals and their identifiers)
 *   keygen() -> secret64, public32
 *   max_bytes   (the default input bound of decode, 16 MiB)
 *
 * Messages are converted generically by walking protobuf-c's descriptors, so
 * a new .proto needs only its descriptors added to `message_types`. Tables
 * are keyed by field names (read raw: metatables are not consulted); a oneof
 * is the one member key present. Scalars:
 * integers are Lua integers (a uint64 is the same 64 bits, so values >= 2^63
 * are negative; compare with math.ult), a uint64 may also be given as a
 * decimal string; floats are never accepted for integer fields; bytes and
 * strings are Lua strings (strings must be UTF-8 without NUL). decode fills
 * in proto3 defaults for scalars and empty lists for repeated fields; an
 * absent sub-message is nil.
 *
 * Wrong argument types raise; bad contents return nil, "EINVAL: <path>: <what>",
 * "EINVAL" with the path naming the field ("PushRequest.event.user_invted:
 * unknown field").
 */
#include <lauxlib.h>
#include <lua.h>

#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <protobuf-c/protobuf-c.h>
#include <sodium.h>

#include "bindings.h"
#include "harmony_keys.h"
#include "harmony_token.h"
#include "hrpc/v1/hrpc.pb-c.h"
#include "protocol/auth/v1/auth.pb-c.h"
#include "protocol/harmonytypes/v1/types.pb-c.h"
#include "protocol/sync/v1/sync.pb-c.h"
#include "segue.h"

#define HARMONY_MAX_BYTES (16u << 20)  /* default bound on decode's input */
#define HARMONY_MAX_DEPTH 32           /* bounds recursion on any schema */
#define GUARD_MT "segue.harmony.guard"

static const ProtobufCMessageDescriptor *const message_types[] = {
    &protocol__sync__v1__auth_data__descriptor,
    &protocol__sync__v1__event__descriptor,
    &protocol__sync__v1__event__user_removed_from_guild__descriptor,
    &protocol__sync__v1__event__user_added_to_guild__descriptor,
    &protocol__sync__v1__event__user_invited__descriptor,
    &protocol__sync__v1__event__user_rejected_invite__descriptor,
    &protocol__sync__v1__pull_request__descriptor,
    &protocol__sync__v1__pull_response__descriptor,
    &protocol__sync__v1__push_request__descriptor,
    &protocol__sync__v1__push_response__descriptor,
    &protocol__sync__v1__notify_new_id_request__descriptor,
    &protocol__sync__v1__notify_new_id_response__descriptor,
    &protocol__harmonytypes__v1__token__descriptor,
    &protocol__auth__v1__key_request__descriptor,
    &protocol__auth__v1__key_response__descriptor,
    &hrpc__v1__error__descriptor,
    &hrpc__v1__retry_info__descriptor,
};
#define N_MESSAGE_TYPES (sizeof message_types / sizeof message_types[0])

/* ---- guards: C memory released however the call ends ------------------- */

/* A to-be-closed userdata owning one C pointer. Lua closes it when the C
 * function returns or when an error unwinds through it (memory error,
 * stack overflow), so nothing allocated in C leaks; __gc is the backstop. */
typedef struct guard {
  void (*release)(void *);
  void *ptr;
} guard;

static int guard_close(lua_State *L) {
  guard *g = lua_touserdata(L, 1);
  if (g && g->ptr) {
    void *p = g->ptr;
    g->ptr = NULL;
    g->release(p);
  }
  return 0;
}

static guard *push_guard(lua_State *L, void (*release)(void *)) {
  guard *g = lua_newuserdatauv(L, sizeof *g, 0);
  g->release = release;
  g->ptr = NULL;
  luaL_setmetatable(L, GUARD_MT);
  lua_toclose(L, -1);
  return g;
}

static void release_message(void *m) { protobuf_c_message_free_unpacked(m, NULL); }
static void release_keypair(void *kp) { sg__keys_free(kp); }
static void release_token(void *tok) { sg__token_clear(tok); }

/* Encoding allocates message structs and arrays from a list of blocks that
 * is freed at once. */
typedef struct ablock {
  struct ablock *next;
  max_align_t data[];
} ablock;

static void release_arena(void *p) {
  ablock **head = p;
  while (*head) {
    ablock *next = (*head)->next;
    free(*head);
    *head = next;
  }
  free(head);
}

/* ---- conversion context: path for errors, depth, arena ----------------- */

/* The path of the field being converted, kept as a stack of segments and
 * written out only when a conversion fails (most never do). */
typedef struct seg {
  const char *name;        /* ".name", or the top's name when index is 0 */
  size_t index;            /* "[index]" when non-zero */
} seg;
#define MAX_SEGS (2 * HARMONY_MAX_DEPTH + 4)

typedef struct conv {
  lua_State *L;
  ablock **arena;          /* encoding only */
  int depth;
  size_t nsegs;            /* may pass MAX_SEGS: the path is then cut */
  seg segs[MAX_SEGS];      /* "PushRequest" ".event" ".user_invited" */
  char err[512];           /* "<path>: <what>" after a failure */
} conv;

/* Pushes a segment; returns the mark path_pop restores. */
static size_t path_push(conv *c, const char *name, size_t index) {
  size_t mark = c->nsegs++;
  if (mark < MAX_SEGS) c->segs[mark] = (seg){name, index};
  return mark;
}
#define path_name(c, name) path_push(c, name, 0)
#define path_index(c, i) path_push(c, NULL, i)

static void path_pop(conv *c, size_t mark) { c->nsegs = mark; }

/* The path, at most 255 bytes, into buf[256]. */
static void path_format(const conv *c, char *buf, size_t size) {
  size_t len = 0, n = c->nsegs < MAX_SEGS ? c->nsegs : MAX_SEGS;
  buf[0] = '\0';
  for (size_t i = 0; i < n && len + 1 < size; i++) {
    const seg *g = &c->segs[i];
    int w = g->name ? snprintf(buf + len, size - len, "%s%s", i ? "." : "", g->name)
                    : snprintf(buf + len, size - len, "[%zu]", g->index);
    if (w < 0) break;
    len = (size_t)w < size - len ? len + (size_t)w : size - 1;
  }
}

static int conv_fail(conv *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int conv_fail(conv *c, const char *fmt, ...) {
  char path[256];
  path_format(c, path, sizeof path);
  int n = snprintf(c->err, sizeof c->err, "%s: ", path);
  va_list ap;
  va_start(ap, fmt);
  if (n > 0 && (size_t)n < sizeof c->err)
    vsnprintf(c->err + n, sizeof c->err - (size_t)n, fmt, ap);
  va_end(ap);
  return -1;
}

static void conv_init(conv *c, lua_State *L, const char *top) {
  c->L = L;
  c->arena = NULL;
  c->depth = 0;
  c->nsegs = 0;
  c->err[0] = '\0';
  path_name(c, top);
}

static void *arena_alloc(conv *c, size_t size) {
  ablock *b = calloc(1, sizeof *b + size);
  if (!b) {
    conv_fail(c, "out of memory");
    return NULL;
  }
  b->next = *c->arena;
  *c->arena = b;
  return b->data;
}

/* nil, "CODE: message", "CODE": the luv convention for failures that depend
 * on the input rather than on the caller's code. */
/* ---- field kinds -------------------------------------------------------- */

typedef enum { K_I32, K_U32, K_I64, K_U64, K_BOOL, K_STRING, K_BYTES, K_MESSAGE, K_NONE } kind;

static kind kind_of(ProtobufCType t) {
  switch (t) {
    case PROTOBUF_C_TYPE_INT32: case PROTOBUF_C_TYPE_SINT32:
    case PROTOBUF_C_TYPE_SFIXED32: case PROTOBUF_C_TYPE_ENUM: return K_I32;
    case PROTOBUF_C_TYPE_UINT32: case PROTOBUF_C_TYPE_FIXED32: return K_U32;
    case PROTOBUF_C_TYPE_INT64: case PROTOBUF_C_TYPE_SINT64:
    case PROTOBUF_C_TYPE_SFIXED64: return K_I64;
    case PROTOBUF_C_TYPE_UINT64: case PROTOBUF_C_TYPE_FIXED64: return K_U64;
    case PROTOBUF_C_TYPE_BOOL: return K_BOOL;
    case PROTOBUF_C_TYPE_STRING: return K_STRING;
    case PROTOBUF_C_TYPE_BYTES: return K_BYTES;
    case PROTOBUF_C_TYPE_MESSAGE: return K_MESSAGE;
    default: return K_NONE;  /* float, double: in no schema of ours */
  }
}

/* Size of one element in a repeated field's C array. */
static size_t kind_size(kind k) {
  static const size_t sizes[] = {
      sizeof(int32_t), sizeof(uint32_t), sizeof(int64_t), sizeof(uint64_t),
      sizeof(protobuf_c_boolean), sizeof(char *), sizeof(ProtobufCBinaryData),
      sizeof(ProtobufCMessage *), 1};
  return sizes[k];
}

/* Struct members are reached by descriptor offsets; memcpy keeps those
 * accesses free of type-punning through mismatched pointer types. */
static void *load_ptr(const char *at) { void *p; memcpy(&p, at, sizeof p); return p; }
static void store_ptr(char *at, const void *p) { memcpy(at, &p, sizeof p); }
static uint32_t load_u32(const char *at) { uint32_t v; memcpy(&v, at, sizeof v); return v; }
static void store_u32(char *at, uint32_t v) { memcpy(at, &v, sizeof v); }
static size_t load_size(const char *at) { size_t v; memcpy(&v, at, sizeof v); return v; }
static void store_size(char *at, size_t v) { memcpy(at, &v, sizeof v); }

/* ---- Lua values to C scalars ------------------------------------------- */

/* "expected an integer, found float 1.5" */
static int type_error(conv *c, int idx, const char *expected) {
  if (lua_isinteger(c->L, idx))
    return conv_fail(c, "expected %s, found integer %lld", expected,
                     (long long)lua_tointeger(c->L, idx));
  if (lua_type(c->L, idx) != LUA_TNUMBER)
    return conv_fail(c, "expected %s, found %s", expected, luaL_typename(c->L, idx));
  char num[64];
  snprintf(num, sizeof num, "%.14g", (double)lua_tonumber(c->L, idx));
  if (num[strspn(num, "-0123456789")] == '\0') strcat(num, ".0");
  return conv_fail(c, "expected %s, found float %s", expected, num);
}

static int get_ranged(conv *c, int idx, lua_Integer lo, lua_Integer hi, lua_Integer *out) {
  if (!lua_isinteger(c->L, idx)) return type_error(c, idx, "an integer");
  *out = lua_tointeger(c->L, idx);
  if (*out < lo || *out > hi)
    return conv_fail(c, "expected an integer in [%lld, %lld], found %lld",
                     (long long)lo, (long long)hi, (long long)*out);
  return 0;
}

/* Strict: 1 to 20 ASCII digits, at most 18446744073709551615. */
static int parse_u64(const char *s, size_t len, uint64_t *out) {
  uint64_t v = 0;
  if (len == 0 || len > 20) return -1;
  for (size_t i = 0; i < len; i++) {
    unsigned d = (unsigned char)s[i] - '0';
    if (d > 9 || v > (UINT64_MAX - d) / 10) return -1;
    v = v * 10 + d;
  }
  *out = v;
  return 0;
}

/* A uint64 is a Lua integer holding the same 64 bits, or a decimal string. */
static int get_uint64(conv *c, int idx, uint64_t *out) {
  if (lua_isinteger(c->L, idx)) {
    *out = (uint64_t)lua_tointeger(c->L, idx);
    return 0;
  }
  if (lua_type(c->L, idx) == LUA_TNUMBER) return type_error(c, idx, "an integer");
  if (lua_type(c->L, idx) != LUA_TSTRING)
    return type_error(c, idx, "an integer or a decimal string");
  size_t len;
  const char *s = lua_tolstring(c->L, idx, &len);
  if (parse_u64(s, len, out) == 0) return 0;
  return conv_fail(c, "expected a decimal string of 0 to 18446744073709551615, "
                   "found \"%.40s\"", s);
}

/* Offset of the first byte that does not start a valid UTF-8 sequence
 * (overlong forms, surrogates and values past U+10FFFF are invalid), or len. */
static size_t utf8_bad_at(const unsigned char *s, size_t len) {
  for (size_t i = 0; i < len;) {
    uint32_t cp = s[i], min;
    size_t more;
    if (cp < 0x80) { i++; continue; }
    if ((cp & 0xE0) == 0xC0) { more = 1; min = 0x80; cp &= 0x1F; }
    else if ((cp & 0xF0) == 0xE0) { more = 2; min = 0x800; cp &= 0x0F; }
    else if ((cp & 0xF8) == 0xF0) { more = 3; min = 0x10000; cp &= 0x07; }
    else return i;
    if (len - i <= more) return i;
    for (size_t k = 1; k <= more; k++) {
      if ((s[i + k] & 0xC0) != 0x80) return i;
      cp = (cp << 6) | (s[i + k] & 0x3F);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return i;
    i += more + 1;
  }
  return len;
}

/* Strings and bytes point into the Lua strings themselves: the caller's
 * table holds them, unmodified, until the message is packed. */
static int get_string(conv *c, int idx, int text, const char **s, size_t *len) {
  if (lua_type(c->L, idx) != LUA_TSTRING) return type_error(c, idx, "a string");
  *s = lua_tolstring(c->L, idx, len);
  if (!text) return 0;
  /* protobuf-c strings are NUL-terminated, and peers (prost) refuse
   * strings that are not UTF-8: fail here, naming the field. */
  if (memchr(*s, '\0', *len))
    return conv_fail(c, "contains a NUL byte, which a protobuf string cannot carry here");
  size_t bad = utf8_bad_at((const unsigned char *)*s, *len);
  if (bad < *len) return conv_fail(c, "invalid UTF-8 at byte %zu", bad + 1);
  return 0;
}

/* ---- Lua table to message ---------------------------------------------- */

static int table_to_message(conv *c, int idx, const ProtobufCMessageDescriptor *d,
                            ProtobufCMessage **out);

static int set_value(conv *c, const ProtobufCFieldDescriptor *f, char *member, int idx) {
  lua_Integer i;
  uint64_t u;
  const char *s = NULL;
  size_t len;
  ProtobufCMessage *sub;
  switch (kind_of(f->type)) {
    case K_I32:
      if (get_ranged(c, idx, INT32_MIN, INT32_MAX, &i)) return -1;
      *(int32_t *)(void *)member = (int32_t)i;
      return 0;
    case K_U32:
      if (get_ranged(c, idx, 0, UINT32_MAX, &i)) return -1;
      *(uint32_t *)(void *)member = (uint32_t)i;
      return 0;
    case K_I64:
      if (get_ranged(c, idx, LUA_MININTEGER, LUA_MAXINTEGER, &i)) return -1;
      *(int64_t *)(void *)member = i;
      return 0;
    case K_U64:
      if (get_uint64(c, idx, &u)) return -1;
      *(uint64_t *)(void *)member = u;
      return 0;
    case K_BOOL:
      if (!lua_isboolean(c->L, idx)) return type_error(c, idx, "a boolean");
      *(protobuf_c_boolean *)(void *)member = lua_toboolean(c->L, idx);
      return 0;
    case K_STRING:
      if (get_string(c, idx, 1, &s, &len)) return -1;
      store_ptr(member, s);
      return 0;
    case K_BYTES:
      if (get_string(c, idx, 0, &s, &len)) return -1;
      ((ProtobufCBinaryData *)(void *)member)->len = len;
      ((ProtobufCBinaryData *)(void *)member)->data = (uint8_t *)s;
      return 0;
    case K_MESSAGE:
      if (table_to_message(c, idx, f->descriptor, &sub)) return -1;
      store_ptr(member, sub);
      return 0;
    default:
      return conv_fail(c, "field type %d is not supported", (int)f->type);
  }
}

static size_t count_keys(lua_State *L, int idx) {
  size_t n = 0;
  lua_pushnil(L);
  while (lua_next(L, idx)) {
    n++;
    lua_pop(L, 1);
  }
  return n;
}

static int set_repeated(conv *c, const ProtobufCFieldDescriptor *f, char *base, int idx) {
  lua_State *L = c->L;
  if (!lua_istable(L, idx)) return type_error(c, idx, "a list");
  size_t n = lua_rawlen(L, idx), size = kind_size(kind_of(f->type));
  if (count_keys(L, idx) != n)
    return conv_fail(c, "expected a list (a table with keys 1 to n), found other keys");
  char *arr = n ? arena_alloc(c, n * size) : NULL;
  if (n && !arr) return -1;
  for (size_t i = 0; i < n; i++) {
    lua_rawgeti(L, idx, (lua_Integer)i + 1);
    size_t mark = path_index(c, i + 1);
    if (set_value(c, f, arr + i * size, lua_gettop(L))) return -1;
    path_pop(c, mark);
    lua_pop(L, 1);
  }
  store_size(base + f->quantifier_offset, n);
  store_ptr(base + f->offset, arr);
  return 0;
}

static int set_field(conv *c, ProtobufCMessage *m, const ProtobufCFieldDescriptor *f,
                     int idx) {
  char *base = (char *)m;
  size_t mark = path_name(c, f->name);
  int rc = f->label == PROTOBUF_C_LABEL_REPEATED
               ? set_repeated(c, f, base, idx)
               : set_value(c, f, base + f->offset, idx);
  if (rc) return rc;
  path_pop(c, mark);
  if (f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF)
    store_u32(base + f->quantifier_offset, f->id);  /* the oneof's case */
  else if (f->label == PROTOBUF_C_LABEL_OPTIONAL && f->quantifier_offset)
    *(protobuf_c_boolean *)(void *)(base + f->quantifier_offset) = 1;  /* has_ */
  return 0;
}

static int check_oneof(conv *c, const ProtobufCMessage *m,
                       const ProtobufCFieldDescriptor *f) {
  if (!(f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF)) return 0;
  uint32_t set = load_u32((const char *)m + f->quantifier_offset);
  if (!set) return 0;
  const ProtobufCFieldDescriptor *other =
      protobuf_c_message_descriptor_get_field(m->descriptor, set);
  return conv_fail(c, "%s and %s are members of one oneof; set only one",
                   other ? other->name : "?", f->name);
}

/* Called when the table has more keys than known fields were found. */
static int unknown_key(conv *c, int idx, const ProtobufCMessageDescriptor *d) {
  lua_State *L = c->L;
  lua_pushnil(L);
  while (lua_next(L, idx)) {
    lua_pop(L, 1);
    if (lua_type(L, -1) != LUA_TSTRING)
      return conv_fail(c, "field names are strings, found a %s key", luaL_typename(L, -1));
    const char *key = lua_tostring(L, -1);
    if (!protobuf_c_message_descriptor_get_field_by_name(d, key)) {
      path_name(c, key);
      return conv_fail(c, "unknown field");
    }
  }
  return conv_fail(c, "unknown field");  /* not reached: a key was extra */
}

static int table_to_message(conv *c, int idx, const ProtobufCMessageDescriptor *d,
                            ProtobufCMessage **out) {
  lua_State *L = c->L;
  idx = lua_absindex(L, idx);
  if (!lua_istable(L, idx)) return type_error(c, idx, "a table");
  if (++c->depth > HARMONY_MAX_DEPTH)
    return conv_fail(c, "nested deeper than %d", HARMONY_MAX_DEPTH);
  luaL_checkstack(L, 8, "segue.harmony: message nesting");
  ProtobufCMessage *m = arena_alloc(c, d->sizeof_message);
  if (!m) return -1;
  protobuf_c_message_init(d, m);
  size_t found = 0;
  for (unsigned i = 0; i < d->n_fields; i++) {
    const ProtobufCFieldDescriptor *f = &d->fields[i];
    lua_pushstring(L, f->name);
    if (lua_rawget(L, idx) == LUA_TNIL) {
      lua_pop(L, 1);
      continue;
    }
    found++;
    if (check_oneof(c, m, f) || set_field(c, m, f, lua_gettop(L))) return -1;
    lua_pop(L, 1);
  }
  if (count_keys(L, idx) != found) return unknown_key(c, idx, d);
  c->depth--;
  *out = m;
  return 0;
}

/* ---- message to Lua table ---------------------------------------------- */

static int message_to_table(conv *c, const ProtobufCMessage *m);

static int push_value(conv *c, const ProtobufCFieldDescriptor *f, const char *member) {
  lua_State *L = c->L;
  const ProtobufCBinaryData *b = (const void *)member;
  const char *s;
  switch (kind_of(f->type)) {
    case K_I32: lua_pushinteger(L, *(const int32_t *)(const void *)member); return 0;
    case K_U32: lua_pushinteger(L, *(const uint32_t *)(const void *)member); return 0;
    case K_I64: lua_pushinteger(L, *(const int64_t *)(const void *)member); return 0;
    case K_U64:  /* the same 64 bits; >= 2^63 reads as negative */
      lua_pushinteger(L, (lua_Integer) * (const uint64_t *)(const void *)member);
      return 0;
    case K_BOOL: lua_pushboolean(L, *(const protobuf_c_boolean *)(const void *)member); return 0;
    case K_STRING: {
      /* proto3 strings are UTF-8; a peer that sends other bytes is refused
       * here, as encode would refuse them on the way back. */
      s = load_ptr(member);
      size_t n = s ? strlen(s) : 0, bad = s ? utf8_bad_at((const unsigned char *)s, n) : 0;
      if (s && bad < n) return conv_fail(c, "invalid UTF-8 at byte %zu", bad + 1);
      lua_pushstring(L, s ? s : "");
      return 0;
    }
    case K_BYTES:
      lua_pushlstring(L, b->len ? (const char *)b->data : "", b->len);
      return 0;
    case K_MESSAGE: return message_to_table(c, load_ptr(member));
    default: return conv_fail(c, "field type %d is not supported", (int)f->type);
  }
}

static int push_repeated(conv *c, const ProtobufCFieldDescriptor *f, const char *base) {
  size_t n = load_size(base + f->quantifier_offset), size = kind_size(kind_of(f->type));
  const char *arr = load_ptr(base + f->offset);
  lua_createtable(c->L, n < INT32_MAX ? (int)n : 0, 0);
  for (size_t i = 0; i < n; i++) {
    size_t mark = path_index(c, i + 1);
    if (push_value(c, f, arr + i * size)) return -1;
    path_pop(c, mark);
    lua_rawseti(c->L, -2, (lua_Integer)i + 1);
  }
  return 0;
}

/* proto3 scalars are always present (defaults make tables complete);
 * sub-messages only when set; a oneof only for its current member. */
static int field_present(const ProtobufCFieldDescriptor *f, const char *base) {
  if (f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF)
    return load_u32(base + f->quantifier_offset) == f->id;
  if (f->label == PROTOBUF_C_LABEL_REPEATED) return 1;
  if (f->type == PROTOBUF_C_TYPE_MESSAGE) return load_ptr(base + f->offset) != NULL;
  if (f->label == PROTOBUF_C_LABEL_OPTIONAL && f->quantifier_offset)
    return *(const protobuf_c_boolean *)(const void *)(base + f->quantifier_offset);
  if (f->label == PROTOBUF_C_LABEL_OPTIONAL && f->type == PROTOBUF_C_TYPE_STRING)
    return load_ptr(base + f->offset) != NULL;
  return 1;
}

static int message_to_table(conv *c, const ProtobufCMessage *m) {
  lua_State *L = c->L;
  const ProtobufCMessageDescriptor *d = m->descriptor;
  const char *base = (const char *)m;
  if (++c->depth > HARMONY_MAX_DEPTH)
    return conv_fail(c, "nested deeper than %d", HARMONY_MAX_DEPTH);
  luaL_checkstack(L, 8, "segue.harmony: message nesting");
  lua_createtable(L, 0, (int)d->n_fields);
  for (unsigned i = 0; i < d->n_fields; i++) {
    const ProtobufCFieldDescriptor *f = &d->fields[i];
    if (!field_present(f, base)) continue;
    size_t mark = path_name(c, f->name);
    if (f->label == PROTOBUF_C_LABEL_REPEATED ? push_repeated(c, f, base)
                                             : push_value(c, f, base + f->offset))
      return -1;
    path_pop(c, mark);
    lua_setfield(L, -2, f->name);
  }
  c->depth--;
  return 0;
}

/* ---- encode, decode, types --------------------------------------------- */

static const ProtobufCMessageDescriptor *check_type(lua_State *L, int arg) {
  const char *name = luaL_checkstring(L, arg);
  for (size_t i = 0; i < N_MESSAGE_TYPES; i++)
    if (strcmp(message_types[i]->name, name) == 0) return message_types[i];
  luaL_argerror(L, arg, lua_pushfstring(L, "unknown message type '%s' "
                                        "(see segue.harmony.types())", name));
  return NULL;
}

static int l_encode(lua_State *L) {
  const ProtobufCMessageDescriptor *d = check_type(L, 1);
  luaL_checktype(L, 2, LUA_TTABLE);
  lua_settop(L, 2);
  guard *g = push_guard(L, release_arena);
  conv c;
  conv_init(&c, L, d->short_name);
  c.arena = g->ptr = calloc(1, sizeof *c.arena);
  if (!c.arena) return luaL_error(L, "segue.harmony: out of memory");
  ProtobufCMessage *m;
  if (table_to_message(&c, 2, d, &m)) return sg__lua_fail(L, SG_EINVAL, c.err);
  size_t n = protobuf_c_message_get_packed_size(m);
  luaL_Buffer b;
  protobuf_c_message_pack(m, (uint8_t *)luaL_buffinitsize(L, &b, n));
  luaL_pushresultsize(&b, n);
  return 1;
}

static size_t opt_max_bytes(lua_State *L, int arg) {
  if (lua_isnoneornil(L, arg)) return HARMONY_MAX_BYTES;
  luaL_checktype(L, arg, LUA_TTABLE);
  lua_getfield(L, arg, "max_bytes");
  lua_Integer max = lua_isnil(L, -1) ? (lua_Integer)HARMONY_MAX_BYTES : lua_tointeger(L, -1);
  luaL_argcheck(L, lua_isnil(L, -1) || (lua_isinteger(L, -1) && max >= 0), arg,
                "max_bytes must be a non-negative integer");
  lua_pop(L, 1);
  return (size_t)max;
}

static int l_decode(lua_State *L) {
  const ProtobufCMessageDescriptor *d = check_type(L, 1);
  size_t len, max = opt_max_bytes(L, 3);
  const char *bytes = luaL_checklstring(L, 2, &len);
  char msg[256];
  if (len > max) {
    snprintf(msg, sizeof msg, "%s is %zu bytes, more than max_bytes %zu", d->name,
             len, max);
    return sg__lua_fail(L, SG_ELIMIT, msg);
  }
  lua_settop(L, 3);
  guard *g = push_guard(L, release_message);
  g->ptr = protobuf_c_message_unpack(d, NULL, len, (const uint8_t *)bytes);
  if (!g->ptr) {
    snprintf(msg, sizeof msg, "cannot decode %s (%zu bytes)", d->name, len);
    return sg__lua_fail(L, SG_EDECODE, msg);
  }
  conv c;
  conv_init(&c, L, d->short_name);
  if (message_to_table(&c, g->ptr)) return sg__lua_fail(L, SG_EDECODE, c.err);
  return 1;
}

static int l_types(lua_State *L) {
  lua_createtable(L, (int)N_MESSAGE_TYPES, 0);
  for (size_t i = 0; i < N_MESSAGE_TYPES; i++) {
    lua_pushstring(L, message_types[i]->name);
    lua_rawseti(L, -2, (lua_Integer)i + 1);
  }
  return 1;
}

/* ---- keys and tokens ---------------------------------------------------- */

static uint64_t check_uint64(lua_State *L, int arg, const char *name) {
  conv c;
  uint64_t v = 0;
  conv_init(&c, L, name);
  if (get_uint64(&c, arg, &v)) luaL_argerror(L, arg, c.err);
  return v;
}

static int l_keygen(lua_State *L) {
  unsigned char secret[SG_KEYS_SECRET_BYTES];
  guard *g = push_guard(L, release_keypair);
  sg__keypair *kp;
  int rc = sg__keys_generate(&kp);
  if (rc) return sg__lua_fail(L, rc, "cannot generate a key pair");
  g->ptr = kp;
  sg__keys_export_secret(kp, secret);
  lua_pushlstring(L, (const char *)secret, sizeof secret);
  sodium_memzero(secret, sizeof secret);
  lua_pushlstring(L, (const char *)sg__keys_public(kp), SG_KEYS_PUBLIC_BYTES);
  return 2;
}

static int l_token_create(lua_State *L) {
  size_t secret_len;
  const char *secret = luaL_checklstring(L, 1, &secret_len);
  const char *server_id = luaL_checkstring(L, 2);
  uint64_t t = check_uint64(L, 3, "time");
  const char *audience = luaL_optstring(L, 4, NULL);
  luaL_argcheck(L, *server_id, 2, "server_id must not be empty");
  guard *kg = push_guard(L, release_keypair);
  guard *hg = push_guard(L, free);
  char err[256];
  sg__keypair *kp;
  int rc = sg__keys_from_secret((const unsigned char *)secret, secret_len, &kp, err,
                               sizeof err);
  if (rc) return sg__lua_fail(L, rc, err);
  kg->ptr = kp;
  char *header;
  rc = sg__token_create_for(kp, server_id, audience, t, &header);
  if (rc) return sg__lua_fail(L, rc, "cannot create a token");
  hg->ptr = header;
  lua_pushstring(L, header);
  return 1;
}

/* opts[name] as an array of C strings pointing into the list's Lua strings;
 * the list and the array stay on the stack, which keeps both alive. */
static const char *const *opt_list(lua_State *L, int opts, const char *name, size_t *n) {
  *n = 0;
  if (lua_getfield(L, opts, name) == LUA_TNIL) return NULL;
  int list = lua_gettop(L);
  if (!lua_istable(L, list)) luaL_error(L, "bad option '%s' (a list of server ids expected)", name);
  *n = lua_rawlen(L, list);
  const char **arr = lua_newuserdatauv(L, *n * sizeof *arr + 1, 0);
  for (size_t i = 0; i < *n; i++) {
    if (lua_rawgeti(L, list, (lua_Integer)i + 1) != LUA_TSTRING)
      luaL_error(L, "bad option '%s' (item %d is not a string)", name, (int)i + 1);
    arr[i] = lua_tostring(L, -1);
    lua_pop(L, 1);
  }
  return arr;
}

static void opt_policy(lua_State *L, int opts, sg__token_policy *pol, uint64_t *now) {
  luaL_checkstack(L, 16, "segue.harmony: token options");
  sg__token_policy_init(pol);
  pol->unbound_window = pol->window;
  *now = (uint64_t)time(NULL);
  if (lua_isnoneornil(L, opts)) return;
  luaL_checktype(L, opts, LUA_TTABLE);
  if (lua_getfield(L, opts, "now") != LUA_TNIL) *now = check_uint64(L, lua_gettop(L), "now");
  if (lua_getfield(L, opts, "window") != LUA_TNIL) {
    luaL_argcheck(L, lua_isinteger(L, -1) && lua_tointeger(L, -1) >= 0, opts,
                  "window must be a non-negative integer (seconds)");
    pol->window = (uint64_t)lua_tointeger(L, -1);
  }
  pol->unbound_window = pol->window;
  if (lua_getfield(L, opts, "unbound_window") != LUA_TNIL) {
    luaL_argcheck(L, lua_isinteger(L, -1) && lua_tointeger(L, -1) >= 0, opts,
                  "unbound_window must be a non-negative integer (seconds)");
    pol->unbound_window = (uint64_t)lua_tointeger(L, -1);
  }
  if (lua_getfield(L, opts, "audience") != LUA_TNIL) pol->audience = luaL_checkstring(L, -1);
  pol->bound = opt_list(L, opts, "bound", &pol->n_bound);
  lua_getfield(L, opts, "disabled");
  pol->disabled = lua_toboolean(L, -1);
  pol->allow = opt_list(L, opts, "allow", &pol->n_allow);
  pol->block = opt_list(L, opts, "block", &pol->n_block);
}

static int l_token_check(lua_State *L) {
  size_t len = 0, pk_len;
  const char *header = luaL_optlstring(L, 1, NULL, &len);
  const char *pk = luaL_checklstring(L, 2, &pk_len);
  luaL_argcheck(L, pk_len == SG_KEYS_PUBLIC_BYTES, 2, "public key must be 32 bytes");
  sg__token_policy pol;
  uint64_t now;
  opt_policy(L, 3, &pol, &now);
  sg__token *tok = lua_newuserdatauv(L, sizeof *tok, 0);
  memset(tok, 0, sizeof *tok);
  push_guard(L, release_token)->ptr = tok;
  char why[SG_TOKEN_WHY_SIZE];
  sg__token_reason r = sg__token_check(header, len, &pol, now,
                                     (const unsigned char *)pk, tok, why, sizeof why);
  if (r != SG_TOKEN_OK) {
    lua_pushnil(L);
    lua_pushstring(L, why);
    lua_pushstring(L, sg__token_reason_identifier(r));
    lua_pushinteger(L, sg__token_reason_status(r));
    return 4;
  }
  lua_pushstring(L, tok->server_id);
  lua_pushinteger(L, (lua_Integer)tok->time);
  if (tok->audience) lua_pushstring(L, tok->audience);
  else lua_pushnil(L);
  return 3;
}

static const luaL_Reg harmony_funcs[] = {
    {"encode", l_encode},
    {"decode", l_decode},
    {"types", l_types},
    {"keygen", l_keygen},
    {"token_create", l_token_create},
    {"token_check", l_token_check},
    {NULL, NULL},
};

int luaopen_segue_harmony_core(lua_State *L) {
  if (luaL_newmetatable(L, GUARD_MT)) {
    lua_pushcfunction(L, guard_close);
    lua_setfield(L, -2, "__close");
    lua_pushcfunction(L, guard_close);
    lua_setfield(L, -2, "__gc");
    lua_pushboolean(L, 0);
    lua_setfield(L, -2, "__metatable");  /* scripts cannot reach the pointer */
  }
  lua_pop(L, 1);
  luaL_newlib(L, harmony_funcs);
  lua_pushinteger(L, HARMONY_MAX_BYTES);
  lua_setfield(L, -2, "max_bytes");
  return 1;
}
