/* Fuzz target: the Harmony wire layer, as a peer's bytes meet it.
 *
 * The input is taken as
 * - the body of every message type segue.harmony knows: decode to a Lua
 *   table (protobuf-c unpack + the descriptor walk of bindings/lua_harmony.c),
 *   and when that works, encode the table and decode it again: the two
 *   tables must be equal;
 * - an Authorization header value: sg__token_parse, then admit under a few
 *   policies and verify against the key that signed the seed tokens
 *   (fuzz/corpus/harmony/token-*); a parsed token also goes through
 *   sg__token_check;
 * - a server id: a token created for it parses back to the same id and
 *   time and verifies.
 * Besides the sanitizers, a broken property or a Lua error aborts. */
#include <lauxlib.h>
#include <lualib.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bindings.h"
#include "fuzz_common.h"
#include "harmony_keys.h"
#include "harmony_token.h"
#include "segue.h"

static unsigned char fuzz_seed[SG_KEYS_SEED_BYTES];
static sg__keypair *fuzz_key;
static lua_State *L;
static int round_trip_ref;

static const char round_trip_lua[] =
    "local h = ...\n"
    "local types = h.types()\n"
    "local function same(a, b)\n"
    "  if type(a) ~= 'table' or type(b) ~= 'table' then return a == b end\n"
    "  for k, v in pairs(a) do if not same(v, b[k]) then return false end end\n"
    "  for k in pairs(b) do if a[k] == nil then return false end end\n"
    "  return true\n"
    "end\n"
    "return function(bytes)\n"
    "  for _, t in ipairs(types) do\n"
    "    local v, err, code = h.decode(t, bytes)\n"
    "    if v then\n"
    "      local e, eerr = h.encode(t, v)\n"
    /* Known and reported: decode does not check that strings are UTF-8
     * (protobuf-c does not), encode does. Anything else is a finding. */
    "      if not e and not eerr:find('invalid UTF-8', 1, true) then\n"
    "        error(t .. ': a decoded message does not encode: ' .. eerr)\n"
    "      end\n"
    "      local v2, err2 = e and h.decode(t, e)\n"
    "      if e and not v2 then error(t .. ': its own encoding does not decode: ' .. err2) end\n"
    "      if e and not same(v, v2) then error(t .. ': the round trip changed the message') end\n"
    "    elseif code ~= 'EDECODE' then\n"
    "      error(t .. ': unexpected failure ' .. tostring(err))\n"
    "    end\n"
    "  end\n"
    "end\n";

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc;
  (void)argv;
  fuzz_key_seed(fuzz_seed);
  FUZZ_REQUIRE(sg__keys_from_secret(fuzz_seed, sizeof fuzz_seed, &fuzz_key, NULL, 0) == 0,
               "cannot make the key");
  L = luaL_newstate();
  luaL_openlibs(L);
  luaL_requiref(L, "segue.harmony_core", luaopen_segue_harmony_core, 0);
  FUZZ_REQUIRE(luaL_loadstring(L, round_trip_lua) == LUA_OK, "%s", lua_tostring(L, -1));
  lua_insert(L, -2);
  FUZZ_REQUIRE(lua_pcall(L, 1, 1, 0) == LUA_OK, "%s", lua_tostring(L, -1));
  round_trip_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  return 0;
}

static void fuzz_messages(const uint8_t *data, size_t size) {
  lua_rawgeti(L, LUA_REGISTRYINDEX, round_trip_ref);
  lua_pushlstring(L, (const char *)data, size);
  FUZZ_REQUIRE(lua_pcall(L, 1, 0, 0) == LUA_OK, "%s", lua_tostring(L, -1));
  lua_gc(L, LUA_GCSTEP, 0);
}

/* Policies around the token's own claims: in and out of the window, on and
 * off the lists; the reason must be one of the map's. */
