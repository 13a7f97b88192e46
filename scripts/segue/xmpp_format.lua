-- The XMPP backend's pure half: JIDs, message styling (XEP-0393) to and
-- from MessageContent, XEP-0082 time stamps, and text made safe for XML.
-- No I/O, so busted tests it directly (tests/spec/xmpp_format_spec.lua).
local utc = require "segue.utc"

local M = {}

-- JIDs -----------------------------------------------------------------------

--- split(jid) -> local (or nil), domain, resource (or nil)
function M.split(jid)
  if type(jid) ~= "string" then return nil end
  local rest, resource = jid:match("^([^/]*)/(.*)$")
  if not rest then rest = jid end
  local node, domain = rest:match("^([^@]*)@(.*)$")
  if not node then domain = rest end
  if domain == "" or (node == "") or resource == "" then return nil end
  return node, domain, resource
end

--- bare(jid) -> "local@domain" or "domain", lower-cased (nodeprep and
--- nameprep fold ASCII case; non-ASCII is kept as given).
function M.bare(jid)
  local node, domain = M.split(jid)
  if not domain then return nil end
  return ((node and node .. "@" or "") .. domain):lower()
end

function M.resource(jid)
  local _, _, r = M.split(jid)
  return r
end

--- is_jid(s): a plausible bare or full JID (no spaces, one @ at most).
function M.is_jid(s)
  return type(s) == "string" and #s <= 3071 and not s:find("[%s<>\"'&]")
    and M.split(s) ~= nil and select(2, s:gsub("@", "")) <= 1 + (s:match("/.*") and select(2, s:match("/.*"):gsub("@", "")) or 0)
end

-- Text ------------------------------------------------------------------------

