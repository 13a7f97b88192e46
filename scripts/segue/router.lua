-- The router: carries messages between backends according to the rules
-- (scripts/segue/rules.lua), records every copy in the store so echoes and
-- edits are recognised (also after a restart), and swaps rule sets on reload
-- only once the new set loaded, validated and passed its self-test.
--
-- Protocol limits shape edits and deletes: the backend protocol has no
-- "edit" or "delete" request, so an edit of a bridged message is re-sent as a
-- new message marked "(edited)" (bridge option edits = "resend", the default)
-- or ignored (edits = "ignore"); a delete is ignored (deletes = "ignore",
-- default) or announced as a notice (deletes = "notice").
local segue = require "segue"
local rules = require "segue.rules"
local flow = require "segue.flow"   -- counters and `segue watch`: the hooks below
local degrade = require "segue.degrade"  -- each copy fit to its destination: one hook, in deliver

local M = {}

local current          -- the active rule set
local index = {}       -- backend -> room name -> { {bridge, endpoint}, ... }
local room_ids = {}    -- backend -> room name -> room id
local room_names = {}  -- backend -> room id -> room name
local pending = {}     -- backend -> room name -> true: rooms of the index not in room_ids
local loop_now = require("segue.loop").now
local unresolved = {}  -- "backend\0room" -> copies waiting for that room to resolve
M.MAX_WAITING = 1000   -- copies kept per room that is not resolved yet
-- The bookkeeping of copies in flight, held updates, flow control and the
-- edits seen lives in C (segue.core route_*, runtime/flubber/route.h), which
-- also carries the messages of compiled rooms (see "Compiled routes"); these
-- bounds are its, and setting one here sets it there.
local limits = {
  MAX_IN_FLIGHT = 10000, -- copies in flight to one backend; beyond, copies are lost (counted)
  MAX_HELD = 100000,     -- updates of one backend waiting for sends to it
  PAUSE_AT = 2000,       -- copies in flight to one backend that pause the backends feeding it
  PAUSE_MS = 1000,       -- a source is paused at most this long at a time
  EDITS_KEPT = 10000,    -- the edits seen: between this and twice this many ids
}
local status = { loads = 0, failures = 0, bridged = 0, lost = 0, lost_by = {}, pauses = 0, compiled = 0,
  deduplicated = 0 }
local compile_around   -- see "Compiled routes"
local compile_around_backend, extend_window  -- see "Compiled routes", "Replays after an unclean stop"
local db               -- the store (segue.store), or nil
local state = {}       -- carried from one rule set to the next

M.status = status

-- Without the store (segue.store), copies are remembered in memory only:
-- in the C core (segue.core route_mem_*), which carries compiled rooms'
-- messages with the same maps.
local core = require "segue.core"
local function memory_store()
  return {
    map_put = function(_, ob, oid, cb, cid, room) return core.route_mem_put(ob, oid, cb, cid, room) end,
    map_origin = function(_, b, id) return core.route_mem_origin(b, id) end,
    map_copies = function(_, b, id) return core.route_mem_copies(b, id) end,
    log_message = function() end,
    log_delete = function() end,
  }
end

function M.set_store(s)
  db = s or memory_store()
  -- The C path writes the store itself: only segue.store's (SQLite; on an
  -- engine answering later every message goes through Lua), or its maps.
  core.route_store(type(s) == "userdata" and s or nil)
  core.route_memory(s == nil)
end

