/* See dl_lazy.h. */
#include "dl_lazy.h"

#include <dlfcn.h>
#include <stdio.h>
#include <string.h>

int sg__dl_load(const char *soname, const sg__dl_fn *fns, size_t n, void *api, char *err,
                size_t errlen) {
  void *lib = dlopen(soname, RTLD_NOW | RTLD_LOCAL);
  if (!lib) {
    snprintf(err, errlen, "cannot load %s: %s", soname, dlerror());
    return -1;
  }
  for (size_t i = 0; i < n; i++) {
    void *p = dlsym(lib, fns[i].name);
    if (!p) {
      snprintf(err, errlen, "%s has no %s", soname, fns[i].name);
      dlclose(lib);
      return -1;
    }
    memcpy((char *)api + fns[i].offset, &p, sizeof p);
  }
  return 0;
}
