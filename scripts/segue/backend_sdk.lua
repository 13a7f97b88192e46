-- The backend SDK: runs a backend written in Lua, in-process (behind the same
-- supervised interface as a child process) or standalone on stdin/stdout.
--
-- A backend file is called with (backend, options) and returns a table of
-- request handlers named like the RequestBody variants:
--
--   local backend, options = ...
--   return {
--     info = { name = "example", version = { 0, 1, 0 } },   -- optional
--     start = function() ... end,                           -- optional
--     stop = function() ... end,                            -- optional
--     RoomLookup = function(name, reply) return "#" .. name end,
--   }
--
-- A handler runs in its own coroutine as handler(value, reply, backend) and
-- answers by returning:
--   * a ResponseBody table ({ type = "RoomID", value = "#a" }), used as is;
--   * the answer's value ("#a" for RoomLookup, a Room table for RoomGet, any
--     true value for a request answered by Success);
--   * nil, message: an Error response (backend.error(msg, true) makes a
--     retryable one);
--   * nothing at all: it will call reply(...) later, with the same forms.
-- A handler that raises answers with an Error and the traceback is logged.
local core = require "segue.core"
local segue = require "segue"
local loop = require "segue.loop"

local M = {}

local apis = {}  -- backend name -> the running `backend` object

--- api(name) -> the `backend` object of a running in-process backend, so a
--- script can call what the backend exposes (memory's backend.post).
function M.api(name) return apis[name] end

local function to_body(request_type, ...)
  local v, err = ...
  if v == nil then
    return { type = "Error", value = { message = tostring(err or (request_type .. " handler returned nil")) } }
  end
  if type(v) == "table" and type(v.type) == "string" and getmetatable(v) == nil then return v end
  local expect = core.expected_response(request_type)
  if expect == "Success" then return { type = "Success" } end
  return { type = expect, value = v }
end

--- error(message [, retry]) -> an Error ResponseBody.
function M.error(message, retry)
  return { type = "Error", value = { message = tostring(message), retry = retry and true or false } }
end

-- The `backend` object a backend file receives.
local function new_api(name, options, emit)
  local api = { name = name, options = options, error = M.error, timers = {} }
  api.log = {}
  for _, level in ipairs { "error", "warn", "info", "debug" } do
    api.log[level] = function(...)
      local parts = {}
      for i = 1, select("#", ...) do parts[i] = tostring((select(i, ...))) end
      core.log(level, table.concat(parts, " "), "backend", name)
    end
  end
  --- backend:emit(update) (or backend.emit(update)) -> true | nil, err
  function api.emit(self, update)
    if update == nil and self ~= api then update = self end
    return emit(update)
  end
  -- Timers made here stop when the backend stops or restarts.
  function api.timer(ms, fn)
    local t = segue.timer(ms, fn)
    api.timers[#api.timers + 1] = t
    return t
  end
  function api.every(ms, fn)
    local t = segue.every(ms, fn)
    api.timers[#api.timers + 1] = t
    return t
  end
  api.sleep = segue.sleep
  return api
end

--- driver(name, spec, emit) -> { start, deliver, stop }
--- spec: { source, chunkname, options }; emit(value) sends InitInfo,
--- Responses and Updates to whoever hosts this backend.
function M.driver(name, spec, emit)
  local d = { unanswered = 0 }  -- requests not answered yet
  local handlers, api
  local generation = 0

  function d.start()
    generation = generation + 1
    api = new_api(name, spec.options or {}, emit)
    apis[name] = api
    local chunk, err = load(spec.source, spec.chunkname, "t")
    if not chunk then error(err, 0) end
    handlers = chunk(api, api.options)
    if type(handlers) ~= "table" then
      error(("%s: a backend returns a table of handlers, not a %s"):format(
        spec.chunkname:gsub("^@", ""), type(handlers)), 0)
    end
    local info = handlers.info or {}
    -- capabilities: segue's InitInfo extension (docs/spec/backend-protocol.md)
    local ok, e = emit { backend_name = info.name or name, backend_version = info.version or { 0, 0, 0 },
      protocol_version = { 0, 1, 0 }, capabilities = info.capabilities }
    if not ok then error(e, 0) end
    if handlers.start then segue.spawn(handlers.start, api) end
  end

  function d.deliver(request)
    local gen, seq, body = generation, request.sequence_number, request.body
    local answered = false
    d.unanswered = d.unanswered + 1
    local function reply(...)
      -- Once per request, and never into a later run of the backend.
      if answered or gen ~= generation then return false end
      answered = true
      d.unanswered = d.unanswered - 1
      return emit { sequence_number = seq, body = to_body(body.type, ...) }
    end
    local h = handlers and handlers[body.type]
    if type(h) ~= "function" then
      reply(nil, ("backend %s does not implement %s"):format(name, body.type))
      return
    end
    segue.spawn(function()
      local r = table.pack(xpcall(h, debug.traceback, body.value, reply, api))
      if not r[1] then
        api.log.error(body.type .. " handler failed: " .. tostring(r[2]))
        reply(nil, body.type .. " failed: " .. tostring(r[2]):match("[^\n]*"))
      elseif r.n > 1 then
        reply(table.unpack(r, 2, r.n))
      end
    end)
  end

  function d.stop()
    generation = generation + 1
    d.unanswered = 0
    if api then
      for _, t in ipairs(api.timers) do t:stop() end
    end
    if handlers and type(handlers.stop) == "function" then
      local ok, err = pcall(handlers.stop, api)
      if not ok then core.log("error", "stop failed: " .. tostring(err), "backend", name) end
    end
  end

  return d
end

--- in_process(name, spec, limits): registers a Lua backend with the host.
function M.in_process(name, spec, limits)
  local d = M.driver(name, spec, function(v) return core.emit(name, v) end)
  return core.add_lua_backend(name, d, limits)
end

--- standalone(name, spec, limits): this process is the backend, speaking the
--- protocol on stdin/stdout (`segue backend FILE.lua`). Ends at the end of
--- stdin; `on_end(err)` is called then.
function M.standalone(name, spec, limits, on_end)
  local function emit(v)
    local ok, err = core.stdio_write(v)
    if not ok then core.log("error", "cannot send: " .. tostring(err), "backend", name) end
    return ok, err
  end
  local d = M.driver(name, spec, emit)
  -- Open first: InitInfo goes out through the channel. Requests are read on
  -- later loop turns, after start.
  assert(core.stdio_open(function(request, err)
    if request then return d.deliver(request) end
    -- At the end of stdin, requests still being handled get their answers
    -- first (`printf '...' | segue backend x.lua` sees every reply), within
    -- the request time-out.
    local deadline = loop.now() + ((limits or {}).request_timeout_ms or 30000)
    local function finish()
      if not err and d.unanswered > 0 and loop.now() < deadline then
        return loop.timer(10, 0, finish)
      end
      d.stop()
      core.stdio_close()
      on_end(err)
    end
    finish()
  end, limits))
  d.start()
end

return M
