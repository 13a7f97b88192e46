--- segue.degrade: each copy adapted to what its destination can carry.
---
--- A backend announces its service's capabilities in its InitInfo (segue's
--- extension, docs/spec/backend-protocol.md); one that announces nothing
--- gets DEFAULTS, which assume little. The router calls M.send once per
--- copy (its one hook); M.send calls the router's send function once, or
--- once per part of a split message, after adapting:
---
--- - an edit to a service without edits, when its text is long, becomes a
---   short correction notice instead of a full resend (the bridge's
---   `edits = "ignore"` drops edits before this);
--- - formatting the service does not render becomes plain text with markers
---   (*bold*, _italic_, _underline_, ~crossed~, links as their text, an
---   emote as "* text"); the text itself, its lines, quotes and code, is kept;
--- - a message longer than the service allows is split at a paragraph, line,
---   sentence or word boundary (bridge `long = "split"`, the default, up to
---   MAX_PARTS parts) or cut with a notice (`long = "cut"`);
--- - an attachment over the service's size limit, or of a type it does not
---   take, becomes a notice with its type and size.
---
--- Each adaptation is counted (segue.flow: `degraded` and `degraded_<what>`
--- per backend in `segue status`). A copy that needs none costs a table
--- lookup and a few comparisons: no allocation.
local core = require "segue.core"

local M = {}

M.MAX_PARTS = 10          -- a split message is at most this many copies
M.EDIT_NOTICE_OVER = 200  -- an edit longer than this (characters) becomes a notice
M.EDIT_NOTICE_KEEP = 80   -- ...quoting its first characters

local ALL_KINDS = { "Text", "Bold", "Italic", "Underline", "Crossout", "Concat", "Emote",
  "MessageLink", "RoomLink", "UserLink", "UrlLink" }

--- What a service that announces nothing is assumed to do: plain text of
--- up to 4000 characters, no edits, deletes, replies, reactions or history,
--- attachments up to 1 MiB of any type.
M.DEFAULTS = {
  edits = false, deletes = false, replies = false, reactions = false, history = false,
  formatting = { "Text" },
  max_length = 4000, length_unit = "chars",
  attachments = { max_bytes = 1048576, types = { "*/*" } },
}

local function copy_list(t) local o = {} for i, v in ipairs(t) do o[i] = v end return o end

