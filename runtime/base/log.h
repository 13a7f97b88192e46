/* Logging: one event per line, logfmt ("time=... level=warn backend=irc
 * msg=\"...\""), to a callback or stderr. Internal to the runtime. */
#ifndef SEGUE_LOG_H
#define SEGUE_LOG_H
#include <stdarg.h>
#include "segue.h"

typedef struct sg__logger {
  int level;          /* events above this level are dropped */
  sg_log_cb cb;       /* NULL: write to stderr */
  void *data;
} sg__logger;

/* Parses "error", "warn", "info", "debug"; -1 if none of them. */
int sg__log_level_parse(const char *name);
const char *sg__log_level_name(int level);

/* Logs `fmt` as msg=, after the optional field `key`=`val` (both may be NULL).
 * `lg` may be NULL: stderr at level info. */
void sg__log(const sg__logger *lg, sg_log_level lvl, const char *key,
             const char *val, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));
void sg__logv(const sg__logger *lg, sg_log_level lvl, const char *key,
              const char *val, const char *fmt, va_list ap);
/* Logs pre-rendered fields: kv is "key", "value", ..., NULL (values quoted
 * as logfmt needs), then msg. */
void sg__log_fields(const sg__logger *lg, sg_log_level lvl,
                    const char *const *kv, const char *msg);
int sg__log_enabled(const sg__logger *lg, sg_log_level lvl);

#endif
