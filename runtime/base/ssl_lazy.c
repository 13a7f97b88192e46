/* OpenSSL through dlopen: see ssl_lazy.h. */
#define SG_SSL_LAZY_IMPL
#include "ssl_lazy.h"

#include <stdio.h>
#include <uv.h>

#include "dl_lazy.h"

sg__ssl_api sg__ssl;

/* The SONAME of Debian's libssl3; libcrypto.so.3 comes with it, and
 * libssl's handle finds libcrypto's functions too. */
#define SG_LIBSSL "libssl.so.3"

static uv_once_t once = UV_ONCE_INIT;
static char load_error[256];

static void load(void) {
  static const sg__dl_fn fns[] = {
#define SG_SSL_FN(f) {#f, offsetof(sg__ssl_api, f)},
      SG_SSL_FUNCTIONS(SG_SSL_FN)
#undef SG_SSL_FN
  };
  sg__ssl_api api;
  if (sg__dl_load(SG_LIBSSL, fns, sizeof fns / sizeof *fns, &api, load_error, sizeof load_error) == 0)
    sg__ssl = api;
}

int sg__ssl_load(char *err, size_t errlen) {
  uv_once(&once, load);
  if (sg__ssl.PKCS5_PBKDF2_HMAC) return 0;
  if (err && errlen) snprintf(err, errlen, "%s", load_error);
  return -1;
}
