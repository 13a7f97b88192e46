-- Runs busted inside the segue host (`segue exec tests/run_busted.lua SPEC`),
-- so specs see the real runtime: `require "segue"`, its C bindings, the uv
-- loop (drive it with segue.await / segue.wait).
package.path = "/usr/share/lua/5.4/?.lua;/usr/share/lua/5.4/?/init.lua;" .. package.path
package.path = (os.getenv("SEGUE_SOURCE_DIR") or ".") .. "/tests/spec/?.lua;" .. package.path
arg[0] = "busted"
require "busted.runner" { standalone = false }
