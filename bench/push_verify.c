/* libsodium's single-core Ed25519 verify rate on a token-sized message (a
 * serialized AuthData), for bench/push.sh: the cryptographic ceiling of
 * accepting Pushes on one core.
 *
 *   push_verify SECONDS  -> verifies per second */
#include <sodium.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
  double secs = argc > 1 ? atof(argv[1]) : 2;
  unsigned char pk[crypto_sign_PUBLICKEYBYTES], sk[crypto_sign_SECRETKEYBYTES];
  unsigned char msg[] = "\x0a\x13" "bench.example:2289" "\x10\x80\xe2\xcf\xaa\x06";
  unsigned char sig[crypto_sign_BYTES];
  if (sodium_init() < 0) return 1;
  crypto_sign_keypair(pk, sk);
  crypto_sign_detached(sig, NULL, msg, sizeof msg - 1, sk);
  long n = 0, failed = 0;
  double t0 = now(), t;
  do {
    for (int i = 0; i < 256; i++)
      failed += crypto_sign_verify_detached(sig, msg, sizeof msg - 1, pk) != 0;
    n += 256;
    t = now();
  } while (t - t0 < secs);
  if (failed) return 1;
  printf("%.0f\n", (double)n / (t - t0));
  return 0;
}
