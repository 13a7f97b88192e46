/* OpenSSL through dlopen: see ssl_lazy.h. */
#define SG_SSL_LAZY_IMPL
#include "ssl_lazy.h"

#include <dlfcn.h>
#include <stdio.h>
#include <string.h>
#include <uv.h>

sg__ssl_api sg__ssl;

/* The SONAMEs of Debian's libssl3. */
#define SG_LIBCRYPTO "libcrypto.so.3"
#define SG_LIBSSL "libssl.so.3"

static uv_once_t once = UV_ONCE_INIT;
static char load_error[256];

static void load(void) {
  void *crypto = dlopen(SG_LIBCRYPTO, RTLD_NOW | RTLD_LOCAL);
  void *ssl = crypto ? dlopen(SG_LIBSSL, RTLD_NOW | RTLD_LOCAL) : NULL;
  if (!ssl) {
    snprintf(load_error, sizeof load_error, "cannot load %s: %s",
             crypto ? SG_LIBSSL : SG_LIBCRYPTO, dlerror());
    if (crypto) dlclose(crypto);
    return;
  }
  sg__ssl_api api;
  /* libssl's handle finds its own functions and, through its dependency,
   * libcrypto's */
#define SG_SSL_LOOKUP(f)                                                              \
  {                                                                                   \
    void *p = dlsym(ssl, #f);                                                         \
    if (!p) {                                                                         \
      snprintf(load_error, sizeof load_error, "%s has no %s", SG_LIBSSL, #f);          \
      dlclose(ssl);                                                                   \
      dlclose(crypto);                                                                \
      return;                                                                         \
    }                                                                                 \
    memcpy(&api.f, &p, sizeof p);                                                     \
  }
  SG_SSL_FUNCTIONS(SG_SSL_LOOKUP)
#undef SG_SSL_LOOKUP
  sg__ssl = api;
}

int sg__ssl_load(char *err, size_t errlen) {
  uv_once(&once, load);
  if (sg__ssl.PKCS5_PBKDF2_HMAC) return 0;
  if (err && errlen) snprintf(err, errlen, "%s", load_error);
  return -1;
}
