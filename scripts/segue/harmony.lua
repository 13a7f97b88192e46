-- `segue.harmony`: Harmony federation for scripts. The message codec and
-- tokens of the C module segue.harmony (encode, decode, types, keygen,
-- token_create, token_check), plus the federation on the wire:
--
--   segue.harmony.start(cfg) -> true | nil, err, code
--       cfg has the config's shape: { server_id =, listen =, data_dir =,
--       federation = { peers =, allow =, block =, token_window =,
--       unbound_token_window =, limits =, request_timeout_ms =, key_refetch_ms =,
--       key_fetch_rate =, key_fetch_private =, key_cache_size =, verify_in_pool = } };
--       boot calls it when the config sets
--       server_id or listen. Stopped when the host stops.
--   segue.harmony.call(server_id, method, msg [, cb] [, { sign_as = id }])
--       method: "protocol.sync.v1.PostboxService/Push" (or "Push", "Pull",
--       "NotifyNewId", "Key"); msg: a table of the method's request type.
--       With cb: cb(response) or cb(nil, err, code, http_status, identifier);
--       returns true, or nil, err, code when the call could not be made
--       (then cb is never called). Without cb, inside a coroutine: waits and
--       returns the same values.
--   segue.harmony.handle(method, fn) -> previous fn
--       fn(server_id, request) -> response [, written] | nil, message [, identifier, status]
--       answers an authenticated request; runs in its own coroutine.
--       written(ok, err), when given, runs once the response was written
--       to the socket whole (ok = true) or never will be (M.write_completion).
--   segue.harmony.handle_bytes(method, fn) -> previous fn
--       fn(server_id, bytes, req): the hot path's form of handle, for
--       handlers that keep bytes: no decode into a table, no coroutine. A
--       Push's `bytes` are its Event's (the body was decoded once, in C);
--       other methods get the request message's bytes. fn answers now or
--       later with req:respond(response_bytes) or req:error(status,
--       identifier [, message]) (req:on_done(fn) as for `written` above).
--       Replaces the method's handle(); handle() replaces it in turn.
--   segue.harmony.serve_pushes(obj, pushed) / serve_pushes(nil)
--       Pushes are stored in C by obj (segue.postbox_core's pb:serve_pushes:
--       no Lua per Push but pushed(server_id)), on this federation and the
--       next one started, until serve_pushes(nil) or handle/handle_bytes("Push").
--   segue.harmony.stop(), .port(), .public_key(), .server_id(), .running()
--
-- Until the postbox gives them their delivery semantics, the handlers are:
-- Push emits segue.emit("federation", server_id, event) and answers; Pull
-- answers an empty queue; NotifyNewId emits ("federation_new_id", old_id,
-- new_id). A key fetched from a peer emits ("federation_key", id, key).
local codec = require "segue.harmony_core"
local federation = require "segue.federation_core"
local core = require "segue.core"

local M = {}
for k, v in pairs(codec) do M[k] = v end

--- Handlers may return (response, written): see handle().
M.write_completion = true

--- method path -> { request type, response type }, from the C table
--- (runtime/harmony/federation.c), the one list of methods segue speaks.
M.methods = {}
for path, m in pairs(federation.methods) do M.methods[path] = { m.request, m.response } end

--- hRPC error identifiers and their statuses (runtime/harmony/hrpc_errors.h):
--- M.errors.UNAVAILABLE = { identifier = "hrpc.unavailable", status = 503 }.
M.errors = federation.errors

local short = {}
for path in pairs(M.methods) do short[path:match("/(%w+)$")] = path end

local running   -- the segue.federation object while started
local stop_on_stopping = false

-- `segue` requires this module: ask for it only when it is needed.
local function segue() return require "segue" end

-- Default handlers ------------------------------------------------------------

local handlers = {
  Push = function(server_id, req)
    segue().emit("federation", server_id, req.event)
    return {}
  end,
  Pull = function() return { event_queue = {} } end,
  NotifyNewId = function(server_id, req)
    core.log("info", "a peer announced a new server id", "peer", server_id, "new_id", req.new_server_id)
    segue().emit("federation_new_id", server_id, req.new_server_id)
    return {}
  end,
}

local byte_handlers = {}  -- method -> fn(server_id, bytes, req), see handle_bytes

local sink  -- { obj =, fn = }: who stores Pushes in C (serve_pushes)

local function sink_attach()
  if sink and running then sink.obj:serve_pushes(running, sink.fn) end
end

local function sink_detach()
  local s = sink
  sink = nil
  if s then pcall(s.obj.serve_pushes, s.obj, nil) end  -- (it may be closed)
end

function M.serve_pushes(obj, fn)
  sink_detach()
  if obj == nil then return end
  assert(type(fn) == "function", "pushed must be a function")
  sink = { obj = obj, fn = fn }
  sink_attach()
end

function M.handle(method, fn)
  assert(handlers[method], "method must be Push, Pull or NotifyNewId")
  assert(type(fn) == "function", "handler must be a function")
  local prev = byte_handlers[method] or handlers[method]
  handlers[method] = fn
  byte_handlers[method] = nil
  if method == "Push" then sink_detach() end
  return prev
end

function M.handle_bytes(method, fn)
  assert(handlers[method], "method must be Push, Pull or NotifyNewId")
  assert(type(fn) == "function", "handler must be a function")
  local prev = byte_handlers[method] or handlers[method]
  byte_handlers[method] = fn
  if method == "Push" then sink_detach() end
  return prev
end

local INTERNAL = M.errors.INTERNAL.identifier