static void admit_all(const sg__token *tok) {
  char why[SG_TOKEN_WHY_SIZE];
  const char *ids[] = {tok->server_id, "other.example:2289"};
  sg__token_policy pol;
  sg__token_policy_init(&pol);
  uint64_t nows[] = {tok->time, tok->time + 61, tok->time - 61, 0, UINT64_MAX};
  for (size_t i = 0; i < sizeof nows / sizeof nows[0]; i++) {
    sg__token_reason r = sg__token_admit(tok, &pol, nows[i], why, sizeof why);
    FUZZ_REQUIRE(r < SG_TOKEN__REASON_COUNT, "reason %d", (int)r);
  }
  pol.allow = ids + 1;
  pol.n_allow = 1;
  FUZZ_REQUIRE(sg__token_admit(tok, &pol, tok->time, why, sizeof why) ==
                   (strcmp(tok->server_id, ids[1]) ? SG_TOKEN_HOST_NOT_ALLOWED : SG_TOKEN_OK),
               "allow list");
  pol.n_allow = 0;
  pol.block = ids;
  pol.n_block = 1;
  FUZZ_REQUIRE(sg__token_admit(tok, &pol, tok->time, why, sizeof why) == SG_TOKEN_HOST_BLOCKED,
               "block list");
  FUZZ_REQUIRE(sg__token_admit(tok, NULL, tok->time, why, sizeof why) == SG_TOKEN_OK, "defaults");
}

static void fuzz_token(const uint8_t *data, size_t size) {
  char why[SG_TOKEN_WHY_SIZE] = "";
  sg__token tok;
  const unsigned char *pk = sg__keys_public(fuzz_key);
  sg__token_reason r = sg__token_parse((const char *)data, size, &tok, why, sizeof why);
  FUZZ_REQUIRE(r < SG_TOKEN__REASON_COUNT && (r == SG_TOKEN_OK || why[0]),
               "reason %d without a text", (int)r);
  if (r != SG_TOKEN_OK) {
    FUZZ_REQUIRE(tok.server_id == NULL && tok.data == NULL, "a refused token holds memory");
    return;
  }
  admit_all(&tok);
  r = sg__token_verify(&tok, pk, why, sizeof why);
  FUZZ_REQUIRE(r == SG_TOKEN_OK || r == SG_TOKEN_BAD_SIGNATURE, "verify: %s", why);
  sg__token_policy pol;
  sg__token_policy_init(&pol);
  sg__token checked;
  sg__token_reason c = sg__token_check((const char *)data, size, &pol, tok.time, pk, &checked,
                                     why, sizeof why);
  FUZZ_REQUIRE(c == r, "check says %s, parse+admit+verify %s", sg__token_reason_name(c),
               sg__token_reason_name(r));
  sg__token_clear(&checked);
  sg__token_clear(&tok);
}

/* A token created for the input as a server id comes back intact when the
 * id is one segue accepts (host[:port]), and is refused as BAD_SERVER_ID
 * otherwise. */
static void fuzz_create(const uint8_t *data, size_t size) {
  char id[256], why[SG_TOKEN_WHY_SIZE], *header = NULL;
  size_t n = size < sizeof id - 1 ? size : sizeof id - 1;
  memcpy(id, data, n);
  id[n] = '\0';
  uint64_t time = size >= 8 ? ((uint64_t)data[0] << 56 | (uint64_t)data[size - 1]) : n;
  int rc = sg__token_create(fuzz_key, id, time, &header);
  if (id[0] == '\0') {
    FUZZ_REQUIRE(rc == SG_EINVAL, "an empty server id was accepted");
    return;
  }
  FUZZ_REQUIRE(rc == 0 && header, "create failed: %d", rc);
  sg__token tok;
  sg__token_reason r = sg__token_check(header, strlen(header), NULL, time,
                                     sg__keys_public(fuzz_key), &tok, why, sizeof why);
  if (!sg__token_server_id_ok(id, strlen(id))) {
    FUZZ_REQUIRE(r == SG_TOKEN_BAD_SERVER_ID, "a token for \"%s\" was %s", id,
                 sg__token_reason_name(r));
    free(header);
    return;
  }
  FUZZ_REQUIRE(r == SG_TOKEN_OK, "our own token for \"%s\" is refused: %s", id, why);
  FUZZ_REQUIRE(strcmp(tok.server_id, id) == 0 && tok.time == time, "claims changed");
  sg__token_clear(&tok);
  free(header);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  fuzz_messages(data, size);
  fuzz_token(data, size);
  fuzz_create(data, size);
  return 0;
}
