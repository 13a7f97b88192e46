-- segue.harmony from Lua: every message round-trips with the uint64 edges,
-- bad values are clear errors, and calls fail cleanly without a peer.
local segue = require "segue"
local h = segue.harmony

-- 0, 2^53+1, 2^63-1, 2^63 and 2^64-1 as Lua integers (the same 64 bits).
local EDGES = { 0, (1 << 53) + 1, math.maxinteger, math.mininteger, -1 }

local S, T = "protocol.sync.v1.", "protocol.sync.v1.Event."
local samples = {
  [S .. "AuthData"] = function(u) return { server_id = "a.example:2289", time = u, audience = "b.example:1" } end,
  [S .. "Event"] = function(u) return { user_invited = { user_id = u, inviter_id = u, invite_id = "i" } } end,
  [T .. "UserRemovedFromGuild"] = function(u) return { user_id = u, guild_id = u } end,
  [T .. "UserAddedToGuild"] = function(u) return { user_id = u, guild_id = u } end,
  [T .. "UserInvited"] = function(u) return { user_id = u, inviter_id = u, invite_id = "inv" } end,
  [T .. "UserRejectedInvite"] = function(u) return { guild_id = u, user_id = u, invite_id = "inv" } end,
  [S .. "PullRequest"] = function() return {} end,
  [S .. "PullResponse"] = function(u)
    return { event_queue = {
      { user_added_to_guild = { user_id = u, guild_id = u } },
      { user_removed_from_guild = { user_id = u, guild_id = 1 } },
      { user_rejected_invite = { guild_id = u, user_id = u, invite_id = "r" } },
    } }
  end,
  [S .. "PushRequest"] = function(u) return { event = { user_added_to_guild = { user_id = u, guild_id = u } } } end,
  [S .. "PushResponse"] = function() return {} end,
  [S .. "NotifyNewIdRequest"] = function() return { new_server_id = "new.example:2289" } end,
  [S .. "NotifyNewIdResponse"] = function() return {} end,
  ["protocol.harmonytypes.v1.Token"] = function() return { sig = ("\1"):rep(64), data = "\0data" } end,
  ["protocol.auth.v1.KeyRequest"] = function() return {} end,
  ["protocol.auth.v1.KeyResponse"] = function() return { key = ("k"):rep(32) } end,
  ["hrpc.v1.Error"] = function() return { identifier = "h.bad-token", human_message = "m", details = "\0\1" } end,
  ["hrpc.v1.RetryInfo"] = function() return { retry_after = 4294967295 } end,
}

-- Stops federation and removes the data directory a spec gave it.
local function stop_and_clean(dir)
  h.stop()
  os.remove(dir .. "/harmony.key")
  os.remove(dir)
end

local function hex(s) return (s:gsub(".", function(c) return ("%02x"):format(c:byte()) end)) end

