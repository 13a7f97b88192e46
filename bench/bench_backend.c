/* A minimal backend for the round-trip benchmark, in C so the backend's own
 * cost is small next to what is measured.
 *   bench_backend proto   speaks the backend protocol: InitInfo, then for
 *                         each request line an Update and the Response
 *   bench_backend relay   echoes each line (the baseline's child)
 *   bench_backend chat N  a chat service for the routing benchmark: after its
 *                         first RoomJoin it says N messages in that room; after
 *                         N MessageSends it sends the update RoomDelete "!done" */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void reply(unsigned seq, const char *type, const char *value) {
  if (value)
    printf("{\"sequence_number\":%u,\"body\":{\"type\":\"%s\",\"value\":\"%s\"}}\n", seq, type, value);
  else
    printf("{\"sequence_number\":%u,\"body\":{\"type\":\"%s\",\"value\":null}}\n", seq, type);
}

static int chat(long n) {
  char line[65536], room[256] = "";
  long sent = 0, said = 0;
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
      if (!room[0] && strcmp(value, "#bench") == 0) {
        snprintf(room, sizeof room, "%s", value);
        for (; said < n; said++)
          printf("{\"type\":\"MessageUpsert\",\"value\":{\"id\":\"m%ld\",\"sender\":\"u\",\"recipient\":\"%s\","
                 "\"attachments\":[],\"content\":{\"type\":\"Text\",\"value\":\"hello %ld\"},"
                 "\"create_time\":1,\"edit_time\":1}}\n", said, room, said);
      }
    } else if (strcmp(type, "MessageSend") == 0) {
      char id[32];
      snprintf(id, sizeof id, "c%ld", sent);
      reply(seq, "MessageID", id);
      if (++sent == n) puts("{\"type\":\"RoomDelete\",\"value\":\"!done\"}");
    }
    fflush(stdout);
  }
  return 0;
}

int main(int argc, char **argv) {
  if (argc > 2 && strcmp(argv[1], "chat") == 0) return chat(atol(argv[2]));
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