--- clean(s) -> s with what XML cannot carry removed: control characters
--- (but tab, LF), U+FFFE/U+FFFF, and invalid UTF-8 (each bad byte becomes
--- U+FFFD). CR LF becomes LF.
function M.clean(s)
  s = s:gsub("\r\n", "\n"):gsub("[%z\1-\8\11-\31\127]", ""):gsub("\xEF\xBF[\xBE\xBF]", "")
  local out, i = {}, 1
  while true do
    local ok, bad = utf8.len(s, i)
    if ok then out[#out + 1] = s:sub(i) break end
    out[#out + 1] = s:sub(i, bad - 1) .. "\u{FFFD}"
    i = bad + 1
  end
  return table.concat(out)
end

-- Time (XEP-0082) ------------------------------------------------------------------

--- stamp_ms("2026-11-26T14:05:00.123Z") -> ms since the epoch, or nil.
function M.stamp_ms(s)
  if type(s) ~= "string" then return nil end
  local y, mo, d, h, mi, sec, frac, tz = s:match("^(%d%d%d%d)%-(%d%d)%-(%d%d)T(%d%d):(%d%d):(%d%d)(%.?%d*)(.*)$")
  if not y then return nil end
  local t = utc.days_from_civil(tonumber(y), tonumber(mo), tonumber(d)) * 86400
    + tonumber(h) * 3600 + tonumber(mi) * 60 + tonumber(sec)
  local off = 0
  if tz ~= "Z" and tz ~= "" then
    local sign, oh, om = tz:match("^([+-])(%d%d):(%d%d)$")
    if not sign then return nil end
    off = (tonumber(oh) * 3600 + tonumber(om) * 60) * (sign == "+" and 1 or -1)
  end
  local ms = #frac > 1 and math.floor(tonumber("0" .. frac) * 1000 + 0.5) or 0
  return (t - off) * 1000 + ms
end

-- Message styling (XEP-0393) -> MessageContent ----------------------------------------

local SPAN = { ["*"] = "Bold", ["_"] = "Italic", ["~"] = "Crossout", ["`"] = "Pre" }

local function text(s) return { type = "Text", value = s } end

local function concat(parts)
  local merged = {}
  for _, p in ipairs(parts) do
    local last = merged[#merged]
    if p.type == "Text" and last and last.type == "Text" then
      last.value = last.value .. p.value
    elseif not (p.type == "Text" and p.value == "") then
      merged[#merged + 1] = p
    end
  end
  if #merged == 0 then return text("") end
  if #merged == 1 then return merged[1] end
  return { type = "Concat", value = merged }
end

-- URLs in plain text become UrlLink nodes.
local function links(s, parts)
  local i = 1
  while true do
    local a, b = s:find("%f[%w]https?://[^%s<>\"]+", i)
    if not a then break end
    local url = s:sub(a, b)
    local trail = url:match("[%.,;:!%?%)%]']+$") or ""  -- sentence punctuation after a URL
    url = url:sub(1, #url - #trail)
    parts[#parts + 1] = text(s:sub(i, a - 1))
    parts[#parts + 1] = { type = "UrlLink", value = url }
    i = a + #url
  end
  parts[#parts + 1] = text(s:sub(i))
end

local function is_space(c) return c == nil or c == "" or c:match("%s") ~= nil end

-- One line of spans (XEP-0393 section 6.2): an opening directive starts the
-- line or follows whitespace or another opening directive, and is not
-- followed by whitespace; the span ends at the next same directive not
-- preceded by whitespace; it is not empty. Inside ` nothing is styled.
local function spans(line, parts)
  local plain_from, i = 1, 1
  while i <= #line do
    local c = line:sub(i, i)
    local prev = line:sub(i - 1, i - 1)
    if SPAN[c] and (i == 1 or is_space(prev) or (SPAN[prev] and i - 1 >= plain_from - 1))
        and not is_space(line:sub(i + 1, i + 1)) then
      local j = i + 2
      local close
      while j <= #line do
        if line:sub(j, j) == c and not is_space(line:sub(j - 1, j - 1)) then close = j break end
        j = j + 1
      end
      if close then
        links(line:sub(plain_from, i - 1), parts)
        local inner = line:sub(i + 1, close - 1)
        if c == "`" then
          parts[#parts + 1] = text(c .. inner .. c)  -- MessageContent has no code: kept as written
        else
          local sub = {}
          spans(inner, sub)
          parts[#parts + 1] = { type = SPAN[c], value = concat(sub) }
        end
        i = close + 1
        plain_from = i
      else
        i = i + 1
      end
    else
      i = i + 1
    end
  end
  links(line:sub(plain_from), parts)
end

--- from_styling(body) -> MessageContent. "/me text" (XEP-0245) is an
--- Emote; ``` blocks and "> " quotes are kept as text; spans and URLs in
--- other lines become nodes.
function M.from_styling(body)
  local me = body:match("^/me (.*)$")
  if me then return { type = "Emote", value = me } end
  local parts, pre = {}, false
  local first = true
  for line in (body .. "\n"):gmatch("(.-)\n") do
    if not first then parts[#parts + 1] = text("\n") end
    first = false
    if line:match("^```") then
      pre = not pre
      parts[#parts + 1] = text(line)
    elseif pre then
      parts[#parts + 1] = text(line)
    else
      local quote, rest = line:match("^(>+ ?)(.*)$")
      if quote then parts[#parts + 1] = text(quote) end
      spans(rest or line, parts)
    end
  end
  return concat(parts)
end

-- MessageContent -> message styling ------------------------------------------------------

local MARK = { Bold = "*", Italic = "_", Crossout = "~" }

local function render(c, depth)
  if depth > 64 or type(c) ~= "table" then return "" end
  local t, v = c.type, c.value
  if t == "Text" or t == "UrlLink" or t == "UserLink" or t == "RoomLink" or t == "MessageLink" then
    return type(v) == "string" and v or ""
  elseif t == "Emote" then
    return type(v) == "string" and v or ""
  elseif t == "Concat" then
    local out = {}
    for _, p in ipairs(type(v) == "table" and v or {}) do out[#out + 1] = render(p, depth + 1) end
    return table.concat(out)
  elseif MARK[t] or t == "Underline" then
    local inner = render(v, depth + 1)
    if t == "Underline" then return inner end  -- XEP-0393 has no underline
    -- Markers must touch the text: whitespace goes outside; no empty spans;
    -- one span per line (a span cannot cross a line break).
    local out = {}
    for line in (inner .. "\n"):gmatch("(.-)\n") do
      local lead, core, trail = line:match("^(%s*)(.-)(%s*)$")
      out[#out + 1] = core == "" and line or (lead .. MARK[t] .. core .. MARK[t] .. trail)
    end
    return table.concat(out, "\n")
  end
  return ""
end

--- to_styling(content) -> body text. A top-level Emote is "/me text".
function M.to_styling(content)
  if type(content) == "table" and content.type == "Emote" then return "/me " .. render(content, 1) end
  return render(content, 1)
end

return M
