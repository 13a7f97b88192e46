-- The rule DSL: the one-line bridge, endpoint forms, validation errors with
-- file:line, the instruction limit, self-tests and state carried across loads.
local rules = require "segue.rules"
local router = require "segue.router"

local function file(text)
  local path = os.tmpname()
  local f = assert(io.open(path, "w"))
  f:write(text)
  f:close()
  return path
end

local backends = { irc = true, memory = true, notes = true }

describe("the rule DSL", function()
  it("makes a two-way bridge from one line", function()
    local set = assert(rules.load(file 'return { bridge { "irc:#segue", "memory:#general" } }',
      { backends = backends }))
    local b = set[1]
    assert.are.equal("bridge1", b.name)
    assert.are.equal("<{sender}@{backend}> ", b.format)
    assert.are.same({ "irc", "#segue", "both" }, { b.endpoints[1].backend, b.endpoints[1].room, b.endpoints[1].mode })
    assert.are.equal("drop", b.fallback)
  end)

  it("keeps room names with spaces and colons after the first colon", function()
    local set = assert(rules.load(file 'return { bridge { "irc:#a b", "memory:room: x" } }', { backends = backends }))
    assert.are.equal("room: x", set[1].endpoints[2].room)
  end)

  it("reports unknown backends, keys and choices with file and line", function()
    local path = file 'return {\n  bridge { "irc:#a", "ghost:#b" },\n}\n'
    local set, errs = rules.load(path, { backends = backends })
    assert.is_nil(set)
    assert.are.equal(path .. ":2: endpoint ghost:#b: no backend named ghost", errs[1])
    set, errs = rules.load(file 'return { bridge { "irc:#a", "memory:#b", colour = "red" } }', { backends = backends })
    assert.matches(":1: bridge: unknown key colour", errs[1], 1, true)
    set, errs = rules.load(file 'return { bridge { "irc:#a", "memory:#b", fallback = "maybe" } }', { backends = backends })
    assert.matches("bridge.fallback: unknown choice maybe", errs[1], 1, true)
    set, errs = rules.load(file 'return { bridge { name = "x", "irc:#a", "memory:#b" }, bridge { name = "x", "irc:#c", "memory:#d" } }',
      { backends = backends })
    assert.matches("duplicate bridge name x", errs[1], 1, true)
    set, errs = rules.load(file 'return { on_mesage = function() end }', { backends = backends })
    assert.matches("unknown key on_mesage", errs[1], 1, true)
  end)

  it("checks every entry in order: not a bridge, names by position, duplicates, backends", function()
    local path = file([[return {
      bridge { "irc:#a", "memory:#a" },
      { kind = "other" },
      bridge { name = "bridge1", "irc:#b", "ghost:#b", "nobody:#b" },
      "text",
      bridge { "irc:#c", "memory:#c" },
      on_message = 1,
    }]])
    local set, errs = rules.load(path, { backends = backends })
    assert.is_nil(set)
    assert.are.same({
      path .. ":1: on_message must be a function",
      path .. ":1: entry 2 is not a bridge{...}",
      path .. ":4: duplicate bridge name bridge1",
      path .. ":4: endpoint ghost:#b: no backend named ghost",
      path .. ":4: endpoint nobody:#b: no backend named nobody",
      path .. ":1: entry 4 is not a bridge{...}",
    }, errs)
    -- without backends to check against, only the names
    set = assert(rules.load(file([[return {
      bridge { "irc:#a", "memory:#a" }, bridge { name = "x", "irc:#b", "ghost:#b" }, bridge { "irc:#c", "memory:#c" },
    }]]), {}))
    assert.are.same({ "bridge1", "x", "bridge3" }, { set[1].name, set[2].name, set[3].name })
    assert.is_true(set[1].default_name)
    assert.is_nil(set[2].default_name)
    assert.are.equal(0, set.reused)
  end)

  it("stops a rules file that runs too long", function()
    local set, errs = rules.load(file 'while true do end', { backends = backends })
    assert.is_nil(set)
    assert.matches("rule stopped after 1000000 instructions", errs[1], 1, true)
  end)

  it("hands the state table from one load to the next", function()
    local path = file 'state.loads = (state.loads or 0) + 1\nreturn {}'
    local first = assert(rules.load(path, { backends = backends }))
    local second = assert(rules.load(path, { backends = backends, state = first.state }))
    assert.are.equal(2, second.state.loads)
  end)

  it("loads required files next to the rules fresh each time", function()
    local dir = os.tmpname()
    os.remove(dir)
    assert(require("segue.fs").mkdir_p(dir))
    local f = assert(io.open(dir .. "/shared.lua", "w"))
    f:write('return { "irc:#x", "memory:#y" }')
    f:close()
    local path = dir .. "/rules.lua"
    f = assert(io.open(path, "w"))
    f:write('local eps = require "shared"\nreturn { bridge(eps) }')
    f:close()
    local set = assert(rules.load(path, { backends = backends }))
    assert.are.same({ path, dir .. "/shared.lua" }, set.files)
    assert.are.equal("#y", set[1].endpoints[2].room)
  end)
end)

