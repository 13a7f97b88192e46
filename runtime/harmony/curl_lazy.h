/* libcurl, loaded when the hRPC client is first used (dlopen), not when
 * segue starts: libcurl pulls in some thirty libraries (GnuTLS, p11-kit,
 * Kerberos, LDAP, SSH...) whose relocated data is private memory of every
 * process that loads them, about 350 KB, and an idle segue or one without
 * federation never needs them. Include after <curl/curl.h>: the curl_*
 * functions the client calls become calls through sg__curl. */
#ifndef SG_CURL_LAZY_H
#define SG_CURL_LAZY_H

#include <curl/curl.h>

typedef struct {
  CURLcode (*global_init)(long flags);
  CURL *(*easy_init)(void);
  CURLcode (*easy_setopt)(CURL *curl, CURLoption option, ...);
  CURLcode (*easy_getinfo)(CURL *curl, CURLINFO info, ...);
  CURLHcode (*easy_header)(CURL *easy, const char *name, size_t index, unsigned int origin,
                           int request, struct curl_header **hout);
  const char *(*easy_strerror)(CURLcode code);
  void (*easy_cleanup)(CURL *curl);
  CURLM *(*multi_init)(void);
  CURLMcode (*multi_setopt)(CURLM *multi, CURLMoption option, ...);
  CURLMcode (*multi_add_handle)(CURLM *multi, CURL *easy);
  CURLMcode (*multi_remove_handle)(CURLM *multi, CURL *easy);
  CURLMcode (*multi_assign)(CURLM *multi, curl_socket_t sockfd, void *sockp);
  CURLMcode (*multi_socket_action)(CURLM *multi, curl_socket_t s, int ev_bitmask,
                                   int *running_handles);
  CURLMsg *(*multi_info_read)(CURLM *multi, int *msgs_in_queue);
  CURLMcode (*multi_cleanup)(CURLM *multi);
  struct curl_slist *(*slist_append)(struct curl_slist *list, const char *string);
  void (*slist_free_all)(struct curl_slist *list);
} sg__curl_api;

extern sg__curl_api sg__curl;

/* Loads libcurl and fills sg__curl: 0, or -1 with the reason in err. Not
 * thread-safe: call it once (the client calls it under uv_once). */
int sg__curl_load(char *err, size_t errlen);

#undef curl_easy_setopt
#undef curl_easy_getinfo
#undef curl_multi_setopt
#define curl_global_init sg__curl.global_init
#define curl_easy_init sg__curl.easy_init
#define curl_easy_setopt sg__curl.easy_setopt
#define curl_easy_getinfo sg__curl.easy_getinfo
#define curl_easy_header sg__curl.easy_header
#define curl_easy_strerror sg__curl.easy_strerror
#define curl_easy_cleanup sg__curl.easy_cleanup
#define curl_multi_init sg__curl.multi_init
#define curl_multi_setopt sg__curl.multi_setopt
#define curl_multi_add_handle sg__curl.multi_add_handle
#define curl_multi_remove_handle sg__curl.multi_remove_handle
#define curl_multi_assign sg__curl.multi_assign
#define curl_multi_socket_action sg__curl.multi_socket_action
#define curl_multi_info_read sg__curl.multi_info_read
#define curl_multi_cleanup sg__curl.multi_cleanup
#define curl_slist_append sg__curl.slist_append
#define curl_slist_free_all sg__curl.slist_free_all

#endif
