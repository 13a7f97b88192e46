/* The hRPC error identifiers segue answers with, and the HTTP status each
 * goes with: the one place they are spelled. The token refusals (h.bad-token
 * and friends) are in harmony_token.h's SG_TOKEN_REASON_MAP. Lua reads this
 * table as segue.federation_core.errors (bindings/lua_federation.c). */
#ifndef SEGUE_HRPC_ERRORS_H
#define SEGUE_HRPC_ERRORS_H

#define SG__HRPC_BAD_UNARY "hrpc.http.bad-unary-request"
#define SG__HRPC_NOT_FOUND "hrpc.not-found"
#define SG__HRPC_NOT_IMPLEMENTED "hrpc.not-implemented"
#define SG__HRPC_INTERNAL "hrpc.internal-server-error"
#define SG__HRPC_UNAVAILABLE "hrpc.unavailable"
/* NotifyNewId whose new id fails segue's checks (federation.h) */
#define SG__HRPC_BAD_NEW_ID "h.bad-new-id"

/* XX(NAME, identifier, HTTP status it is answered with by default) */
#define SG__HRPC_ERROR_MAP(XX)                  \
  XX(BAD_UNARY, SG__HRPC_BAD_UNARY, 400)        \
  XX(NOT_FOUND, SG__HRPC_NOT_FOUND, 404)        \
  XX(NOT_IMPLEMENTED, SG__HRPC_NOT_IMPLEMENTED, 501) \
  XX(INTERNAL, SG__HRPC_INTERNAL, 500)          \
  XX(UNAVAILABLE, SG__HRPC_UNAVAILABLE, 503)    \
  XX(BAD_NEW_ID, SG__HRPC_BAD_NEW_ID, 403)

#endif
