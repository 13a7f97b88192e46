/* Harmony tokens and the server key file: create/check round trips, every
 * refusal with its identifier and status, every accepted header form, and
 * a key file that is created once and never replaced. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <sodium.h>

#include "harmony_keys.h"
#include "harmony_token.h"
#include "protocol/harmonytypes/v1/types.pb-c.h"
#include "protocol/sync/v1/sync.pb-c.h"
#include "segue.h"
#include "tap.h"

#define ID "chat.example.org:2289"
#define T0 1700000000u

static sg__keypair *kp, *other;

/* ---- helpers ------------------------------------------------------------ */

/* A Token with any signature and data, as `variant` base64 or raw (-1). */
static char *token_bytes(const uint8_t *sig, size_t sig_len, const uint8_t *data,
                         size_t data_len, int variant, size_t *len) {
  Protocol__Harmonytypes__V1__Token t = PROTOCOL__HARMONYTYPES__V1__TOKEN__INIT;
  t.sig = (ProtobufCBinaryData){sig_len, (uint8_t *)sig};
  t.data = (ProtobufCBinaryData){data_len, (uint8_t *)data};
  size_t raw_len = protocol__harmonytypes__v1__token__get_packed_size(&t);
  uint8_t *raw = malloc(raw_len + 1);
  protocol__harmonytypes__v1__token__pack(&t, raw);
  if (variant < 0) {
    *len = raw_len;
    return (char *)raw;
  }
  size_t size = sodium_base64_ENCODED_LEN(raw_len, variant);
  char *b64 = malloc(size);
  sodium_bin2base64(b64, size, raw, raw_len, variant);
  free(raw);
  *len = strlen(b64);
  return b64;
}

/* AuthData{server_id, time} packed into buf; returns its length. */
static size_t auth_data(const char *server_id, uint64_t time, uint8_t *buf) {
  Protocol__Sync__V1__AuthData ad = PROTOCOL__SYNC__V1__AUTH_DATA__INIT;
  ad.server_id = (char *)server_id;
  ad.time = time;
  return protocol__sync__v1__auth_data__pack(&ad, buf);
}

/* Checks `header` and expects `want`, its identifier and status, and `text`
 * in the log text. */
static void expect(const char *header, size_t len, const sg__token_policy *pol,
                   uint64_t now, const sg__keypair *key, sg__token_reason want,
                   const char *identifier, int status, const char *text) {
  sg__token tok;
  char why[SG_TOKEN_WHY_SIZE] = "";
  sg__token_reason r = sg__token_check(header, len, pol, now, sg__keys_public(key), &tok,
                                     why, sizeof why);
  CHECK_STR(sg__token_reason_name(r), sg__token_reason_name(want));
  CHECK_STR(sg__token_reason_identifier(r), identifier);
  CHECK(sg__token_reason_status(r) == status);
  CHECK(strstr(why, text) != NULL);
  if (!strstr(why, text)) fprintf(stderr, "  wanted \"%s\" in \"%s\"\n", text, why);
  if (r == SG_TOKEN_OK) {
    CHECK_STR(tok.server_id, ID);
    sg__token_clear(&tok);
  } else {
    CHECK(tok.server_id == NULL && tok.data == NULL);
  }
}

static void expect_str(const char *header, const sg__token_policy *pol, uint64_t now,
                       sg__token_reason want, const char *identifier, int status,
                       const char *text) {
  expect(header, header ? strlen(header) : 0, pol, now, kp, want, identifier, status, text);
}

/* ---- tokens ------------------------------------------------------------- */

