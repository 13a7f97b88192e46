-- The router under load, in-process: a copy for a room not resolved yet
-- beyond MAX_WAITING is counted and reported (never dropped silently), a
-- copy beyond the bound of copies in flight to one backend likewise, and a
-- burst of thousands of messages arrives complete and in order, with no
-- echo bridged back.
local segue = require "segue"
local router = require "segue.router"
local sdk = require "segue.backend_sdk"

local support = require "support"
local dir, file = support.scratch()

-- A chat service whose RoomLookup answers only once backend.open() is called,
-- and whose MessageSend answers only while not backend.stuck; it keeps what
-- it was sent, in order.
file("gated.lua", [[
local backend = ...
local waiting, held = {}, {}
backend.got, backend.stuck = {}, false
function backend.open()
  backend.opened = true
  for _, w in ipairs(waiting) do w.reply(w.name) end
  waiting = {}
end
function backend.unstick()
  backend.stuck = false
  for _, h in ipairs(held) do h() end
  held = {}
end
return {
  RoomLookup = function(name, reply)
    if backend.opened then return name end
    waiting[#waiting + 1] = { name = name, reply = reply }
  end,
  RoomJoin = function() return true end,
  MessageSend = function(msg, reply)
    local n = #backend.got + 1
    backend.got[n] = require("segue.router").plain(msg.content)
    if not backend.stuck then return "copy" .. n end
    held[#held + 1] = function() reply("copy" .. n) end
  end,
}
]])

local function add(name, def)
  assert(segue.add_backend(name, def))
  segue.await(function()
    while (segue.backend(name):info() or {}).state ~= "running" do segue.sleep(5) end
  end)
end

add("src", { script = "memory" })
add("gated", { script = dir .. "/gated.lua" })
add("dst", { script = "memory" })
router.install()
local losses = {}
router.on_lost = function(reason, where, id) losses[#losses + 1] = { reason, where, id } end
assert(router.load(file("rules.lua", [[return {
  bridge { "src:#a", "gated:#b" },
  bridge { "src:#load", "dst:#load", format = "" },
}]]), { src = true, gated = true, dst = true }))

local function room(backend, name)
  return segue.await(function() return segue.backend(backend):request { type = "RoomLookup", value = name } end).value
end

local wait_until = support.wait_until

describe("the router under load", function()
  it("counts and reports every copy beyond MAX_WAITING for an unresolved room", function()
    router.MAX_WAITING = 3
    local gated = sdk.api("gated")
    local a = room("src", "#a")
    local lost0 = router.status.lost
    for i = 1, 5 do sdk.api("src").post(a, "alice", "w" .. i) end
    assert.are.equal(lost0 + 2, router.status.lost)
    assert.are.equal(2, router.status.lost_by.unresolved)
    assert.are.same({ "unresolved", "gated:#b" }, { losses[1][1], losses[1][2] })
    assert.are.equal(2, #losses)
    gated.open()
    wait_until("the waiting copies arrive", function() return #gated.got == 3 end)
    assert.are.same({ "<alice@src> w1", "<alice@src> w2", "<alice@src> w3" }, gated.got)
    router.MAX_WAITING = 1000
  end)

  it("counts copies beyond MAX_IN_FLIGHT to a backend that does not answer, and recovers", function()
    local gated = sdk.api("gated")
    local a = room("src", "#a")
    wait_until("the room resolves", function() return router.ready() end)
    gated.stuck = true
    router.MAX_IN_FLIGHT = 10
    local before, lost0 = #gated.got, router.status.lost
    for i = 1, 15 do sdk.api("src").post(a, "bob", "f" .. i) end
    wait_until("the ten copies in flight arrive", function() return #gated.got == before + 10 end)
    assert.are.equal(lost0 + 5, router.status.lost)
    assert.are.equal(5, router.status.lost_by.overloaded)
    gated.unstick()
    router.MAX_IN_FLIGHT = 10000
    sdk.api("src").post(a, "bob", "after")
    wait_until("a copy goes through again", function() return gated.got[#gated.got] == "<bob@src> after" end)
  end)

  it("bridges a burst of 5000 messages complete, in order, without echoes", function()
    local src_room, dst_room = room("src", "#load"), room("dst", "#load")
    local got, echoes = {}, 0
    local off = segue.on("update", function(name, u)
      if u.type ~= "MessageUpsert" then return end
      if name == "dst" and u.value.recipient == dst_room then got[#got + 1] = router.plain(u.value.content) end
      if name == "src" and u.value.recipient == src_room and u.value.sender ~= "carol" then echoes = echoes + 1 end
    end)
    local lost0, bridged0 = router.status.lost, router.status.bridged
    for i = 1, 5000 do sdk.api("src").post(src_room, "carol", tostring(i)) end
    wait_until("5000 copies arrive", function() return router.status.bridged - bridged0 >= 5000 end, 60000)
    segue.wait(100)
    off()
    assert.are.equal(5000, #got)
    for i = 1, 5000 do
      if got[i] ~= tostring(i) then error(("copy %d reads %q"):format(i, got[i])) end
    end
    assert.are.equal(0, echoes)
    assert.are.equal(lost0, router.status.lost)
  end)
end)

describe("reloading the rules", function()
  it("runs nothing when the files and backends are unchanged, and runs a changed file", function()
    local rules = require "segue.rules"
    local calls, orig = 0, rules.load
    rules.load = function(...) calls = calls + 1 return orig(...) end
    local path = file("reload.lua", 'return { bridge { "src:#r1", "dst:#r1" } }')
    local backends = { src = true, gated = true, dst = true }
    assert(router.load(path, backends))
    local loads = router.status.loads
    assert.are.equal(1, calls)
    assert(router.load(path, backends))
    assert.are.equal(1, calls)                      -- unchanged: nothing ran
    assert.are.equal(loads + 1, router.status.loads)  -- and it counts as a load
    file("reload.lua", 'return { bridge { "src:#r1", "dst:#r2" } }')
    assert(router.load(path, backends))
    assert.are.equal(2, calls)                      -- changed: loaded again
    assert(router.load(path, { src = true, dst = true }))
    assert.are.equal(3, calls)                      -- other backends: checked again
    rules.load = orig
    wait_until("the new rooms resolve", function() return router.ready() end)
  end)

  -- A reload runs with the collector stopped: garbage the rules make is
  -- collected when their memory budget is reached instead of counting
  -- against it, and the collector runs again after any outcome.
  it("lets the rules make more garbage than their memory budget, and restarts the collector", function()
    local rules = require "segue.rules"
    local backends = { src = true, dst = true }
    local path = file("garbage.lua", ([[
      for i = 1, %d do local s = ("x"):rep(4 * 1024 * 1024) .. i end
      return { bridge { "src:#g1", "dst:#g1" } }
    ]]):format(2 * rules.MAX_MEMORY // (8 * 1024 * 1024)))
    assert(router.load(path, backends))
    assert.is_true(collectgarbage("isrunning"))
    assert.are.equal("src:#g1", router.bridges()[1].endpoints[1].key)
    -- live memory past the budget still fails, and the collector runs again
    file("garbage.lua", [[
      local t = {}
      for i = 1, 24 do t[i] = ("x"):rep(4 * 1024 * 1024) .. i end
      return { bridge { "src:#g2", "dst:#g2" } }
    ]])
    local ok, err = router.load(path, backends)
    assert.is_nil(ok)
    assert.matches("used more than its memory budget", err)
    assert.is_true(collectgarbage("isrunning"))
    assert.are.equal("src:#g1", router.bridges()[1].endpoints[1].key)
    -- a collector stopped by the caller stays stopped
    collectgarbage("stop")
    file("garbage.lua", 'return { bridge { "src:#g1", "dst:#g1", name = "g" } }')
    local loaded = router.load(path, backends)
    local running = collectgarbage("isrunning")
    collectgarbage("restart")
    assert.is_true(loaded)
    assert.is_false(running)
    wait_until("the rooms resolve", function() return router.ready() end)
  end)
end)

describe("reloading one bridge of many", function()
  local backends = { src = true, gated = true, dst = true }
  local function by_name()
    local t = {}
    for _, b in ipairs(router.bridges()) do t[b.name] = b end
    return t
  end
  -- what dst receives in `name` from now on (plain text)
  local function dst_texts(name)
    local dst_room, got = room("dst", name), {}
    local off = segue.on("update", function(backend, u)
      if backend == "dst" and u.type == "MessageUpsert" and u.value.recipient == dst_room then
        got[#got + 1] = router.plain(u.value.content)
      end
    end)
    return got, off
  end

  it("keeps the bridges that did not change, with their copies in flight, and routes the changed one anew", function()
    local path = file("incr.lua", [[return {
      bridge { name = "a", "src:#i1", "gated:#i1" },
      bridge { name = "b", "src:#i2", "dst:#i2" },
      bridge { "src:#i3", "dst:#i3" },
    }]])
    assert(router.load(path, backends))
    wait_until("the rooms resolve", router.ready)
    local before = by_name()
    local gated = sdk.api("gated")
    gated.stuck = true
    local sent0, lost0, bridged0 = #gated.got, router.status.lost, router.status.bridged
    local i1 = room("src", "#i1")
    for i = 1, 3 do sdk.api("src").post(i1, "dan", "in flight " .. i) end
    wait_until("three copies wait in gated", function() return #gated.got == sent0 + 3 end)
    file("incr.lua", [[return {
      bridge { name = "a", "src:#i1", "gated:#i1" },
      bridge { name = "b", "src:#i2", "dst:#i2", format = "[{sender}] " },

      bridge { "src:#i3", "dst:#i3" },
    }]])
    assert(router.load(path, backends))
    local after = by_name()
    assert.are.equal(before.a, after.a)              -- the same objects
    assert.are.equal(before.bridge3, after.bridge3)
    assert.are.equal(dir .. "/incr.lua:5", after.bridge3.where)  -- where it is now
    assert.are_not.equal(before.b, after.b)
    assert.are.equal("[{sender}] ", after.b.format)
    gated.unstick()
    wait_until("the copies in flight complete", function() return router.status.bridged >= bridged0 + 3 end)
    assert.are.equal(lost0, router.status.lost)
    local got, off = dst_texts("#i2")
    local got3, off3 = dst_texts("#i3")
    sdk.api("src").post(room("src", "#i2"), "erin", "changed")
    sdk.api("src").post(room("src", "#i3"), "erin", "kept")
    wait_until("both copies arrive", function() return #got == 1 and #got3 == 1 end)
    off() off3()
    assert.are.same({ "[erin] changed" }, got)
    assert.are.same({ "<erin@src> kept" }, got3)
  end)

  it("drops the routes of a removed bridge and adds those of a new one", function()
    local path = file("incr2.lua", [[return {
      bridge { name = "a", "src:#j1", "dst:#j1" },
      bridge { name = "b", "src:#j2", "dst:#j2" },
    }]])
    assert(router.load(path, backends))
    wait_until("the rooms resolve", router.ready)
    local before = by_name()
    -- route through b once, so its routes are computed, then remove it
    local got2, off2 = dst_texts("#j2")
    sdk.api("src").post(room("src", "#j2"), "fay", "one")
    wait_until("b bridges", function() return #got2 == 1 end)
    file("incr2.lua", [[return {
      bridge { name = "a", "src:#j1", "dst:#j1" },
      bridge { name = "c", "src:#j3", "dst:#j3", format = "{bridge}: " },
    }]])
    assert(router.load(path, backends))
    local after = by_name()
    assert.are.equal(before.a, after.a)
    assert.is_nil(after.b)
    wait_until("the new room resolves", router.ready)
    local got1, off1 = dst_texts("#j1")
    local got3, off3 = dst_texts("#j3")
    sdk.api("src").post(room("src", "#j2"), "fay", "two")
    sdk.api("src").post(room("src", "#j1"), "fay", "kept")
    sdk.api("src").post(room("src", "#j3"), "fay", "new")
    wait_until("a and c bridge", function() return #got1 == 1 and #got3 == 1 end)
    segue.wait(50)
    off1() off2() off3()
    assert.are.same({ "<fay@src> one" }, got2)      -- nothing through the removed bridge
    assert.are.same({ "<fay@src> kept" }, got1)
    assert.are.same({ "c: new" }, got3)
  end)

  it("names unnamed bridges by their new position when one is added before them", function()
    local path = file("incr3.lua", [[return {
      bridge { "src:#k1", "dst:#k1", format = "{bridge}: " },
      bridge { "src:#k2", "dst:#k2", format = "{bridge}: " },
    }]])
    assert(router.load(path, backends))
    wait_until("the rooms resolve", router.ready)
    local got, off = dst_texts("#k2")
    sdk.api("src").post(room("src", "#k2"), "gil", "before")
    wait_until("a copy", function() return #got == 1 end)
    file("incr3.lua", [[return {
      bridge { "src:#k0", "dst:#k0", format = "{bridge}: " },
      bridge { "src:#k1", "dst:#k1", format = "{bridge}: " },
      bridge { "src:#k2", "dst:#k2", format = "{bridge}: " },
    }]])
    assert(router.load(path, backends))
    local names = {}
    for i, b in ipairs(router.bridges()) do names[i] = b.name .. "=" .. b.endpoints[1].room end
    assert.are.same({ "bridge1=#k0", "bridge2=#k1", "bridge3=#k2" }, names)
    wait_until("the rooms resolve", router.ready)
    sdk.api("src").post(room("src", "#k2"), "gil", "after")
    wait_until("a second copy", function() return #got == 2 end)
    off()
    assert.are.same({ "bridge2: before", "bridge3: after" }, got)
  end)

  it("keeps each bridge's place through reloads that change some in place, move or reorder them", function()
    -- what a reload keeps of the positions (router.lua's at_name, at_bridge)
    -- must follow every step. Every bridge carries src:#all to a room of
    -- its own, so each reload re-indexes src:#all from the bridges kept and
    -- the new ones: a bridge whose place was lost would get no copy.
    local function rules_of(names)
      local lines = { "return {" }
      for _, n in ipairs(names) do
        lines[#lines + 1] = ('  bridge { name = "%s", "src:#all", "dst:#n%s", format = "{bridge}: " },'):format(n, n)
      end
      lines[#lines + 1] = "}"
      return table.concat(lines, "\n")
    end
    local path = file("incr5.lua", rules_of { "p", "q", "r", "s" })
    assert(router.load(path, backends))
    wait_until("the rooms resolve", router.ready)
    local all = room("src", "#all")
    local steps = {
      { "p", "q2", "r", "s" },      -- one replaced in place
      { "p", "q", "r", "t" },       -- a name given back, another replaced
      { "p", "q", "t", "u" },       -- t moves up, r goes, u comes
      { "o", "p", "q", "t", "u" },  -- one inserted first: every place moves
      { "o", "p", "q3", "t", "u" }, -- in place again
      { "p", "o", "q3", "t", "u" }, -- two swapped: the index is built anew
      { "p", "o", "q3", "t", "v" }, -- in place again
    }
    for i, names in ipairs(steps) do
      local step = "step " .. i
      local before = {}
      for _, b in ipairs(router.bridges()) do before[b.name] = b end
      file("incr5.lua", rules_of(names))
      assert(router.load(path, backends))
      wait_until(step .. ": the rooms resolve", router.ready)
      local got = {}
      for j, b in ipairs(router.bridges()) do
        got[j] = b.name
        if before[b.name] then assert.are.equal(before[b.name], b, step .. ": " .. b.name .. " kept") end
      end
      assert.are.same(names, got, step)
      local texts, offs = {}, {}
      for j, n in ipairs(names) do texts[j], offs[j] = dst_texts("#n" .. n) end
      sdk.api("src").post(all, "ivy", step)
      wait_until(step .. ": a copy through each bridge", function()
        for j = 1, #names do if #texts[j] == 0 then return false end end
        return true
      end)
      segue.wait(20)
      for j, n in ipairs(names) do
        offs[j]()
        assert.are.same({ n .. ": " .. step }, texts[j], step)
      end
    end
  end)

  it("refuses a bridge renamed in place to the name of another, and keeps the others when renamed anew", function()
    local path = file("incr5.lua", [[return {
      bridge { name = "a", "src:#n1", "dst:#n1" },
      bridge { "src:#n2", "dst:#n2" },
      bridge { name = "c", "src:#n3", "dst:#n3" },
    }]])
    assert(router.load(path, backends))
    local before = by_name()
    file("incr5.lua", [[return {
      bridge { name = "a", "src:#n1", "dst:#n1" },
      bridge { name = "c", "src:#n2", "dst:#n2" },
      bridge { name = "c", "src:#n3", "dst:#n3" },
    }]])
    local ok, err = router.load(path, backends)
    assert.is_nil(ok)
    assert.matches("incr5.lua:4: duplicate bridge name c", err, 1, true)
    file("incr5.lua", [[return {
      bridge { name = "a", "src:#n1", "dst:#n1" },
      bridge { "src:#n2", "dst:#n2" },
      bridge { name = "bridge2", "src:#n3", "dst:#n3" },
    }]])
    ok, err = router.load(path, backends)
    assert.is_nil(ok)
    assert.matches("incr5.lua:4: duplicate bridge name bridge2", err, 1, true)
    file("incr5.lua", [[return {
      bridge { name = "a", "src:#n1", "dst:#n1" },
      bridge { name = "b", "src:#n2", "dst:#n2" },
      bridge { name = "c", "src:#n3", "dst:#n3" },
    }]])
    assert(router.load(path, backends))
    local after = by_name()
    assert.are.equal(before.a, after.a)
    assert.are.equal(before.c, after.c)
    assert.are_not.equal(before.bridge2, after.b)
    assert.is_nil(after.bridge2)
  end)

  it("keeps the running rules, objects and routes when a reload fails", function()
    local path = file("incr4.lua", [[return {
      bridge { name = "a", "src:#l1", "dst:#l1" },
      bridge { name = "b", "src:#l2", "dst:#l2" },
    }]])
    assert(router.load(path, backends))
    wait_until("the rooms resolve", router.ready)
    local before = by_name()
    file("incr4.lua", [[return {
      bridge { name = "a", "src:#l1", "dst:#l1" },
      bridge { name = "b", "src:#l2", "ghost:#l2" },
    }]])
    local ok, err = router.load(path, backends)
    assert.is_nil(ok)
    assert.matches("no backend named ghost", err)
    local after = by_name()
    assert.are.equal(before.a, after.a)
    assert.are.equal(before.b, after.b)
    local got, off = dst_texts("#l2")
    sdk.api("src").post(room("src", "#l2"), "hal", "still")
    wait_until("the old bridge b still bridges", function() return #got == 1 end)
    off()
    assert.are.same({ "<hal@src> still" }, got)
  end)
end)

teardown(function() os.execute("rm -rf " .. dir) end)
