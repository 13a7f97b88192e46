--- segue.api: the client API, its event stream, /metrics, /status and the
--- web client (docs/api.md), on the HTTP server of runtime/web through
--- segue.http_core. This file is the policy: routes, authentication, JSON.
---
--- Every backend update (MessageUpsert, MessageDelete, RoomUpsert,
--- RoomDelete) becomes a durable event in the store (its id is the stream's
--- `id:`), in the same transaction as its effect on the message log, so a
--- client that reconnects with Last-Event-ID is replayed exactly what it
--- missed, in order, from the store.
---
--- The store's methods run on both engines: inside a coroutine (every
--- request is handled in one) or with a callback. On a shared store
--- (PostgreSQL, docs/scaling.md) every instance serves the API; the events
--- are appended by the instance that runs the backends, and every instance
--- with stream clients reads the events it has not sent yet from the store
--- every LIVE_POLL_MS, so a client connected to any instance gets them all.
local segue = require "segue"
local core = require "segue.core"
local json = require "segue.json"
local http = require "segue.http_core"
local loop = require "segue.loop"
local metrics = require "segue.metrics"

local M = {}

M.defaults = {
  max_streams = 256, stream_buffer_bytes = 4 * 1024 * 1024, keepalive_ms = 15000,
  max_events = 100000, max_page = 500,
}
local PAGE = 50            -- messages per page when no limit is given
local REPLAY_PAGE = 200    -- events read from the store at a time during playback
local PRUNE_EVERY = 1000   -- appends between prunes of the event log
M.LIVE_POLL_MS = 250       -- shared store: how often new events are read for the streams

local server, db, opts, data_dir, cfg_now
local shared = false       -- the store is shared by instances (postgresql)
local live = 0             -- shared: the newest event id sent to the streams (or known)
local streams = {}         -- req -> client; bounded by opts.max_streams
local nstreams = 0
local appended = 0
local timers = {}
local infos = setmetatable({}, { __mode = "k" })  -- req -> what it asked (method, path, headers, body)

metrics.define("segue_api_token_refusals_total", "counter",
  "API requests refused for their token, by reason (missing, malformed, unknown, not_admin).")
metrics.define("segue_api_stream_clients", "gauge", "Clients connected to /api/v1/stream.")
metrics.define("segue_api_requests_total", "counter", "API requests answered, by HTTP status.")

-- Answers ------------------------------------------------------------------------

local JSON_HEADERS = { ["Content-Type"] = "application/json", ["Cache-Control"] = "no-store" }

local function reply(req, status, value)
  metrics.inc("segue_api_requests_total", { status = tostring(status) })
  req:respond(status, JSON_HEADERS, json.encode(value))
end

local function fail(req, status, code, fmt, ...)
  reply(req, status, json.object { error = fmt:format(...), code = code })
end

-- Paths and queries ---------------------------------------------------------------

-- Percent-decoding; nil for a malformed escape.
local function unescape(s)
  if s:find("%%[^%x]") or s:find("%%%x[^%x]") or s:find("%%%x?$") then return nil end
  return (s:gsub("%%(%x%x)", function(h) return string.char(tonumber(h, 16)) end))
end

