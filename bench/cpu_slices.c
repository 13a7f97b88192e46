/* How steady this machine's speed is: a fixed loop counts how much of its
 * work fits in each SLICE_MS-millisecond slice for SECS seconds, and the
 * slowest tenth (p10), the median and the fastest tenth (p90) of the slices
 * are printed, in loops per millisecond. On a quiet machine of its own the
 * three are close; on a shared VM they are not, and a short benchmark run
 * (a 1k-message routing run lasts ~30 ms) lands in whichever slice it gets
 * (bench/machine.row, docs/performance.md).
 *   cpu_slices SECS [SLICE_MS]   (default 30 ms) */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static int cmp(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

int main(int argc, char **argv) {
  double secs = argc > 1 ? atof(argv[1]) : 1, slice = argc > 2 ? atof(argv[2]) : 30;
  if (secs <= 0 || slice <= 0) {
    fprintf(stderr, "usage: cpu_slices SECS [SLICE_MS]\n");
    return 2;
  }
  size_t cap = (size_t)(secs * 1e3 / slice) + 1, n = 0;
  double *rate = malloc(cap * sizeof *rate);
  if (!rate) return 1;
  volatile unsigned long sink = 0;
  double end = now_ms() + secs * 1e3;
  while (n < cap) {
    double t0 = now_ms(), t;
    if (t0 >= end) break;
    unsigned long loops = 0;
    do {
      for (unsigned i = 0; i < 1000; i++) sink += i * i;
      loops++;
    } while ((t = now_ms()) - t0 < slice);
    rate[n++] = loops / (t - t0);
  }
  qsort(rate, n, sizeof *rate, cmp);
  printf("%.0f %.0f %.0f\n", rate[n / 10], rate[n / 2], rate[n * 9 / 10]);
  free(rate);
  return 0;
}
