-- The Lua half of the host: what the C host and the CLI call. Each public
-- function returns true, or nil, message [, code].
local core = require "segue.core"
local fs = require "segue.fs"
local config = require "segue.config"
local sdk = require "segue.backend_sdk"
local segue = require "segue"
local loop = require "segue.loop"
local router = require "segue.router"

local M = {}

local function json_object(t) return require("segue.json").object(t) end

local overrides = {}      -- set by the embedder in C (data_dir, log_level)
local current             -- the running config
local source              -- how to load it again: { file = } or { name =, text = }
local started = false
-- Backends this instance holds the lease of (on a shared store).
local leases = { owned = {} }

-- On a shared store (postgresql), a backend starts only on the instance
-- that holds its lease.
local function may_start(name)
  if not (M.store and M.store:engine() == "postgresql") then return true end
  return leases.owned[name] == true
end

--- set_overrides(data_dir, log_level): options given in C (sg_host_new)
--- win over the config's; "" means not given.
function M.set_overrides(data_dir, log_level)
  overrides = { data_dir = data_dir ~= "" and data_dir or nil,
                log_level = log_level ~= "" and log_level or nil }
  return true
end

local function report(errors)
  for _, e in ipairs(errors) do core.log("error", e) end
  return nil, table.concat(errors, "\n")
end

local function load_config(src)
  if src.file then return config.load_file(src.file) end
  return config.load_string(src.text, src.name)
end

local function same(a, b)
  if type(a) ~= "table" or type(b) ~= "table" then return a == b end
  for k, v in pairs(a) do if not same(v, b[k]) then return false end end
  for k in pairs(b) do if a[k] == nil then return false end end
  return true
end

function M.add_backend(b)
  if b.kind == "lua" then
    return sdk.in_process(b.name, { source = b.source, chunkname = b.chunkname, options = b.options }, b.limits)
  end
  return core.add_process_backend(b.name, { cmd = b.cmd, args = b.args, env = b.env, cwd = b.cwd }, b.limits)
end

-- Makes the backends those of `cfg`: new ones added, changed ones replaced,
-- dropped ones removed. Started ones are started when the host runs.
local function apply(cfg, old)
  core.log_level(overrides.log_level or cfg.log_level or "info")
  -- the replay window after an unclean stop (docs/routing.md): for the
  -- windows opened from now on
  router.REPLAY_MS = cfg.replay_window_ms or router.DEFAULT_REPLAY_MS
  cfg.data_dir = overrides.data_dir or cfg.data_dir
  local old_by_name = {}
  for _, b in ipairs(old and old.backends or {}) do old_by_name[b.name] = b end
  for _, b in ipairs(cfg.backends) do
    local prev = old_by_name[b.name]
    old_by_name[b.name] = nil
    if not same(prev, b) then
      if prev then core.remove_backend(b.name) end
      local ok, err = M.add_backend(b)
      if not ok then return nil, ("backend %s: %s"):format(b.name, err) end
      if started and may_start(b.name) then core.start_backend(b.name) end
    end
  end
  for name in pairs(old_by_name) do core.remove_backend(name) end
  current = cfg
  return true
end

local function load_and_apply(src)
  if current then return nil, "a config is already loaded; use reload" end
  local cfg, errors = load_config(src)
  if not cfg then return report(errors) end
  source = src
  return apply(cfg)
end

function M.load_config_file(path) return load_and_apply { file = path } end

function M.load_config_string(name, text) return load_and_apply { name = name, text = text } end

--- The embedded default config's text (`segue config --default`).
function M.default_config_text() return core.embedded_source("segue.default_config") end

function M.load_default_config()
  return M.load_config_string("(default config)", M.default_config_text())
end

local function run_script(path)
  local chunk, err = loadfile(path, "t")
  if not chunk then return nil, err end
  local ok, e = xpcall(chunk, debug.traceback)
  if not ok then return nil, e end
  return true
end

function M.load_script(path)
  local ok, err = run_script(path)
  if not ok then core.log("error", err) end
  return ok, err
end

local function backend_names(cfg)
  local names = {}
  for _, b in ipairs(cfg.backends) do names[b.name] = true end
  return names
end

local watchers = {}

