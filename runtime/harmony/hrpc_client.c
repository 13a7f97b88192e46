/* hRPC client: libcurl multi on the uv loop. curl tells us which sockets to
 * watch (socket callback: a uv_poll_t each) and when to wake it (timer
 * callback: one uv_timer_t); we hand every event back with
 * curl_multi_socket_action and then collect finished transfers. */
#include "hrpc_client.h"

#include <curl/curl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "curl_lazy.h"
#include "hrpc/v1/hrpc.pb-c.h"
#include "segue.h"

#define STR_(x) #x
#define STR(x) STR_(x)
#define USER_AGENT \
  "segue/" STR(SEGUE_VERSION_MAJOR) "." STR(SEGUE_VERSION_MINOR) "." STR(SEGUE_VERSION_PATCH)

typedef struct sg__hrpc_call call;
typedef struct sg__hrpc_sock sock;

struct sg__hrpc_call {
  call *next, *prev;
  sg__hrpc_client *client;
  CURL *easy;
  struct curl_slist *headers;
  sg__hrpc_call_cb cb;
  void *ud;
  char *resp;
  size_t resp_len, resp_cap, max;
  int over_limit, refused_private;
  unsigned flags;
  char errbuf[CURL_ERROR_SIZE];
};

struct sg__hrpc_sock {
  sock *next, *prev;
  sg__hrpc_client *client;
  uv_poll_t poll;
  curl_socket_t fd;
};

/* Intrusive doubly-linked lists: both kinds have next/prev first. */
#define LIST_LINK(head, x)              \
  do {                                  \
    (x)->prev = NULL;                   \
    (x)->next = (head);                 \
    if ((head)) (head)->prev = (x);     \
    (head) = (x);                       \
  } while (0)
#define LIST_UNLINK(head, x)                          \
  do {                                                \
    if ((x)->prev) (x)->prev->next = (x)->next;       \
    else (head) = (x)->next;                          \
    if ((x)->next) (x)->next->prev = (x)->prev;       \
  } while (0)

static uv_once_t curl_once = UV_ONCE_INIT;
static CURLcode curl_init_rc;

static char curl_load_error[256];

/* libcurl is loaded on first use (curl_lazy.h); curl_global_init is
 * process-wide and must run once. */
static void curl_init_once(void) {
  if (sg__curl_load(curl_load_error, sizeof curl_load_error) != 0) {
    curl_init_rc = CURLE_FAILED_INIT;
    return;
  }
  curl_init_rc = curl_global_init(CURL_GLOBAL_DEFAULT);
}

static void maybe_finish_close(sg__hrpc_client *c) {
  if (!c->closing || !c->timer_closed || c->pending > 0) return;
  if (c->close_cb) c->close_cb(c);
}

/* ---- sockets ------------------------------------------------------------- */

static void on_sock_closed(uv_handle_t *h) {
  sock *s = h->data;
  sg__hrpc_client *c = s->client;
  free(s);
  c->pending--;
  maybe_finish_close(c);
}

static void sock_close(sock *s) {
  sg__hrpc_client *c = s->client;
  LIST_UNLINK(c->socks, s);
  c->pending++;
  uv_close((uv_handle_t *)&s->poll, on_sock_closed);
}

static void check_done(sg__hrpc_client *c);

static void on_poll(uv_poll_t *h, int status, int events) {
  sock *s = h->data;
  sg__hrpc_client *c = s->client;
  int flags = 0, running;
  if (status < 0) flags = CURL_CSELECT_ERR;
  if (events & UV_READABLE) flags |= CURL_CSELECT_IN;
  if (events & UV_WRITABLE) flags |= CURL_CSELECT_OUT;
  curl_multi_socket_action(c->multi, s->fd, flags, &running);
  check_done(c);
}

static sock *sock_new(sg__hrpc_client *c, curl_socket_t fd) {
  sock *s = calloc(1, sizeof *s);
  if (!s) return NULL;
  if (uv_poll_init_socket(c->loop, &s->poll, fd) != 0) {
    free(s);
    return NULL;
  }
  s->client = c;
  s->fd = fd;
  s->poll.data = s;
  LIST_LINK(c->socks, s);
  return s;
}

