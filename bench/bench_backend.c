/* A minimal backend for the benchmarks, in C so the backend's own cost is
 * small next to what is measured.
 *   bench_backend proto     speaks the backend protocol: InitInfo, then for
 *                           each request line an Update and the Response
 *   bench_backend relay     echoes each line (the baseline's child)
 *   bench_backend src N [RATE]
 *                           a chat service that, once asked to RoomJoin
 *                           "#go", says N messages in "#bench" (RATE per
 *                           second, or as fast as it can with 0 or none);
 *                           each text carries the monotonic time it was said
 *   bench_backend dst N [FILE]
 *                           a chat service that answers MessageSends; after N
 *                           of them it sends the update RoomDelete "!done" and
 *                           writes "p50_us p99_us" of the messages' latency
 *                           (said by src -> sent to dst) to FILE
 * Both chat services answer RoomLookup and RoomJoin for any room. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static long long now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void reply(unsigned seq, const char *type, const char *value) {
  if (value)
    printf("{\"sequence_number\":%u,\"body\":{\"type\":\"%s\",\"value\":\"%s\"}}\n", seq, type, value);
  else
    printf("{\"sequence_number\":%u,\"body\":{\"type\":\"%s\",\"value\":null}}\n", seq, type);
}

static int cmp_ll(const void *a, const void *b) {
  long long x = *(const long long *)a, y = *(const long long *)b;
  return x < y ? -1 : x > y;
}

static int chat(int is_src, long n, double rate, const char *file) {
  static char line[1 << 20];
  long sent = 0;
  long long *lat = is_src ? NULL : calloc((size_t)n + 1, sizeof *lat);
  long nlat = 0;
  fputs("{\"backend_name\":\"chat\",\"backend_version\":[0,0,1],\"protocol_version\":[0,1,0]}\n", stdout);
  fflush(stdout);
  while (fgets(line, sizeof line, stdin)) {
    unsigned seq = 0;
    char type[64] = "", value[256] = "";
    sscanf(line, "{\"sequence_number\":%u,\"body\":{\"type\":\"%63[^\"]\",\"value\":\"%255[^\"]", &seq, type, value);
    if (strcmp(type, "RoomLookup") == 0) {
      reply(seq, "RoomID", value);
    } else if (strcmp(type, "RoomJoin") == 0) {
      reply(seq, "Success", NULL);
      if (is_src && strcmp(value, "#go") == 0) {
        fflush(stdout);
        long long start = now_ns();
        for (long i = 0; i < n; i++) {
          if (rate > 0) {
            long long due = start + (long long)(i * 1e9 / rate), t;
            while ((t = now_ns()) < due) {
              struct timespec d = {0, (long)(due - t)};
              nanosleep(&d, NULL);
            }
          }
          printf("{\"type\":\"MessageUpsert\",\"value\":{\"id\":\"m%ld\",\"sender\":\"u\",\"recipient\":\"#bench\","
                 "\"attachments\":[],\"content\":{\"type\":\"Text\",\"value\":\"hello %ld %lld\"},"
                 "\"create_time\":1,\"edit_time\":1}}\n", i, i, now_ns());
          if (rate > 0) fflush(stdout);
        }
      }
    } else if (strcmp(type, "MessageSend") == 0) {
      char id[32];
      snprintf(id, sizeof id, "c%ld", sent);
      const char *h = strstr(line, "hello ");
      long i;
      long long t;
      if (lat && h && sscanf(h, "hello %ld %lld", &i, &t) == 2 && nlat < n) lat[nlat++] = now_ns() - t;
      reply(seq, "MessageID", id);
      if (++sent == n) {
        puts("{\"type\":\"RoomDelete\",\"value\":\"!done\"}");
        if (file && nlat > 0) {
          qsort(lat, (size_t)nlat, sizeof *lat, cmp_ll);
          FILE *f = fopen(file, "w");
          if (f) {
            fprintf(f, "%.0f %.0f\n", lat[nlat / 2] / 1e3, lat[(long)(nlat * 0.99)] / 1e3);
            fclose(f);
          }
        }
      }
    }
    fflush(stdout);
  }
  free(lat);
  return 0;
}

int main(int argc, char **argv) {
  if (argc > 2 && strcmp(argv[1], "src") == 0)
    return chat(1, atol(argv[2]), argc > 3 ? atof(argv[3]) : 0, NULL);
  if (argc > 2 && strcmp(argv[1], "dst") == 0)
    return chat(0, atol(argv[2]), 0, argc > 3 ? argv[3] : NULL);
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
