/* Fuzz target: segue.xml, the streaming XML reader of the XMPP backend, as
 * a socket would feed it, and its serializer.
 *
 * Input: byte 0 picks the split (bits 0-5: pieces of 1 + n bytes) and small
 * limits (bit 7: max_depth 4, max_size 256); the rest is the stream.
 * Besides the sanitizers, three properties abort:
 * - a failure is nil, "ECODE: XML: ...", "ECODE" with ECODE EPROTO, ELIMIT
 *   or ENOMEM, and sticky (the next feed answers the same);
 * - splitting does not matter when both runs succeed: the same items;
 * - every item serializes, and its serialization parses back (inside a
 *   root) to an item that serializes to the same bytes. */
#include <lauxlib.h>
#include <lualib.h>
#include <stdint.h>
#include <string.h>

#include "bindings.h"
#include "fuzz_common.h"

static lua_State *L;

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  L = luaL_newstate();
  luaL_openlibs(L);
  luaL_requiref(L, "segue.xml", luaopen_segue_xml, 0);
  lua_setglobal(L, "xml");
  /* The harness in Lua: run(data, step, small) -> ok, serialized items. */
  static const char harness[] =
      "local xml = xml\n"
      "local function run(data, step, small)\n"
      "  local p = xml.parser(small and { max_depth = 4, max_size = 256 } or nil)\n"
      "  local out = {}\n"
      "  for i = 1, #data, step do\n"
      "    local items, err, code = p:feed(data:sub(i, i + step - 1))\n"
      "    if not items then\n"
      "      assert(code == 'EPROTO' or code == 'ELIMIT' or code == 'ENOMEM', code)\n"
      "      assert(err:sub(1, #code + 7) == code .. ': XML: ', err)\n"
      "      local again, err2 = p:feed('<x/>')\n"
      "      assert(again == nil and err2 == err, 'not sticky')\n"
      "      return false\n"
      "    end\n"
      "    for _, it in ipairs(items) do\n"
      "      local s = assert(xml.serialize(it))\n"
      "      if not it.stream then\n"
      "        local q = xml.parser()\n"
      "        local back = assert(q:feed('<r>' .. s .. '</r>'))\n"
      "        assert(#back == 3 and xml.serialize(back[2]) == s, 'round trip: ' .. s)\n"
      "      end\n"
      "      out[#out + 1] = s\n"
      "    end\n"
      "  end\n"
      "  return true, table.concat(out, '\\0')\n"
      "end\n"
      "return function(data, step, small)\n"
      "  local ok1, a = run(data, step, small)\n"
      "  local ok2, b = run(data, #data + 1, small)\n"
      "  if ok1 and ok2 then assert(a == b, 'split changed the items') end\n"
      "end\n";
  FUZZ_REQUIRE(luaL_loadstring(L, harness) == LUA_OK, "%s", lua_tostring(L, -1));
  FUZZ_REQUIRE(lua_pcall(L, 0, 1, 0) == LUA_OK, "%s", lua_tostring(L, -1));
  lua_setglobal(L, "check");
  return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < 1) return 0;
  int step = 1 + (data[0] & 0x3f);
  int small = (data[0] & 0x80) != 0;
  lua_getglobal(L, "check");
  lua_pushlstring(L, (const char *)data + 1, size - 1);
  lua_pushinteger(L, step);
  lua_pushboolean(L, small);
  int rc = lua_pcall(L, 3, 0, 0);
  FUZZ_REQUIRE(rc == LUA_OK, "%s", lua_tostring(L, -1));
  lua_settop(L, 0);
  lua_gc(L, LUA_GCCOLLECT);
  return 0;
}