static void test_round_trip(void) {
  char *header;
  sg__token tok;
  CHECK(sg__token_create(kp, ID, T0, &header) == 0);
  CHECK(strlen(header) % 4 == 0 && strspn(header, "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
        "abcdefghijklmnopqrstuvwxyz0123456789+/=") == strlen(header));
  CHECK(sg__token_check(header, strlen(header), NULL, T0, sg__keys_public(kp), &tok,
                       NULL, 0) == SG_TOKEN_OK);
  CHECK_STR(tok.server_id, ID);
  CHECK(tok.time == T0);
  sg__token_clear(&tok);
  sg__token_clear(&tok);  /* safe to repeat */
  free(header);
  CHECK(sg__token_create(kp, "", T0, &header) == SG_EINVAL);
  CHECK(sg__token_create(kp, NULL, T0, &header) == SG_EINVAL);
}

/* Parse first to learn the server id, then verify once the key is known;
 * a failed verify leaves the token usable for a retry with a fresh key. */
static void test_split_flow(void) {
  char *header;
  sg__token tok;
  sg__token_policy pol;
  char why[SG_TOKEN_WHY_SIZE];
  sg__token_policy_init(&pol);
  sg__token_create(kp, ID, T0, &header);
  CHECK(sg__token_parse(header, strlen(header), &tok, why, sizeof why) == SG_TOKEN_OK);
  CHECK_STR(tok.server_id, ID);
  CHECK(sg__token_admit(&tok, &pol, T0 + 5, why, sizeof why) == SG_TOKEN_OK);
  CHECK(sg__token_verify(&tok, sg__keys_public(other), why, sizeof why) ==
        SG_TOKEN_BAD_SIGNATURE);
  CHECK(sg__token_verify(&tok, sg__keys_public(kp), why, sizeof why) == SG_TOKEN_OK);
  sg__token_clear(&tok);
  free(header);
}

static void test_header_forms(void) {
  uint8_t data[128], sig[64];
  size_t data_len = auth_data(ID, T0, data), len;
  const int forms[] = {sodium_base64_VARIANT_ORIGINAL,
                       sodium_base64_VARIANT_ORIGINAL_NO_PADDING,
                       sodium_base64_VARIANT_URLSAFE,
                       sodium_base64_VARIANT_URLSAFE_NO_PADDING, -1};
  sg__keys_sign(kp, data, data_len, sig);
  for (size_t i = 0; i < sizeof forms / sizeof forms[0]; i++) {
    char *h = token_bytes(sig, sizeof sig, data, data_len, forms[i], &len);
    expect(h, len, NULL, T0, kp, SG_TOKEN_OK, "", 200, "");
    free(h);
  }
}

/* Standard base64 with padding is decoded by a table (the fast path);
 * whatever it does not take goes to libsodium's decoders as before: tokens
 * of every length round-trip, a blank inside is still skipped, non-zero
 * spare bits are still refused. */
static void test_standard_base64(void) {
  uint8_t data[512], sig[64];
  char id[300];
  size_t len;
  for (int n = 1; n <= 60; n++) {  /* ids of 1 to 60 labels: every length mod 3 */
    id[0] = '\0';
    for (int l = 0; l < n; l++) strcat(id, l % 2 ? "b." : "a.");
    strcat(id, "example:2289");
    size_t data_len = auth_data(id, T0 + (uint64_t)n, data);
    randombytes_buf(sig, sizeof sig);
    char *h = token_bytes(sig, sizeof sig, data, data_len, sodium_base64_VARIANT_ORIGINAL, &len);
    sg__token tok;
    char why[SG_TOKEN_WHY_SIZE];
    CHECK(sg__token_parse(h, len, &tok, why, sizeof why) == SG_TOKEN_OK);
    CHECK(tok.server_id && strcmp(tok.server_id, id) == 0 && tok.time == T0 + (uint64_t)n);
    CHECK(tok.data_len == data_len && memcmp(tok.data, data, data_len) == 0);
    CHECK(memcmp(tok.sig, sig, sizeof sig) == 0);
    sg__token_clear(&tok);
    free(h);
  }
  size_t data_len = auth_data(ID, T0, data);
  sg__keys_sign(kp, data, data_len, sig);
  char *h = token_bytes(sig, sizeof sig, data, data_len, sodium_base64_VARIANT_ORIGINAL, &len);
  char *blank = malloc(len + 2);
  memcpy(blank, h, 8);
  blank[8] = '\t';
  memcpy(blank + 9, h + 8, len - 8 + 1);
  expect(blank, len + 1, NULL, T0, kp, SG_TOKEN_OK, "", 200, "");
  size_t last = len - 1;
  while (h[last] == '=') last--;
  CHECK(h[len - 1] == '=');  /* padded: the last character has spare bits; set one */
  const char *alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  h[last] = alphabet[(strchr(alphabet, h[last]) - alphabet) | 1];
  expect(h, len, NULL, T0, kp, SG_TOKEN_GARBAGE, "h.bad-token", 400, "neither in base64 nor raw");
  free(blank);
  free(h);
}

