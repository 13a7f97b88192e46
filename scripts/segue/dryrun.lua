--- segue.dryrun: `segue rules test RULES.lua [--since DURATION]
--- [--room backend:room] [CONFIG]` replays the store's message log through
--- the running rules (the config's `rules`) and through RULES.lua, sends
--- nothing, and prints per message where each set sends it and with what
--- text, then a summary of the differences.
---
--- The message log keeps room ids; rules name rooms. The router remembers
--- each room it resolved (kv "rooms.<backend>": { id = name }), and a room a
--- rule names that was never resolved is matched by id = name (or its lower
--- case: IRC channels, notes). What a rule does with a message is computed as
--- the router does: the same bridges, endpoint modes, filter, rewrite and
--- format, each under the rules' instruction limit; a filter or rewrite that
--- raises is reported (and takes the bridge's fallback).
local rules = require "segue.rules"
local json = require "segue.json"

local M = {}

-- Rooms the router resolved -------------------------------------------------

local known = {}   -- backend -> { [id] = name }

--- remember_room(db, backend, name, id): called by the router when it
--- resolved a room (in a coroutine); written only when new.
function M.remember_room(db, backend, name, id)
  local rooms = known[backend]
  if not rooms then
    local text = db:kv_get("rooms." .. backend)
    rooms = type(text) == "string" and json.decode(text) or {}
    known[backend] = rooms
  end
  if rooms[id] == name then return end
  rooms[id] = name
  db:kv_set("rooms." .. backend, json.encode(json.object(rooms)))
end

-- Durations -------------------------------------------------------------------

local UNITS = { s = 1, m = 60, h = 3600, d = 86400, w = 604800 }

--- duration(text) -> seconds | nil: "90s", "30m", "2h", "7d", "1w", "1h30m".
function M.duration(text)
  if type(text) ~= "string" or text == "" then return nil end
  local total, rest = 0, text
  while rest ~= "" do
    local n, u, tail = rest:match("^(%d+)([smhdw])(.*)$")
    if not n then return nil end
    total, rest = total + tonumber(n) * UNITS[u], tail
  end
  return total
end

-- What a rule set does with one message -----------------------------------------

local function plain(c) return require("segue.router").plain(c) end

local function render(format, ctx)
  return (format:gsub("{(%w+)}", function(k) return tostring(ctx[k] or "") end))
end

local function index_of(set)
  local idx = {}
  for _, b in ipairs(set) do
    for _, e in ipairs(b.endpoints) do
      idx[e.backend] = idx[e.backend] or {}
      idx[e.backend][e.room] = idx[e.backend][e.room] or {}
      table.insert(idx[e.backend][e.room], { bridge = b, endpoint = e })
    end
  end
  return idx
end

-- outcome(set, idx, backend, room, msg) -> { [endpoint key] = text }, errors
local function outcome(set, idx, backend, room, msg)
  local out, errors = {}, {}
  for _, src in ipairs((idx[backend] or {})[room] or {}) do
    local b = src.bridge
    if src.endpoint.mode ~= "out" then
      local targets = {}
      for _, e in ipairs(b.endpoints) do
        if e ~= src.endpoint and e.mode ~= "in" then targets[#targets + 1] = { bridge = b, endpoint = e } end
      end
      local ctx = { backend = backend, room = room, sender = msg.sender, text = plain(msg.content),
        state = set.state, bridge = b.name, targets = targets, capabilities = {} }
      local m = msg
      for _, fname in ipairs { "filter", "rewrite" } do
        local fn = m and b[fname]
        if fn then
          local copy = { id = m.id, sender = m.sender, recipient = m.recipient, content = m.content,
            attachments = m.attachments or {}, create_time = m.create_time, edit_time = m.edit_time }
          local ok, r = rules.run(fn, copy, ctx)
          if not ok then
            errors[#errors + 1] = ("bridge %s: %s failed: %s"):format(b.name, fname, tostring(r):match("^[^\n]*"))
            if b.fallback ~= "pass" then m = nil end
          elseif fname == "filter" and not r then m = nil
          elseif fname == "rewrite" then
            if r == nil or r == false then m = nil elseif type(r) == "table" then m = r else m = copy end
          end
        end
      end
      for _, t in ipairs(m and ctx.targets or {}) do
        out[t.endpoint.key] = render(t.endpoint.format or b.format, ctx) .. plain(m.content)
      end
    end
  end
  return out, errors
end

-- Loading ---------------------------------------------------------------------------

local function backend_names(cfg)
  local names = {}
  for _, b in ipairs(cfg.backends) do names[b.name] = true end
  return names
end

--- load(path, cfg) -> set | nil, errors: loaded, validated, self-tested.
function M.load(path, cfg)
  local set, errors = rules.load(path, { backends = backend_names(cfg), state = {} })
  if not set then return nil, errors end
  local ok, err = require("segue.router").self_test(set)
  if not ok then return nil, { err } end
  return set
end

-- The replay -------------------------------------------------------------------------

local function room_candidates(set, rooms_by_backend)
  -- backend -> { [room id] = room name } for every endpoint of the set
  local out = {}
  for _, b in ipairs(set or {}) do
    for _, e in ipairs(b.endpoints) do
      local ids = out[e.backend] or {}
      out[e.backend] = ids
      local mapped = false
      for id, name in pairs(rooms_by_backend[e.backend] or {}) do
        if name == e.room then ids[id] = name mapped = true end
      end
      if not mapped then
        ids[e.room] = ids[e.room] or e.room
        ids[e.room:lower()] = ids[e.room:lower()] or e.room
      end
    end
  end
  return out
end

local function stamp(ms)
  return os.date("!%Y-%m-%dT%H:%M:%SZ", (ms or 0) // 1000)
end

local function one_line(s) return (tostring(s or ""):gsub("[%c]", " ")) end

--- replay(db, cfg, new_set, old_set, opts, write) -> summary: the replay
--- itself, in a coroutine (the store may answer asynchronously).
function M.replay(db, cfg, new, old, opts, write)
  local rooms = {}
  for _, b in ipairs(cfg.backends) do
    local text = db:kv_get("rooms." .. b.name)
    rooms[b.name] = type(text) == "string" and json.decode(text) or {}
  end
  -- every (backend, room id) either set names, once
  local pairs_seen, sources = {}, {}
  for _, set in ipairs { old or {}, new } do
    for backend, ids in pairs(room_candidates(set, rooms)) do
      for id, name in pairs(ids) do
        local k = backend .. "\0" .. id
        if not pairs_seen[k] then
          pairs_seen[k] = true
          if not opts.room or opts.room == backend .. ":" .. name then
            sources[#sources + 1] = { backend = backend, id = id, name = name }
          end
        end
      end
    end
  end
  local since_ms = (os.time() - opts.since) * 1000
  local msgs = {}
  for _, s in ipairs(sources) do
    local list = db:messages(s.backend, s.id, opts.limit or 10000) or {}
    for _, m in ipairs(list) do
      if (m.create_time or 0) >= since_ms and not m.deleted then
        local ob = db:map_origin(s.backend, m.id)
        if not ob then msgs[#msgs + 1] = { backend = s.backend, room = s.name, msg = m } end
      end
    end
  end
  table.sort(msgs, function(a, b)
    if a.msg.create_time ~= b.msg.create_time then return a.msg.create_time < b.msg.create_time end
    return a.backend .. a.msg.id < b.backend .. b.msg.id
  end)

  local sum = { messages = #msgs, same = 0, new_targets = 0, lost_targets = 0, changed = 0,
    old_errors = 0, new_errors = 0 }
  local old_idx, new_idx = old and index_of(old), index_of(new)
  for _, e in ipairs(msgs) do
    local m = e.msg
    write(("%s %s:%s <%s> %s\n"):format(stamp(m.create_time), e.backend, e.room, one_line(m.sender),
      one_line(plain(m.content))))
    local before, berr = {}, {}
    if old then before, berr = outcome(old, old_idx, e.backend, e.room, m) end
    local after, aerr = outcome(new, new_idx, e.backend, e.room, m)
    local keys, seen = {}, {}
    for k in pairs(before) do if not seen[k] then seen[k] = true keys[#keys + 1] = k end end
    for k in pairs(after) do if not seen[k] then seen[k] = true keys[#keys + 1] = k end end
    table.sort(keys)
    if #keys == 0 then write("  (goes nowhere in either)\n") end
    for _, k in ipairs(keys) do
      local a, b = before[k], after[k]
      if a and b and a == b then
        sum.same = sum.same + 1
        write(("  = %s %s\n"):format(k, one_line(b)))
      elseif a and b then
        sum.changed = sum.changed + 1
        write(("  ~ %s %s\n    was %s\n"):format(k, one_line(b), one_line(a)))
      elseif b then
        sum.new_targets = sum.new_targets + 1
        write(("  + %s %s\n"):format(k, one_line(b)))
      else
        sum.lost_targets = sum.lost_targets + 1
        write(("  - %s %s\n"):format(k, one_line(a)))
      end
    end
    for _, x in ipairs(berr) do sum.old_errors = sum.old_errors + 1 write("  ! running rules: " .. x .. "\n") end
    for _, x in ipairs(aerr) do sum.new_errors = sum.new_errors + 1 write("  ! new rules: " .. x .. "\n") end
  end
  write(("%d message(s) since %s: %d copies the same, %d new target(s), %d lost target(s), "
    .. "%d changed text, %d filter/rewrite error(s) in the new rules (%d in the running ones)\n")
    :format(sum.messages, stamp(since_ms), sum.same, sum.new_targets, sum.lost_targets, sum.changed,
      sum.new_errors, sum.old_errors))
  return sum
end

local function usage()
  io.stderr:write("usage: segue rules test RULES.lua [--since DURATION] [--room backend:room] [CONFIG]\n")
  return 2
end

local function open_store(cfg)
  local store = require "segue.store"
  local conf = require "segue.config"
  if conf.store_options then return store.open(conf.store_options(cfg)) end
  return store.open(cfg.data_dir .. "/segue.db")
end

--- run(cfg, rules_path, opts, write) -> exit code, summary: in a coroutine.
function M.run(cfg, path, opts, write)
  local new, errors = M.load(path, cfg)
  if not new then
    for _, e in ipairs(errors) do io.stderr:write(e, "\n") end
    io.stderr:write(("segue: rules test: %s does not load; nothing replayed\n"):format(path))
    return 1
  end
  local old
  if cfg.rules and cfg.rules ~= path then
    local oerr
    old, oerr = M.load(cfg.rules, cfg)
    if not old then
      io.stderr:write(("segue: rules test: the running rules (%s) do not load: %s; showing the new ones only\n")
        :format(cfg.rules, table.concat(oerr, "; ")))
    end
  end
  local db, err = open_store(cfg)
  if not db then
    io.stderr:write("segue: rules test: store: ", tostring(err), "\n")
    return 1
  end
  local sum = M.replay(db, cfg, new, old, opts, write)
  db:close()
  return 0, sum
end

--- command(args...): `segue rules test ...`.
function M.command(...)
  local args = { ... }
  if args[1] ~= "test" then return usage() end
  local path, cfg_path
  local opts = { since = 86400 }
  local i = 2
  while i <= #args do
    local a = args[i]
    if a == "--since" then
      opts.since = M.duration(args[i + 1])
      if not opts.since then
        io.stderr:write(("segue: rules test: --since %s: expected a duration such as 30m, 2h, 7d\n")
          :format(tostring(args[i + 1])))
        return 2
      end
      i = i + 2
    elseif a == "--room" then
      opts.room = args[i + 1]
      if not (opts.room or ""):match("^[^:]+:.+$") then
        io.stderr:write("segue: rules test: --room expects backend:room\n")
        return 2
      end
      i = i + 2
    elseif a:sub(1, 2) == "--" then
      io.stderr:write(("segue: rules test: unknown option %s\n"):format(a))
      return usage()
    elseif not path then path, i = a, i + 1
    elseif not cfg_path then cfg_path, i = a, i + 1
    else return usage() end
  end
  if not path then return usage() end
  local cfg = require("segue.cli").config_or_fail(cfg_path)
  if not cfg then return 1 end
  local segue = require "segue"
  local ok, code = pcall(segue.await, function()
    return M.run(cfg, require("segue.fs").realpath(path) or path, opts, function(s) io.stdout:write(s) end)
  end, 120000)
  if not ok then io.stderr:write("segue: rules test: ", tostring(code), "\n") return 1 end
  return code
end

--- check_in_coroutine(cfg) -> true | nil, why: the same check inside the
--- running host (a coroutine; the loop is already running).
function M.check_in_coroutine(cfg)
  local lines = {}
  local code, sum = M.run(cfg, cfg.rules, { since = 86400 }, function(s) lines[#lines + 1] = s end)
  if code ~= 0 then return nil, "the rules do not load or their self-test fails" end
  if sum.new_errors > 0 then
    return nil, ("the dry run of %s had %d filter/rewrite error(s): %s"):format(cfg.rules, sum.new_errors,
      (table.concat(lines):match("! new rules: ([^\n]*)") or ""))
  end
  return true
end

--- check_before_reload(cfg) -> true | nil, why: `rules_check = "dry-run"`:
--- the rules must load, pass their self-test and replay the last day
--- without a filter or rewrite error.
function M.check_before_reload(cfg)
  if not cfg.rules then return true end
  local segue = require "segue"
  local lines = {}
  local ok, code, sum = pcall(segue.await, function()
    return M.run(cfg, cfg.rules, { since = 86400 }, function(s) lines[#lines + 1] = s end)
  end, 120000)
  if not ok then return nil, tostring(code) end
  if code ~= 0 then return nil, "the rules do not load or their self-test fails" end
  if sum.new_errors > 0 then
    io.stderr:write(table.concat(lines))
    return nil, ("the dry run of %s had %d filter/rewrite error(s)"):format(cfg.rules, sum.new_errors)
  end
  io.stdout:write(lines[#lines] or "")
  return true
end

return M
