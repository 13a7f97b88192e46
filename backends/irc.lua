-- irc: an IRC client as a backend. Channels are rooms (RoomID "#channel",
-- lower-cased with the server's case mapping), nicks are users, PRIVMSG,
-- NOTICE and CTCP ACTION are messages both ways (see docs/backends.md).
--
-- Options: host (required), port (6667, or 6697 with tls), tls (false),
-- verify (true: the server's certificate is checked; false only for tests
-- against a self-signed server), nick ("segue"), user (the nick), realname,
-- password (server password, PASS), sasl_user and sasl_password (SASL:
-- SCRAM-SHA-256, SCRAM-SHA-1 or PLAIN, the best the server lists), flood_rate (messages per second, 1) and flood_burst (5),
-- reconnect_ms (first reconnect delay, 1000, doubling up to 300000),
-- idle_ms (after this long without a line from the server we PING it, and
-- reconnect when that PING stays unanswered as long again; 120000),
-- max_lines (lines one message may take; the rest is cut with a notice, 10),
-- max_queue (lines waiting for flood control per target; a send beyond it
-- fails at once, 100).
--
-- IRCv3 (docs/backends.md): capabilities are negotiated with CAP LS 302 and
-- used where the server offers them: sasl, server-time and message-tags/msgid
-- (message times and ids from the server), echo-message (a sent message is
-- announced, once, when the server has relayed it), batch, labeled-response,
-- draft/chathistory (MessageGetBefore), account-tag. A server that offers
-- none gets the plain RFC 1459 session.
--
-- The protocol's pure half (parsing, tags, formatting codes, splitting at the
-- 512-byte limit) is segue.irc_format (backends/irc_format.lua); this file is
-- the session.
local backend, options = ...
local segue = require "segue"
local net = require "segue.net"
local fmt = require "segue.irc_format"
local sasl = require "segue.sasl"
local crypto = require "segue.crypto"

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
  max_lines = math.tointeger(tonumber(options.max_lines)) or 10,
  max_queue = math.tointeger(tonumber(options.max_queue)) or 100,
  timeout_ms = 20000,   -- connecting, registering, joining
}
opt.port = math.tointeger(tonumber(options.port)) or (opt.tls and 6697 or 6667)
opt.user = tostring(options.user or opt.nick)
if type(opt.host) ~= "string" or opt.host == "" then error("irc: option host is required", 0) end
if opt.flood_rate <= 0 or opt.flood_burst < 1 then error("irc: flood_rate must be > 0 and flood_burst >= 1", 0) end
if opt.max_lines < 1 then error("irc: max_lines must be >= 1", 0) end
if opt.max_queue < 1 then error("irc: max_queue must be >= 1", 0) end
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

-- IRCv3 state of this connection.
local WANTED = { "message-tags", "server-time", "echo-message", "batch", "labeled-response",
  "draft/chathistory", "account-tag", "cap-notify" }
local caps = {}            -- capability -> true: acknowledged by the server
local offered = {}         -- capability -> value, as listed by CAP LS / CAP NEW
local ls_done = false      -- the (multi-line) CAP LS reply is complete
local cap_ended = false    -- CAP END sent on this connection
local batches = {}         -- reference -> { type, target, msgs }: open BATCHes
local history_limit = 50   -- CHATHISTORY=N of ISUPPORT, at most 100

-- Timers and handlers waiting for the server (segue.waits): ours stop when
-- the backend stops.
local waits = require("segue.waits").new(log)
local after, cancel, wait_for, wake, pause = waits.after, waits.cancel, waits.wait_for, waits.wake, waits.pause

-- Sending: immediate, or through the flood-control token bucket ------------------

local function send_now(line)
  if not conn then return nil, "not connected" end
  log.debug(">> " .. (line:match("^PASS ") and "PASS ***" or line:match("^AUTHENTICATE %S%S%S%S%S") and "AUTHENTICATE ***" or line))
  return conn:write(line .. "\r\n")
