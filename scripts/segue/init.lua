-- The `segue` module: the API scripts, rules and backends use.
--
-- One shape everywhere: a request, response or update is the same table in
-- Lua as its JSON on the wire, e.g. { type = "RoomLookup", value = "#general" },
-- so spec/backend-protocol.md is also this API's reference.
local core = require "segue.core"
local loop = require "segue.loop"
local json = require "segue.json"
local metrics = require "segue.metrics"

local segue = {
  version = core.version,
  json = json,
  null = json.null,
}
-- segue.harmony (federation) is loaded when first used: a segue without
-- federation never needs it (nor its C modules).
setmetatable(segue, { __index = function(t, k)
  if k == "harmony" then
    local harmony = require "segue.harmony"  -- requires no "segue": no cycle
    rawset(t, k, harmony)
    return harmony
  end
end })

-- Logging -------------------------------------------------------------------

local function where(level)
  local info = debug.getinfo(level, "Sl")
  if not info or info.currentline < 0 then return nil end
  return info.short_src .. ":" .. info.currentline
end

local function render(...)
  local n = select("#", ...)
  local parts = {}
  for i = 1, n do parts[i] = tostring((select(i, ...))) end
  return table.concat(parts, " ")
end

segue.log = {}
for _, level in ipairs { "error", "warn", "info", "debug" } do
  -- segue.log.info(...): arguments joined like print; src= names the caller.
  segue.log[level] = function(...)
    local src = where(3)
    if src then core.log(level, render(...), "src", src)
    else core.log(level, render(...)) end
  end
end

-- Coroutines ----------------------------------------------------------------

-- An error nobody can catch: logged, and handed to the embedder's error_cb.
local function report(err)
  core.report(tostring(err))
end

-- Resumes `co`, reporting an error that escapes it.
local function resume(co, ...)
  local ok, err = coroutine.resume(co, ...)
  if not ok then report(debug.traceback(co, err)) end
end

--- Runs fn(...) in a new coroutine, so it may call blocking-style APIs
--- (request without a callback, segue.sleep). Errors are logged with a
--- traceback; the host goes on.
local function body(fn, ...)
  local ok, err = xpcall(fn, debug.traceback, ...)
  if not ok then report(err) end
  return ok, err
end

-- Coroutines are reused: one whose function returned waits in `idle` for
-- the next (a handler per update would otherwise cost a new coroutine each).
-- One that is waiting (yielded in a request, a sleep) is not idle, so only
-- its own callback resumes it.
--
-- A signal interrupts whatever Lua runs (bindings.h, sg__lenv_interrupt),
-- the pool's own steps too, outside body's xpcall: the slot is filled before
-- it is counted, and spawn takes only a coroutine that is waiting in the
-- pool's yield (one the interrupt ended is dead), so a spawn while segue
-- stops (its stopping handlers) still runs its function.
local idle, nidle = {}, 0
local MAX_IDLE = 64

local function worker(fn, ...)
  body(fn, ...)
  if nidle >= MAX_IDLE then return end
  idle[nidle + 1] = coroutine.running()
  nidle = nidle + 1
  -- Back in the pool: the next spawn resumes us with its fn and arguments.
  return worker(coroutine.yield())
end

function segue.spawn(fn, ...)
  local co
  while nidle > 0 and not co do
    co = idle[nidle]
    idle[nidle] = nil
    nidle = nidle - 1
    -- (an interrupt between these steps leaves an empty slot)
    if co and coroutine.status(co) ~= "suspended" then co = nil end
  end
  co = co or coroutine.create(worker)
  resume(co, fn, ...)
  return co
end

local function current_coroutine(what)
  local co, main = coroutine.running()
  if main then
    error(what .. " without a callback must run inside a coroutine (see segue.spawn)", 3)
  end
  return co
end

--- segue.call(what, start [, callback]): the callback-or-coroutine form of
--- an operation. start(cb) begins it and returns true (cb will run once,
--- possibly at once) or nil, err, code (cb never runs). With `callback`,
--- that is cb and start's result is returned; without, the calling coroutine
--- waits and gets what cb receives (an error names `what` outside one).
function segue.call(what, start, callback)
  if callback then return start(callback) end
  local co = current_coroutine(what)
  local result, waiting
  local started, err, code = start(function(...)
    if waiting then resume(co, ...) else result = table.pack(...) end
  end)
  if not started then return nil, err, code end
  if result then return table.unpack(result, 1, result.n) end
  waiting = true
  return coroutine.yield()
