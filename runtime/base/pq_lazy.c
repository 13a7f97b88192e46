/* libpq through dlopen: see pq_lazy.h. */
#include "pq_lazy.h"

#include <dlfcn.h>
#include <stdio.h>
#include <string.h>

sg__pq_api sg__pq;

/* The SONAME of Debian's libpq5. */
#define SG_LIBPQ "libpq.so.5"

int sg__pq_load(char *err, size_t errlen) {
  if (sg__pq.connectStart) return 0;
  void *lib = dlopen(SG_LIBPQ, RTLD_NOW | RTLD_LOCAL);
  if (!lib) {
    snprintf(err, errlen, "cannot load %s: %s", SG_LIBPQ, dlerror());
    return -1;
  }
  static const struct {
    const char *name;
    size_t offset;
  } fns[] = {
#define FN(f) {"PQ" #f, offsetof(sg__pq_api, f)}
      FN(ntuples),
      FN(errorMessage),
      FN(clear),
      FN(getvalue),
      FN(getisnull),
      FN(status),
      FN(resultStatus),
      FN(nfields),
      FN(getlength),
      FN(resultErrorMessage),
      FN(flush),
      FN(finish),
      FN(socket),
      FN(setnonblocking),
      FN(sendQueryParams),
      FN(sendQuery),
      FN(resultErrorField),
      FN(isBusy),
      FN(getResult),
      FN(freemem),
      FN(consumeInput),
      FN(conninfoParse),
      FN(conninfoFree),
      FN(connectStart),
      FN(connectPoll),
      FN(cmdTuples),
#undef FN
  };
  sg__pq_api api;
  for (size_t i = 0; i < sizeof fns / sizeof *fns; i++) {
    void *p = dlsym(lib, fns[i].name);
    if (!p) {
      snprintf(err, errlen, "%s has no %s", SG_LIBPQ, fns[i].name);
      dlclose(lib);
      return -1;
    }
    memcpy((char *)&api + fns[i].offset, &p, sizeof p);
  }
  sg__pq = api;  /* connectStart set: the sign it is loaded */
  return 0;
}
