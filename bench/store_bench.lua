-- segue exec bench/store_bench.lua MODE ENGINE WHERE N [BACKEND]
-- One instance's share of a store benchmark (bench/store_pg.py runs 1, 2 or
-- 3 of these at once on one database and adds their rates):
--   MODE ops:   per message, the router's store work: log_message, map_put,
--               map_origin, map_copies; 4 coroutines at once. Prints messages/s.
--   MODE route: N messages routed between two subprocess backends (BACKEND,
--               bench/bench_backend.c "src"/"dst") through the router with this
--               store. Prints messages/s.
-- ENGINE sqlite (WHERE: the file) or postgresql (WHERE: the dsn).
local segue = require "segue"
local loop = require "segue.loop"
local store = require "segue.store"
local mode, engine, where, n, exe = arg[1], arg[2], arg[3], tonumber(arg[4]), arg[5]
local tag = tostring(require("segue.fs").getpid())

local db = assert(store.open(engine == "postgresql" and { engine = engine, dsn = where }
  or { engine = "sqlite", path = where }))
segue.await(function() assert(db:kv_get("bench.warm") == nil or true) end, 60000)

if mode == "ops" then
  local t0 = loop.hrtime()
  local left, workers = n, 4
  segue.await(function()
    local running = workers
    for w = 1, workers do
      segue.spawn(function()
        while left > 0 do
          left = left - 1
          local id = tag .. "." .. left
          assert(db:log_message("src", { id = id, recipient = "#bench", sender = "bench",
            content = { type = "Text", value = "hello " .. id }, create_time = left }))
          assert(db:map_put("src", id, "dst", "d" .. id, "#bench"))
          assert(db:map_origin("dst", "d" .. id))
          assert(#db:map_copies("src", id) == 1)
        end
        running = running - 1
      end)
    end
    while running > 0 do segue.sleep(1) end
  end, 600000)
  io.write(string.format("%.0f\n", n / ((loop.hrtime() - t0) / 1e9)))
else
  local router = require "segue.router"
  local path = os.tmpname()
  local f = assert(io.open(path, "w"))
  -- Backend names of this instance's own: instances share the message maps.
  local src, dst = "src" .. tag, "dst" .. tag
  f:write(('return {\n  bridge { "%s:#bench", "%s:#bench" },\n}\n'):format(src, dst))
  f:close()
  -- src says its n messages once asked to (RoomJoin "#go"), after the rooms
  -- resolved; dst answers them and says "!done" (bench/bench_backend.c).
  assert(segue.add_backend(src, { cmd = exe, args = { "src", tostring(n) } }))
  assert(segue.add_backend(dst, { cmd = exe, args = { "dst", tostring(n) } }))
  local done = false
  segue.on("update", function(name, u) if name == dst and u.value == "!done" then done = true end end)
  router.set_store(db)
  router.install()
  assert(router.load(path, { [src] = true, [dst] = true }))
  segue.await(function() while not router.ready() do segue.sleep(5) end end, 30000)
  local t0 = loop.hrtime()
  segue.backend(src):request({ type = "RoomJoin", value = "#go" }, function() end)
  segue.await(function() while not done do segue.sleep(2) end end, 600000)
  io.write(string.format("%.0f\n", n / ((loop.hrtime() - t0) / 1e9)))
  os.remove(path)
  router.set_store(nil)  -- the router's C path holds the store while it has it
end
db:close()
