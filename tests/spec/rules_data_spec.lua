-- Reloading a data-only rules file (rules.lua, "Reloading a data-only
-- file"): when only a few bridge lines changed, only they run, and the set
-- is the one a full run of the new text makes. Each case compares the two:
-- the set a reload made (given the running set as `previous`) and the set a
-- fresh load of the same text makes.
local rules = require "segue.rules"
local support = require "support"

local backends = { irc = true, memory = true, notes = true }

local function lines_of(n, changed)
  local parts = { "-- rules\nreturn {\n" }
  for i = 1, n do
    parts[#parts + 1] = changed and changed[i] or ('  bridge { "irc:#r%d", "memory:#r%d" },\n'):format(i, i)
  end
  parts[#parts + 1] = "}\n"
  return table.concat(parts)
end

-- what a bridge is, without the fields that say which load made it
local function shape(set)
  local out = {}
  for i, b in ipairs(set) do
    local eps = {}
    for j, e in ipairs(b.endpoints) do eps[j] = { e.backend, e.room, e.mode, e.format, e.key } end
    out[i] = { b.name, b.where, b.format, b.fallback, b.edits, b.deletes, b.sig, b.hash,
      b.max_attachment_bytes, b.long, eps }
  end
  return out
end

-- load `first`, then reload with `second` given the first set; returns both
-- sets, whether the reload ran only the changed lines, and a fresh load's
-- set (or errors) of `second`
local function reload(first, second)
  local _, file = support.scratch()
  local path = file("rules.lua", first)
  local one = assert(rules.load(path, { backends = backends }))
  path = file("rules.lua", second)
  local fast_before = rules.fast_loads
  local two, errs = rules.load(path, { backends = backends, previous = one, checked = one, text = second })
  local fast = rules.fast_loads > fast_before
  local fresh, ferrs = rules.load(path, { backends = backends })
  return one, two, fast, fresh, errs, ferrs
end

describe("a data-only rules file", function()
  it("is recognised, and anything else is not", function()
    assert.is_true(rules.data_only(lines_of(3)))
    assert.is_true(rules.data_only('return {\n  bridge { name = "a", "irc:#a", "memory:#a", edits = "ignore", max_attachment_bytes = 10, },\n}\n'))
    assert.is_true(rules.data_only('return { -- x\n  -- comment\n\n  bridge{"irc:#a","memory:#a"} -- c\n} -- end\n'))
    for _, text in ipairs {
      'return {\n  bridge { "irc:#a", "memory:#a" }, bridge { "irc:#b", "memory:#b" },\n}\n',  -- two on a line
      'local r = "irc:#a"\nreturn {\n  bridge { r, "memory:#a" },\n}\n',
      'return {\n  bridge { "irc:#a", "memory:#a", name = n },\n}\n',        -- a value read from a variable
      'return {\n  bridge { "irc:#a", { "memory:#a", mode = "in" } },\n}\n', -- a table endpoint
      'return {\n  bridge { "irc:#a", "memory:#a", filter = function(m) return true end },\n}\n',
      'return {\n  bridge { "irc:#a\\"", "memory:#a" },\n}\n',               -- an escape
      'return {\n  bridge { [[irc:#a]], "memory:#a" },\n}\n',
      "return {\n  bridge { 'irc:#a', \"memory:#a\" },\n}\n",
      'return {\n  --[[ bridge { "irc:#a", "memory:#a" },\n]]\n}\n',
      'return {\n}\n',                                                       -- no bridge
      'return {\n  bridge { "irc:#a", "memory:#a" },\n}\nprint("x")\n',
      'return {\n  bridge { "irc:#a" .. "b", "memory:#a" },\n}\n',
      'return {\n  bridge { "irc:#a", "memory:#a" },\n  on_message = nil,\n}\n',
    } do
      assert.is_false(rules.data_only(text), text)
    end
  end)

  it("reloads one changed line alone, into the set a full run makes", function()
    local changed = { [3] = '  bridge { "irc:#r3", "memory:#r3", name = "renamed", edits = "ignore" },\n' }
    local one, two, fast, fresh = reload(lines_of(20), lines_of(20, changed))
    assert.is_true(fast)
    assert.are.same(shape(fresh), shape(two))
    assert.are.equal("renamed", two[3].name)
    assert.are.equal(19, two.reused)
    for i = 1, 20 do
      if i ~= 3 then assert.are.equal(one[i], two[i]) end  -- the running objects, kept
    end
    assert.are_not.equal(one[3], two[3])
    assert.are.equal(two[3].where:match(":(%d+)$"), "5")
  end)

  it("counts the running objects it kept as reused when the set was not checked against these backends", function()
    local _, file = support.scratch()
    local one = assert(rules.load(file("rules.lua", lines_of(20)), { backends = backends }))
    local text = lines_of(20, { [7] = '  bridge { "irc:#r7", "notes:#r7" },\n' })
    local before = rules.fast_loads
    local two = assert(rules.load(file("rules.lua", text), { backends = backends, previous = one, text = text }))
    assert.is_true(rules.fast_loads > before)
    assert.are.equal(19, two.reused)
    assert.are.equal("notes", two[7].endpoints[2].backend)
  end)

  it("goes on from a set a reload made, line after line", function()
    local _, file = support.scratch()
    local text = lines_of(50)
    local set = assert(rules.load(file("rules.lua", text), { backends = backends }))
    for step = 1, 6 do
      local changed = { [step * 7] = ('  bridge { "irc:#s%d", "notes:#s%d" }, -- step %d\n'):format(step, step, step) }
      text = lines_of(50, changed)
      local path = file("rules.lua", text)
      local before = rules.fast_loads
      set = assert(rules.load(path, { backends = backends, previous = set, checked = set, text = text }))
      assert.is_true(rules.fast_loads > before)
      assert.are.same(shape(assert(rules.load(path, { backends = backends }))), shape(set))
    end
  end)

  it("keeps every object when only a comment changed", function()
    local text = (lines_of(10):gsub("%-%- rules", "-- the rules"))
    local one, two, fast, fresh = reload(lines_of(10), text)
    assert.is_true(fast)
    assert.are.same(shape(fresh), shape(two))
    for i = 1, 10 do assert.are.equal(one[i], two[i]) end
  end)

  it("hands the old object out again when a line changed only its comment", function()
    local changed = { [4] = '  bridge { "irc:#r4", "memory:#r4" }, -- still the same\n' }
    local one, two, fast = reload(lines_of(10), lines_of(10, changed))
    assert.is_true(fast)
    assert.are.equal(one[4], two[4])
  end)

  it("gives a changed line the name its position gives, and refuses a duplicate name", function()
    local changed = { [2] = '  bridge { "irc:#x", "memory:#x" }, -- unnamed: bridge2\n' }
    local _, two, fast, fresh = reload(lines_of(5), lines_of(5, changed))
    assert.is_true(fast)
    assert.are.equal("bridge2", two[2].name)
    assert.are.same(shape(fresh), shape(two))
    changed = { [2] = '  bridge { "irc:#x", "memory:#x", name = "bridge4" },\n' }
    local _, bad, _, _, errs, ferrs = reload(lines_of(5), lines_of(5, changed))
    assert.is_nil(bad)
    assert.are.same(ferrs, errs)
    assert.matches("duplicate bridge name bridge4", errs[1], 1, true)
  end)

  it("reports a bad changed line as a full run does, naming file and line", function()
    for _, line in ipairs {
      '  bridge { "irc:#r2", "ghost:#r2" },\n',
      '  bridge { "irc:#r2", "memory:#r2", fallback = "maybe" },\n',
      '  bridge { "irc:#r2", "memory:#r2", colour = "red" },\n',
      '  bridge { "irc:#r2" "memory:#r2" },\n',   -- a syntax error
      '  bridge { "irc:#r2" },\n',
    } do
      local _, two, _, fresh, errs, ferrs = reload(lines_of(5), lines_of(5, { [2] = line }))
      assert.is_nil(two, line)
      assert.is_nil(fresh, line)
      assert.are.same(ferrs, errs)
      assert.matches("rules.lua:4:", errs[1], 1, true)
    end
  end)

  it("runs the whole file when lines moved, many changed, or one stopped being data", function()
    local cases = {
      lines_of(41),                                                         -- a line added
      lines_of(39),                                                         -- a line removed
      (lines_of(40):gsub("memory:#r", "notes:#r")),                         -- every line
      lines_of(40, { [5] = '  bridge { "irc:#r5", "memory:#r5", filter = function() return true end },\n' }),
      lines_of(40, { [5] = '\n' }),                                         -- a bridge became a blank line
      (lines_of(40):gsub("%-%- rules\n", "--[[ rules\n]]\n", 1)),
      -- a comment line joined to the bridge line above it: one line fewer
      (lines_of(40, { [3] = '  bridge { "irc:#r3", "memory:#r3" },\n  -- three\n' })
        :gsub("},\n  %-%- three", "},   -- three")),
      -- a line put in before the first bridge
      (lines_of(40):gsub("return {\n", "return {\n  bridge { \"irc:#new\", \"memory:#new\" },\n")),
    }
    local base = lines_of(40)
    for n, text in ipairs(cases) do
      if n == 7 then base = lines_of(40, { [3] = '  bridge { "irc:#r3", "memory:#r3" },\n  -- three\n' }) end
      local _, two, fast, fresh = reload(base, text)
      assert.is_false(fast, text)
      assert.are.same(shape(fresh), shape(two))
    end
  end)

  it("is not taken for a set that ran another file or required one", function()
    local _, file = support.scratch()
    file("more.lua", 'return { bridge { "irc:#m", "memory:#m" } }')
    local text = 'local more = require "more"\nreturn {\n  bridge { "irc:#a", "memory:#a" },\n  more[1],\n}\n'
    local path = file("rules.lua", text)
    local one = assert(rules.load(path, { backends = backends }))
    assert.is_nil(one.data_text)
    text = text:gsub("#a", "#b")
    path = file("rules.lua", text)
    local before = rules.fast_loads
    local two = assert(rules.load(path, { backends = backends, previous = one, checked = one, text = text }))
    assert.are.equal(before, rules.fast_loads)
    assert.are.equal("#b", two[1].endpoints[1].room)
  end)
end)
