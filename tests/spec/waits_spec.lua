-- segue.waits: handlers waiting by key, woken or timed out, and timers that
-- stop together.
local segue = require "segue"
local waits = require "segue.waits"

local log = { error = function(m) error(m) end }

describe("segue.waits", function()
  it("wakes every coroutine waiting for a key with the values given", function()
    local w = waits.new(log)
    local got = segue.await(function()
      local results = {}
      for i = 1, 2 do
        segue.spawn(function() results[i] = { w.wait_for("join #a", 5000) } end)
      end
      w.after(10, function() w.wake("join #a", true, "ok") end)
      segue.sleep(100)
      return results
    end)
    assert.are.same({ { true, "ok" }, { true, "ok" } }, got)
  end)

  it("wakes only the keys matching a pattern with wake_matching", function()
    local w = waits.new(log)
    local got = segue.await(function()
      local results = {}
      for i, key in ipairs { "history #a", "history #b", "join #a" } do
        segue.spawn(function() results[i] = { w.wait_for(key, 300) } end)
      end
      w.after(10, function() w.wake_matching("^history ", nil, "refused") end)
      segue.sleep(400)
      return results
    end)
    assert.are.same({ { nil, "refused" }, { nil, "refused" }, { nil, "timed out after 300 ms" } }, got)
  end)

  it("answers nil and the time-out when nobody wakes the key", function()
    local w = waits.new(log)
    local a, b = segue.await(function() return w.wait_for("iq 1", 20) end)
    assert.is_nil(a)
    assert.are.equal("timed out after 20 ms", b)
  end)

  it("stops every timer it made with stop_all", function()
    local w = waits.new(log)
    local fired = false
    w.after(30, function() fired = true end)
    w.stop_all()
    segue.await(function() w.pause(80) end)
    assert.is_false(fired)
  end)
end)
