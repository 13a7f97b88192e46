-- notes: "notes to self". Each room is a note, a file of JSON lines (one
-- Message per line) under a folder; sending to a note appends to it, and
-- its history survives restarts. Options:
--   dir     = the folder (default "notes"); a relative path starts at
--             segue's working directory (the config's data_dir is not
--             applied: write dir = "segue-data/notes" to keep them there)
--   user    = the sender written on messages (default "me")
--   history = how many older messages MessageGetBefore replays (default 50)
--
-- Room ids are file-safe names: RoomLookup("#Ideas") finds or creates the
-- note "ideas" (dir/ideas.jsonl). Message ids are "<note>:<line number>".
--
-- A person writes into a note by appending a line to its file (`echo "buy
-- milk" >> notes/ideas.jsonl`, or an editor): a line of plain text is a
-- message from `user`, a JSON line a Message as is. The folder is watched;
-- each new line is announced as a MessageUpsert.
local backend, options = ...
local segue = require "segue"
local json = require "segue.json"
local fs = require "segue.fs"

local dir = tostring(options.dir or "notes")
local user = tostring(options.user or "me")
local history = math.tointeger(tonumber(options.history)) or 50

local ok, err = fs.mkdir_p(dir, tonumber("700", 8))
if not ok then error(("notes: cannot create %s: %s"):format(dir, tostring(err)), 0) end

local counts = {}   -- note id -> number of messages (lines), once read

-- A line of the file as a Message: JSON as written, or plain text typed by
-- a person (from `user`, at the file's time of reading).
local function message_of(id, n, line)
  local m = json.decode(line)
  if type(m) == "table" and type(m.content) == "table" then return m end
  if line:match("^%s*$") then return nil end
  local t = os.time() * 1000
  return { id = id .. ":" .. n, sender = user, recipient = id, content = { type = "Text", value = line },
    attachments = {}, create_time = t, edit_time = t }
end

-- "#My Ideas" -> "my-ideas"; nil for a name with nothing usable.
local function note_id(name)
  if type(name) ~= "string" then return nil end
  local id = name:lower():gsub("^[#&!]+", ""):gsub("[^%w%._%-]+", "-"):gsub("^[%.%-]+", ""):gsub("%-+$", "")
  if id == "" or #id > 200 then return nil end
  return id
end

local function path_of(id) return dir .. "/" .. id .. ".jsonl" end

local function exists(id) return fs.stat(path_of(id)) == "file" end

local function room(id)
  return { id = id, parent = segue.null, name = id, sendable = true }
end

local function count(id)
  if counts[id] then return counts[id] end
  local n = 0
  local f = io.open(path_of(id), "r")
  if f then
    for _ in f:lines() do n = n + 1 end
    f:close()
  end
  counts[id] = n
  return n
end

local function create(id)
  local f, e = io.open(path_of(id), "a")
  if not f then return nil, e end
  f:close()
  counts[id] = count(id)
  backend:emit { type = "RoomUpsert", value = room(id) }
  return id
end

local function known(id)
  if type(id) ~= "string" or note_id(id) ~= id or not exists(id) then
    return nil, "no note with id " .. tostring(id)
  end
  return id
end

-- Calls fn(n, message) for the messages of note `id` numbered first..last.
local function each(id, first, last, fn)
  local f = io.open(path_of(id), "r")
  if not f then return end
  local n = 0
  for line in f:lines() do
    n = n + 1
    if n > last then break end
    if n >= first then
      local m = message_of(id, n, line)
      if m then fn(n, m) end
    end
  end
  f:close()
end

local function parse_id(mid)
  local id, n = tostring(mid):match("^(.+):(%d+)$")
  n = math.tointeger(tonumber(n))
  if not id or not n or not known(id) or n < 1 or n > count(id) then return nil end
  return id, n
end

-- Lines appended by someone else (a person, an editor) are announced.
local function pick_up(file)
  local id = type(file) == "string" and file:match("^(.+)%.jsonl$")
  if not id or note_id(id) ~= id or not counts[id] then return end  -- notes we serve only
  local known_n = counts[id]
  local f = io.open(path_of(id), "r")
  if not f then return end
  local n, fresh = 0, {}
  for line in f:lines() do
    n = n + 1
    if n > known_n then fresh[#fresh + 1] = { n, line } end
  end
  f:close()
  if n < known_n then counts[id] = n return end  -- truncated by hand: start again from here
  counts[id] = n
  for _, l in ipairs(fresh) do
    local m = message_of(id, l[1], l[2])
    if m then
      m.id = id .. ":" .. l[1]
      backend:emit { type = "MessageUpsert", value = m }
    end
  end
end

local watcher
local function watch()
  local loop = require "segue.loop"
  local w, werr = loop.watch(dir, function(name)
    if name then pick_up(name) else for id in pairs(counts) do pick_up(id .. ".jsonl") end end
  end)
  if not w then backend.log.warn("lines written into the notes by hand will not be seen: " .. tostring(werr)) end
  watcher = w
end

return {
  info = { name = "notes", version = { 0, 1, 0 },
    -- a note keeps the Message as JSON: any content, attachments inline
    capabilities = { formatting = { "Text", "Bold", "Italic", "Underline", "Crossout", "Concat", "Emote",
      "MessageLink", "RoomLink", "UserLink", "UrlLink" }, max_length = 0, history = true,
      attachments = { max_bytes = 16777216, types = { "*/*" } } } },

  start = function() watch() end,
  stop = function() if watcher then watcher:stop() watcher = nil end end,

  RoomLookup = function(name)
    local id = note_id(name)
    if not id then return nil, ("%q cannot name a note"):format(tostring(name)) end
    if exists(id) then count(id) return id end
    return create(id)
  end,

  RoomCreate = function(new)
    local id = note_id(new.name)
    if not id then return nil, ("%q cannot name a note"):format(tostring(new.name)) end
    if exists(id) then return nil, ("a note named %q exists"):format(id) end
    return create(id)
  end,

  RoomGet = function(id)
    local ok_id, e = known(id)
    if not ok_id then return nil, e end
    return room(id)
  end,

  RoomJoin = function(id) return known(id) and true, "no note with id " .. tostring(id) end,
  RoomLeave = function(id) return known(id) and true, "no note with id " .. tostring(id) end,

  MessageSend = function(msg)
    local id, e = known(msg.recipient)
    if not id then return nil, e end
    local t = os.time() * 1000
    local n = count(id) + 1
    local m = { id = id .. ":" .. n, sender = user, recipient = id, content = msg.content,
      attachments = msg.attachments or {}, create_time = t, edit_time = t, extra = msg.extra }
    local f, oe = io.open(path_of(id), "a")
    if not f then return nil, oe end
    local wrote, we = f:write(json.encode(m), "\n")
    f:close()
    if not wrote then return nil, we end
    counts[id] = n
    backend:emit { type = "MessageUpsert", value = m }
    return m.id
  end,

  MessageGet = function(mid)
    local id, n = parse_id(mid)
    if not id then return nil, "no message with id " .. tostring(mid) end
    local found
    each(id, n, n, function(_, m) found = m end)
    return found or nil, "message " .. tostring(mid) .. " cannot be read"
  end,

  -- Replays up to `history` messages older than `mid` as MessageUpsert updates.
  MessageGetBefore = function(mid)
    local id, n = parse_id(mid)
    if not id then return nil, "no message with id " .. tostring(mid) end
    each(id, math.max(1, n - history), n - 1, function(_, m)
      backend:emit { type = "MessageUpsert", value = m }
    end)
    return true
  end,
}
