/* Harmony federation tokens: create, parse, admit, verify. */
#include "harmony_token.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <sodium.h>
#include <uv.h>

#include "protocol/harmonytypes/v1/types.pb-c.h"
#include "protocol/sync/v1/sync.pb-c.h"
#include "idmap.h"
#include "segue.h"

static const struct {
  const char *name, *identifier;
  int status;
  const char *summary;
} reasons[] = {
#define XX(name, id, status, summary) {#name, id, status, summary},
    SG_TOKEN_REASON_MAP(XX)
#undef XX
};

static sg__token_reason known(sg__token_reason r) {
  return (unsigned)r < SG_TOKEN__REASON_COUNT ? r : SG_TOKEN_GARBAGE;
}

const char *sg__token_reason_name(sg__token_reason r) { return reasons[known(r)].name; }
const char *sg__token_reason_identifier(sg__token_reason r) {
  return reasons[known(r)].identifier;
}
int sg__token_reason_status(sg__token_reason r) { return reasons[known(r)].status; }
const char *sg__token_reason_summary(sg__token_reason r) {
  return reasons[known(r)].summary;
}

/* Writes the log text of a refusal into why[whylen] and yields the reason. */
#define refuse(reason, why, whylen, ...) \
  ((sg__token_reason)sg__harmony_errf(why, whylen, (int)(reason), __VA_ARGS__))

void sg__token_policy_init(sg__token_policy *pol) {
  memset(pol, 0, sizeof *pol);
  pol->window = SG_TOKEN_DEFAULT_WINDOW;
  pol->unbound_window = SG_TOKEN_DEFAULT_UNBOUND_WINDOW;
}

/* ---- server ids ----------------------------------------------------------- */

static int is_digit(char c) { return c >= '0' && c <= '9'; }
static int is_alnum(char c) {
  return is_digit(c) || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
}

/* A DNS name or an IPv4 literal: labels of letters, digits and inner '-',
 * 1..63 bytes each, separated by single dots. */
static int host_ok(const char *h, size_t n) {
  size_t label = 0;
  if (n == 0) return 0;
  for (size_t i = 0; i < n; i++) {
    char c = h[i];
    if (c == '.') {
      if (label == 0 || h[i - 1] == '-') return 0;
      label = 0;
    } else if (is_alnum(c) || (c == '-' && label > 0)) {
      if (++label > 63) return 0;
    } else {
      return 0;
    }
  }
  return label > 0 && h[n - 1] != '-';
}

static int v6_ok(const char *h, size_t n) {
  char buf[64];
  unsigned char addr[16];
  if (n == 0 || n >= sizeof buf) return 0;
  memcpy(buf, h, n);
  buf[n] = '\0';
  return uv_inet_pton(AF_INET6, buf, addr) == 0;
}

int sg__token_server_id_ok(const char *id, size_t len) {
  if (!id || len == 0 || len > SG_TOKEN_MAX_SERVER_ID || memchr(id, '\0', len)) return 0;
  const char *end = id + len, *port = NULL;
  int host;
  if (id[0] == '[') {
    const char *close = memchr(id, ']', len);
    if (!close) return 0;
    host = v6_ok(id + 1, (size_t)(close - id - 1));
    port = close + 1 < end ? close + 1 : NULL;
    if (port && *port != ':') return 0;
  } else {
    port = memchr(id, ':', len);
    host = host_ok(id, (size_t)((port ? port : end) - id));
  }
  if (!host) return 0;
  if (!port) return 1;
  unsigned long v = 0;
  size_t digits = (size_t)(end - port - 1);
  if (digits == 0 || digits > 5) return 0;
  for (const char *d = port + 1; d < end; d++) {
    if (!is_digit(*d)) return 0;
    v = v * 10 + (unsigned long)(*d - '0');
  }
  return v >= 1 && v <= 65535;
}

/* ---- create ------------------------------------------------------------- */