describe("segue.harmony encode and decode", function()
  it("has a sample here for every message type it knows", function()
    for _, name in ipairs(h.types()) do assert.is_function(samples[name], name) end
  end)

  it("round-trips every message with each uint64 edge", function()
    for name, make in pairs(samples) do
      for _, u in ipairs(EDGES) do
        local bytes = assert(h.encode(name, make(u)))
        assert.are.same(make(u), assert(h.decode(name, bytes)), name .. " " .. u)
      end
    end
  end)

  it("puts all 64 bits of 2^64-1 on the wire, given as an integer or a decimal string", function()
    local want = "10ffffffffffffffffff01"  -- field 2, varint of 2^64-1
    assert.are.equal(want, hex(h.encode(S .. "AuthData", { time = -1 })))
    assert.are.equal(want, hex(h.encode(S .. "AuthData", { time = "18446744073709551615" })))
    local t = h.decode(S .. "AuthData", h.encode(S .. "AuthData", { time = "9223372036854775808" })).time
    assert.are.equal(math.mininteger, t)
    assert.is_true(math.ult(math.maxinteger, t))
  end)

  it("refuses a float for an integer field, naming the field", function()
    local ok, err, code = h.encode(S .. "PushRequest", { event = { user_added_to_guild = { user_id = 1.5 } } })
    assert.is_nil(ok)
    assert.are.equal("EINVAL", code)
    assert.matches("PushRequest.event.user_added_to_guild.user_id: expected an integer", err, 1, true)
    assert.matches("float 1.5", err, 1, true)
    assert.is_nil((h.encode(S .. "AuthData", { time = 2.0 ^ 53 })))
  end)

  it("refuses values out of range", function()
    local cases = {
      { "hrpc.v1.RetryInfo", { retry_after = 1 << 32 }, "expected an integer in [0, 4294967295]" },
      { "hrpc.v1.RetryInfo", { retry_after = -1 }, "expected an integer in [0, 4294967295]" },
      { S .. "AuthData", { time = "18446744073709551616" }, "expected a decimal string" },
      { S .. "AuthData", { time = "-1" }, "expected a decimal string" },
      { S .. "AuthData", { time = "1e3" }, "expected a decimal string" },
    }
    for _, c in ipairs(cases) do
      local ok, err, code = h.encode(c[1], c[2])
      assert.is_nil(ok)
      assert.are.equal("EINVAL", code)
      assert.matches(c[3], err, 1, true)
    end
  end)

  it("refuses unknown fields and two members of one oneof", function()
    local _, err = h.encode(S .. "Event", { user_invted = {} })
    assert.matches("Event.user_invted: unknown field", err, 1, true)
    _, err = h.encode(S .. "Event", { user_invited = {}, user_added_to_guild = {} })
    assert.matches("one oneof", err, 1, true)
  end)

  it("answers truncated or wrong-type bytes with nil and EDECODE", function()
    local bytes = h.encode(S .. "PushRequest", { event = { user_invited = { invite_id = "abcdef" } } })
    local ok, err, code = h.decode(S .. "PushRequest", bytes:sub(1, -3))
    assert.is_nil(ok)
    assert.are.equal("EDECODE", code)
    assert.matches("cannot decode protocol.sync.v1.PushRequest", err, 1, true)
    assert.is_nil((h.decode("protocol.auth.v1.KeyResponse", "\x08\x01\x0a")))
  end)

  it("raises for an unknown message type (a programmer error)", function()
    assert.has_error(function() h.encode("protocol.sync.v1.Nope", {}) end)
  end)
end)

