#include "log.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/stat.h>
#include <sys/time.h>

static const char *const level_names[] = {"error", "warn", "info", "debug"};

int sg__log_level_parse(const char *name) {
  for (int i = 0; i < 4; i++)
    if (name && strcmp(name, level_names[i]) == 0) return i;
  return -1;
}

const char *sg__log_level_name(int level) {
  return level >= 0 && level < 4 ? level_names[level] : "info";
}

int sg__log_enabled(const sg__logger *lg, sg_log_level lvl) {
  return (int)lvl <= (lg ? lg->level : SG_LOG_INFO);
}

/* Whether stderr is the journal's stream (systemd sets $JOURNAL_STREAM to
 * its "device:inode"): the journal stamps each line itself, so a time= of
 * ours would only duplicate it. A redirected stderr (another file, a pipe)
 * keeps time=. Decided once. */
static int to_journal(void) {
  static int cached = -1;
  if (cached >= 0) return cached;
  cached = 0;
  const char *js = getenv("JOURNAL_STREAM");
  unsigned long long dev, ino;
  struct stat st;
  if (js && sscanf(js, "%llu:%llu", &dev, &ino) == 2 && fstat(2, &st) == 0)
    cached = (unsigned long long)st.st_dev == dev && (unsigned long long)st.st_ino == ino;
  return cached;
}

/* Appends `s` as a logfmt value: bare when safe, else quoted and escaped. */
static void put_value(char *buf, size_t cap, size_t *n, const char *s) {
  int bare = *s != '\0';
  for (const char *p = s; *p && bare; p++)
    if ((unsigned char)*p <= ' ' || *p == '"' || *p == '=' || *p == '\\') bare = 0;
  if (bare) {
    *n += (size_t)snprintf(buf + *n, *n < cap ? cap - *n : 0, "%s", s);
    return;
  }
  if (*n < cap) buf[(*n)++] = '"';
  for (const unsigned char *p = (const unsigned char *)s; *p && *n + 6 < cap; p++) {
    if (*p == '"' || *p == '\\') { buf[(*n)++] = '\\'; buf[(*n)++] = (char)*p; }
    else if (*p == '\n') { buf[(*n)++] = '\\'; buf[(*n)++] = 'n'; }
    else if (*p == '\r') { buf[(*n)++] = '\\'; buf[(*n)++] = 'r'; }
    else if (*p == '\t') { buf[(*n)++] = '\\'; buf[(*n)++] = 't'; }
    else if (*p < 0x20) *n += (size_t)snprintf(buf + *n, cap - *n, "\\x%02x", *p);
    else buf[(*n)++] = (char)*p;
  }
  if (*n < cap) buf[(*n)++] = '"';
}

void sg__log_fields(const sg__logger *lg, sg_log_level lvl,
                    const char *const *kv, const char *msg) {
  if (!sg__log_enabled(lg, lvl)) return;
  char line[8192];
  size_t n = 0, cap = sizeof line - 2;
  struct timeval tv;
  struct tm tm;
  if (to_journal() && !(lg && lg->cb)) {
    n += (size_t)snprintf(line, cap, "level=%s", level_names[lvl]);
  } else {
    gettimeofday(&tv, NULL);
    gmtime_r(&tv.tv_sec, &tm);
    n += strftime(line, cap, "time=%Y-%m-%dT%H:%M:%S", &tm);
    n += (size_t)snprintf(line + n, cap - n, ".%03dZ level=%s",
                          (int)(tv.tv_usec / 1000), level_names[lvl]);
  }
  for (; kv && kv[0] && kv[1] && n < cap; kv += 2) {
    n += (size_t)snprintf(line + n, cap - n, " %s=", kv[0]);
    put_value(line, cap, &n, kv[1]);
  }
  if (n < cap) n += (size_t)snprintf(line + n, cap - n, " msg=");
  put_value(line, cap, &n, msg ? msg : "");
  if (n > cap) n = cap;
  line[n] = '\0';
  if (lg && lg->cb) {
    lg->cb(lg->data, lvl, line);
  } else {
    line[n] = '\n';
    fwrite(line, 1, n + 1, stderr);
    fflush(stderr);
  }
}

void sg__logv(const sg__logger *lg, sg_log_level lvl, const char *key,
              const char *val, const char *fmt, va_list ap) {
  if (!sg__log_enabled(lg, lvl)) return;
  char msg[4096];
  vsnprintf(msg, sizeof msg, fmt, ap);
  const char *kv[] = {key, val, NULL};
  sg__log_fields(lg, lvl, key && val ? kv : NULL, msg);
}

void sg__log(const sg__logger *lg, sg_log_level lvl, const char *key,
             const char *val, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  sg__logv(lg, lvl, key, val, fmt, ap);
  va_end(ap);
}