/* CURLMOPT_SOCKETFUNCTION: start, change or stop watching `fd`. */
static int on_curl_socket(CURL *easy, curl_socket_t fd, int what, void *userp, void *socketp) {
  sg__hrpc_client *c = userp;
  sock *s = socketp;
  if (what == CURL_POLL_REMOVE) {
    if (s) sock_close(s);
    if (!c->closing) curl_multi_assign(c->multi, fd, NULL);
    return 0;
  }
  if (!s) {
    if (!(s = sock_new(c, fd))) return -1;
    curl_multi_assign(c->multi, fd, s);
  }
  int events = ((what & CURL_POLL_IN) ? UV_READABLE : 0) | ((what & CURL_POLL_OUT) ? UV_WRITABLE : 0);
  return uv_poll_start(&s->poll, events, on_poll) == 0 ? 0 : -1;
}

/* ---- the timer ----------------------------------------------------------- */

static void on_timer(uv_timer_t *t) {
  sg__hrpc_client *c = t->data;
  int running;
  curl_multi_socket_action(c->multi, CURL_SOCKET_TIMEOUT, 0, &running);
  check_done(c);
}

/* CURLMOPT_TIMERFUNCTION: curl wants to be woken in timeout_ms (-1: never).
 * Even 0 goes through the loop: curl must not be re-entered from here. */
static int on_curl_timer(CURLM *multi, long timeout_ms, void *userp) {
  sg__hrpc_client *c = userp;
  if (c->closing) return 0;
  if (timeout_ms < 0) uv_timer_stop(&c->timer);
  else uv_timer_start(&c->timer, on_timer, (uint64_t)timeout_ms, 0);
  return 0;
}

/* ---- calls --------------------------------------------------------------- */

static void call_free(call *k) {
  if (k->easy) curl_easy_cleanup(k->easy);
  curl_slist_free_all(k->headers);
  free(k->resp);
  free(k);
}

static size_t on_body(char *ptr, size_t size, size_t nmemb, void *ud) {
  call *k = ud;
  size_t n = size * nmemb;
  if (n > k->max - k->resp_len) {
    k->over_limit = 1;
    return 0;  /* anything but n aborts the transfer */
  }
  if (k->resp_cap - k->resp_len < n) {
    size_t cap = k->resp_cap ? k->resp_cap : 4096;
    while (cap - k->resp_len < n) cap *= 2;
    char *p = realloc(k->resp, cap);
    if (!p) return 0;
    k->resp = p;
    k->resp_cap = cap;
  }
  memcpy(k->resp + k->resp_len, ptr, n);
  k->resp_len += n;
  return n;
}

/* The failure of a transfer that got no complete answer. */
static void call_fail(call *k, CURLcode res) {
  char msg[CURL_ERROR_SIZE + 64];
  int err = SG_EHTTP;
  if (res == CURLE_OPERATION_TIMEDOUT) err = SG_ETIMEDOUT;
  if (k->over_limit || res == CURLE_FILESIZE_EXCEEDED) {
    err = SG_ELIMIT;
    snprintf(msg, sizeof msg, "response body exceeds %zu bytes", k->max);
  } else if (k->refused_private) {
    snprintf(msg, sizeof msg, "refused to connect: the name resolves to a loopback, private "
             "or link-local address");
  } else {
    snprintf(msg, sizeof msg, "%s", k->errbuf[0] ? k->errbuf : curl_easy_strerror(res));
  }
  sg__log(k->client->log, SG_LOG_DEBUG, NULL, NULL, "hrpc call failed: %s", msg);
  k->cb(k->ud, err, 0, NULL, 0, NULL, msg);
}