describe("segue.harmony.call", function()
  it("raises for an unknown method", function()
    assert.has_error(function() h.call("b.example:1", "protocol.sync.v1.PostboxService/Nope", {}, print) end)
  end)

  it("fails with ECONFIG while federation is not started", function()
    local ok, err, code = h.call("b.example:1", "Push", { event = {} }, print)
    assert.is_nil(ok)
    assert.are.equal("ECONFIG", code)
    assert.matches("not started", err, 1, true)
  end)

  it("fails with EINVAL, calling nothing, when the message does not encode", function()
    local called = false
    local ok, _, code = h.call("b.example:1", "Push", { event = { bogus = 1 } }, function() called = true end)
    assert.is_nil(ok)
    assert.are.equal("EINVAL", code)
    assert.is_false(called)
  end)

  describe("with federation started", function()
    local dir = os.tmpname()
    local closed = "127.0.0.1:1"  -- nothing listens on port 1
    setup(function()
      os.remove(dir)
      assert(h.start { server_id = "spec.example:1", data_dir = dir,
                       federation = { peers = { ["closed.example:1"] = "http://" .. closed } } })
    end)
    teardown(function() stop_and_clean(dir) end)

    it("has a 32-byte public key and our server id", function()
      assert.are.equal(32, #h.public_key())
      assert.are.equal("spec.example:1", h.server_id())
      assert.is_nil(h.port())  -- no listen: calls only
    end)

    it("answers a call to a peer nobody serves with nil, EHTTP in the coroutine form", function()
      local r, err, code = segue.await(function()
        return h.call("closed.example:1", "Pull", {})
      end)
      assert.is_nil(r)
      assert.are.equal("EHTTP", code)
      assert.matches("^EHTTP: ", err)
    end)

    it("answers the callback form with the same values", function()
      local got
      assert.is_true(h.call("closed.example:1", "protocol.auth.v1.AuthService/Key", {},
        function(...) got = table.pack(...) end))
      segue.await(function() while not got do segue.sleep(10) end end)
      assert.is_nil(got[1])
      assert.are.equal("EHTTP", got[3])
    end)

    it("refuses the coroutine form outside a coroutine", function()
      assert.has_error(function() h.call("closed.example:1", "Pull", {}) end)
    end)

    it("refuses to start twice", function()
      local ok, _, code = h.start { data_dir = dir }
      assert.is_nil(ok)
      assert.are.equal("EEXIST", code)
    end)
  end)
end)

describe("segue.harmony handlers", function()
  local dir = os.tmpname()
  local me = "self.example:1"
  setup(function()
    os.remove(dir)
    -- learn a free port, then listen there with a peers entry pointing at ourselves
    assert(h.start { data_dir = dir, listen = "127.0.0.1:0" })
    local port = h.port()
    h.stop()
    segue.wait(50)  -- let the listener close before binding its port again
    assert(h.start { server_id = me, data_dir = dir, listen = "127.0.0.1:" .. port,
                     federation = { peers = { [me] = "http://127.0.0.1:" .. port,
                                              -- the same server under its new name
                                              ["new.example:1"] = "http://127.0.0.1:" .. port } } })
  end)
  teardown(function() stop_and_clean(dir) end)

  it("delivers a signed Push to segue.on('federation') with the exact ids", function()
    local got
    local off = segue.on("federation", function(from, event) got = { from, event } end)
    local r, err = segue.await(function()
      return h.call(me, "Push", { event = { user_invited = { user_id = -1, inviter_id = (1 << 53) + 1, invite_id = "z" } } })
    end)
    off()
    assert.are.same({}, r, err)
    assert.are.same({ me, { user_invited = { user_id = -1, inviter_id = (1 << 53) + 1, invite_id = "z" } } }, got)
  end)

  it("answers Pull with an empty queue and hands NotifyNewId to federation_new_id", function()
    local moved
    local off = segue.on("federation_new_id", function(old, new) moved = { old, new } end)
    local pull, notify = segue.await(function()
      return h.call(me, "Pull", {}), h.call(me, "NotifyNewId", { new_server_id = "new.example:1" })
    end)
    off()
    assert.are.same({ event_queue = {} }, pull)
    assert.are.same({}, notify)
    assert.are.same({ me, "new.example:1" }, moved)
  end)

  it("verifies a token it has seen with the same key only once (the verified-token cache)", function()
    local before = h.running():stats()
    segue.await(function()
      -- five calls in well under a second: at most two distinct tokens
      for _ = 1, 5 do assert(h.call(me, "Pull", {})) end
    end)
    local after = h.running():stats()
    assert.is_true(after.verifies - before.verifies <= 2, "verifies " .. after.verifies - before.verifies)
    assert.is_true(after.verified_hits - before.verified_hits >= 3)
    assert.are.equal(0, after.failed_keys)
    assert.is_true(after.cached_keys >= 1 and after.accepted >= 1)
  end)

  it("tells a handler when its response was written out whole", function()
    local outcome
    local prev = h.handle("Pull", function()
      return { event_queue = { { user_added_to_guild = { user_id = 5, guild_id = 6 } } } },
        function(ok, err) outcome = { ok, err } end
    end)
    local r = segue.await(function()
      local resp = h.call(me, "Pull", {})
      while not outcome do segue.sleep(5) end
      return resp
    end)
    h.handle("Pull", prev)
    assert.is_true(h.write_completion)
    assert.are.same({ user_added_to_guild = { user_id = 5, guild_id = 6 } }, r.event_queue[1])
    assert.are.same({ true }, outcome)
  end)

  it("stores Pushes in C through a postbox's serve_pushes until a Lua Push handler replaces it", function()
    local store, core = require "segue.store", require "segue.postbox_core"
    local path = os.tmpname()
    os.remove(path)
    local db = assert(store.open(path))
    local got, arrived = {}, {}
    local pb = assert(core.new(db, {}, {
      push = function(_, _, done) done("no") end,
      deliver = function(id, ev) got[#got + 1] = { id, h.decode("protocol.sync.v1.Event", ev) } return true end,
    }))
    h.serve_pushes(pb, function(id) arrived[#arrived + 1] = id end)
    local ev = { user_invited = { user_id = 7, inviter_id = 8, invite_id = "c" } }
    local r, err = segue.await(function()
      local a, e = h.call(me, "Push", { event = ev })
      while #got < 1 do segue.sleep(5) end
      return a, e
    end)
    assert.are.same({}, r, err)
    assert.are.same({ { me, ev } }, got)
    assert.are.same({ me }, arrived)
    local peers
    assert(pb:peers(function(list) peers = list end))
    assert.is_number(peers[1].last_push_in)
    assert(pb:key_get(me, function(key) assert.are.equal(h.running():public_key(), key) end))
    -- nobody listens: delivered (the inbox empties) without the deliver function
    pb:deliver_in_lua(false)
    local loop_now_before = require("segue.loop").now()
    segue.await(function() assert(h.call(me, "Push", { event = ev })) end)
    segue.await(function()
      for _ = 1, 200 do
        local inbox
        pb:peers(function(list) inbox = list[1].inbox end)
        if inbox == 0 then return end
        segue.sleep(5)
      end
    end)
    assert.are.equal(1, #got)
    -- pushed() ran for the peer's first Push only (then at most every second);
    -- the last Push's time is there to ask for
    assert.are.equal(1, #arrived)
    assert.is_true(pb:pushed_at(me) >= loop_now_before)
    -- a Lua Push handler takes over from C
    local lua_got
    local prev = h.handle_bytes("Push", function(id, bytes, req)
      lua_got = h.decode("protocol.sync.v1.Event", bytes)
      req:respond("")
    end)
    r, err = segue.await(function() return h.call(me, "Push", { event = ev }) end)
    h.handle_bytes("Push", prev)
    assert.are.same({}, r, err)
    assert.are.same(ev, lua_got)
    assert.are.equal(1, #arrived)
    assert.is_nil(pb:pushed_at("nobody.example:1"))
    pb:close()
    db:close()
    for _, suffix in ipairs { "", "-wal", "-shm" } do os.remove(path .. suffix) end
  end)

  it("answers with the error a replaced handler returns", function()
    local prev = h.handle("Pull", function() return nil, "queue is busy", "hrpc.unavailable", 503 end)
    local r, err, code, status, identifier = segue.await(function() return h.call(me, "Pull", {}) end)
    h.handle("Pull", prev)
    assert.is_nil(r)
    assert.are.same({ "EHTTP", 503, "hrpc.unavailable" }, { code, status, identifier })
    assert.matches("queue is busy", err, 1, true)
  end)
end)

describe("segue.harmony.decode of untrusted strings", function()
  it("refuses a string field that is not UTF-8, naming the field", function()
    local h = require "segue.harmony_core"
    local v, err, code = h.decode("protocol.sync.v1.AuthData", "\10\4\255abc\16\1")
    assert.is_nil(v)
    assert.are.equal("EDECODE", code)
    assert.are.equal("EDECODE: AuthData.server_id: invalid UTF-8 at byte 1", err)
  end)
end)
