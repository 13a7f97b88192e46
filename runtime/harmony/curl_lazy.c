/* libcurl through dlopen: see curl_lazy.h. */
#include "curl_lazy.h"

#include <stddef.h>

#include "dl_lazy.h"

sg__curl_api sg__curl;

/* The SONAME of Debian's libcurl4 (OpenSSL flavour, the one libcurl-dev's
 * headers describe). */
#define SG_LIBCURL "libcurl.so.4"

int sg__curl_load(char *err, size_t errlen) {
  if (sg__curl.global_init) return 0;
  static const sg__dl_fn fns[] = {
#define FN(f, name) {name, offsetof(sg__curl_api, f)}
      FN(global_init, "curl_global_init"),
      FN(easy_init, "curl_easy_init"),
      FN(easy_setopt, "curl_easy_setopt"),
      FN(easy_getinfo, "curl_easy_getinfo"),
      FN(easy_header, "curl_easy_header"),
      FN(easy_strerror, "curl_easy_strerror"),
      FN(easy_cleanup, "curl_easy_cleanup"),
      FN(multi_init, "curl_multi_init"),
      FN(multi_setopt, "curl_multi_setopt"),
      FN(multi_add_handle, "curl_multi_add_handle"),
      FN(multi_remove_handle, "curl_multi_remove_handle"),
      FN(multi_assign, "curl_multi_assign"),
      FN(multi_socket_action, "curl_multi_socket_action"),
      FN(multi_info_read, "curl_multi_info_read"),
      FN(multi_cleanup, "curl_multi_cleanup"),
      FN(slist_append, "curl_slist_append"),
      FN(slist_free_all, "curl_slist_free_all"),
#undef FN
  };
  sg__curl_api api;
  if (sg__dl_load(SG_LIBCURL, fns, sizeof fns / sizeof *fns, &api, err, errlen) != 0) return -1;
  sg__curl = api;  /* global_init set last: the sign it is loaded */
  return 0;
}
