-- The memory backend, driven through the real host and the Lua API.
local segue = require "segue"

local n = 0
local function fresh_backend(options)
  n = n + 1
  local name = "mem" .. n
  assert(segue.add_backend(name, { script = "memory", options = options or {} }))
  return segue.backend(name), name
end

local function req(b, type_, value)
  return segue.await(function() return b:request { type = type_, value = value } end)
end

describe("the memory backend", function()
  it("creates a room on the first RoomLookup and finds it on the second", function()
    local b = fresh_backend()
    local first = req(b, "RoomLookup", "#general")
    local second = req(b, "RoomLookup", "#general")
    assert.are.equal("RoomID", first.type)
    assert.are.same(first, second)
    local other = req(b, "RoomLookup", "#random")
    assert.are_not.equal(first.value, other.value)
  end)

  it("answers RoomGet with the room it created", function()
    local b = fresh_backend()
    local id = req(b, "RoomLookup", "#general").value
    local room = req(b, "RoomGet", id)
    assert.are.equal("Room", room.type)
    assert.are.equal("#general", room.value.name)
    assert.are.equal(id, room.value.id)
    assert.is_true(room.value.sendable)
  end)

  it("creates rooms with RoomCreate and refuses a duplicate name", function()
    local b = fresh_backend()
    local id = req(b, "RoomCreate", { name = "#new", sendable = false })
    assert.are.equal("RoomID", id.type)
    local again, err, code = req(b, "RoomCreate", { name = "#new", sendable = true })
    assert.is_nil(again)
    assert.are.equal("EBACKEND", code)
    assert.matches('a room named "#new" exists', err, 1, true)
  end)

  it("stores a sent message, answers its id and emits it as a MessageUpsert", function()
    local b, name = fresh_backend { user = "bridge" }
    local seen = {}
    local off = segue.on("update", function(from, update)
      if from == name and update.type == "MessageUpsert" then seen[#seen + 1] = update.value end
    end)
    local room = req(b, "RoomLookup", "#general").value
    local sent = req(b, "MessageSend", { recipient = room, attachments = {},
      content = { type = "Bold", value = { type = "Text", value = "hi" } } })
    assert.are.equal("MessageID", sent.type)
    segue.wait(50)
    off()
    assert.are.equal(1, #seen)
    assert.are.equal(sent.value, seen[1].id)
    assert.are.equal("bridge", seen[1].sender)
    assert.are.same({ type = "Bold", value = { type = "Text", value = "hi" } }, seen[1].content)
    local got = req(b, "MessageGet", sent.value)
    assert.are.equal("Message", got.type)
    assert.are.equal(room, got.value.recipient)
  end)

  it("joins and leaves known rooms with Success", function()
    local b = fresh_backend()
    local room = req(b, "RoomLookup", "#general").value
    assert.are.same({ type = "Success" }, req(b, "RoomJoin", room))
    assert.are.same({ type = "Success" }, req(b, "RoomLeave", room))
  end)

  it("answers unknown ids with an Error naming the id", function()
    local b = fresh_backend()
    for _, t in ipairs { "RoomGet", "RoomJoin", "RoomLeave", "MessageGet", "MessageGetBefore" } do
      local ok, err, code, body = req(b, t, "!nope:1")
      assert.is_nil(ok)
      assert.are.equal("EBACKEND", code)
      assert.matches("!nope:1", err, 1, true)
      assert.are.equal("Error", body.type)
    end
  end)

  it("replays older messages on MessageGetBefore", function()
    local b, name = fresh_backend()
    local room = req(b, "RoomLookup", "#log").value
    local ids = {}
    for i = 1, 3 do
      ids[i] = req(b, "MessageSend", { recipient = room, attachments = {},
        content = { type = "Text", value = "m" .. i } }).value
    end
    local replayed = {}
    local off = segue.on("update", function(from, u)
      if from == name then replayed[#replayed + 1] = u.value.id end
    end)
    assert.are.same({ type = "Success" }, req(b, "MessageGetBefore", ids[3]))
    segue.wait(50)
    off()
    assert.are.same({ ids[1], ids[2] }, replayed)
  end)
end)
