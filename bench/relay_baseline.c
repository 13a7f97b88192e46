/* The baseline: the same child process and pipes, a request line out and a
 * line back, with nothing else: no framing, no JSON, no Lua.
 *   relay_baseline EXE SECONDS          -> round trips/s, as fast as it can
 *   relay_baseline EXE SECONDS RATE     -> "rate p50_us p99_us": round trips
 *                                          started RATE per second, and the
 *                                          latency of each */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int cmp_d(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

int main(int argc, char **argv) {
  if (argc < 3) return 2;
  double seconds = atof(argv[2]);
  double rate = argc > 3 ? atof(argv[3]) : 0;
  int to_child[2], from_child[2];
  if (pipe(to_child) || pipe(from_child)) return 1;
  if (fork() == 0) {
    dup2(to_child[0], 0);
    dup2(from_child[1], 1);
    close(to_child[1]);
    close(from_child[0]);
    execl(argv[1], argv[1], "relay", (char *)NULL);
    _exit(127);
  }
  close(to_child[0]);
  close(from_child[1]);
  FILE *in = fdopen(from_child[0], "r");
  const char *req = "{\"sequence_number\":1,\"body\":{\"type\":\"RoomLookup\",\"value\":\"#bench\"}}\n";
  char line[4096];
  unsigned long n = 0;
  size_t cap = rate > 0 ? (size_t)(rate * seconds) + 16 : 0;
  double *lat = cap ? malloc(cap * sizeof *lat) : NULL;
  double start = now(), end = start + seconds;
  while (now() < end && (!cap || n < cap)) {
    double t0 = now();
    if (rate > 0) {
      double due = start + n / rate;
      while ((t0 = now()) < due) {
        struct timespec d = {0, (long)((due - t0) * 1e9)};
        nanosleep(&d, NULL);
      }
    }
    if (write(to_child[1], req, strlen(req)) < 0 || !fgets(line, sizeof line, in)) return 1;
    if (lat) lat[n] = now() - t0;
    n++;
  }
  double achieved = n / (now() - start);
  if (lat && n > 0) {
    qsort(lat, n, sizeof *lat, cmp_d);
    printf("%.0f %.0f %.0f\n", achieved, lat[n / 2] * 1e6, lat[(size_t)(n * 0.99)] * 1e6);
  } else {
    printf("%.0f\n", achieved);
  }
  close(to_child[1]);
  return 0;
}