end

-- The queue is a FIFO of { line, target, pend } with O(1) push and pop
-- (head and tail indices) and a count per target: a target holds at most
-- opt.max_queue lines (a send beyond that fails at once, see send_message);
-- lines without a target (JOIN, PART) are few and come from our own calls.
-- It survives reconnects: what was queued while away is sent after.
local queue, q_head, q_tail = {}, 1, 0
local queued = {}          -- target -> lines waiting in the queue
local tokens = opt.flood_burst
local refilled = segue.now()
local pump_timer
local echo_fifo = {}       -- target -> { head, tail, [i] = pend or false }: sent lines whose echo is due
local labels = {}          -- label -> pend: labeled lines whose echo is due
local label_count = 0

-- Remembers that the server will echo this line (echo-message): by label
-- when labeled-response is on, else in order per target.
local function expect_echo(e)
  if not caps["echo-message"] or not e.echo then return end
  if caps["labeled-response"] and e.label then
    labels[e.label] = e.pend
    return
  end
  local f = echo_fifo[e.target]
  if not f then f = { head = 1, tail = 0 }; echo_fifo[e.target] = f end
  f.tail = f.tail + 1
  f[f.tail] = e.pend or false
end

local function pop_echo(target)
  local f = echo_fifo[target]
  if not f or f.head > f.tail then return nil end
  local p = f[f.head]
  f[f.head] = nil
  f.head = f.head + 1
  if f.head > f.tail then echo_fifo[target] = nil end
  return p
end

local function dequeue()
  local e = queue[q_head]
  queue[q_head] = nil
  q_head = q_head + 1
  if e.target then queued[e.target] = queued[e.target] - 1 end
  if q_head > q_tail then queue, q_head, q_tail = {}, 1, 0 end
  return e
end

local function pump()
  pump_timer = nil
  local now = segue.now()
  tokens = math.min(opt.flood_burst, tokens + (now - refilled) * opt.flood_rate / 1000)
  refilled = now
  while conn and registered and q_head <= q_tail and tokens >= 1 do
    local e = dequeue()
    if not (e.pend and e.pend.failed) then  -- a send that failed already is not sent late
      local line = e.line
      if e.label and caps["labeled-response"] and caps["echo-message"] then line = "@label=" .. e.label .. " " .. line end
      expect_echo(e)
      send_now(line)
      tokens = tokens - 1
    end
  end
  if conn and registered and q_head <= q_tail then
    local ms = math.ceil((1 - tokens) * 1000 / opt.flood_rate)
    pump_timer = after(math.max(ms, 1), pump)
  end
end

-- send(line [, target, pend, echo]): queues a line for flood control.
-- `target` counts against that target's bound (checked by the caller with
-- room_in_queue); `echo` marks a PRIVMSG/NOTICE the server echoes back.
local function send(line, target, pend, echo)
  local label
  if pend then label_count = label_count + 1; label = "sg" .. label_count end
  q_tail = q_tail + 1
  queue[q_tail] = { line = line, target = target, pend = pend, echo = echo, label = label }
  if target then queued[target] = (queued[target] or 0) + 1 end
  if not pump_timer then pump() end
end

local function room_in_queue(target) return opt.max_queue - (queued[target] or 0) end

-- Puts a line at the head of the queue (rejoins go before queued messages).
local function send_first(line)
  q_head = q_head - 1
  queue[q_head] = { line = line }
end

-- History, for MessageGet and MessageGetBefore -----------------------------------

local split_bounded  -- below, beside send_message
local sasl_mechanism  -- below, beside the CAP handler

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

-- A message's time: the server's (server-time) or, without one, ours.
local function time_of(tags) return fmt.parse_time(tags.time) or now_ms() end

-- Incoming ------------------------------------------------------------------------

local on_echo  -- below: our own message relayed back (echo-message)
local function me(m) return m.nick and lower(m.nick) == lower(nick) end

