-- memory: a chat service kept in memory, for tests and the demo.
--
-- Rooms are found or created by name (RoomLookup), members tracked
-- (RoomJoin/RoomLeave), messages stored (MessageSend) and announced as
-- MessageUpsert updates, as a real service would echo them. Options:
--   user    = the sender shown on messages sent through segue (default "segue")
--   history = how many older messages MessageGetBefore replays (default 50)
--   capabilities = what to announce instead of its own (a table as in
--             docs/spec/backend-protocol.md): stands in for a service that
--             can do less, in tests and trials of degradation
-- It also exposes backend.post(room_id, sender, text) so scripts and tests can
-- act as a user of the service.
local backend, options = ...

local user = options.user or "segue"
local history = tonumber(options.history) or 50

local rooms = {}        -- id -> Room (plus members)
local room_by_name = {}
local messages = {}     -- id -> Message
local order = {}        -- room id -> { message ids, oldest first }
local counter = 0

local function new_id(prefix)
  counter = counter + 1
  return prefix .. counter
end

local function now_ms()
  return math.floor(os.time() * 1000)
end

local function public_room(r)
  return { id = r.id, parent = r.parent, name = r.name, sendable = r.sendable }
end

local function create_room(name, parent, sendable)
  local r = { id = "!" .. name:gsub("^#", "") .. ":" .. new_id(""), name = name, parent = parent,
    sendable = sendable ~= false, members = {} }
  rooms[r.id] = r
  room_by_name[name] = r
  order[r.id] = {}
  backend:emit { type = "RoomUpsert", value = public_room(r) }
  return r
end

local function store(recipient, sender, content, attachments, extra)
  local t = now_ms()
  local m = { id = new_id("m"), sender = sender, recipient = recipient, content = content,
    attachments = attachments or {}, create_time = t, edit_time = t, extra = extra }
  messages[m.id] = m
  local list = order[recipient]
  if list then list[#list + 1] = m.id end
  backend:emit { type = "MessageUpsert", value = m }
  return m
end

-- For scripts and tests: a user of the service says something.
function backend.post(room_id, sender, text)
  return store(room_id, sender, { type = "Text", value = text }).id
end

local function known_recipient(id)
  -- A room of ours, or (anything else) a user id: DMs need no setup.
  return rooms[id] ~= nil or not id:match("^!")
end

return {
  info = { name = "memory", version = { 0, 1, 0 },
    -- every kind of content kept as sent; no edit or delete requests exist
    capabilities = type(options.capabilities) == "table" and options.capabilities or { formatting = { "Text", "Bold", "Italic", "Underline", "Crossout", "Concat", "Emote",
      "MessageLink", "RoomLink", "UserLink", "UrlLink" }, max_length = 0, history = true,
      attachments = { max_bytes = 16777216, types = { "*/*" } } } },

  RoomLookup = function(name)
    if type(name) ~= "string" or name == "" then return nil, "RoomLookup needs a room name" end
    local r = room_by_name[name] or create_room(name, nil, true)
    return r.id
  end,

  RoomCreate = function(new)
    if room_by_name[new.name] then return nil, ("a room named %q exists"):format(new.name) end
    if new.parent and not rooms[new.parent] then return nil, "no room with id " .. new.parent end
    return create_room(new.name, new.parent, new.sendable).id
  end,

  RoomGet = function(id)
    local r = rooms[id]
    if not r then return nil, "no room with id " .. tostring(id) end
    return public_room(r)
  end,

  RoomJoin = function(id)
    local r = rooms[id]
    if not r then return nil, "no room with id " .. tostring(id) end
    r.members[user] = true
    return true
  end,

  RoomLeave = function(id)
    local r = rooms[id]
    if not r then return nil, "no room with id " .. tostring(id) end
    r.members[user] = nil
    return true
  end,

  MessageSend = function(msg)
    if not known_recipient(msg.recipient) then return nil, "no room with id " .. msg.recipient end
    local r = rooms[msg.recipient]
    if r and not r.sendable then return nil, "room " .. r.id .. " is not sendable" end
    return store(msg.recipient, user, msg.content, msg.attachments, msg.extra).id
  end,

  MessageGet = function(id)
    local m = messages[id]
    if not m then return nil, "no message with id " .. tostring(id) end
    return m
  end,

  -- Replays up to `history` messages older than `id` as MessageUpsert updates.
  MessageGetBefore = function(id)
    local m = messages[id]
    if not m then return nil, "no message with id " .. tostring(id) end
    local list = order[m.recipient] or {}
    local pos
    for i, mid in ipairs(list) do if mid == id then pos = i break end end
    for i = math.max(1, (pos or 1) - history), (pos or 1) - 1 do
      backend:emit { type = "MessageUpsert", value = messages[list[i]] }
    end
    return true
  end,
}
