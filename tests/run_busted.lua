-- Runs busted inside the segue host (`segue exec tests/run_busted.lua SPEC`),
-- so specs see the real runtime: `require "segue"`, its C bindings, the uv
-- loop (drive it with segue.await / segue.wait).
package.path = "/usr/share/lua/5.4/?.lua;/usr/share/lua/5.4/?/init.lua;" .. package.path
package.path = (os.getenv("SEGUE_SOURCE_DIR") or ".") .. "/tests/spec/?.lua;" .. package.path
-- Every os.tmpname() of a spec is a name inside one scratch directory of
-- this run, removed when the run ends however it ends: a test run leaves
-- nothing in /tmp.
do
  local p = assert(io.popen("mktemp -d \"${TMPDIR:-/tmp}/segue-spec.XXXXXX\""))
  local scratch = assert(p:read("l"), "mktemp -d failed")
  p:close()
  local n = 0
  os.tmpname = function()
    n = n + 1
    local name = ("%s/tmp%d"):format(scratch, n)
    assert(io.open(name, "w")):close()  -- like the real one: the file exists
    return name
  end
  local exit = os.exit
  local function clean() os.execute(("rm -rf %q"):format(scratch)) end
  os.exit = function(...)
    clean()
    return exit(...)
  end
  SEGUE_SPEC_CLEANUP = clean
end
arg[0] = "busted"
require "busted.runner" { standalone = false }
SEGUE_SPEC_CLEANUP()
