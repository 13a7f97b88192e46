/* The backend's side of the protocol on its own stdin/stdout, for
 * `segue backend FILE.lua`: Requests are read from stdin (framed, decoded and
 * validated), values are written to stdout one per line. */
#ifndef SEGUE_STDIO_CHANNEL_H
#define SEGUE_STDIO_CHANNEL_H
#include <cjson/cJSON.h>
#include <uv.h>
#include "flubber_codec.h"
#include "json_framer.h"

typedef struct sg__stdio_channel sg__stdio_channel;

/* A Request (borrowed), or the end: request NULL and `err` says why (NULL at
 * a clean end of input). After the end no callback comes. */
typedef void (*sg__stdio_cb)(sg__stdio_channel *ch, const cJSON *request, const char *err);

struct sg__stdio_channel {
  void *data;
  uv_pipe_t in_pipe;
  uv_tty_t in_tty;
  uv_stream_t *in;
  sg__framer framer;
  sg__fl_limits limits;
  sg__stdio_cb cb;
  int sent_init, ended, out_fd;
  char rbuf[65536];  /* the read buffer: the framer copies what it keeps */
};

/* Starts reading fd `in_fd` (a pipe or a terminal) and writing to `out_fd`.
 * On failure ch->in, when not NULL, is an initialized handle to close with
 * sg__stdio_channel_close. */
int sg__stdio_channel_start(uv_loop_t *loop, sg__stdio_channel *ch, int in_fd, int out_fd,
                           size_t max_value_bytes, const sg__fl_limits *lim, sg__stdio_cb cb);
/* Validates `v` (the first value must be an InitInfo, then Responses and
 * Updates) and writes it as one line. SG_EPROTO with the reason in err. */
int sg__stdio_channel_write(sg__stdio_channel *ch, cJSON *v, char *err, size_t errlen);
/* Stops reading and closes the input handle; `cb` gets the handle, whose
 * data is `ch`: free the framer (sg__framer_free) and `ch` there. */
void sg__stdio_channel_close(sg__stdio_channel *ch, uv_close_cb cb);
#endif
