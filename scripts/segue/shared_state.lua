--- segue.shared_state: the rules' `state` table survives a takeover on a
--- shared store (several instances on one PostgreSQL, docs/scaling.md).
---
--- The instance holding the lease "backends" (segue.boot) writes the table
--- as JSON into the kv key "rules.state" at each lease renewal when it
--- changed (so at most every lease_ms / 3), and once more when it releases
--- the lease (a clean stop). The write happens only while the instance still
--- holds the lease (db:kv_set_held, one transaction), so an instance that
--- lost it never overwrites what its successor loaded. An instance that
--- takes the lease over loads the table before it starts any backend and
--- fills the rules' `state` table in place (the top-level table stays the
--- same; nested tables are new ones).
---
--- What is kept: strings, finite numbers, booleans, and tables that are
--- either lists (keys 1..n) or have string keys only, nested. What is not:
--- functions, coroutines, userdata, NaN and infinities, tables with other
--- keys (numbers that are not a list, booleans, tables), cycles; a list with
--- such an element is left out whole. What is left out is logged (once per
--- change of what is left out). Integers and floats with no fraction both
--- come back as integers (JSON has one number type). Changes made after the
--- last write are lost with `kill -9` of the owner: at most lease_ms / 3 of
--- them.
local json = require "segue.json"
local segue = require "segue"

local M = {}

M.KEY = "rules.state"
M.LEASE = "backends"

local held = false       -- the state is loaded: this instance may write it
local saved              -- the JSON text last written or loaded
local told               -- what was left out, as last logged

local function rules_state() return require("segue.router").rules_state() end

-- A copy of v that JSON keeps, or nil (with the paths left out in `out`).
local function plain(v, path, out, seen)
  local t = type(v)
  if t == "string" or t == "boolean" then return v end
  if t == "number" then
    if v ~= v or v == math.huge or v == -math.huge then out[#out + 1] = path return nil end
    return v
  end
  if t ~= "table" then out[#out + 1] = path .. " (" .. t .. ")" return nil end
  if seen[v] then out[#out + 1] = path .. " (a cycle)" return nil end
  seen[v] = true
  local n, strings, others = rawlen(v), 0, 0
  for k in pairs(v) do
    if type(k) == "string" then strings = strings + 1
    elseif not (math.type(k) == "integer" and k >= 1 and k <= n) then others = others + 1 end
  end
  local copy
  if others > 0 or (strings > 0 and n > 0) then
    out[#out + 1] = path .. " (a table whose keys are not a list or strings)"
  elseif n > 0 then
    copy = {}
    for i = 1, n do
      local x = plain(v[i], ("%s[%d]"):format(path, i), out, seen)
      if x == nil then copy = nil break end
      copy[i] = x
    end
  else
    copy = {}
    for k, x in pairs(v) do copy[k] = plain(x, path .. "." .. k, out, seen) end
  end
  seen[v] = nil
  return copy
end

--- encode() -> the JSON text of the rules' state, and what was left out.
function M.encode()
  local out = {}
  local copy = plain(rules_state(), "state", out, {}) or {}
  local text, err = json.encode(copy)
  if not text then out[#out + 1] = "state (" .. tostring(err) .. ")" text = "{}" end
  return text, out
end

--- take(db): the lease was won: loads the state (in a coroutine). true, or
--- nil, err: then nothing may run yet (the caller retries at the next
--- renewal), or the state the previous owner left would be overwritten.
function M.take(db)
  local text, err, code = db:kv_get(M.KEY)
  if code then return nil, err end
  if text then
    local value = json.decode(text)
    if type(value) ~= "table" then
      segue.log.warn("rules state in the store is not a JSON object; starting from the current one")
    else
      local st = rules_state()
      for k in pairs(st) do st[k] = nil end
      for k, v in pairs(value) do st[k] = v end
    end
  end
  saved, held = text, true
  segue.log.info(("rules state %s"):format(text and ("loaded (%d bytes)"):format(#text) or "none in the store yet"))
  return true
end

--- lost(): the lease is gone (to another instance, or not renewed in time).
function M.lost() held = false end

function M.held() return held end

local function write(db, instance, cb)
  if not held then return end
  local text, out = M.encode()
  local left = table.concat(out, ", ")
  if left ~= (told or "") then
    told = left
    if left ~= "" then segue.log.warn("rules state: not kept across instances: " .. left) end
  end
  if text == saved then return end
  if cb then return db:kv_set_held(M.KEY, text, M.LEASE, instance, cb(text)) end
  local ok, err = db:kv_set_held(M.KEY, text, M.LEASE, instance)
  if ok then saved = text
  elseif ok == false then held = false  -- another instance holds the lease
  else segue.log.warn("rules state not written: " .. tostring(err)) end
end

--- save(db, cfg): at a renewal (in a coroutine): written when changed.
function M.save(db, cfg) write(db, cfg.instance) end

--- release(db, cfg): before the lease is released (not in a coroutine: the
--- write goes out before the release, which waits for it).
function M.release(db, cfg)
  write(db, cfg.instance, function(text)
    return function(ok) if ok then saved = text end end
  end)
  held = false
end

return M
