/* OpenSSL (libssl, libcrypto), loaded when first used (dlopen), not when
 * segue starts: the two libraries' relocated data is about 460 KB of
 * private memory in every process that maps them, and only a backend
 * connection over TLS (runtime/net/net_tls.c) or a SASL SCRAM login
 * (bindings/lua_crypto.c) calls them. Include after the <openssl/...>
 * headers: the functions those files call become calls through sg__ssl.
 * (libcurl, loaded when federation starts, maps the same two libraries.) */
#ifndef SG_SSL_LAZY_H
#define SG_SSL_LAZY_H

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <stddef.h>

/* Every function called, as a pointer of its own type (one list: the
 * struct, the lookup and the macros below are made from it). */
#define SG_SSL_FUNCTIONS(X)                                                            \
  X(ERR_get_error) X(ERR_error_string_n) X(ERR_clear_error) X(TLS_client_method)      \
  X(SSL_CTX_new) X(SSL_CTX_free) X(SSL_CTX_ctrl) X(SSL_CTX_set_verify)                 \
  X(SSL_CTX_load_verify_locations) X(SSL_CTX_set_default_verify_paths) X(SSL_new)     \
  X(SSL_free) X(SSL_ctrl) X(SSL_set_bio) X(SSL_set_connect_state) X(SSL_set1_host)     \
  X(SSL_get_error) X(SSL_get_verify_result) X(SSL_get1_peer_certificate)             \
  X(SSL_do_handshake) X(SSL_read) X(SSL_write) X(BIO_new) X(BIO_s_mem) X(BIO_free)     \
  X(BIO_read) X(BIO_write) X(X509_verify_cert_error_string) X(X509_digest) X(X509_free) \
  X(CRYPTO_memcmp) X(EVP_sha1) X(EVP_sha256) X(EVP_Digest) X(EVP_MD_get_size) X(HMAC) \
  X(PKCS5_PBKDF2_HMAC)

typedef struct {
#define SG_SSL_MEMBER(f) __typeof__(f) *f;
  SG_SSL_FUNCTIONS(SG_SSL_MEMBER)
#undef SG_SSL_MEMBER
} sg__ssl_api;

extern sg__ssl_api sg__ssl;

/* Loads libssl and libcrypto and fills sg__ssl, once per process (any
 * thread): 0, or -1 with the reason (naming the library or the function
 * missing) in err. */
int sg__ssl_load(char *err, size_t errlen);

#ifndef SG_SSL_LAZY_IMPL
#define ERR_get_error sg__ssl.ERR_get_error
#define ERR_error_string_n sg__ssl.ERR_error_string_n
#define ERR_clear_error sg__ssl.ERR_clear_error
#define TLS_client_method sg__ssl.TLS_client_method
#define SSL_CTX_new sg__ssl.SSL_CTX_new
#define SSL_CTX_free sg__ssl.SSL_CTX_free
#define SSL_CTX_ctrl sg__ssl.SSL_CTX_ctrl
#define SSL_CTX_set_verify sg__ssl.SSL_CTX_set_verify
#define SSL_CTX_load_verify_locations sg__ssl.SSL_CTX_load_verify_locations
#define SSL_CTX_set_default_verify_paths sg__ssl.SSL_CTX_set_default_verify_paths
#define SSL_new sg__ssl.SSL_new
#define SSL_free sg__ssl.SSL_free
#define SSL_ctrl sg__ssl.SSL_ctrl
#define SSL_set_bio sg__ssl.SSL_set_bio
#define SSL_set_connect_state sg__ssl.SSL_set_connect_state
#define SSL_set1_host sg__ssl.SSL_set1_host
#define SSL_get_error sg__ssl.SSL_get_error
#define SSL_get_verify_result sg__ssl.SSL_get_verify_result
#define SSL_get1_peer_certificate sg__ssl.SSL_get1_peer_certificate
#define SSL_do_handshake sg__ssl.SSL_do_handshake
#define SSL_read sg__ssl.SSL_read
#define SSL_write sg__ssl.SSL_write
#define BIO_new sg__ssl.BIO_new
#define BIO_s_mem sg__ssl.BIO_s_mem
#define BIO_free sg__ssl.BIO_free
#define BIO_read sg__ssl.BIO_read
#define BIO_write sg__ssl.BIO_write
#define X509_verify_cert_error_string sg__ssl.X509_verify_cert_error_string
#define X509_digest sg__ssl.X509_digest
#define X509_free sg__ssl.X509_free
#define CRYPTO_memcmp sg__ssl.CRYPTO_memcmp
#define EVP_sha1 sg__ssl.EVP_sha1
#define EVP_sha256 sg__ssl.EVP_sha256
#define EVP_Digest sg__ssl.EVP_Digest
#define EVP_MD_get_size sg__ssl.EVP_MD_get_size
#define HMAC sg__ssl.HMAC
#define PKCS5_PBKDF2_HMAC sg__ssl.PKCS5_PBKDF2_HMAC
#endif

#endif
