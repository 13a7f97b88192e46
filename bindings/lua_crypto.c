/* segue.crypto: the primitives SASL SCRAM (RFC 5802, RFC 7677) and similar
 * logins need, from well-kept libraries and never written here: digests,
 * HMAC and PBKDF2 from OpenSSL's EVP interface, random bytes, base64 and
 * constant-time comparison from libsodium. Translation only.
 *
 *   sha1(data), sha256(data)                  -> raw digest (20 / 32 bytes)
 *   hmac(alg, key, data)                      -> raw MAC; alg "sha1" | "sha256"
 *   pbkdf2(alg, password, salt, iterations [, length]) -> raw key (the
 *                                                digest length by default)
 *   random(n)                                 -> n random bytes (1..4096)
 *   hex(data)                                 -> lower-case hex
 *   xor(a, b)                                 -> a XOR b (equal lengths)
 *   equal(a, b)                               -> constant-time a == b
 *   base64_encode(data)                       -> standard base64, padded
 *   base64_decode(text) -> data | nil, "EINVAL: ...", "EINVAL"
 *
 * A wrong argument (an unknown algorithm, iterations < 1, unequal xor
 * lengths) raises; base64_decode's input comes from peers, so it fails.
 * OpenSSL is loaded by the first digest, HMAC or PBKDF2 (ssl_lazy.h): a
 * backend that only needs base64 and random bytes never maps it. */
#include <lauxlib.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <sodium.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bindings.h"
#include "ssl_lazy.h"

#define MAX_RANDOM 4096
#define MAX_PBKDF2_OUT 1024
/* SCRAM servers choose the count; bound it so a hostile one cannot stall the
 * loop for minutes (RFC 7677 recommends 4096; servers use up to ~100000). */
#define MAX_PBKDF2_ITERATIONS 10000000

static void need_openssl(lua_State *L) {
  char err[256];
  if (sg__ssl_load(err, sizeof err) != 0) luaL_error(L, "segue.crypto: %s", err);
}

static const EVP_MD *check_md(lua_State *L, int idx) {
  static const char *const names[] = {"sha1", "sha256", NULL};
  int which = luaL_checkoption(L, idx, NULL, names);
  need_openssl(L);
  return which == 0 ? EVP_sha1() : EVP_sha256();
}

static int digest(lua_State *L, const EVP_MD *md) {
  size_t len;
  const char *data = luaL_checklstring(L, 1, &len);
  unsigned char out[EVP_MAX_MD_SIZE];
  unsigned int n = 0;
  if (EVP_Digest(data, len, out, &n, md, NULL) != 1) return luaL_error(L, "digest failed");
  lua_pushlstring(L, (const char *)out, n);
  return 1;
}

static int l_sha1(lua_State *L) {
  need_openssl(L);
  return digest(L, EVP_sha1());
}

static int l_sha256(lua_State *L) {
  need_openssl(L);
  return digest(L, EVP_sha256());
}

static int l_hmac(lua_State *L) {
  const EVP_MD *md = check_md(L, 1);
  size_t klen, dlen;
  const char *key = luaL_checklstring(L, 2, &klen);
  const char *data = luaL_checklstring(L, 3, &dlen);
  unsigned char out[EVP_MAX_MD_SIZE];
  unsigned int n = 0;
  /* HMAC() with an empty key gets a NULL-safe non-NULL pointer. */
  if (!HMAC(md, klen ? key : "", (int)klen, (const unsigned char *)data, dlen, out, &n))
    return luaL_error(L, "HMAC failed");
  lua_pushlstring(L, (const char *)out, n);
  return 1;
}

static int l_pbkdf2(lua_State *L) {
  const EVP_MD *md = check_md(L, 1);
  size_t plen, slen;
  const char *password = luaL_checklstring(L, 2, &plen);
  const char *salt = luaL_checklstring(L, 3, &slen);
  lua_Integer iter = luaL_checkinteger(L, 4);
  luaL_argcheck(L, iter >= 1 && iter <= MAX_PBKDF2_ITERATIONS, 4, "iterations must be 1 to 10000000");
  lua_Integer len = luaL_optinteger(L, 5, EVP_MD_get_size(md));
  luaL_argcheck(L, len >= 1 && len <= MAX_PBKDF2_OUT, 5, "length must be 1 to 1024");
  unsigned char out[MAX_PBKDF2_OUT];
  if (PKCS5_PBKDF2_HMAC(password, (int)plen, (const unsigned char *)salt, (int)slen, (int)iter, md,
                        (int)len, out) != 1)
    return luaL_error(L, "PBKDF2 failed");
  lua_pushlstring(L, (const char *)out, (size_t)len);
  sodium_memzero(out, sizeof out);
  return 1;
}

