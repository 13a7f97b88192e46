-- irc: an IRC client as a backend. Channels are rooms (RoomID "#channel",
-- lower-cased with the server's case mapping), nicks are users, PRIVMSG,
-- NOTICE and CTCP ACTION are messages both ways (see docs/backends.md).
--
-- Options: host (required), port (6667, or 6697 with tls), tls (false),
-- verify (true: the server's certificate is checked; false only for tests
-- against a self-signed server), nick ("segue"), user (the nick), realname,
-- password (server password, PASS), sasl_user and sasl_password (SASL
-- PLAIN), flood_rate (messages per second, 1) and flood_burst (5),
-- reconnect_ms (first reconnect delay, 1000, doubling up to 300000),
-- idle_ms (after this long without a line from the server we PING it, and
-- reconnect when that PING stays unanswered as long again; 120000).
--
-- The protocol's pure half (parsing, formatting codes, splitting at the
-- 512-byte limit) is segue.irc_format; this file is the session.
local backend, options = ...
local segue = require "segue"
local net = require "segue.net"
local fmt = require "segue.irc_format"

local function flag(v, default)
  if v == nil then return default end
  return v == true or v == "true" or v == 1 or v == "1"
end

local opt = {
  host = options.host,
  tls = flag(options.tls, false),
  verify = flag(options.verify, true),
  nick = tostring(options.nick or "segue"),
  realname = tostring(options.realname or "segue bridge"),
  password = options.password and tostring(options.password),
  sasl_user = options.sasl_user and tostring(options.sasl_user),
  sasl_password = options.sasl_password and tostring(options.sasl_password),
  flood_rate = tonumber(options.flood_rate) or 1,
  flood_burst = tonumber(options.flood_burst) or 5,
  reconnect_ms = math.tointeger(tonumber(options.reconnect_ms)) or 1000,
  reconnect_max_ms = 300000,
  idle_ms = math.tointeger(tonumber(options.idle_ms)) or 120000,
  timeout_ms = 20000,   -- connecting, registering, joining
}
opt.port = math.tointeger(tonumber(options.port)) or (opt.tls and 6697 or 6667)
opt.user = tostring(options.user or opt.nick)
if type(opt.host) ~= "string" or opt.host == "" then error("irc: option host is required", 0) end
if opt.flood_rate <= 0 or opt.flood_burst < 1 then error("irc: flood_rate must be > 0 and flood_burst >= 1", 0) end
if (opt.sasl_user == nil) ~= (opt.sasl_password == nil) then
  error("irc: sasl_user and sasl_password go together", 0)
end

local log = backend.log
local lower = fmt.lower
local conn                 -- the open connection, or nil
local registered = false
local stopped = false
local nick = opt.nick
local source_len           -- length of "nick!user@host" as others see us
local channels = {}        -- id -> display name: where we want to be (rejoined on reconnect)
local joined = {}          -- id -> true: where we are on this connection
local joining = {}         -- id -> true: JOIN sent on this connection, no answer yet
local waiting = {}         -- key -> { coroutines }: see wait_for

-- Timers: ours stop when the backend stops. (backend.timer keeps every
-- timer it made until then; a long session makes many.)
local timers = {}

local function after(ms, fn)
  local t
  t = segue.timer(ms, function()
    timers[t] = nil
    fn()
  end)
  timers[t] = true
  return t
end

local function cancel(t)
  if t then t:stop(); timers[t] = nil end
end

-- Waiting for the server ------------------------------------------------------

