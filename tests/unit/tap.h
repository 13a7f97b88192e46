/* A tiny test harness for the C unit tests: CHECK records a failure with
 * file:line and goes on; main returns tap_done(), non-zero if anything failed. */
#ifndef SEGUE_TEST_TAP_H
#define SEGUE_TEST_TAP_H
#include <stdio.h>
#include <string.h>

static int tap_failures, tap_checks;

#define CHECK(cond)                                                          \
  do {                                                                       \
    tap_checks++;                                                            \
    if (!(cond)) {                                                           \
      tap_failures++;                                                        \
      fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
    }                                                                        \
  } while (0)

#define CHECK_STR(a, b)                                                      \
  do {                                                                       \
    const char *a_ = (a), *b_ = (b);                                         \
    tap_checks++;                                                            \
    if (!a_ || !b_ || strcmp(a_, b_) != 0) {                                 \
      tap_failures++;                                                        \
      fprintf(stderr, "%s:%d: expected \"%s\", got \"%s\"\n", __FILE__,      \
              __LINE__, b_ ? b_ : "(null)", a_ ? a_ : "(null)");             \
    }                                                                        \
  } while (0)

static inline int tap_done(void) {
  fprintf(stderr, "%d checks, %d failed\n", tap_checks, tap_failures);
  return tap_failures ? 1 : 0;
}
#endif
