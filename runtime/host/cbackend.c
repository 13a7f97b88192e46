/* Backends implemented in C by an embedder (segue.h's sg_backend_vtable): a
 * transport whose "process" is a set of function pointers. The session
 * (sequence numbers, time-outs, retries, validation, restarts) is backend.c's,
 * as for child processes and Lua backends; values here only change form, JSON
 * text <-> validated cJSON trees, and C has no InitInfo to send, so the
 * transport makes one. */
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "host.h"

struct sg_cbackend {
  sg__backend *b;
  const sg_backend_vtable *vt;
  void *data;
  int in_start;      /* inside vt->start: the session still waits for InitInfo */
  int start_failed;  /* vt->start emitted something invalid */
  cJSON *early;      /* updates emitted inside vt->start, sent after InitInfo */
};

static sg_cbackend *cb_of(const sg__backend *b) { return b->transport_data; }

static int has_closed(const sg_backend_vtable *vt) {
  return vt->size >= offsetof(sg_backend_vtable, closed) + sizeof vt->closed && vt->closed;
}

/* ---- the transport --------------------------------------------------------- */

static cJSON *make_init_info(const char *name) {
  static const int version[3] = {0, 0, 0}, protocol[3] = {0, 1, 0};
  cJSON *v = cJSON_CreateObject();
  if (v && cJSON_AddStringToObject(v, "backend_name", name) &&
      cJSON_AddItemToObject(v, "backend_version", cJSON_CreateIntArray(version, 3)) &&
      cJSON_AddItemToObject(v, "protocol_version", cJSON_CreateIntArray(protocol, 3)))
    return v;
  cJSON_Delete(v);
  return NULL;
}

/* The InitInfo goes first, then what vt->start emitted, in order: the
 * session accepts updates only once it has the InitInfo, and it must not
 * send requests (which InitInfo releases) before vt->start has returned. */
static int ctp_start(sg__backend *b) {
  sg_cbackend *cb = cb_of(b);
  cb->in_start = 1;
  cb->start_failed = 0;
  int rc = cb->vt->start(cb);
  cb->in_start = 0;
  cJSON *early = cb->early;
  cb->early = NULL;
  cJSON *info = rc == 0 && !cb->start_failed ? make_init_info(b->name) : NULL;
  if (!info) {
    /* A failed vt->start cleaned up after itself; a start that went wrong
     * afterwards did not, so it is stopped. */
    if (rc == 0 && cb->vt->stop) cb->vt->stop(cb);
    if (rc == 0) rc = cb->start_failed ? SG_EPROTO : SG_ENOMEM;
    cJSON_Delete(early);
    return rc;
  }
  sg__backend_on_value(b, SG_FL_INIT_INFO, info);
  while (early && early->child)
    sg__backend_on_value(b, SG_FL_UPDATE, cJSON_DetachItemViaPointer(early, early->child));
  cJSON_Delete(early);
  return 0;
}

static int ctp_send(sg__backend *b, const cJSON *request) {
  sg_cbackend *cb = cb_of(b);
  const cJSON *seq = cJSON_GetObjectItemCaseSensitive(request, "sequence_number");
  size_t len;
  /* The codec's writer, not cJSON's: it keeps large integers exact. */
  char *text = sg__fl_encode_line(cJSON_GetObjectItemCaseSensitive(request, "body"), &len);
  if (!text) return SG_ENOMEM;
  text[len - 1] = '\0';  /* the line's newline */
  cb->vt->request(cb, (uint32_t)cJSON_GetNumberValue(seq), text);
  free(text);
  return 0;
}

static void ctp_stop(sg__backend *b, int graceful) {
  sg_cbackend *cb = cb_of(b);
  if (cb->vt->stop) cb->vt->stop(cb);
  sg__backend_on_exit(b, graceful ? "C backend stopped"
                                  : "C backend stopped after a protocol violation");
}

static void ctp_free(sg__backend *b) {
  sg_cbackend *cb = cb_of(b);
  if (has_closed(cb->vt)) cb->vt->closed(cb);
  cJSON_Delete(cb->early);
  free(cb);
}

const sg__transport sg__c_transport = {
    .kind = "c", .start = ctp_start, .send = ctp_send, .stop = ctp_stop, .free = ctp_free};

/* ---- registration ---------------------------------------------------------- */

static int attach(sg__backend *b, const void *arg) {
  sg_cbackend *cb = (sg_cbackend *)arg;
  cb->b = b;
  b->transport_data = cb;
  return 0;
}

