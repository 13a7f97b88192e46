-- The `segue` Lua API in the real host: events, timers, requests and errors,
-- JSON, and backends written in Lua.
local segue = require "segue"
local core = require "segue.core"
local json = require "segue.json"
local wait_until = require("support").wait_until

local src = os.getenv("SEGUE_SOURCE_DIR") or "."
local scripted = src .. "/tests/fixtures/backends/scripted.lua"
local n = 0
local function add_scripted(extra)
  n = n + 1
  local name = "scripted" .. n
  local def = { script = scripted, options = { greeting = "hello" }, restart_backoff_ms = 10 }
  for k, v in pairs(extra or {}) do def[k] = v end
  assert(segue.add_backend(name, def))
  return segue.backend(name), name
end

local function lookup(b, room)
  return segue.await(function() return b:request { type = "RoomLookup", value = room } end)
end

describe("segue.on", function()
  it("runs every handler of an event and returns a remover", function()
    local got = {}
    local off1 = segue.on("ping", function(x) got[#got + 1] = "a" .. x end)
    segue.on("ping", function(x) got[#got + 1] = "b" .. x end)
    segue.emit("ping", 1)
    assert.is_true(off1())
    segue.emit("ping", 2)
    assert.are.same({ "a1", "b1", "b2" }, got)
  end)

  it("contains an error in one handler and still runs the others", function()
    local ran = false
    segue.on("oops", function() error("handler failure") end)
    segue.on("oops", function() ran = true end)
    segue.emit("oops")
    assert.is_true(ran)
  end)

  it("tells about backend state changes", function()
    local states = {}
    segue.on("backend", function(name, state) states[#states + 1] = state end)
    add_scripted()
    wait_until("two state changes", function() return #states >= 2 end)
    assert.are.same({ "starting", "running" }, { states[1], states[2] })
  end)
end)

describe("segue.watch_handlers", function()
  it("tells every watcher of an event when its handlers change, until removed", function()
    local seen1, seen2 = {}, {}
    local unwatch1 = segue.watch_handlers("watched", function(list) seen1[#seen1 + 1] = #list end)
    local unwatch2 = segue.watch_handlers("watched", function(list) seen2[#seen2 + 1] = #list end)
    local off = segue.on("watched", function() end)
    unwatch1()
    off()
    unwatch2()
    segue.on("watched", function() end)
    assert.are.same({ 0, 1 }, seen1)
    assert.are.same({ 0, 1, 0 }, seen2)
  end)
end)

describe("timers", function()
  it("fires a one-shot timer once and a repeating one until stopped", function()
    local once, every = 0, 0
    segue.timer(5, function() once = once + 1 end)
    local t = segue.every(5, function() every = every + 1 end)
    wait_until("three ticks and the one-shot", function() return every >= 3 and once == 1 end)
    t:stop()
    local seen = every
    segue.wait(30)
    assert.are.equal(1, once)
    assert.is_true(seen >= 3)
    assert.are.equal(seen, every)
  end)

  it("sleeps inside a coroutine", function()
    local t0 = segue.now()
    segue.await(function() segue.sleep(30) end)
    assert.is_true(segue.now() - t0 >= 25)
  end)
end)

describe("backend:request", function()
  it("needs a coroutine when it has no callback", function()
    assert.has_error(function() segue.backend("x"):request { type = "RoomLookup", value = "#a" } end,
      "request without a callback must run inside a coroutine (see segue.spawn)")
  end)

  it("refuses an unknown backend at once, never calling the callback", function()
    local called = false
    local ok, err, code = segue.backend("nobody"):request({ type = "RoomLookup", value = "#a" },
      function() called = true end)
    segue.wait(10)
    assert.is_nil(ok)
    assert.are.equal("ENOBACKEND", code)
    assert.are.equal("ENOBACKEND: no backend named 'nobody'", err)
    assert.is_false(called)
  end)

  it("fails the same way for every function naming a backend", function()
    -- one convention: nil, "ENAME: message", "ENAME" (docs/design.md)
    for _, fn in ipairs { segue.remove_backend, core.start_backend, core.stop_backend,
                          core.remove_backend } do
      local ok, err, code = fn("nobody")
      assert.is_nil(ok)
      assert.are.equal("ENOBACKEND", code)
      assert.are.equal("ENOBACKEND: no backend named 'nobody'", err)
    end
    local ok, err, code = segue.add_backend("bad", { script = "memory", options = 5 })
    assert.is_nil(ok)
    assert.are.equal("ECONFIG", code)
    assert.truthy(err:find("^ECONFIG: "))
  end)

  it("refuses an invalid body naming the field", function()
    local b = add_scripted()
    local ok, err, code = b:request({ type = "MessageSend", value = { recipient = "#a",
      content = { type = "Concat", value = { { type = "Text", value = "a" }, { type = "Text", value = "b" },
        { type = "Blink", value = "c" } } } } }, function() end)
    assert.is_nil(ok)
    assert.are.equal("EPROTO", code)
    assert.are.equal('EPROTO: MessageSend.value.content.value[2].type: unknown variant "Blink"', err)
  end)

  it("calls back with the response body", function()
    local b = add_scripted()
    local got
    assert.is_true(b:request({ type = "RoomLookup", value = "#cb" }, function(r) got = r end))
    wait_until("the response", function() return got ~= nil end)
    assert.are.same({ type = "RoomID", value = "!cb" }, got)
  end)
end)

describe("a Lua backend", function()
  it("sends InitInfo from its info table and gets its options", function()
    local b = add_scripted()
    assert.are.same({ type = "RoomID", value = "hello" }, lookup(b, "#option"))
    assert.are.equal("lua", b:info().kind)
  end)

  it("answers later with reply, or after sleeping", function()
    local b = add_scripted()
    assert.are.equal("!later", lookup(b, "#later").value)
    assert.are.equal("!slept", lookup(b, "#sleep").value)
  end)

  it("answers Success for a true return", function()
    local b = add_scripted()
    assert.are.same({ type = "Success" }, segue.await(function()
      return b:request { type = "RoomJoin", value = "!a" } end))
  end)

  it("turns a raised error and nil, err into Error responses", function()
    local b = add_scripted()
    local r, err, code, body = lookup(b, "#raise")
    assert.is_nil(r)
    assert.are.equal("EBACKEND", code)
    assert.matches("RoomLookup failed: .*boom in handler", err)
    assert.are.equal("Error", body.type)
    r, err = lookup(b, "#nil-err")
    assert.matches("not today", err, 1, true)
  end)

  it("is retried on a retryable error", function()
    local b = add_scripted { retry_backoff_ms = 5 }
    assert.are.equal("!third", lookup(b, "#retry").value)
  end)

  it("is restarted when it answers with the wrong variant", function()
    local b = add_scripted()
    local r, err, code = lookup(b, "#wrong")
    assert.is_nil(r)
    assert.are.equal("EPROTO", code)
    assert.matches("with Room, expected RoomID", err, 1, true)
    wait_until("the restart", function() return b:info().state == "running" and b:info().restarts >= 1 end)
    assert.are.equal("running", b:info().state)
    assert.are.equal(1, b:info().restarts)
    assert.are.equal("!ok", lookup(b, "#ok").value)
  end)

  it("cannot emit an invalid update", function()
    local b = add_scripted()
    local r, err = lookup(b, "#bad-update")
    -- the violation restarts the backend, failing the request in flight
    assert.is_nil(r)
    assert.matches("MessageUpsert.value.id: expected a string, found number 5", err, 1, true)
  end)

  it("answers unknown request types with an Error", function()
    local b = add_scripted()
    local r, err = segue.await(function() return b:request { type = "RoomLeave", value = "!a" } end)
    assert.is_nil(r)
    assert.matches("does not implement RoomLeave", err, 1, true)
  end)
end)

describe("segue.json", function()
  it("round-trips objects, arrays, null and empty tables", function()
    local v = json.decode('{"a":[1,null,"x"],"b":{},"c":[],"d":1.5}')
    assert.are.equal(json.null, v.a[2])
    assert.are.equal('[1,null,"x"]', json.encode(v.a))
    assert.are.equal('{}', json.encode(v.b))
    assert.are.equal('[]', json.encode(v.c))
    assert.are.same(v, json.decode(json.encode(v)))
    assert.are.equal('{}', json.encode(json.object {}))
  end)

  it("reports where invalid JSON is", function()
    local v, err = json.decode('{"a": tru}')
    assert.is_nil(v)
    assert.matches("invalid JSON at byte offset %d+", err)
  end)

  it("refuses what JSON cannot hold", function()
    local v, err = json.encode { f = print }
    assert.is_nil(v)
    assert.are.equal("f: cannot encode a function as JSON", err)
    v, err = json.encode { 1, 2, x = 3 }
    assert.matches("mixes array and object keys", err)
  end)
end)

describe("segue.emit_checked", function()
  it("reports a handler that fails and counts a waiting one as a success", function()
    segue.on("checked", function(x) if x == "bad" then error("cannot take " .. x) end end)
    segue.on("checked", function() segue.sleep(5) end)
    assert.is_true(segue.emit_checked("checked", "good"))
    local ok, err = segue.emit_checked("checked", "bad")
    assert.is_nil(ok)
    assert.matches("cannot take bad", err, 1, true)
    assert.is_true(segue.emit_checked("nobody-listens"))
  end)
end)

describe("segue.call", function()
  it("gives a callback the outcome, or waits in the coroutine for it", function()
    local later = function(cb) segue.timer(5, function() cb("late", 2) end) return true end
    local now = function(cb) cb("now") return true end
    local refused = function() return nil, "EDEAD: no", "EDEAD" end
    local seen
    assert.is_true(segue.call("op", later, function(...) seen = { ... } end))
    wait_until("the callback", function() return seen ~= nil end)
    assert.are.same({ "late", 2 }, seen)
    assert.are.same({ "late", 2, "now" }, { segue.await(function()
      local a, b = segue.call("op", later)
      return a, b, (segue.call("op", now))
    end) })
    assert.are.same({ nil, "EDEAD: no", "EDEAD" }, { segue.await(function() return segue.call("op", refused) end) })
    assert.has_error(function() segue.call("op", later) end,
      "op without a callback must run inside a coroutine (see segue.spawn)")
  end)
end)

describe("segue.spawn", function()
  -- A signal interrupts whatever Lua runs, the coroutine pool's own steps
  -- too (outside the handler's xpcall). Interrupted at each line of the
  -- worker after the handler returned, the pool still hands every later
  -- spawn a coroutine that runs its function (before: an empty slot, or a
  -- dead coroutine, and the stopping handlers of segue did not run).
  it("runs every function after an interrupt at each step of the pool", function()
    local lines = {}
    for l in io.lines(src .. "/scripts/segue/init.lua") do lines[#lines + 1] = l end
    local first, last, after_body
    for i, l in ipairs(lines) do
      if l:match("^local function worker%(") then first = i end
      if first and i > first and not last and l:match("^end") then last = i end
      if first and not last and l:match("body%(fn") then after_body = i + 1 end
    end
    assert.is_truthy(first and last and after_body)
    local targets = 0
    for target = after_body, last - 1 do
      if not lines[target]:match("^%s*%-%-") and lines[target]:match("%S") then
        targets = targets + 1
        local hit = false
        segue.spawn(function()
          debug.sethook(function(_, line)
            if line == target and debug.getinfo(2, "S").source:find("segue/init.lua", 1, true) then
              debug.sethook()
              hit = true
              error("interrupted by the test")
            end
          end, "l")
        end)
        assert.is_true(hit, lines[target])
        local ran = 0
        for _ = 1, 3 do segue.spawn(function() ran = ran + 1 end) end
        assert.are.equal(3, ran, "interrupted at: " .. lines[target])
      end
    end
    assert.is_true(targets >= 3)
  end)
end)