/* A complete HTTP answer: 200, or an error the body may explain. */
static void call_answer(call *k) {
  long status = 0;
  const uint8_t *body = k->resp_len ? (const uint8_t *)k->resp : NULL;
  curl_easy_getinfo(k->easy, CURLINFO_RESPONSE_CODE, &status);
  /* A response naming another hRPC version is not one we can read; one
   * without the header (older servers) is taken as version 1. */
  struct curl_header *ver = NULL;
  if (curl_easy_header(k->easy, "Hrpc-Version", 0, CURLH_HEADER, -1, &ver) == CURLHE_OK && ver &&
      strcmp(ver->value, "1") != 0) {
    char msg[160];
    snprintf(msg, sizeof msg, "the peer answered with Hrpc-Version %.60s; segue speaks version 1",
             ver->value);
    k->cb(k->ud, SG_EPROTO, (int)status, NULL, 0, NULL, msg);
    return;
  }
  if (status == 200) {
    k->cb(k->ud, 0, 200, body, k->resp_len, NULL, NULL);
    return;
  }
  Hrpc__V1__Error *e = hrpc__v1__error__unpack(NULL, k->resp_len, body);
  if (e && e->identifier[0] == '\0') {  /* empty bytes decode as an empty Error */
    hrpc__v1__error__free_unpacked(e, NULL);
    e = NULL;
  }
  char fallback[32];
  snprintf(fallback, sizeof fallback, "HTTP %ld", status);
  k->cb(k->ud, SG_EHTTP, (int)status, body, k->resp_len, e ? e->identifier : NULL,
        e ? e->human_message : fallback);
  if (e) hrpc__v1__error__free_unpacked(e, NULL);
}

/* Takes `k` out of the multi, runs its callback, frees it. */
static void call_complete(call *k, CURLcode res) {
  sg__hrpc_client *c = k->client;
  LIST_UNLINK(c->calls, k);
  curl_multi_remove_handle(c->multi, k->easy);
  if (res == CURLE_OK) call_answer(k);
  else call_fail(k, res);
  call_free(k);
}

static void check_done(sg__hrpc_client *c) {
  CURLMsg *m;
  int left;
  /* A callback may close the client: then the multi is gone. */
  while (!c->closing && (m = curl_multi_info_read(c->multi, &left))) {
    if (m->msg != CURLMSG_DONE) continue;
    call *k = NULL;
    CURLcode res = m->data.result;
    curl_easy_getinfo(m->easy_handle, CURLINFO_PRIVATE, (char **)&k);
    call_complete(k, res);
  }
}

/* base_url (trailing '/' dropped) + path (leading '/' added). */
static char *join_url(const char *base_url, const char *path) {
  size_t bl = strlen(base_url), n;
  while (bl > 0 && base_url[bl - 1] == '/') bl--;
  n = bl + strlen(path) + 2;
  char *url = malloc(n);
  if (url) snprintf(url, n, "%.*s%s%s", (int)bl, base_url, path[0] == '/' ? "" : "/", path);
  return url;
}

static int call_headers(call *k, const char *auth_header) {
  static const char *const fixed[] = {
      "Content-Type: application/hrpc",
      "Hrpc-Version: 1",  /* the spec's SHOULD; hrpc-rs servers log its absence */
      "Expect:",  /* no 100-continue round trip for large bodies */
  };
  for (size_t i = 0; i < sizeof fixed / sizeof *fixed; i++) {
    struct curl_slist *l = curl_slist_append(k->headers, fixed[i]);
    if (!l) return SG_ENOMEM;
    k->headers = l;
  }
  if (!auth_header) return 0;
  size_t n = strlen(auth_header) + sizeof "Authorization: ";
  char *h = malloc(n);
  if (!h) return SG_ENOMEM;
  snprintf(h, n, "Authorization: %s", auth_header);
  struct curl_slist *l = curl_slist_append(k->headers, h);
  free(h);
  if (!l) return SG_ENOMEM;
  k->headers = l;
  return 0;
}