/* Packs `m` into a new buffer (never NULL on success, even when empty). */
static uint8_t *pack_alloc(const ProtobufCMessage *m, size_t *len) {
  *len = protobuf_c_message_get_packed_size(m);
  uint8_t *buf = malloc(*len + 1);
  if (buf) protobuf_c_message_pack(m, buf);
  return buf;
}

/* The Token's bytes: AuthData packed, signed, wrapped. */
static uint8_t *signed_token(const sg__keypair *kp, const char *server_id,
                             const char *audience, uint64_t time, size_t *len) {
  Protocol__Sync__V1__AuthData ad = PROTOCOL__SYNC__V1__AUTH_DATA__INIT;
  Protocol__Harmonytypes__V1__Token tok = PROTOCOL__HARMONYTYPES__V1__TOKEN__INIT;
  unsigned char sig[SG_KEYS_SIG_BYTES];
  size_t data_len;
  ad.server_id = (char *)server_id;
  ad.time = time;
  if (audience && *audience) ad.audience = (char *)audience;
  uint8_t *data = pack_alloc(&ad.base, &data_len);
  if (!data) return NULL;
  sg__keys_sign(kp, data, data_len, sig);
  tok.sig.data = sig;
  tok.sig.len = sizeof sig;
  tok.data.data = data;
  tok.data.len = data_len;
  uint8_t *raw = pack_alloc(&tok.base, len);
  free(data);
  return raw;
}

int sg__token_create(const sg__keypair *kp, const char *server_id, uint64_t time,
                    char **out) {
  return sg__token_create_for(kp, server_id, NULL, time, out);
}

int sg__token_create_for(const sg__keypair *kp, const char *server_id, const char *audience,
                        uint64_t time, char **out) {
  size_t raw_len;
  if (!kp || !server_id || !*server_id || !out) return SG_EINVAL;
  if (sodium_init() < 0) return SG_ENOMEM;
  uint8_t *raw = signed_token(kp, server_id, audience, time, &raw_len);
  if (!raw) return SG_ENOMEM;
  size_t b64_size = sodium_base64_ENCODED_LEN(raw_len, sodium_base64_VARIANT_ORIGINAL);
  char *b64 = malloc(b64_size);
  if (b64) sodium_bin2base64(b64, b64_size, raw, raw_len, sodium_base64_VARIANT_ORIGINAL);
  free(raw);
  *out = b64;
  return b64 ? 0 : SG_ENOMEM;
}

/* ---- parse -------------------------------------------------------------- */

/* Canonical standard base64 with padding (what segue and most senders
 * send): decoded with a table into bin, its length in *n; 0, or -1 for
 * anything else (other variants, whitespace, non-zero spare bits), which
 * libsodium's decoder then judges. Where this succeeds libsodium's
 * VARIANT_ORIGINAL gives the same bytes: a fast path, not another format
 * (libsodium's decoder is constant-time, ~50 instructions a character,
 * which a public token does not need). */
static int decode_standard(const char *value, size_t len, unsigned char *bin, size_t *n) {
  /* the standard alphabet's values; -1 elsewhere */
  static const signed char table[256] = {
      -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
      -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
      -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 62, -1, -1, -1, 63,
      52, 53, 54, 55, 56, 57, 58, 59, 60, 61, -1, -1, -1, -1, -1, -1,
      -1, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14,
      15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, -1, -1, -1, -1, -1,
      -1, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40,
      41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, -1, -1, -1, -1, -1,
      -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
      -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
      -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
      -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
      -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
      -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
      -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
      -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
  };
  if (len == 0 || len % 4 != 0) return -1;
  size_t pad = value[len - 1] == '=' ? (value[len - 2] == '=' ? 2 : 1) : 0;
  size_t chars = len - pad, out = 0;
  uint32_t acc = 0;
  unsigned bits = 0;
  for (size_t i = 0; i < chars; i++) {
    int v = table[(unsigned char)value[i]];
    if (v < 0) return -1;
    acc = (acc << 6) | (uint32_t)v;
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      bin[out++] = (unsigned char)(acc >> bits);
      acc &= (1u << bits) - 1;
    }
  }
  if (acc != 0) return -1;  /* spare bits must be zero */
  *n = out;
  return 0;
}

