--- segue.status: what `segue status` prints, and how a running segue
--- publishes it. `segue status` runs in another process: the running host
--- writes its backends' state (and what extra() adds: rules, router
--- counters) into the store's kv table, beside the peers' rows the postbox
--- keeps; the command reads both.
local loop = require "segue.loop"
local json = require "segue.json"
local fs = require "segue.fs"
local store = require "segue.store"
local pbc = require "segue.postbox_core"

local M = {}
local function segue() return require "segue" end

local STATUS_KEY = "status.host"

--- publish(db [, every_ms [, extra]]): writes { time, pid, backends }
--- (plus the fields extra() returns) now, every every_ms (default 5000), and
--- whenever a backend changes state or the config reloads.
function M.publish(db, every_ms, extra)
  local s = segue()
  local function write()
    local st = extra and extra() or {}
    st.time, st.pid, st.backends = os.time() * 1000, fs.getpid(), s.backends()
    db:kv_set(STATUS_KEY, json.encode(st))
  end
  write()
  local t = loop.timer(every_ms or 5000, every_ms or 5000, write)
  -- Counters that moved show within a second, not at the next full write.
  local flow = require "segue.flow"
  local quick = loop.timer(1000, 1000, function() if flow.dirty then write() end end)
  local off = s.on("backend", write)
  local off_reload = s.on("reload", write)
  local off_rules = s.on("rules", write)
  s.on("stopping", function() t:stop() quick:stop() off() off_reload() off_rules() end)
end

--- read(data_dir): the status of the segue using that data_dir, as a table:
--- peers (queue length, inbox, last push/pull times in ms since the epoch,
--- last error), backends, rules; or nil, err, code.
function M.read(data_dir)
  local db, err, code = store.open(data_dir .. "/segue.db")
  if not db then return nil, err, code end
  local peers, perr, pcode = pbc.peers_of(db)
  local host = db:kv_get(STATUS_KEY)
  db:close()
  if not peers then return nil, perr, pcode end
  local out = host and json.decode(host) or { backends = {} }
  out.peers = peers
  return out
end

--- command(config_path): `segue status [CONFIG]` prints M.read as one JSON object.
function M.command(path)
  local cfg, errors = require("segue.cli").load_config(path)
  if not cfg then return nil, table.concat(errors, "\n"), "ECONFIG" end
  local out, err, code = M.read(cfg.data_dir)
  if not out then return nil, err, code end
  io.stdout:write(json.encode(out), "\n")
  return true
end

return M
