-- The config loader: a config is a Lua file evaluated in the sandbox of
-- segue.rules (no io, os.execute, debug, load or require; bounded in
-- instructions, memory and string sizes); it sets globals (`data_dir = "..."`) or returns a
-- table. Defaults come from a metatable. Every problem is collected and
-- reported as "file:line: key.path: message", so `segue check` shows all of
-- them at once.
local fs = require "segue.fs"

local M = {}

M.defaults = {
  data_dir = "./segue-data",
  log_level = "info",
  backends = {},
  scripts = {},
  limits = {},
}

-- Limits and time-outs, allowed in `limits` (for every backend) and in each
-- backend (for that one). All positive integers.
M.limit_keys = {
  init_timeout_ms = "InitInfo must arrive within this time (default 10000)",
  request_timeout_ms = "each try of a request times out after this (default 30000)",
  stop_grace_ms = "graceful stop: stdin closed, then SIGTERM, then SIGKILL, this far apart (default 5000)",
  restart_backoff_ms = "first restart delay, doubling (default 100)",
  restart_max_doublings = "restarts before giving up, 100 ms doubling (default 11: up to 102.4 s)",
  retry_max_tries = "tries of a request answered with retry = true (default 10)",
  retry_backoff_ms = "first retry delay, doubling (default 100)",
  max_line_bytes = "largest JSON value a backend may send (default 67108864)",
  max_depth = "deepest JSON nesting, MessageContent included (default 64, at most 128)",
  max_attachment_bytes = "largest decoded attachment (default 16777216)",
  max_queue_bytes = "requests waiting for a backend (not yet read by it), in bytes; past it requests fail with ELIMIT (default 16777216)",
}

local top_keys = {
  data_dir = "string", log_level = "string", backends = "table",
  scripts = "table", limits = "table", rules = "string",
  server_id = "string", listen = "string", federation = "table",
  store = "table", instance = "string", lease_ms = "number", rules_check = "string",
  http = "table", replay_window_ms = "number",
}
-- replay_window_ms: at most an hour (a window holds copies in memory)
M.MAX_REPLAY_WINDOW_MS = 3600000
local process_keys = { cmd = true, args = true, env = true, env_file = true, cwd = true }
local lua_keys = { script = true, options = true }
local log_levels = { error = true, warn = true, info = true, debug = true }

