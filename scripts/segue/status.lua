--- segue.status: what `segue status` prints, and how a running segue
--- publishes it. `segue status` runs in another process: the running host
--- writes its backends' state (and what extra() adds: rules, router
--- counters) into the store's kv table, beside the peers' rows the postbox
--- keeps; the command reads both.
local loop = require "segue.loop"
local json = require "segue.json"
local fs = require "segue.fs"
local store = require "segue.store"

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
  local quick = loop.timer(1000, 1000, function() if flow.dirty then s.spawn(write) end end)
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
  local peers, perr, pcode = require("segue.postbox_core").peers_of(db)
  local host = db:kv_get(STATUS_KEY)
  db:close()
  if not peers then return nil, perr, pcode end
  local out = host and json.decode(host) or { backends = {} }
  out.peers = peers
  return out
end

--- read_shared(cfg): on a shared store (postgresql), every instance: when
--- it was last seen, whether it is alive (seen within 2 x lease_ms), its pid
--- and the backends it owns with their states; and every lease. Runs the
--- loop until the database answered (from the CLI).
function M.read_shared(cfg)
  local s = segue()
  local ok, out, err, code = pcall(s.await, function()
    local db, oerr, ocode = store.open(require("segue.config").store_options(cfg))
    if not db then return nil, oerr, ocode end
    local instances, ierr, icode = db:instances()
    local leases = instances and db:leases() or {}
    -- the postbox's peers (queue, inbox, times) from the shared store
    local peers = instances and s.call("segue.status", function(cb)
      return require("segue.postbox_core").peers_of(db, cb)
    end) or nil
    db:close()
    if not instances then return nil, ierr, icode end
    local now = os.time() * 1000
    local list = {}
    for _, i in ipairs(instances) do
      local info = i.info and json.decode(i.info) or {}
      local lease_ms = info.lease_ms or cfg.lease_ms
      list[#list + 1] = { name = i.name, seen = i.seen, alive = now - i.seen <= 2 * lease_ms,
        pid = info.pid, backends = info.backends or {}, states = info.states }
    end
    return { engine = "postgresql", instance = cfg.instance, instances = list, leases = leases,
      peers = peers or {} }
  end, 30000)
  if not ok then return nil, tostring(out), "ESTORE" end
  return out, err, code
end

--- command(config_path): `segue status [CONFIG]` prints M.read as one JSON object.
function M.command(path)
  local cfg, errors = require("segue.cli").load_config(path)
  if not cfg then return nil, table.concat(errors, "\n"), "ECONFIG" end
  if cfg.store and cfg.store.engine == "postgresql" then
    local out, err, code = M.read_shared(cfg)
    if not out then return nil, err, code end
    io.stdout:write(json.encode(out), "\n")
    return true
  end
  local out, err, code = M.read(cfg.data_dir)
  if not out then return nil, err, code end
  io.stdout:write(json.encode(out), "\n")
  return true
end

return M
