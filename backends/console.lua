-- console: the terminal as a chat service with one local user. Each line
-- typed on stdin is a message from that user in one room ("/me waves" is
-- an Emote); every message sent to this backend is printed on stdout.
-- Options:
--   room   = the room typed lines go to (default "#console")
--   user   = the local user's name (default $USER, else "you")
--   banner = text printed once at start (the default config says how to
--            add IRC there)
--   bridge = the name of another backend to talk to for the demo: typed
--            lines are also sent to its room of the same name, and its
--            messages are printed. A stop-gap until the router's `rules`
--            do this for any pair of backends.
--
-- In-process only: in standalone mode (`segue backend console.lua`) stdin
-- and stdout carry the backend protocol, so there is no terminal to read.
local backend, options = ...
local segue = require "segue"
local net = require "segue.net"

if not segue.backend(backend.name):info() then
  error("console reads the terminal, but in standalone mode (`segue backend`) stdin and stdout "
    .. "carry the backend protocol: run it in-process, from a config's backends", 0)
end

local room = tostring(options.room or "#console")
local user = tostring(options.user or os.getenv("USER") or "you")
local counter = 0
local input            -- the stdin connection
local unsubscribe      -- the bridge's update handler

-- MessageContent as terminal text: *bold*, _italic_, links as they are.
local function render(c, depth)
  depth = depth or 1
  if type(c) ~= "table" or depth > 64 then return "" end
  local t, v = c.type, c.value
  if t == "Text" or t == "UrlLink" or t == "RoomLink" or t == "UserLink" or t == "MessageLink" then
    return tostring(v)
  elseif t == "Bold" then return "*" .. render(v, depth + 1) .. "*"
  elseif t == "Italic" then return "_" .. render(v, depth + 1) .. "_"
  elseif t == "Underline" then return render(v, depth + 1)
  elseif t == "Crossout" then return "~" .. render(v, depth + 1) .. "~"
  elseif t == "Emote" then return "* " .. tostring(v)
  elseif t == "Concat" then
    local parts = {}
    for i, part in ipairs(v) do parts[i] = render(part, depth + 1) end
    return table.concat(parts)
  end
  return ""
end

local function show(where, who, content)
  io.stdout:write(("[%s] %s%s\n"):format(where, who and (who .. ": ") or "", render(content)))
  io.stdout:flush()
end

local function content_of(line)
  local action = line:match("^/me%s+(.+)$")
  if action then return { type = "Emote", value = action } end
  return { type = "Text", value = line }
end

-- The demo bridge: typed lines to the other backend's room, its messages here.
local bridge_room
local function to_bridge(content)
  local other = segue.backend(options.bridge)
  if not bridge_room then
    local r, err = other:request { type = "RoomLookup", value = room }
    if not r then return backend.log.warn("bridge: " .. tostring(err)) end
    bridge_room = r.value
  end
  local ok, err = other:request { type = "MessageSend", value = { recipient = bridge_room, content = content } }
  if not ok then backend.log.warn("bridge: " .. tostring(err)) end
end

local function read_loop()
  local err
  input, err = net.stdin()
  if not input then
    return backend.log.warn("not reading the terminal: " .. tostring(err))
  end
  while true do
    local line, rerr, code = input:read_line()
    if not line then
      if code ~= "ECANCELED" then backend.log.info("end of terminal input (" .. tostring(rerr) .. ")") end
      return
    end
    if line ~= "" then
      counter = counter + 1
      local t = os.time() * 1000
      local content = content_of(line)
      backend:emit { type = "MessageUpsert", value = { id = "console-" .. t .. "-" .. counter, sender = user,
        recipient = room, content = content, attachments = {}, create_time = t, edit_time = t } }
      if options.bridge then to_bridge(content) end
    end
  end
end

return {
  info = { name = "console", version = { 0, 1, 0 },
    -- printed with markers of its own; a terminal shows no attachments
    capabilities = { formatting = { "Text", "Concat", "Bold", "Italic", "Crossout" }, max_length = 0,
      attachments = { max_bytes = 0, types = {} } } },

  start = function()
    if options.banner then io.stdout:write(tostring(options.banner), "\n") io.stdout:flush() end
    if options.bridge then
      unsubscribe = segue.on("update", function(name, u)
        if name == options.bridge and u.type == "MessageUpsert" then
          show(options.bridge .. " " .. tostring(u.value.recipient), u.value.sender, u.value.content)
        end
      end)
    end
    read_loop()
  end,

  stop = function()
    if unsubscribe then unsubscribe() end
    if input then input:close() end
  end,

  RoomLookup = function(name) return tostring(name) end,
  RoomGet = function(id) return { id = id, parent = segue.null, name = id, sendable = true } end,
  RoomJoin = function() return true end,
  RoomLeave = function() return true end,

  MessageSend = function(msg)
    show(msg.recipient, nil, msg.content)
    counter = counter + 1
    return "console-out-" .. counter
  end,
}
