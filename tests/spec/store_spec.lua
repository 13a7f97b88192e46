-- segue.store from Lua: message id maps, the message log and settings, read
-- back through a second connection to the same file.
local store = require "segue.store"

local paths = {}
local function fresh()
  local path = os.tmpname()
  os.remove(path)  -- SQLite creates it; tmpname only reserves the name
  paths[#paths + 1] = path
  return assert(store.open(path)), path
end

teardown(function()
  for _, p in ipairs(paths) do
    os.remove(p)
    os.remove(p .. "-wal")
    os.remove(p .. "-shm")
  end
end)

describe("segue.store", function()
  it("remembers which message is a copy of which, across a reopen", function()
    local db, path = fresh()
    assert.is_true(db:map_put("irc", "m1", "harmony", "h1", "#a"))
    assert.is_true(db:map_put("irc", "m1", "notes", "n1"))
    db:close()
    local again = assert(store.open(path))
    assert.are.same({ "irc", "m1" }, { again:map_origin("harmony", "h1") })
    assert.is_nil(again:map_origin("irc", "m1"))
    assert.are.same({
      { backend = "harmony", id = "h1", room = "#a" },
      { backend = "notes", id = "n1" },
    }, again:map_copies("irc", "m1"))
    assert.are.same({}, again:map_copies("irc", "unknown"))
    again:close()
  end)

  it("refuses to make one copy the copy of two origins", function()
    local db = fresh()
    assert.is_true(db:map_put("irc", "m1", "harmony", "h1"))
    local ok, err, code = db:map_put("irc", "m2", "harmony", "h1")
    assert.is_nil(ok)
    assert.are.equal("EEXIST", code)
    assert.matches("^EEXIST: harmony/h1 is already a copy of irc/m1", err)
    assert.are.same({ "irc", "m1" }, { db:map_origin("harmony", "h1") })
  end)

  it("logs messages, edits and deletions of a room, oldest first", function()
    local db = fresh()
    assert(db:log_message("irc", { id = "1", sender = "ann", recipient = "#a",
      content = { type = "Text", value = "hi" }, create_time = 1000 }))
    assert(db:log_message("irc", { id = "2", sender = "bob", recipient = "#a",
      content = { type = "Text", value = "yo" }, create_time = 2000 }))
    assert(db:log_message("irc", { id = "1", sender = "ann", recipient = "#a",
      content = { type = "Text", value = "hi!" }, create_time = 1000, edit_time = 3000 }))
    assert.is_true(db:log_delete("irc", "2"))
    assert.is_false(db:log_delete("irc", "nope"))
    local log = db:messages("irc", "#a")
    assert.are.same({
      { id = "1", sender = "ann", recipient = "#a", content = { type = "Text", value = "hi!" },
        create_time = 1000, edit_time = 3000, deleted = false },
      { id = "2", sender = "bob", recipient = "#a", create_time = 2000, deleted = true },
    }, log)
    assert.are.equal("2", db:messages("irc", "#a", 1)[1].id)
    assert.are.same({}, db:messages("irc", "#elsewhere"))
  end)

  it("raises on content that has no JSON form", function()
    local db = fresh()
    assert.has_error(function()
      db:log_message("irc", { id = "1", content = { f = print } })
    end)
    assert.are.same({}, db:messages("irc", "#a"))
  end)

  it("keeps settings, and forgets one set to nil", function()
    local db, path = fresh()
    assert.is_nil(db:kv_get("server_id"))
    assert.is_true(db:kv_set("server_id", "a.example:2289"))
    db:close()
    local again = assert(store.open(path))
    assert.are.equal("a.example:2289", again:kv_get("server_id"))
    assert.is_true(again:kv_set("server_id", nil))
    assert.is_nil(again:kv_get("server_id"))
  end)

  it("reports a path it cannot open as ESTORE", function()
    local db, err, code = store.open("/nonexistent-dir/sub/segue.db")
    assert.is_nil(db)
    assert.are.equal("ESTORE", code)
    assert.matches("^ESTORE: /nonexistent%-dir/sub/segue.db: unable to open", err)
  end)

  it("opens by table, names its engine, and answers callbacks at once on SQLite", function()
    local path = os.tmpname()
    os.remove(path)
    paths[#paths + 1] = path
    local db = assert(store.open { engine = "sqlite", path = path })
    assert.are.equal("sqlite", db:engine())
    local got
    assert.is_true(db:kv_set("k", "v", function(ok) got = ok end))
    assert.is_true(got)  -- before the call returned
    assert.is_true(db:kv_get("k", function(v) got = v end))
    assert.are.equal("v", got)
    assert.is_true(math.type(store.SCHEMA_VERSION) == "integer" and store.SCHEMA_VERSION >= 2)
    db:close()
  end)

  it("cannot be closed while the router holds it, and says who to ask", function()
    local router = require "segue.router"
    local db = fresh()
    router.set_store(db)
    local ok, err = pcall(db.close, db)
    assert.is_false(ok)
    assert.matches("in use by 1 user%(s%) in C", err)
    assert.matches("router.set_store%(nil%)", err)
    router.set_store(nil)
    db:close()
    assert.has_error(function() db:kv_get("x") end)
  end)

  it("refuses an unknown engine and a postgresql store without a dsn, naming them", function()
    local db, err, code = store.open { engine = "oracle", path = "x" }
    assert.is_nil(db)
    assert.are.equal("EINVAL", code)
    assert.matches('unknown engine "oracle"', err)
    db, err = store.open { engine = "postgresql" }
    assert.is_nil(db)
    assert.matches("needs a dsn", err)
  end)

  it("keeps instances and leases: one holder at a time, renewed by it, taken once expired", function()
    local db = fresh()
    assert.is_true(db:instance_beat("one", '{"pid":1}'))
    assert.are.equal("one", db:lease_claim("backends", "one", 60000))
    assert.are.equal("one", db:lease_claim("backends", "two", 60000))
    assert.are.equal("one", db:lease_claim("backends", "one", 60000))
    assert.are.equal("two", db:lease_claim("short", "two", 1))
    local t = os.clock()
    while os.clock() - t < 0.01 do end  -- the 1 ms lease expires
    assert.are.equal("one", db:lease_claim("short", "one", 60000))
    local leases = db:leases()
    assert.are.same({ "backends", "short" }, { leases[1].name, leases[2].name })
    assert.are.same({ "one", "one" }, { leases[1].holder, leases[2].holder })
    assert.is_true(db:lease_release("short", "one"))
    assert.are.equal(1, #db:leases())
    local inst = db:instances()
    assert.are.equal("one", inst[1].name)
    assert.are.equal('{"pid":1}', inst[1].info)
    db:close()
  end)

  it("raises when a closed store is used", function()
    local db = fresh()
    db:close()
    db:close()  -- closing twice is harmless
    assert.has_error(function() db:kv_get("x") end)
  end)
end)
