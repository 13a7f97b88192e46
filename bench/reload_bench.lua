-- segue exec bench/reload_bench.lua BRIDGES [REPS [MODE]]
-- Reloads of a rules file of BRIDGES bridges between two in-process
-- backends ("memory"), each timed REPS times (default 21): the file
-- unchanged; one bridge changed (its name, back and forth); every bridge
-- changed (rooms renamed, back and forth: a full rebuild; the new rooms are
-- resolved between two reloads, untimed). Prints the median milliseconds
-- "unchanged one full", wall-clock, then the same in CPU time of the
-- process (less sensitive to the other processes of a shared machine).
-- Exits 1 (saying why on stderr) when the rooms are
-- not resolved within 60 s. MODE (unchanged, one or full) times only that
-- kind of reload and prints its two medians.
--
-- For callgrind: segue.core's memory() is called right before and right
-- after each timed reload, so `valgrind --tool=callgrind
-- --dump-before=l_memory` writes each reload in a file of its own (the
-- even-numbered dumps: 2, 4, ...).
local segue = require "segue"
local loop = require "segue.loop"
local router = require "segue.router"
local mark = require("segue.core").memory
local nrules, reps, only = tonumber(arg[1]), tonumber(arg[2] or "21"), arg[3]
if only ~= nil and only ~= "unchanged" and only ~= "one" and only ~= "full" then
  io.stderr:write("reload_bench: MODE is unchanged, one or full\n")
  os.exit(2)
end
local dir = os.tmpname()
os.remove(dir)
assert(os.execute("mkdir -m 700 " .. dir))
local path = dir .. "/rules.lua"
local function cleanup() os.execute("rm -rf " .. dir) end
local function fail(why)
  io.stderr:write("reload_bench: ", why, "\n")
  cleanup()
  os.exit(1)
end

-- the texts, made before any timing
local texts = {}
local function text(first, salt)
  local key = (first or "") .. "|" .. (salt or "")
  if not texts[key] then
    local parts = { 'return {\n  bridge { "src:#bench", "dst:#bench"', first or "", " },\n" }
    for i = 2, nrules do
      parts[#parts + 1] = ('  bridge { "src:#r%d%s", "dst:#r%d%s" },\n'):format(i, salt or "", i, salt or "")
    end
    parts[#parts + 1] = "}\n"
    texts[key] = table.concat(parts)
  end
  return texts[key]
end
local function write(t)
  local f = assert(io.open(path, "w"))
  f:write(t)
  f:close()
end

local backends = { src = true, dst = true }
for name in pairs(backends) do
  assert(segue.add_backend(name, { script = "memory" }))
end
local function ready()
  local ok = pcall(segue.await, function() while not router.ready() do segue.sleep(2) end end, 60000)
  if not ok then fail("the rooms were not resolved within 60 s") end
end
segue.await(function()
  for name in pairs(backends) do
    while (segue.backend(name):info() or {}).state ~= "running" do segue.sleep(2) end
  end
end, 10000)
router.install()
write(text())
assert(router.load(path, backends))
ready()

local function median(mode)
  local times, cpu = {}, {}
  for i = 1, reps do
    if mode == "one" then write(text(i % 2 == 1 and ', name = "changed"' or nil))
    elseif mode == "full" then write(text(nil, i % 2 == 1 and "x" or nil)) end
    mark()
    local t0, c0 = loop.hrtime(), os.clock()
    assert(router.load(path, backends))
    times[i], cpu[i] = (loop.hrtime() - t0) / 1e6, (os.clock() - c0) * 1e3
    mark()
    if mode == "full" then ready() end
  end
  table.sort(times)
  table.sort(cpu)
  return times[(reps + 1) // 2], cpu[(reps + 1) // 2]
end
if only then
  local ms, cpu = median(only)
  cleanup()
  io.write(("%.2f %.2f\n"):format(ms, cpu))
  return
end
local unchanged, unchanged_cpu = median("unchanged")
local one, one_cpu = median("one")
local full, full_cpu = median("full")
cleanup()
io.write(("%.2f %.2f %.2f %.2f %.2f %.2f\n"):format(unchanged, one, full, unchanged_cpu, one_cpu, full_cpu))
