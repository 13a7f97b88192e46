-- IRC without a connection: parsing and building protocol lines, case
-- mapping, MessageContent <-> IRC formatting codes, and splitting text into
-- lines that fit the 512-byte limit, IRCv3 message tags and server times.
-- Pure functions, so the IRC backend's protocol handling is testable without
-- a server (tests/spec/irc_format_spec.lua). It lives beside backends/irc.lua,
-- its only user, and is embedded as the module `segue.irc_format` (a file
-- backends/<name>_<part>.lua beside backends/<name>.lua is a helper module,
-- not a backend: cmake/embed_scripts.cmake).
local utc = require "segue.utc"

local M = {}

M.LINE_BYTES = 512   -- RFC 1459/2812: a line with its CRLF
M.MAX_DEPTH = 64     -- MessageContent nesting we render

-- Lines ----------------------------------------------------------------------

--- parse(line) -> { tags, source, nick, user, host, command, params } | nil, err
--- `line` has no CRLF. Tags are kept as their raw string; command is upper case.
function M.parse(line)
  if type(line) ~= "string" or line == "" then return nil, "empty line" end
  local msg, rest = {}, line
  if rest:sub(1, 1) == "@" then
    msg.tags, rest = rest:match("^@(%S+) +(.*)$")
    if not rest then return nil, "tags without a command" end
  end
  if rest:sub(1, 1) == ":" then
    msg.source, rest = rest:match("^:(%S+) +(.*)$")
    if not rest then return nil, "source without a command" end
    msg.nick, msg.user, msg.host = msg.source:match("^([^!@]*)!?([^@]*)@?(.*)$")
  end
  local command, params = rest:match("^(%w+) *(.*)$")
  if not command then return nil, "no command in " .. ("%q"):format(line) end
  msg.command = command:upper()
  msg.params = {}
  while params ~= "" do
    if params:sub(1, 1) == ":" then
      msg.params[#msg.params + 1] = params:sub(2)
      break
    end
    local word, after = params:match("^(%S+) *(.*)$")
    msg.params[#msg.params + 1] = word
    params = after
  end
  return msg
end

local TAG_UNESCAPE = { [":"] = ";", s = " ", ["\\"] = "\\", r = "\r", n = "\n" }

--- tags(raw) -> { key = value }: the IRCv3 message tags of a parsed line
--- (`msg.tags`), values unescaped ("\\s" is a space...); a tag without a
--- value is "". An absent or empty string gives {}.
function M.tags(raw)
  local t = {}
  for item in (raw or ""):gmatch("[^;]+") do
    local k, v = item:match("^([^=]+)=?(.*)$")
    if k then
      t[k] = (v:gsub("\\(.?)", function(c) return TAG_UNESCAPE[c] or c end))
    end
  end
  return t
end

--- parse_time(s) -> milliseconds since the epoch for an IRCv3 server-time
--- value ("2026-11-26T14:49:24.277Z", UTC), or nil for anything else.
function M.parse_time(s)
  if type(s) ~= "string" then return nil end
  local y, mo, d, h, mi, sec, frac = s:match("^(%d%d%d%d)%-(%d%d)%-(%d%d)T(%d%d):(%d%d):(%d%d)%.?(%d*)Z$")
  if not y then return nil end
  y, mo, d, h, mi, sec = tonumber(y), tonumber(mo), tonumber(d), tonumber(h), tonumber(mi), tonumber(sec)
  if mo < 1 or mo > 12 or d < 1 or d > 31 or h > 23 or mi > 59 or sec > 60 then return nil end
  local ms = frac ~= "" and math.tointeger(tonumber((frac .. "00"):sub(1, 3))) or 0
  return ((utc.days_from_civil(y, mo, d) * 24 + h) * 60 + mi) * 60000 + sec * 1000 + ms
end

--- line(command, params...) -> "COMMAND p1 :last" (no CRLF). Raises on a
--- parameter that would break the framing (CR, LF, NUL) or a middle one that
--- is empty, has a space or starts with ":" (programmer errors).
function M.line(command, ...)
  local parts = { command }
  local n = select("#", ...)
  for i = 1, n do
    local p = tostring((select(i, ...)))
    if p:find("[\r\n%z]") then error(("IRC parameter %d has CR, LF or NUL"):format(i), 2) end
    if i == n and (p == "" or p:find(" ", 1, true) or p:sub(1, 1) == ":") then
      p = ":" .. p
    elseif i < n and (p == "" or p:find(" ", 1, true) or p:sub(1, 1) == ":") then
      error(("IRC parameter %d (%q) cannot be a middle parameter"):format(i, p), 2)
    end
    parts[#parts + 1] = p
  end
  return table.concat(parts, " ")
end

--- lower(name): RFC 1459 case mapping ([]\~ are the upper case of {}|^),
--- what servers use to compare nicks and channel names.
function M.lower(name)
  return (name:lower():gsub("[%[%]\\~]", { ["["] = "{", ["]"] = "}", ["\\"] = "|", ["~"] = "^" }))
end

function M.is_channel(name)
  return type(name) == "string" and name:match("^[#&+!][^%s,\7]+$") ~= nil
end

--- ctcp(text) -> command, argument when text is a CTCP message ("\1ACTION waves\1").
function M.ctcp(text)
  local cmd, arg = text:match("^\1(%u+) ?([^\1]*)\1?$")
  return cmd, arg
end

-- Formatting -----------------------------------------------------------------

local CODES = { Bold = "\2", Italic = "\29", Underline = "\31", Crossout = "\30" }
local STYLE_OF = { ["\2"] = "Bold", ["\29"] = "Italic", ["\31"] = "Underline", ["\30"] = "Crossout" }
local STYLE_ORDER = { "Bold", "Italic", "Underline", "Crossout" }  -- outermost first
M.codes = CODES

-- Text from elsewhere must not carry IRC control codes: they would restyle
-- the line or (\1) turn it into a CTCP request.
local function clean(s)
  return (tostring(s):gsub("[%z\1-\3\15\17\22\29-\31\r]", ""))
end

local function render(c, active, out, depth)
  if depth > M.MAX_DEPTH then error("MessageContent is nested deeper than " .. M.MAX_DEPTH, 0) end
  if type(c) ~= "table" then return end
  local t, v = c.type, c.value
  if t == "Text" then
    out[#out + 1] = clean(v)
  elseif CODES[t] then
    if active[t] then return render(v, active, out, depth + 1) end
    active[t] = true
    out[#out + 1] = CODES[t]
    render(v, active, out, depth + 1)
    out[#out + 1] = CODES[t]
    active[t] = nil
  elseif t == "Concat" then
    for _, part in ipairs(v) do render(part, active, out, depth + 1) end
  elseif t == "Emote" then
    out[#out + 1] = "* " .. clean(v)
  elseif t == "UrlLink" or t == "RoomLink" or t == "UserLink" or t == "MessageLink" then
    out[#out + 1] = clean(v)   -- IRC has no links: the text is the link
  end
end

--- to_irc(content) -> text, is_action: IRC text with formatting codes (may
--- contain "\n"; split it with split_lines). A top-level Emote is a CTCP
--- ACTION: its text comes back with is_action true.
function M.to_irc(content)
  if type(content) == "table" and content.type == "Emote" then return clean(content.value), true end
  local out = {}
  render(content, {}, out, 1)
  return table.concat(out), false
end

local URL = "https?://[^%s\2\3\15\22\29-\31]+"

-- Text nodes for a run of plain text, with URLs as UrlLink.
local function text_nodes(s, out)
  local pos = 1
  while true do
    local a, b = s:find(URL, pos)
    if not a then break end
    local url = s:sub(a, b)
    local trail = url:match("[%.,;:!%?%)%]}'\"]+$")  -- sentence punctuation is not the URL's
    if trail then url, b = url:sub(1, #url - #trail), b - #trail end
    if a > pos then out[#out + 1] = { type = "Text", value = s:sub(pos, a - 1) } end
    out[#out + 1] = { type = "UrlLink", value = url }
    pos = b + 1
  end
  if pos <= #s then out[#out + 1] = { type = "Text", value = s:sub(pos) } end
end

local function styled(text, style)
  local nodes = {}
  text_nodes(text, nodes)
  local node = #nodes == 1 and nodes[1] or { type = "Concat", value = nodes }
  for i = #STYLE_ORDER, 1, -1 do
    local s = STYLE_ORDER[i]
    if style[s] then node = { type = s, value = node } end
  end
  return node
end

-- Length of the IRC colour code at i ("\3", "\0034", "\00304,12"), or of
-- the hex colour code ("\4FF0000,000000").
local function color_code_end(text, i)
  local b = text:byte(i)
  if b == 3 then
    return select(2, text:find("^\3%d%d?,%d%d?", i)) or select(2, text:find("^\3%d?%d?", i))
  end
  return select(2, text:find("^\4%x%x%x%x%x%x,%x%x%x%x%x%x", i)) or select(2, text:find("^\4%x?%x?%x?%x?%x?%x?", i))
end

--- strip(text) -> text without any formatting or colour code (for Emote,
--- which is a plain string).
function M.strip(text)
  local out, i = {}, 1
  while true do
    local a = text:find("[\2\3\4\15\17\22\29\30\31]", i)
    if not a then
      out[#out + 1] = text:sub(i)
      return table.concat(out)
    end
    out[#out + 1] = text:sub(i, a - 1)
    local c = text:byte(a)
    i = (c == 3 or c == 4) and color_code_end(text, a) + 1 or a + 1
  end
end

--- from_irc(text) -> MessageContent: bold, italic, underline and
--- strikethrough codes become the matching nodes; colours, reverse and
--- monospace are dropped (MessageContent has none); URLs become UrlLink.
function M.from_irc(text)
  local parts, style, buf = {}, {}, {}
  local function flush()
    if #buf == 0 then return end
    parts[#parts + 1] = styled(table.concat(buf), style)
    buf = {}
  end
  local i, n = 1, #text
  while i <= n do
    local a = text:find("[\2\3\4\15\17\22\29\30\31]", i)
    if not a then
      buf[#buf + 1] = text:sub(i)
      break
    end
    if a > i then buf[#buf + 1] = text:sub(i, a - 1) end
    local c = text:sub(a, a)
    i = a + 1
    if STYLE_OF[c] then
      flush()
      local s = STYLE_OF[c]
      local copy = {}
      for k, v in pairs(style) do copy[k] = v end
      copy[s] = not style[s] or nil
      style = copy
    elseif c == "\15" then
      flush()
      style = {}
    elseif c == "\3" or c == "\4" then
      i = color_code_end(text, a) + 1
    end
  end
  flush()
  if #parts == 0 then return { type = "Text", value = "" } end
  if #parts == 1 then return parts[1] end
  return { type = "Concat", value = parts }
end

-- Splitting ------------------------------------------------------------------

-- The text as atoms that must not be cut: a UTF-8 character, a colour code
-- with its digits, a formatting code, or a single byte of invalid UTF-8.
local function atoms(text)
  local out, i, n = {}, 1, #text
  while i <= n do
    local b = text:byte(i)
    local j = i
    if b == 3 or b == 4 then
      j = color_code_end(text, i)
    elseif b >= 0xC0 then
      local len = b >= 0xF0 and 4 or b >= 0xE0 and 3 or 2
      local seq = text:sub(i, i + len - 1)
      if #seq == len and seq:match("^.[\128-\191]*$") then j = i + len - 1 end
    end
    out[#out + 1] = text:sub(i, j)
    i = j + 1
  end
  return out
end

-- The codes that restore `st` at the start of a new line.
local function reopen(st)
  local p = {}
  for _, s in ipairs(STYLE_ORDER) do if st[s] then p[#p + 1] = CODES[s] end end
  if st.color then p[#p + 1] = st.color end
  return table.concat(p)
end

local function advance(st, atom)
  if STYLE_OF[atom] then
    st[STYLE_OF[atom]] = not st[STYLE_OF[atom]] or nil
  elseif atom == "\15" then
    for k in pairs(st) do st[k] = nil end
  elseif atom:match("^[\3\4]") then
    st.color = (#atom > 1) and atom or nil
  end
end

local function is_codes_only(A, from, to)
  for k = from, to do
    if not A[k]:match("^[\2\3\4\15\17\22\29-\31]") then return false end
  end
  return true
end

--- split_lines(text, max_bytes) -> { line, ... }: each at most max_bytes,
--- cut at "\n" and, where needed, at a space in the second half of the line
--- or else between two characters (never inside a UTF-8 sequence or a
--- colour code). Formatting active at a cut is reopened on the next line
--- (IRC resets it at each line end). Empty lines are dropped.
function M.split_lines(text, max_bytes)
  assert(max_bytes and max_bytes >= 16, "max_bytes must be at least 16")
  local A = atoms(text)
  local prefix, st = {}, {}
  for i, a in ipairs(A) do
    prefix[i] = reopen(st)
    advance(st, a)
  end
  local lines, start = {}, 1
  while start <= #A do
    local head = start == 1 and "" or prefix[start]
    local len, i = #head, start
    local space, space_len
    while i <= #A and A[i] ~= "\n" and len + #A[i] <= max_bytes do
      if A[i] == " " then space, space_len = i, len end
      len = len + #A[i]
      i = i + 1
    end
    local stop, nxt = i - 1, i
    if i <= #A and A[i] == "\n" then
      nxt = i + 1
    elseif i <= #A and space and space_len >= max_bytes // 2 then
      stop, nxt = space - 1, space + 1
    end
    local body = table.concat(A, "", start, stop)
    if body:find("[^\2\15\17\22\29-\31]") and not is_codes_only(A, start, stop) then
      lines[#lines + 1] = head .. body
    end
    start = nxt
  end
  return lines
end

--- budget(source_len, command, target, action) -> bytes left for the text of
--- one message, as the server relays it: ":<source> <command> <target>
--- :<text>\r\n" (plus "\1ACTION " and "\1" for an action).
function M.budget(source_len, command, target, action)
  local n = M.LINE_BYTES - 2 - (1 + source_len + 1) - (#command + 1 + #target + 2)
  if action then n = n - 9 end
  return n
end

return M
