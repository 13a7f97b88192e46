--- segue.flow: what the router carried, for people watching it.
---
--- Counters per backend and per bridge (messages in, copies sent, copies
--- failed, messages dropped by a filter or rewrite, copies degraded to fit
--- their destination), published by `segue status`; the live event stream
--- of `segue watch`; and the info line when a bridge first carries a
--- message.
---
--- The router calls the four hooks below. They cost a table lookup and an
--- increment per call; an event table is built only while a `segue watch`
--- is attached (M.watching).
---
--- How `segue watch` gets the events: through the store (data_dir/segue.db),
--- which both processes already open. The watcher writes the time into the
--- kv key "watch.alive" every second; while that is less than 10 s old the
--- running segue collects events and writes them, every 100 ms, as one
--- batch "watch.batch.<seq % RING>" (a JSON object { seq, events }) and the
--- newest seq as "watch.seq". The watcher polls "watch.seq" and prints each
--- batch it has not seen; a batch overwritten before it was read is
--- reported as missed. With nobody watching nothing is written.
---
--- On a shared store (several instances on one PostgreSQL, docs/scaling.md)
--- the kv table is the database's: every instance reads the heartbeat, the
--- one running the backends (the only one the router gives events to)
--- answers it and writes the batches, numbering them after the newest
--- "watch.seq" in the store, so the numbers go on when another instance
--- takes the backends over.
local M = {}

M.RING = 64
-- The heartbeat is in whole seconds and a watcher on a loaded machine can
-- be late by seconds (3 s lost the events of such a stall, silently).
M.ALIVE_MS = 10000

local backends, bridges = {}, {}
M.backends, M.bridges = backends, bridges
M.watching = false
M.dirty = false       -- a counter moved since the status was last written

local pending = {}    -- events not written yet (only while watching)

local function counter(t, name)
  local c = t[name]
  if not c then
    c = { ["in"] = 0, sent = 0, failed = 0, dropped = 0, degraded = 0 }
    t[name] = c
  end
  return c
end

local function plain(content)
  return require("segue.router").plain(content)
end

