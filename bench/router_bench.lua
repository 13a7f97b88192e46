-- segue exec bench/router_bench.lua BACKEND MESSAGES RULES
-- Messages/s routed from one subprocess chat backend to another through the
-- router, with RULES bridges loaded (one of them carries the traffic); then
-- the time to reload that rules file. Prints "rate reload_ms".
local segue = require "segue"
local loop = require "segue.loop"
local router = require "segue.router"
local exe, n, nrules = arg[1], tonumber(arg[2]), tonumber(arg[3])
local path = os.tmpname()
local f = assert(io.open(path, "w"))
f:write('return {\n  bridge { "src:#bench", "dst:#bench" },\n')
for i = 2, nrules do f:write(('  bridge { "src:#r%d", "dst:#r%d" },\n'):format(i, i)) end
f:write("}\n")
f:close()
assert(segue.add_backend("src", { cmd = exe, args = { "chat", tostring(n) } }))
assert(segue.add_backend("dst", { cmd = exe, args = { "chat", tostring(n) } }))
segue.wait(200)
local done = false
segue.on("update", function(name, u) if name == "dst" and u.value == "!done" then done = true end end)
router.install()
local t0 = loop.hrtime()
assert(router.load(path, { src = true, dst = true }))
segue.await(function() while not done do segue.sleep(5) end end, 600000)
local rate = n / ((loop.hrtime() - t0) / 1e9)
local r0 = loop.hrtime()
assert(router.load(path, { src = true, dst = true }))
local reload_ms = (loop.hrtime() - r0) / 1e6
os.remove(path)
io.write(string.format("%.0f %.2f\n", rate, reload_ms))
