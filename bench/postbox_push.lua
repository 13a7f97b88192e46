-- Events per second pushed A->B over loopback through segue.postbox (one
-- Push at a time per peer, as the ordering rule demands; B stores each event
-- in its inbox before answering), against sequential bare segue.harmony.call
-- Pushes over the same connection in the same run.
--   segue exec bench/postbox_push.lua B_URL SECONDS A_PORT   (B: `segue run`
--   with server_id "b.example:2289", knowing A at 127.0.0.1:A_PORT); prints
--   "postbox_rate baseline_rate".
local segue = require "segue"
local store = require "segue.store"
local postbox = require "segue.postbox"
local loop = require "segue.loop"

local b_url, secs, a_port = arg[1], tonumber(arg[2] or "3"), arg[3]
local B = "b.example:2289"
local dir = os.getenv("BENCH_DIR") or "."
local cfg = { server_id = "a.example:2289", data_dir = dir, listen = "127.0.0.1:" .. a_port,
              federation = { peers = { [B] = b_url } } }
assert(segue.harmony.start(cfg))
local db = assert(store.open(dir .. "/a.db"))
assert(postbox.start(cfg, db))
local event = { user_added_to_guild = { user_id = 7, guild_id = 1 } }

local function rate(push_one)
  return segue.await(function()
    local n, t0 = 0, loop.hrtime()
    while loop.hrtime() - t0 < secs * 1e9 do
      assert(push_one())
      n = n + 1
    end
    return n / ((loop.hrtime() - t0) / 1e9)
  end, (secs + 30) * 1000)
end

rate(function() return segue.harmony.call(B, "Push", { event = event }) end)  -- warm up: key, connection
local base = rate(function() return segue.harmony.call(B, "Push", { event = event }) end)
local subj = rate(function()
  local how, err = postbox.push(B, event)
  assert(how == "pushed", err or how)
  return true
end)
print(("%.0f %.0f"):format(subj, base))
postbox.stop()
segue.harmony.stop()
