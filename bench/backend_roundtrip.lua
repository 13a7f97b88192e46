-- segue exec bench/backend_roundtrip.lua BACKEND SECONDS
-- Update -> request round trips through a subprocess backend: each Update
-- the backend sends makes a Lua handler send the next RoomLookup.
local segue = require "segue"
local loop = require "segue.loop"
local exe, seconds = arg[1], tonumber(arg[2] or "3")
assert(segue.add_backend("bench", { cmd = exe, args = { "proto" } }))
local count, deadline, running = 0, nil, true
local function next_request()
  segue.backend("bench"):request({ type = "RoomLookup", value = "#bench" }, function() end)
end
segue.on("update", function()
  count = count + 1
  if running and loop.now() < deadline then next_request() else running = false end
end)
segue.wait(200)                              -- the backend starts
deadline = loop.now() + seconds * 1000
local t0 = loop.hrtime()
next_request()
segue.await(function() while running do segue.sleep(20) end end, seconds * 1000 + 5000)
io.write(string.format("%.0f\n", count / ((loop.hrtime() - t0) / 1e9)))