/* The value as base64 in any variant segue accepts, decoded into `bin`
 * (at least len bytes) and unpacked; NULL if no variant yields a Token. */
static Protocol__Harmonytypes__V1__Token *unpack_base64(const char *value, size_t len,
                                                        unsigned char *bin) {
  size_t fast_n;
  if (decode_standard(value, len, bin, &fast_n) == 0) {
    Protocol__Harmonytypes__V1__Token *t = protocol__harmonytypes__v1__token__unpack(NULL, fast_n, bin);
    if (t) return t;
  }
  static const int variants[] = {
      sodium_base64_VARIANT_ORIGINAL, sodium_base64_VARIANT_ORIGINAL_NO_PADDING,
      sodium_base64_VARIANT_URLSAFE, sodium_base64_VARIANT_URLSAFE_NO_PADDING};
  for (size_t i = 0; i < sizeof variants / sizeof variants[0]; i++) {
    size_t n;
    const char *end;
    if (sodium_base642bin(bin, len, value, len, " \t", &n, &end, variants[i]) != 0 ||
        end != value + len)
      continue;
    Protocol__Harmonytypes__V1__Token *t =
        protocol__harmonytypes__v1__token__unpack(NULL, n, bin);
    if (t) return t;
  }
  return NULL;
}

/* Base64 first (what an HTTP header can carry), then the raw bytes the
 * reference server sends, in case they survived the trip. */
static Protocol__Harmonytypes__V1__Token *unpack_header(const char *value, size_t len) {
  unsigned char *bin = malloc(len);
  if (!bin) return NULL;
  Protocol__Harmonytypes__V1__Token *t = unpack_base64(value, len, bin);
  free(bin);
  if (!t) t = protocol__harmonytypes__v1__token__unpack(NULL, len, (const uint8_t *)value);
  return t;
}

/* protobuf-c hands strings over NUL-terminated, so "a.example\0evil" would
 * read as "a.example": 1 when a string field of the AuthData bytes (its
 * server_id or audience) holds a NUL, so that such a token is refused
 * instead of read as its prefix. The bytes decoded already. */
static int auth_data_has_nul(const uint8_t *p, size_t n) {
  size_t i = 0;
  while (i < n) {
    uint64_t key = 0, len = 0;
    for (int s = 0; i < n && s < 64; s += 7) {
      key |= (uint64_t)(p[i] & 0x7f) << s;
      if (!(p[i++] & 0x80)) break;
    }
    switch (key & 7) {
      case 0:
        while (i < n && (p[i++] & 0x80)) {}
        break;
      case 1: i += 8; break;
      case 5: i += 4; break;
      case 2:
        for (int s = 0; i < n && s < 64; s += 7) {
          len |= (uint64_t)(p[i] & 0x7f) << s;
          if (!(p[i++] & 0x80)) break;
        }
        if (len > n - i) return 1;
        if (((key >> 3) == 1 || (key >> 3) == 1000) && memchr(p + i, '\0', (size_t)len)) return 1;
        i += (size_t)len;
        break;
      default: return 1;
    }
  }
  return 0;
}

