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
local core = require "segue.core"

local M = {}

M.DEFAULT_FORMAT = "<{sender}@{backend}> "
-- The sandbox of rules and config (docs/hardening.md): what one run (a
-- load, a filter, a handler) may spend.
M.MAX_INSTRUCTIONS = 1000000
M.MAX_MEMORY = 64 * 1024 * 1024     -- bytes the Lua heap may grow by
M.MAX_STRING = 16 * 1024 * 1024     -- largest string.rep result
M.MAX_SUBJECT = 64 * 1024           -- largest subject of find, match, gmatch, gsub

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

-- What a sandboxed pcall must pass on instead of catching: the instruction
-- limit, the memory budget, a signal's interrupt (segue.core keeps them).
local function uncatchable()
  local tripped, mem, sig = core.sandbox_state()
  if tripped then return tripped end
  if mem then return "not enough memory" end
  if sig then return "interrupted by signal " .. sig end
end

local function guard(ok, ...)
  if not ok then
    local again = uncatchable()
    if again then error(again, 0) end
  end
  return ok, ...
end

local function copy(t)
  local c = {}
  for k, v in pairs(t) do c[k] = v end
  return c
end

--- sandbox([extra]) -> the globals of rules and config: no io, os.execute,
--- debug, load, require, coroutine or string.dump; pcall, xpcall and error
--- cannot swallow the limits; no __gc (it would run outside any limit).
--- Tables are copies, so assigning string.upper changes nothing outside.
function M.sandbox(extra)
  local string_ = copy(string)
  string_.dump = nil
  local safe = {
    string = string_, table = copy(table), math = copy(math), utf8 = copy(utf8),
    pairs = pairs, ipairs = ipairs, next = next, select = select,
    tostring = tostring, tonumber = tonumber, type = type, assert = assert,
    rawequal = rawequal, rawget = rawget, rawset = rawset, rawlen = rawlen,
    os = { getenv = os.getenv, time = os.time, date = os.date, clock = os.clock },
    _VERSION = _VERSION,
    pcall = function(f, ...) return guard(pcall(f, ...)) end,
    -- an error raised by the limit's hook runs the handler with hooks off:
    -- the handler is skipped then, or it could run for ever
    xpcall = function(f, h, ...)
      return guard(xpcall(f, function(e)
        if uncatchable() then return e end
        return h(e)
      end, ...))
    end,
    error = function(e, level)
      local again = uncatchable()
      if again then error(again, 0) end
      level = level or 1
      error(e, level > 0 and level + 1 or 0)
    end,
    getmetatable = function(v)
      if type(v) == "table" then return getmetatable(v) end
    end,
    setmetatable = function(t, mt)
      if type(mt) == "table" and rawget(mt, "__gc") ~= nil then
        error("setmetatable: __gc is not allowed here", 2)
      end
      return setmetatable(t, mt)
    end,
  }
  for k, v in pairs(extra or {}) do safe[k] = v end
  return safe
end

--- run_as(what, fn, ...) -> true, results... | false, err: calls fn with an
--- instruction limit ("<what> stopped after N instructions"), a memory
--- budget and bounded string functions; sandboxed code cannot catch them.
function M.run_as(what, fn, ...)
  core.sandbox_enter(what, M.MAX_INSTRUCTIONS, M.MAX_MEMORY, M.MAX_STRING, M.MAX_SUBJECT)
  local r = table.pack(xpcall(fn, debug.traceback, ...))
  local tripped, mem = core.sandbox_leave()
  if r[1] then return table.unpack(r, 1, r.n) end
  if tripped then return false, tripped end
  if mem then return false, ("%s used more than its memory budget of %d bytes"):format(what, M.MAX_MEMORY) end
  return false, r[2]
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

-- bridge{...} in a rules file: checked when the file runs. segue.core's
-- rule_bridge builds the record of a valid plain table (with `sig`, what
-- a reload compares to keep a bridge that did not change); anything else
-- goes through the Lua version below, which raises the exact error.
-- `level`: where the caller of bridge{...} is, for "file:line".
local function checked_bridge(t, level)
  local info = debug.getinfo(level, "Sl")
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

