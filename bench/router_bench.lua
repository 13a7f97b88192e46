-- segue exec bench/router_bench.lua BACKEND MESSAGES RULES [RATE [STORE [LATENCY_FILE]]]
-- Messages routed one way from one subprocess chat backend ("src") to
-- another ("dst") through the router, with RULES bridges loaded (one of them
-- carries the traffic). src starts saying its MESSAGES only once every room
-- is resolved and joined, RATE per second (0: as fast as it can). STORE is
-- "sqlite" (the store segue runs with) or "memory". Then the reload of that
-- rules file: unchanged, with one bridge changed, and rebuilt in full.
-- Prints "rate reload_unchanged_ms reload_one_ms reload_full_ms lost"; dst
-- writes "p50_us p99_us" of the latency to LATENCY_FILE. Exits 1 (and says
-- why on stderr) when the messages do not all arrive within the deadline.
-- ROUTER_BENCH_DEBUG=1 says on stderr how many messages the compiled path
-- carried.
local segue = require "segue"
local loop = require "segue.loop"
local router = require "segue.router"
local exe, n, nrules = arg[1], tonumber(arg[2]), tonumber(arg[3])
local rate, store_kind, latency_file = tonumber(arg[4] or "0"), arg[5] or "sqlite", arg[6]
local dir = os.tmpname()
os.remove(dir)
assert(os.execute("mkdir -m 700 " .. dir))
local path = dir .. "/rules.lua"
local function write_rules(first, salt)
  local f = assert(io.open(path, "w"))
  f:write('return {\n  bridge { "src:#bench", "dst:#bench"', first or "", ' },\n')
  for i = 2, nrules do f:write(('  bridge { "src:#r%d", "dst:#r%d%s" },\n'):format(i, i, salt or "")) end
  f:write("}\n")
  f:close()
end
local function cleanup() os.execute("rm -rf " .. dir) end
local function fail(why)
  io.stderr:write("router_bench: ", why, "\n")
  cleanup()
  os.exit(1)
end
write_rules()
if store_kind == "sqlite" then
  router.set_store(assert(require("segue.store").open(dir .. "/segue.db")))
end
assert(segue.add_backend("src", { cmd = exe, args = { "src", tostring(n), tostring(rate) } }))
assert(segue.add_backend("dst", { cmd = exe, args = { "dst", tostring(n), latency_file } }))
-- Done once dst answered every copy. (No "update" handler of our own: the
-- router carries plain messages in C only while it alone listens.)
local function done() return router.status.bridged >= n end
router.install()
assert(router.load(path, { src = true, dst = true }))
local ok = pcall(segue.await, function() while not router.ready() do segue.sleep(5) end end, 30000)
if not ok then fail("the rooms were not resolved within 30 s") end
local deadline = 20000 + n * (rate > 0 and 2000 / rate or 1)
local t0 = loop.hrtime()
segue.backend("src"):request({ type = "RoomJoin", value = "#go" }, function() end)
ok = pcall(segue.await, function() while not done() do segue.sleep(2) end end, deadline)
if not ok then
  fail(("%d messages not routed within %.0f ms (%d bridged, %d lost)")
    :format(n, deadline, router.status.bridged, router.status.lost))
end
local msg_rate = n / ((loop.hrtime() - t0) / 1e9)
local function reload_ms()
  local r0 = loop.hrtime()
  assert(router.load(path, { src = true, dst = true }))
  return (loop.hrtime() - r0) / 1e6
end
local unchanged = reload_ms()
write_rules(', name = "changed"')
local one = reload_ms()
write_rules(nil, "x")
local full = reload_ms()
cleanup()
io.write(string.format("%.0f %.2f %.2f %.2f %d\n", msg_rate, unchanged, one, full, router.status.lost))
if os.getenv("ROUTER_BENCH_DEBUG") then io.stderr:write("compiled ", router.status.compiled, " bridged ", router.status.bridged, "\n") end
