/* Harmony federation tokens: the Authorization header of every
 * PostboxService call (spec/harmony-federation.md, "The token").
 *
 * A token is a serialized protocol.harmonytypes.v1.Token{sig, data} whose
 * `data` is a serialized protocol.sync.v1.AuthData{server_id, time} and whose
 * `sig` is the Ed25519 signature of exactly those bytes. segue sends it as
 * standard padded base64 and accepts standard or URL-safe base64, padded or
 * not, and raw Token bytes.
 *
 * Checking is split so that the caller can learn who claims to speak before
 * fetching that server's key:
 *   sg__token_parse   -> server_id, time     (no key needed)
 *   sg__token_admit   -> policy: federation on, allow/block lists, time window
 *   (caller fetches the key for tok.server_id, from its cache or the peer)
 *   sg__token_verify  -> Ed25519 signature; on SG_TOKEN_BAD_SIGNATURE the
 *                       caller may fetch the key again once and retry
 * sg__token_check does all three when the key is already known.
 *
 * Every refusal is an sg__token_reason with an hRPC error identifier and HTTP
 * status, and a log text in `why` naming the reason with its values. The
 * identifiers are the reference server's (scherzo) where it has one:
 *
 *   reason               identifier               status  when
 *   MISSING              h.bad-auth               400     no or empty header
 *   GARBAGE              h.bad-token              400     not a Token in any encoding
 *   BAD_DATA             h.bad-token-data         400     Token.data is not an AuthData
 *   NO_SERVER_ID         h.bad-token-data         400     AuthData.server_id empty
 *   SIG_LENGTH           h.bad-token-signature    400     Token.sig is not 64 bytes
 *   FEDERATION_DISABLED  h.federation-disabled    403     policy.disabled is set
 *   HOST_BLOCKED         h.host-not-allowed       403     server_id on the block list
 *   HOST_NOT_ALLOWED     h.host-not-allowed       403     allow list set, id not on it
 *   STALE                h.bad-token-data         400     time older than now - window
 *   FUTURE               h.bad-token-data         400     time newer than now + window
 *   BAD_SIGNATURE        h.token-verify-failure   400     signature does not verify
 *   BAD_SERVER_ID        h.bad-token-data         400     server_id is not host[:port] (or has a NUL)
 *   WRONG_AUDIENCE       h.bad-token-data         400     the token names another server (segue's
 *                                                         audience extension)
 *   AUDIENCE_REQUIRED    h.bad-token-data         400     the peer must name us and did not
 *
 * (scherzo answers a time outside its window with the generic h.bad-auth; we
 * say h.bad-token-data because the time is part of the token's data, which
 * tells the peer's operator to look at their clock. A bad signature is
 * h.token-verify-failure, as in scherzo, distinct from a malformed one, since
 * only the former is worth a key refetch.)
 */
#ifndef SEGUE_HARMONY_TOKEN_H
#define SEGUE_HARMONY_TOKEN_H
#include <stddef.h>
#include <stdint.h>

#include "harmony_keys.h"

struct sg__idmap;

#define SG_TOKEN_DEFAULT_WINDOW 60     /* seconds, either side of now */
#define SG_TOKEN_DEFAULT_UNBOUND_WINDOW 30  /* the same for tokens naming no audience */
#define SG_TOKEN_MAX_SERVER_ID 255     /* longer ids are BAD_SERVER_ID */
#define SG_TOKEN_MAX_HEADER 4096       /* longer header values are GARBAGE */
#define SG_TOKEN_WHY_SIZE 256          /* enough for any `why` text */

/* XX(name, identifier, status, summary) */
#define SG_TOKEN_REASON_MAP(XX)                                                  \
  XX(OK, "", 200, "token accepted")                                              \
  XX(MISSING, "h.bad-auth", 400, "no Authorization header")                      \
  XX(GARBAGE, "h.bad-token", 400, "not a Token")                                 \
  XX(BAD_DATA, "h.bad-token-data", 400, "token data is not an AuthData")         \
  XX(NO_SERVER_ID, "h.bad-token-data", 400, "token names no server")             \
  XX(SIG_LENGTH, "h.bad-token-signature", 400, "signature is not 64 bytes")      \
  XX(FEDERATION_DISABLED, "h.federation-disabled", 403, "federation is disabled") \
  XX(HOST_BLOCKED, "h.host-not-allowed", 403, "server is on the block list")     \
  XX(HOST_NOT_ALLOWED, "h.host-not-allowed", 403, "server is not on the allow list") \
  XX(STALE, "h.bad-token-data", 400, "token time is too old")                    \
  XX(FUTURE, "h.bad-token-data", 400, "token time is in the future")             \
  XX(BAD_SIGNATURE, "h.token-verify-failure", 400, "signature does not verify")       \
  XX(BAD_SERVER_ID, "h.bad-token-data", 400, "server id is not host[:port]")       \
  XX(WRONG_AUDIENCE, "h.bad-token-data", 400, "token is for another server")       \
  XX(AUDIENCE_REQUIRED, "h.bad-token-data", 400, "token must name its audience")

typedef enum {
#define XX(name, id, status, summary) SG_TOKEN_##name,
  SG_TOKEN_REASON_MAP(XX)
#undef XX
  SG_TOKEN__REASON_COUNT
} sg__token_reason;