--- capabilities(announced) -> the full table: what was announced (checked
--- field by field; a wrong type is ignored with a warning) over DEFAULTS.
function M.capabilities(announced, name)
  local d = M.DEFAULTS
  local c = { edits = d.edits, deletes = d.deletes, replies = d.replies, reactions = d.reactions,
    history = d.history, formatting = copy_list(d.formatting), max_length = d.max_length,
    length_unit = d.length_unit,
    attachments = { max_bytes = d.attachments.max_bytes, types = copy_list(d.attachments.types) } }
  if type(announced) ~= "table" then return c end
  local function bad(field, want)
    core.log("warn", ("capabilities.%s: expected %s; the default is used"):format(field, want), "backend", name)
  end
  for _, k in ipairs { "edits", "deletes", "replies", "reactions", "history" } do
    local v = announced[k]
    if type(v) == "boolean" then c[k] = v elseif v ~= nil then bad(k, "true or false") end
  end
  local f = announced.formatting
  if type(f) == "table" then
    c.formatting = {}
    for _, kind in ipairs(f) do
      if type(kind) == "string" then c.formatting[#c.formatting + 1] = kind end
    end
  elseif f ~= nil then bad("formatting", "a list of MessageContent kinds") end
  local ml = announced.max_length
  if math.type(ml) == "integer" and ml > 0 then c.max_length = ml
  elseif ml == 0 then c.max_length = nil  -- no limit
  elseif ml ~= nil then bad("max_length", "an integer >= 0 (0: no limit)") end
  local unit = announced.length_unit
  if unit == "bytes" or unit == "chars" then c.length_unit = unit
  elseif unit ~= nil then bad("length_unit", '"bytes" or "chars"') end
  local a = announced.attachments
  if type(a) == "table" then
    if math.type(a.max_bytes) == "integer" and a.max_bytes >= 0 then c.attachments.max_bytes = a.max_bytes
    elseif a.max_bytes ~= nil then bad("attachments.max_bytes", "an integer >= 0") end
    if type(a.types) == "table" then
      c.attachments.types = {}
      for _, t in ipairs(a.types) do
        if type(t) == "string" then c.attachments.types[#c.attachments.types + 1] = t end
      end
    elseif a.types ~= nil then bad("attachments.types", "a list of MIME types") end
  elseif a ~= nil then bad("attachments", "an object") end
  return c
end

-- The destination's capabilities, with lookups prepared, cached per
-- backend until it (re)starts.
local cache = {}

local function prepared(name)
  local c = cache[name]
  if c then return c end
  local announced
  for _, b in ipairs(core.backends()) do
    if b.name == name then announced = b.capabilities break end
  end
  c = M.capabilities(announced, name)
  c.kinds = {}
  for _, k in ipairs(c.formatting) do c.kinds[k] = true end
  c.kinds.Concat, c.kinds.Text = true, true  -- structure and text always pass
  c.all_kinds = true
  for _, k in ipairs(ALL_KINDS) do if not c.kinds[k] then c.all_kinds = false end end
  c.any_type = false
  for _, t in ipairs(c.attachments.types) do if t == "*/*" or t == "*" then c.any_type = true end end
  cache[name] = c
  return c
end
M.of = prepared

--- forget(name): a backend (re)started or changed; read its capabilities again.
function M.forget(name) cache[name] = nil end

-- Content ---------------------------------------------------------------

local MARK = { Bold = "*", Italic = "_", Underline = "_", Crossout = "~" }

-- Returns content with every kind the service lacks replaced by markers,
-- and whether anything changed (the same table when nothing did).
local function plainer(c, kinds)
  if type(c) ~= "table" then return c, false end
  local t, v = c.type, c.value
  if t == "Text" then return c, false end
  if t == "Concat" then
    local out, changed
    for i, x in ipairs(v) do
      local y, ch = plainer(x, kinds)
      if ch then
        out = out or copy_list(v)
        out[i], changed = y, true
      end
    end
    if changed then return { type = "Concat", value = out }, true end
    return c, false
  end
  if MARK[t] then
    local inner, ch = plainer(v, kinds)
    if kinds[t] then
      if ch then return { type = t, value = inner }, true end
      return c, false
    end
    return { type = "Concat", value = { { type = "Text", value = MARK[t] }, inner,
      { type = "Text", value = MARK[t] } } }, true
  end
  if kinds[t] then return c, false end
  if t == "Emote" then return { type = "Text", value = "* " .. tostring(v) }, true end
  return { type = "Text", value = tostring(v) }, true  -- links: their text
end

local function text_of(c, out)
  if type(c) ~= "table" then return out end
  if c.type == "Concat" then
    for _, x in ipairs(c.value) do text_of(x, out) end
  elseif type(c.value) == "table" then
    text_of(c.value, out)
  else
    out[#out + 1] = tostring(c.value or "")
  end
  return out
end
local function flat(c) return table.concat(text_of(c, {})) end

-- Length without building the text: bytes, or UTF-8 characters.
local function length(c, chars)
  if type(c) ~= "table" then return 0 end
  if c.type == "Concat" then
    local n = 0
    for _, x in ipairs(c.value) do n = n + length(x, chars) end
    return n
  elseif type(c.value) == "table" then
    return length(c.value, chars)
  end
  local s = tostring(c.value or "")
  return chars and (utf8.len(s) or #s) or #s
end

-- The byte index where the first `n` units of s end (n characters or bytes),
-- never inside a UTF-8 character.
local function cut_index(s, n, chars)
  if chars then
    local i = utf8.offset(s, n + 1)
    return i and i - 1 or #s
  end
  if n >= #s then return #s end
  local i = n
  while i > 0 and (s:byte(i + 1) or 0) & 0xC0 == 0x80 do i = i - 1 end
  return i
end

local function text_len(s, chars) return chars and (utf8.len(s) or #s) or #s end

-- Splits s into parts of at most max units, each ending at the best
-- boundary found in its second half: paragraph, line, sentence, word.
local function split(s, max, chars)
  local parts = {}
  while text_len(s, chars) > max do
    local hard = cut_index(s, max, chars)
    local window = s:sub(1, hard)
    local cut
    for _, pat in ipairs { "()\n\n", "()\n", "[%.!?]()%s", "()%s" } do
      local best
      for pos in window:gmatch(pat) do if pos > hard // 2 then best = pos end end
      if best then cut = best break end
    end
    cut = cut and cut - 1 or hard
    if cut < 1 then cut = hard end
    parts[#parts + 1] = (s:sub(1, cut):gsub("%s+$", ""))
    s = s:sub(cut + 1):gsub("^%s+", "")
  end
  if s ~= "" then parts[#parts + 1] = s end
  return parts
end
M.split = split

local function text(s) return { type = "Text", value = s } end

-- Attachments -------------------------------------------------------------

local function decoded_size(data)
  data = data or ""
  local pad = #(data:match("=*$"))
  local n = #data - pad
  return n * 3 // 4
end
M.decoded_size = decoded_size

local function type_ok(c, mime)
  if c.any_type then return true end
  for _, t in ipairs(c.attachments.types) do
    if t == mime then return true end
    local major = t:match("^([^/]+)/%*$")
    if major and mime:match("^([^/]+)/") == major then return true end
  end
  return false
end

-- The router's hook ---------------------------------------------------------

local flow = require "segue.flow"

--- send(send_copy, origin, msg, target, content, attachments, marker):
--- calls send_copy(origin, msg, target, content', attachments') once per
--- adapted copy. `marker` is set for an edit ("(edited) ").
function M.send(send_copy, origin, msg, target, content, attachments, marker)
  local dest = target.endpoint.backend
  local c = cache[dest] or prepared(dest)
  local bridge = target.bridge
  local chars = c.length_unit ~= "bytes"

  -- attachments the service cannot take become notices
  local notices
  if attachments[1] then
    local kept
    for i, a in ipairs(attachments) do
      local size = decoded_size(a.data)
      local why = size > c.attachments.max_bytes and ("over its limit of %d bytes"):format(c.attachments.max_bytes)
        or (not type_ok(c, a.mime) and "a type it does not take")
      if why then
        kept = kept or copy_list(attachments)
        kept[i] = false
        notices = notices or {}
        notices[#notices + 1] = ("[attachment %s of %d bytes not bridged to %s: %s]"):format(a.mime, size, dest, why)
        flow.degraded(bridge, dest, "attachment")
      end
    end
    if kept then
      attachments = {}
      for _, a in ipairs(kept) do if a then attachments[#attachments + 1] = a end end
    end
  end

  -- an edit of a long message: a notice, not the whole text again
  if marker and not c.edits and length(content, true) > M.EDIT_NOTICE_OVER then
    local s = flat(content)
    content = text(s:sub(1, cut_index(s, M.EDIT_NOTICE_KEEP, true)) .. "… [a message was edited; "
      .. "the service cannot show edits, see its original]")
    flow.degraded(bridge, dest, "edit")
  end

  if not c.all_kinds then
    local changed
    content, changed = plainer(content, c.kinds)
    if changed then flow.degraded(bridge, dest, "formatting") end
  end

  if notices then
    content = { type = "Concat", value = { content, text(" " .. table.concat(notices, " ")) } }
  end

  local max = c.max_length
  if max and length(content, chars) > max then
    flow.degraded(bridge, dest, "length")
    local s = flat(content)
    if (bridge.long or "split") == "cut" then
      local notice = (" […cut: %d more %s]"):format(#s, chars and "characters" or "bytes")
      local keep = math.max(1, max - text_len(notice, chars))
      local i = cut_index(s, keep, chars)
      local rest = text_len(s:sub(i + 1), chars)
      send_copy(origin, msg, target, text(s:sub(1, i) .. (" […cut: %d more %s]"):format(rest,
        chars and "characters" or "bytes")), attachments)
      return
    end
    local parts = split(s, max, chars)
    if #parts > M.MAX_PARTS then
      local rest = 0
      for k = M.MAX_PARTS + 1, #parts do rest = rest + text_len(parts[k], chars) end
      local last = parts[M.MAX_PARTS]
      local notice = (" […cut: %d more %s]"):format(rest, chars and "characters" or "bytes")
      local keep = math.max(1, max - text_len(notice, chars))
      if text_len(last, chars) > keep then
        local i = cut_index(last, keep, chars)
        notice = (" […cut: %d more %s]"):format(rest + text_len(last:sub(i + 1), chars),
          chars and "characters" or "bytes")
        last = last:sub(1, i)
      end
      parts[M.MAX_PARTS] = last .. notice
      for k = #parts, M.MAX_PARTS + 1, -1 do parts[k] = nil end
    end
    for k, p in ipairs(parts) do
      send_copy(origin, msg, target, text(p), k == 1 and attachments or {})
    end
    return
  end
  send_copy(origin, msg, target, content, attachments)
end

--- install(): capabilities are read again when a backend (re)starts.
function M.install()
  require("segue").on("backend", function(name) cache[name] = nil end)
end

return M