-- Runs the handler of `method` and answers `req` with what it returns.
local function answer(method, server_id, msg, req)
  local r = table.pack(xpcall(handlers[method], debug.traceback, server_id, msg))
  if not r[1] then
    core.log("error", "federation handler: " .. tostring(r[2]), "peer", server_id, "method", method)
    return req:error(500, INTERNAL, "the handler failed")
  end
  local resp, err, identifier, status = r[2], r[3], r[4], r[5]
  if resp == nil then return req:error(status or 500, identifier or INTERNAL, err) end
  -- resp, written: written(ok, err) learns whether the response left whole
  local written = type(err) == "function" and err or nil
  local bytes, e = codec.encode(M.methods[short[method]][2], resp)
  if not bytes then
    core.log("error", "federation handler answered badly: " .. e, "peer", server_id, "method", method)
    if written then written(false, e) end
    return req:error(500, INTERNAL, "the handler's answer does not encode")
  end
  if written then
    local ok, derr = req:on_done(written)
    if not ok then written(false, derr) end
  end
  return req:respond(bytes)
end

local function dispatch(method, server_id, body, req, event)
  local raw = byte_handlers[method]
  if raw then
    local ok, err = pcall(raw, server_id, event or body, req)
    if not ok then
      core.log("error", "federation handler: " .. tostring(err), "peer", server_id, "method", method)
      if req:alive() then req:error(500, INTERNAL, "the handler failed") end
    end
    return
  end
  local msg, err = codec.decode(M.methods[short[method]][1], body)
  if not msg then return req:error(M.errors.BAD_UNARY.status, M.errors.BAD_UNARY.identifier, err) end
  segue().spawn(answer, method, server_id, msg, req)
end

-- Life cycle --------------------------------------------------------------------

function M.start(cfg)
  if running then return nil, "EEXIST: federation is already running", "EEXIST" end
  local fed = cfg.federation or {}
  local f, err, code = federation.start {
    data_dir = cfg.data_dir, server_id = cfg.server_id, listen = cfg.listen,
    peers = fed.peers, allow = fed.allow, block = fed.block,
    token_window = fed.token_window, unbound_token_window = fed.unbound_token_window,
    limits = fed.limits, request_timeout_ms = fed.request_timeout_ms,
    key_refetch_ms = fed.key_refetch_ms, key_fetch_rate = fed.key_fetch_rate,
    key_fetch_private = fed.key_fetch_private, key_cache_size = fed.key_cache_size,
    verify_in_pool = fed.verify_in_pool,
  }
  if not f then return nil, err, code end
  f:on_request(dispatch)
  f:on_key(function(id, key) segue().emit("federation_key", id, key) end)
  running = f
  sink_attach()
  if not stop_on_stopping then
    stop_on_stopping = true
    segue().on("stopping", M.stop)
  end
  return true
end

function M.stop()
  if not running then return end
  local f = running
  running = nil
  f:close()
end

--- The segue.federation object (key_get, key_put, on_key...) or nil.
function M.running() return running end
function M.port() return running and running:port() end
function M.public_key() return running and running:public_key() end
function M.server_id() return running and running:server_id() end

-- Calls ---------------------------------------------------------------------------

local function call_with(server_id, path, msg, cb, sign_as)
  local types = M.methods[path]
  local body, err, code = codec.encode(types[1], msg)
  if not body then return nil, err, code end
  if not running then
    return nil, "ECONFIG: federation is not started (set server_id and listen)", "ECONFIG"
  end
  return running:call(server_id, "/" .. path, body, function(bytes, e, c, status, identifier)
    if not bytes then return cb(nil, e, c, status, identifier) end
    local resp, derr, dcode = codec.decode(types[2], bytes)
    if not resp then return cb(nil, derr, dcode, 200) end
    cb(resp)
  end, sign_as)
end

function M.call(server_id, method, msg, cb, opts)
  if type(cb) == "table" then cb, opts = nil, cb end
  local sign_as = opts and opts.sign_as
  assert(type(server_id) == "string", "server_id must be a string")
  assert(type(method) == "string", "method must be a string")
  assert(type(msg) == "table", "message must be a table")
  local path = short[method] or method:gsub("^/", "")
  if not M.methods[path] then error("unknown hRPC method '" .. method .. "'", 2) end
  -- "segue" is required here, not at load: it requires this module.
  return require("segue").call("segue.harmony.call",
    function(done) return call_with(server_id, path, msg, done, sign_as) end, cb)
end

-- `segue key [CONFIG]` --------------------------------------------------------------

--- key_command(path): prints the server id and the public key (standard
--- base64) of the config at `path` (nil: the embedded default), creating the
--- key pair in its data_dir when there is none yet.
function M.key_command(path)
  local cfg, errors = require("segue.cli").load_config(path)
  if not cfg then
    for _, e in ipairs(errors) do io.stderr:write(e, "\n") end
    return nil, #errors .. " problem(s) in the config"
  end
  local key, err = federation.load_key(cfg.data_dir)
  if not key then return nil, err end
  io.stdout:write(("server_id %s\npublic_key %s\n"):format(cfg.server_id or "(not set)", key))
  if not cfg.server_id then
    io.stderr:write(([[
segue: key: the config sets no server_id, so peers cannot verify this key yet.
Set it to the address peers reach this server at, domain:port (and listen,
where segue accepts their calls), e.g. in %s:
  server_id = "chat.example.org:2289"
  listen    = "127.0.0.1:2289"
then give peers the server_id and public_key lines above (docs/federation.md).
]]):format(path or "your config (segue config --default > segue.lua)"))
  end
  return true
end

return M
