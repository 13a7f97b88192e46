-- on_federation in the rules: the router listens to "federation" events only
-- while the running rules have an on_federation (so the postbox need not
-- decode an event nobody receives), and hands each event to it.
local segue = require "segue"
local router = require "segue.router"

local dir, file = require("support").scratch()

local backends = { a = true, b = true }
local plain = file("plain.lua", 'return { bridge { "a:#x", "b:#x" } }\n')
local fed = file("fed.lua", [[
return {
  bridge { "a:#x", "b:#x" },
  on_federation = function(server_id, event)
    state.got = (state.got or "") .. server_id .. "=" .. event.kind .. ";"
  end,
}
]])

describe("the router and federation events", function()
  router.install()

  it("listens only while the rules have on_federation, and runs it for each event", function()
    assert.is_false(segue.listening("federation"))
    assert(router.load(plain, backends))
    assert.is_false(segue.listening("federation"))

    assert(router.load(fed, backends))
    assert.is_true(segue.listening("federation"))
    segue.emit("federation", "peer.example", { kind = "one" })
    assert.is_true(segue.emit_checked("federation", "other.example", { kind = "two" }))
    assert.are.equal("peer.example=one;other.example=two;", router.rules_state().got)

    -- a reload that keeps on_federation keeps one listener, not two
    file("fed.lua", io.open(fed):read("a") .. "-- edited\n")
    assert(router.load(fed, backends))
    segue.emit("federation", "peer.example", { kind = "three" })
    assert.are.equal("peer.example=one;other.example=two;peer.example=three;", router.rules_state().got)

    assert(router.load(plain, backends))
    assert.is_false(segue.listening("federation"))
  end)
end)