/* Copies what the checks need out of a decoded Token. */
static sg__token_reason take_token(const Protocol__Harmonytypes__V1__Token *t,
                                  sg__token *tok, char *why, size_t whylen) {
  Protocol__Sync__V1__AuthData *ad =
      protocol__sync__v1__auth_data__unpack(NULL, t->data.len, t->data.data);
  if (!ad)
    return refuse(SG_TOKEN_BAD_DATA, why, whylen,
                  "token data (%zu bytes) is not an AuthData", t->data.len);
  sg__token_reason r = SG_TOKEN_OK;
  if (!ad->server_id || !*ad->server_id)
    r = refuse(SG_TOKEN_NO_SERVER_ID, why, whylen, "token AuthData has no server_id");
  else if (auth_data_has_nul(t->data.data, t->data.len))
    r = refuse(SG_TOKEN_BAD_SERVER_ID, why, whylen,
               "token server_id or audience holds a NUL byte (server_id reads \"%.64s\")",
               ad->server_id);
  else if (!sg__token_server_id_ok(ad->server_id, strlen(ad->server_id)))
    r = refuse(SG_TOKEN_BAD_SERVER_ID, why, whylen,
               "token server_id \"%.64s\" is not host[:port]", ad->server_id);
  else if (t->sig.len != SG_KEYS_SIG_BYTES)
    r = refuse(SG_TOKEN_SIG_LENGTH, why, whylen,
               "token signature from %s is %zu bytes, expected %d", ad->server_id,
               t->sig.len, SG_KEYS_SIG_BYTES);
  if (r == SG_TOKEN_OK) {
    tok->server_id = strdup(ad->server_id);
    if (ad->audience && *ad->audience && !(tok->audience = strdup(ad->audience)))
      r = SG_TOKEN_GARBAGE;
    tok->time = ad->time;
    tok->data = malloc(t->data.len + 1);
    tok->data_len = t->data.len;
    if (tok->data) memcpy(tok->data, t->data.data, t->data.len);
    memcpy(tok->sig, t->sig.data, SG_KEYS_SIG_BYTES);
    if (!tok->server_id || !tok->data || r != SG_TOKEN_OK)
      r = refuse(SG_TOKEN_GARBAGE, why, whylen, "out of memory decoding a token");
  }
  protocol__sync__v1__auth_data__free_unpacked(ad, NULL);
  return r;
}

sg__token_reason sg__token_parse(const char *value, size_t len, sg__token *tok,
                               char *why, size_t whylen) {
  memset(tok, 0, sizeof *tok);
  if (!value || len == 0)
    return refuse(SG_TOKEN_MISSING, why, whylen, "no Authorization header");
  if (len > SG_TOKEN_MAX_HEADER)
    return refuse(SG_TOKEN_GARBAGE, why, whylen,
                  "Authorization header is %zu bytes, more than %d", len,
                  SG_TOKEN_MAX_HEADER);
  Protocol__Harmonytypes__V1__Token *t = unpack_header(value, len);
  if (!t)
    return refuse(SG_TOKEN_GARBAGE, why, whylen,
                  "Authorization header (%zu bytes) is not a Token, neither in "
                  "base64 nor raw", len);
  sg__token_reason r = take_token(t, tok, why, whylen);
  protocol__harmonytypes__v1__token__free_unpacked(t, NULL);
  if (r != SG_TOKEN_OK) sg__token_clear(tok);
  return r;
}

void sg__token_clear(sg__token *tok) {
  if (!tok) return;
  free(tok->server_id);
  free(tok->audience);
  free(tok->data);
  memset(tok, 0, sizeof *tok);
}

/* ---- admit and verify --------------------------------------------------- */

int sg__token_on_list(const char *id, const char *const *list, size_t n) {
  for (size_t i = 0; i < n; i++)
    if (list[i] && strcmp(list[i], id) == 0) return 1;
  return 0;
}

int sg__token_listed(const char *id, const char *const *list, size_t n, const sg__idmap *map) {
  return map ? sg__idmap_get(map, id) != NULL : sg__token_on_list(id, list, n);
}

/* segue's audience extension: the window that applies, or a refusal. */
static sg__token_reason admit_audience(const sg__token *tok, const sg__token_policy *pol,
                                      uint64_t *window, char *why, size_t whylen) {
  *window = pol->window;
  if (tok->audience) {
    if (pol->audience && strcmp(tok->audience, pol->audience) == 0) return SG_TOKEN_OK;
    return refuse(SG_TOKEN_WRONG_AUDIENCE, why, whylen,
                  "token from %s is for %.64s, not for us (%s)", tok->server_id, tok->audience,
                  pol->audience ? pol->audience : "no server_id set");
  }
  if (sg__token_listed(tok->server_id, pol->bound, pol->n_bound, pol->bound_map))
    return refuse(SG_TOKEN_AUDIENCE_REQUIRED, why, whylen,
                  "token from %s names no audience; its peers entry requires one",
                  tok->server_id);
  uint64_t unbound = pol->unbound_window ? pol->unbound_window : SG_TOKEN_DEFAULT_UNBOUND_WINDOW;
  if (unbound < *window) *window = unbound;
  return SG_TOKEN_OK;
}

