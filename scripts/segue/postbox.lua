-- segue.postbox: Harmony federation's delivery rules for scripts
-- (docs/postbox.md). The rules themselves (one Push at a time, the durable
-- queue, the bound, Pull batches, held Pushes, redelivery) are in C
-- (segue.postbox_core); this file is the policy around them: which peers to
-- Pull and when, what an inbound event means (segue.emit "federation"), and
-- the wiring to segue.harmony.
--
--   segue.postbox.push(server_id, event [, cb]) -> "pushed" | "queued" | nil, err, code
--       event: a protocol.sync.v1.Event table. With cb: cb(how) or
--       cb(nil, err) later, and push returns true | nil, err, code. Without
--       cb, inside a coroutine: waits for the outcome. ELIMIT past queue_limit.
--   segue.postbox.peers() -> per peer queue length, inbox, times, last error
--   segue.postbox.pull(server_id) -> true | nil, err   (one Pull, now)
local core = require "segue.core"
local pbc = require "segue.postbox_core"
local harmony = require "segue.harmony"
local E = harmony.errors  -- hRPC error identifiers and statuses
local loop = require "segue.loop"
local metrics = require "segue.metrics"

local M = {}

local EVENT = "protocol.sync.v1.Event"
local SERVER_ID_KEY = "federation.server_id"

-- The delivery rules' defaults are C's (postbox_core.defaults: push_tries,
-- push_backoff_ms, queue_limit, deliver_tries, deliver_backoff_ms); the
-- Pull policy's are here.
M.defaults = {
  pull_interval_ms = 60000,     -- after the last Push from a peer
  pull_backoff_ms = 1000,       -- first retry against a peer that is down, doubled
  pull_max_bytes = 512 * 1024,  -- events per Pull response we serve
}
for k, v in pairs(pbc.defaults) do M.defaults[k] = v end

local pb          -- the segue.postbox_core object while started
local unwatch     -- removes the postbox's watcher of "federation" handlers
local opts        -- M.defaults overlaid with the config's federation keys
local timers = {} -- server_id -> the timer of its next Pull
local failures = {} -- server_id -> consecutive failed Pulls
local moved = {}    -- old server_id -> new (NotifyNewId): its Pulls end

local function segue() return require "segue" end

-- Runs fn(cb) and waits in the calling coroutine for what cb receives (cb
-- may run at once: the outcome is known without waiting).
local function wait_for(fn) return segue().call("segue.postbox", fn) end

-- pb:method(..., cb) waited for: the store answers at once (SQLite) or on
-- a later loop turn (PostgreSQL); the values cb received.
local function ask(method, ...)
  local args = table.pack(...)
  return wait_for(function(cb)
    args[args.n + 1] = cb
    local ok, err, code = pb[method](pb, table.unpack(args, 1, args.n + 1))
    if not ok then return nil, err, code end
    return true
  end)
end

-- The transport -----------------------------------------------------------------

local function transport_push(server_id, bytes, done)
  local event, err = harmony.decode(EVENT, bytes)
  if not event then return done(err) end
  local ok, cerr = harmony.call(server_id, "Push", { event = event }, function(resp, e)
    metrics.inc("segue_postbox_pushes_total", { peer = server_id, outcome = resp and "ok" or "error" })
    if resp then done() else done(tostring(e)) end
  end)
  if not ok then
    metrics.inc("segue_postbox_pushes_total", { peer = server_id, outcome = "error" })
    done(tostring(cerr))
  end
end

