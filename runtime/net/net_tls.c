/* TLS client sessions over memory BIOs (see net_tls.h). */
#include "net_tls.h"

#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <stdio.h>
#include <stdlib.h>
#include <uv.h>

#include "segue.h"
#include "ssl_lazy.h"  /* OpenSSL is loaded by the first session */

struct sg__tls {
  int pinned;
  unsigned char pin[32];
  SSL_CTX *ctx;
  SSL *ssl;
  BIO *in;   /* ciphertext from the peer, read by OpenSSL */
  BIO *out;  /* ciphertext to the peer, written by OpenSSL */
};

/* OpenSSL's error queue as one line; the queue is cleared so a later call
 * does not report a stale reason. */
static void take_error(const char *what, char *err, size_t errlen) {
  unsigned long e = ERR_get_error();
  char reason[256] = "no details";
  if (e) ERR_error_string_n(e, reason, sizeof reason);
  if (err && errlen) snprintf(err, errlen, "%s: %s", what, reason);
  ERR_clear_error();
}

/* "AB:cd:..." or "abcd..." -> 32 bytes; 0 when it is not a SHA-256. */
static int parse_pin(const char *s, unsigned char out[32]) {
  size_t n = 0;
  int half = -1;
  for (; *s; s++) {
    int v;
    if (*s == ':') continue;
    if (*s >= '0' && *s <= '9') v = *s - '0';
    else if (*s >= 'a' && *s <= 'f') v = *s - 'a' + 10;
    else if (*s >= 'A' && *s <= 'F') v = *s - 'A' + 10;
    else return 0;
    if (half < 0) {
      half = v;
    } else {
      if (n == 32) return 0;
      out[n++] = (unsigned char)(half << 4 | v);
      half = -1;
    }
  }
  return n == 32 && half < 0;
}

int sg__tls_new(const sg__tls_options *o, sg__tls **out, char *err, size_t errlen) {
  const char *servername = o->servername;
  int has_name = servername && servername[0];
  int verify = o->verify && !o->pin;
  if (verify && !has_name) {
    snprintf(err, errlen, "TLS verification needs a server name");
    return SG_EINVAL;
  }
  if (sg__ssl_load(err, errlen) != 0) return SG_ECONFIG;
  sg__tls *t = calloc(1, sizeof *t);
  if (!t) return SG_ENOMEM;
  if (o->pin) {
    if (!parse_pin(o->pin, t->pin)) {
      snprintf(err, errlen, "pin must be the SHA-256 fingerprint of the certificate (64 hex digits)");
      free(t);
      return SG_EINVAL;
    }
    t->pinned = 1;
  }
  int bios_owned = 0;
  t->ctx = SSL_CTX_new(TLS_client_method());
  if (!t->ctx) goto fail;
  SSL_CTX_set_min_proto_version(t->ctx, TLS1_2_VERSION);
  if (verify) {
    SSL_CTX_set_verify(t->ctx, SSL_VERIFY_PEER, NULL);
    if (o->ca_file) {
      if (SSL_CTX_load_verify_locations(t->ctx, o->ca_file, NULL) != 1) {
        take_error("cannot load ca_file", err, errlen);
        sg__tls_free(t);
        return SG_EINVAL;
      }
    } else if (SSL_CTX_set_default_verify_paths(t->ctx) != 1) {
      goto fail;
    }
  }
  t->ssl = SSL_new(t->ctx);
  t->in = BIO_new(BIO_s_mem());
  t->out = BIO_new(BIO_s_mem());
  if (!t->ssl || !t->in || !t->out) goto fail;
  SSL_set_bio(t->ssl, t->in, t->out);  /* the session owns both BIOs now */
  bios_owned = 1;
  SSL_set_connect_state(t->ssl);
  if (has_name && SSL_set_tlsext_host_name(t->ssl, servername) != 1) goto fail;
  if (verify && SSL_set1_host(t->ssl, servername) != 1) goto fail;
  *out = t;
  return 0;
fail:
  take_error("TLS setup", err, errlen);
  if (!bios_owned) {
    BIO_free(t->in);
    BIO_free(t->out);
  }
  sg__tls_free(t);
  return SG_ENOMEM;
}

void sg__tls_free(sg__tls *t) {
  if (!t) return;
  SSL_free(t->ssl);
  SSL_CTX_free(t->ctx);
  free(t);
}

int sg__tls_feed(sg__tls *t, const char *data, size_t len) {
  if (len == 0) return 0;
  return BIO_write(t->in, data, (int)len) == (int)len ? 0 : SG_ENOMEM;
}

/* The outcome of an SSL_* call that returned rc <= 0: 0 to wait for input,
 * or an error. */
static int classify(sg__tls *t, int rc, const char *what, char *err, size_t errlen) {
  switch (SSL_get_error(t->ssl, rc)) {
    case SSL_ERROR_WANT_READ:
    case SSL_ERROR_WANT_WRITE:
      return 0;
    case SSL_ERROR_ZERO_RETURN:
      return UV_EOF;
    default:
      break;
  }
  long v = SSL_get_verify_result(t->ssl);
  if (v != X509_V_OK) {
    snprintf(err, errlen, "certificate verify failed: %s", X509_verify_cert_error_string(v));
    ERR_clear_error();
    return SG_EAUTH;
  }
  take_error(what, err, errlen);
  return SG_EPROTO;
}

/* The pinned certificate, or SG_EAUTH. */
static int check_pin(sg__tls *t, char *err, size_t errlen) {
  X509 *cert = SSL_get1_peer_certificate(t->ssl);
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int n = 0;
  int ok = cert && X509_digest(cert, EVP_sha256(), md, &n) == 1 && n == 32 &&
           CRYPTO_memcmp(md, t->pin, 32) == 0;
  X509_free(cert);
  if (ok) return 1;
  snprintf(err, errlen, "certificate verify failed: the certificate does not match the pin");
  return SG_EAUTH;
}

int sg__tls_handshake(sg__tls *t, char *err, size_t errlen) {
  int rc = SSL_do_handshake(t->ssl);
  if (rc == 1) return t->pinned ? check_pin(t, err, errlen) : 1;
  return classify(t, rc, "TLS handshake", err, errlen);
}

int sg__tls_read(sg__tls *t, char *buf, size_t cap, char *err, size_t errlen) {
  int rc = SSL_read(t->ssl, buf, (int)cap);
  if (rc > 0) return rc;
  return classify(t, rc, "TLS read", err, errlen);
}

int sg__tls_write(sg__tls *t, const char *data, size_t len, char *err, size_t errlen) {
  /* Memory BIOs grow, so a write is never partial and never waits. */
  while (len > 0) {
    int rc = SSL_write(t->ssl, data, (int)(len > 1 << 30 ? 1 << 30 : len));
    if (rc <= 0) {
      int e = classify(t, rc, "TLS write", err, errlen);
      return e ? e : SG_EPROTO;
    }
    data += rc;
    len -= (size_t)rc;
  }
  return 0;
}

size_t sg__tls_take_output(sg__tls *t, char *buf, size_t cap) {
  int n = BIO_read(t->out, buf, (int)cap);
  return n > 0 ? (size_t)n : 0;
}
