/* libpq through dlopen: see pq_lazy.h. */
#include "pq_lazy.h"

#include "dl_lazy.h"

sg__pq_api sg__pq;

/* The SONAME of Debian's libpq5. */
#define SG_LIBPQ "libpq.so.5"

int sg__pq_load(char *err, size_t errlen) {
  if (sg__pq.connectStart) return 0;
  static const sg__dl_fn fns[] = {
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
  if (sg__dl_load(SG_LIBPQ, fns, sizeof fns / sizeof *fns, &api, err, errlen) != 0) return -1;
  sg__pq = api;  /* connectStart set: the sign it is loaded */
  return 0;
}
