-- segue.postbox_core from Lua: the C delivery rules through the binding, with
-- a scripted transport on the host's loop; outcomes read back from the store.
local segue = require "segue"
local store = require "segue.store"
local core = require "segue.postbox_core"
local loop = require "segue.loop"

local paths = {}
local function fresh_db()
  local path = os.tmpname()
  os.remove(path)
  paths[#paths + 1] = path
  return assert(store.open(path))
end

teardown(function()
  for _, p in ipairs(paths) do
    for _, suffix in ipairs { "", "-wal", "-shm" } do os.remove(p .. suffix) end
  end
end)

-- A transport whose peer is down (every Push fails after a loop turn) and
-- whose handler fails `fail` times before it accepts.
local function transport(log, fail)
  return {
    push = function(_, _, done) loop.timer(1, 0, function() done("connection refused") end) end,
    deliver = function(id, ev)
      if fail > 0 then fail = fail - 1 error("handler raised") end
      log[#log + 1] = id .. ":" .. ev
      return true
    end,
  }
end

local function wait_until(pred) require("support").wait_until("the postbox's answer", pred) end

-- The methods that read or write the store answer through a callback (at
-- once on SQLite); this waits for it.
local function ask(pb, method, ...)
  local got
  local args = table.pack(...)
  args[args.n + 1] = function(...) got = table.pack(...) end
  assert(pb[method](pb, table.unpack(args, 1, args.n + 1)))
  wait_until(function() return got ~= nil end)
  return table.unpack(got, 1, got.n)
end

describe("segue.postbox_core", function()
  it("queues events for a peer that is down, in order, until a written Pull takes them", function()
    local db = fresh_db()
    local pb = assert(core.new(db, { push_tries = 2, push_backoff_ms = 1 }, transport({}, 0)))
    local acks = {}
    assert.is_true(pb:push("p.example:1", "e1", function(ok, how) acks[#acks + 1] = how end))
    wait_until(function() return #acks == 1 end)
    assert.are.same({ "queued" }, acks)
    -- the queue is not empty: queued (acknowledged once committed)
    assert.is_true(pb:push("p.example:1", "e2", function(ok, how) acks[#acks + 1] = how end))
    wait_until(function() return #acks == 2 end)
    assert.are.same({ "queued", "queued" }, acks)
    local events, batch = ask(pb, "pull_begin", "p.example:1", nil)
    assert.are.same({ "e1", "e2" }, events)
    assert.is_true(pb:pull_end(batch, false))  -- the write failed: they stay
    assert.are.equal(2, ask(pb, "peers")[1].queued)
    events, batch = ask(pb, "pull_begin", "p.example:1", nil)
    pb:pull_end(batch, true)
    wait_until(function() return ask(pb, "peers")[1].queued == 0 end)
    pb:close()
    local peer = core.peers_of(db)[1]
    assert.are.equal(0, peer.queued)
    assert.are.equal("connection refused", peer.last_error)
    assert.is_number(peer.last_served)
  end)

  it("refuses a push past the queue limit with ELIMIT and keeps the queue as it was", function()
    local db = fresh_db()
    local pb = assert(core.new(db, { push_tries = 1, queue_limit = 2 }, transport({}, 0)))
    local n = 0
    pb:push("p.example:1", "e1", function() n = n + 1 end)
    wait_until(function() return n == 1 end)
    assert.is_true(pb:push("p.example:1", "e2", function() n = n + 1 end))
    local ok, err, code = pb:push("p.example:1", "e3", function() end)
    assert.is_nil(ok)
    assert.are.equal("ELIMIT", code)
    assert.matches("queue full", err)
    wait_until(function() return n == 2 end)
    assert.are.equal(2, core.peers_of(db)[1].queued)
    pb:close()
  end)

  it("delivers a received event again after its handler raised", function()
    local db = fresh_db()
    local log = {}
    local pb = assert(core.new(db, { deliver_tries = 3, deliver_backoff_ms = 1 }, transport(log, 1)))
    assert.is_true(ask(pb, "receive", "q.example:1", { "x1", "x2" }))
    wait_until(function() return #log == 2 end)
    assert.are.same({ "q.example:1:x1", "q.example:1:x2" }, log)
    wait_until(function() return ask(pb, "peers")[1].inbox == 0 end)
    assert.are.equal(0, ask(pb, "peers")[1].inbox)
    pb:close()
  end)

  it("keeps its store open while it uses it", function()
    local db = fresh_db()
    local pb = assert(core.new(db, {}, transport({}, 0)))
    assert.has_error(function() db:close() end)
    pb:close()
    db:close()
  end)

  it("persists peer keys", function()
    local db = fresh_db()
    local pb = assert(core.new(db, {}, transport({}, 0)))
    local key = string.rep("k", 32)
    assert.is_true(pb:key_remember("k.example:1", key))
    assert.are.equal(key, (ask(pb, "key_get", "k.example:1")))
    assert.is_nil((ask(pb, "key_get", "nobody.example:1")))
    assert.has_error(function() pb:key_remember("k.example:1", "short") end)
    pb:close()
    -- persisted: a new postbox on the same store reads it
    pb = assert(core.new(db, {}, transport({}, 0)))
    assert.are.equal(key, (ask(pb, "key_get", "k.example:1")))
    pb:close()
  end)
end)