static void test_refusals(void) {
  uint8_t data[128], sig[64];
  size_t data_len = auth_data(ID, T0, data), len;
  char *header, *h;
  sg__token_policy pol;
  const char *allow[] = {"friend.example:443"}, *block[] = {ID};
  sg__keys_sign(kp, data, data_len, sig);
  sg__token_create(kp, ID, T0, &header);

  expect_str(NULL, NULL, T0, SG_TOKEN_MISSING, "h.bad-auth", 400, "no Authorization header");
  expect_str("", NULL, T0, SG_TOKEN_MISSING, "h.bad-auth", 400, "no Authorization header");
  expect_str("%%% garbage %%%", NULL, T0, SG_TOKEN_GARBAGE, "h.bad-token", 400,
             "is not a Token");
  expect_str(header, NULL, T0 + 3600, SG_TOKEN_STALE, "h.bad-token-data", 400,
             "token time 1700000000 from " ID " is 3600 s behind our clock 1700003600, "
             "window 30 s");  /* no audience: the unbound window */
  expect_str(header, NULL, T0 - 61, SG_TOKEN_FUTURE, "h.bad-token-data", 400,
             "is 61 s ahead of our clock");
  expect(header, strlen(header), NULL, T0, other, SG_TOKEN_BAD_SIGNATURE,
         "h.token-verify-failure", 400, "does not verify with key");

  sg__token_policy_init(&pol);
  pol.allow = allow;
  pol.n_allow = 1;
  expect_str(header, &pol, T0, SG_TOKEN_HOST_NOT_ALLOWED, "h.host-not-allowed", 403,
             "server " ID " is not on the allow list");
  sg__token_policy_init(&pol);
  pol.block = block;
  pol.n_block = 1;
  expect_str(header, &pol, T0, SG_TOKEN_HOST_BLOCKED, "h.host-not-allowed", 403,
             "server " ID " is on the block list");
  sg__token_policy_init(&pol);
  pol.disabled = 1;
  expect_str(header, &pol, T0, SG_TOKEN_FEDERATION_DISABLED, "h.federation-disabled",
             403, "federation is disabled");
  sg__token_policy_init(&pol);
  pol.window = pol.unbound_window = 7200;
  expect_str(header, &pol, T0 + 3600, SG_TOKEN_OK, "", 200, "");

  h = token_bytes(sig, 63, data, data_len, sodium_base64_VARIANT_ORIGINAL, &len);
  expect(h, len, NULL, T0, kp, SG_TOKEN_SIG_LENGTH, "h.bad-token-signature", 400,
         "token signature from " ID " is 63 bytes, expected 64");
  free(h);
  sig[10] ^= 1;
  h = token_bytes(sig, 64, data, data_len, sodium_base64_VARIANT_ORIGINAL, &len);
  expect(h, len, NULL, T0, kp, SG_TOKEN_BAD_SIGNATURE, "h.token-verify-failure", 400,
         "does not verify");
  free(h);
  h = token_bytes(sig, 64, (const uint8_t *)"\xff\x01", 2, -1, &len);
  expect(h, len, NULL, T0, kp, SG_TOKEN_BAD_DATA, "h.bad-token-data", 400,
         "token data (2 bytes) is not an AuthData");
  free(h);
  data_len = auth_data("", T0, data);
  h = token_bytes(sig, 64, data, data_len, sodium_base64_VARIANT_URLSAFE, &len);
  expect(h, len, NULL, T0, kp, SG_TOKEN_NO_SERVER_ID, "h.bad-token-data", 400,
         "no server_id");
  free(h);
  free(header);
}