-- Where keys are: a scan of the source for `name =` and `["name"] =` with
-- comments and strings skipped, so an error can name the line of the key.
local function scan_keys(src)
  local keys, i, line, n = {}, 1, 1, #src
  local function newlines(a, b)
    local _, c = src:sub(a, b):gsub("\n", "")
    line = line + c
  end
  while i <= n do
    local c = src:sub(i, i)
    if c == "\n" then line = line + 1; i = i + 1
    elseif src:match("^%-%-%[=*%[", i) then
      local eq = src:match("^%-%-%[(=*)%[", i)
      local _, e = src:find("]" .. eq .. "]", i, true)
      e = e or n
      newlines(i, e); i = e + 1
    elseif src:match("^%-%-", i) then
      i = (src:find("\n", i, true) or n + 1)
    elseif c == '"' or c == "'" then
      local j = i + 1
      while j <= n and src:sub(j, j) ~= c do
        if src:sub(j, j) == "\\" then j = j + 1 end
        j = j + 1
      end
      local key = src:match("^%[%s*$", math.max(1, i - 1)) and src:sub(i + 1, j - 1)
      if key and src:match("^%s*%]%s*=[^=]", j + 1) then keys[#keys + 1] = { key, line } end
      newlines(i, j); i = j + 1
    elseif src:match("^%[=*%[", i) then
      local eq = src:match("^%[(=*)%[", i)
      local _, e = src:find("]" .. eq .. "]", i, true)
      e = e or n
      newlines(i, e); i = e + 1
    elseif c:match("[%a_]") then
      local word, j = src:match("^([%w_]+)()", i)
      if src:match("^%s*=[^=]", j) then keys[#keys + 1] = { word, line } end
      i = j
    else
      i = i + 1
    end
  end
  return keys
end

-- The line of key path {"backends", "irc", "cmd"}: each key searched after
-- the previous one; the deepest found wins.
local function line_of(keys, path)
  local line, from = nil, 1
  for _, name in ipairs(path) do
    for k = from, #keys do
      if keys[k][1] == name then line, from = keys[k][2], k + 1; break end
    end
  end
  return line or 1
end

local Checker = {}
Checker.__index = Checker

function Checker:error(path, fmt, ...)
  local where = self.file .. ":" .. line_of(self.keys, path)
  self.errors[#self.errors + 1] = where .. ": " .. table.concat(path, ".") .. ": " .. fmt:format(...)
end

local function describe(v)
  if type(v) == "string" then return ("string %q"):format(v) end
  return type(v) .. (type(v) == "number" and (" " .. tostring(v)) or "")
end

function Checker:type(path, v, want)
  if type(v) ~= want then
    self:error(path, "expected a %s, found %s", want, describe(v))
    return false
  end
  return true
end

function Checker:path(p)
  if p:sub(1, 1) == "/" then return p end
  return (self.dir .. "/" .. p):gsub("/%./", "/"):gsub("/%.$", "")
end

local function push(path, key)
  local p = { table.unpack(path) }
  p[#p + 1] = key
  return p
end

function Checker:string_list(path, v)
  if not self:type(path, v, "table") then return {} end
  local out = {}
  for k, item in pairs(v) do
    if math.type(k) ~= "integer" then
      self:error(push(path, tostring(k)), "expected a list of strings, found key %s", describe(k))
    elseif self:type(push(path, "[" .. k .. "]"), item, "string") then
      out[k] = item
    end
  end
  return out
end

function Checker:limits(path, v, into)
  for k, n in pairs(v) do
    local p = push(path, tostring(k))
    if not M.limit_keys[k] then
      -- caller reports unknown keys in backends; here only limits live
      if path[#path] == "limits" then self:error(p, "unknown limit") end
    elseif math.type(n) ~= "integer" or n <= 0 then
      self:error(p, "expected a positive integer, found %s", describe(n))
    else
      into[k] = n
    end
  end
  return into
end

-- KEY=VALUE lines, `#` comments, optional `export ` and quotes.
function Checker:env_file(path, file, into)
  local f, err = io.open(file, "r")
  if not f then return self:error(path, "cannot read env file: %s", err) end
  local n = 0
  for line in f:lines() do
    n = n + 1
    local s = line:gsub("^%s+", ""):gsub("%s+$", "")
    if s ~= "" and s:sub(1, 1) ~= "#" then
      local k, val = s:gsub("^export%s+", ""):match("^([%a_][%w_]*)%s*=%s*(.*)$")
      if not k then
        self.errors[#self.errors + 1] = ("%s:%d: expected KEY=VALUE"):format(file, n)
      else
        into[#into + 1] = k .. "=" .. (val:match('^"(.*)"$') or val:match("^'(.*)'$") or val)
      end
    end
  end
  f:close()
end

local function find_in_path(cmd)
  for dir in (os.getenv("PATH") or "/usr/bin:/bin"):gmatch("[^:]+") do
    if fs.executable(dir .. "/" .. cmd) then return dir .. "/" .. cmd end
  end
end

function Checker:process_backend(path, b, out)
  out.kind = "process"
  if self:type(push(path, "cmd"), b.cmd, "string") then
    if b.cmd:find("/", 1, true) then
      out.cmd = self:path(b.cmd)
      if not fs.executable(out.cmd) then
        self:error(push(path, "cmd"), "%s is not an executable file", out.cmd)
      end
    else
      out.cmd = find_in_path(b.cmd)
      if not out.cmd then self:error(push(path, "cmd"), "program %q not found in PATH", b.cmd) end
    end
  end
  out.args = b.args == nil and {} or self:string_list(push(path, "args"), b.args)
  out.env = {}
  if b.env_file ~= nil and self:type(push(path, "env_file"), b.env_file, "string") then
    self:env_file(push(path, "env_file"), self:path(b.env_file), out.env)
  end
  if b.env ~= nil and self:type(push(path, "env"), b.env, "table") then
    for k, v in pairs(b.env) do
      local p = push(push(path, "env"), tostring(k))
      if type(k) ~= "string" or not k:match("^[%a_][%w_]*$") then
        self:error(push(path, "env"), "bad variable name %s", describe(k))
      elseif type(v) ~= "string" and type(v) ~= "number" and type(v) ~= "boolean" then
        self:error(p, "expected a string, found %s", describe(v))
      else
        out.env[#out.env + 1] = k .. "=" .. tostring(v)
      end
    end
  end
  if b.cwd ~= nil and self:type(push(path, "cwd"), b.cwd, "string") then
    out.cwd = self:path(b.cwd)
    if fs.stat(out.cwd) ~= "directory" then
      self:error(push(path, "cwd"), "%s is not a directory", out.cwd)
    end
  end
end

function Checker:lua_backend(path, b, out)
  out.kind = "lua"
  if not self:type(push(path, "script"), b.script, "string") then return end
  if b.options ~= nil and self:type(push(path, "options"), b.options, "table") then
    out.options = b.options
  end
  out.options = out.options or {}
  if not b.script:find("[/.]") then
    out.source, out.chunkname = require("segue.core").builtin_backend(b.script)
    if not out.source then
      self:error(push(path, "script"), "no built-in backend named %q (a file path needs a / or .lua)", b.script)
    end
    out.chunkname = out.chunkname and ("@" .. out.chunkname)
  else
    out.script = self:path(b.script)
    local f, err = io.open(out.script, "r")
    if not f then return self:error(push(path, "script"), "cannot read %s", err) end
    out.source = f:read("a")
    f:close()
    out.chunkname = "@" .. out.script
  end
  if out.source then
    local _, err = load(out.source, out.chunkname, "t")
    if err then self.errors[#self.errors + 1] = err end
  end
end

function Checker:backend(name, b)
  local path = { "backends", tostring(name) }
  if type(name) ~= "string" or not name:match("^[%w_%-%.]+$") then
    return self:error(path, "a backend name is letters, digits, '_', '-' or '.'")
  end
  if not self:type(path, b, "table") then return end
  local out = { name = name, limits = {} }
  for k, v in pairs(self.config_limits) do out.limits[k] = v end
  for k in pairs(b) do
    if not (process_keys[k] or lua_keys[k] or M.limit_keys[k]) then
      self:error(push(path, tostring(k)), "unknown key (a backend has cmd, args, env, env_file, cwd, or script, options, and limits)")
    end
  end
  self:limits(path, b, out.limits)
  if b.cmd ~= nil and b.script ~= nil then
    self:error(path, "has both cmd and script: a backend is a program or a Lua script")
  elseif b.script ~= nil then
    self:lua_backend(path, b, out)
  elseif b.cmd ~= nil then
    self:process_backend(path, b, out)
  else
    self:error(path, "needs cmd (a program) or script (a Lua backend)")
  end
  for k in pairs(lua_keys) do
    if out.kind == "process" and b[k] ~= nil then self:error(push(path, k), "only for Lua backends (script)") end
  end
  for k in pairs(process_keys) do
    if out.kind == "lua" and b[k] ~= nil then self:error(push(path, k), "only for program backends (cmd)") end
  end
  return out
end

function Checker:check(raw)
  local cfg = { file = self.file, backends = {}, scripts = {}, limits = {} }
  for k, v in pairs(raw) do
    if not top_keys[k] then
      self:error({ tostring(k) }, "unknown key (expected one of data_dir, log_level, backends, scripts, limits, rules, server_id, listen, federation, store, instance, lease_ms, rules_check, replay_window_ms, http)")
    else
      self:type({ k }, v, top_keys[k])
    end
  end
  setmetatable(raw, { __index = M.defaults })
  if type(raw.data_dir) == "string" then cfg.data_dir = self:path(raw.data_dir) end
  if type(raw.log_level) == "string" then
    if not log_levels[raw.log_level] then
      self:error({ "log_level" }, "expected error, warn, info or debug, found %s", describe(raw.log_level))
    end
    cfg.log_level = raw.log_level
  end
  if type(raw.rules_check) == "string" then
    if raw.rules_check ~= "dry-run" and raw.rules_check ~= "self-test" then
      self:error({ "rules_check" }, "expected \"dry-run\" or \"self-test\", found %s", describe(raw.rules_check))
    end
    cfg.rules_check = raw.rules_check
  end
  if raw.replay_window_ms ~= nil then
    local w = raw.replay_window_ms
    if math.type(w) ~= "integer" or w < 0 or w > M.MAX_REPLAY_WINDOW_MS then
      self:error({ "replay_window_ms" }, "expected an integer from 0 to %d (milliseconds), found %s",
        M.MAX_REPLAY_WINDOW_MS, describe(w))
    else
      cfg.replay_window_ms = w
    end
  end
  if type(raw.limits) == "table" then self.config_limits = self:limits({ "limits" }, raw.limits, cfg.limits) end
  if type(raw.backends) == "table" then
    for name, b in pairs(raw.backends) do
      cfg.backends[#cfg.backends + 1] = self:backend(name, b)
    end
    table.sort(cfg.backends, function(a, b) return a.name < b.name end)
  end
  if type(raw.rules) == "string" then
    cfg.rules = self:path(raw.rules)
    local _, err = loadfile(cfg.rules, "t")
    if err then self:error({ "rules" }, "%s", err) end
  end
  self:federation(raw, cfg)
  self:store(raw, cfg)
  self:http(raw, cfg)
  if type(raw.scripts) == "table" then
    for i, s in ipairs(self:string_list({ "scripts" }, raw.scripts)) do
      local p = self:path(s)
      local _, err = loadfile(p, "t")
      if err then self:error({ "scripts", "[" .. i .. "]" }, "%s", err) end
      cfg.scripts[i] = p
    end
  end
  return cfg
end

-- The store and instances (docs/scaling.md) ---------------------------------

M.DEFAULT_LEASE_MS = 10000

-- The host's name, for the default instance name.
local function hostname()
  local f = io.open("/proc/sys/kernel/hostname")
  local name = f and f:read("l")
  if f then f:close() end
  return (name and name ~= "") and name or "localhost"
end

--- default_instance(): "host:pid", the name of an instance without `instance`.
function M.default_instance()
  return hostname() .. ":" .. fs.getpid()
end

-- store = { engine = "sqlite" | "postgresql", dsn = "...", path = "...", pool = n },
-- instance = "name", lease_ms = n into cfg (sqlite's path: data_dir/segue.db
-- unless given; see M.store_options).
function Checker:store(raw, cfg)
  local st = { engine = "sqlite" }
  if type(raw.store) == "table" then
    for k, v in pairs(raw.store) do
      local p = { "store", tostring(k) }
      if k == "engine" then
        if v ~= "sqlite" and v ~= "postgresql" then
          self:error(p, "expected \"sqlite\" or \"postgresql\", found %s", describe(v))
        else
          st.engine = v
        end
      elseif k == "dsn" then
        if self:type(p, v, "string") then st.dsn = v end
      elseif k == "path" then
        if self:type(p, v, "string") then st.path = self:path(v) end
      elseif k == "pool" then
        if math.type(v) ~= "integer" or v < 1 or v > 64 then
          self:error(p, "expected an integer from 1 to 64, found %s", describe(v))
        else
          st.pool = v
        end
      else
        self:error(p, "unknown key (expected one of engine, dsn, path, pool)")
      end
    end
    if st.engine == "postgresql" and not st.dsn then
      self:error({ "store", "dsn" }, "engine postgresql needs a dsn (a libpq connection string or postgresql:// URI)")
    end
  end
  cfg.store = st
  if type(raw.instance) == "string" then
    if not raw.instance:match("^[%w][%w%.%-_:@]*$") then
      self:error({ "instance" }, "expected a name of letters, digits and . - _ : @, found %s", describe(raw.instance))
    end
    cfg.instance = raw.instance
  else
    cfg.instance = M.default_instance()
  end
  cfg.lease_ms = M.DEFAULT_LEASE_MS
  if raw.lease_ms ~= nil then
    if math.type(raw.lease_ms) ~= "integer" or raw.lease_ms < 100 then
      self:error({ "lease_ms" }, "expected an integer of at least 100 (milliseconds), found %s", describe(raw.lease_ms))
    else
      cfg.lease_ms = raw.lease_ms
    end
  end
end

--- store_options(cfg): what segue.store.open takes for cfg's store.
function M.store_options(cfg)
  local st = cfg.store or { engine = "sqlite" }
  if st.engine == "postgresql" then return { engine = "postgresql", dsn = st.dsn, pool = st.pool } end
  return { engine = "sqlite", path = st.path or (cfg.data_dir .. "/segue.db") }
end

-- Federation (docs/federation.md) ------------------------------------------

-- `federation` keys: what each holds.
local federation_keys = {
  peers = "table", allow = "table", block = "table", limits = "table",
  token_window = "integer", request_timeout_ms = "integer", key_refetch_ms = "integer",
  unbound_token_window = "integer", key_fetch_rate = "integer", key_cache_size = "integer",
  key_fetch_private = "boolean", verify_in_pool = "boolean",
  -- the postbox (docs/postbox.md)
  push_tries = "integer", push_backoff_ms = "integer", queue_limit = "integer",
  deliver_tries = "integer", deliver_backoff_ms = "integer", pull_interval_ms = "integer",
  pull_backoff_ms = "integer", pull_max_bytes = "integer",
}
M.federation_limit_keys = {
  max_body_bytes = "largest request body (default 1048576)",
  max_header_bytes = "largest request head (default 16384)",
  header_timeout_ms = "a request's head must arrive within this (default 5000)",
  body_timeout_ms = "a request's body must arrive within this (default 30000)",
  idle_timeout_ms = "a kept-alive connection may idle this long (default 60000)",
  max_connections = "connections at once (default and ceiling: ulimit -n less a reserve)",
  max_connections_per_address = "connections at once from one IP address (default max_connections / 8)",
}

-- "domain:port" (or "[v6]:port"): the port is not optional.
local function valid_server_id(s)
  local host, port = s:match("^(.+):(%d+)$")
  host = host and (host:match("^%[[%x:%.]+%]$") or host:match("^[%w][%w%.%-]*$"))
  port = tonumber(port)
  return host ~= nil and port ~= nil and port >= 1 and port <= 65535
end

-- An IP literal and a port: "127.0.0.1:2289", "[::1]:2289".
local function valid_listen(s)
  local port = s:match("^%d+%.%d+%.%d+%.%d+:(%d+)$") or s:match("^%[[%x:%.]+%]:(%d+)$")
  port = tonumber(port)
  return port ~= nil and port <= 65535
end

function Checker:server_ids(path, list)
  local out = self:string_list(path, list)
  for i, id in pairs(out) do
    if not valid_server_id(id) then
      self:error(push(path, "[" .. i .. "]"), "expected a server id domain:port, found %s", describe(id))
    end
  end
  return out
end

-- A peers entry: a base URL, or { url = <base URL>, require_audience = true }
-- (the peer's tokens must name us: segue's audience extension).
function Checker:peer_entry(p, val)
  local url = val
  if type(val) == "table" then
    for k in pairs(val) do
      if k ~= "url" and k ~= "require_audience" then
        self:error(push(p, tostring(k)), "unknown peers option (expected url, require_audience)")
      end
    end
    if val.require_audience ~= nil and type(val.require_audience) ~= "boolean" then
      self:error(push(p, "require_audience"), "expected a boolean, found %s", describe(val.require_audience))
    end
    url = val.url
  end
  if type(url) ~= "string" or not url:match("^https?://[^/]") then
    return self:error(p, "expected a base URL (http:// or https://), found %s", describe(url))
  end
  if type(val) == "table" then return { url = url, require_audience = val.require_audience == true } end
  return url
end

function Checker:federation_value(path, k, v)
  if federation_keys[k] == "integer" then
    if math.type(v) == "integer" and v > 0 then return v end
    return self:error(path, "expected a positive integer, found %s", describe(v))
  end
  if federation_keys[k] == "boolean" then
    if type(v) == "boolean" then return v end
    return self:error(path, "expected a boolean, found %s", describe(v))
  end
  if not self:type(path, v, "table") then return end
  if k == "allow" or k == "block" then return self:server_ids(path, v) end
  local out = {}
  for key, val in pairs(v) do
    local p = push(path, tostring(key))
    if k == "peers" then
      if type(key) ~= "string" or not valid_server_id(key) then
        self:error(p, "expected a server id domain:port as the key")
      else
        out[key] = self:peer_entry(p, val)
      end
    elseif not M.federation_limit_keys[key] then
      self:error(p, "unknown limit")
    elseif math.type(val) ~= "integer" or val <= 0 then
      self:error(p, "expected a positive integer, found %s", describe(val))
    else
      out[key] = val
    end
  end
  return out
end

-- server_id, listen and federation = { ... } into cfg.
function Checker:federation(raw, cfg)
  if type(raw.server_id) == "string" then
    if not valid_server_id(raw.server_id) then
      self:error({ "server_id" }, "expected domain:port (the port is required), found %s", describe(raw.server_id))
    end
    cfg.server_id = raw.server_id
  end
  if type(raw.listen) == "string" then
    if not valid_listen(raw.listen) then
      self:error({ "listen" }, "expected an IP address and port (\"127.0.0.1:2289\", \"[::1]:2289\"), found %s",
        describe(raw.listen))
    end
    cfg.listen = raw.listen
  end
  cfg.federation = {}
  if type(raw.federation) ~= "table" then return end
  for k, v in pairs(raw.federation) do
    local p = { "federation", tostring(k) }
    if not federation_keys[k] then
      self:error(p, "unknown key (expected one of peers, allow, block, token_window, unbound_token_window, limits, "
        .. "request_timeout_ms, key_refetch_ms, key_fetch_rate, key_fetch_private, key_cache_size, verify_in_pool, "
        .. "push_tries, push_backoff_ms, queue_limit, deliver_tries, deliver_backoff_ms, pull_interval_ms, "
        .. "pull_backoff_ms, pull_max_bytes)")
    else
      cfg.federation[k] = self:federation_value(p, k, v)
    end
  end
end

-- The client API (docs/api.md) ----------------------------------------------

-- `http` keys besides `listen`: positive integers.
M.http_keys = {
  max_body_bytes = "largest request body (default 1048576)",
  max_header_bytes = "largest request head (default 16384)",
  header_timeout_ms = "a request's head must arrive within this (default 10000)",
  body_timeout_ms = "a request's body must arrive within this (default 30000)",
  max_connections = "connections at once (default 1024)",
  max_streams = "stream clients at once; more get 503 (default 256)",
  stream_buffer_bytes = "unsent bytes a stream client may fall behind before it is closed (default 4194304)",
  keepalive_ms = "a stream sends a keep-alive comment this often (default 15000)",
  max_events = "events kept for playback (default 100000)",
  max_page = "largest `limit` of a messages page (default 500)",
}

-- http = { listen = "127.0.0.1:7070", ... } into cfg.http.
function Checker:http(raw, cfg)
  if type(raw.http) ~= "table" then return end
  local out = {}
  for k, v in pairs(raw.http) do
    local p = { "http", tostring(k) }
    if k == "listen" then
      if type(v) ~= "string" or not valid_listen(v) then
        self:error(p, "expected an IP address and port (\"127.0.0.1:7070\", \"[::1]:7070\"), found %s", describe(v))
      else
        out.listen = v
      end
    elseif k == "advertise" then
      if type(v) ~= "string" or not (v:match("^[%w%.%-]+:%d+$") or v:match("^%[[%x:%.]+%]:%d+$")) then
        self:error(p, "expected a host and port (\"10.0.0.5:7070\", \"[fd00::5]:7070\"), found %s", describe(v))
      else
        out.advertise = v
      end
    elseif not M.http_keys[k] then
      local names = {}
      for name in pairs(M.http_keys) do names[#names + 1] = name end
      table.sort(names)
      self:error(p, "unknown key (expected listen, advertise, %s)", table.concat(names, ", "))
    elseif math.type(v) ~= "integer" or v <= 0 then
      self:error(p, "expected a positive integer, found %s", describe(v))
    else
      out[k] = v
    end
  end
  if raw.http.listen == nil then
    self:error({ "http" }, "http.listen is required (e.g. \"127.0.0.1:7070\")")
  end
  cfg.http = out
end

--- load_string(source, chunkname, dir) -> config | nil, { "file:line: message", ... }
--- `dir` is where relative paths start (the config file's directory).
function M.load_string(source, chunkname, dir)
  local file = chunkname:gsub("^[@=]", "")
  local rules = require "segue.rules"
  local env = setmetatable({}, { __index = rules.sandbox() })
  local chunk, err = load(source, "@" .. file, "t", env)
  if not chunk then return nil, { err } end
  -- A config that loops for ever would hang `segue check` and the start,
  -- where no signal is handled yet: stop it (the rules' instruction limit).
  local ok, ret = rules.run_as("the config", chunk)
  if not ok then return nil, { (tostring(ret):match("^[^\n]*")) } end
  local raw = {}
  for k, v in next, env do raw[k] = v end
  if ret ~= nil then
    if type(ret) ~= "table" then return nil, { file .. ":1: the config returned a " .. type(ret) .. ", expected a table" } end
    if next(raw) then return nil, { file .. ":1: the config both sets globals and returns a table; do one" } end
    raw = ret
  end
  local c = setmetatable({ file = file, dir = dir or fs.cwd(), keys = scan_keys(source), errors = {}, config_limits = {} }, Checker)
  local cfg = c:check(raw)
  if #c.errors > 0 then return nil, c.errors end
  return cfg
end

--- check_backend(name, def [, dir]) -> normalized backend | nil, errors:
--- one backend entry as in `backends`, for segue.add_backend.
function M.check_backend(name, def, dir)
  local c = setmetatable({ file = "(backend " .. tostring(name) .. ")", dir = dir or fs.cwd(), keys = {},
    errors = {}, config_limits = {} }, Checker)
  local b = c:backend(name, def)
  if #c.errors > 0 then return nil, c.errors end
  return b
end

--- load_file(path) -> config | nil, errors
function M.load_file(path)
  local f, err = io.open(path, "r")
  if not f then return nil, { ("%s:1: cannot read the config: %s"):format(path, err) } end
  local source = f:read("a")
  f:close()
  local dir = path:match("^(.*)/[^/]*$") or "."
  local abs = fs.realpath(dir) or dir
  return M.load_string(source, path, abs)
end

return M