int sg__hrpc_address_is_private(const struct sockaddr *sa) {
  const unsigned char *b;
  if (sa->sa_family == AF_INET6) {
    b = ((const struct sockaddr_in6 *)sa)->sin6_addr.s6_addr;
    static const unsigned char mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
    static const unsigned char zero[15] = {0};
    if (memcmp(b, mapped, 12) == 0) {
      b += 12;  /* ::ffff:a.b.c.d: the IPv4 rules */
    } else {
      if (memcmp(b, zero, 15) == 0 && (b[15] == 0 || b[15] == 1)) return 1;  /* :: ::1 */
      return (b[0] & 0xfe) == 0xfc || (b[0] == 0xfe && (b[1] & 0xc0) == 0x80) || b[0] == 0xff;
    }
  } else if (sa->sa_family == AF_INET) {
    b = (const unsigned char *)&((const struct sockaddr_in *)sa)->sin_addr.s_addr;
  } else {
    return 1;
  }
  return b[0] == 0 || b[0] == 10 || b[0] == 127 || b[0] >= 224 ||
         (b[0] == 100 && (b[1] & 0xc0) == 64) || (b[0] == 169 && b[1] == 254) ||
         (b[0] == 172 && (b[1] & 0xf0) == 16) || (b[0] == 192 && b[1] == 168);
}

/* CURLOPT_OPENSOCKETFUNCTION: vets each address curl is about to connect to. */
static curl_socket_t on_open_socket(void *ud, curlsocktype purpose, struct curl_sockaddr *a) {
  call *k = ud;
  if ((k->flags & SG_HRPC_CALL_PUBLIC_ONLY) && sg__hrpc_address_is_private(&a->addr)) {
    k->refused_private = 1;
    return CURL_SOCKET_BAD;
  }
  return socket(a->family, a->socktype, a->protocol);
}

static int call_setup(call *k, const char *url, const uint8_t *body, size_t len,
                      uint64_t timeout_ms) {
  CURLcode e = CURLE_OK;
  CURL *h = k->easy;
  if (!timeout_ms) timeout_ms = SG_HRPC_CLIENT_DEFAULT_TIMEOUT_MS;
  uint64_t connect_ms = timeout_ms < SG_HRPC_CLIENT_MAX_CONNECT_TIMEOUT_MS
                            ? timeout_ms : SG_HRPC_CLIENT_MAX_CONNECT_TIMEOUT_MS;
#define SET(opt, val) if (e == CURLE_OK) e = curl_easy_setopt(h, opt, val)
  SET(CURLOPT_PRIVATE, (void *)k);
  SET(CURLOPT_URL, url);
  SET(CURLOPT_PROTOCOLS_STR, "http,https");
  SET(CURLOPT_POST, 1L);
  SET(CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)len);
  SET(CURLOPT_COPYPOSTFIELDS, len ? (const char *)body : "");
  SET(CURLOPT_HTTPHEADER, k->headers);
  SET(CURLOPT_USERAGENT, USER_AGENT);
  SET(CURLOPT_WRITEFUNCTION, on_body);
  SET(CURLOPT_WRITEDATA, (void *)k);
  SET(CURLOPT_MAXFILESIZE_LARGE, (curl_off_t)k->max);
  SET(CURLOPT_ERRORBUFFER, k->errbuf);
  SET(CURLOPT_NOSIGNAL, 1L);
  SET(CURLOPT_TIMEOUT_MS, (long)timeout_ms);
  SET(CURLOPT_CONNECTTIMEOUT_MS, (long)connect_ms);
  SET(CURLOPT_TCP_KEEPALIVE, 1L);
  if (k->flags & SG_HRPC_CALL_PUBLIC_ONLY) {
    SET(CURLOPT_OPENSOCKETFUNCTION, on_open_socket);
    SET(CURLOPT_OPENSOCKETDATA, (void *)k);
    /* a connection cached from another call was not vetted */
    SET(CURLOPT_FRESH_CONNECT, 1L);
    SET(CURLOPT_FORBID_REUSE, 1L);
  }
#undef SET
  return e == CURLE_OK ? 0 : e == CURLE_OUT_OF_MEMORY ? SG_ENOMEM : SG_EHTTP;
}

int sg__hrpc_client_call(sg__hrpc_client *c, const char *base_url, const char *path,
                        const uint8_t *body, size_t len, const char *auth_header,
                        uint64_t timeout_ms, sg__hrpc_call_cb cb, void *ud) {
  return sg__hrpc_client_call_flags(c, base_url, path, body, len, auth_header, timeout_ms, 0, cb,
                                   ud);
}