/* AuthData{server_id, time} with server_id given as `len` raw bytes. */
static size_t auth_data_raw(const char *id, size_t len, uint64_t time, uint8_t *buf) {
  size_t n = 0;
  buf[n++] = 0x0a;
  buf[n++] = (uint8_t)len;
  memcpy(buf + n, id, len);
  n += len;
  buf[n++] = 0x10;
  for (uint64_t t = time; ; t >>= 7) {
    buf[n++] = (uint8_t)((t & 0x7f) | (t >= 0x80 ? 0x80 : 0));
    if (t < 0x80) break;
  }
  return n;
}

/* Issue 12, item 11: a signed server_id "a.example\0evil" was read as
 * "a.example"; ids that are not host[:port] (SSRF through key fetches) are
 * refused before any key is looked for. */
static void test_server_id_form(void) {
  static const struct { const char *id; size_t len; } bad[] = {
      {ID "\0evil", sizeof ID + 4},
      {"127.0.0.1:1/admin?x=", 20},
      {"evil@127.0.0.1:1", 16},
      {"a b.example:1", 13},
      {"a.example:0", 11},
      {"a.example:65536", 15},
      {"-a.example:1", 12},
      {"[::1", 4},
      {"a..example", 10},
  };
  uint8_t data[300], sig[64];
  size_t len;
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    size_t n = auth_data_raw(bad[i].id, bad[i].len, T0, data);
    sg__keys_sign(kp, data, n, sig);
    char *h = token_bytes(sig, 64, data, n, sodium_base64_VARIANT_ORIGINAL, &len);
    expect(h, len, NULL, T0, kp, SG_TOKEN_BAD_SERVER_ID, "h.bad-token-data", 400, "");
    free(h);
  }
  static const char *const good[] = {"a.example", "a.example:1", "127.0.0.1:2289",
                                     "[::1]:2289", "[2001:db8::1]", "xn--bcher-kva.example:443"};
  for (size_t i = 0; i < sizeof good / sizeof good[0]; i++)
    CHECK(sg__token_server_id_ok(good[i], strlen(good[i])));
  CHECK(!sg__token_server_id_ok("a.example:1\0", 12));
}

/* Issue 12, item 3: segue's audience extension. */
static void test_audience(void) {
  sg__token_policy pol;
  char *for_us, *for_other, *unbound;
  const char *bound[] = {ID};
  CHECK(sg__token_create_for(kp, ID, "us.example:1", T0, &for_us) == 0);
  CHECK(sg__token_create_for(kp, ID, "other.example:1", T0, &for_other) == 0);
  CHECK(sg__token_create_for(kp, ID, NULL, T0, &unbound) == 0);
  sg__token_policy_init(&pol);
  pol.audience = "us.example:1";
  /* ours: the whole window; no audience: the shorter one */
  expect_str(for_us, &pol, T0 + 60, SG_TOKEN_OK, "", 200, "");
  expect_str(unbound, &pol, T0 + 30, SG_TOKEN_OK, "", 200, "");
  expect_str(unbound, &pol, T0 + 31, SG_TOKEN_STALE, "h.bad-token-data", 400, "window 30 s");
  /* a token C made for D is refused by us: no replay across servers */
  expect_str(for_other, &pol, T0, SG_TOKEN_WRONG_AUDIENCE, "h.bad-token-data", 400,
             "is for other.example:1, not for us (us.example:1)");
  pol.audience = NULL;
  expect_str(for_us, &pol, T0, SG_TOKEN_WRONG_AUDIENCE, "h.bad-token-data", 400, "no server_id set");
  pol.audience = "us.example:1";
  pol.bound = bound;
  pol.n_bound = 1;
  expect_str(unbound, &pol, T0, SG_TOKEN_AUDIENCE_REQUIRED, "h.bad-token-data", 400,
             "requires one");
  expect_str(for_us, &pol, T0, SG_TOKEN_OK, "", 200, "");
  sg__token tok;
  CHECK(sg__token_parse(for_us, strlen(for_us), &tok, NULL, 0) == SG_TOKEN_OK);
  CHECK_STR(tok.audience, "us.example:1");
  sg__token_clear(&tok);
  free(for_us);
  free(for_other);
  free(unbound);
}

