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
