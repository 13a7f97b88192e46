#include "stdio_channel.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "segue.h"

static void end(sg__stdio_channel *ch, const char *err) {
  if (ch->ended) return;
  ch->ended = 1;
  uv_read_stop(ch->in);
  ch->cb(ch, NULL, err);
}

static int on_framed(void *ud, const char *json, size_t len, uint64_t offset) {
  sg__stdio_channel *ch = ud;
  char err[512];
  cJSON *req = sg__fl_decode_request(json, len, offset, &ch->limits, err, sizeof err);
  if (!req) {
    end(ch, err);
    return SG_EPROTO;
  }
  ch->cb(ch, req, NULL);
  cJSON_Delete(req);
  return ch->ended ? SG_ECANCELED : 0;
}

static void alloc_buf(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  (void)suggested;
  sg__stdio_channel *ch = h->data;
  *buf = uv_buf_init(ch->rbuf, sizeof ch->rbuf);
}

static void on_read(uv_stream_t *s, ssize_t n, const uv_buf_t *buf) {
  sg__stdio_channel *ch = s->data;
  if (n > 0 && !ch->ended) {
    int rc = sg__framer_feed(&ch->framer, buf->base, (size_t)n, on_framed, ch);
    if (rc == SG_EPROTO && ch->framer.failed) end(ch, ch->framer.err);
  } else if (n < 0 && !ch->ended) {
    if (n == UV_EOF && sg__framer_finish(&ch->framer, on_framed, ch) != 0 && ch->framer.failed)
      end(ch, ch->framer.err);
    else
      end(ch, n == UV_EOF ? NULL : uv_strerror((int)n));
  }
}

int sg__stdio_channel_start(uv_loop_t *loop, sg__stdio_channel *ch, int in_fd, int out_fd,
                           size_t max_value_bytes, const sg__fl_limits *lim, sg__stdio_cb cb) {
  int rc;
  uv_handle_type type = uv_guess_handle(in_fd);
  ch->in = NULL;
  if (type == UV_TTY) {
    rc = uv_tty_init(loop, &ch->in_tty, in_fd, 1);
    if (rc == 0) ch->in = (uv_stream_t *)&ch->in_tty;
  } else if (type == UV_NAMED_PIPE) {
    rc = uv_pipe_init(loop, &ch->in_pipe, 0);
    if (rc == 0) {
      ch->in = (uv_stream_t *)&ch->in_pipe;  /* initialized: closes from now on */
      rc = uv_pipe_open(&ch->in_pipe, in_fd);
    }
  } else {
    return UV_EINVAL;  /* a regular file or a socket: not what hosts give us */
  }
  if (ch->in) ch->in->data = ch;
  if (rc != 0) return rc;
  ch->cb = cb;
  ch->out_fd = out_fd;
  ch->limits = *lim;
  sg__framer_init(&ch->framer, max_value_bytes, lim->max_depth);
  return uv_read_start(ch->in, alloc_buf, on_read);
}

/* Blocking write: a backend's output must not reorder, and a host that reads
 * slowly should slow the backend down. */
static int write_all(int fd, const char *p, size_t len) {
  while (len > 0) {
    ssize_t n = write(fd, p, len);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return -errno;
    p += n;
    len -= (size_t)n;
  }
  return 0;
}

int sg__stdio_channel_write(sg__stdio_channel *ch, cJSON *v, char *err, size_t errlen) {
  sg__fl_kind kind = sg__fl_classify_backend(v, !ch->sent_init);
  int rc = sg__fl_validate(v, kind, &ch->limits, err, errlen);
  if (rc != 0) return rc;
  size_t len;
  char *line = sg__fl_encode_line(v, &len);
  if (!line) return SG_ENOMEM;
  rc = write_all(ch->out_fd, line, len);
  free(line);
  if (rc != 0) {
    snprintf(err, errlen, "cannot write to stdout: %s", strerror(-rc));
    return rc;
  }
  ch->sent_init = 1;
  return 0;
}

void sg__stdio_channel_close(sg__stdio_channel *ch, uv_close_cb cb) {
  if (ch->in && !uv_is_closing((uv_handle_t *)ch->in)) {
    ch->ended = 1;
    uv_close((uv_handle_t *)ch->in, cb);
  }
}