-- segue.emit runs each handler in its own coroutine and only logs its errors;
-- when the host offers a checked emit, a failing handler keeps the event in
-- the inbox to be delivered again.
local function transport_deliver(server_id, bytes)
  local s = segue()
  -- Nobody listens (no rules' on_federation, no script): delivered, as an
  -- emit to no handler is, without decoding it for nobody.
  if not s.listening("federation") then return true end
  local event, err = harmony.decode(EVENT, bytes)
  if not event then return nil, err end
  if s.emit_checked then return s.emit_checked("federation", server_id, event) end
  s.emit("federation", server_id, event)
  return true
end

-- Pulls ---------------------------------------------------------------------------------

local schedule_pull

-- One Pull, repeated while the peer returns events (a queue longer than one
-- response); the events are in the inbox before the next Pull asks for more.
local function pull_now(server_id)
  for _ = 1, 1000 do
    local resp, err = harmony.call(server_id, "Pull", {})
    if not resp then return nil, err end
    local events = resp.event_queue or {}
    if #events == 0 then return true end
    local list = {}
    for i, e in ipairs(events) do list[i] = assert(harmony.encode(EVENT, e)) end
    local ok, serr = ask("receive", server_id, list)
    if not ok then return nil, serr end
  end
  return true
end

local function pull_and_schedule(server_id)
  if not pb then return nil, "ECLOSING: the postbox is closed" end
  if moved[server_id] then return nil, "the peer moved to " .. moved[server_id] end
  local ok, err = pull_now(server_id)
  metrics.inc("segue_postbox_pulls_total", { peer = server_id, outcome = ok and "ok" or "error" })
  if not pb then return ok, err end
  pb:release(server_id)
  -- Renamed while this Pull ran: a note or a next Pull would bring the old
  -- id's row back (and pull a server id that is gone).
  if moved[server_id] then return ok, err end
  if ok then
    pb:note(server_id, "pulled")
    failures[server_id] = nil
    schedule_pull(server_id, opts.pull_interval_ms)
  else
    pb:note(server_id, "error", "pull: " .. tostring(err))
    local n = (failures[server_id] or 0) + 1
    failures[server_id] = n
    local delay = math.min(opts.pull_interval_ms, opts.pull_backoff_ms * 2 ^ math.min(n - 1, 20))
    schedule_pull(server_id, math.floor(delay))
  end
  return ok, err
end

local due = {}  -- server_id -> loop.now() at which its Pull is due, later than its timer

local function pull_timer_fired(server_id)
  timers[server_id] = nil
  local at = due[server_id]
  due[server_id] = nil
  -- Pushes stored in C tell `pushed` only now and then: the last one's time
  local last = pb and pb:pushed_at(server_id)
  if last and last + opts.pull_interval_ms > (at or 0) then at = last + opts.pull_interval_ms end
  if at and at > loop.now() then return schedule_pull(server_id, at - loop.now()) end
  segue().spawn(pull_and_schedule, server_id)
end

function schedule_pull(server_id, ms)
  due[server_id] = nil
  if timers[server_id] then timers[server_id]:stop() end
  timers[server_id] = loop.timer(ms, 0, function() pull_timer_fired(server_id) end)
end

-- The next Pull `ms` after this Push (the last one): a timer that is already
-- there (never due later: ms is the longest wait) is moved when it fires,
-- not made anew per Push.
local function pull_after_push(server_id, ms)
  if timers[server_id] then due[server_id] = loop.now() + ms else schedule_pull(server_id, ms) end
end

function M.pull(server_id) return pull_and_schedule(server_id) end

-- Inbound requests -----------------------------------------------------------------------

-- The key that verified an accepted request is persisted, so the next start
-- needs no fetch. Only here: a refused token (which may have made the
-- federation fetch a key) leaves nothing in the store. `persisted` remembers
-- what the store holds, so that a Push reads no key from the store.
local persisted = {}   -- server_id -> key, as stored (bounded: cleared when full)
local persisted_n = 0
local function remember_key(server_id)
  local fed = harmony.running()
  local key = fed and fed:key_get(server_id)
  if not key or persisted[server_id] == key then return end
  pb:key_remember(server_id, key)  -- a store write only when it changed
  if persisted_n >= 4096 then persisted, persisted_n = {}, 0 end
  if persisted[server_id] == nil then persisted_n = persisted_n + 1 end
  persisted[server_id] = key
end

local PUSH_RESPONSE = assert(harmony.encode("protocol.sync.v1.PushResponse", {}))

-- A Push from server_id arrived: the one place that tells the Pull policy.
-- Pushes stored in C (pb:serve_pushes, runtime/harmony/postbox_push.h) call
-- it for a peer's first Push, then at most once a second (the Pull timer
-- reads the last one's time, pb:pushed_at); on_push below for each.
local function pushed(server_id)
  moved[server_id] = nil  -- a server uses that id (again)
  if pb then pull_after_push(server_id, opts.pull_interval_ms) end
end

-- A Push on the path without pb:serve_pushes (a script's handler of "Push"
-- gave it back): what C does, in Lua. Its Event's bytes (decoded once, by
-- the federation) go into the inbox as they are; answered once they are
-- stored (durable; held while the peer's start-up Pull runs).
local function on_push(server_id, event, req)
  if not pb then return req:error(E.UNAVAILABLE.status, E.UNAVAILABLE.identifier, "the postbox is closed") end
  remember_key(server_id)
  local r, e = pb:receive_push(server_id, event, function(ok, err)
    if not ok then return req:error(E.INTERNAL.status, E.INTERNAL.identifier, tostring(err)) end
    return req:respond(PUSH_RESPONSE)
  end)
  if not r then req:error(E.INTERNAL.status, E.INTERNAL.identifier, tostring(e)) end
  pushed(server_id)
end

local function on_pull(server_id)
  if not pb then return nil, "the postbox is closed", E.UNAVAILABLE.identifier, E.UNAVAILABLE.status end
  remember_key(server_id)
  local events, batch = ask("pull_begin", server_id, opts.pull_max_bytes)
  if not events then return nil, tostring(batch), E.INTERNAL.identifier, E.INTERNAL.status end
  if not pb then return nil, "the postbox is closed", E.UNAVAILABLE.identifier, E.UNAVAILABLE.status end
  local list = {}
  for i, bytes in ipairs(events) do list[i] = assert(harmony.decode(EVENT, bytes)) end
  local function written(ok) if pb then pb:pull_end(batch, ok) end end
  if harmony.write_completion then
    -- segue.harmony calls it once the response went out whole (or not).
    return { event_queue = list }, written
  end
  -- Without write completion from segue.harmony the batch counts as written
  -- when it is handed over: see docs/postbox.md, "Known gaps".
  written(true)
  return { event_queue = list }
end

local function on_new_id(server_id, req)
  if not pb then return nil, "the postbox is closed", E.UNAVAILABLE.identifier, E.UNAVAILABLE.status end
  local new_id = req.new_server_id
  if type(new_id) ~= "string" or new_id == "" then
    return nil, "new_server_id is empty", E.BAD_UNARY.identifier, E.BAD_UNARY.status
  end
  local ok, err = ask("rename", server_id, new_id)
  if ok == nil then return nil, tostring(err), E.UNAVAILABLE.identifier, E.UNAVAILABLE.status end
  if not pb then return nil, "the postbox is closed", E.UNAVAILABLE.identifier, E.UNAVAILABLE.status end
  -- The old id's Pulls end: retried, each would add its row back.
  moved[server_id], moved[new_id] = new_id, nil
  if timers[server_id] then timers[server_id]:stop() timers[server_id] = nil end
  due[server_id], persisted[server_id], persisted[new_id] = nil, nil, nil
  failures[server_id] = nil
  local key = ask("key_get", new_id)
  local fed = harmony.running()
  if key and fed then fed:key_put(new_id, key) end
  core.log("info", "peer moved to a new server id", "peer", server_id, "new_id", new_id)
  segue().emit("federation_new_id", server_id, new_id)
  return {}
end

-- Our own id changed since the last run: tell every peer (NotifyNewId).
local function announce_new_id(db, server_id)
  local old = db:kv_get(SERVER_ID_KEY)
  if old and old ~= server_id then
    for _, p in ipairs(ask("peers") or {}) do
      -- signed as the old id: the peer knows that one (spec: NotifyNewId)
      local ok, err = harmony.call(p.server_id, "NotifyNewId", { new_server_id = server_id },
        { sign_as = old })
      if not ok then pb:note(p.server_id, "error", "NotifyNewId: " .. tostring(err)) end
    end
  end
  db:kv_set(SERVER_ID_KEY, server_id)
end

-- Life cycle ---------------------------------------------------------------------------------

local function options(cfg)
  local o = {}
  for k, v in pairs(M.defaults) do o[k] = (cfg.federation or {})[k] or v end
  return o
end

--- start(cfg, db): opens the postbox on the store `db`, takes over the
--- federation's Push, Pull and NotifyNewId handlers and Pulls from every
--- known peer, holding its Pushes until that Pull finished.
function M.start(cfg, db)
  if pb then return nil, "EEXIST: the postbox is already running", "EEXIST" end
  opts = options(cfg)
  opts.instance = cfg.instance
  opts.claim_ms = cfg.lease_ms
  local p, err, code = pbc.new(db, opts, { push = transport_push, deliver = transport_deliver })
  if not p then return nil, err, code end
  pb = p
  harmony.handle_bytes("Push", on_push)
  harmony.serve_pushes(pb, pushed)
  harmony.handle("Pull", on_pull)
  harmony.handle("NotifyNewId", on_new_id)
  local s = segue()
  -- With no handler of "federation", events are delivered without a call
  -- into Lua (see transport_deliver).
  unwatch = s.watch_handlers("federation", function(list) if pb then pb:deliver_in_lua(#list > 0) end end)
  s.on("stopping", M.stop)
  s.postbox = M
  local fed = harmony.running()
  -- Every known peer: its key for the federation, and a first Pull (its
  -- Pushes held until that Pull ran). The store may answer later.
  s.spawn(function()
    local peers = ask("peers") or {}
    for _, peer in ipairs(peers) do
      if not pb then return end
      pb:hold(peer.server_id)
      schedule_pull(peer.server_id, 0)
    end
    for _, peer in ipairs(peers) do
      if not pb then return end
      local key = ask("key_get", peer.server_id)
      if key and fed then fed:key_put(peer.server_id, key) end
    end
    if cfg.server_id and fed then announce_new_id(db, cfg.server_id) end
  end)
  return true
end

function M.stop()
  if not pb then return end
  for id, t in pairs(timers) do t:stop() timers[id] = nil end
  moved, due, persisted, persisted_n = {}, {}, {}, 0
  harmony.serve_pushes(nil)
  if unwatch then unwatch() unwatch = nil end
  local p = pb
  pb = nil
  p:close()
end

function M.running() return pb ~= nil end

function M.push(server_id, event, cb)
  assert(type(server_id) == "string", "server_id must be a string")
  assert(type(event) == "table", "event must be a protocol.sync.v1.Event table")
  if not pb then return nil, "ECLOSING: the postbox is not running", "ECLOSING" end
  local bytes, err, code = harmony.encode(EVENT, event)
  if not bytes then return nil, err, code end
  local function start(done)
    local r, e, c = pb:push(server_id, bytes, function(ok, how)
      if ok then done(how) else done(nil, how) end
    end)
    if not r then return nil, e, c end
    return true
  end
  if cb then return start(cb) end
  return wait_for(start)
end

function M.peers()
  if not pb then return {} end
  return ask("peers")
end

return M
