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
local sends = {}       -- backend -> { [send number] = true } in flight to it
local send_count = 0   -- numbers every send
local held = {}        -- backend -> { {update, set, after}, ... } waiting for sends
local unresolved = {}  -- "backend\0room" -> copies waiting for that room to resolve
M.MAX_WAITING = 1000   -- copies kept per room that is not resolved yet
local last_edit = {}   -- "backend\0id" -> edit_time already handled
local status = { loads = 0, failures = 0 }
local db               -- the store (segue.store), or nil
local state = {}       -- carried from one rule set to the next

M.status = status

-- Without the store (segue.store), copies are remembered in memory only.
local function memory_store()
  local origin, copies = {}, {}
  return {
    map_put = function(_, ob, oid, cb, cid, room)
      origin[cb .. "\0" .. cid] = { ob, oid }
      local k = ob .. "\0" .. oid
      copies[k] = copies[k] or {}
      table.insert(copies[k], { backend = cb, id = cid, room = room })
      return true
    end,
    map_origin = function(_, b, id)
      local o = origin[b .. "\0" .. id]
      if o then return o[1], o[2] end
    end,
    map_copies = function(_, b, id) return copies[b .. "\0" .. id] or {} end,
    log_message = function() end,
    log_delete = function() end,
  }
end

function M.set_store(s) db = s or memory_store() end
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