local function segments(path)
  local out = {}
  for seg in path:gmatch("[^/]+") do
    local d = unescape(seg)
    if not d then return nil end
    out[#out + 1] = d
  end
  return out
end

local function parse_query(q)
  local out = {}
  for pair in (q or ""):gmatch("[^&]+") do
    local k, v = pair:match("^([^=]*)=?(.*)$")
    k, v = unescape((k:gsub("+", " "))), unescape((v:gsub("+", " ")))
    if k and v then out[k] = v end
  end
  return out
end

-- Authentication ---------------------------------------------------------------------

local function refuse(req, reason, status, msg)
  metrics.inc("segue_api_token_refusals_total", { reason = reason })
  segue.log.info(("api: %s refused (%s)"):format(infos[req].path, reason))
  fail(req, status, status == 401 and "EAUTH" or "EFORBIDDEN", "%s", msg)
end

-- The user of the request's token ({name, admin, hash}), or nil after a 401.
-- The store is asked every time, so a removed user's token stops at once.
local function authenticate(req, query, allow_query_token)
  local h = infos[req].headers.authorization
  local token
  if h then
    token = h:match("^[Bb]earer +([%w%-_%.~+/=]+) *$")
    if not token then return refuse(req, "malformed", 401, "Authorization must be \"Bearer <token>\"") end
  elseif allow_query_token then
    token = query.access_token
  end
  if not token or token == "" then return refuse(req, "missing", 401, "a token is required (Authorization: Bearer <token>)") end
  local hash = http.token_hash(token)
  local name, admin = db:token_user(hash)
  if not name then return refuse(req, "unknown", 401, "the token is not valid") end
  return { name = name, admin = admin, hash = hash }
end

-- Routes ------------------------------------------------------------------------------

local routes = {}

function routes.backends(req)
  local out = {}
  for _, b in ipairs(segue.backends()) do
    out[#out + 1] = { name = b.name, kind = b.kind, state = b.state, restarts = b.restarts }
  end
  reply(req, 200, out)
end

function routes.rooms(req, user)
  local rooms, err, code = db:rooms(user.name)
  if not rooms then return fail(req, 500, code, "%s", err) end
  reply(req, 200, rooms)
end

-- A message of the log as the API shows it: the protocol's Message + backend.
local function api_message(backend, m)
  return {
    backend = backend, id = m.id, sender = m.sender, recipient = m.recipient,
    content = m.content, attachments = m.attachments or {}, create_time = m.create_time,
    edit_time = m.edit_time or m.create_time,
  }
end

local function positive(s, default, max)
  if s == nil then return default end
  local n = tonumber(s)
  if not n or math.type(n) ~= "integer" or n < 1 then return nil end
  return math.min(n, max)
end

local function page_of(backend, room, limit, before)
  local list, err, code = db:messages_page(backend, room, limit, before)
  if not list then return nil, err, code end
  local out = {}
  for _, m in ipairs(list) do
    if not m.deleted then out[#out + 1] = api_message(backend, m) end
  end
  return out
end

-- Shared store: a backend runs on the instance holding the lease
-- "backends" only. A send to a backend that does not run here (or a page of
-- history older than the log, which only the backend has) goes to that
-- instance's API (its address is in its row of `instances`, written by
-- segue.boot at each renewal), with the caller's token, and its answer
-- comes back as is. A request forwarded once is not forwarded again.
M.FORWARD_TIMEOUT_MS = 15000

local function holder_api()
  local leases, err = db:leases()
  if not leases then return nil, err end
  local holder
  for _, l in ipairs(leases) do if l.name == "backends" then holder = l.holder end end
  if not holder then return nil, "no instance runs the backends now" end
  if holder == cfg_now.instance then return nil, "the backends are starting on this instance" end
  local instances
  instances, err = db:instances()
  if not instances then return nil, err end
  for _, i in ipairs(instances) do
    if i.name == holder then
      local info = i.info and json.decode(i.info)
      if type(info) == "table" and type(info.api) == "string" then return info.api, holder end
      return nil, ("instance %s, which runs the backends, serves no client API"):format(holder)
    end
  end
  return nil, ("instance %s is not known"):format(holder)
end

-- One HTTP/1.1 exchange with another instance's API: status, body | nil, err.
local function exchange(addr, method, path, headers, body)
  local host, port = addr:match("^%[(.+)%]:(%d+)$")
  if not host then host, port = addr:match("^(.+):(%d+)$") end
  if not host then return nil, "malformed address " .. addr end
  local conn, err = require("segue.net").connect(host, tonumber(port), { timeout_ms = M.FORWARD_TIMEOUT_MS })
  if not conn then return nil, err end
  local timer = segue.timer(M.FORWARD_TIMEOUT_MS, function() conn:close() end)
  local lines = { ("%s %s HTTP/1.1"):format(method, path), "Host: " .. addr, "Connection: close",
    "Content-Length: " .. #body }
  for k, v in pairs(headers) do lines[#lines + 1] = k .. ": " .. v end
  local status, got, want = nil, {}, nil
  local ok
  ok, err = conn:write(table.concat(lines, "\r\n") .. "\r\n\r\n" .. body)
  if ok then
    local line
    line, err = conn:read_line()
    status = line and tonumber(line:match("^HTTP/1%.%d (%d%d%d)"))
    if line and not status then err = "not an HTTP answer" end
    while status do
      line, err = conn:read_line()
      if not line then status = nil break end
      if line == "" then break end
      local n = line:match("^[Cc]ontent%-[Ll]ength: *(%d+)")
      if n then want = tonumber(n) end
    end
    local size = 0
    while status and (not want or size < want) do
      local chunk, rerr, rcode = conn:read()
      if not chunk then  -- the end: fine only when no length was given
        if want or rcode ~= "EOF" then status, err = nil, rerr end
        break
      end
      got[#got + 1] = chunk
      size = size + #chunk
    end
  end
  timer:stop()
  conn:close()
  if not status then return nil, tostring(err or "no answer") end
  return status, table.concat(got)
end

local function forward(req, backend)
  local info = infos[req]
  if info.headers["x-segue-forwarded"] then
    return fail(req, 502, "EBACKEND", "backend %s does not run on this instance (%s) either", backend,
      cfg_now.instance)
  end
  local addr, who = holder_api()
  if not addr then return fail(req, 502, "EBACKEND", "backend %s does not run here: %s", backend, tostring(who)) end
  local status, body = exchange(addr, info.method, info.path .. (info.query and info.query ~= "" and "?" .. info.query or ""),
    { Authorization = info.headers.authorization or "", ["Content-Type"] = "application/json",
      ["X-Segue-Forwarded"] = cfg_now.instance }, info.body or "")
  if not status then
    return fail(req, 502, "EBACKEND", "backend %s runs on instance %s, which did not answer: %s", backend, who, body)
  end
  metrics.inc("segue_api_requests_total", { status = tostring(status) })
  req:respond(status, JSON_HEADERS, body)
end

-- Shared store: the backend is configured but runs on another instance.
local function elsewhere(backend)
  if not shared then return false end
  local b = segue.backend(backend):info()
  return b ~= nil and b.state ~= "running"
end

function routes.messages(req, user, backend, room, query)
  local limit = positive(query.limit, PAGE, opts.max_page)
  if not limit then return fail(req, 400, "EINVAL", "limit must be a positive integer") end
  local before = query.before
  local msgs, err, code = page_of(backend, room, limit, before)
  if not msgs then return fail(req, 500, code, "%s", err) end
  if before and #msgs == 0 and elsewhere(backend) then
    -- older than the shared log: the instance running the backend asks it
    return forward(req, backend)
  end
  if before and #msgs == 0 and segue.backend(backend):info() then
    -- The log has nothing older: ask the backend, whose older messages
    -- arrive as MessageUpsert updates (logged by on_update) before its answer.
    local ok, rerr = segue.backend(backend):request { type = "MessageGetBefore", value = before }
    if ok then
      msgs = page_of(backend, room, limit, before) or {}
      if #msgs == 0 then
        segue.sleep(100)  -- a backend may send its updates just after the answer
        msgs = page_of(backend, room, limit, before) or {}
      end
    else
      segue.log.info(("api: MessageGetBefore %s on %s: %s"):format(before, backend, rerr))
    end
  end
  if not before and #msgs > 0 then db:read_mark(user.name, backend, room, msgs[#msgs].create_time) end
  reply(req, 200, json.object { messages = msgs })
end

function routes.send(req, user, backend, room)
  if elsewhere(backend) then return forward(req, backend) end
  local body = json.decode(infos[req].body)
  if type(body) ~= "table" then return fail(req, 400, "EDECODE", "the body must be a JSON object") end
  local content = body.content
  if content == nil and type(body.text) == "string" then content = { type = "Text", value = body.text } end
  if type(content) ~= "table" then
    return fail(req, 400, "EINVAL", "the body needs \"text\" (a string) or \"content\" (a MessageContent)")
  end
  if not segue.backend(backend):info() then return fail(req, 404, "ENOBACKEND", "no backend %s", backend) end
  local r, err, code = segue.backend(backend):request { type = "MessageSend", value = {
    recipient = room, content = content, attachments = type(body.attachments) == "table" and body.attachments or {} } }
  if not r then
    local status = (code == "EPROTO" or code == "EINVAL") and 400 or 502
    return fail(req, status, code or "EBACKEND", "%s", tostring(err))
  end
  segue.log.info(("api: %s sent %s to %s:%s"):format(user.name, r.value, backend, room))
  reply(req, 201, json.object { id = r.value })
end

function routes.status(req)
  if shared then
    -- every instance, what it owns, the leases, and this instance's backends
    local instances, err, code = db:instances()
    local leases = instances and db:leases() or {}
    if not instances then return fail(req, 500, code or "ESTORE", "%s", tostring(err)) end
    return reply(req, 200, json.object { engine = "postgresql", instance = cfg_now.instance,
      instances = instances, leases = leases, backends = segue.backends() })
  end
  local st, err, code = require("segue.status").read(data_dir)
  if not st then return fail(req, 500, code or "ESTORE", "%s", tostring(err)) end
  reply(req, 200, st)
end

-- The postbox's queues as the last /metrics asked the store for them: asked
-- in the request, which may wait (a shared store answers later).
local queue_peers = {}

function routes.metrics(req)
  queue_peers = segue.call("metrics", function(cb)
    return require("segue.postbox_core").peers_of(db, cb)
  end) or {}
  metrics.set("segue_api_stream_clients", nil, nstreams)
  metrics.inc("segue_api_requests_total", { status = "200" })
  req:respond(200, { ["Content-Type"] = "text/plain; version=0.0.4; charset=utf-8", ["Cache-Control"] = "no-store" },
    metrics.render())
end

-- The stream ----------------------------------------------------------------------------

local function frame(ev)
  return ("id: %d\nevent: %s\ndata: {\"backend\":%s,\"value\":%s}\n\n")
    :format(ev.id, ev.type, json.encode(ev.backend), ev.value_json)
end

local function drop(client, why)
  if not streams[client.req] then return end
  streams[client.req] = nil
  nstreams = nstreams - 1
  if why then segue.log.info(("api: stream of %s closed: %s"):format(client.user.name, why)) end
  client.req:finish()
end

local function send(client, text)
  local ok, err = client.req:write(text)
  if not ok then drop(client, err) end
  return ok
end

-- Writes stored events after client.cursor while the client keeps up; a
-- client that falls behind stays in playback (live events are read from the
-- store later) until it has caught up.
-- Runs in a coroutine (the store may yield); one catch-up per client at a time.
local function catch_up(client)
  if client.catching then return end
  client.catching = true
  while streams[client.req] do
    if client.req:pending() > opts.stream_buffer_bytes // 2 then break end
    local events = db:events_after(client.cursor, REPLAY_PAGE)
    if not events or #events == 0 then client.replaying = false break end
    for _, ev in ipairs(events) do
      if not streams[client.req] then break end
      if ev.id > client.cursor then
        if not send(client, frame(ev)) then break end
        client.cursor = ev.id
      end
    end
  end
  client.catching = false
end

local function broadcast(ev)
  local text
  for _, client in pairs(streams) do
    if client.replaying then
      -- read from the store when it has caught up
    elseif client.cursor < ev.id then
      text = text or frame(ev)
      if send(client, text) then client.cursor = ev.id end
    end
  end
end

function routes.stream(req, user, query)
  if nstreams >= opts.max_streams then
    return fail(req, 503, "ELIMIT", "%d stream clients are connected already", opts.max_streams)
  end
  local last = infos[req].headers["last-event-id"] or query.last_event_id
  local cursor = last and tonumber(last)
  if last and (not cursor or math.type(cursor) ~= "integer" or cursor < 0) then
    return fail(req, 400, "EINVAL", "Last-Event-ID must be an event id")
  end
  local replaying = cursor ~= nil
  if not cursor then  -- live from now: after the newest event
    local lerr, lcode
    cursor, lerr, lcode = db:events_last()
    if not cursor then return fail(req, 500, lcode or "ESTORE", "%s", tostring(lerr)) end
  end
  local ok, err = req:stream(200, { ["Content-Type"] = "text/event-stream", ["Cache-Control"] = "no-store",
    ["X-Accel-Buffering"] = "no" })
  if not ok then return segue.log.info("api: stream not started: " .. tostring(err)) end
  local client = { req = req, user = user, cursor = cursor, replaying = replaying }
  streams[req] = client
  nstreams = nstreams + 1
  req:on_gone(function(why) drop(client, why) end)
  if not send(client, "retry: 1000\n: connected\n\n") then return end
  if client.replaying then catch_up(client) end
end

-- Stream clients whose user or token is gone are closed (checked every
-- second, one query per token); keep-alive comments
-- keep proxies from closing quiet streams; clients in playback go on.
-- Runs in a coroutine (the store may yield).
local function tick_streams(keepalive, check_tokens)
  local valid = {}  -- token hash -> still valid, asked once per tick
  local list = {}
  for _, client in pairs(streams) do list[#list + 1] = client end
  for _, client in ipairs(list) do
    local hash = client.user.hash
    if check_tokens and valid[hash] == nil then
      local name, _, code = db:token_user(hash)
      valid[hash] = name ~= nil or code ~= nil  -- a failed query revokes nothing
    end
    if not streams[client.req] then
      -- gone meanwhile
    elseif valid[hash] == false then
      drop(client, "the token was revoked")
    elseif client.replaying then
      catch_up(client)
    elseif keepalive then
      send(client, ": keep-alive\n\n")
    end
  end
end

-- Updates become events --------------------------------------------------------------------

local EVENT_TYPES = { MessageUpsert = true, MessageDelete = true, RoomUpsert = true, RoomDelete = true }

-- With a callback, so it works whatever called the update handlers: on
-- SQLite it runs at once, on PostgreSQL when the append committed (answers
-- come in call order, so events are broadcast in order).
local function on_update(backend, update)
  if not db or not EVENT_TYPES[update.type] then return end
  local value_json = nstreams > 0 and json.encode(update.value) or nil
  db:event_append(backend, update, function(id, err)
    if not id then return segue.log.error("api: cannot store an event: " .. tostring(err)) end
    if id == live + 1 then live = id end
    appended = appended + 1
    if appended % PRUNE_EVERY == 0 then db:events_prune(opts.max_events, function() end) end
    if nstreams > 0 then
      broadcast { id = id, backend = backend, type = update.type,
        value_json = value_json or json.encode(update.value) }
    end
  end)
end

-- Shared store: events appended by another instance (the one running the
-- backends) reach this instance's streams within LIVE_POLL_MS. Runs in a
-- coroutine.
local function poll_live()
  for _ = 1, 10 do  -- at most 10 pages a poll; the rest at the next
    local events = db:events_after(live, REPLAY_PAGE)
    if not events or #events == 0 then return end
    for _, ev in ipairs(events) do
      live = math.max(live, ev.id)
      broadcast(ev)
    end
    if #events < REPLAY_PAGE then return end
  end
end

-- The web client ------------------------------------------------------------------------------

local WEB_TYPES = { html = "text/html; charset=utf-8", js = "text/javascript; charset=utf-8",
  css = "text/css; charset=utf-8", svg = "image/svg+xml" }
-- Scripts and styles from segue only; images also as data: URLs (attachments).
local CSP = "default-src 'self'; img-src 'self' data:; script-src 'self'; style-src 'self'; "
  .. "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"

local function web(req, name)
  local body = core.web_file(name)
  local ext = name:match("%.(%w+)$")
  if not body or not WEB_TYPES[ext] then return fail(req, 404, "ENOTFOUND", "no such page") end
  metrics.inc("segue_api_requests_total", { status = "200" })
  req:respond(200, { ["Content-Type"] = WEB_TYPES[ext], ["Content-Security-Policy"] = CSP,
    ["X-Content-Type-Options"] = "nosniff", ["Cache-Control"] = "no-cache" }, body)
end

-- Dispatch ----------------------------------------------------------------------------------------

local function handle(req, info)
  infos[req] = info
  local segs = segments(info.path)
  if not segs then return fail(req, 400, "EINVAL", "malformed percent-encoding in the path") end
  local query = parse_query(info.query)
  local m, n = info.method, #segs
  local function allow(method) if m ~= method then fail(req, 405, "EMETHOD", "use %s", method) return false end return true end

  if n == 0 then return allow("GET") and web(req, "index.html") end
  if n == 1 and segs[1] ~= "metrics" and segs[1] ~= "status" and segs[1] ~= "api" then
    return allow("GET") and web(req, segs[1])
  end
  local admin_route = n == 1 and (segs[1] == "metrics" or segs[1] == "status")
  local api = segs[1] == "api" and segs[2] == "v1"
  if not admin_route and not api then return fail(req, 404, "ENOTFOUND", "no route %s", info.path) end
  local is_stream = api and n == 3 and segs[3] == "stream"
  local user = authenticate(req, query, is_stream)
  if not user then return end
  if admin_route then
    if not user.admin then return refuse(req, "not_admin", 403, "this route is for admins") end
    if not allow("GET") then return end
    return routes[segs[1]](req, user)
  end
  if n == 3 and segs[3] == "backends" then return allow("GET") and routes.backends(req, user) end
  if n == 3 and segs[3] == "rooms" then return allow("GET") and routes.rooms(req, user) end
  if is_stream then return allow("GET") and routes.stream(req, user, query) end
  if n == 6 and segs[3] == "rooms" and segs[6] == "messages" then
    if m == "GET" then return routes.messages(req, user, segs[4], segs[5], query) end
    if m == "POST" then return routes.send(req, user, segs[4], segs[5]) end
    return fail(req, 405, "EMETHOD", "use GET or POST")
  end
  fail(req, 404, "ENOTFOUND", "no route %s", info.path)
end

-- Life cycle ----------------------------------------------------------------------------------------

local function collect()
  metrics.reset("segue_backend_restarts_total")
  for _, b in ipairs(segue.backends()) do
    metrics.set("segue_backend_restarts_total", { backend = b.name }, b.restarts or 0)
  end
  metrics.reset("segue_postbox_queue_depth")
  for _, p in ipairs(queue_peers) do
    metrics.set("segue_postbox_queue_depth", { peer = p.server_id }, p.queued or 0)
  end
  -- segue.flow keeps the router's per-bridge counters (also for `segue status`)
  metrics.reset("segue_messages_routed_total")
  for name, c in pairs(require("segue.flow").bridges) do
    metrics.set("segue_messages_routed_total", { bridge = name, outcome = "sent" }, c.sent)
    metrics.set("segue_messages_routed_total", { bridge = name, outcome = "failed" }, c.failed)
  end
  local r = require("segue.router").status
  metrics.set("segue_rules_loads_total", nil, r.loads or 0)
  metrics.set("segue_rules_load_failures_total", nil, r.failures or 0)
end
metrics.collect(function() if db then collect() end end)

--- start(cfg, store) -> true | nil, err: serves cfg.http.listen.
function M.start(cfg, store)
  if server then return nil, "the API is running already" end
  if not store then return nil, "the API needs the store" end
  db, data_dir, cfg_now = store, cfg.data_dir, cfg
  shared = store:engine() == "postgresql"
  live = 0
  opts = setmetatable({}, { __index = M.defaults })
  for k, v in pairs(cfg.http) do opts[k] = v end
  local limits = { max_body_bytes = opts.max_body_bytes, max_header_bytes = opts.max_header_bytes,
    header_timeout_ms = opts.header_timeout_ms, body_timeout_ms = opts.body_timeout_ms,
    max_connections = opts.max_connections, max_pending_bytes = opts.stream_buffer_bytes }
  local srv, err = http.listen(cfg.http.listen, limits, function(req, info)
    segue.spawn(handle, req, info)
  end)
  if not srv then return nil, err end
  server = srv
  local offs = { segue.on("update", on_update) }
  local ticks = 0
  local keep_every = math.max(1, opts.keepalive_ms // 250)
  local busy = false
  timers[#timers + 1] = loop.timer(250, 250, function()
    ticks = ticks + 1
    if nstreams == 0 or busy then return end
    busy = true
    local keepalive, check = ticks % keep_every == 0, ticks % 4 == 0
    segue.spawn(function()
      local ok, err = pcall(tick_streams, keepalive, check)
      busy = false
      if not ok then segue.log.error("api: streams: " .. tostring(err)) end
    end)
  end)
  if shared then
    -- the newest event now: streams get what comes after it
    local polling = true
    segue.spawn(function()
      local last = db:events_last()
      live = math.max(live, last or 0)
      polling = false
    end)
    timers[#timers + 1] = loop.timer(M.LIVE_POLL_MS, M.LIVE_POLL_MS, function()
      if nstreams == 0 or polling then return end
      polling = true
      segue.spawn(function()
        local ok, err = pcall(poll_live)
        polling = false
        if not ok then segue.log.error("api: live events: " .. tostring(err)) end
      end)
    end)
  end
  offs[#offs + 1] = segue.on("stopping", M.stop)
  M.offs = offs
  segue.log.info(("api: listening on %s (port %d)"):format(cfg.http.listen, srv:port()))
  return true
end

function M.stop()
  for _, t in ipairs(timers) do t:stop() end
  timers = {}
  for _, off in ipairs(M.offs or {}) do off() end
  M.offs = nil
  for _, client in pairs(streams) do drop(client) end
  if server then server:close() end
  server = nil
end

function M.port() return server and server:port() end

--- address() -> "host:port" other instances reach this API at (http.advertise,
--- else the listen address; a wildcard listen address is given as loopback),
--- or nil when the API does not run.
function M.address()
  if not server then return nil end
  if opts.advertise then return opts.advertise end
  local host = cfg_now.http.listen:match("^(.*):%d+$")
  if host == "0.0.0.0" then host = "127.0.0.1" elseif host == "[::]" then host = "[::1]" end
  return host .. ":" .. server:port()
end

-- `segue user ...` ----------------------------------------------------------------------------------

--- user_add(db, name, admin) -> token | nil, err, code
function M.user_add(store, name, admin)
  if type(name) ~= "string" or not name:match("^[%w][%w%._%-@]*$") or #name > 64 then
    return nil, "a user name is 1 to 64 letters, digits, '.', '_', '-' or '@', starting with a letter or digit", "EINVAL"
  end
  local token = http.new_token()
  local ok, err, code = store:user_add(name, admin, http.token_hash(token))
  if not ok then return nil, err, code end
  return token
end

return M
