-- The router's compiled path (runtime/flubber/route.c): plain messages of a
-- room whose bridges are all plain are carried in C, and must read, count
-- and behave exactly as router.lua would carry them: in order under load,
-- with provenance, without echoes, edits and deletes following the origin,
-- a reload swapping the table without losing copies in flight, and
-- everything else (formatting, attachments, long texts, another update
-- listener) falling back to Lua.
local segue = require "segue"
local router = require "segue.router"
local sdk = require "segue.backend_sdk"

local support = require "support"
local dir, file = support.scratch()

-- A chat service that keeps each copy it is sent and announces it as a
-- new message, as real services do (without extra: only the store can
-- tell it is a copy); say/edit/delete act as its users.
file("echo.lua", [[
local backend = ...
backend.got = {}
function backend.say(room, sender, text, id, t, content, attachments)
  backend:emit { type = "MessageUpsert", value = { id = id, sender = sender, recipient = room,
    content = content or { type = "Text", value = text }, attachments = attachments or {},
    create_time = 1, edit_time = t or 1 } }
end
function backend.delete(id) backend:emit { type = "MessageDelete", value = id } end
return {
  RoomLookup = function(name) return name end,
  RoomJoin = function() return true end,
  MessageSend = function(msg)
    local n = #backend.got + 1
    local id = "copy" .. n
    backend.got[n] = { text = require("segue.router").plain(msg.content), extra = msg.extra,
      room = msg.recipient, id = id, attachments = #msg.attachments }
    backend:emit { type = "MessageUpsert", value = { id = id, sender = "bridge", recipient = msg.recipient,
      content = msg.content, attachments = msg.attachments, create_time = 2, edit_time = 2 } }
    return id
  end,
}
]])

local function wait_until(what, cond, ms) support.wait_until(what, cond, ms or 20000) end

for _, name in ipairs { "a", "b" } do
  assert(segue.add_backend(name, { script = dir .. "/echo.lua" }))
end
wait_until("the backends run", function()
  return (segue.backend("a"):info() or {}).state == "running" and (segue.backend("b"):info() or {}).state == "running"
end)
local db = assert(require("segue.store").open(dir .. "/segue.db"))
router.set_store(db)
router.install()
local rules = file("rules.lua", [[return {
  bridge { "a:#x", "b:#x", deletes = "notice" },
}]])
assert(router.load(rules, { a = true, b = true }))
wait_until("the rooms resolve", function() return router.ready() end)
segue.await(function() segue.sleep(20) end)  -- the table fills on the next turn

local a, b = sdk.api("a"), sdk.api("b")

-- Messages carried by C since `c0`, once the counters of the turn drained.
local function compiled_since(c0)
  segue.await(function() segue.sleep(5) end)
  return router.status.compiled - c0
end

describe("the compiled path", function()
  it("carries a burst complete and in order, with provenance and no echo bridged back", function()
    local c0, lost0, bridged0 = router.status.compiled, router.status.lost, router.status.bridged
    local n = 3000
    for i = 1, n do a.say("#x", "alice", tostring(i), "burst" .. i) end
    wait_until("the copies arrive", function() return router.status.bridged - bridged0 >= n end, 60000)
    assert.are.equal(n, #b.got)
    for i = 1, n do
      local g = b.got[i]
      if g.text ~= "<alice@a> " .. i then error(("copy %d reads %q"):format(i, g.text)) end
      assert.are.same({ backend = "a", id = "burst" .. i }, g.extra.segue_origin)
    end
    assert.are.equal(0, #a.got)                    -- b's echoes were recognised, not bridged back
    assert.are.equal(n, compiled_since(c0))        -- and C carried every message
    assert.are.equal(lost0, router.status.lost)
    local ob, oid = db:map_origin("b", b.got[n].id)
    assert.are.same({ "a", "burst" .. n }, { ob, oid })
    local logged = db:messages("a", "#x", 1)
    assert.are.equal("burst" .. n, logged[1].id)   -- the message log has the origin
    local counters = require("segue.flow").counters()
    assert.is_true(counters.bridges.bridge1.sent >= n)
    assert.is_true(counters.backends.a["in"] >= n)
  end)

  it("sends edits and deletes after their compiled origin, once", function()
    local before = #b.got
    a.say("#x", "alice", "first", "e1", 1)
    wait_until("the copy", function() return #b.got == before + 1 end)
    a.say("#x", "alice", "second", "e1", 5)       -- an edit: edit_time moved
    wait_until("the edit", function() return #b.got == before + 2 end)
    a.say("#x", "alice", "second", "e1", 5)       -- a replay of the edit: nothing
    a.say("#x", "alice", "first", "e1", 1)        -- nor of the original
    a.delete("e1")                                -- a notice where each of its two copies is
    wait_until("the delete notices", function() return #b.got >= before + 4 end)
    segue.await(function() segue.sleep(50) end)
    assert.are.same({ "<alice@a> first", "(edited) <alice@a> second",
      "(a bridged message was deleted)", "(a bridged message was deleted)" },
      { b.got[before + 1].text, b.got[before + 2].text, b.got[before + 3].text, b.got[before + 4].text })
    assert.are.equal(before + 4, #b.got)
    assert.are.equal(0, #a.got)
  end)

  it("swaps the table on reload without losing or reordering copies in flight", function()
    local before, lost0, bridged0 = #b.got, router.status.lost, router.status.bridged
    for i = 1, 1500 do a.say("#x", "carol", tostring(i), "r" .. i) end
    -- still in flight: the new rules take over at once
    file("rules.lua", [[return {
  bridge { "a:#x", "b:#x", format = "[{sender}] " },
}]])
    assert(router.load(rules, { a = true, b = true }))
    for i = 1501, 2000 do a.say("#x", "carol", tostring(i), "r" .. i) end
    segue.await(function() segue.sleep(20) end)  -- now compiled again
    local c0 = router.status.compiled
    for i = 2001, 3000 do a.say("#x", "carol", tostring(i), "r" .. i) end
    wait_until("the copies arrive", function() return router.status.bridged - bridged0 >= 3000 end, 60000)
    assert.are.equal(before + 3000, #b.got)
    for i = 1, 3000 do
      local want = (i <= 1500 and "<carol@a> " or "[carol] ") .. i
      local got = b.got[before + i].text
      if got ~= want then error(("copy %d reads %q, expected %q"):format(i, got, want)) end
    end
    assert.are.equal(1000, compiled_since(c0))
    assert.are.equal(lost0, router.status.lost)
    assert.are.equal(0, #a.got)
  end)

  it("leaves formatting, attachments, long texts and other listeners to Lua", function()
    local before, c0 = #b.got, router.status.compiled
    a.say("#x", "dan", nil, "f1", 1, { type = "Bold", value = { type = "Text", value = "loud" } })
    a.say("#x", "dan", "with a file", "f2", 1, nil, { { mime = "text/plain", data = "aGk=" } })
    a.say("#x", "dan", ("word "):rep(1000), "f3", 1)  -- over the default 4000 characters: split
    local seen = 0
    local off = segue.on("update", function() seen = seen + 1 end)
    a.say("#x", "dan", "watched", "f4", 1)
    wait_until("the copies", function() return #b.got >= before + 5 end)
    off()
    assert.are.equal("[dan] *loud*", b.got[before + 1].text)
    assert.are.equal(1, b.got[before + 2].attachments)
    assert.is_true(#b.got[before + 3].text < 4000)
    assert.are.equal("[dan] watched", b.got[before + 5].text)
    assert.is_true(seen >= 1)                       -- the other listener saw it
    assert.are.equal(0, compiled_since(c0))
    a.say("#x", "dan", "plain again", "f5", 1)
    wait_until("the copy", function() return b.got[#b.got].text == "[dan] plain again" end)
    assert.are.equal(1, compiled_since(c0))
  end)
end)

describe("reloading one bridge of many", function()
  it("keeps the other rooms compiled and carries the changed one with its new rules at once", function()
    file("rules.lua", [[return {
  bridge { "a:#x", "b:#x", format = "x: " },
  bridge { "a:#y", "b:#y", format = "y: " },
}]])
    assert(router.load(rules, { a = true, b = true }))
    wait_until("the rooms resolve", function() return router.ready() end)
    segue.await(function() segue.sleep(20) end)
    file("rules.lua", [[return {
  bridge { "a:#x", "b:#x", format = "x: " },
  bridge { "a:#y", "b:#y", format = "Y! " },
}]])
    local before, c0 = #b.got, router.status.compiled
    assert(router.load(rules, { a = true, b = true }))
    a.say("#x", "eve", "kept", "k1")              -- the same turn as the reload
    a.say("#y", "eve", "changed", "k2")
    wait_until("the copies", function() return #b.got >= before + 2 end)
    assert.are.same({ "x: kept", "Y! changed" }, { b.got[before + 1].text, b.got[before + 2].text })
    assert.are.equal(1, compiled_since(c0))        -- #x stayed compiled, #y went through Lua
    a.say("#y", "eve", "again", "k3")
    wait_until("the copy", function() return #b.got >= before + 3 end)
    assert.are.equal("Y! again", b.got[before + 3].text)
    assert.are.equal(2, compiled_since(c0))        -- #y compiled again with its new format
  end)
end)

teardown(function() os.execute("rm -rf " .. dir) end)