-- The bridge{...} of one load (a C function: segue.core's
-- rule_bridge_maker). kept: hash -> a bridge of the running rules; it hands
-- such a record out again when its definition is the same, once per load
-- (its field `taken` is then this load's token); checked_bridge(t, 3)
-- answers for what it declines.
local function bridge_maker(kept, token)
  return core.rule_bridge_maker(M.DEFAULT_FORMAT, kept, token, checked_bridge)
end

-- A fresh sandboxed environment per load; `require` loads a file next to
-- the rules file, fresh each time (and watched), and nothing else.
local function environment(dir, state, files, texts, kept, token)
  local env = setmetatable({ bridge = bridge_maker(kept, token), state = state }, { __index = M.sandbox() })
  env.require = function(name)
    if type(name) ~= "string" then error("require: expected a module name", 2) end
    local path = dir .. "/" .. name:gsub("%.", "/") .. ".lua"
    local f = io.open(path, "r")
    if not f then
      error(("require %q: rules may require only Lua files next to them (%s not found)"):format(name, path), 2)
    end
    local src = f:read("a")
    f:close()
    files[#files + 1] = path
    texts[path] = src
    local chunk, err = load(src, "@" .. path, "t", env)
    if not chunk then error(err, 0) end
    return chunk()
  end
  return env
end

-- -> errors, how many bridges of the previous load it holds, hash ->
-- bridge when all were checked (else the router patches the running set's,
-- or M.hashes makes it when needed). The bridges
-- are checked by segue.core's rule_validate (default names by position,
-- unique names, known backends; with ctx.checked, the running rules
-- checked against the same backends, only where they differ).
local function validate(set, ctx, file, token)
  local errors = {}
  if type(set) ~= "table" then return { file .. ":1: the rules file must return a table, not a " .. type(set) } end
  -- the keys after the list part (next from #set skips the bridges)
  local n = #set
  for k, v in next, set, n > 0 and n or nil do
    if math.type(k) ~= "integer" then
      if not set_keys[k] then errors[#errors + 1] = file .. ":1: unknown key " .. tostring(k)
      elseif type(v) ~= "function" then errors[#errors + 1] = file .. ":1: " .. k .. " must be a function" end
    end
  end
  local reused, by_hash = core.rule_validate(set, file, token, ctx.backends, errors, ctx.checked)
  return errors, reused, by_hash
end

--- hashes(set) -> set.by_hash: hash -> bridge for the bridges of set that
--- have one (a definition without functions), made if set has none yet;
--- a load given set as `previous` finds its bridges there.
function M.hashes(set)
  local by_hash = set.by_hash
  if not by_hash then
    by_hash = {}
    for i = 1, #set do
      local b = set[i]
      if b.hash then by_hash[b.hash] = b end
    end
    set.by_hash = by_hash
  end
  return by_hash
end

-- Reloading a data-only file ---------------------------------------------
--
-- Most rules files are data: `return {`, one `bridge { ... }` a line made
-- of literal strings, numbers, booleans and keys, `}`, and comments. Such a
-- line makes the same bridge whatever runs before or after it, so when a
-- reload finds such a file changed in a few lines, and the running set came
-- from its previous text, only those lines run (each compiled alone, at its
-- own line number); every other position keeps the running set's object, as
-- the full run would have handed it out again. Anything else, and anything
-- that fails on this path, runs the whole file as before (the same errors).

-- data_only(src) -> true when src is such a file (segue.core says which).
local data_only = core.rule_data_only
M.data_only = data_only

-- The line number of bridge b ("file:line").
local function line_of(b)
  return tonumber(type(b.where) == "string" and b.where:match(":(%d+)$")) or -1
end

-- changed_data_lines(prev, old, new) -> { { pos =, line =, text = } ... }
-- for the bridge lines of new that differ from old (a data-only text whose
-- set is prev) when new is old with at most MAX_FAST lines changed in place
-- and each changed line is a bridge line in both, or blank or a comment in
-- both; nil otherwise.
local MAX_FAST = 16
-- a blank line or a comment that does not open a long one
local function blank(l)
  return not l:find("[\\'%[%(]") and (l:find("^[ \t\r]*$") or l:find("^[ \t\r]*%-%-"))
end
local function changed_data_lines(prev, old, new)
  -- the common head and tail, by bisection on the bytes
  local lo, hi = 0, math.min(#old, #new)
  while lo < hi do
    local mid = (lo + hi + 1) // 2
    if old:sub(1, mid) == new:sub(1, mid) then lo = mid else hi = mid - 1 end
  end
  local head = lo
  lo, hi = 0, math.min(#old, #new) - head
  while lo < hi do
    local mid = (lo + hi + 1) // 2
    if old:sub(-mid) == new:sub(-mid) then lo = mid else hi = mid - 1 end
  end
  local tail = lo
  -- widened to whole lines: from the start of head's last line to the
  -- first newline inside the common tail (the same one in both texts, so
  -- that what follows is the same), or the end
  local from = head
  while from > 0 and old:byte(from) ~= 10 do from = from - 1 end
  local old_to = old:find("\n", #old - tail + 1, true) or #old + 1
  local new_to = new:find("\n", #new - tail + 1, true) or #new + 1
  -- as many lines in both, and few (a newline is looked for MAX_FAST times)
  local function lines(text, a, b)
    local n = 0
    for _ = 1, MAX_FAST do
      a = text:find("\n", a, true)
      if not a or a >= b then return n end
      n, a = n + 1, a + 1
    end
  end
  local n_old, n_new = lines(old, from + 1, old_to), lines(new, from + 1, new_to)
  if not n_new or n_old ~= n_new then return nil end
  local olds, news = old:sub(from + 1, old_to - 1), new:sub(from + 1, new_to - 1)
  local first = select(2, old:sub(1, from):gsub("\n", "")) + 1
  local old_lines, out, i = {}, {}, 0
  for l in (olds .. "\n"):gmatch("([^\n]*)\n") do old_lines[#old_lines + 1] = l end
  for l in (news .. "\n"):gmatch("([^\n]*)\n") do
    i = i + 1
    local o = old_lines[i]
    if l ~= o then
      local line = first + i - 1
      -- the position of line's bridge in prev (bisection on `where`)
      local a, b = 1, #prev
      while a < b do
        local m = (a + b) // 2
        if line_of(prev[m]) < line then a = m + 1 else b = m end
      end
      local pos = prev[a] and line_of(prev[a]) == line and a or nil
      if pos then
        if not data_only("return {\n" .. l .. "\n}") then return nil end
        out[#out + 1] = { pos = pos, line = line, text = l }
      elseif not (blank(l) and blank(o)) then
        return nil
      end
    end
  end
  return out
end

-- finish(set, ctx, path, token, files, texts, env [, data]) -> set | nil,
-- errors: the checks, then what a loaded set carries (data_text: the text
-- when it is data only; `data` when the caller knows it is).
local function finish(set, ctx, path, token, files, texts, env, data)
  local errors, reused, by_hash = validate(set, ctx, path, token)
  if #errors > 0 then return nil, errors end
  set.files, set.texts, set.state, set.path, set.reused = files, texts, env.state, path, reused
  set.by_hash = by_hash
  local src = texts[path]
  if data or (#files == 1 and data_only(src)) then set.data_text = src end
  return set
end

local function dir_of(path) return path:match("^(.*)/[^/]*$") or "." end

-- fast_load(path, ctx, src) -> set (nil: run the whole file). The changed
-- lines run in the environment a full run would have; the running set's
-- objects at the other positions count as handed out again (`taken`).
local function fast_load(path, ctx, src)
  local prev = ctx.previous
  if not (prev and prev.data_text and prev.path == path and #prev.files == 1) then return nil end
  local changes = changed_data_lines(prev, prev.data_text, src)
  if not changes then return nil end
  local token = {}
  local files, texts = { path }, { [path] = src }
  local env = environment(dir_of(path), ctx.state or {}, files, texts, M.hashes(prev), token)
  local set = table.move(prev, 1, #prev, 1, {})
  for i = 1, #set do set[i].taken = token end
  for _, c in ipairs(changes) do set[c.pos].taken = nil end
  for _, c in ipairs(changes) do
    -- the line without what follows its closing brace (a comma, a comment)
    local masked = c.text:gsub('"[^"\n]*"', function(q) return ("x"):rep(#q) end)
    local close = masked:sub(1, (masked:find("--", 1, true) or #masked + 1) - 1):match(".*()}")
    local chunk = load(("\n"):rep(c.line - 1) .. "return " .. c.text:sub(1, close), "@" .. path, "t", env)
    local ok, b = false, nil
    if chunk then ok, b = M.run(chunk) end
    if not ok or type(b) ~= "table" then
      for i = 1, #prev do if prev[i].taken == token then prev[i].taken = nil end end
      return nil
    end
    set[c.pos] = b
  end
  -- (errors: the whole file runs, and reports them as it always has)
  set = finish(set, ctx, path, token, files, texts, env, true)
  if set then M.fast_loads = M.fast_loads + 1 end
  return set
end
M.fast_loads = 0  -- reloads that ran only the changed lines (for specs)

--- load(path, ctx) -> set | nil, errors
--- ctx: { backends = { name = true }, state = table carried over,
--- previous = the running set (its bridges that did not change are reused:
--- set.reused counts them; M.hashes(previous) finds them),
--- checked = the running set if it was checked against these backends,
--- text = the text of path if the caller read it }
--- set.files lists the files it ran (path first), set.texts their texts.
function M.load(path, ctx)
  local src = ctx.text
  if not src then
    local f, err = io.open(path, "r")
    if not f then return nil, { path .. ":1: cannot read the rules: " .. tostring(err) } end
    src = f:read("a")
    f:close()
  end
  local fast = fast_load(path, ctx, src)
  if fast then return fast end
  local dir = dir_of(path)
  -- compiles and runs the file in a fresh environment: files, texts, env,
  -- token, set | nil, errors
  local function run()
    local files, texts = { path }, { [path] = src }
    local token = {}
    local env = environment(dir, ctx.state or {}, files, texts, ctx.previous and M.hashes(ctx.previous), token)
    local chunk, cerr = load(src, "@" .. path, "t", env)
    if not chunk then return nil, nil, nil, nil, nil, { cerr } end
    local ok, set = M.run(chunk)
    if not ok then return nil, nil, nil, nil, nil, { (tostring(set):match("^[^\n]*")) } end
    return files, texts, env, token, set
  end
  local files, texts, env, token, set, failed = run()
  -- The router reloads with the collector stopped: a file that makes more
  -- garbage than its memory budget runs once more with it running.
  if failed and not collectgarbage("isrunning")
    and (failed[1]:find("used more than its memory budget", 1, true) or failed[1]:find("not enough memory", 1, true)) then
    collectgarbage("restart")
    collectgarbage()
    files, texts, env, token, set, failed = run()
    collectgarbage("stop")
  end
  if failed then return nil, failed end
  return finish(set, ctx, path, token, files, texts, env)
end

return M
