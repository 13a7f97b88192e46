/* A TLS client session over memory buffers (OpenSSL with two memory BIOs):
 * the caller moves ciphertext between the session and its socket, so TLS
 * runs on any uv stream without OpenSSL ever touching a file descriptor.
 *
 * Verification is on unless `verify` is 0: the peer's chain against the
 * system CA store (or only the CAs in `ca_file`) and its name against
 * `servername` (SSL_set1_host), which is also sent as SNI. With `pin` (the
 * SHA-256 fingerprint of the server's certificate, hex, colons allowed) the
 * certificate must be exactly that one, and chain and name are not checked:
 * for a self-hosted server with a self-signed certificate. Functions return
 * 0 or a negative SG_E* code; `err` buffers receive a one-line reason
 * (OpenSSL's words) on failure. */
#ifndef SEGUE_NET_TLS_H
#define SEGUE_NET_TLS_H
#include <stddef.h>

typedef struct sg__tls sg__tls;

typedef struct {
  const char *servername;  /* SNI and the name verified */
  int verify;              /* check chain and name (ignored with a pin) */
  const char *ca_file;     /* PEM file of the CAs to trust; NULL: the system's */
  const char *pin;         /* SHA-256 of the certificate (hex); NULL: none */
} sg__tls_options;

/* Creates a client session; *out is freed with sg__tls_free. SG_ENOMEM;
 * SG_EINVAL when verify is on and servername is NULL or empty, when ca_file
 * cannot be loaded, or when pin is not 64 hex digits. */
int sg__tls_new(const sg__tls_options *o, sg__tls **out, char *err, size_t errlen);
void sg__tls_free(sg__tls *t);

/* Hands ciphertext read from the socket to the session (copied). */
int sg__tls_feed(sg__tls *t, const char *data, size_t len);

/* Advances the handshake: 1 when it is complete, 0 when it needs more input
 * (send sg__tls_take_output first), SG_EAUTH when the peer failed
 * verification or does not match the pin, SG_EPROTO for any other failure. */
int sg__tls_handshake(sg__tls *t, char *err, size_t errlen);

/* Decrypts into buf: the byte count (> 0), 0 when more input is needed,
 * UV_EOF when the peer closed the session, SG_EPROTO on failure. */
int sg__tls_read(sg__tls *t, char *buf, size_t cap, char *err, size_t errlen);

/* Encrypts all of data into the output buffer. SG_EPROTO on failure. */
int sg__tls_write(sg__tls *t, const char *data, size_t len, char *err, size_t errlen);

/* Moves up to cap bytes of ciphertext to send into buf; returns the count
 * (0: nothing pending). */
size_t sg__tls_take_output(sg__tls *t, char *buf, size_t cap);

#endif
