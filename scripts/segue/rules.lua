-- The rule DSL and its loader. A rules file returns the rule set:
--
--   return {
--     bridge { "irc:#segue", "memory:#general" },                 -- the common case, one line
--     bridge {
--       name = "ops", format = "[{backend}] {sender}: ",
--       "irc:#ops",
--       { "memory:#ops-log", mode = "out" },                     -- only receives
--       filter = function(msg, ctx) return ctx.sender ~= "bot" end,
--       rewrite = function(msg, ctx) ... return msg end,
--       fallback = "pass", edits = "ignore",
--     },
--     on_message = function(msg, ctx) end,    -- every MessageUpsert, before bridges
--     on_room = function(backend, update) end,
--     on_federation = function(server_id, event) end,
--     test = function(simulate) assert(#simulate("irc:#segue", "hi") == 1) end,
--   }
--
-- Loading compiles the file as text, runs it in a fresh environment under an
-- instruction limit, validates everything and runs the self-test; only then
-- is the new set handed out, so a broken file changes nothing.
local M = {}

M.DEFAULT_FORMAT = "<{sender}@{backend}> "
M.MAX_INSTRUCTIONS = 1000000

local bridge_keys = {
  name = "string", format = "string", filter = "function", rewrite = "function",
  fallback = "string", edits = "string", deletes = "string", max_attachment_bytes = "number",
  long = "string",
}
local set_keys = { on_message = true, on_room = true, on_federation = true, test = true }
local choices = {
  fallback = { drop = true, pass = true },
  edits = { resend = true, ignore = true },
  deletes = { ignore = true, notice = true },
  long = { split = true, cut = true },
  mode = { both = true, ["in"] = true, out = true },
}

--- run_as(what, fn, ...) -> true, results... | false, err: calls fn with an
--- instruction-count limit, so code that loops for ever is stopped
--- ("<what> stopped after N instructions").
function M.run_as(what, fn, ...)
  local count = 0
  local limit = M.MAX_INSTRUCTIONS // 1000
  debug.sethook(function()
    count = count + 1
    if count > limit then error(what .. " stopped after " .. M.MAX_INSTRUCTIONS .. " instructions", 2) end
  end, "", 1000)
  local r = table.pack(xpcall(fn, debug.traceback, ...))
  debug.sethook()
  return table.unpack(r, 1, r.n)
end

--- run(fn, ...): run_as for rules.
function M.run(fn, ...) return M.run_as("rule", fn, ...) end

local function parse_endpoint(spec, where)
  local t = type(spec) == "table" and spec or { spec }
  local s = t[1]
  if type(s) ~= "string" then error(where .. ": an endpoint is \"backend:room\"", 0) end
  local backend, room = s:match("^([%w_%-%.]+):(.+)$")
  if not backend then error(where .. ": endpoint " .. ("%q"):format(s) .. " is not \"backend:room\"", 0) end
  local mode = t.mode or "both"
  if not choices.mode[mode] then error(where .. ": mode must be both, in or out", 0) end
  if t.format ~= nil and type(t.format) ~= "string" then error(where .. ": format must be a string", 0) end
  return { backend = backend, room = room, mode = mode, format = t.format, key = s }
end

-- bridge{...} in a rules file: checked when the file runs.
local function bridge(t)
  local info = debug.getinfo(2, "Sl")
  local where = info and (info.short_src .. ":" .. info.currentline) or "rules"
  if type(t) ~= "table" then error(where .. ": bridge takes a table", 0) end
  local b = { kind = "bridge", where = where, endpoints = {} }
  for k, v in pairs(t) do
    if math.type(k) ~= "integer" then
      if not bridge_keys[k] then error(where .. ": bridge: unknown key " .. tostring(k), 0) end
      if type(v) ~= bridge_keys[k] then error(where .. ": bridge." .. k .. " must be a " .. bridge_keys[k], 0) end
      if choices[k] and not choices[k][v] then error(where .. ": bridge." .. k .. ": unknown choice " .. v, 0) end
      b[k] = v
    end
  end
  for i, e in ipairs(t) do b.endpoints[i] = parse_endpoint(e, where) end
  if #b.endpoints < 2 then error(where .. ": a bridge joins at least two endpoints", 0) end
  b.fallback, b.edits, b.deletes = b.fallback or "drop", b.edits or "resend", b.deletes or "ignore"
  b.format = b.format or M.DEFAULT_FORMAT
  return b
end

-- A fresh environment per load; `require` of a file next to the rules file
-- is loaded fresh too (and watched), anything else is the normal require.
local function environment(dir, state, files)
  local env = setmetatable({ bridge = bridge, state = state }, { __index = _G })
  env.require = function(name)
    local path = dir .. "/" .. name:gsub("%.", "/") .. ".lua"
    local f = io.open(path, "r")
    if not f then return require(name) end
    local src = f:read("a")
    f:close()
    files[#files + 1] = path
    local chunk, err = load(src, "@" .. path, "t", env)
    if not chunk then error(err, 0) end
    return chunk()
  end
  return env
end

local function validate(set, ctx, file)
  local errors, names = {}, {}
  if type(set) ~= "table" then return { file .. ":1: the rules file must return a table, not a " .. type(set) } end
  for k, v in pairs(set) do
    if math.type(k) ~= "integer" then
      if not set_keys[k] then errors[#errors + 1] = file .. ":1: unknown key " .. tostring(k)
      elseif type(v) ~= "function" then errors[#errors + 1] = file .. ":1: " .. k .. " must be a function" end
    end
  end
  for i, b in ipairs(set) do
    if type(b) ~= "table" or b.kind ~= "bridge" then
      errors[#errors + 1] = ("%s:1: entry %d is not a bridge{...}"):format(file, i)
    else
      b.name = b.name or ("bridge" .. i)
      if names[b.name] then errors[#errors + 1] = b.where .. ": duplicate bridge name " .. b.name end
      names[b.name] = true
      for _, e in ipairs(b.endpoints) do
        if ctx.backends and not ctx.backends[e.backend] then
          errors[#errors + 1] = b.where .. ": endpoint " .. e.key .. ": no backend named " .. e.backend
        end
      end
    end
  end
  return errors
end

--- load(path, ctx) -> set | nil, errors
--- ctx: { backends = { name = true }, state = table carried over }
function M.load(path, ctx)
  local f, err = io.open(path, "r")
  if not f then return nil, { path .. ":1: cannot read the rules: " .. tostring(err) } end
  local src = f:read("a")
  f:close()
  local dir = path:match("^(.*)/[^/]*$") or "."
  local files = { path }
  local env = environment(dir, ctx.state or {}, files)
  local chunk, cerr = load(src, "@" .. path, "t", env)
  if not chunk then return nil, { cerr } end
  local ok, set = M.run(chunk)
  if not ok then return nil, { (tostring(set):match("^[^\n]*")) } end
  local errors = validate(set, ctx, path)
  if #errors > 0 then return nil, errors end
  set.files, set.state, set.path = files, env.state, path
  return set
end

return M