-- rules_check = "dry-run": a reload of the rules (file change, SIGHUP)
-- replays the message log through them first; a load failure, self-test
-- failure or filter/rewrite error keeps the running rules.
local function dry_run_ok(cfg)
  if cfg.rules_check ~= "dry-run" or not cfg.rules then return true end
  local ran, ok, why = pcall(require("segue.dryrun").check_in_coroutine, cfg)
  if ran and ok then return true end
  if not ran then why = ok end
  local r = router.status
  r.failures, r.last_error = r.failures + 1, "dry run: " .. tostring(why)
  core.log("error", ("rules not reloaded: %s (rules_check = \"dry-run\")"):format(why))
  segue.emit("rules", false, r.last_error)
  return nil, why
end

-- Rules files are watched through their directories (editors replace files
-- by rename); changes are debounced, then the rules reload.
local function watch_rules()
  for _, w in ipairs(watchers) do w:stop() end
  watchers = {}
  local dirs, debounce = {}, nil
  for _, path in ipairs(router.files()) do
    local dir, file = path:match("^(.*)/([^/]*)$")
    dirs[dir] = dirs[dir] or {}
    dirs[dir][file] = true
  end
  for dir, files in pairs(dirs) do
    local w, err = loop.watch(dir, function(name)
      if name and not files[name] then return end
      if debounce then debounce:stop() end
      debounce = segue.timer(200, function()
        debounce = nil
        if dry_run_ok(current) and router.load(current.rules, backend_names(current)) then watch_rules() end
      end)
    end)
    if w then watchers[#watchers + 1] = w else core.log("warn", "rules will not reload on change: " .. err) end
  end
end

local function open_store(cfg)
  local ok, store = pcall(require, "segue.store")
  if not ok then return end
  local db, err = store.open(config.store_options(cfg))
  if not db then core.log("error", "store: " .. tostring(err)) return end
  M.store = db
  router.set_store(db)
end

-- Several instances on one PostgreSQL (docs/scaling.md): the backends run
-- on the one instance holding the lease "backends" (all of them together, so
-- the router's copies between them stay in one process), renewed every
-- lease_ms / 3. An instance that cannot renew for most of lease_ms stops its
-- backends before another may take them; one that died loses them when the
-- lease expires. Each renewal also records the instance (instances table)
-- with what it runs, for `segue status`.
local LEASE = "backends"

local lease_tick_body

-- Not renewed for 80% of the lease: another instance may take it soon, so
-- the backends stop here first. Also run by a timer of its own, since a
-- renewal may wait on an unreachable database far longer than the lease.
function leases.check()
  local cfg = current
  if not (leases.renewed and cfg) or loop.now() - leases.renewed <= cfg.lease_ms * 0.8 then return end
  leases.renewed = nil
  require("segue.shared_state").lost()
  for name in pairs(leases.owned) do
    core.log("warn", ("instance %s stops backend %s: its lease could not be renewed"):format(cfg.instance, name))
    core.stop_backend(name)
    leases.owned[name] = nil
  end
end

local function lease_tick()
  if leases.busy or not M.store or not current then return end
  leases.busy = true
  -- busy is cleared whatever happens, or renewals would stop for good.
  local ok, err = pcall(lease_tick_body, M.store, current)
  leases.busy = false
  if not ok then core.log("error", "lease renewal: " .. tostring(err)) end
end

lease_tick_body = function(db, cfg)
  local now = loop.now()
  local holder, err = db:lease_claim(LEASE, cfg.instance, cfg.lease_ms)
  local shared_state = require "segue.shared_state"  -- the rules' state (docs/scaling.md)
  if holder == cfg.instance and not shared_state.held() then
    -- loaded before any backend starts; not loaded: nothing starts yet
    local ok, serr = shared_state.take(db)
    if not ok then
      core.log("warn", "rules state not loaded, backends not started yet: " .. tostring(serr))
      holder = nil
    end
  end
  if holder == cfg.instance then
    leases.renewed = now
    shared_state.save(db, cfg)
    -- The renewal counts from when it was asked: one answered after most of
    -- the lease (a slow or restarting database) would have check() stop at
    -- once what starts now, so the backends are taken at the next renewal.
    local late = loop.now() - now > cfg.lease_ms * 0.8
    local states = {}
    for _, st in ipairs(segue.backends()) do states[st.name] = st.state end
    for _, b in ipairs(cfg.backends) do
      -- A backend still stopping (this instance gave it up a moment ago)
      -- ignores a start: it is taken once it stopped.
      if not leases.owned[b.name] and not late and states[b.name] ~= "stopping" then
        leases.owned[b.name] = true
        core.log("info", ("instance %s took backend %s"):format(cfg.instance, b.name))
        core.start_backend(b.name)
      end
    end
  elseif holder then
    leases.renewed = nil
    shared_state.lost()
    for name in pairs(leases.owned) do
      core.log("warn", ("instance %s lost backend %s to %s"):format(cfg.instance, name, holder))
      core.stop_backend(name)
      leases.owned[name] = nil
    end
  else
    core.log("warn", "lease renewal failed: " .. tostring(err))
  end
  leases.check()
  local owned, states = {}, {}
  for name in pairs(leases.owned) do owned[#owned + 1] = name end
  table.sort(owned)
  for _, st in ipairs(segue.backends()) do states[st.name] = st.state end
  local json = require "segue.json"
  db:instance_beat(cfg.instance, json.encode { pid = fs.getpid(), backends = owned,
    states = json_object(states), lease_ms = cfg.lease_ms,
    api = cfg.http and require("segue.api").address() or nil })  -- where sends are forwarded
end

local function start_leases()
  router.lease = { name = LEASE, instance = current.instance }  -- its clean-stop mark only while held
  segue.spawn(lease_tick)
  leases.timer = segue.every(math.max(current.lease_ms // 3, 50), lease_tick)
  leases.watchdog = loop.timer(math.max(current.lease_ms // 10, 20), math.max(current.lease_ms // 10, 20),
    leases.check)
  segue.on("stopping", function()
    if leases.timer then leases.timer:stop() end
    if leases.watchdog then leases.watchdog:stop() end
    local db, cfg = M.store, current
    local shared_state = require "segue.shared_state"
    local held = shared_state.held()
    shared_state.release(db, cfg)  -- written before the release
    if next(leases.owned) or held then db:lease_release(LEASE, cfg.instance, function() end) end
  end)
end

-- The pid file is write-locked while segue runs (segue.fs.lock_pidfile):
-- `segue reload` signals the lock's holder only, and a second segue on the
-- same data directory refuses to start.
local pidfile_lock

local function lock_pidfile(dir)
  local path = dir .. "/segue.pid"
  local lock, err = fs.lock_pidfile(path)
  if not lock then return nil, err end
  pidfile_lock = lock
  segue.on("stopping", function() os.remove(path) end)
  return true
end

-- The data directory holds the store, keys and the pid file: only this user
-- may enter it (made 0700, or segue refuses naming the problem), and every
-- file segue creates is 0600 (umask 077; backends inherit it).
local function secure_data_dir(dir)
  local ok, err = fs.mkdir_p(dir, tonumber("700", 8))
  if not ok then return nil, err end
  fs.umask(tonumber("077", 8))
  local kind, mode = fs.stat(dir)
  if kind ~= "directory" then return nil, ("data_dir %s is not a directory"):format(dir) end
  if mode & tonumber("077", 8) ~= 0 then
    ok, err = fs.chmod(dir, tonumber("700", 8))
    if not ok then
      return nil, ("data_dir %s has mode %o (group or others may enter it) and cannot be made 0700: %s")
        :format(dir, mode, err)
    end
    core.log("warn", ("data_dir %s had mode %o; made it 0700"):format(dir, mode))
  end
  for _, name in ipairs { "segue.db", "segue.db-wal", "segue.db-shm" } do
    local p = dir .. "/" .. name
    local k, m = fs.stat(p)
    if k == "file" and m & tonumber("077", 8) ~= 0 then fs.chmod(p, tonumber("600", 8)) end
  end
  return true
end

function M.start()
  if not current then
    local ok, err = M.load_default_config()
    if not ok then return nil, err end
  end
  local ok, err = secure_data_dir(current.data_dir)
  if not ok then return report { err } end
  ok, err = lock_pidfile(current.data_dir)
  if not ok then return report { err } end
  open_store(current)
  local shared = M.store and M.store:engine() == "postgresql"
  router.install()
  if current.rules then
    ok, err = router.load(current.rules, backend_names(current))
    if not ok then return nil, err end
    watch_rules()
  end
  if M.store and not shared then -- for `segue status`: backends, peers, and the rules' last load
    require("segue.status").publish(M.store, nil, function()
      local r = router.status
      local c = require("segue.flow").counters()
      return { rules = current.rules and { file = current.rules, loads = r.loads, failures = r.failures,
        loaded_at = r.loaded_at, last_error = r.last_error } or nil,
        counters = { backends = json_object(c.backends), bridges = json_object(c.bridges) } }
    end)
  end
  -- `segue watch`: on a shared store every instance publishes, and the one
  -- that routes has events to write
  if M.store then require("segue.flow").publish(M.store) end
  -- Federation before the scripts, so they can call peers; it stops itself
  -- when the host stops (segue.on "stopping").
  if current.listen or current.server_id then
    ok, err = segue.harmony.start(current)
    if not ok then return report { "federation: " .. err } end
    if M.store then  -- the postbox needs the store: durable queues (shared ones on postgresql)
      ok, err = require("segue.postbox").start(current, M.store)
      if not ok then return report { "postbox: " .. err } end
    end
  end
  -- The client API (docs/api.md) before the scripts and the backends, so
  -- that every update is in its event log.
  if current.http then
    if not M.store then return report { "http: the client API needs the store" } end
    ok, err = require("segue.api").start(current, M.store)
    if not ok then return report { "http: " .. err } end
  end
  for _, path in ipairs(current.scripts) do
    ok, err = M.load_script(path)
    if not ok then return nil, err end
  end
  started = true
  if shared then
    start_leases()  -- each backend on the instance that holds its lease
  else
    for _, b in ipairs(current.backends) do core.start_backend(b.name) end
  end
  core.log("info", ("running with %d backend(s), data in %s"):format(#current.backends, current.data_dir))
  return true
end

--- reload: reads the config again; on any error the running one stays.
function M.reload()
  if not source then return nil, "nothing to reload" end
  local cfg, errors = load_config(source)
  if not cfg then
    core.log("error", "reload failed; the previous config keeps running")
    return report(errors)
  end
  local ok, err = apply(cfg, current)
  if not ok then return report { err } end
  core.log("info", "reloaded " .. (source.file or source.name))
  if cfg.rules and started then
    ok, err = dry_run_ok(cfg)
    if ok then ok, err = router.load(cfg.rules, backend_names(cfg)) end
    if ok then watch_rules() end
  end
  segue.emit("reload")
  return true
end

--- check(path): validates a config without starting anything.
function M.check(path)
  local cfg, errors = config.load_file(path)
  if not cfg then
    for _, e in ipairs(errors) do io.stderr:write(e, "\n") end
    return nil, #errors .. " problem(s)"
  end
  if cfg.rules then
    local ok, errs = require("segue.rules").load(cfg.rules, { backends = backend_names(cfg) })
    if not ok then
      for _, e in ipairs(errs) do io.stderr:write(e, "\n") end
      return nil, #errs .. " problem(s)"
    end
    local tested, terr = router.self_test(ok)
    if not tested then
      io.stderr:write(terr, "\n")
      return nil, "the rules' self-test failed"
    end
  end
  io.stdout:write(("%s: ok (%d backend(s))\n"):format(path, #cfg.backends))
  return true
end

--- signal_reload(cfg): `segue reload [CONFIG]` asks the segue running
--- with that (loaded) config's data_dir to reload (SIGHUP).
function M.signal_reload(cfg)
  local pid, err = fs.pidfile_holder(cfg.data_dir .. "/segue.pid")
  if not pid then return nil, err end
  local ok
  ok, err = fs.kill(pid, 1)
  if not ok then return nil, err end
  io.stdout:write("asked segue (pid ", pid, ") to reload\n")
  return true
end

--- status(): the router's state, for `segue status` and tests.
function M.router_status() return router.status end

--- standalone(file, "key=value"...): `segue backend FILE.lua k=v...`
function M.standalone(file, ...)
  local options = {}
  for i = 1, select("#", ...) do
    local kv = select(i, ...)
    local k, v = kv:match("^([^=]+)=(.*)$")
    if not k then return nil, ("option %q: expected KEY=VALUE"):format(kv) end
    options[k] = tonumber(v) or (v == "true" and true) or (v == "false" and false) or v
  end
  local f, err = io.open(file, "r")
  if not f then return nil, err end
  local text = f:read("a")
  f:close()
  local name = file:match("([^/]+)%.lua$") or file
  local ok, e = pcall(sdk.standalone, name, { source = text, chunkname = "@" .. file, options = options }, {},
    function(why)
      if why then core.log("error", why, "backend", name) end
      M.exit_code = why and 1 or 0
    end)
  if not ok then return nil, tostring(e) end
  return true
end

--- exec(file, args...): runs a script with the segue API at the top level;
--- the CLI then runs the loop until nothing is left to do.
function M.exec(file, ...)
  arg = { [0] = file, ... }
  local chunk, err = loadfile(file, "t")
  if not chunk then return nil, err end
  local ok, e = xpcall(chunk, debug.traceback, ...)
  if not ok then return nil, e end
  return true
end

return M
