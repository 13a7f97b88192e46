/* Error names and messages: one table (SG_ERRNO_MAP) for both, libuv's
 * codes passed through to libuv's own functions. */
#include "segue.h"
#include "segue_version.h"

const char *sg_err_name(int err) {
  switch (err) {
#define XX(code, _) case SG_##code: return #code;
    SG_ERRNO_MAP(XX)
#undef XX
  }
  if (err > SG__ERRNO_BASE && err < 0) return uv_err_name(err);
  return err == 0 ? "OK" : "EUNKNOWN";
}

const char *sg_strerror(int err) {
  switch (err) {
#define XX(code, msg) case SG_##code: return msg;
    SG_ERRNO_MAP(XX)
#undef XX
  }
  if (err > SG__ERRNO_BASE && err < 0) return uv_strerror(err);
  return err == 0 ? "success" : "unknown error";
}

const char *sg_version_string(void) { return SEGUE_VERSION; }
