-- The notes backend: notes are files of JSON lines that outlive the process.
local segue = require "segue"
local json = require "segue.json"

local function tempdir()
  local base = os.tmpname()
  os.remove(base)
  return base .. ".notes"
end

local n = 0
local function notes(dir)
  n = n + 1
  local name = "notes" .. n
  assert(segue.add_backend(name, { script = "notes", options = { dir = dir, user = "me" } }))
  return segue.backend(name), name
end

local function req(b, type_, value)
  return segue.await(function() return b:request { type = type_, value = value } end)
end

local function text(s) return { type = "Text", value = s } end

describe("the notes backend", function()
  it("finds or creates a note file on RoomLookup", function()
    local dir = tempdir()
    local b = notes(dir)
    local id = req(b, "RoomLookup", "#My Ideas")
    assert.are.same({ type = "RoomID", value = "my-ideas" }, id)
    assert.are.same(id, req(b, "RoomLookup", "#my ideas"))
    assert.is_truthy(io.open(dir .. "/my-ideas.jsonl", "r"))
  end)

  it("appends a sent message as one JSON line and answers its id", function()
    local dir = tempdir()
    local b = notes(dir)
    local room = req(b, "RoomLookup", "#todo").value
    local first = req(b, "MessageSend", { recipient = room, content = text("buy milk"), attachments = {} })
    local second = req(b, "MessageSend", { recipient = room, content = { type = "Bold", value = text("call") }, attachments = {} })
    assert.are.same({ type = "MessageID", value = "todo:1" }, first)
    assert.are.equal("todo:2", second.value)
    local lines = {}
    for line in io.lines(dir .. "/todo.jsonl") do lines[#lines + 1] = json.decode(line) end
    assert.are.equal(2, #lines)
    assert.are.equal("buy milk", lines[1].content.value)
    assert.are.equal("me", lines[2].sender)
  end)

  it("reads a message back with MessageGet", function()
    local b = notes(tempdir())
    local room = req(b, "RoomLookup", "#read").value
    local id = req(b, "MessageSend", { recipient = room, content = text("hello"), attachments = {} }).value
    local got = req(b, "MessageGet", id)
    assert.are.equal("Message", got.type)
    assert.are.same(text("hello"), got.value.content)
    local none, err = req(b, "MessageGet", "read:9")
    assert.is_nil(none)
    assert.matches("no message with id read:9", err, 1, true)
  end)

  it("replays older messages on MessageGetBefore, then answers Success", function()
    local b, name = notes(tempdir())
    local room = req(b, "RoomLookup", "#log").value
    for i = 1, 4 do req(b, "MessageSend", { recipient = room, content = text("m" .. i), attachments = {} }) end
    segue.wait(20)
    local seen = {}
    local off = segue.on("update", function(from, u)
      if from == name and u.type == "MessageUpsert" then seen[#seen + 1] = u.value.content.value end
    end)
    assert.are.equal("Success", req(b, "MessageGetBefore", "log:3").type)
    segue.wait(20)
    off()
    assert.are.same({ "m1", "m2" }, seen)
  end)

  it("keeps the history when the backend starts again on the same folder", function()
    local dir = tempdir()
    local b, name = notes(dir)
    local room = req(b, "RoomLookup", "#diary").value
    req(b, "MessageSend", { recipient = room, content = text("day one"), attachments = {} })
    segue.remove_backend(name)
    local again = notes(dir)
    assert.are.equal("diary:1", req(again, "MessageGet", "diary:1").value.id)
    assert.are.equal("diary:2", req(again, "MessageSend", { recipient = "diary", content = text("day two"), attachments = {} }).value)
  end)

  it("keeps the history across a restart of segue itself", function()
    local dir = tempdir()
    local bin = (os.getenv("SEGUE_BINARY_DIR") or "build") .. "/segue"
    local script = os.tmpname()
    local f = assert(io.open(script, "w"))
    f:write(([[
      local segue = require "segue"
      assert(segue.add_backend("n", { script = "notes", options = { dir = %q } }))
      local b = segue.backend("n")
      local r = segue.await(function()
        local room = b:request { type = "RoomLookup", value = "#kept" }.value
        if arg[1] == "write" then
          return b:request { type = "MessageSend", value = { recipient = room, content = { type = "Text", value = "persisted" } } }.value
        end
        return b:request { type = "MessageGet", value = "kept:1" }.value.content.value
      end)
      io.stdout:write(r, "\n")
    ]]):format(dir))
    f:close()
    local function run(mode)
      local p = assert(io.popen(("%q exec %q %s 2>/dev/null"):format(bin, script, mode)))
      local out = p:read("a")
      p:close()
      return out
    end
    assert.are.equal("kept:1\n", run("write"))
    assert.are.equal("persisted\n", run("read"))
    os.remove(script)
  end)

  it("refuses to send to a note that does not exist", function()
    local b = notes(tempdir())
    local r, err = req(b, "MessageSend", { recipient = "nowhere", content = text("x"), attachments = {} })
    assert.is_nil(r)
    assert.matches("no note with id nowhere", err, 1, true)
  end)
end)