local function event(e)
  e.time = os.time()
  pending[#pending + 1] = e
end

--- arrived(backend, room, msg): a new message from `backend` in `room`
--- (room is nil when no rule names it).
function M.arrived(backend, room, msg)
  local c = counter(backends, backend)
  c["in"] = c["in"] + 1
  M.dirty = true
  if M.watching then
    event { kind = "in", backend = backend, room = room or msg.recipient, sender = msg.sender,
      text = plain(msg.content), id = msg.id }
  end
end

--- entered(bridge): a message entered `bridge` (before its filter).
function M.entered(bridge)
  local c = counter(bridges, bridge.name)
  c["in"] = c["in"] + 1
end

--- dropped(bridge, backend, room, msg [, why]): the bridge's filter or
--- rewrite (or its error, with fallback "drop") kept the message.
function M.dropped(bridge, backend, room, msg, why)
  local c = counter(bridges, bridge.name)
  c.dropped = c.dropped + 1
  c = counter(backends, backend)
  c.dropped = c.dropped + 1
  M.dirty = true
  if M.watching then
    event { kind = "dropped", backend = backend, room = room, sender = msg.sender,
      text = plain(msg.content), bridge = bridge.name, outcome = why or "filtered" }
  end
end

--- degraded(bridge, backend, what): a copy to `backend` was adapted to what
--- it can carry (what: "edit", "formatting", "length", "attachment").
function M.degraded(bridge, backend, what)
  local c = counter(bridges, bridge.name)
  c.degraded = c.degraded + 1
  c = counter(backends, backend)
  c.degraded = c.degraded + 1
  local k = "degraded_" .. what
  c[k] = (c[k] or 0) + 1
  M.dirty = true
end

--- copied(bridge, origin_backend, msg, dest_backend, room, content, err):
--- a copy was sent (err nil) or failed (err says why).
function M.copied(bridge, origin, msg, dest, room, content, err)
  local b = counter(bridges, bridge.name)
  local d = counter(backends, dest)
  if err then
    b.failed, d.failed = b.failed + 1, d.failed + 1
  else
    if b.sent == 0 then
      require("segue").log.info(("bridge %s carried its first message: %s -> %s:%s")
        :format(bridge.name, origin, dest, room))
    end
    b.sent, d.sent = b.sent + 1, d.sent + 1
  end
  M.dirty = true
  if M.watching then
    event { kind = err and "failed" or "sent", backend = dest, room = room, from = origin,
      sender = msg.sender, text = plain(content), bridge = bridge.name, outcome = err or "ok" }
  end
end

--- add(by_backend, by_bridge): what the router's C path carried since it
--- last said, { name = { in =, sent =, first_origin =, first_dest =,
--- first_room = } } (first_*: its first copy sent, for the info line).
function M.add(by_backend, by_bridge)
  for name, d in pairs(by_backend) do
    local c = counter(backends, name)
    c["in"], c.sent = c["in"] + d["in"], c.sent + d.sent
    M.dirty = true
  end
  for name, d in pairs(by_bridge) do
    local c = counter(bridges, name)
    if c.sent == 0 and d.sent > 0 and d.first_origin then
      require("segue").log.info(("bridge %s carried its first message: %s -> %s:%s")
        :format(name, d.first_origin, d.first_dest, d.first_room))
    end
    c["in"], c.sent = c["in"] + d["in"], c.sent + d.sent
    M.dirty = true
  end
end

--- counters(): { backends = {...}, bridges = {...} } for `segue status`.
function M.counters()
  M.dirty = false
  return { backends = backends, bridges = bridges }
end

--- reset(): forget every counter (tests).
function M.reset()
  for k in pairs(backends) do backends[k] = nil end
  for k in pairs(bridges) do bridges[k] = nil end
end

-- Runs fn every ms in a coroutine (the store may answer asynchronously: on
-- PostgreSQL a call yields), never two at once; an error is logged.
local function every(ms, fn)
  local loop = require "segue.loop"
  local busy = false
  return loop.timer(ms, ms, function()
    if busy then return end
    busy = true
    require("segue").spawn(function()
      local ok, err = pcall(fn)
      busy = false
      if not ok then require("segue.core").log("warn", "watch: " .. tostring(err)) end
    end)
  end)
end

--- publish(db): in a running segue, writes the events while someone watches.
function M.publish(db)
  local json = require "segue.json"
  local segue = require "segue"
  local acked
  local check = every(250, function()
    local alive = tonumber(db:kv_get("watch.alive") or "")
    local was = M.watching
    M.watching = alive ~= nil and os.time() * 1000 - alive < M.ALIVE_MS
    if was and not M.watching then pending = {} end
    -- The router carries messages in C only while nobody watches: told
    -- before the watcher hears it is heard, so it misses nothing.
    if was ~= M.watching and M.on_watching then M.on_watching(M.watching) end
    -- tells the watcher it is heard; on a shared store only the instance
    -- running the backends does (the others have nothing to show)
    local routes = db:engine() ~= "postgresql" or require("segue.shared_state").held()
    if M.watching and routes and alive ~= acked then
      acked = alive
      db:kv_set("watch.ack", tostring(alive))
    end
  end)
  local flush = every(100, function()
    if #pending == 0 then return end
    local events = pending
    pending = {}
    -- after the newest batch in the store, whoever wrote it
    local seq = (tonumber(db:kv_get("watch.seq") or "") or 0) + 1
    local batch = { seq = seq, events = events }
    db:kv_set("watch.batch." .. seq % M.RING, json.encode(batch))
    db:kv_set("watch.seq", tostring(seq))
  end)
  segue.on("stopping", function() check:stop() flush:stop() M.watching = false end)
end

-- segue watch ----------------------------------------------------------------

local function clock(s) return os.date("!%H:%M:%S", s) end

local function one_line(s)
  s = tostring(s or ""):gsub("[%c]", " ")
  return s
end

--- format(event) -> the line `segue watch` prints for it.
function M.format(e)
  local t = clock(math.tointeger(e.time) or 0)  -- UTC, like the log
  if e.kind == "in" then
    return ("%s  in      %s:%s  <%s> %s"):format(t, e.backend, one_line(e.room), one_line(e.sender), one_line(e.text))
  elseif e.kind == "dropped" then
    return ("%s  dropped %s:%s  <%s> %s  bridge=%s  %s"):format(t, e.backend, one_line(e.room),
      one_line(e.sender), one_line(e.text), e.bridge, one_line(e.outcome))
  end
  return ("%s  %-7s %s:%s  %s  bridge=%s from=%s  %s"):format(t, e.kind, e.backend, one_line(e.room),
    one_line(e.text), e.bridge, e.from, one_line(e.outcome))
end

--- watch(cfg [, out]) -> true | nil, err: `segue watch`: prints events
--- as they come, until the process is stopped.
function M.watch(cfg, out)
  out = out or io.stdout
  local store = require "segue.store"
  local json = require "segue.json"
  local loop = require "segue.loop"
  local segue = require "segue"
  local data_dir = cfg.data_dir
  local opts = require("segue.config").store_options(cfg)
  local shared = opts.engine == "postgresql"
  if opts.engine == "sqlite" then
    -- As `segue run` does, so the watcher can wait for a segue not started yet.
    local made, merr = require("segue.fs").mkdir_p(data_dir, tonumber("700", 8))
    if not made then return nil, merr end
  end
  local function pid()
    local f = io.open(data_dir .. "/segue.pid", "r")
    local p = f and f:read("l")
    if f then f:close() end
    return p
  end
  local failed
  segue.spawn(function()
    local db, err = store.open(opts)
    if not db then failed = err return end
    local first = os.time() * 1000
    local function alive() db:kv_set("watch.alive", tostring(os.time() * 1000)) end
    alive()
    local last = tonumber(db:kv_get("watch.seq") or "") or 0
    every(1000, alive)
    -- The header says when the running segue has seen us: from then on,
    -- nothing it carries is missed.
    local told = false
    local started = loop.now()
    local hello
    hello = every(50, function()
      if not hello then return end
      if (tonumber(db:kv_get("watch.ack") or "") or 0) >= first then
        if shared then
          io.stderr:write("watching the segue instances on the postgresql store; Ctrl-C stops\n")
        else
          io.stderr:write(("watching segue (pid %s, data in %s); Ctrl-C stops\n"):format(pid() or "?", data_dir))
        end
        hello:stop()
        hello = nil
      elseif not told and loop.now() - started > 3000 then
        told = true
        local p = not shared and pid()
        io.stderr:write(shared and "no segue instance on the postgresql store has answered yet; waiting; Ctrl-C stops\n"
          or p and ("segue (pid %s) has not answered yet; waiting\n"):format(p)
          or ("no segue is running with data in %s (no segue.pid); waiting for one; Ctrl-C stops\n"):format(data_dir))
      end
    end)
    every(100, function()
      local now = tonumber(db:kv_get("watch.seq") or "") or 0
      if now < last then last = now end  -- a new store
      for s = math.max(last + 1, now - M.RING + 1), now do
        local text = db:kv_get("watch.batch." .. s % M.RING)
        local batch = text and json.decode(text)
        if not batch or batch.seq ~= s then
          out:write("(some events were missed)\n")
        else
          for _, e in ipairs(batch.events) do out:write(M.format(e), "\n") end
        end
      end
      if now - last > M.RING then out:write(("(%d batches of events were missed)\n"):format(now - last - M.RING)) end
      last = now
      out:flush()
    end)
  end)
  loop.run()
  if failed then return nil, failed end
  return true
end

return M