describe("bridge records", function()
  local function fields(b)
    local t = {}
    for k, v in pairs(b) do
      if k ~= "sig" and k ~= "hash" and k ~= "endpoints" then t[k] = v end
    end
    t.endpoints = {}
    for i, e in ipairs(b.endpoints) do
      t.endpoints[i] = {}
      for k, v in pairs(e) do t.endpoints[i][k] = v end
    end
    return t
  end

  it("are the same whether made in C or, for a table with a metatable, in Lua", function()
    local set = assert(rules.load(file [[
      local def = { "irc:#a", { "memory:#b", mode = "out", format = "{sender}: " }, "notes:x:y",
        fallback = "pass", long = "cut", max_attachment_bytes = 5, deletes = "notice" }
      local t = {}
      for k, v in pairs(def) do t[k] = v end
      return { bridge(def), bridge(setmetatable(t, {})) }
    ]], { backends = backends }))
    local c, lua = fields(set[1]), fields(set[2])
    assert.is_string(set[1].sig)
    assert.is_nil(set[2].sig)
    assert.are.same({ backend = "memory", room = "#b", mode = "out", format = "{sender}: ", key = "memory:#b" }, c.endpoints[2])
    assert.are.same({ backend = "notes", room = "x:y", mode = "both", key = "notes:x:y" }, c.endpoints[3])
    assert.are.equal("resend", c.edits)
    assert.is_nil(c.filter)
    c.where, lua.where = c.where:match(":%d+$"), lua.where:match(":%d+$")
    assert.are.equal(":5", c.where)
    assert.are.same({ "bridge1", "bridge2" }, { c.name, lua.name })
    lua.name = c.name
    assert.are.same(lua, c)
  end)

  it("refuse keys and choices with an embedded NUL, as the Lua version does", function()
    local set, errs = rules.load(file 'return { bridge { "irc:#a", "memory:#b", fallback = "drop\\0x" } }',
      { backends = backends })
    assert.is_nil(set)
    assert.matches("bridge.fallback: unknown choice drop", errs[1], 1, true)
    set, errs = rules.load(file 'return { bridge { "irc:#a", "memory:#b", ["name\\0x"] = "n" } }',
      { backends = backends })
    assert.is_nil(set)
    assert.matches("bridge: unknown key name", errs[1], 1, true)
    set, errs = rules.load(file 'return { bridge { "irc:#a", { "memory:#b", mode = "in\\0" } } }',
      { backends = backends })
    assert.is_nil(set)
    assert.matches("mode must be both, in or out", errs[1], 1, true)
  end)

  it("of a previous load are handed out again when their definition did not change", function()
    local path = file 'return {\n  bridge { "irc:#a", "memory:#a" },\n  bridge { "irc:#b", "memory:#b" },\n  bridge { "irc:#c", "memory:#c", filter = function() return true end },\n}\n'
    local first = assert(rules.load(path, { backends = backends }))
    local f = assert(io.open(path, "w"))
    f:write('return {\n\n  bridge { "irc:#a", "memory:#a" },\n  bridge { "irc:#b", "memory:#b", edits = "ignore" },\n  bridge { "irc:#c", "memory:#c", filter = function() return true end },\n}\n')
    f:close()
    local second = assert(rules.load(path, { backends = backends, previous = first }))
    assert.are.equal(first[1], second[1])
    assert.are.equal(path .. ":3", second[1].where)   -- moved down one line
    assert.are_not.equal(first[2], second[2])
    assert.are.equal("ignore", second[2].edits)
    assert.are_not.equal(first[3], second[3])       -- functions cannot be compared
    assert.are.equal("bridge1", second[1].name)
  end)
end)

describe("the router's self-test", function()
  it("simulates where a message goes and refuses rules whose test fails", function()
    local ok = router.load(file [[
      return {
        bridge { "irc:#a", { "memory:#b", mode = "out" }, format = "{sender}: ",
          rewrite = function(m, ctx) m.content = { type = "Text", value = ctx.text:upper() } return m end },
        test = function(simulate)
          local r = simulate("irc:#a", "hi", "ann")
          assert(#r == 1 and r[1].endpoint == "memory:#b" and r[1].text == "ann: HI", r[1] and r[1].text)
          assert(#simulate("memory:#b", "back") == 0)
        end,
      }]], backends)
    assert.is_true(ok)
    local bad, err = router.load(file 'return { bridge { "irc:#a", "memory:#b" }, test = function(s) assert(#s("irc:#a", "x") == 0, "nope") end }', backends)
    assert.is_nil(bad)
    assert.matches("self%-test failed: .*nope", err)
    assert.are.equal(1, router.status.failures)
  end)
end)