-- The router's writes of one loop turn (message log, id maps) share one
-- transaction, committed by a zero-delay timer at the start of the next
-- turn: one commit per turn instead of two per message. Nothing is
-- acknowledged to anyone on the strength of these writes; the store commits
-- an open batch before any atomic write of others (the postbox's).
local commit_pending = false
local function commit()
  commit_pending = false
  local ok, err = db:commit()
  if not ok then segue.log.error("cannot commit the message log and id maps: " .. tostring(err)) end
end
local function batched()
  if not db.batch then return end
  db:batch()
  if not commit_pending then
    commit_pending = true
    require("segue.loop").timer(0, 0, commit)
  end
end
db = memory_store()

-- Content -----------------------------------------------------------------

local function plain(c)
  if type(c) ~= "table" then return "" end
  local v = c.value
  if c.type == "Concat" then
    local parts = {}
    for i, x in ipairs(v) do parts[i] = plain(x) end
    return table.concat(parts)
  elseif type(v) == "table" then
    return plain(v)
  end
  return tostring(v or "")
end
M.plain = plain

local function render(format, ctx)
  return (format:gsub("{(%w+)}", function(k) return tostring(ctx[k] or "") end))
end

-- The decoded size of standard base64 with padding (validated by the codec).
local function attachment_size(a)
  local data = a.data or ""
  local pad = #(data:match("=*$"))
  return #data // 4 * 3 - pad
end

-- Attachments pass within the limit; over it, a notice takes their place.
local function carry_attachments(msg, limit, notices)
  local out = {}
  for _, a in ipairs(msg.attachments or {}) do
    if attachment_size(a) <= limit then out[#out + 1] = a
    else notices[#notices + 1] = ("[attachment %s of %d bytes not bridged: over the limit of %d]")
      :format(a.mime, attachment_size(a), limit) end
  end
  return out
end

-- Index -------------------------------------------------------------------

-- build_index(set [, known]) -> index [, pending]: with known (backend ->
-- room name -> id), also the rooms of the index not in it (backend -> room
-- name -> true). Numeric loops (as ipairs) and one pass: a full rebuild of
-- 1000 bridges indexes 2000 rooms.
local NO_ROOMS = {}
local function build_index(set, known)
  local idx, pend = {}, known and {}
  local i, b = 1, set[1]
  while b do
    local eps = b.endpoints
    local j, e = 1, eps[1]
    while e do
      local backend, room = e.backend, e.room
      local per = idx[backend]
      if not per then per = {} idx[backend] = per end
      local list = per[room]
      if list then
        list[#list + 1] = { bridge = b, endpoint = e }
      else
        per[room] = { { bridge = b, endpoint = e } }
        if pend and not (known[backend] or NO_ROOMS)[room] then
          local p = pend[backend]
          if not p then p = {} pend[backend] = p end
          p[room] = true
        end
      end
      j = j + 1
      e = eps[j]
    end
    i = i + 1
    b = set[i]
  end
  return idx, pend
end

-- Where a message from (backend, room name) goes: { {bridge, endpoint}, ... }
local function targets_of(set_index, backend, room)
  local out = {}
  for _, src in ipairs((set_index[backend] or {})[room] or {}) do
    if src.endpoint.mode ~= "out" then
      for _, e in ipairs(src.bridge.endpoints) do
        if e ~= src.endpoint and e.mode ~= "in" then out[#out + 1] = { bridge = src.bridge, endpoint = e } end
      end
    end
  end
  return out
end

-- Rooms -------------------------------------------------------------------

local function resolve(backend, room)
  local b = segue.backend(backend)
  local r, err = b:request { type = "RoomLookup", value = room }
  if not r then return segue.log.warn(("cannot resolve %s:%s: %s"):format(backend, room, err)) end
  room_names[backend] = room_names[backend] or {}
  room_names[backend][r.value] = room
  local ok, jerr = b:request { type = "RoomJoin", value = r.value }
  if not ok then segue.log.warn(("cannot join %s:%s: %s"):format(backend, room, jerr))
  elseif not (room_ids[backend] or {})[room] then segue.log.info(("joined %s:%s for the rules"):format(backend, room)) end
  if db and db.kv_set then require("segue.dryrun").remember_room(db, backend, room, r.value) end  -- for `segue rules test`
  -- A target once joined (or refused: some services need no join).
  room_ids[backend] = room_ids[backend] or {}
  room_ids[backend][room] = r.value
  extend_window(backend)
  if pending[backend] then
    pending[backend][room] = nil
    if next(pending[backend]) == nil then pending[backend] = nil end
  end
  compile_around(backend, room)
  local waiting = unresolved[backend .. "\0" .. room]
  unresolved[backend .. "\0" .. room] = nil
  for _, send in ipairs(waiting or {}) do send() end
end

-- Whether (backend, room) of the index waits to be resolved (pending):
-- after the index changed there.
local function mark_pending(backend, room)
  local want = (index[backend] or {})[room] ~= nil and not (room_ids[backend] or {})[room]
  local p = pending[backend]
  if want then
    if not p then p = {} pending[backend] = p end
    p[room] = true
  elseif p then
    p[room] = nil
    if next(p) == nil then pending[backend] = nil end
  end
end

-- Resolves and joins the rooms of `backend` named by the rules: all of them
-- after the backend (re)started, else only those not resolved yet.
-- At most RESOLVERS rooms of one backend are resolved at a time: a rules
-- file naming a thousand new rooms starts a few coroutines, not a thousand.
M.RESOLVERS = 16
function M.resolve_backend(backend, all)
  local todo = {}
  for room in pairs((all and index or pending)[backend] or {}) do todo[#todo + 1] = room end
  local next_room = 0
  local function worker()
    while next_room < #todo do
      next_room = next_room + 1
      resolve(backend, todo[next_room])
    end
  end
  for _ = 1, math.min(#todo, M.RESOLVERS) do segue.spawn(worker) end
end

-- Sending -----------------------------------------------------------------
--
-- Per destination backend (dest_of): its sends in flight, numbered in the
-- order they were made, and the updates it sent that wait for them. All
-- bookkeeping is O(1) per message: `low` is the oldest number that may still
-- be in flight and only moves forward; the held updates are a queue with a
-- head and a tail.

local handle

-- Losses: every copy that is not bridged is counted (status.lost, and by
-- reason in status.lost_by) and logged; a burst of losses to one place is
-- logged once with the first message, then summed up once a second, so a
-- flood towards a stuck backend does not flood the log too.
local loss_log = {}  -- "reason\0where" -> { suppressed = n, last = ms, what = text }

local function flush_losses()
  for key, l in pairs(loss_log) do
    if l.suppressed > 0 then
      segue.log.warn(("%d more cop%s not bridged to %s in the last second: %s")
        :format(l.suppressed, l.suppressed == 1 and "y" or "ies", l.where, l.why))
      l.suppressed, l.last = 0, loop_now()
    elseif loop_now() - l.last > 10000 then
      loss_log[key] = nil
    end
  end
  return next(loss_log) ~= nil
end

local loss_timer
local function lost(reason, where, msg_id, why)
  status.lost = status.lost + 1
  status.lost_by[reason] = (status.lost_by[reason] or 0) + 1
  if M.on_lost then M.on_lost(reason, where, msg_id, why) end
  local key = reason .. "\0" .. where
  local l = loss_log[key]
  local now = loop_now()
  if l and now - l.last < 1000 then
    l.suppressed, l.why = l.suppressed + 1, why
  else
    loss_log[key] = { suppressed = 0, last = now, where = where, why = why }
    if reason == "failed" then segue.log.warn(("bridging %s to %s failed: %s"):format(msg_id, where, why))
    else segue.log.warn(("message %s not bridged to %s: %s"):format(msg_id, where, why)) end
  end
  if not loss_timer then
    loss_timer = segue.every(1000, function()
      if not flush_losses() and loss_timer then loss_timer:stop() loss_timer = nil end
    end)
  end
end
M.lost = lost

-- Sends in flight, held updates, flow control (C: segue.core route_*).
-- Per destination backend, sends are numbered in the order they are made;
-- an update of a backend waits while sends to it made before it are in
-- flight (their echoes may come before the ids that recognise them), and
-- only for those: a busy bridge never starves a backend's updates. When the
-- copies in flight to a backend reach PAUSE_AT, the backend whose message
-- made the copy stops being read (its process blocks writing, its messages
-- wait in the pipe) until they are down to half, or at most PAUSE_MS: a
-- backend that never answers cannot stall its sources for long, and copies
-- beyond MAX_IN_FLIGHT are lost (counted). A backend with sends of ours in
-- flight is never paused: we need its answers. All of it is O(1) per message.
local route_send_begin, route_send_end = core.route_send_begin, core.route_send_end

local function push_limits()
  core.route_limits { max_in_flight = limits.MAX_IN_FLIGHT, max_held = limits.MAX_HELD,
    pause_at = limits.PAUSE_AT, pause_ms = limits.PAUSE_MS, edits_kept = limits.EDITS_KEPT }
end
setmetatable(M, {
  __index = limits,
  __newindex = function(t, k, v)
    if limits[k] ~= nil then limits[k] = v push_limits() else rawset(t, k, v) end
  end,
})

local send_copy

-- A copy for a room not resolved yet waits for it (in order, bounded).
local function wait_for_room(origin_backend, msg, target, content, attachments)
  local e = target.endpoint
  local key = e.backend .. "\0" .. e.room
  local list = unresolved[key] or {}
  unresolved[key] = list
  if #list >= M.MAX_WAITING then
    return lost("unresolved", e.key, msg.id,
      ("the room is not resolved yet and %d copies wait for it"):format(#list))
  end
  list[#list + 1] = function() send_copy(origin_backend, msg, target, content, attachments) end
end

local request = core.request
local metrics = require "segue.metrics"  -- per-backend request counters, as Backend:request keeps them
local hrtime = require("segue.loop").hrtime
local function map_recorded(stored, serr)
  if not stored then segue.log.error("cannot record a copy: " .. tostring(serr)) end
end

send_copy = function(origin_backend, msg, target, content, attachments)
  local e = target.endpoint
  local room_id = (room_ids[e.backend] or {})[e.room]
  if not room_id then return wait_for_room(origin_backend, msg, target, content, attachments) end
  local n, count = route_send_begin(origin_backend, e.backend)
  if not n then
    return lost("overloaded", e.key, msg.id,
      ("%d copies are in flight to %s already"):format(count, e.backend))
  end
  local t0 = hrtime()
  local ok, err, code = request(e.backend, { type = "MessageSend", value = {
    recipient = room_id, content = content, attachments = attachments,
    extra = { segue_origin = { backend = origin_backend, id = msg.id } } } },
    function(r, rerr, rcode)
      metrics.request(e.backend, r and "ok" or rcode, t0)
      flow.copied(target.bridge, origin_backend, msg, e.backend, e.room, content, (not r) and (rerr or "failed") or nil)
      if r then
        status.bridged = status.bridged + 1
        if db then
          -- With a callback: answered at once on SQLite, later on PostgreSQL
          -- (this callback is not a coroutine that could wait).
          batched()
          db:map_put(origin_backend, msg.id, e.backend, r.value, e.room, map_recorded)
        end
      else
        lost(rcode == "ELIMIT" and "queue_full" or "failed", e.key, origin_backend .. ":" .. msg.id, rerr)
      end
      route_send_end(e.backend, n)
    end)
  if not ok then
    metrics.request(e.backend, code or "EINVAL", t0)
    flow.copied(target.bridge, origin_backend, msg, e.backend, e.room, content, err)
    lost(code == "ELIMIT" and "queue_full" or "failed", e.key, origin_backend .. ":" .. msg.id, err)
    route_send_end(e.backend, n)
  end
end

-- Replays after an unclean stop ----------------------------------------------
--
-- A copy is sent, then its id is recorded (origin -> copy) once the
-- destination answers, in the next write of the store. An instance killed
-- in between (kill -9, a crash, a power cut) leaves copies the store does
-- not know, and when the origin's service replays its history to the next
-- run (or the instance that takes the backends over), those messages look
-- new. The destination's service replays too, and its copies carry
-- extra.segue_origin: that is the evidence. So, when the previous run did
-- not stop cleanly (the kv key `router.open` is still "1": it is set when a
-- run starts routing and "0" after a clean stop), each backend gets a
-- replay window when it starts: REPLAY_MS, restarted when it starts running
-- and when one of its rooms resolves. While a destination's window is open:
--   * a copy it announces (extra.segue_origin) records origin -> copy if
--     missing (learn), and is not bridged (as always);
--   * a copy to it of a message from a backend whose window is open too
--     (both ends restarted: the origin may be replaying what the dead run
--     bridged) is held, in order, with every copy to it behind it;
-- when it closes, the held copies go out in order, each only if no copy of
-- its message to that room is known by then (counted in
-- status.deduplicated otherwise). A destination that never replays holds
-- for REPLAY_MS and then gets everything: at least once, as before.
-- Rooms of a backend in its window are not compiled (C carries no copy and
-- no echo of theirs). Nothing is held after a clean stop, nor for a backend
-- that restarts within a run: the run's own records are complete.
M.DEFAULT_REPLAY_MS = 5000  -- a backend's replay window after an unclean stop
M.REPLAY_MS = M.DEFAULT_REPLAY_MS  -- (the config's replay_window_ms, boot.lua)
M.MAX_REPLAY_HELD = 10000   -- copies held for one destination; beyond, its window closes
local REPLAY_KEY = "router.open"
local replay = {
  session = false,  -- a routing session runs (some backend of ours runs)
  state = nil,      -- nil: not known yet; "clean" or "unclean": how the previous run stopped
  marked = false,   -- this run set REPLAY_KEY to "1" (and clears it on a clean stop)
  open = {},        -- backend -> its window's timer
  had = {},         -- backend -> true: its window was opened in this session
  held = {},        -- destination -> { head =, tail =, [i] = copy }: held copies, in order
  learned = {},     -- destination -> "origin\0id" -> room name (or true): copies its replay showed
}
M.replay = replay   -- read by specs

local function replaying(backend) return replay.open[backend] ~= nil or replay.held[backend] ~= nil end
M.replaying = replaying

local release_held, close_window

local function window_timer(backend)
  local t = replay.open[backend]
  if t and t ~= true then t:stop() end
  local ok, timer = pcall(require("segue.loop").timer, M.REPLAY_MS, 0, function() close_window(backend) end)
  if ok then replay.open[backend] = timer
  else  -- the loop is closing: nothing to wait for
    replay.open[backend] = true
    close_window(backend)
  end
end

-- (re)starts `backend`'s window if it has one open.
extend_window = function(backend)
  if replay.open[backend] then window_timer(backend) end
end

close_window = function(backend, why)
  local t = replay.open[backend]
  if not t then return end
  if t ~= true then t:stop() end
  replay.open[backend] = nil
  if why then segue.log.warn(("replay window of %s closed early: %s; copies to it may be sent twice"):format(backend, why)) end
  release_held(backend)
  compile_around_backend(backend)
end

local function close_all()
  local names = {}
  for name in pairs(replay.open) do names[#names + 1] = name end
  for _, name in ipairs(names) do close_window(name) end
end

-- A copy `backend` announced: its origin -> copy is known now.
local function learn(backend, msg, so)
  if type(so) ~= "table" or type(so.backend) ~= "string" or type(so.id) ~= "string" then return end
  if not index[so.backend] then return end  -- not one of ours: another segue's copy
  local room = (room_names[backend] or {})[msg.recipient]
  local l = replay.learned[backend]
  if not l then l = {} replay.learned[backend] = l end
  l[so.backend .. "\0" .. so.id] = room or true
  if db then
    batched()
    db:map_put(so.backend, so.id, backend, msg.id, room, map_recorded)
  end
end

-- Is a copy of origin:id known at dest (in `room`)?
local function copied(origin, id, dest, room)
  local l = (replay.learned[dest] or {})[origin .. "\0" .. id]
  if l == true or l == room then return true end
  for _, c in ipairs(db and db:map_copies(origin, id) or {}) do
    if c.backend == dest and (c.room == nil or c.room == room) then return true end
  end
  return false
end

-- Sends what is held for `dest`, in order, in a coroutine of its own (the
-- store may answer later); copies made meanwhile queue behind.
release_held = function(dest)
  local q = replay.held[dest]
  if not q or q.draining then return end
  q.draining = true
  segue.spawn(function()
    local done, sent, known = {}, 0, 0
    while q.head <= q.tail do
      local c = q[q.head]
      q[q.head], q.head = nil, q.head + 1
      local key = c.check and (c.origin .. "\0" .. c.msg.id .. "\0" .. c.target.endpoint.room)
      if key and (done[key] or copied(c.origin, c.msg.id, dest, c.target.endpoint.room)) then
        status.deduplicated = status.deduplicated + 1
        known = known + 1
      else
        if key then done[key] = true end
        sent = sent + 1
        degrade.send(send_copy, c.origin, c.msg, c.target, c.content, c.attachments, c.marker)
      end
    end
    replay.held[dest] = nil
    segue.log.info(("replay window of %s closed: %d held cop%s sent, %d already there (not sent again)")
      :format(dest, sent, sent == 1 and "y" or "ies", known))
    if not replay.open[dest] then
      replay.learned[dest] = nil
      compile_around_backend(dest)
    end
  end)
end

-- Every copy of deliver goes out here: held while its destination replays.
local function copy_out(origin, msg, target, content, attachments, marker)
  local dest = target.endpoint.backend
  local q = replay.held[dest]
  local check = not marker and replay.open[dest] ~= nil and replay.open[origin] ~= nil
  if not (q or check) then
    return degrade.send(send_copy, origin, msg, target, content, attachments, marker)
  end
  if not q then
    q = { head = 1, tail = 0 }
    replay.held[dest] = q
  end
  q.tail = q.tail + 1
  q[q.tail] = { origin = origin, msg = msg, target = target, content = content,
    attachments = attachments, marker = marker, check = check }
  if q.tail - q.head + 1 >= M.MAX_REPLAY_HELD then
    close_window(dest, ("%d copies held for it"):format(M.MAX_REPLAY_HELD))
  end
end

-- How the previous run stopped (REPLAY_KEY), read once per session; this
-- run marks it open. Windows opened meanwhile close at once if it was clean.
local function decide()
  if not (db and db.kv_get) then
    replay.state = "clean"
    return close_all()
  end
  replay.state = "deciding"
  local v, gerr = db:kv_get(REPLAY_KEY)
  if gerr then segue.log.warn("cannot tell how the previous run stopped (held as if killed): " .. tostring(gerr)) end
  local ok, err = db:kv_set(REPLAY_KEY, "1")
  if not ok then segue.log.warn("cannot mark the routing session open: " .. tostring(err)) end
  replay.marked = ok and true or false
  replay.state = (v == "1" or gerr) and "unclean" or "clean"
  if replay.state == "clean" then return close_all() end
  local names = {}
  for name in pairs(replay.open) do names[#names + 1] = name end
  table.sort(names)
  if M.REPLAY_MS <= 0 then  -- replay_window_ms = 0: no windows
    segue.log.info("the previous run did not stop cleanly: no replay windows (replay_window_ms = 0), "
      .. "copies its services replay may be bridged again")
    return
  end
  segue.log.info(("the previous run did not stop cleanly: copies to %s wait for their replay (up to %d ms each)")
    :format(table.concat(names, ", "), M.REPLAY_MS))
end

local function running_backends()
  local n = 0
  for _, b in ipairs(segue.backends()) do
    if b.state == "running" then n = n + 1 end
  end
  return n
end

-- The "backend" event: a session begins when the first backend runs
-- (every backend of the rules gets a window, until known clean); a backend
-- starting in it restarts its own window, once; none running ends it.
local function replay_backend(name, st)
  if st == "running" then
    if not replay.session then
      replay.session, replay.state, replay.had = true, nil, {}
      if M.REPLAY_MS > 0 and db and db.kv_get then
        for backend in pairs(index) do window_timer(backend) end
      end
      replay.had[name] = true
      segue.spawn(decide)  -- on PostgreSQL the answer comes later: the windows hold meanwhile
      return
    end
    if not replay.had[name] then
      replay.had[name] = true
      extend_window(name)
    end
  elseif replay.session and running_backends() == 0 then
    replay.session = false
    close_all()
  end
end

-- On a clean stop: sends what is held and marks the session closed
-- (REPLAY_KEY "0"), so the next run holds nothing; boot.lua's `lease`
-- (when set) makes it a write only while this instance holds it.
local function clean_stop()
  close_all()  -- what is held goes out before the backends stop
  if not (replay.marked and db and db.kv_set) then return end
  replay.marked = false
  local l = M.lease
  if l and db.kv_set_held then db:kv_set_held(REPLAY_KEY, "0", l.name, l.instance, function() end)
  else db:kv_set(REPLAY_KEY, "0", function() end) end
end

-- Runs a bridge's filter and rewrite (under the instruction limit); on an
-- error, the bridge's fallback decides: drop, or pass the message unchanged.
local function apply_functions(b, msg, ctx)
  for _, fname in ipairs { "filter", "rewrite" } do
    local fn = b[fname]
    if fn then
      local ok, r = rules.run(fn, msg, ctx)
      if not ok then
        segue.log.error(("bridge %s: %s failed: %s"):format(b.name, fname, r))
        return b.fallback == "pass" and msg or nil
      end
      if fname == "filter" and not r then return nil end
      if fname == "rewrite" then
        if r == nil or r == false then return nil end
        if type(r) == "table" then msg = r end
      end
    end
  end
  return msg
end

local NO_ATTACHMENTS = setmetatable({}, { __newindex = function() error("shared empty list", 2) end })

-- The copy of `m` for target `t`: prefix, content, notices, attachments.
local function copy_content(b, prefix, m)
  local notices = {}
  local attachments = NO_ATTACHMENTS
  if m.attachments and next(m.attachments) then
    attachments = carry_attachments(m, b.max_attachment_bytes or 16 * 1024 * 1024, notices)
  end
  local parts = { { type = "Text", value = prefix }, m.content }
  for _, n in ipairs(notices) do parts[#parts + 1] = { type = "Text", value = " " .. n } end
  return { type = "Concat", value = parts }, attachments
end

-- A bridge without filter and rewrite whose format names only fields fixed
-- per route ({backend}, {room}, {bridge}) and {sender} is compiled: its
-- prefix is cached per sender, and a message costs only its copy.
local fixed_keys = { backend = true, room = true, bridge = true, sender = true }
local function compile_prefix(format, backend, room, bridge)
  for k in format:gmatch("{(%w+)}") do
    if not fixed_keys[k] then return nil end
  end
  local cache, size = {}, 0
  return function(sender)
    local p = cache[sender]
    if not p then
      p = render(format, { backend = backend, room = room, bridge = bridge, sender = sender })
      if size >= 1000 then cache, size = {}, 0 end
      cache[sender], size = p, size + 1
    end
    return p
  end
end

-- Where a message from (backend, room) goes, grouped by bridge in rule
-- order, computed once per rule set: { {bridge=, targets=, prefixes=}, ... }.
local NO_ROUTES = {}
local route_cache = setmetatable({}, { __mode = "k" })  -- index -> "backend\0room" -> groups
local function routes_of(set_index, backend, room)
  local per_backend = set_index[backend]
  if not per_backend or not per_backend[room] then return NO_ROUTES end
  local cache = route_cache[set_index]
  if not cache then cache = {} route_cache[set_index] = cache end
  local key = backend .. "\0" .. room
  local groups = cache[key]
  if groups then return groups end
  groups = {}
  local by_bridge = {}
  for _, t in ipairs(targets_of(set_index, backend, room)) do
    local g = by_bridge[t.bridge]
    if not g then
      g = { bridge = t.bridge, targets = {}, prefixes = {} }
      by_bridge[t.bridge] = g
      groups[#groups + 1] = g
    end
    g.targets[#g.targets + 1] = t
    if not (t.bridge.filter or t.bridge.rewrite) then
      g.prefixes[#g.targets] = compile_prefix(t.endpoint.format or t.bridge.format, backend, room, t.bridge.name)
    end
  end
  cache[key] = groups
  return groups
end

local function deliver(set, backend, room, msg, marker)
  local ctx_base
  for _, g in ipairs(routes_of(index, backend, room)) do
    local b = g.bridge
    flow.entered(b)
    if not (b.filter or b.rewrite) and not marker then
      for i, t in ipairs(g.targets) do
        local pf = g.prefixes[i]
        local prefix
        if pf then prefix = pf(msg.sender)
        else
          ctx_base = ctx_base or { backend = backend, room = room, sender = msg.sender, text = plain(msg.content), state = set.state }
          prefix = render(t.endpoint.format or b.format,
            setmetatable({ bridge = b.name, targets = g.targets,
              capabilities = degrade.of(t.endpoint.backend) }, { __index = ctx_base }))
        end
        local content, attachments = copy_content(b, prefix, msg)
        copy_out(backend, msg, t, content, attachments, marker)
      end
    else
      ctx_base = ctx_base or { backend = backend, room = room, sender = msg.sender, text = plain(msg.content), state = set.state }
      local targets = {}
      for i, t in ipairs(g.targets) do targets[i] = t end
      local ctx = setmetatable({ bridge = b.name, targets = targets,
        capabilities = degrade.of(targets[1].endpoint.backend) }, { __index = ctx_base })
      local m = apply_functions(b, msg, ctx)
      if not m then flow.dropped(b, backend, room, msg) end
      for _, t in ipairs(m and ctx.targets or {}) do
        local prefix = (marker or "") .. render(t.endpoint.format or b.format, ctx)
        local content, attachments = copy_content(b, prefix, m)
        copy_out(backend, msg, t, content, attachments, marker)
      end
    end
  end
end

local function is_copy(backend, msg)
  local so = type(msg.extra) == "table" and msg.extra.segue_origin
  if so then
    if replay.open[backend] then learn(backend, msg, so) end
    return true
  end
  return db and db:map_origin(backend, msg.id) ~= nil
end

-- The edits seen (C, shared with the compiled path): two generations of
-- EDITS_KEPT ids; a lookup sees both, a new entry goes into the young one,
-- and when that is full the old one is dropped. Bounded, O(1).
local edit_seen, edit_note = core.route_edit_seen, core.route_edit_note

local function on_upsert(set, backend, msg)
  local room = (room_names[backend] or {})[msg.recipient]
  local seen = edit_seen(backend, msg.id)
  -- An edited message this run has not seen (a replay after a restart):
  -- the log has the edit time it was last bridged with, read before this
  -- version overwrites it, so a replayed edit is not sent again.
  local logged
  if seen == nil and db and msg.edit_time ~= msg.create_time then
    logged = db:message_edit_time(backend, msg.id)
  end
  if db then batched() db:log_message(backend, msg) end
  if is_copy(backend, msg) then return end
  local copies = seen == nil and db and db:map_copies(backend, msg.id) or nil
  if seen ~= nil or (copies and #copies > 0) then
    -- Seen before: an edit if its edit time moved (since this run or the
    -- log last had it), else a replay.
    if seen == nil and logged ~= 0 then seen = logged end
    if seen == msg.edit_time or msg.edit_time == msg.create_time then return end
    edit_note(backend, msg.id, msg.edit_time)
    if not room then return end
    local resend = false
    for _, t in ipairs(targets_of(index, backend, room)) do
      if t.bridge.edits == "resend" then resend = true break end
    end
    if resend then deliver(set, backend, room, msg, "(edited) ") end
    return
  end
  edit_note(backend, msg.id, msg.edit_time)
  flow.arrived(backend, room, msg)
  if set.on_message then
    local ok, r = rules.run(set.on_message, msg, { backend = backend, room = room, state = set.state })
    if not ok then segue.log.error("on_message failed: " .. tostring(r)) end
    if ok and r == false then return end
  end
  if room then deliver(set, backend, room, msg) end
end

local function delete_notice() return { type = "Text", value = "(a bridged message was deleted)" } end

local function on_delete(set, backend, id)
  if db then batched() db:log_delete(backend, id) end
  local noticed = {}
  for _, c in ipairs(db and db:map_copies(backend, id) or {}) do
    for _, t in ipairs((index[c.backend] or {})[c.room] or {}) do
      if t.bridge.deletes == "notice" then
        noticed[c.backend .. "\0" .. c.room] = true
        send_copy(backend, { id = id .. "#deleted" }, t, delete_notice(), {})
        break
      end
    end
  end
  -- A copy still held while its destination replays (so not in the map
  -- yet): the notice queues behind it (copy_out, which holds it as it
  -- would any copy for that destination, under the same bound), and goes
  -- out after it, or after the copy the replay showed was already there.
  for dest, q in pairs(replay.held) do
    for i = q.head, q.tail do
      local c = q[i]
      if not c then break end  -- copy_out passed the bound: the window closed, q was sent
      local key = dest .. "\0" .. c.target.endpoint.room
      if c.origin == backend and c.msg.id == id and c.target.bridge.deletes == "notice"
          and not noticed[key] then
        noticed[key] = true
        copy_out(backend, { id = id .. "#deleted" }, c.target, delete_notice(), {})
      end
    end
  end
end

handle = function(set, backend, update)
  if update.type == "MessageUpsert" then on_upsert(set, backend, update.value)
  elseif update.type == "MessageDelete" then on_delete(set, backend, update.value)
  elseif set.on_room then
    local ok, err = rules.run(set.on_room, backend, update)
    if not ok then segue.log.error("on_room failed: " .. tostring(err)) end
  end
end

-- Updates reach Lua through the C core, which held them while sends to
-- their backend were in flight (see above): an update is handled with the
-- rules it arrived under (messages in flight finish on the rules they
-- started with).
local function process(backend, update)
  local set = core.route_dispatching() or current
  if not set then return end
  handle(set, backend, update)
end

-- Compiled routes ------------------------------------------------------------
--
-- A room whose every route is a plain bridge (no filter, no rewrite, a format
-- naming only {sender}, {backend}, {room}, {bridge}; no on_message in the
-- rules) and whose targets are resolved is compiled into the C core's table
-- (runtime/flubber/route.h): a plain message there (Text, no attachments,
-- new, not a copy, within each destination's length) is carried by C the
-- way deliver and send_copy carry it, with no Lua per message; anything
-- else still comes here. Each rule set gets its table in the same step as
-- the rules (see compile_set: rooms whose routes may have changed are
-- compiled again on the next loop turn, meanwhile Lua carries them), and a
-- room is compiled again when it or a room it sends to resolves, or a
-- backend of its bridges (re)starts. Only while the router is the only "update"
-- listener and nobody watches (segue watch): they see every message.

local compiled = {}       -- "backend\0room" -> the room id it is compiled under
local to_compile = {}     -- "backend\0room" -> { backend, room }: on the next turn
local compile_timer

-- The prefix of a format as pieces: text, or false for the sender; nil if
-- the format names another field or the text is not UTF-8.
local function prefix_pieces(format, values)
  local pieces, pos = {}, 1
  for at, k, after in format:gmatch("(){(%w+)}()") do
    if not fixed_keys[k] then return nil end
    if at > pos then pieces[#pieces + 1] = format:sub(pos, at - 1) end
    if k == "sender" then pieces[#pieces + 1] = false else pieces[#pieces + 1] = tostring(values[k] or "") end
    pos = after
  end
  if pos <= #format then pieces[#pieces + 1] = format:sub(pos) end
  for _, p in ipairs(pieces) do
    if p and not utf8.len(p) then return nil end
  end
  return pieces
end

-- What C carries for messages of (backend, room), or nil if it cannot.
local function compile_room(set, backend, room)
  if set.on_message or replaying(backend) then return nil end
  local targets = {}
  for _, g in ipairs(routes_of(index, backend, room)) do
    local b = g.bridge
    if b.filter or b.rewrite then return nil end
    for i, t in ipairs(g.targets) do
      local e = t.endpoint
      local room_id = (room_ids[e.backend] or {})[e.room]
      if not room_id or replaying(e.backend) then return nil end
      local pieces = prefix_pieces(e.format or b.format, { backend = backend, room = room, bridge = b.name })
      if not pieces then return nil end
      local caps = degrade.of(e.backend)
      targets[#targets + 1] = { bridge = b.name, dest = e.backend, room = e.room, room_id = room_id,
        key = e.key, prefix = pieces, max_length = caps.max_length or 0,
        bytes = caps.length_unit == "bytes", first = i == 1 }
    end
  end
  return targets
end

local compile_all = false  -- a new rule set: every room of the index, on the next turn
M.COMPILE_SLICE = 200      -- rooms compiled per loop turn

local function compile_one(set, key, r)
  local backend, room = r[1], r[2]
  local id = set and (room_ids[backend] or {})[room]
  local targets = id and (room_names[backend] or {})[id] == room and (index[backend] or {})[room]
    and compile_room(set, backend, room)
  if compiled[key] and compiled[key] ~= id then core.route_put(backend, compiled[key], nil) end
  if targets then
    core.route_put(backend, id, targets)
    compiled[key] = id
  else
    if id and compiled[key] == id then core.route_put(backend, id, nil) end
    compiled[key] = nil
  end
end

local compile_now
-- On the next loop turn (not once the host is closing: nothing to route).
local function schedule_compile()
  if compile_timer then return end
  local ok, t = pcall(require("segue.loop").timer, 0, 0, function() compile_now() end)
  if ok then compile_timer = t end
end

compile_now = function()
  if compile_timer then compile_timer:stop() compile_timer = nil end
  local set = current
  local todo = to_compile
  to_compile = {}
  if compile_all then
    compile_all = false
    for backend, rooms in pairs(index) do
      for room in pairs(rooms) do todo[backend .. "\0" .. room] = todo[backend .. "\0" .. room] or { backend, room } end
    end
  end
  -- At most COMPILE_SLICE rooms a turn: a thousand bridges do not stall the
  -- loop (their messages go through Lua meanwhile); the rest on the next.
  local n = 0
  for key, r in pairs(todo) do
    if n < M.COMPILE_SLICE then
      n = n + 1
      compile_one(set, key, r)
    else
      to_compile[key] = to_compile[key] or r
    end
  end
  if next(to_compile) then schedule_compile() end
end

local function compile_later(backend, room)
  to_compile[backend .. "\0" .. room] = { backend, room }
  schedule_compile()
end

-- (backend, room) and every room that sends to it.
compile_around = function(backend, room)
  compile_later(backend, room)
  for _, src in ipairs((index[backend] or {})[room] or {}) do
    for _, e in ipairs(src.bridge.endpoints) do compile_later(e.backend, e.room) end
  end
end

-- A new rule set gets its table in the same step as the rules. `touched`
-- (rooms whose routes may differ, see "Reloading one bridge of many"): the
-- other rooms keep their compiled routes (shared with the table of the
-- running set, which updates already held keep), the touched ones are
-- compiled again on the next turn; nil: an empty table, every room
-- compiled again, a slice a turn (a reload does not wait for it).
local function compile_set(set, touched)
  if touched then
    core.route_table(set, true)
    for key, t in pairs(touched) do
      -- their old routes leave the new table now: Lua carries them until then
      if compiled[key] then core.route_put(t.backend, compiled[key], nil) compiled[key] = nil end
      compile_later(t.backend, t.room)
    end
    return
  end
  core.route_table(set)
  compiled, to_compile, compile_all = {}, {}, true
  schedule_compile()
end

-- A backend (re)started: its capabilities may have changed.
local function compile_backend(name)
  for room in pairs(index[name] or {}) do compile_around(name, room) end
  -- what was compiled with its old capabilities leaves the table now
  for key in pairs(to_compile) do
    local id = compiled[key]
    if id then
      core.route_put(to_compile[key][1], id, nil)
      compiled[key] = nil
    end
  end
end
compile_around_backend = compile_backend

local exclusive = false  -- the router is the only "update" listener
local function enable()
  core.route_enable(exclusive and not flow.watching)
end

-- The counters of the C path, once per loop turn in which it counted.
local function drain()
  local d = core.route_drain()
  status.bridged = status.bridged + (d.bridged or 0)
  status.pauses = status.pauses + (d.pauses or 0)
  status.compiled = status.compiled + (d.compiled or 0)  -- messages C carried
  flow.add(d.backends, d.bridges)
  for backend, r in pairs(d.requests) do metrics.requests(backend, "ok", r.n, r.sum, r.buckets) end
end

-- A copy made by C that failed: counted and logged as send_copy does.
local function copy_failed(f)
  metrics.request(f.dest, f.code, f.t0)
  flow.copied({ name = f.bridge }, f.origin, { id = f.id }, f.dest, f.room, nil, f.message)
  lost(f.code == "ELIMIT" and "queue_full" or "failed", f.key, f.origin .. ":" .. f.id, f.message)
end

core.route_install { on_lost = lost, on_failed = copy_failed, on_flush = drain, buckets = metrics.BUCKETS }
core.route_memory(type(db) ~= "userdata")
push_limits()

-- Loading -----------------------------------------------------------------

--- simulate(endpoint, text [, sender]) -> { {endpoint=, text=}, ... }: where
--- a message would go and how it would read; for self-tests.
local function simulator(set, set_index)
  return function(endpoint, text, sender)
    local backend, room = endpoint:match("^([^:]+):(.+)$")
    local msg = { id = "test", sender = sender or "tester", content = { type = "Text", value = text }, attachments = {} }
    local out = {}
    for _, t in ipairs(targets_of(set_index, backend, room)) do
      local ctx = { backend = backend, room = room, sender = msg.sender, text = text, state = set.state,
        bridge = t.bridge.name, targets = { t } }
      local m = apply_functions(t.bridge, msg, ctx)
      if m and #ctx.targets > 0 then
        out[#out + 1] = { endpoint = t.endpoint.key,
          text = render(t.endpoint.format or t.bridge.format, ctx) .. plain(m.content) }
      end
    end
    return out
  end
end

--- self_test(set) -> true | nil, err: runs a loaded set's `test` (if any)
--- against the simulator, without touching the running rules (`segue check`).
function M.self_test(set)
  if not set.test then return true end
  local ok, err = rules.run(set.test, simulator(set, build_index(set)))
  if not ok then return nil, set.path .. ": self-test failed: " .. tostring(err):match("^[^\n]*") end
  return true
end

--- load(path, backend_names) -> true | nil, err: loads, validates, self-tests
--- and only then swaps in the new rules.
-- The text of every file of the running rules, and the backends they were
-- checked against: a reload that finds both unchanged keeps the running
-- rules as they are (nothing runs again; rooms not resolved yet are retried).
local loaded = { texts = {}, backends = nil }

local function read_all(file)
  local f = io.open(file, "r")
  if not f then return nil end
  local text = f:read("a")
  f:close()
  return text
end

local function backends_key(backends)
  local names = {}
  for name in pairs(backends or {}) do names[#names + 1] = name end
  table.sort(names)
  return table.concat(names, "\0")
end

-- unchanged(path, key) -> true | false, the text of path if it was read
local function unchanged(path, key)
  if not current or current.path ~= path or loaded.backends ~= key then return false end
  for _, file in ipairs(current.files or {}) do
    local text = read_all(file)
    if loaded.texts[file] == nil or text ~= loaded.texts[file] then return false, file == path and text or nil end
  end
  return true
end

local function resolve_running()
  for backend in pairs(pending) do
    local info = segue.backend(backend):info()
    if info and info.state == "running" then M.resolve_backend(backend) end
  end
end

-- Reloading one bridge of many -------------------------------------------
--
-- A reload runs the whole rules file again, but a bridge whose name and
-- definition did not change (rules.lua's `sig`: every option and endpoint,
-- in order; bridges with a filter or rewrite have none, functions cannot be
-- compared) keeps its object from the running set (rules.load hands it out
-- again): what is keyed on it (its compiled routes and prefix caches, sends
-- in flight) goes on as if nothing happened. Only the index entries and
-- routes of rooms that a changed, added or removed bridge names are
-- computed again, in place, after the new set passed every check, in one
-- step (nothing yields in between).

-- Positions in the running set, kept from one reload to the next while its
-- bridges stay where they are (name -> position, bridge -> position; nil:
-- made again when needed).
local at_name, at_bridge

-- changed_rooms(old, new) -> touched, pos: puts the running set's object in
-- `new` for every bridge that did not change; touched: "backend\0room" ->
-- { backend =, room =, fresh = { new bridges naming it } } for the rooms
-- whose index entries and routes may differ, or nil when all may (no
-- running set, the bridges that stayed changed order, or so many changed
-- that building the index anew is cheaper); pos: bridge -> its position in
-- `new`. A bridge is looked for at its own position first, by name only
-- when another is there.
local function changed_rooms(old, new)
  local changes, most = 0, 16 + #new // 8
  if not old or #new - (new.reused or 0) > most then return nil end
  local touched, changed, last, in_place = {}, {}, 0, #new == #old
  local function touch(b, fresh)
    local eps = b.endpoints
    for j = 1, #eps do
      local e = eps[j]
      local key = e.backend .. "\0" .. e.room
      local t = touched[key]
      if not t then
        t = { backend = e.backend, room = e.room, fresh = {} }
        touched[key] = t
      end
      if fresh and t.fresh[#t.fresh] ~= b then t.fresh[#t.fresh + 1] = b end
    end
  end
  -- old[j] is not in `new` (removed or changed): false past `most`
  local function gone(j)
    changes = changes + 1
    touch(old[j])
    return changes <= most
  end
  -- The common case first: the same number of bridges, each position
  -- holding the object it held or a new one, of the same name or of a name
  -- no other bridge had (changed in place, or defined the same: then the
  -- old object goes back in).
  local settled = false
  if in_place then
    local diff, n = {}, 0
    settled = true
    for i = 1, #new do
      local b, o = new[i], old[i]
      if b ~= o then
        n = n + 1
        if n > most then settled = false break end
        if b.name ~= o.name then
          if not at_name then
            at_name = {}
            for j = 1, #old do at_name[old[j].name] = j end
          end
          if at_name[b.name] then settled = false break end
        end
        diff[n] = i
      end
    end
    for k = 1, settled and n or 0 do
      local i = diff[k]
      local b, o = new[i], old[i]
      if b.sig and o.sig == b.sig then
        o.where = b.where
        new[i] = o
      else
        touch(b, true)
        touch(o)
        changed[#changed + 1] = i
      end
    end
  end
  for i = 1, settled and 0 or #new do
    local b = new[i]
    local at, o = i, old[i]
    if not o or o.name ~= b.name then
      if not at_name then
        at_name = {}
        for j = 1, #old do at_name[old[j].name] = j end
      end
      at = at_name[b.name]
      o = at and old[at]
      if o and o.name ~= b.name then o = nil end
    end
    if o and (o == b or (b.sig and o.sig == b.sig)) then
      if at < last then return nil end   -- the bridges that stayed moved: rule order matters
      for j = last + 1, at - 1 do
        if not gone(j) then return nil end
      end
      last = at
      if o ~= b then o.where = b.where end
      new[i] = o
      if at ~= i then in_place = false end
    else
      changes = changes + 1
      if changes > most then return nil end
      touch(b, true)
      if o then touch(o) end
      changed[#changed + 1] = i
    end
  end
  for j = settled and #old + 1 or last + 1, #old do
    if not gone(j) then return nil end
  end
  -- from here on the positions are those of `new`
  if in_place then  -- only the changed positions hold other bridges
    if not at_bridge then
      at_bridge = {}
      for j = 1, #old do at_bridge[old[j]] = j end
    end
    for _, i in ipairs(changed) do
      local o = old[i]
      at_bridge[o] = nil
      if at_name and at_name[o.name] == i then at_name[o.name] = nil end
    end
    for _, i in ipairs(changed) do
      at_bridge[new[i]] = i
      if at_name then at_name[new[i].name] = i end
    end
  else
    at_name, at_bridge = nil, {}
    for i = 1, #new do at_bridge[new[i]] = i end
  end
  return touched, at_bridge, in_place and changed or nil
end

-- set.by_hash (rules.hashes: where the next load finds the bridges that
-- did not change): the running set's, patched at the positions that
-- changed in place; made when first needed otherwise.
local function index_hashes(set, old, changed)
  local by_hash = not set.by_hash and changed and old.by_hash
  if not by_hash then return end
  for _, i in ipairs(changed) do
    local o = old[i]
    if o.hash and by_hash[o.hash] == o then by_hash[o.hash] = nil end
  end
  for _, i in ipairs(changed) do
    local b = set[i]
    if b.hash then by_hash[b.hash] = b end
  end
  old.by_hash, set.by_hash = nil, by_hash
end

-- update_index(idx, touched, pos): makes idx, the index of the running
-- set, that of the new one: the entries of each touched room again, in
-- rule order, from the bridges that stayed and the new ones; the routes
-- computed for those rooms are dropped.
local function update_index(idx, touched, pos)
  local cache = route_cache[idx]
  for key, t in pairs(touched) do
    if cache then cache[key] = nil end
    local per = idx[t.backend]
    local bridges, seen = {}, {}
    local old = per and per[t.room]
    for i = 1, old and #old or 0 do
      local b = old[i].bridge
      if pos[b] and not seen[b] then seen[b], bridges[#bridges + 1] = true, b end
    end
    for i = 1, #t.fresh do
      local b = t.fresh[i]
      if not seen[b] then seen[b], bridges[#bridges + 1] = true, b end
    end
    table.sort(bridges, function(a, b) return pos[a] < pos[b] end)
    local list = {}
    for i = 1, #bridges do
      local eps = bridges[i].endpoints
      for j = 1, #eps do
        local e = eps[j]
        if e.backend == t.backend and e.room == t.room then list[#list + 1] = { bridge = bridges[i], endpoint = e } end
      end
    end
    if #list > 0 then
      if not per then per = {} idx[t.backend] = per end
      per[t.room] = list
    elseif per then
      per[t.room] = nil
      if next(per) == nil then idx[t.backend] = nil end
    end
  end
end

-- The router listens to "federation" only while the rules have an
-- on_federation: with no listener the postbox delivers an event without
-- decoding it into Lua for nobody.
local installed, stop_federation
local function listen_federation()
  local want = installed and current and current.on_federation
  if want and not stop_federation then
    stop_federation = segue.on("federation", function(server_id, event)
      local set = current
      if set and set.on_federation then
        local ok, err = rules.run(set.on_federation, server_id, event)
        if not ok then segue.log.error("on_federation failed: " .. tostring(err)) end
      end
    end)
  elseif not want and stop_federation then
    stop_federation()
    stop_federation = nil
  end
end

local function load_rules(path, backends)
  local key = backends_key(backends)
  local same, text = unchanged(path, key)
  if same then
    status.loads, status.last_error, status.loaded_at = status.loads + 1, nil, os.time()
    segue.log.info(("rules reloaded (unchanged, nothing ran): %d bridge(s)"):format(#current))
    return true
  end
  -- What is kept to compare is the very text that ran (set.texts).
  local set, errors = rules.load(path, { backends = backends, state = state, previous = current,
    checked = loaded.backends == key and current or nil, text = text or read_all(path) })
  if set and set.test then
    local ok, err = rules.run(set.test, simulator(set, build_index(set)))
    if not ok then errors, set = { path .. ": self-test failed: " .. tostring(err):match("^[^\n]*") }, nil end
  end
  if not set then
    status.failures = status.failures + 1
    status.last_error = table.concat(errors, "\n")
    for _, e in ipairs(errors) do segue.log.error(e) end
    return nil, status.last_error
  end
  local first = current == nil
  local touched, pos, changed = changed_rooms(current, set)
  index_hashes(set, current, changed)
  if not touched then at_name, at_bridge = nil, nil end
  if touched then
    update_index(index, touched, pos)
    for _, t in pairs(touched) do mark_pending(t.backend, t.room) end
  else
    index, pending = build_index(set, room_ids)
  end
  current, state = set, set.state
  compile_set(set, touched)
  listen_federation()
  status.loads, status.last_error, status.loaded_at = status.loads + 1, nil, os.time()
  status.files = set.files
  loaded.texts, loaded.backends = set.texts, key
  segue.log.info(("rules %s: %d bridge(s)"):format(first and "loaded" or "reloaded", #set))
  return true
end

-- The collector is stopped while a reload runs: what it allocates (the
-- rules file's code and records, a new index) would otherwise pay for
-- incremental steps over the whole heap (most of a full rebuild's time in
-- callgrind); the garbage is collected by the cycles after it. A rules
-- file that runs out of its memory budget meanwhile is run once more with
-- the collector running (rules.load), so garbage does not count against it.
-- The "rules" listeners and the rooms' resolvers run after, with the
-- collector running.
function M.load(path, backends)
  local running = collectgarbage("isrunning")
  if running then collectgarbage("stop") end
  local ok, done, err = pcall(load_rules, path, backends)
  if running then collectgarbage("restart") end
  if not ok then error(done, 0) end
  if not done then
    segue.emit("rules", false, err)
    return nil, err
  end
  segue.emit("rules", true)
  resolve_running()
  return true
end

function M.files() return current and current.files or {} end

--- bridges() -> the running rules' bridges, in rule order (a reload keeps
--- the object of every bridge that did not change); do not modify them.
function M.bridges() return current or {} end

--- rules_state(): the rules' `state` table, carried from one rule set to the
--- next (segue.shared_state keeps it across instances).
function M.rules_state() return state end

--- ready() -> true once every room the rules name is resolved and joined.
function M.ready()
  if not current then return false end
  for backend, rooms in pairs(index) do
    for room in pairs(rooms) do
      if not (room_ids[backend] or {})[room] then return false end
    end
  end
  return true
end

--- install(): routes updates and federation events through the rules.
function M.install()
  degrade.install()
  local function on_update(backend, update) process(backend, update) end
  segue.watch_handlers("update", function(list)
    exclusive = #list == 1 and list[1] == on_update
    enable()
  end)
  flow.on_watching = enable
  segue.on("update", on_update)
  core.route_attach()
  segue.on("backend", function(name, st)
    core.route_attach()
    replay_backend(name, st)
    compile_backend(name)
    if st == "running" then M.resolve_backend(name, true) end
  end)
  segue.on("stopping", clean_stop)
  installed = true
  listen_federation()
end

return M
