/* Shared by the fuzz targets. A broken property aborts with a message, so
 * that libFuzzer keeps the input as a crash like any sanitizer report. Logs
 * are formatted (that code runs too) and dropped, unless SEGUE_FUZZ_LOG is
 * set, for reproducing one input by hand. */
#ifndef SEGUE_FUZZ_COMMON_H
#define SEGUE_FUZZ_COMMON_H
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "log.h"

/* libFuzzer's entry points (Initialize is optional). */
int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define FUZZ_REQUIRE(cond, ...)                                       \
  do {                                                                \
    if (!(cond)) {                                                    \
      fprintf(stderr, "fuzz property broken: %s: ", #cond);           \
      fprintf(stderr, __VA_ARGS__);                                   \
      fputc('\n', stderr);                                            \
      abort();                                                        \
    }                                                                 \
  } while (0)

static inline void fuzz_log_line(void *data, sg_log_level lvl, const char *line) {
  (void)data;
  (void)lvl;
  static int show = -1;
  if (show < 0) show = getenv("SEGUE_FUZZ_LOG") != NULL;
  if (show) fprintf(stderr, "%s\n", line);
}

/* The seed of the key that signed the seed tokens (fuzz/make_seeds.lua):
 * 32 bytes 0x01..0x20, and the server id those tokens name. */
#define FUZZ_PEER "chat.example.org:2289"
static inline void fuzz_key_seed(unsigned char seed[32]) {
  for (int i = 0; i < 32; i++) seed[i] = (unsigned char)(i + 1);
}

/* Debug level: every log statement on the fuzzed path is exercised. */
static const sg__logger fuzz_log = {SG_LOG_DEBUG, fuzz_log_line, NULL};

#endif