int sg__hrpc_client_call_flags(sg__hrpc_client *c, const char *base_url, const char *path,
                              const uint8_t *body, size_t len, const char *auth_header,
                              uint64_t timeout_ms, unsigned flags, sg__hrpc_call_cb cb,
                              void *ud) {
  if (!base_url || !path || !cb || (len && !body)) return SG_EINVAL;
  if (auth_header && strpbrk(auth_header, "\r\n")) return SG_EINVAL;
  if (c->closing) return SG_ECLOSING;
  call *k = calloc(1, sizeof *k);
  char *url = join_url(base_url, path);
  int rc = SG_ENOMEM;
  if (k && url && (k->easy = curl_easy_init())) {
    k->client = c;
    k->cb = cb;
    k->ud = ud;
    k->max = c->max_response_bytes;
    k->flags = flags;
    rc = call_headers(k, auth_header);
    if (rc == 0) rc = call_setup(k, url, body, len, timeout_ms);
    if (rc == 0 && curl_multi_add_handle(c->multi, k->easy) != CURLM_OK) rc = SG_EHTTP;
  }
  free(url);
  if (rc) {
    if (k) call_free(k);
    return rc;
  }
  LIST_LINK(c->calls, k);
  return 0;
}

int sg__hrpc_error_retry_after(const uint8_t *error_body, size_t len, uint32_t *seconds) {
  Hrpc__V1__Error *e = hrpc__v1__error__unpack(NULL, len, error_body);
  if (!e) return SG_EDECODE;
  Hrpc__V1__RetryInfo *ri = NULL;
  if (e->details.len)
    ri = hrpc__v1__retry_info__unpack(NULL, e->details.len, e->details.data);
  hrpc__v1__error__free_unpacked(e, NULL);
  if (!ri) return SG_EDECODE;
  *seconds = ri->retry_after;
  hrpc__v1__retry_info__free_unpacked(ri, NULL);
  return 0;
}

/* ---- the client ---------------------------------------------------------- */

int sg__hrpc_client_init(uv_loop_t *loop, sg__hrpc_client *c, const sg__logger *log) {
  memset(c, 0, sizeof *c);
  uv_once(&curl_once, curl_init_once);
  if (curl_init_rc != CURLE_OK) {
    sg__log(log, SG_LOG_ERROR, NULL, NULL, "the hRPC client cannot start: %s",
            curl_load_error[0] ? curl_load_error : "curl_global_init failed");
    return SG_EHTTP;
  }
  c->loop = loop;
  c->log = log;
  c->max_response_bytes = SG_HRPC_CLIENT_DEFAULT_MAX_RESPONSE_BYTES;
  CURLM *m = curl_multi_init();
  if (!m) return SG_ENOMEM;
  int rc = uv_timer_init(loop, &c->timer);
  if (rc) {
    curl_multi_cleanup(m);
    return rc;
  }
  c->timer.data = c;
  c->multi = m;
  curl_multi_setopt(m, CURLMOPT_SOCKETFUNCTION, on_curl_socket);
  curl_multi_setopt(m, CURLMOPT_SOCKETDATA, (void *)c);
  curl_multi_setopt(m, CURLMOPT_TIMERFUNCTION, on_curl_timer);
  curl_multi_setopt(m, CURLMOPT_TIMERDATA, (void *)c);
  return 0;
}

static void on_timer_closed(uv_handle_t *h) {
  sg__hrpc_client *c = h->data;
  c->timer_closed = 1;
  maybe_finish_close(c);
}

void sg__hrpc_client_close(sg__hrpc_client *c, sg__hrpc_client_close_cb close_cb) {
  if (c->closing) return;
  c->closing = 1;
  c->close_cb = close_cb;
  while (c->calls) {
    call *k = c->calls;
    LIST_UNLINK(c->calls, k);
    curl_multi_remove_handle(c->multi, k->easy);
    k->cb(k->ud, SG_ECANCELED, 0, NULL, 0, NULL, "the hRPC client was closed");
    call_free(k);
  }
  /* Closing curl's cached connections may still report sockets to remove. */
  curl_multi_cleanup(c->multi);
  c->multi = NULL;
  while (c->socks) sock_close(c->socks);
  uv_close((uv_handle_t *)&c->timer, on_timer_closed);
}
