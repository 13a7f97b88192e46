/* libsodium's Ed25519 verify rate on a token-sized message (a serialized
 * AuthData), for bench/push.sh: the cryptographic ceiling of accepting
 * Pushes. With THREADS > 1, that many threads verify at once and the total
 * is printed: what the machine's cores give together (on a VM whose vCPUs
 * share physical cores that is well under THREADS times one core's rate).
 *
 *   push_verify SECONDS [THREADS]  -> verifies per second (all threads) */
#include <pthread.h>
#include <sodium.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double secs;
static unsigned char pk[crypto_sign_PUBLICKEYBYTES];
static const unsigned char msg[] = "\x0a\x13" "bench.example:2289" "\x10\x80\xe2\xcf\xaa\x06";
static unsigned char sig[crypto_sign_BYTES];

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

typedef struct {
  double rate;
  long failed;
} result;

static void *verify(void *arg) {
  result *r = arg;
  long n = 0;
  double t0 = now(), t;
  do {
    for (int i = 0; i < 256; i++)
      r->failed += crypto_sign_verify_detached(sig, msg, sizeof msg - 1, pk) != 0;
    n += 256;
    t = now();
  } while (t - t0 < secs);
  r->rate = (double)n / (t - t0);
  return NULL;
}

int main(int argc, char **argv) {
  secs = argc > 1 ? atof(argv[1]) : 2;
  int threads = argc > 2 ? atoi(argv[2]) : 1;
  if (threads < 1 || threads > 64) return 2;
  unsigned char sk[crypto_sign_SECRETKEYBYTES];
  if (sodium_init() < 0) return 1;
  crypto_sign_keypair(pk, sk);
  crypto_sign_detached(sig, NULL, msg, sizeof msg - 1, sk);
  pthread_t tid[64];
  result res[64] = {{0}};
  for (int i = 1; i < threads; i++)
    if (pthread_create(&tid[i], NULL, verify, &res[i]) != 0) return 1;
  verify(&res[0]);
  double total = res[0].rate;
  long failed = res[0].failed;
  for (int i = 1; i < threads; i++) {
    pthread_join(tid[i], NULL);
    total += res[i].rate;
    failed += res[i].failed;
  }
  if (failed) return 1;
  printf("%.0f\n", total);
  return 0;
}