static int l_random(lua_State *L) {
  lua_Integer n = luaL_checkinteger(L, 1);
  luaL_argcheck(L, n >= 1 && n <= MAX_RANDOM, 1, "1 to 4096 bytes");
  unsigned char buf[MAX_RANDOM];
  randombytes_buf(buf, (size_t)n);
  lua_pushlstring(L, (const char *)buf, (size_t)n);
  return 1;
}

static int l_hex(lua_State *L) {
  size_t len;
  const char *data = luaL_checklstring(L, 1, &len);
  luaL_Buffer b;
  char *out = luaL_buffinitsize(L, &b, len * 2 + 1);
  sodium_bin2hex(out, len * 2 + 1, (const unsigned char *)data, len);
  luaL_pushresultsize(&b, len * 2);
  return 1;
}

static int l_xor(lua_State *L) {
  size_t alen, blen;
  const char *a = luaL_checklstring(L, 1, &alen);
  const char *b = luaL_checklstring(L, 2, &blen);
  luaL_argcheck(L, alen == blen, 2, "xor needs two strings of the same length");
  luaL_Buffer buf;
  char *out = luaL_buffinitsize(L, &buf, alen);
  for (size_t i = 0; i < alen; i++) out[i] = (char)(a[i] ^ b[i]);
  luaL_pushresultsize(&buf, alen);
  return 1;
}

static int l_equal(lua_State *L) {
  size_t alen, blen;
  const char *a = luaL_checklstring(L, 1, &alen);
  const char *b = luaL_checklstring(L, 2, &blen);
  lua_pushboolean(L, alen == blen && sodium_memcmp(a, b, alen) == 0);
  return 1;
}

static int l_base64_encode(lua_State *L) {
  size_t len;
  const char *data = luaL_checklstring(L, 1, &len);
  size_t cap = sodium_base64_ENCODED_LEN(len, sodium_base64_VARIANT_ORIGINAL);
  luaL_Buffer b;
  char *out = luaL_buffinitsize(L, &b, cap);
  sodium_bin2base64(out, cap, (const unsigned char *)data, len, sodium_base64_VARIANT_ORIGINAL);
  luaL_pushresultsize(&b, strlen(out));
  return 1;
}

static int l_base64_decode(lua_State *L) {
  size_t len;
  const char *text = luaL_checklstring(L, 1, &len);
  size_t cap = len / 4 * 3 + 3, n = 0;
  const char *end = NULL;
  luaL_Buffer b;
  unsigned char *out = (unsigned char *)luaL_buffinitsize(L, &b, cap);
  if (sodium_base642bin(out, cap, text, len, NULL, &n, &end, sodium_base64_VARIANT_ORIGINAL) != 0 ||
      end != text + len) {
    char msg[96];
    snprintf(msg, sizeof msg, "not standard base64 with padding (at byte %zu of %zu)",
             end ? (size_t)(end - text) : (size_t)0, len);
    return sg__lua_fail(L, SG_EINVAL, msg);
  }
  luaL_pushresultsize(&b, n);
  return 1;
}

int luaopen_segue_crypto(lua_State *L) {
  static const luaL_Reg fns[] = {
      {"sha1", l_sha1},     {"sha256", l_sha256}, {"hmac", l_hmac},
      {"pbkdf2", l_pbkdf2}, {"random", l_random}, {"hex", l_hex},
      {"xor", l_xor},       {"equal", l_equal},   {"base64_encode", l_base64_encode},
      {"base64_decode", l_base64_decode}, {NULL, NULL}};
  if (sodium_init() < 0) return luaL_error(L, "libsodium failed to initialize");
  luaL_newlib(L, fns);
  return 1;
}