local function on_message(m)
  local target, text = m.params[1], m.params[2]
  if not target or not text or not m.user or m.user == "" then return end  -- server notices
  local tags = fmt.tags(m.tags)
  local batch = tags.batch and batches[tags.batch]
  local in_history = batch and batch.type == "chathistory"
  if not in_history and me(m) then return on_echo(m, tags) end
  local ctcp, arg = fmt.ctcp(text)
  local content
  if ctcp == "ACTION" then
    content = { type = "Emote", value = fmt.strip(arg) }
  elseif ctcp then
    if ctcp == "VERSION" and m.command == "PRIVMSG" and not in_history and room_in_queue(lower(m.nick)) > 0 then
      send(fmt.line("NOTICE", m.nick, "\1VERSION segue " .. segue.version .. "\1"), lower(m.nick), nil, true)
    end
    return
  else
    content = fmt.from_irc(text)
  end
  local t = time_of(tags)
  local extra
  if m.command == "NOTICE" or tags.account then extra = { notice = m.command == "NOTICE" or nil, account = tags.account } end
  local msg = { id = tags.msgid or new_id(), sender = m.nick, attachments = {}, content = content,
    recipient = fmt.is_channel(target) and lower(target) or (me(m) and lower(target) or nick),
    create_time = t, edit_time = t, extra = extra }
  if in_history then
    batch.msgs[#batch.msgs + 1] = msg
    return
  end
  remember(msg)
  backend:emit { type = "MessageUpsert", value = msg }
end

-- The server relayed a line we sent (echo-message): when it was the last
-- line of a message, the message is announced once, with the server's id
-- and time, and its MessageSend answered.
on_echo = function(m, tags)
  local pend
  if tags.label then
    pend = labels[tags.label]
    labels[tags.label] = nil
  elseif not caps["labeled-response"] then
    pend = pop_echo(lower(m.params[1]))
  end
  if not pend or pend.failed then return end
  if tags.msgid then pend.ids[#pend.ids + 1] = tags.msgid end
  pend.time = pend.time or fmt.parse_time(tags.time)
  pend.got = pend.got + 1
  if pend.got < pend.lines then return end
  local msg = pend.msg
  msg.id = pend.ids[1] or msg.id
  msg.create_time = pend.time or msg.create_time
  msg.edit_time = msg.create_time
  remember(msg)
  for i = 2, #pend.ids do by_id[pend.ids[i]] = msg end
  backend:emit { type = "MessageUpsert", value = msg }
  wake(pend.key, msg.id)
end

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
    send_first(fmt.line("JOIN", ids[i]))
    joining[ids[i]] = true
  end
  wake("registered", true)
  if not pump_timer then pump() end
end

handlers["005"] = function(m)
  for _, p in ipairs(m.params) do
    if p == "CASEMAPPING=ascii" then lower = string.lower end
    local n = p:match("^CHATHISTORY=(%d+)$")
    if n and tonumber(n) > 0 then history_limit = math.min(tonumber(n), 100) end
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

-- Capabilities (IRCv3 CAP LS 302): what we want of what the server offers
-- is requested in one CAP REQ; registration ends (CAP END) once that is
-- acknowledged and, when configured, SASL PLAIN is done.
local function cap_end()
  if cap_ended or registered then return end
  cap_ended = true
  send_now("CAP END")
end

-- SASL: the best mechanism the server lists (CAP LS 302 "sasl=A,B"), SCRAM
-- (segue.sasl) before PLAIN; a server that lists none gets PLAIN.
local sasl_state  -- { mech, session, step, buf } during AUTHENTICATE

sasl_mechanism = function(mechs)
  local set = "," .. (mechs or "") .. ","
  for _, m in ipairs(sasl.SCRAM) do
    if set:find("," .. m[1] .. ",", 1, true) then return m[1], m[2] end
  end
  if mechs == nil or mechs == "" or set:find(",PLAIN,", 1, true) then return "PLAIN" end
end

local function sasl_send(payload)
  local b64 = payload == "" and "" or crypto.base64_encode(payload)
  for i = 1, #b64, 400 do send_now(fmt.line("AUTHENTICATE", b64:sub(i, i + 399))) end
  if #b64 % 400 == 0 then send_now("AUTHENTICATE +") end
end

local function sasl_start()
  local mech, alg = sasl_mechanism(offered.sasl)
  sasl_state = { mech = mech, step = 0, buf = {} }
  if alg then sasl_state.session = sasl.scram(alg, opt.sasl_user, opt.sasl_password) end
  send_now("AUTHENTICATE " .. mech)
end

local function sasl_abort(why)
  log.error("SASL " .. sasl_state.mech .. " failed: " .. why .. "; continuing without logging in")
  sasl_state = nil
  send_now("AUTHENTICATE *")
end

local function request_caps(list)
  local want = {}
  for _, c in ipairs(WANTED) do
    if list[c] ~= nil and not caps[c] then want[#want + 1] = c end
  end
  if opt.sasl_user and list.sasl ~= nil and not caps.sasl then
    local mechs = list.sasl
    if mechs == "" or sasl_mechanism(mechs) then
      want[#want + 1] = "sasl"
    else
      log.error("the server offers SASL " .. mechs .. " but neither SCRAM-SHA-256, SCRAM-SHA-1 nor PLAIN;"
        .. " continuing without logging in")
    end
  end
  if #want == 0 then return false end
  send_now("CAP REQ :" .. table.concat(want, " "))
  return true
end

local function cap_list(s)
  local t = {}
  for item in (s or ""):gmatch("%S+") do
    local k, v = item:match("^([^=]+)=?(.*)$")
    t[k] = v
  end
  return t
end

handlers.CAP = function(m)
  local sub = m.params[2]
  local more = m.params[3] == "*" and m.params[4] ~= nil
  local list = cap_list(more and m.params[4] or m.params[3])
  if sub == "LS" then
    for k, v in pairs(list) do offered[k] = v end
    if more then return end
    ls_done = true
    if opt.sasl_user and offered.sasl == nil then
      log.error("the server offers no SASL; continuing without logging in")
    end
    if not request_caps(offered) then cap_end() end
  elseif sub == "ACK" then
    for k in pairs(list) do
      if k:sub(1, 1) == "-" then caps[k:sub(2)] = nil else caps[k] = true end
    end
    log.info("IRCv3 capabilities: " .. (m.params[3] or ""))
    if list.sasl and not registered then
      sasl_start()
    else
      cap_end()
    end
  elseif sub == "NAK" then
    log.warn("the server refused the capabilities " .. tostring(m.params[3]))
    cap_end()
  elseif sub == "NEW" then
    for k, v in pairs(list) do offered[k] = v end
    request_caps(list)
  elseif sub == "DEL" then
    for k in pairs(list) do caps[k], offered[k] = nil, nil end
  end
end

-- A server message comes in 400-byte base64 chunks; a shorter one (or "+")
-- ends it.
handlers.AUTHENTICATE = function(m)
  local st = sasl_state
  local chunk = m.params[1] or ""
  if not st then return end
  if chunk ~= "+" then st.buf[#st.buf + 1] = chunk end
  if #chunk == 400 then return end
  local joined = table.concat(st.buf)
  st.buf = {}
  local data, err = "", nil
  if joined ~= "" then data, err = crypto.base64_decode(joined) end
  if not data then return sasl_abort("the server sent bad base64: " .. tostring(err)) end
  st.step = st.step + 1
  if st.mech == "PLAIN" then
    if st.step == 1 then sasl_send(sasl.plain(opt.sasl_user, opt.sasl_password, opt.sasl_user)) end
  elseif st.step == 1 then
    sasl_send(st.session.first())
  elseif st.step == 2 then
    local final, e = st.session:final(data)
    if not final then return sasl_abort(e) end
    sasl_send(final)
  elseif st.step == 3 then
    local ok, e = st.session:verify(data)
    if not ok then return sasl_abort(e) end
    sasl_send("")  -- "AUTHENTICATE +": the server then says 903
  end
end

handlers["903"] = function()
  log.info("SASL login succeeded" .. (sasl_state and " (" .. sasl_state.mech .. ")" or ""))
  sasl_state = nil
  cap_end()
end
local function sasl_failed(m)
  sasl_state = nil
  log.error("SASL login failed: " .. tostring(m.params[#m.params]) .. "; continuing without logging in")
  cap_end()
end
for _, n in ipairs { "902", "904", "905", "906", "908" } do handlers[n] = sasl_failed end

-- BATCH (IRCv3): lines tagged batch=<ref> belong together; a chathistory
-- batch is the answer to CHATHISTORY, collected and handed to its waiter.
handlers.BATCH = function(m)
  local ref = m.params[1] or ""
  local sign, name = ref:sub(1, 1), ref:sub(2)
  if sign == "+" then
    batches[name] = { type = m.params[2], target = m.params[3], msgs = {} }
  elseif sign == "-" then
    local b = batches[name]
    batches[name] = nil
    if b and b.type == "chathistory" and b.target then wake("history " .. lower(b.target), b.msgs) end
  end
end

-- FAIL CHATHISTORY <code> [<subcommand> <target>] :<description>
handlers.FAIL = function(m)
  if m.params[1] ~= "CHATHISTORY" then return log.warn("FAIL " .. table.concat(m.params, " ")) end
  local why = "the server refused CHATHISTORY: " .. tostring(m.params[#m.params])
  waits.wake_matching("^history ", nil, why)
end

handlers["464"] = function(m) log.error("the server refused the password: " .. tostring(m.params[2])) end
handlers.ERROR = function(m) log.warn("server closes the link: " .. tostring(m.params[1])) end

-- The connection ------------------------------------------------------------------

local function register()
  -- A server without CAP ignores it (or answers 421) and registers us after
  -- USER; one with CAP holds registration until CAP END.
  send_now("CAP LS 302")
  if opt.password then send_now(fmt.line("PASS", opt.password)) end
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
      caps, offered, ls_done, cap_ended, batches = {}, {}, false, false, {}
      register()
      err = session(c)
      if registered then delay = opt.reconnect_ms end
      conn, registered, joined, joining = nil, false, {}, {}
      -- Echoes due on the lost connection never come: their sends fail
      -- (see send_message) and their lines still queued are not sent.
      local lost = {}
      for _, p in pairs(labels) do if p then lost[p] = true end end
      for _, f in pairs(echo_fifo) do
        for i = f.head, f.tail do if f[i] then lost[f[i]] = true end end
      end
      labels, echo_fifo = {}, {}
      for p in pairs(lost) do
        p.failed = true
        wake(p.key, nil, "the connection was lost before the server confirmed the message")
      end
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

-- Splits at most max_lines lines' worth of text, so a huge message costs
-- no more than a small one (the cut is reported, not the size of the rest):
-- never more work than max_lines * (a line + its newline) bytes.
split_bounded = function(text, room)
  local budget = opt.max_lines * (room + 1)
  local first = text:find("[^\n ]") or 1  -- leading blank lines are dropped anyway
  local limit = first - 1 + budget
  local cut = #text > limit
  if cut then
    while limit > first and (text:byte(limit + 1) or 0) & 0xC0 == 0x80 do limit = limit - 1 end  -- not inside UTF-8
    text = text:sub(first, limit)
  end
  local lines = fmt.split_lines(text, room)
  if #lines > opt.max_lines then
    for i = #lines, opt.max_lines + 1, -1 do lines[i] = nil end
    cut = true
  end
  return lines, cut
end

-- CHATHISTORY BEFORE <target> msgid=<id> <limit>: the answer is a
-- chathistory batch (handlers.BATCH), emitted oldest first.
local function history_before(m)
  local ok, err = wait_registered()
  if not ok then return backend.error(err, true) end
  local target = fmt.is_channel(m.recipient) and m.recipient
    or (lower(m.sender) == lower(nick) and m.recipient or m.sender)
  local line = fmt.line("CHATHISTORY", "BEFORE", target, "msgid=" .. m.id, tostring(history_limit))
  if caps["labeled-response"] then
    label_count = label_count + 1
    line = "@label=sg" .. label_count .. " " .. line
  end
  send_now(line)
  local msgs, e = wait_for("history " .. lower(target), opt.timeout_ms)
  if not msgs then return nil, e end
  table.sort(msgs, function(a, b) return a.create_time < b.create_time end)
  for _, h in ipairs(msgs) do
    if not by_id[h.id] then remember(h) end
    backend:emit { type = "MessageUpsert", value = h }
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
  local att = {}
  for _, a in ipairs(msg.attachments or {}) do att[#att + 1] = " [" .. tostring(a.mime) .. " attachment]" end
  text = text .. table.concat(att)
  local room = fmt.budget(source_len or (#nick + 1 + 10 + 1 + 63), "PRIVMSG", target, action)
  local lines, cut = split_bounded(text, room)
  if #lines == 0 then return nil, "nothing to send: the message is empty" end
  local key = lower(target)
  local need = #lines + (cut and 1 or 0)
  if room_in_queue(key) < need then
    return backend.error(("the send queue for %s is full (%d lines waiting, max_queue = %d)"):format(
      target, queued[key] or 0, opt.max_queue), true)
  end
  local t = now_ms()
  local m = { id = new_id(), sender = nick, recipient = target, content = msg.content,
    attachments = msg.attachments or {}, create_time = t, edit_time = t, extra = msg.extra }
  local pend
  if caps["echo-message"] then
    pend = { lines = need, got = 0, ids = {}, msg = m, key = "echo " .. m.id }
  end
  for _, l in ipairs(lines) do
    send(fmt.line("PRIVMSG", target, action and ("\1ACTION " .. l .. "\1") or l), key, pend, true)
  end
  if cut then
    log.warn(("a message to %s was cut after max_lines = %d lines"):format(target, opt.max_lines))
    send(fmt.line("NOTICE", target, ("(the rest of this message was cut: it is longer than %d lines)"):format(
      opt.max_lines)), key, pend, true)
  end
  if not pend then
    remember(m)
    return m.id
  end
  -- Answered when the server relayed every line (on_echo), within the time
  -- the queue ahead needs at the flood rate.
  local ms = opt.timeout_ms + math.ceil((q_tail - q_head + 1) * 1000 / opt.flood_rate)
  local id, err = wait_for(pend.key, ms)
  if not id then
    pend.failed = true
    return backend.error("not confirmed by the server: " .. tostring(err), true)
  end
  return id
end

return {
  info = { name = "irc", version = { 0, 1, 0 },
    -- IRC formatting codes; no attachments, edits or history; the backend
    -- splits lines at 512 bytes itself, a message over 2000 bytes is split
    -- by the router first (a few lines each, not a flood)
    capabilities = { formatting = { "Text", "Concat", "Bold", "Italic", "Underline", "Crossout", "Emote" },
      max_length = 2000, length_unit = "bytes", attachments = { max_bytes = 0, types = {} } } },

  start = function() run() end,

  stop = function()
    stopped = true
    waits.stop_all()
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

  -- With draft/chathistory: the server's history before `id` (a msgid);
  -- without, IRC has none: replays what this session saw before `id`.
  MessageGetBefore = function(id)
    local m = by_id[id]
    if not m then return nil, "no message with id " .. tostring(id) end
    if caps["draft/chathistory"] and id == m.id and not id:match("^irc%-") then
      return history_before(m)
    end
    for _, h in ipairs(history) do
      if h == m then break end
      if h.recipient == m.recipient then backend:emit { type = "MessageUpsert", value = h } end
    end
    return true
  end,
}
