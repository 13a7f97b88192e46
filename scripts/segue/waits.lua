-- segue.waits: for a backend that speaks a protocol from coroutines: the
-- timers it owns (all stopped with stop_all when it stops; backend.timer
-- would keep every one it made until then) and handlers waiting for an
-- answer by key ("join #room", "iq 42") until someone wakes the key or the
-- time is up.
--
--   local w = require("segue.waits").new(backend.log)
--   local ok, err = w.wait_for("join " .. room, 20000)  -- in a coroutine
--   w.wake("join " .. room, true)                       -- from the reader
local segue = require "segue"

local M = {}

function M.new(log)
  local w = {}
  local timers = {}   -- timer -> true, until it fires or is cancelled
  local waiting = {}  -- key -> { coroutines }

  local function resume(co, ...)
    local ok, e = coroutine.resume(co, ...)
    if not ok then log.error(debug.traceback(co, e)) end
  end

  --- after(ms, fn) -> timer: fn runs once, later.
  function w.after(ms, fn)
    local t
    t = segue.timer(ms, function()
      timers[t] = nil
      fn()
    end)
    timers[t] = true
    return t
  end

  function w.cancel(t)
    if t then t:stop(); timers[t] = nil end
  end

  --- wait_for(key, ms) -> what wake(key, ...) passed, or nil, "timed out after N ms".
  function w.wait_for(key, ms)
    local co = coroutine.running()
    local list = waiting[key] or {}
    waiting[key] = list
    list[#list + 1] = co
    local timer = w.after(ms, function()
      for i, c in ipairs(list) do
        if c == co then
          table.remove(list, i)
          if #list == 0 and waiting[key] == list then waiting[key] = nil end
          return resume(co, nil, "timed out after " .. ms .. " ms")
        end
      end
    end)
    local a, b = coroutine.yield()
    w.cancel(timer)
    return a, b
  end

  --- wake(key, a, b): every coroutine waiting for key gets a, b.
  function w.wake(key, a, b)
    local list = waiting[key]
    waiting[key] = nil
    for _, co in ipairs(list or {}) do resume(co, a, b) end
  end

  --- wake_matching(pattern, a, b): wake(key, a, b) for every key waited
  --- for that matches the Lua pattern (a refusal that names no one key).
  function w.wake_matching(pattern, a, b)
    local keys = {}
    for key in pairs(waiting) do
      if key:match(pattern) then keys[#keys + 1] = key end
    end
    for _, key in ipairs(keys) do w.wake(key, a, b) end
  end

  --- pause(ms): the calling coroutine sleeps.
  function w.pause(ms)
    local co = coroutine.running()
    w.after(ms, function() resume(co) end)
    coroutine.yield()
  end

  function w.stop_all()
    for t in pairs(timers) do t:stop() end
    timers = {}
  end

  return w
end

return M