static void test_reason_table(void) {
  CHECK_STR(sg__token_reason_name(SG_TOKEN_STALE), "STALE");
  CHECK_STR(sg__token_reason_summary(SG_TOKEN_BAD_SIGNATURE), "signature does not verify");
  CHECK_STR(sg__token_reason_identifier((sg__token_reason)999), "h.bad-token");
  for (int r = 1; r < SG_TOKEN__REASON_COUNT; r++) {
    int st = sg__token_reason_status((sg__token_reason)r);
    CHECK(st == 400 || st == 403);
    CHECK(strncmp(sg__token_reason_identifier((sg__token_reason)r), "h.", 2) == 0);
  }
}

/* ---- keys --------------------------------------------------------------- */

static int read_file(const char *path, uint8_t *buf, size_t cap, size_t *len) {
  FILE *f = fopen(path, "rb");
  if (!f) return -1;
  *len = fread(buf, 1, cap, f);
  fclose(f);
  return 0;
}

static void write_file(const char *path, const uint8_t *buf, size_t len, mode_t mode) {
  int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, mode);
  CHECK(fd >= 0 && write(fd, buf, len) == (ssize_t)len);
  close(fd);
  chmod(path, mode);
}

/* Writes `content` as the key file, expects SG_EKEY naming the path and
 * `what`, and the file unchanged afterwards. */
static void expect_bad_key_file(const char *dir, const uint8_t *content, size_t len,
                                mode_t mode, const char *what) {
  char path[4096], err[512] = "";
  uint8_t after[256];
  size_t after_len = 0;
  sg__keypair *k = NULL;
  snprintf(path, sizeof path, "%s/harmony.key", dir);
  write_file(path, content, len, mode);
  CHECK(sg__keys_load_or_create(dir, &k, err, sizeof err) == SG_EKEY);
  CHECK(k == NULL);
  CHECK(strstr(err, path) != NULL && strstr(err, what) != NULL);
  if (!strstr(err, what)) fprintf(stderr, "  wanted \"%s\" in \"%s\"\n", what, err);
  CHECK(read_file(path, after, sizeof after, &after_len) == 0);
  CHECK(after_len == len && memcmp(after, content, len) == 0);
  struct stat st;
  CHECK(stat(path, &st) == 0 && (st.st_mode & 0777) == mode);
  unlink(path);
}

