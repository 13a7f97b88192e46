/* The baseline: the same child process and pipes, a request line out and a
 * line back, with nothing else: no framing, no JSON, no Lua. */
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

int main(int argc, char **argv) {
  if (argc < 3) return 2;
  double seconds = atof(argv[2]);
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
  double start = now(), end = start + seconds;
  while (now() < end) {
    if (write(to_child[1], req, strlen(req)) < 0 || !fgets(line, sizeof line, in)) return 1;
    n++;
  }
  printf("%.0f\n", n / (now() - start));
  close(to_child[1]);
  return 0;
}
