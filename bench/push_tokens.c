/* Writes N distinct federation tokens, one per line (standard base64), for
 * bench/push.sh's fresh-token row: each AuthData {server_id, time, audience}
 * also carries an unknown field 2000 holding a counter, which protobuf
 * readers skip, so every token is different bytes with a valid signature
 * and no cache can answer for it.
 *
 *   push_tokens KEY_FILE SERVER_ID AUDIENCE TIME N > tokens
 *
 * Built by bench/build_tools.sh. */
#include <sodium.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static size_t varint(uint8_t *p, uint64_t v) {
  size_t n = 0;
  do {
    p[n] = (uint8_t)(v & 0x7f);
    v >>= 7;
    if (v) p[n] |= 0x80;
    n++;
  } while (v);
  return n;
}

static size_t field_bytes(uint8_t *p, uint64_t key, const void *b, size_t len) {
  size_t n = varint(p, key);
  n += varint(p + n, len);
  memcpy(p + n, b, len);
  return n + len;
}

int main(int argc, char **argv) {
  if (argc != 6 || sodium_init() < 0) {
    fprintf(stderr, "usage: push_tokens KEY_FILE SERVER_ID AUDIENCE TIME N\n");
    return 2;
  }
  unsigned char sk[64];
  FILE *f = fopen(argv[1], "rb");
  if (!f || fread(sk, 1, 64, f) != 64) {
    fprintf(stderr, "push_tokens: cannot read a 64-byte key from %s\n", argv[1]);
    return 2;
  }
  fclose(f);
  uint64_t t = strtoull(argv[4], NULL, 10);
  long n = atol(argv[5]);
  for (long i = 0; i < n; i++) {
    uint8_t data[600], tok[800], sig[64];
    size_t d = field_bytes(data, 1 << 3 | 2, argv[2], strlen(argv[2]));
    d += varint(data + d, 2 << 3);
    d += varint(data + d, t);
    d += field_bytes(data + d, 1000 << 3 | 2, argv[3], strlen(argv[3]));
    d += varint(data + d, 2000 << 3);
    d += varint(data + d, (uint64_t)i);
    crypto_sign_detached(sig, NULL, data, d, sk);
    size_t k = field_bytes(tok, 1 << 3 | 2, sig, 64);
    k += field_bytes(tok + k, 2 << 3 | 2, data, d);
    char b64[1200];
    sodium_bin2base64(b64, sizeof b64, tok, k, sodium_base64_VARIANT_ORIGINAL);
    puts(b64);
  }
  return 0;
}