static void test_key_file(void) {
  char base[] = "/tmp/segue-harmony-XXXXXX", dir[2048], path[4096], err[512];
  uint8_t first[128] = {0}, again[128], bad[64];
  size_t first_len = 0, again_len = 0;
  sg__keypair *a = NULL, *b = NULL;
  struct stat st;
  CHECK(mkdtemp(base) != NULL);
  snprintf(dir, sizeof dir, "%s/data", base);  /* does not exist yet */
  snprintf(path, sizeof path, "%s/harmony.key", dir);

  CHECK(sg__keys_load_or_create(dir, &a, err, sizeof err) == 0);
  CHECK(stat(dir, &st) == 0 && S_ISDIR(st.st_mode) && (st.st_mode & 0777) == 0700);
  CHECK(stat(path, &st) == 0 && (st.st_mode & 0777) == 0600 && st.st_size == 64);
  CHECK(read_file(path, first, sizeof first, &first_len) == 0 && first_len == 64);
  CHECK(memcmp(first + 32, sg__keys_public(a), 32) == 0);

  CHECK(sg__keys_load_or_create(dir, &b, err, sizeof err) == 0);
  CHECK(memcmp(sg__keys_public(a), sg__keys_public(b), 32) == 0);
  CHECK(read_file(path, again, sizeof again, &again_len) == 0);
  CHECK(again_len == 64 && memcmp(first, again, 64) == 0);
  sg__keys_free(b);
  unlink(path);

  expect_bad_key_file(dir, first, 63, 0600, "63 bytes, expected 64");
  expect_bad_key_file(dir, first, 65, 0600, "65 bytes, expected 64");
  expect_bad_key_file(dir, first, 64, 0644, "mode 0644");
  expect_bad_key_file(dir, first, 64, 0640, "mode 0640");
  memcpy(bad, first, 64);
  bad[40] ^= 0x80;
  expect_bad_key_file(dir, bad, 64, 0600, "public half does not match the seed");

  /* a file in place of the directory */
  write_file(path, first, 64, 0600);
  CHECK(sg__keys_load_or_create(path, &b, err, sizeof err) == -ENOTDIR);
  CHECK(strstr(err, "is not a directory") != NULL);
  unlink(path);
  rmdir(dir);
  rmdir(base);
  sg__keys_free(a);
}

static void test_key_helpers(void) {
  unsigned char secret[64], sig[64];
  char b64[SG_KEYS_PUBLIC_B64_SIZE], err[256];
  unsigned char pk[32];
  size_t pk_len;
  sg__keypair *k = NULL;
  CHECK(sg__keys_public_b64(kp, b64, sizeof b64) == 0 && strlen(b64) == 44);
  CHECK(sg__keys_public_b64(kp, b64, sizeof b64 - 1) == SG_EINVAL);
  CHECK(sodium_base642bin(pk, sizeof pk, b64, strlen(b64), NULL, &pk_len, NULL,
                          sodium_base64_VARIANT_ORIGINAL) == 0);
  CHECK(pk_len == 32 && memcmp(pk, sg__keys_public(kp), 32) == 0);

  CHECK(sg__keys_sign(kp, (const unsigned char *)"hello", 5, sig) == 0);
  CHECK(crypto_sign_verify_detached(sig, (const unsigned char *)"hello", 5,
                                    sg__keys_public(kp)) == 0);

  sg__keys_export_secret(kp, secret);
  CHECK(sg__keys_from_secret(secret, 32, &k, err, sizeof err) == 0);
  CHECK(memcmp(sg__keys_public(k), sg__keys_public(kp), 32) == 0);
  sg__keys_free(k);
  CHECK(sg__keys_from_secret(secret, 64, &k, err, sizeof err) == 0);
  sg__keys_free(k);
  k = NULL;
  CHECK(sg__keys_from_secret(secret, 31, &k, err, sizeof err) == SG_EINVAL && !k);
  secret[63] ^= 1;
  CHECK(sg__keys_from_secret(secret, 64, &k, err, sizeof err) == SG_EKEY && !k);
  CHECK(strstr(err, "public half does not match") != NULL);
  sodium_memzero(secret, sizeof secret);
  sg__keys_free(NULL);
}

int main(void) {
  CHECK(sg__keys_generate(&kp) == 0 && sg__keys_generate(&other) == 0);
  test_round_trip();
  test_split_flow();
  test_header_forms();
  test_standard_base64();
  test_refusals();
  test_server_id_form();
  test_audience();
  test_reason_table();
  test_key_file();
  test_key_helpers();
  sg__keys_free(kp);
  sg__keys_free(other);
  return tap_done();
}