int sg_host_add_cbackend(sg_host *h, const char *name, const sg_backend_vtable *vt,
                         void *data, sg_cbackend **out) {
  if (!h || !name || !*name || !vt || vt->size < offsetof(sg_backend_vtable, closed) ||
      !vt->start || !vt->request)
    return SG_EINVAL;
  sg_cbackend *cb = calloc(1, sizeof *cb);
  if (!cb) return SG_ENOMEM;
  cb->vt = vt;
  cb->data = data;
  int rc = sg__host_add_backend(&h->env, name, &sg__c_transport, NULL, attach, cb, NULL);
  if (rc != 0) {
    free(cb);
    return rc;
  }
  if (out) *out = cb;
  /* Before the host starts, it waits for sg_host_start like the configured
   * backends, so no update reaches Lua before the scripts are loaded. */
  if (h->started) sg__backend_start(cb->b);
  return 0;
}

void *sg_cbackend_data(const sg_cbackend *cb) { return cb->data; }
const char *sg_cbackend_name(const sg_cbackend *cb) { return cb->b->name; }

/* ---- what the C backend sends ----------------------------------------------- */

static int live(const sg_cbackend *cb) {
  sg__backend_state s = cb->b->state;
  return cb->in_start || s == SG_BACKEND_RUNNING || s == SG_BACKEND_STOPPING;
}

/* An invalid value: inside vt->start it fails the start (the session is not
 * running yet); afterwards it is a violation, as from any backend. */
static int reject(sg_cbackend *cb, const char *why) {
  if (cb->in_start) {
    sg__backend_log(cb->b, SG_LOG_ERROR, "protocol violation: %s", why);
    cb->start_failed = 1;
  } else {
    sg__backend_violation(cb->b, why);
  }
  return SG_EPROTO;
}

/* Validates `v` (owned; NULL when `err` already says what is wrong) and
 * hands it to the session. */
static int submit(sg_cbackend *cb, sg__fl_kind kind, cJSON *v, char *err, size_t errlen) {
  sg__backend *b = cb->b;
  int rc = v ? sg__fl_validate(v, kind, &b->cfg.limits, err, errlen) : SG_EPROTO;
  if (rc == 0 && cb->in_start && kind != SG_FL_UPDATE) {
    snprintf(err, errlen, "answered a request before it started");
    rc = SG_EPROTO;
  }
  if (rc == 0 && cb->in_start) {
    if (!cb->early) cb->early = cJSON_CreateArray();
    if (cb->early && cJSON_AddItemToArray(cb->early, v)) return 0;
    rc = SG_ENOMEM;
  }
  if (rc != 0) {
    cJSON_Delete(v);
    return rc == SG_EPROTO ? reject(cb, err) : rc;
  }
  sg__backend_on_value(b, kind, v);
  /* A response of the wrong variant is found by the session, which then
   * restarts the backend: only a violation or an exit leads there, and a C
   * backend exits only when stopped. */
  return b->state == SG_BACKEND_BACKOFF || b->state == SG_BACKEND_FAILED ? SG_EPROTO : 0;
}

/* Parses NUL-terminated `text`; on failure says where in err. */
static cJSON *parse(const char *text, char *err, size_t errlen) {
  const char *end = NULL;
  cJSON *v = cJSON_ParseWithOpts(text, &end, 1);
  if (!v)
    snprintf(err, errlen, "invalid JSON at byte offset %zu", end ? (size_t)(end - text) : (size_t)0);
  return v;
}

static cJSON *make_response(uint32_t seq, cJSON *body) {
  cJSON *v = cJSON_CreateObject();
  if (v && cJSON_AddNumberToObject(v, "sequence_number", seq) &&
      cJSON_AddItemToObject(v, "body", body))
    return v;
  cJSON_Delete(v);
  cJSON_Delete(body);
  return NULL;
}

int sg_cbackend_respond(sg_cbackend *cb, uint32_t seq, const char *body_json) {
  if (!cb || !body_json) return SG_EINVAL;
  if (!live(cb)) return SG_EDEAD;
  char err[512];
  cJSON *body = parse(body_json, err, sizeof err);
  if (!body) return submit(cb, SG_FL_RESPONSE, NULL, err, sizeof err);
  cJSON *v = make_response(seq, body);
  if (!v) return SG_ENOMEM;
  return submit(cb, SG_FL_RESPONSE, v, err, sizeof err);
}

int sg_cbackend_update(sg_cbackend *cb, const char *update_json) {
  if (!cb || !update_json) return SG_EINVAL;
  if (!live(cb)) return SG_EDEAD;
  char err[512];
  return submit(cb, SG_FL_UPDATE, parse(update_json, err, sizeof err), err, sizeof err);
}