end

-- Timers --------------------------------------------------------------------

--- segue.timer(ms, fn): calls fn once after ms milliseconds; returns a timer
--- with :stop().
function segue.timer(ms, fn)
  return loop.timer(ms, 0, function() segue.spawn(fn) end)
end

--- segue.every(ms, fn): calls fn every ms milliseconds until :stop().
function segue.every(ms, fn)
  return loop.timer(ms, ms, function() segue.spawn(fn) end)
end

--- segue.sleep(ms): suspends the calling coroutine.
function segue.sleep(ms)
  local co = current_coroutine("segue.sleep")
  loop.timer(ms, 0, function() resume(co) end)
  coroutine.yield()
end

segue.now = loop.now

-- Backends ------------------------------------------------------------------

local Backend = {}
Backend.__index = Backend

local handles = setmetatable({}, { __mode = "v" })

--- segue.backend(name) -> a handle (the backend need not exist yet).
function segue.backend(name)
  assert(type(name) == "string", "backend name must be a string")
  local b = handles[name]
  if not b then
    b = setmetatable({ name = name }, Backend)
    handles[name] = b
  end
  return b
end

-- A request to a backend that does not exist says so in the log (a script
-- run with `segue exec` starts with no backends), once per name.
local warned_missing = {}
local function warn_no_backend(name)
  if warned_missing[name] then return end
  warned_missing[name] = true
  local names = {}
  for _, b in ipairs(core.backends()) do names[#names + 1] = b.name end
  table.sort(names)
  core.log("warn", ("request to backend %q: there is no backend of that name (backends: %s); "
    .. "add one with segue.add_backend or in the config's backends"):format(name,
    #names > 0 and table.concat(names, ", ") or "none"))
end

--- backend:request(body [, callback]): with a callback, it is called with
--- (response_body) or (nil, err, code, error_body); returns true, or
--- nil, err, code when the request could not be made (then the callback is
--- never called). Without a callback, inside a coroutine, it waits and
--- returns the same values. err is "ETIMEDOUT: ...", "EBACKEND: ...",
--- "EDEAD: ...", "EPROTO: ..."; code is that name. A MessageSend whose value
--- has no `attachments` gets an empty list.
function Backend:request(body, callback)
  -- Convenience: a NewMessage without attachments has none (the wire
  -- requires the field; Lua callers should not have to write it).
  if type(body) == "table" and body.type == "MessageSend" and type(body.value) == "table"
      and body.value.attachments == nil then
    body.value.attachments = {}
  end
  return segue.call("request", function(cb)
    local t0 = loop.hrtime()
    local ok, err, code = core.request(self.name, body, function(r, rerr, rcode, ...)
      metrics.request(self.name, r and "ok" or rcode, t0)
      return cb(r, rerr, rcode, ...)
    end)
    if not ok then metrics.request(self.name, code or "EINVAL", t0) end
    if not ok and code == "ENOBACKEND" then warn_no_backend(self.name) end
    return ok, err, code
  end, callback)
end

--- backend:info() -> { name, kind, state, restarts, pid, inflight,
--- capabilities } or nil; capabilities are what the backend announced over
--- the defaults (segue.degrade).
function Backend:info()
  for _, b in ipairs(core.backends()) do
    if b.name == self.name then
      b.capabilities = require("segue.degrade").capabilities(b.capabilities, b.name)
      return b
    end
  end
end

--- segue.add_backend(name, def) -> true | nil, err, code: adds and starts a
--- backend at run time; `def` is a `backends` entry of the config
--- ({ script = "memory", options = {...} } or { cmd = "...", args = {...} }).
function segue.add_backend(name, def)
  warned_missing[name] = nil
  local b, errors = require("segue.config").check_backend(name, def)
  if not b then return nil, "ECONFIG: " .. table.concat(errors, "\n"), "ECONFIG" end
  local ok, err, code = require("segue.boot").add_backend(b)
  if not ok then return nil, err, code end
  return core.start_backend(name)
end

--- segue.remove_backend(name) -> true | nil, err, "ENOBACKEND": stops it
--- and forgets it.
function segue.remove_backend(name) return core.remove_backend(name) end

--- segue.backends() -> list of { name, kind, state, restarts, pid, inflight }
function segue.backends() return core.backends() end

-- Events --------------------------------------------------------------------

local handlers = {}
local handler_watchers = {}  -- event -> { fn(list), ... }: told each time its handlers change

--- segue.watch_handlers(event, fn) -> a function that removes the watcher:
--- fn(handlers) now and whenever the list of `event`'s handlers changes
--- (the router carries plain messages in C only while it alone listens to
--- "update"; the postbox calls into Lua for "federation" only while
--- someone listens). An event can have several watchers.
function segue.watch_handlers(event, fn)
  assert(type(fn) == "function", "watcher must be a function")
  local list = {}
  for i, w in ipairs(handler_watchers[event] or {}) do list[i] = w end
  list[#list + 1] = fn
  handler_watchers[event] = list  -- copy on write, like the handlers
  fn(handlers[event] or {})
  return function()
    local kept = {}
    for _, w in ipairs(handler_watchers[event] or {}) do
      if w ~= fn then kept[#kept + 1] = w end
    end
    handler_watchers[event] = kept[1] and kept or nil
  end
end

local function handlers_changed(event)
  for _, w in ipairs(handler_watchers[event] or {}) do w(handlers[event] or {}) end
end

--- segue.on(event, fn) -> a function that removes the handler.
--- Events: "update" (backend_name, update), "backend" (name, state, reason),
--- "reload" (), "stopping" (). Each handler runs in its own coroutine; an
--- error in one is logged and does not stop the others.
-- A handler list is never changed in place (copy on write), so emit walks
-- it without a copy even when a handler adds or removes handlers.
function segue.on(event, fn)
  assert(type(event) == "string", "event name must be a string")
  assert(type(fn) == "function", "handler must be a function")
  local list = { table.unpack(handlers[event] or {}) }
  list[#list + 1] = fn
  handlers[event] = list
  handlers_changed(event)
  return function()
    local cur = handlers[event] or {}
    for i, f in ipairs(cur) do
      if f == fn then
        local copy = { table.unpack(cur) }
        table.remove(copy, i)
        handlers[event] = copy
        handlers_changed(event)
        return true
      end
    end
    return false
  end
end

--- segue.listening(event) -> true when `event` has a handler now (a producer
--- may skip preparing what nobody would receive).
function segue.listening(event)
  local list = handlers[event]
  return list ~= nil and #list > 0
end

--- segue.emit(event, ...): runs the handlers of `event` (for scripts' own events).
function segue.emit(event, ...)
  local list = handlers[event]
  if not list then return end
  for i = 1, #list do segue.spawn(list[i], ...) end
end

--- segue.emit_checked(event, ...) -> true | nil, err: like segue.emit, but
--- tells whether every handler succeeded, for callers that must not lose
--- what they hand over (the postbox keeps an event whose handler failed, and
--- delivers it again). A handler that waits (yields) has taken the event
--- over: it counts as a success; its later errors are only logged.
function segue.emit_checked(event, ...)
  local errors = {}
  for _, fn in ipairs(handlers[event] or {}) do
    local co = coroutine.create(body)
    local resumed, ok, err = coroutine.resume(co, fn, ...)
    if not resumed then errors[#errors + 1] = tostring(ok)
    elseif coroutine.status(co) == "dead" and not ok then errors[#errors + 1] = tostring(err) end
  end
  if #errors > 0 then return nil, table.concat(errors, "\n") end
  return true
end

core.set_handler(function(event, ...) segue.emit(event, ...) end)

-- For `segue exec` scripts and specs: drive the loop from the top level ---------

--- segue.await(fn [, timeout_ms]): runs fn in a coroutine and the event loop
--- until fn returns; returns fn's results or raises its error. Only from the
--- top level of a `segue exec` script (not from a callback).
function segue.await(fn, timeout_ms)
  local done, results, failure = false, nil, nil
  segue.spawn(function()
    local r = table.pack(xpcall(fn, debug.traceback))
    if r[1] then results = r else failure = r[2] end
    done = true
  end)
  local deadline = loop.now() + (timeout_ms or 10000)
  local wake = loop.timer(50, 50, function() end)
  while not done and loop.now() < deadline do loop.run("once") end
  wake:stop()
  if failure then error(failure, 2) end
  if not done then error("segue.await: timed out after " .. (timeout_ms or 10000) .. " ms", 2) end
  return table.unpack(results, 2, results.n)
end

--- segue.wait(ms): runs the loop for ms milliseconds (top level only).
function segue.wait(ms)
  return segue.await(function() segue.sleep(ms) end, ms + 1000)
end

return segue