/* "STALE"; the hRPC identifier ("h.bad-token-data", "" for OK); the HTTP
 * status (200 for OK); a one-line summary. Never NULL; out-of-range values
 * describe GARBAGE. */
const char *sg__token_reason_name(sg__token_reason r);
const char *sg__token_reason_identifier(sg__token_reason r);
int sg__token_reason_status(sg__token_reason r);
const char *sg__token_reason_summary(sg__token_reason r);

/* A parsed token. Owned by whoever called sg__token_parse; release with
 * sg__token_clear. */
typedef struct sg__token {
  char *server_id;                       /* NUL-terminated, never empty, host[:port] */
  char *audience;                        /* the server it is for; NULL when absent */
  uint64_t time;                         /* UTC Unix seconds, as sent */
  unsigned char sig[SG_KEYS_SIG_BYTES];
  unsigned char *data;                   /* the signed AuthData bytes */
  size_t data_len;
} sg__token;

/* Who may speak, and when. Lists are borrowed for the call. Comparison is
 * exact (ids are `domain:port` as the peer spells them). The block list
 * always applies; a non-empty allow list admits only its members.
 *
 * Audience (segue's extension): a token naming an audience other than
 * `audience` (ours; NULL: we cannot be named, so any audience is another)
 * is WRONG_AUDIENCE. A token naming none is AUDIENCE_REQUIRED from a server
 * on `bound`, else admitted within the smaller of `window` and
 * `unbound_window`: it could have been made for any server. */
typedef struct sg__token_policy {
  int disabled;                          /* non-zero: refuse everyone */
  const char *const *allow;
  size_t n_allow;
  const char *const *block;
  size_t n_block;
  uint64_t window;                       /* seconds; SG_TOKEN_DEFAULT_WINDOW */
  uint64_t unbound_window;               /* seconds; SG_TOKEN_DEFAULT_UNBOUND_WINDOW */
  const char *audience;
  const char *const *bound;              /* servers whose tokens must name us */
  size_t n_bound;
  /* Optional: the lists above as hash tables (idmap.h: id -> non-NULL),
   * built and kept by the policy's owner; a list that has one is looked up,
   * not walked (a federation may list thousands of peers). */
  const struct sg__idmap *allow_map, *block_map, *bound_map;
} sg__token_policy;

/* 1 when `id` (`len` bytes) is a server id segue talks to: a DNS name
 * (letters, digits, '-', '.'), an IPv4 literal or a bracketed IPv6 literal,
 * then optionally ':' and a port 1..65535; at most SG_TOKEN_MAX_SERVER_ID
 * bytes. Nothing else: no '@', '/', '?', spaces or NUL. */
int sg__token_server_id_ok(const char *id, size_t len);

/* 1 when `id` is on list[n] (exact comparison). */
int sg__token_on_list(const char *id, const char *const *list, size_t n);
/* The same through `map` (the list as a hash table) when it is not NULL. */
int sg__token_listed(const char *id, const char *const *list, size_t n,
                    const struct sg__idmap *map);

/* A policy with no lists and the default windows. */
void sg__token_policy_init(sg__token_policy *pol);

/* Creates the header value for (server_id, time) signed with `kp`: the
 * Token as standard padded base64, NUL-terminated, in *out, which the caller
 * free()s. Returns 0, SG_EINVAL (no or empty server_id) or SG_ENOMEM. */
int sg__token_create(const sg__keypair *kp, const char *server_id, uint64_t time,
                    char **out);
/* The same naming `audience` (NULL or "": none) in the AuthData. */
int sg__token_create_for(const sg__keypair *kp, const char *server_id, const char *audience,
                        uint64_t time, char **out);

/* Decodes a header value of `len` bytes (`value` may be NULL when there was
 * no header). On SG_TOKEN_OK, *tok holds the token (sg__token_clear it);
 * otherwise *tok is zeroed and holds nothing. `why` (may be NULL) gets the
 * log text of a refusal. */
sg__token_reason sg__token_parse(const char *value, size_t len, sg__token *tok,
                               char *why, size_t whylen);

/* Applies `pol` to a parsed token at `now` (UTC Unix seconds, from the
 * caller so tests control the clock). */
sg__token_reason sg__token_admit(const sg__token *tok, const sg__token_policy *pol,
                               uint64_t now, char *why, size_t whylen);

/* Verifies the signature against the peer's 32-byte public key. */
sg__token_reason sg__token_verify(const sg__token *tok,
                                const unsigned char pk[SG_KEYS_PUBLIC_BYTES],
                                char *why, size_t whylen);

/* parse + admit + verify. On SG_TOKEN_OK *tok holds the token (clear it);
 * on a refusal *tok holds nothing. */
sg__token_reason sg__token_check(const char *value, size_t len,
                               const sg__token_policy *pol, uint64_t now,
                               const unsigned char pk[SG_KEYS_PUBLIC_BYTES],
                               sg__token *tok, char *why, size_t whylen);

/* Frees what sg__token_parse put in *tok and zeroes it; safe to repeat. */
void sg__token_clear(sg__token *tok);

#endif
