-- xmpp: an XMPP client as a backend (RFC 6120/6121). Group chats (XEP-0045)
-- are rooms with the room's bare JID as RoomID ("room@conference.host"),
-- 1:1 chats go to JIDs. See docs/backends.md ("XMPP").
--
-- Options: jid (required), password (required), host (the JID's domain),
-- port (5222, or 5223 with tls = "direct"), tls ("starttls" | "direct" |
-- false, false only for a server on loopback), ca_file (trust only these
-- CAs), pin (SHA-256 fingerprint of the server's certificate), nick (the
-- JID's local part), resource ("segue"), muc_domain (for RoomLookup of
-- "#name"), reconnect_ms (1000, doubling up to 300000), ping_ms (60000),
-- history (messages per MAM page for MessageGetBefore, 20), timeout_ms
-- (20000: connecting, logging in, joining, waiting for the room's echo).
--
-- Message ids are "<archive>#<stanza-id>": the archive is the room's JID
-- for a group chat and our own bare JID for 1:1 chats, the stanza-id the
-- one the archive assigned (XEP-0359), so MessageGetBefore knows where to
-- ask (MAM, XEP-0313). The pure half (styling, JIDs, time stamps) is
-- segue.xmpp_format; SCRAM is segue.sasl.
local backend, options = ...
local segue = require "segue"
local net = require "segue.net"
local xml = require "segue.xml"
local crypto = require "segue.crypto"
local sasl = require "segue.sasl"
local fmt = require "segue.xmpp_format"

local NS = {
  client = "jabber:client", stream = "http://etherx.jabber.org/streams",
  tls = "urn:ietf:params:xml:ns:xmpp-tls", sasl = "urn:ietf:params:xml:ns:xmpp-sasl",
  bind = "urn:ietf:params:xml:ns:xmpp-bind", stanzas = "urn:ietf:params:xml:ns:xmpp-stanzas",
  sm = "urn:xmpp:sm:3", ping = "urn:xmpp:ping", disco = "http://jabber.org/protocol/disco#info",
  muc = "http://jabber.org/protocol/muc", muc_user = "http://jabber.org/protocol/muc#user",
  muc_owner = "http://jabber.org/protocol/muc#owner", data = "jabber:x:data",
  sid = "urn:xmpp:sid:0", mam = "urn:xmpp:mam:2", rsm = "http://jabber.org/protocol/rsm",
  forward = "urn:xmpp:forward:0", delay = "urn:xmpp:delay",
  replace = "urn:xmpp:message-correct:0", retract = "urn:xmpp:message-retract:1",
  retract0 = "urn:xmpp:message-retract:0", fasten = "urn:xmpp:fasten:0",
  fallback = "urn:xmpp:fallback:0", oob = "jabber:x:oob", hints = "urn:xmpp:hints",
  styling = "urn:xmpp:styling:0",
}

local function flag(v)
  if v == nil or v == "starttls" then return "starttls" end
  if v == false or v == "false" then return false end
  if v == "direct" then return "direct" end
  error(("xmpp: option tls is \"starttls\", \"direct\" or false, not %q"):format(tostring(v)), 0)
end

local function int(v, default)
  return math.tointeger(tonumber(v)) or default
end

local opt = {
  jid = options.jid and tostring(options.jid),
  password = options.password and tostring(options.password),
  tls = flag(options.tls),
  ca_file = options.ca_file and tostring(options.ca_file),
  pin = options.pin and tostring(options.pin),
  resource = tostring(options.resource or "segue"),
  muc_domain = options.muc_domain and tostring(options.muc_domain),
  reconnect_ms = int(options.reconnect_ms, 1000),
  reconnect_max_ms = 300000,
  ping_ms = int(options.ping_ms, 60000),
  history = int(options.history, 20),
  timeout_ms = int(options.timeout_ms, 20000),
  max_stanza = 1 << 20,
}
local node, domain = fmt.split(opt.jid or "")
if not node or not domain then error("xmpp: option jid (user@domain) is required", 0) end
if not opt.password then error("xmpp: option password is required", 0) end
opt.host = tostring(options.host or domain)
opt.port = int(options.port, opt.tls == "direct" and 5223 or 5222)
opt.nick = tostring(options.nick or node)
if opt.tls == false and not (opt.host == "127.0.0.1" or opt.host == "::1" or opt.host == "localhost") then
  error("xmpp: tls = false is only for a server on loopback (tests); use \"starttls\" or \"direct\"", 0)
end
if opt.history < 1 or opt.history > 500 then error("xmpp: history is 1 to 500", 0) end

local log = backend.log
local me = fmt.bare(opt.jid)       -- our bare JID: the archive of 1:1 chats
local full_jid                     -- as bound
local conn                         -- the open, logged-in connection, or nil
local online = false
local stopped = false

-- Timers and handlers waiting for the server (segue.waits) ----------------------

local waits = require("segue.waits").new(log)
local after, cancel, wait_for, wake, pause = waits.after, waits.cancel, waits.wait_for, waits.wake, waits.pause

local function now_ms() return os.time() * 1000 end

local function new_id() return crypto.hex(crypto.random(12)) end

-- Elements -------------------------------------------------------------------------

local function child(el, name, ns)
  for _, c in ipairs(el) do
    if c.name == name and (ns == nil or c.ns == ns) then return c end
  end
end

local function E(name, attrs, ...)
  local el = { name = name, attrs = attrs or {} }
  for i = 1, select("#", ...) do
    local c = select(i, ...)
    if type(c) == "string" then el.text = c elseif c then el[#el + 1] = c end
  end
  return el
end

local function NSE(ns, name, attrs, ...)
  local el = E(name, attrs, ...)
  el.ns = ns
  return el
end

-- A stanza error's condition ("item-not-found") and text, for messages.
local function stanza_error(st)
  local e = child(st, "error")
  if not e then return "error" end
  local cond, text
  for _, c in ipairs(e) do
    if c.ns == NS.stanzas then
      if c.name == "text" then text = c.text else cond = c.name end
    end
  end
  return (cond or "error") .. (text and (": " .. text) or "")
end

-- Sending, with stream management (XEP-0198) -------------------------------------------

local sm = { enabled = false, id = nil, resume = false, inbound = 0, outbound = 0,
  acked = 0, unacked = {}, head = 1 }
local MAX_UNACKED = 1000  -- stanzas kept for a resend; beyond, the oldest is dropped (and logged)
local ACK_EVERY = 20      -- outbound stanzas between our requests for an acknowledgement

local function write_raw(text)
  if not conn then return nil, "not connected" end
  return conn:write(text)
end

local STANZA = { message = true, presence = true, iq = true }

local function send(el)
  if not el.ns then el.ns = NS.client end
  local text, err = xml.serialize(el)
  if not text then
    log.error("cannot serialize a stanza: " .. err)
    return nil, err
  end
  if sm.enabled and STANZA[el.name] then
    sm.outbound = sm.outbound + 1
    sm.unacked[sm.outbound] = text
    local oldest = sm.outbound - MAX_UNACKED
    if sm.unacked[oldest] then
      sm.unacked[oldest] = nil
      sm.acked = math.max(sm.acked, oldest)
      log.warn("more than " .. MAX_UNACKED .. " stanzas unacknowledged; the oldest will not be resent")
    end
  end
  log.debug(">> " .. (el.ns == NS.sasl and "<" .. el.name .. " .../>" or text))
  local text_ok, werr = write_raw(text)
  -- Ask for an acknowledgement every ACK_EVERY stanzas, so the resend queue
  -- stays short on a busy bridge.
  if text_ok and sm.enabled and STANZA[el.name] and not sm.asked and sm.outbound - sm.acked >= ACK_EVERY then
    sm.asked = true
    write_raw("<r xmlns='urn:xmpp:sm:3'/>")
  end
  return text_ok, werr
end

local function acknowledge(h)
  h = math.tointeger(tonumber(h))
  if not h then return end
  for n = sm.acked + 1, math.min(h, sm.outbound) do sm.unacked[n] = nil end
  if h > sm.acked then sm.acked = h end
  sm.asked = false
end

-- Reading: the parser is fed what the connection gives ----------------------------------

local reader = { items = {}, head = 1, parser = nil }

local function reset_parser()
  reader.parser = xml.parser { max_size = opt.max_stanza }
  reader.items, reader.head = {}, 1
end

-- The next top-level item of the stream, or nil, err.
local function next_item(c)
  while true do
    local it = reader.items[reader.head]
    if it then
      reader.items[reader.head] = nil
      reader.head = reader.head + 1
      return it
    end
    local data, err = c:read()
    if not data then return nil, err end
    local items, perr = reader.parser:feed(data)
    if not items then return nil, perr end
    reader.items, reader.head = items, 1
  end
end

local function open_stream(c)
  reset_parser()
  c:write("<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
    .. "xmlns:stream='http://etherx.jabber.org/streams' to='" .. xml.escape(domain)
    .. "' from='" .. xml.escape(me) .. "' version='1.0' xml:lang='en'>")
  local header, err = next_item(c)
  if not header then return nil, err end
  if header.stream ~= "open" or header.ns ~= NS.stream then return nil, "the server did not open an XMPP stream" end
  local features
  features, err = next_item(c)
  if not features then return nil, err end
  if features.ns == NS.stream and features.name == "error" then
    return nil, "stream error: " .. tostring(features[1] and features[1].name)
  end
  if features.name ~= "features" or features.ns ~= NS.stream then return nil, "no stream features" end
  return features
end

-- Reads until an item for which want(item) is true (others are an error
-- when strict, else skipped).
local function expect(c, want)
  while true do
    local it, err = next_item(c)
    if not it then return nil, err end
    if it.ns == NS.stream and it.name == "error" then
      return nil, "stream error: " .. tostring(it[1] and it[1].name)
    end
    if it.stream == "close" then return nil, "the server closed the stream" end
    if want(it) then return it end
  end
end

-- Logging in ---------------------------------------------------------------------------

local function b64(s) return s == "" and "=" or crypto.base64_encode(s) end
local function unb64(s)
  if s == nil or s == "" or s == "=" then return "" end
  return crypto.base64_decode(s)
end

local function sasl_step(c)
  return expect(c, function(it) return it.ns == NS.sasl end)
end

local function authenticate(c, features, secure)
  local offered, names = {}, {}
  local mechs = child(features, "mechanisms", NS.sasl)
  for _, m in ipairs(mechs or {}) do
    if m.name == "mechanism" and m.text then offered[m.text] = true; names[#names + 1] = m.text end
  end
  for _, pair in ipairs(sasl.SCRAM) do
    local mech, alg = pair[1], pair[2]
    if offered[mech] then
      local s = sasl.scram(alg, node, opt.password)
      send(NSE(NS.sasl, "auth", { mechanism = mech }, b64(s:first())))
      local it, err = sasl_step(c)
      if not it then return nil, err end
      if it.name ~= "challenge" then return nil, mech .. " refused: " .. tostring(it[1] and it[1].name) end
      local final, ferr = s:final(unb64(it.text) or "")
      if not final then return nil, ferr end
      send(NSE(NS.sasl, "response", {}, b64(final)))
      it, err = sasl_step(c)
      if not it then return nil, err end
      local server_final
      if it.name == "challenge" then  -- some servers send v= as a challenge first
        server_final = unb64(it.text)
        send(NSE(NS.sasl, "response", {}))
        it, err = sasl_step(c)
        if not it then return nil, err end
      end
      if it.name ~= "success" then
        return nil, "login refused (" .. mech .. "): " .. tostring(it[1] and it[1].name), "auth"
      end
      local ok, verr = s:verify(server_final or unb64(it.text))
      if not ok then return nil, verr, "auth" end
      return mech
    end
  end
  if offered.PLAIN and secure then
    send(NSE(NS.sasl, "auth", { mechanism = "PLAIN" }, b64(sasl.plain(node, opt.password))))
    local it, err = sasl_step(c)
    if not it then return nil, err end
    if it.name ~= "success" then return nil, "login refused (PLAIN): " .. tostring(it[1] and it[1].name), "auth" end
    return "PLAIN"
  end
  return nil, ("no SASL mechanism we may use (offered: %s%s)"):format(table.concat(names, ", "),
    offered.PLAIN and "; PLAIN only over TLS" or ""), "auth"
end

local function iq_result(c, id)
  return expect(c, function(it) return it.name == "iq" and it.attrs.id == id end)
end

local function bind(c)
  local id = new_id()
  send(E("iq", { type = "set", id = id }, NSE(NS.bind, "bind", {}, E("resource", {}, opt.resource))))
  local it, err = iq_result(c, id)
  if not it then return nil, err end
  if it.attrs.type ~= "result" then return nil, "resource binding refused: " .. stanza_error(it) end
  local b = child(it, "bind", NS.bind)
  local j = b and child(b, "jid")
  return j and j.text or (me .. "/" .. opt.resource)
end

-- Connects and negotiates: TLS, SASL, then resumption or binding. Returns
-- the features of the final stream and whether the session was resumed.
local function negotiate()
  local direct = opt.tls == "direct"
  local c, err = net.connect(opt.host, opt.port, { tls = direct, servername = domain,
    ca_file = opt.ca_file, pin = opt.pin, timeout_ms = opt.timeout_ms })
  if not c then return nil, err end
  -- Everything up to a bound session must finish within timeout_ms.
  local guard = after(opt.timeout_ms * 2, function()
    log.warn("logging in took longer than " .. opt.timeout_ms * 2 .. " ms")
    c:close()
  end)
  local function fail(e, kind) cancel(guard); c:close(); return nil, e, kind end
  local secure = direct
  local features
  features, err = open_stream(c)
  if not features then return fail(err) end
  local starttls = child(features, "starttls", NS.tls)
  if not secure and opt.tls == "starttls" then
    if not starttls then return fail("the server does not offer STARTTLS; refusing to log in in plain text", "auth") end
    c:write("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
    local it
    it, err = expect(c, function(x) return x.ns == NS.tls end)
    if not it then return fail(err) end
    if it.name ~= "proceed" then return fail("the server refused STARTTLS") end
    local ok, terr = c:starttls { servername = domain, ca_file = opt.ca_file, pin = opt.pin, timeout_ms = opt.timeout_ms }
    if not ok then return fail(terr) end
    secure = true
    features, err = open_stream(c)
    if not features then return fail(err) end
  end
  conn = c  -- send() writes here from now on
  local mech, kind
  mech, err, kind = authenticate(c, features, secure)
  if not mech then conn = nil; return fail(err, kind) end
  log.info(("logged in as %s with %s%s"):format(me, mech, secure and " over TLS" or " WITHOUT TLS (loopback test)"))
  features, err = open_stream(c)
  if not features then conn = nil; return fail(err) end
  local can_sm = child(features, "sm", NS.sm) ~= nil
  -- Resume the previous session (XEP-0198) when the server still has it.
  if can_sm and sm.id and sm.resume then
    write_raw(("<resume xmlns='urn:xmpp:sm:3' h='%d' previd='%s'/>"):format(sm.inbound, xml.escape(sm.id)))
    local it
    it, err = expect(c, function(x) return x.ns == NS.sm and (x.name == "resumed" or x.name == "failed") end)
    if not it then conn = nil; return fail(err) end
    if it.name == "resumed" then
      acknowledge(it.attrs.h)
      sm.enabled = true
      for n = sm.acked + 1, sm.outbound do
        if sm.unacked[n] then write_raw(sm.unacked[n]) end
      end
      cancel(guard)
      return c, true
    end
    log.info("the server could not resume the session; starting a new one")
  end
  sm.enabled, sm.id, sm.resume, sm.inbound, sm.outbound, sm.acked, sm.unacked = false, nil, false, 0, 0, 0, {}
  sm.counting_in, sm.asked = false, false
  local jid
  jid, err = bind(c)
  if not jid then conn = nil; return fail(err) end
  full_jid = jid
  if can_sm then
    write_raw("<enable xmlns='urn:xmpp:sm:3' resume='true'/>")
    sm.enabled = true  -- our outbound count starts now; inbound at <enabled/>
    sm.counting_in = false
  end
  cancel(guard)
  return c, false
end

-- Messages ------------------------------------------------------------------------------

local HISTORY = 2000  -- messages remembered for MessageGet, edits and echoes
local msgs, ring, ring_pos = {}, {}, 0
local by_ref = {}     -- scope .. "\0" .. id attribute -> MessageID (same bound)
local by_origin = {}  -- segue_origin "backend\0id" -> MessageID we sent for it (same bound)
local sent_attr = {}  -- MessageID -> the id attribute of a message we sent (same bound):
                      -- what our corrections and 1:1 retractions name

local function remember(m, scope, attr_id, origin)
  ring_pos = ring_pos % HISTORY + 1
  local old = ring[ring_pos]
  if old then
    msgs[old.id] = nil
    if old.ref then by_ref[old.ref] = nil end
    if old.origin then by_origin[old.origin] = nil end
  end
  if old then sent_attr[old.id] = nil end
  local entry = { id = m.id, ref = attr_id and (scope .. "\0" .. attr_id), origin = origin }
  ring[ring_pos] = entry
  msgs[m.id] = m
  if entry.ref then by_ref[entry.ref] = m.id end
  if origin then by_origin[origin] = m.id end
end

local rooms = {}    -- room JID -> { nick =, joined =, name = }: where we want to be
local sent, sent_count = {}, 0  -- scope .. "\0" .. id attribute -> true: our own
                                -- groupchat stanzas whose reflection is not news
local known_rooms = {}  -- room JIDs RoomLookup answered: MessageSend to them is groupchat
local mam_results = {}  -- MAM query id -> { Messages } while the query runs

local function archive_id(archive, sid) return archive .. "#" .. sid end

local function content_of(st, body)
  local content = fmt.from_styling(body)
  local extra
  for _, x in ipairs(st) do
    if x.name == "x" and x.ns == NS.oob then
      local url = child(x, "url")
      if url and url.text and not body:find(url.text, 1, true) then
        content = { type = "Concat", value = { content, { type = "Text", value = body == "" and "" or " " },
          { type = "UrlLink", value = url.text } } }
      end
      extra = extra or {}
      extra.oob = extra.oob or {}
      extra.oob[#extra.oob + 1] = url and url.text
    end
  end
  return content, extra
end

-- A message stanza (live or from the archive) as a Message, or nil when it
-- carries nothing to show. `archive_sid` is the id the archive gave it.
local function to_message(st, archive_sid, stamp)
  local kind = st.attrs.type or "normal"
  local from = st.attrs.from or domain
  local body_el = child(st, "body")
  local body = body_el and body_el.text or ""
  local room = fmt.bare(from)
  local m = { attachments = {}, extra = nil }
  local archive, scope
  if kind == "groupchat" then
    if not fmt.resource(from) then return nil end  -- the room itself (subject, notices)
    m.sender = fmt.resource(from)
    m.recipient = room
    archive, scope = room, room
  else
    local occupant = rooms[room] ~= nil
    m.sender = occupant and from or room
    m.recipient = me
    archive, scope = me, occupant and from or room
    if room == me then  -- a message we sent from another client (archive copy)
      m.sender, m.recipient = me, fmt.bare(st.attrs.to or me)
      scope = m.recipient
    end
  end
  local sid = archive_sid
  if not sid then
    for _, c in ipairs(st) do
      if c.name == "stanza-id" and c.ns == NS.sid and fmt.bare(c.attrs.by or "") == archive then sid = c.attrs.id end
    end
  end
  local origin = child(st, "origin-id", NS.sid)
  local attr_id = (origin and origin.attrs.id) or st.attrs.id
  m.id = archive_id(archive, sid or attr_id or new_id())
  local delay = child(st, "delay", NS.delay)
  local t = stamp or (delay and fmt.stamp_ms(delay.attrs.stamp)) or now_ms()
  m.create_time, m.edit_time = t, t
  m.content, m.extra = content_of(st, fmt.clean(body))
  if kind == "groupchat" then m.extra = m.extra or {}; m.extra.jid = from end
  return m, scope, attr_id, sid
end

local function emit_message(m) backend:emit { type = "MessageUpsert", value = m } end

-- XEP-0424: <retract xmlns='urn:xmpp:message-retract:1' id='X'/>, or the
-- older <apply-to xmlns='urn:xmpp:fasten:0' id='X'><retract .../></apply-to>.
local function retraction_of(st)
  local r = child(st, "retract", NS.retract)
  if r then return r.attrs.id end
  local a = child(st, "apply-to", NS.fasten)
  if a and child(a, "retract", NS.retract0) then return a.attrs.id end
end

local function find_target(archive, scope, ref)
  return by_ref[scope .. "\0" .. ref] or (msgs[archive_id(archive, ref)] and archive_id(archive, ref))
end

local function on_message(st)
  local kind = st.attrs.type or "normal"
  if kind == "error" then
    return log.warn(("message to %s bounced: %s"):format(tostring(st.attrs.from), stanza_error(st)))
  end
  local m, scope, attr_id, sid = to_message(st)
  if not m then return end
  local archive = m.id:match("^(.*)#")
  -- Our own message, reflected by the room: confirms the send, not news.
  if kind == "groupchat" and attr_id and sent[scope .. "\0" .. attr_id] then
    sent[scope .. "\0" .. attr_id] = nil
    sent_count = sent_count - 1
    wake("echo " .. scope .. "\0" .. attr_id, sid or attr_id)
    return
  end
  local retracted = retraction_of(st)
  if retracted then
    local target = find_target(archive, scope, retracted)
    if target then
      msgs[target] = nil
      backend:emit { type = "MessageDelete", value = target }
    else
      log.info("a retraction of a message we never saw: " .. retracted)
    end
    return
  end
  if not child(st, "body") then return end  -- chat states, receipts, ...
  local replace = child(st, "replace", NS.replace)
  if replace and replace.attrs.id then
    local target = find_target(archive, scope, replace.attrs.id)
    local old = target and msgs[target]
    m.id = target or m.id
    if old then m.create_time = old.create_time end
    m.edit_time = now_ms()
    if m.edit_time <= m.create_time then m.edit_time = m.create_time + 1 end
    if old then msgs[target] = m end
    return emit_message(m)
  end
  remember(m, scope, attr_id)
  emit_message(m)
end

-- MAM results (XEP-0313) arrive as messages wrapping the archived one.
local function on_mam_result(st, result)
  local fwd = child(result, "forwarded", NS.forward)
  local inner = fwd and child(fwd, "message")
  if not inner then return end
  local delay = child(fwd, "delay", NS.delay)
  local stamp = delay and fmt.stamp_ms(delay.attrs.stamp)
  local archive = fmt.bare(st.attrs.from or me) or me
  if not inner.attrs.type and archive ~= me then inner.attrs.type = "groupchat" end
  local m, scope, attr_id = to_message(inner, result.attrs.id, stamp)
  if not m or not child(inner, "body") or child(inner, "replace", NS.replace) or retraction_of(inner) then return end
  if fmt.bare(m.id:match("^(.*)#")) ~= archive then m.id = archive_id(archive, result.attrs.id) end
  local list = mam_results[result.attrs.queryid]
  if not list or #list >= opt.history * 2 then return end  -- not asked for, or more than asked
  if not msgs[m.id] then remember(m, scope, attr_id) end
  list[#list + 1] = m
end

-- Presence: joining rooms ----------------------------------------------------------------

local function muc_codes(x)
  local codes = {}
  for _, s in ipairs(x or {}) do
    if s.name == "status" and s.attrs.code then codes[s.attrs.code] = true end
  end
  return codes
end

local function on_presence(st)
  local from = st.attrs.from or ""
  local room = fmt.bare(from)
  local r = room and rooms[room]
  if not r then return end
  if st.attrs.type == "error" then
    local why = stanza_error(st)
    if why:match("^conflict") and not r.joined and #r.nick < #opt.nick + 5 then
      r.nick = r.nick .. "_"
      log.info(("nick taken in %s; trying %s"):format(room, r.nick))
      send(E("presence", { to = room .. "/" .. r.nick }, NSE(NS.muc, "x", {}, E("history", { maxstanzas = "0" }))))
      return
    end
    wake("join " .. room, nil, ("cannot join %s: %s"):format(room, why))
    return
  end
  local x = child(st, "x", NS.muc_user)
  local codes = muc_codes(x)
  local is_self = codes["110"] or fmt.resource(from) == r.nick
  if not is_self then return end
  if st.attrs.type == "unavailable" then
    if r.joined then log.warn(("left %s (%s)"):format(room, codes["307"] and "kicked" or codes["301"] and "banned" or "removed")) end
    r.joined = false
    if codes["307"] or codes["301"] then rooms[room] = nil end
    return
  end
  if codes["201"] then
    -- A new room is locked until configured: accept the defaults (an instant room).
    send(E("iq", { type = "set", to = room, id = new_id() },
      NSE(NS.muc_owner, "query", {}, NSE(NS.data, "x", { type = "submit" }))))
  end
  if not r.joined then
    r.joined = true
    backend:emit { type = "RoomUpsert", value = { id = room, parent = segue.null, name = r.name or room, sendable = true } }
  end
  wake("join " .. room, true)
end

-- IQs ------------------------------------------------------------------------------------

local FEATURES = { NS.disco, NS.ping, NS.muc, NS.replace, NS.retract, NS.sid, NS.oob, NS.styling }

local function on_iq(st)
  local kind, id = st.attrs.type, st.attrs.id
  if kind == "result" or kind == "error" then return wake("iq " .. tostring(id), st) end
  if kind ~= "get" and kind ~= "set" then return end
  local q = st[1]
  local reply = { type = "result", id = id, to = st.attrs.from }
  if kind == "get" and q and q.name == "ping" and q.ns == NS.ping then
    return send(E("iq", reply))
  elseif kind == "get" and q and q.name == "query" and q.ns == NS.disco then
    local query = NSE(NS.disco, "query", {}, E("identity", { category = "client", type = "bot", name = "segue" }))
    for _, f in ipairs(FEATURES) do query[#query + 1] = E("feature", { var = f }) end
    return send(E("iq", reply, query))
  end
  reply.type = "error"
  send(E("iq", reply, E("error", { type = "cancel" }, NSE(NS.stanzas, "service-unavailable"))))
end

-- Sends an IQ and waits for its answer: the result stanza, or nil, err.
local function request_iq(el)
  local id = new_id()
  el.attrs.id = id
  local ok, err = send(el)
  if not ok then return nil, err end
  local it
  it, err = wait_for("iq " .. id, opt.timeout_ms)
  if not it then return nil, err end
  if it.attrs.type == "error" then return nil, stanza_error(it) end
  return it
end

-- The session ----------------------------------------------------------------------------

local function on_item(it)
  if it.ns == NS.sm then
    if it.name == "r" then write_raw(("<a xmlns='urn:xmpp:sm:3' h='%d'/>"):format(sm.inbound))
    elseif it.name == "a" then acknowledge(it.attrs.h)
    elseif it.name == "enabled" then
      sm.id, sm.resume, sm.inbound, sm.counting_in = it.attrs.id, it.attrs.resume == "true" or it.attrs.resume == "1", 0, true
    elseif it.name == "failed" then
      sm.enabled = false
      log.info("the server refused stream management")
    end
    return
  end
  if STANZA[it.name] and sm.counting_in then sm.inbound = sm.inbound + 1 end
  if it.name == "message" then
    local result = child(it, "result", NS.mam)
    if result then return on_mam_result(it, result) end
    return on_message(it)
  elseif it.name == "presence" then
    return on_presence(it)
  elseif it.name == "iq" then
    return on_iq(it)
  end
end

local function join_presence(room, r)
  return E("presence", { to = room .. "/" .. r.nick }, NSE(NS.muc, "x", {}, E("history", { maxstanzas = "0" })))
end

-- Reads until the connection ends; pings the server when it is quiet.
local function session(c)
  local heard, pinged = segue.now(), nil
  local timer
  local function check()
    if c:is_closed() then return end
    local now = segue.now()
    if pinged and now - pinged >= opt.ping_ms then
      log.warn(("no answer to a ping in %d ms; reconnecting"):format(opt.ping_ms))
      return c:close()
    end
    if not pinged and now - heard >= opt.ping_ms then
      pinged = now
      send(E("iq", { type = "get", id = "ping-" .. new_id(), to = domain }, NSE(NS.ping, "ping")))
      if sm.enabled then write_raw("<r xmlns='urn:xmpp:sm:3'/>") end
    end
    timer = after(math.max(opt.ping_ms // 4, 10), check)
  end
  timer = after(math.max(opt.ping_ms // 4, 10), check)
  while true do
    local it, err = next_item(c)
    if not it then cancel(timer); return err end
    heard, pinged = segue.now(), nil
    if it.stream == "close" then cancel(timer); return "the server closed the stream" end
    if it.ns == NS.stream and it.name == "error" then
      cancel(timer)
      return "stream error: " .. tostring(it[1] and it[1].name)
    end
    local ok, e = pcall(on_item, it)
    if not ok then log.error("handling a " .. tostring(it.name) .. " failed: " .. tostring(e)) end
  end
end

local function run()
  local delay = opt.reconnect_ms
  while not stopped do
    log.info(("connecting to %s:%d (%s)"):format(opt.host, opt.port, opt.tls or "no TLS"))
    local c, resumed, kind = negotiate()
    local err = resumed
    if c and stopped then c:close() end
    if c and not stopped then
      conn, online, delay = c, true, opt.reconnect_ms
      if not resumed then
        send(E("presence", {}))
        for room, r in pairs(rooms) do
          r.joined = false
          send(join_presence(room, r))
        end
      else
        log.info("session resumed (XEP-0198)")
      end
      wake("online", true)
      err = session(c)
      conn, online = nil, false
      c:close()
    elseif kind == "auth" then
      log.error(tostring(err))
      delay = math.max(delay, 30000)
    end
    if stopped then break end
    log.warn(("%s; reconnecting in %d ms"):format(tostring(err), delay))
    pause(delay)
    delay = math.min(delay * 2, opt.reconnect_max_ms)
  end
end

-- Requests --------------------------------------------------------------------------------

local function wait_online()
  if online then return true end
  local ok, err = wait_for("online", opt.timeout_ms)
  if not ok then return nil, "not connected to " .. opt.host .. ": " .. tostring(err) end
  return true
end

local function room_id(name)
  if type(name) ~= "string" then return nil, "a room is a JID such as room@conference.example.org" end
  name = name:gsub("^xmpp:", ""):gsub("%?join$", "")
  if name:match("^#") and opt.muc_domain then name = name:sub(2) .. "@" .. opt.muc_domain end
  local n, d, res = fmt.split(name)
  if not n or not d or res or name:find("[%s<>\"'&]") then
    return nil, ("%q is not a room JID (room@conference.example.org)"):format(name)
  end
  return fmt.bare(name)
end

local function join(room, display)
  local r = rooms[room]
  if not r then
    r = { nick = opt.nick, joined = false, name = display }
    rooms[room] = r
  end
  if r.joined then return true end
  local ok, err = wait_online()
  if not ok then return backend.error(err, true) end
  if r.joined then return true end
  send(join_presence(room, r))
  ok, err = wait_for("join " .. room, opt.timeout_ms)
  if not ok then
    rooms[room] = nil
    return nil, err
  end
  return true
end

local RETRACT_FALLBACK = "This person attempted to retract a previous message, but it's unsupported by your client."


local function send_message(msg)
  local target = msg.recipient
  local extra = type(msg.extra) == "table" and msg.extra or {}
  local groupchat = rooms[target] ~= nil or known_rooms[target] ~= nil
  if not groupchat and not fmt.split(target or "") then
    return nil, ("cannot send to %q: not a JID"):format(tostring(target))
  end
  if groupchat then
    local ok, err = join(target)
    if ok ~= true then return ok, err end
  end
  local ok, err = wait_online()
  if not ok then return backend.error(err, true) end
  local kind = groupchat and "groupchat" or "chat"
  local archive = groupchat and target or me
  local scope = groupchat and target or fmt.bare(target)
  local origin_key = type(extra.segue_origin) == "table"
    and (tostring(extra.segue_origin.backend) .. "\0" .. tostring(extra.segue_origin.id)) or nil
  local id = new_id()
  local stanza = E("message", { to = target, type = kind, id = id })

  -- A retraction (extra.retract = MessageID) -------------------------------
  if extra.retract then
    local old = msgs[extra.retract]
    local ref = groupchat and extra.retract:match("#(.*)$") or sent_attr[extra.retract]
    if not ref then return nil, "no message of ours with id " .. tostring(extra.retract) end
    stanza[1] = NSE(NS.retract, "retract", { id = ref })
    stanza[2] = NSE(NS.fallback, "fallback", { ["for"] = NS.retract })
    stanza[3] = E("body", {}, RETRACT_FALLBACK)
    stanza[4] = NSE(NS.hints, "store")
    if groupchat then sent[scope .. "\0" .. id], sent_count = true, sent_count + 1 end
    send(stanza)
    if old then msgs[extra.retract] = nil end
    return extra.retract
  end

  local body = fmt.clean(fmt.to_styling(msg.content))
  local urls = {}
  for _, a in ipairs(msg.attachments or {}) do
    if type(a.url) == "string" then urls[#urls + 1] = a.url
    else body = body .. (body == "" and "" or " ") .. "[" .. tostring(a.mime) .. " attachment]" end
  end
  if type(extra.url) == "string" then urls[#urls + 1] = extra.url end
  if body == "" and #urls == 0 then return nil, "nothing to send: the message is empty" end
  if body == "" then body = urls[1] end
  stanza[#stanza + 1] = E("body", {}, body)
  for _, u in ipairs(urls) do stanza[#stanza + 1] = NSE(NS.oob, "x", {}, E("url", {}, u)) end
  stanza[#stanza + 1] = NSE(NS.sid, "origin-id", { id = id })

  -- An edit: extra.replace = MessageID, or the same origin sent again by the router.
  local replaces = extra.replace or (origin_key and by_origin[origin_key])
  if replaces then
    local ref = sent_attr[replaces]
    if ref then
      stanza[#stanza + 1] = NSE(NS.replace, "replace", { id = ref })
    else
      replaces = nil
    end
  end

  local t = now_ms()
  local m = { sender = groupchat and rooms[target].nick or me, recipient = target, content = msg.content,
    attachments = msg.attachments or {}, create_time = t, edit_time = t, extra = msg.extra }
  if groupchat then
    if sent_count > 1000 then sent, sent_count = {}, 0 end  -- reflections that never came
    sent[scope .. "\0" .. id], sent_count = true, sent_count + 1
  end
  local sok, serr = send(stanza)
  if not sok then return backend.error(serr, true) end
  if replaces then
    local old = msgs[replaces]
    m.id, m.create_time = replaces, old and old.create_time or t
    msgs[replaces] = m
    return replaces
  end
  local sid = id
  if groupchat then
    -- The room reflects the message with the id it archived it under.
    local echo, eerr = wait_for("echo " .. scope .. "\0" .. id, opt.timeout_ms)
    if sent[scope .. "\0" .. id] then sent[scope .. "\0" .. id], sent_count = nil, sent_count - 1 end
    if echo then sid = echo else log.warn(("no echo from %s: %s"):format(target, tostring(eerr))) end
  end
  m.id = archive_id(archive, sid)
  remember(m, scope, id, origin_key)
  sent_attr[m.id] = id
  return m.id
end

-- MessageGetBefore: a page of the archive before `id`, oldest first.
local function get_before(id)
  local archive, sid = tostring(id):match("^(.-)#(.+)$")
  if not archive then return nil, ("%q is not a message id of this backend"):format(tostring(id)) end
  local ok, err = wait_online()
  if not ok then return backend.error(err, true) end
  local qid = new_id()
  local query = NSE(NS.mam, "query", { queryid = qid })
  local known = msgs[id]
  if archive == me and known then
    local with = known.sender == me and known.recipient or known.sender
    query[1] = NSE(NS.data, "x", { type = "submit" },
      E("field", { var = "FORM_TYPE", type = "hidden" }, E("value", {}, NS.mam)),
      E("field", { var = "with" }, E("value", {}, fmt.bare(with))))
  end
  query[#query + 1] = NSE(NS.rsm, "set", {}, E("max", {}, tostring(opt.history)), E("before", {}, sid))
  local attrs = { type = "set" }
  if archive ~= me then attrs.to = archive end
  -- Results come before the IQ's answer: on_mam_result collects them.
  local results = {}
  mam_results[qid] = results
  local answer, qerr = request_iq(E("iq", attrs, query))
  mam_results[qid] = nil
  if not answer then return nil, "history of " .. archive .. ": " .. tostring(qerr) end
  for _, m in ipairs(results) do emit_message(m) end
  return true
end

return {
  info = { name = "xmpp", version = { 0, 1, 0 },
    -- message styling (XEP-0393) has no underline; links are their text.
    -- Attachments only as URLs (no upload), so no bytes. Corrections,
    -- retractions and MAM history both ways.
    capabilities = { formatting = { "Text", "Concat", "Bold", "Italic", "Crossout", "Emote", "UrlLink" },
      max_length = 10000, length_unit = "chars", attachments = { max_bytes = 0, types = {} },
      edits = true, deletes = true, history = true } },

  start = function() run() end,

  stop = function()
    stopped = true
    waits.stop_all()
    if conn then
      conn:write("<presence type='unavailable'/></stream:stream>")
      conn:close()
    end
  end,

  RoomLookup = function(name)
    local rid, err = room_id(name)
    if rid then known_rooms[rid] = true end
    return rid, err
  end,

  RoomGet = function(id)
    local rid, err = room_id(id)
    if not rid then return nil, err end
    local r = rooms[rid]
    return { id = rid, parent = segue.null, name = r and r.name or rid, sendable = true }
  end,

  RoomCreate = function(new)
    local rid, err = room_id(new.name)
    if not rid then return nil, err end
    local ok, e = join(rid, new.name)
    if ok ~= true then return ok, e end
    return rid
  end,

  RoomJoin = function(id)
    local rid, err = room_id(id)
    if not rid then return nil, err end
    return join(rid)
  end,

  RoomLeave = function(id)
    local rid, err = room_id(id)
    if not rid then return nil, err end
    local r = rooms[rid]
    rooms[rid] = nil
    if r and online then send(E("presence", { to = rid .. "/" .. r.nick, type = "unavailable" })) end
    return true
  end,

  MessageSend = send_message,

  MessageGet = function(id)
    return msgs[id] or nil, "no message with id " .. tostring(id) .. " (only recent ones are kept)"
  end,

  MessageGetBefore = get_before,
}
