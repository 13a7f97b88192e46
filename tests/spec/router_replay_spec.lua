-- Replays after an unclean stop (router.lua, "Replays after an unclean
-- stop"; docs/routing.md): when the previous run did not stop cleanly
-- (kv `router.open` still "1"), a copy the destination's service replays
-- (extra.segue_origin) records origin -> copy, and copies of the origin's
-- replay are held per destination until its replay window closed, then
-- sent in order, each only if no copy of it is known by then. A clean
-- stop holds nothing; a destination that never replays gets everything
-- once its window timed out.
local segue = require "segue"
local router = require "segue.router"
local sdk = require "segue.backend_sdk"

local dir, file = require("support").scratch()

-- A chat service that keeps each copy it is sent (and does not announce
-- it); say() acts as its users, replay() announces a copy posted before
-- this run (with its extra, as a service replaying its history does).
file("svc.lua", [[
local backend = ...
backend.got = {}
function backend.say(room, sender, text, id)
  backend:emit { type = "MessageUpsert", value = { id = id, sender = sender, recipient = room,
    content = { type = "Text", value = text }, attachments = {}, create_time = 1, edit_time = 1 } }
end
function backend.edit(room, sender, text, id, t)
  backend:emit { type = "MessageUpsert", value = { id = id, sender = sender, recipient = room,
    content = { type = "Text", value = text }, attachments = {}, create_time = 1, edit_time = t } }
end
function backend.delete(id) backend:emit { type = "MessageDelete", value = id } end
function backend.replay(room, id, origin_backend, origin_id, text)
  backend:emit { type = "MessageUpsert", value = { id = id, sender = "bridge", recipient = room,
    content = { type = "Text", value = text }, attachments = {}, create_time = 1, edit_time = 1,
    extra = { segue_origin = { backend = origin_backend, id = origin_id } } } }
end
return {
  RoomLookup = function(name) return name end,
  RoomJoin = function() return true end,
  MessageSend = function(msg)
    local n = #backend.got + 1
    local id = ("copy%d.%s"):format(n, tostring(backend.got):match("0x%x+"))  -- unique to this run
    backend.got[n] = { text = require("segue.router").plain(msg.content), id = id,
      origin = msg.extra.segue_origin.id }
    return id
  end,
}
]])

local function wait_until(what, cond, ms)
  segue.await(function()
    while not cond() do segue.sleep(5) end
  end, ms or 20000)
  assert.is_true(cond(), what)
end
local function turn(ms) segue.await(function() segue.sleep(ms or 20) end) end

local db = assert(require("segue.store").open(dir .. "/segue.db"))
router.set_store(db)
router.install()
router.REPLAY_MS = 1500
assert(router.load(file("rules.lua", 'return { bridge { "a:#x", "b:#x" } }'), { a = true, b = true }))

-- Starts a and b (a new routing session); returns their handles.
local function start()
  for _, name in ipairs { "a", "b" } do
    assert(segue.add_backend(name, { script = dir .. "/svc.lua" }))
  end
  wait_until("the rooms resolve", function() return router.ready() end)
  return sdk.api("a"), sdk.api("b")
end
local function stop()
  for _, name in ipairs { "a", "b" } do assert(segue.remove_backend(name)) end
  wait_until("the session ends", function() return not router.replay.session end)
end
local function texts(got)
  local out = {}
  for i, g in ipairs(got) do out[i] = g.text end
  return out
end

describe("after an unclean stop", function()
  it("does not bridge again what the destination's replay shows, though its id was never recorded", function()
    assert(db:kv_set("router.open", "1"))   -- the previous run was killed
    local dedup0 = router.status.deduplicated
    local a, b = start()
    assert.is_true(router.replaying("b"))
    -- The origin replays first: m1 (its copy was posted, its id not
    -- recorded) and m2 (never copied); then the destination replays m1's copy.
    a.say("#x", "alice", "one", "m1")
    a.say("#x", "alice", "two", "m2")
    b.replay("#x", "old-copy-1", "a", "m1", "<alice@a> one")
    turn()
    assert.are.equal(0, #b.got)             -- held while b replays
    assert.are.same({ "a", "m1" }, { db:map_origin("b", "old-copy-1") })  -- learned from the replay
    wait_until("b's window closes", function() return not router.replaying("b") end)
    wait_until("the copy of m2", function() return #b.got >= 1 end)
    turn()
    assert.are.same({ "<alice@a> two" }, texts(b.got))
    assert.are.equal(dedup0 + 1, router.status.deduplicated)
    -- a message of the origin's replay that arrives after the copy was learned
    -- is recognised at once, held or not: nothing more goes out.
    a.say("#x", "alice", "one", "m1")
    turn(50)
    assert.are.equal(1, #b.got)
    stop()
  end)

  it("holds copies until the window times out when the destination never replays, then sends them in order", function()
    -- The mark of this run is still "1" (not stopped cleanly): a new session
    -- holds again.
    local compiled0 = router.status.compiled
    local a, b = start()
    assert.is_true(router.replaying("b"))
    for i = 1, 50 do a.say("#x", "alice", "held " .. i, "h" .. i) end
    turn(50)
    assert.are.equal(0, #b.got)
    assert.are.equal(compiled0, router.status.compiled)  -- nothing compiled while replaying
    wait_until("the window times out", function() return not router.replaying("b") end)
    a.say("#x", "alice", "live", "l1")      -- said after the window: behind the held ones
    wait_until("every copy", function() return #b.got >= 51 end)
    turn()
    local want = {}
    for i = 1, 50 do want[i] = "<alice@a> held " .. i end
    want[51] = "<alice@a> live"
    assert.are.same(want, texts(b.got))
    -- once released, the compiled path carries the room again
    turn(50)
    a.say("#x", "alice", "compiled", "c1")
    wait_until("the compiled copy", function() return #b.got >= 52 end)
    turn()
    assert.is_true(router.status.compiled > compiled0)
    stop()
  end)

  it("holds nothing after a clean stop", function()
    assert(db:kv_set("router.open", "0"))   -- what a clean stop leaves
    router.REPLAY_MS = 60000                -- a hold would outlast the waits below
    local a, b = start()
    assert.is_false(router.replaying("a"))
    assert.is_false(router.replaying("b"))
    a.say("#x", "alice", "at once", "n1")
    wait_until("the copy", function() return #b.got >= 1 end)
    assert.are.same({ "<alice@a> at once" }, texts(b.got))
    assert.are.equal("1", db:kv_get("router.open"))  -- this run is marked open again
    stop()
  end)
end)

describe("an edited message replayed after a restart", function()
  it("is not sent again as an edit: the log has the edit time it was bridged with", function()
    assert(db:kv_set("router.open", "0"))
    local a, b = start()
    a.say("#x", "alice", "first", "e1")
    wait_until("the copy", function() return #b.got >= 1 end)
    a.edit("#x", "alice", "second", "e1", 5)
    wait_until("the edit", function() return #b.got >= 2 end)
    -- A new run remembers no edit (its memory starts empty): fill this
    -- one's two generations with other ids, the way a restart empties it.
    local core = require "segue.core"
    for i = 1, 20001 do core.route_edit_note("other", "o" .. i, 1) end
    assert.is_nil(core.route_edit_seen("a", "e1"))
    a.edit("#x", "alice", "second", "e1", 5)   -- the service replays its history
    turn(50)
    assert.are.equal(2, #b.got)
    a.edit("#x", "alice", "third", "e1", 9)    -- a real edit still goes out
    wait_until("the new edit", function() return #b.got >= 3 end)
    assert.are.same({ "<alice@a> first", "(edited) <alice@a> second", "(edited) <alice@a> third" }, texts(b.got))
    stop()
  end)
end)

describe("a delete while its copy is held", function()
  it("sends the notice after the held copy, in order", function()
    assert(db:kv_set("router.open", "1"))
    router.REPLAY_MS = 1500
    assert(router.load(file("rules_notice.lua", 'return { bridge { "a:#x", "b:#x", deletes = "notice" } }'),
      { a = true, b = true }))
    local a, b = start()
    assert.is_true(router.replaying("b"))
    a.say("#x", "alice", "gone soon", "d1")
    a.say("#x", "alice", "stays", "d2")
    a.delete("d1")                          -- its copy is held: no id in the map yet
    turn()
    assert.are.equal(0, #b.got)
    wait_until("the window closes", function() return not router.replaying("b") end)
    wait_until("the copies and the notice", function() return #b.got >= 3 end)
    turn(50)
    assert.are.same({ "<alice@a> gone soon", "<alice@a> stays", "(a bridged message was deleted)" },
      texts(b.got))
    stop()
  end)

  it("holds the notice under the same bound as the copies", function()
    local max = router.MAX_REPLAY_HELD
    router.MAX_REPLAY_HELD = 3
    local a, b = start()
    assert.is_true(router.replaying("b"))
    a.say("#x", "alice", "gone soon", "f1")
    a.say("#x", "alice", "stays", "f2")
    local function held() local q = router.replay.held.b return q and q.tail - q.head + 1 or 0 end
    wait_until("both copies held", function() return held() == 2 end)
    assert.is_truthy(router.replay.open.b)
    a.delete("f1")                          -- the notice is the third held: the bound
    turn()
    assert.is_nil(router.replay.open.b)     -- closed early, not after REPLAY_MS
    wait_until("the copies and the notice", function() return #b.got >= 3 end)
    turn(50)
    assert.are.same({ "<alice@a> gone soon", "<alice@a> stays", "(a bridged message was deleted)" },
      texts(b.got))
    router.MAX_REPLAY_HELD = max
    stop()
    assert(router.load(dir .. "/rules.lua", { a = true, b = true }))
  end)
end)
