-- The rules of the embedding example (examples/embed/embed.c): every message
-- said in the C backend "echo" is relayed into room #bridge of the memory
-- backend "notes"; then the bridge posts a notice into echo's room #status
-- that links to the relayed copy, so the C side can check that it arrived.
local segue = require "segue"

local function relay(m)
  local notes = segue.backend("notes")
  local room, err = notes:request { type = "RoomLookup", value = "#bridge" }
  if not room then return segue.log.warn("no room #bridge:", err) end
  local id
  id, err = notes:request { type = "MessageSend", value = {
    recipient = room.value,
    attachments = m.attachments,
    content = { type = "Concat", value = {
      { type = "Bold", value = { type = "Text", value = "<" .. m.sender .. "> " } },
      m.content,
    } },
    extra = { bridged_from = { backend = "echo", id = m.id } },
  } }
  if not id then return segue.log.warn("relaying", m.id, "failed:", err) end
  segue.log.info("relayed", m.id, "from echo as", id.value, "in notes")
  assert(segue.backend("echo"):request { type = "MessageSend", value = {
    recipient = "#status", attachments = {},
    content = { type = "MessageLink", value = id.value },
  } })
end

-- Each handler runs in its own coroutine: requests without a callback wait.
segue.on("update", function(backend, update)
  if backend == "echo" and update.type == "MessageUpsert" and update.value.sender ~= "segue" then
    relay(update.value)
  end
end)