local function build_index(set)
  local idx = {}
  for _, b in ipairs(set) do
    for _, e in ipairs(b.endpoints) do
      idx[e.backend] = idx[e.backend] or {}
      local list = idx[e.backend][e.room] or {}
      idx[e.backend][e.room] = list
      list[#list + 1] = { bridge = b, endpoint = e }
    end
  end
  return idx
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
  local waiting = unresolved[backend .. "\0" .. room]
  unresolved[backend .. "\0" .. room] = nil
  for _, send in ipairs(waiting or {}) do send() end
end

-- Resolves and joins the rooms of `backend` named by the rules: all of them
-- after the backend (re)started, else only those not resolved yet.
function M.resolve_backend(backend, all)
  local known = room_ids[backend] or {}
  for room in pairs(index[backend] or {}) do
    if all or not known[room] then segue.spawn(resolve, backend, room) end
  end
end

-- Sending -----------------------------------------------------------------

local handle

-- The oldest send to `backend` still in flight, or nil.
local function oldest_send(backend)
  local min
  for n in pairs(sends[backend] or {}) do
    if not min or n < min then min = n end
  end
  return min
end

-- An update waits only for the sends that were in flight when it arrived,
-- not for later ones: a busy bridge never starves a backend's updates.
local function release(backend, n)
  sends[backend][n] = nil
  local q = held[backend]
  local oldest = oldest_send(backend)
  while q and q[1] and (not oldest or q[1].after < oldest) do
    local h = table.remove(q, 1)
    handle(h.set, backend, h.update)
  end
  if q and not q[1] then held[backend] = nil end
end

local send_copy

-- A copy for a room not resolved yet waits for it (in order, bounded).
local function wait_for_room(origin_backend, msg, target, content, attachments)
  local e = target.endpoint
  local key = e.backend .. "\0" .. e.room
  local list = unresolved[key] or {}
  unresolved[key] = list
  if #list >= M.MAX_WAITING then
    return segue.log.warn(("%s is not resolved yet and %d copies wait for it; message %s not bridged there")
      :format(e.key, #list, msg.id))
  end
  list[#list + 1] = function() send_copy(origin_backend, msg, target, content, attachments) end
end

send_copy = function(origin_backend, msg, target, content, attachments)
  local e = target.endpoint
  local room_id = (room_ids[e.backend] or {})[e.room]
  if not room_id then return wait_for_room(origin_backend, msg, target, content, attachments) end
  send_count = send_count + 1
  local n = send_count
  sends[e.backend] = sends[e.backend] or {}
  sends[e.backend][n] = true
  local ok, err = segue.backend(e.backend):request({ type = "MessageSend", value = {
    recipient = room_id, content = content, attachments = attachments,
    extra = { segue_origin = { backend = origin_backend, id = msg.id } } } },
    function(r, rerr)
      flow.copied(target.bridge, origin_backend, msg, e.backend, e.room, content, (not r) and (rerr or "failed") or nil)
      if r and db then
        -- With a callback: answered at once on SQLite, later on PostgreSQL
        -- (this callback is not a coroutine that could wait).
        db:map_put(origin_backend, msg.id, e.backend, r.value, e.room, function(stored, serr)
          if not stored then segue.log.error("cannot record a copy: " .. tostring(serr)) end
        end)
      elseif not r then
        segue.log.warn(("bridging %s:%s to %s failed: %s"):format(origin_backend, msg.id, e.key, rerr))
      end
      release(e.backend, n)
    end)
  if not ok then
    segue.log.warn(("bridging to %s failed: %s"):format(e.key, err))
    flow.copied(target.bridge, origin_backend, msg, e.backend, e.room, content, err)
    release(e.backend, n)
  end
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

local function deliver(set, backend, room, msg, marker)
  local ctx_base = { backend = backend, room = room, sender = msg.sender, text = plain(msg.content), state = set.state }
  local by_bridge = {}
  for _, t in ipairs(targets_of(index, backend, room)) do
    by_bridge[t.bridge] = by_bridge[t.bridge] or {}
    table.insert(by_bridge[t.bridge], t)
  end
  for b, targets in pairs(by_bridge) do
    local ctx = setmetatable({ bridge = b.name, targets = targets,
      capabilities = degrade.of(targets[1].endpoint.backend) }, { __index = ctx_base })
    flow.entered(b)
    local m = apply_functions(b, msg, ctx)
    if not m then flow.dropped(b, backend, room, msg) end
    for _, t in ipairs(m and ctx.targets or {}) do
      local notices = {}
      local limit = b.max_attachment_bytes or 16 * 1024 * 1024
      local attachments = carry_attachments(m, limit, notices)
      local prefix = (marker or "") .. render(t.endpoint.format or b.format, ctx)
      local parts = { { type = "Text", value = prefix }, m.content }
      for _, n in ipairs(notices) do parts[#parts + 1] = { type = "Text", value = " " .. n } end
      degrade.send(send_copy, backend, msg, t, { type = "Concat", value = parts }, attachments, marker)
    end
  end
end

local function is_copy(backend, msg)
  if type(msg.extra) == "table" and msg.extra.segue_origin then return true end
  return db and db:map_origin(backend, msg.id) ~= nil
end

local function on_upsert(set, backend, msg)
  local room = (room_names[backend] or {})[msg.recipient]
  if db then db:log_message(backend, msg) end
  if is_copy(backend, msg) then return end
  local key = backend .. "\0" .. msg.id
  local copies = db and db:map_copies(backend, msg.id) or {}
  if #copies > 0 or last_edit[key] then
    -- Seen before: an edit if its edit time moved, else a replay.
    if last_edit[key] == msg.edit_time or msg.edit_time == msg.create_time then return end
    last_edit[key] = msg.edit_time
    if not room then return end
    local resend = {}
    for _, t in ipairs(targets_of(index, backend, room)) do
      if t.bridge.edits == "resend" then resend[#resend + 1] = t end
    end
    if #resend > 0 then deliver(set, backend, room, msg, "(edited) ") end
    return
  end
  last_edit[key] = msg.edit_time
  flow.arrived(backend, room, msg)
  if set.on_message then
    local ok, r = rules.run(set.on_message, msg, { backend = backend, room = room, state = set.state })
    if not ok then segue.log.error("on_message failed: " .. tostring(r)) end
    if ok and r == false then return end
  end
  if room then deliver(set, backend, room, msg) end
end

local function on_delete(set, backend, id)
  if db then db:log_delete(backend, id) end
  for _, c in ipairs(db and db:map_copies(backend, id) or {}) do
    for _, t in ipairs((index[c.backend] or {})[c.room] or {}) do
      if t.bridge.deletes == "notice" then
        send_copy(backend, { id = id .. "#deleted" }, t,
          { type = "Text", value = "(a bridged message was deleted)" }, {})
        break
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

local function process(backend, update)
  local set = current  -- messages in flight finish on the rules they started with
  if not set then return end
  if held[backend] or oldest_send(backend) then
    -- Our own sends to this backend are in flight: their echoes may arrive
    -- before the ids we need to recognise them; wait for those ids.
    held[backend] = held[backend] or {}
    table.insert(held[backend], { update = update, set = set, after = send_count })
    return
  end
  handle(set, backend, update)
end

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
function M.load(path, backends)
  local set, errors = rules.load(path, { backends = backends, state = state })
  if set and set.test then
    local ok, err = rules.run(set.test, simulator(set, build_index(set)))
    if not ok then errors, set = { path .. ": self-test failed: " .. tostring(err):match("^[^\n]*") }, nil end
  end
  if not set then
    status.failures = status.failures + 1
    status.last_error = table.concat(errors, "\n")
    for _, e in ipairs(errors) do segue.log.error(e) end
    segue.emit("rules", false, status.last_error)
    return nil, status.last_error
  end
  local first = current == nil
  current, index, state = set, build_index(set), set.state
  status.loads, status.last_error, status.loaded_at = status.loads + 1, nil, os.time()
  status.files = set.files
  segue.log.info(("rules %s: %d bridge(s)"):format(first and "loaded" or "reloaded", #set))
  segue.emit("rules", true)
  for backend in pairs(index) do
    local info = segue.backend(backend):info()
    if info and info.state == "running" then M.resolve_backend(backend) end
  end
  return true
end

function M.files() return current and current.files or {} end

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
  segue.on("update", function(backend, update) process(backend, update) end)
  segue.on("backend", function(name, st) if st == "running" then M.resolve_backend(name, true) end end)
  segue.on("federation", function(server_id, event)
    local set = current
    if set and set.on_federation then
      local ok, err = rules.run(set.on_federation, server_id, event)
      if not ok then segue.log.error("on_federation failed: " .. tostring(err)) end
    end
  end)
end

return M