-- Suspends the calling handler until wake(key, ...) or the time-out.
local function wait_for(key, ms)
  local co = coroutine.running()
  local list = waiting[key] or {}
  waiting[key] = list
  list[#list + 1] = co
  local timer = after(ms, function()
    for i, c in ipairs(list) do
      if c == co then
        table.remove(list, i)
        coroutine.resume(co, nil, "timed out after " .. ms .. " ms")
        return
      end
    end
  end)
  local ok, err = coroutine.yield()
  cancel(timer)
  return ok, err
end

local function wake(key, ok, err)
  local list = waiting[key]
  waiting[key] = nil
  for _, co in ipairs(list or {}) do
    local fine, e = coroutine.resume(co, ok, err)
    if not fine then log.error(debug.traceback(co, e)) end
  end
end

local function pause(ms)
  local co = coroutine.running()
  after(ms, function() coroutine.resume(co) end)
  coroutine.yield()
end

-- Sending: immediate, or through the flood-control token bucket ------------------

local function send_now(line)
  if not conn then return nil, "not connected" end
  log.debug(">> " .. (line:match("^PASS ") and "PASS ***" or line:match("^AUTHENTICATE %S%S%S%S%S") and "AUTHENTICATE ***" or line))
  return conn:write(line .. "\r\n")
end

local queue = {}
local tokens = opt.flood_burst
local refilled = segue.now()
local pump_timer

local function pump()
  pump_timer = nil
  local now = segue.now()
  tokens = math.min(opt.flood_burst, tokens + (now - refilled) * opt.flood_rate / 1000)
  refilled = now
  while conn and registered and #queue > 0 and tokens >= 1 do
    send_now(table.remove(queue, 1))
    tokens = tokens - 1
  end
  if conn and registered and #queue > 0 then
    local ms = math.ceil((1 - tokens) * 1000 / opt.flood_rate)
    pump_timer = after(math.max(ms, 1), pump)
  end
end

local function send(line)
  queue[#queue + 1] = line
  if not pump_timer then pump() end
end

-- History, for MessageGet and MessageGetBefore -----------------------------------

local history, by_id, counter = {}, {}, 0
local HISTORY = 1000

local function new_id()
  counter = counter + 1
  return ("irc-%d-%d"):format(os.time(), counter)
end

local function remember(m)
  history[#history + 1] = m
  by_id[m.id] = m
  if #history > HISTORY then by_id[table.remove(history, 1).id] = nil end
end

local function now_ms() return os.time() * 1000 end

-- Incoming ------------------------------------------------------------------------

local function on_message(m)
  local target, text = m.params[1], m.params[2]
  if not target or not text or not m.user or m.user == "" then return end  -- server notices
  local ctcp, arg = fmt.ctcp(text)
  local content
  if ctcp == "ACTION" then
    content = { type = "Emote", value = fmt.strip(arg) }
  elseif ctcp then
    if ctcp == "VERSION" and m.command == "PRIVMSG" then
      send(fmt.line("NOTICE", m.nick, "\1VERSION segue " .. segue.version .. "\1"))
    end
    return
  else
    content = fmt.from_irc(text)
  end
  local t = now_ms()
  local msg = { id = new_id(), sender = m.nick, attachments = {}, content = content,
    recipient = fmt.is_channel(target) and lower(target) or nick, create_time = t, edit_time = t,
    extra = m.command == "NOTICE" and { notice = true } or nil }
  remember(msg)
  backend:emit { type = "MessageUpsert", value = msg }
end

local function me(m) return m.nick and lower(m.nick) == lower(nick) end

local function next_nick()
  -- 433: taken. Append "_" while it fits, then try digits.
  if #nick < 30 then return nick .. "_" end
  return opt.nick:sub(1, 24) .. math.random(100000, 999999)
end

local handlers = {}

handlers.PING = function(m) send_now(fmt.line("PONG", m.params[1] or opt.host)) end

handlers["001"] = function(m)
  registered = true
  nick = m.params[1] or nick
  log.info(("registered on %s:%d as %s"):format(opt.host, opt.port, nick))
  -- Rejoins go first, before messages queued while we were away.
  local ids = {}
  for id in pairs(channels) do ids[#ids + 1] = id end
  table.sort(ids)
  for i = #ids, 1, -1 do
    table.insert(queue, 1, fmt.line("JOIN", ids[i]))
    joining[ids[i]] = true
  end
  wake("registered", true)
  if not pump_timer then pump() end
end

handlers["005"] = function(m)
  for _, p in ipairs(m.params) do
    if p == "CASEMAPPING=ascii" then lower = string.lower end
  end
end

local function nick_taken(m)
  if registered then return log.warn("cannot change nick: " .. tostring(m.params[3])) end
  local wanted = next_nick()
  log.info(("nick %s is taken; trying %s"):format(nick, wanted))
  nick = wanted
  send_now(fmt.line("NICK", nick))
end
handlers["433"], handlers["432"], handlers["437"] = nick_taken, nick_taken, nick_taken

handlers.NICK = function(m) if me(m) then nick = m.params[1] end end

handlers.JOIN = function(m)
  if not me(m) then return end
  local id = lower(m.params[1])
  joined[id], joining[id] = true, nil
  channels[id] = channels[id] or m.params[1]
  source_len = #m.source
  backend:emit { type = "RoomUpsert", value = { id = id, parent = segue.null, name = m.params[1], sendable = true } }
  wake("join " .. id, true)
end

handlers.PART = function(m) if me(m) then joined[lower(m.params[1])] = nil end end

handlers.KICK = function(m)
  if lower(m.params[2] or "") ~= lower(nick) then return end
  local id = lower(m.params[1])
  joined[id], channels[id] = nil, nil
  log.warn(("kicked from %s by %s: %s"):format(id, tostring(m.nick), tostring(m.params[3])))
end

local function join_failed(m)
  local id = lower(m.params[2] or "")
  joining[id] = nil
  log.warn(("cannot join %s: %s"):format(id, tostring(m.params[3])))
  wake("join " .. id, nil, ("cannot join %s: %s"):format(id, tostring(m.params[3])))
end
for _, n in ipairs { "403", "405", "471", "473", "474", "475", "476", "477" } do handlers[n] = join_failed end

handlers.PRIVMSG, handlers.NOTICE = on_message, on_message

-- SASL PLAIN (IRCv3): CAP REQ sasl -> AUTHENTICATE PLAIN -> payload -> 903.
handlers.CAP = function(m)
  local sub, caps = m.params[2], m.params[3] or ""
  if sub == "ACK" and caps:find("sasl") then
    send_now("AUTHENTICATE PLAIN")
  elseif sub == "NAK" then
    log.error("the server refused SASL; continuing without logging in")
    send_now("CAP END")
  end
end

handlers.AUTHENTICATE = function(m)
  if m.params[1] ~= "+" then return end
  for _, chunk in ipairs(fmt.sasl_plain(opt.sasl_user, opt.sasl_password)) do
    send_now(fmt.line("AUTHENTICATE", chunk))
  end
end

handlers["903"] = function() log.info("SASL login succeeded"); send_now("CAP END") end
local function sasl_failed(m)
  log.error("SASL login failed: " .. tostring(m.params[#m.params]) .. "; continuing without logging in")
  send_now("CAP END")
end
for _, n in ipairs { "902", "904", "905", "906", "908" } do handlers[n] = sasl_failed end

handlers["464"] = function(m) log.error("the server refused the password: " .. tostring(m.params[2])) end
handlers.ERROR = function(m) log.warn("server closes the link: " .. tostring(m.params[1])) end

-- The connection ------------------------------------------------------------------

local function register()
  if opt.password then send_now(fmt.line("PASS", opt.password)) end
  if opt.sasl_user then send_now("CAP REQ :sasl") end
  send_now(fmt.line("NICK", nick))
  send_now(fmt.line("USER", opt.user, "0", "*", opt.realname))
end

-- A server that vanished without closing the socket is only noticed by
-- asking: PING after idle_ms of silence, give up after as long again.
local function watch_idle(c)
  local last, pinged = segue.now(), nil
  local timer
  local function check()
    local now = segue.now()
    if c:is_closed() then return end
    if pinged and now - pinged >= opt.idle_ms then
      log.warn(("no answer to PING in %d ms; reconnecting"):format(opt.idle_ms))
      return c:close()
    end
    if not pinged and now - last >= opt.idle_ms then
      pinged = now
      c:write("PING :segue\r\n")
    end
    timer = after(math.max(opt.idle_ms // 4, 10), check)
  end
  timer = after(math.max(opt.idle_ms // 4, 10), check)
  return function() last, pinged = segue.now(), nil end, function() cancel(timer) end
end

-- Reads until the connection ends; returns why.
local function session(c)
  local heard, unwatch = watch_idle(c)
  while true do
    local line, err = c:read_line()
    if not line then
      unwatch()
      return err
    end
    heard()
    log.debug("<< " .. line)
    local m = fmt.parse(line)
    local h = m and handlers[m.command]
    if h then h(m) end
  end
end

local function run()
  local delay = opt.reconnect_ms
  while not stopped do
    log.info(("connecting to %s:%d%s"):format(opt.host, opt.port, opt.tls and " (TLS)" or ""))
    local c, err = net.connect(opt.host, opt.port,
      { tls = opt.tls, verify = opt.verify, timeout_ms = opt.timeout_ms, max_line = 16384 })
    if c and stopped then c:close() end
    if c and not stopped then
      conn, nick, lower = c, opt.nick, fmt.lower
      register()
      err = session(c)
      if registered then delay = opt.reconnect_ms end
      conn, registered, joined, joining = nil, false, {}, {}
      c:close()
    end
    if stopped then break end
    log.warn(("%s; reconnecting in %d ms"):format(tostring(err), delay))
    pause(delay)
    delay = math.min(delay * 2, opt.reconnect_max_ms)
  end
end

-- Requests --------------------------------------------------------------------------

local function wait_registered()
  if registered then return true end
  local ok, err = wait_for("registered", opt.timeout_ms)
  if not ok then return nil, "not connected to " .. opt.host .. ": " .. tostring(err) end
  return true
end

local function channel_id(name)
  if not fmt.is_channel(name) then return nil, ("%q is not an IRC channel name (#name)"):format(tostring(name)) end
  return lower(name)
end

local function join(id)
  channels[id] = channels[id] or id
  if joined[id] then return true end
  local ok, err = wait_registered()
  if not ok then return backend.error(err, true) end
  if joined[id] then return true end
  if not joining[id] then  -- the rejoin after registering may have sent it
    joining[id] = true
    send(fmt.line("JOIN", id))
  end
  ok, err = wait_for("join " .. id, opt.timeout_ms)
  if not ok then
    channels[id], joining[id] = nil, nil
    return nil, err
  end
  return true
end

local function send_message(msg)
  local target = msg.recipient
  if type(target) ~= "string" or target == "" or target:find("[%s,%z]") then
    return nil, ("cannot send to %q"):format(tostring(target))
  end
  if fmt.is_channel(target) then
    target = lower(target)
    local ok, err = join(target)
    if ok ~= true then return ok, err end
  end
  local ok, err = wait_registered()
  if not ok then return backend.error(err, true) end
  local text, action = fmt.to_irc(msg.content)
  for _, a in ipairs(msg.attachments or {}) do text = text .. " [" .. tostring(a.mime) .. " attachment]" end
  local room = fmt.budget(source_len or (#nick + 1 + 10 + 1 + 63), "PRIVMSG", target, action)
  local lines = fmt.split_lines(text, room)
  if #lines == 0 then return nil, "nothing to send: the message is empty" end
  for _, l in ipairs(lines) do
    send(fmt.line("PRIVMSG", target, action and ("\1ACTION " .. l .. "\1") or l))
  end
  local t = now_ms()
  local m = { id = new_id(), sender = nick, recipient = target, content = msg.content,
    attachments = msg.attachments or {}, create_time = t, edit_time = t, extra = msg.extra }
  remember(m)
  return m.id
end

return {
  info = { name = "irc", version = { 0, 1, 0 } },

  start = function() run() end,

  stop = function()
    stopped = true
    for t in pairs(timers) do t:stop() end
    if conn then
      conn:write("QUIT :segue stopping\r\n")
      conn:close()
    end
  end,

  RoomLookup = function(name) return channel_id(name) end,

  RoomGet = function(id)
    local cid, err = channel_id(id)
    if not cid then return nil, err end
    return { id = cid, parent = segue.null, name = channels[cid] or id, sendable = true }
  end,

  RoomCreate = function(new)
    local id, err = channel_id(new.name)
    if not id then return nil, err end
    local ok, e = join(id)
    if ok ~= true then return ok, e end
    return id
  end,

  RoomJoin = function(id)
    local cid, err = channel_id(id)
    if not cid then return nil, err end
    return join(cid)
  end,

  RoomLeave = function(id)
    local cid, err = channel_id(id)
    if not cid then return nil, err end
    channels[cid] = nil
    if joined[cid] then
      send(fmt.line("PART", cid))
      joined[cid] = nil
    end
    return true
  end,

  MessageSend = send_message,

  MessageGet = function(id)
    return by_id[id] or nil, "no message with id " .. tostring(id) .. " (IRC keeps only recent ones)"
  end,

  -- IRC has no history: replays what this session saw before `id`.
  MessageGetBefore = function(id)
    local m = by_id[id]
    if not m then return nil, "no message with id " .. tostring(id) end
    for _, h in ipairs(history) do
      if h == m then break end
      if h.recipient == m.recipient then backend:emit { type = "MessageUpsert", value = h } end
    end
    return true
  end,
}
