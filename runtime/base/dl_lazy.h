/* Loading a library when first used (dlopen), its functions looked up once
 * into a struct of pointers: what pq_lazy, curl_lazy and ssl_lazy share. */
#ifndef SG_DL_LAZY_H
#define SG_DL_LAZY_H

#include <stddef.h>

/* A function of the library: its symbol, and where its pointer goes in the
 * caller's struct (offsetof). */
typedef struct {
  const char *name;
  size_t offset;
} sg__dl_fn;

/* dlopen(soname) (RTLD_NOW | RTLD_LOCAL; the libraries it needs come with
 * it), then every fn's address stored into (char *)api + fn.offset: 0, or
 * -1 with the reason in err ("cannot load SONAME: ..." or "SONAME has no
 * NAME") and the library closed again, api then partly filled: pass a
 * struct of your own and keep it only on success. */
int sg__dl_load(const char *soname, const sg__dl_fn *fns, size_t n, void *api, char *err,
                size_t errlen);

#endif