static sg__token_reason admit_time(const sg__token *tok, uint64_t window,
                                  uint64_t now, char *why, size_t whylen) {
  /* Unsigned distances: a peer may send any 64-bit time. */
  if (now > tok->time && now - tok->time > window)
    return refuse(SG_TOKEN_STALE, why, whylen,
                  "token time %llu from %s is %llu s behind our clock %llu, "
                  "window %llu s", (unsigned long long)tok->time, tok->server_id,
                  (unsigned long long)(now - tok->time), (unsigned long long)now,
                  (unsigned long long)window);
  if (tok->time > now && tok->time - now > window)
    return refuse(SG_TOKEN_FUTURE, why, whylen,
                  "token time %llu from %s is %llu s ahead of our clock %llu, "
                  "window %llu s", (unsigned long long)tok->time, tok->server_id,
                  (unsigned long long)(tok->time - now), (unsigned long long)now,
                  (unsigned long long)window);
  return SG_TOKEN_OK;
}

sg__token_reason sg__token_admit(const sg__token *tok, const sg__token_policy *pol,
                               uint64_t now, char *why, size_t whylen) {
  sg__token_policy defaults;
  if (!pol) {
    sg__token_policy_init(&defaults);
    pol = &defaults;
  }
  if (pol->disabled)
    return refuse(SG_TOKEN_FEDERATION_DISABLED, why, whylen,
                  "federation is disabled; refused %s", tok->server_id);
  if (sg__token_listed(tok->server_id, pol->block, pol->n_block, pol->block_map))
    return refuse(SG_TOKEN_HOST_BLOCKED, why, whylen,
                  "server %s is on the block list", tok->server_id);
  if (pol->n_allow && !sg__token_listed(tok->server_id, pol->allow, pol->n_allow, pol->allow_map))
    return refuse(SG_TOKEN_HOST_NOT_ALLOWED, why, whylen,
                  "server %s is not on the allow list", tok->server_id);
  uint64_t window;
  sg__token_reason r = admit_audience(tok, pol, &window, why, whylen);
  return r != SG_TOKEN_OK ? r : admit_time(tok, window, now, why, whylen);
}

sg__token_reason sg__token_verify(const sg__token *tok,
                                const unsigned char pk[SG_KEYS_PUBLIC_BYTES],
                                char *why, size_t whylen) {
  char pk_b64[SG_KEYS_PUBLIC_B64_SIZE];
  if (sodium_init() >= 0 &&
      crypto_sign_verify_detached(tok->sig, tok->data, tok->data_len, pk) == 0)
    return SG_TOKEN_OK;
  sodium_bin2base64(pk_b64, sizeof pk_b64, pk, SG_KEYS_PUBLIC_BYTES,
                    sodium_base64_VARIANT_ORIGINAL);
  return refuse(SG_TOKEN_BAD_SIGNATURE, why, whylen,
                "token signature from %s does not verify with key %s",
                tok->server_id, pk_b64);
}

sg__token_reason sg__token_check(const char *value, size_t len,
                               const sg__token_policy *pol, uint64_t now,
                               const unsigned char pk[SG_KEYS_PUBLIC_BYTES],
                               sg__token *tok, char *why, size_t whylen) {
  sg__token_reason r = sg__token_parse(value, len, tok, why, whylen);
  if (r == SG_TOKEN_OK) r = sg__token_admit(tok, pol, now, why, whylen);
  if (r == SG_TOKEN_OK) r = sg__token_verify(tok, pk, why, whylen);
  if (r != SG_TOKEN_OK) sg__token_clear(tok);
  return r;
}
