/* A minimal backend for the round-trip benchmark, in C so the backend's own
 * cost is small next to what is measured.
 *   bench_backend proto   speaks the backend protocol: InitInfo, then for
 *                         each request line an Update and the Response
 *   bench_backend relay   echoes each line (the baseline's child) */
#include <stdio.h>
#include <string.h>

int main(int argc, char **argv) {
  int proto = argc > 1 && strcmp(argv[1], "proto") == 0;
  char line[65536];
  setvbuf(stdout, NULL, _IOFBF, 1 << 16);
  if (proto) {
    fputs("{\"backend_name\":\"bench\",\"backend_version\":[0,0,1],\"protocol_version\":[0,1,0]}\n", stdout);
    fflush(stdout);
  }
  unsigned long n = 0;
  while (fgets(line, sizeof line, stdin)) {
    if (!proto) {
      fputs(line, stdout);
    } else {
      unsigned seq = 0;
      if (sscanf(line, "{\"sequence_number\":%u", &seq) != 1) return 2;
      printf("{\"type\":\"RoomDelete\",\"value\":\"!r%lu\"}\n", n++);
      printf("{\"sequence_number\":%u,\"body\":{\"type\":\"RoomID\",\"value\":\"!r\"}}\n", seq);
    }
    fflush(stdout);
  }
  return 0;
}
