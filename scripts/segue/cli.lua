--- segue.cli: the command line's commands, one function each.
---
--- runtime/cli/main.c parses the global options and runs `run`, `backend`
--- and `exec` itself (they own the loop's life); every other command is a
--- function here: M.commands[name](args...) returns the process's exit code
--- (0 ok, 1 failed, 2 usage). A new command is a new entry: the C side needs
--- no change. Commands read their config with M.load_config, so "CONFIG or
--- the embedded default" means the same everywhere.
local core = require "segue.core"
local config = require "segue.config"

local M = { commands = {} }
local commands = M.commands

local function err(fmt, ...) io.stderr:write("segue: ", fmt:format(...), "\n") end

--- load_config(path): the config at `path`, or the embedded default when
--- path is nil; on failure nil, the errors (a list of "file:line: ..." lines).
function M.load_config(path)
  if path then return config.load_file(path) end
  return config.load_string(core.embedded_source("segue.default_config"), "(default config)")
end

--- config_or_fail(path): the config, or nil after printing its errors.
function M.config_or_fail(path)
  local cfg, errors = M.load_config(path)
  if not cfg then
    for _, e in ipairs(errors) do io.stderr:write(e, "\n") end
    return nil
  end
  return cfg
end

-- segue check CONFIG ------------------------------------------------------------
function commands.check(path)
  if not path then
    io.stderr:write("usage: segue check CONFIG\n")
    return 2
  end
  local ok = require("segue.boot").check(path)
  return ok and 0 or 1
end

-- segue reload [CONFIG] ---------------------------------------------------------
function commands.reload(path)
  local cfg, errors = M.load_config(path)
  if not cfg then
    for _, e in ipairs(errors) do core.log("error", e) end
    err("reload: %s", table.concat(errors, "\n"))
    return 1
  end
  -- rules_check = "dry-run": the rules must first replay the log cleanly
  if cfg.rules_check == "dry-run" then
    local clean, why = require("segue.dryrun").check_before_reload(cfg)
    if not clean then err("reload: not reloaded: %s (rules_check = \"dry-run\")", why) return 1 end
  end
  local ok, e = require("segue.boot").signal_reload(cfg)
  if not ok then err("reload: %s", e) return 1 end
  return 0
end

-- segue status [CONFIG] ---------------------------------------------------------
function commands.status(path)
  local ok, e = require("segue.status").command(path)
  if not ok then err("status: %s", e) return 1 end
  return 0
end

-- segue watch [CONFIG] ----------------------------------------------------------
-- Each message as it arrives and each copy as it is sent, live, from the
-- segue running with CONFIG's data_dir (see segue.flow).
function commands.watch(path)
  if path == "--help" or path == "-h" then
    io.stdout:write("usage: segue watch [CONFIG]\n")
    return 0
  end
  local cfg = M.config_or_fail(path)
  if not cfg then return 1 end
  local ok, e = require("segue.flow").watch(cfg)
  if not ok then err("watch: %s", e) return 1 end
  return 0
end

-- segue rules test RULES.lua [--since DURATION] [--room backend:room] [CONFIG]
-- The message log replayed through RULES.lua and the running rules, nothing
-- sent (segue.dryrun). 0: it ran; 1: the rules fail to load or self-test.
function commands.rules(...)
  return require("segue.dryrun").command(...)
end

-- segue key [CONFIG] ------------------------------------------------------------
function commands.key(path)
  local ok, e = require("segue.harmony").key_command(path)
  if not ok then err("key: %s", e) return 1 end
  return 0
end

-- segue migrate [CONFIG] --------------------------------------------------------
-- Applies the store's migrations now (instances also migrate when they
-- start; on PostgreSQL one at a time, under an advisory lock).
function commands.migrate(path)
  if path == "--help" or path == "-h" then
    io.stdout:write("usage: segue migrate [CONFIG]\n")
    return 0
  end
  local cfg = M.config_or_fail(path)
  if not cfg then return 1 end
  local store = require "segue.store"
  local opts = config.store_options(cfg)
  local ok, done, e = pcall(require("segue").await, function()
    local db, oerr = store.open(opts)
    if not db then return nil, oerr end
    -- The first call waits for the migrations (PostgreSQL runs them at the
    -- first connection; SQLite ran them in open).
    local _, kerr = db:kv_get("segue.migrate")
    db:close()
    if kerr then return nil, kerr end
    return true
  end, 60000)
  if not ok then done, e = nil, tostring(done) end
  if not done then err("migrate: %s", tostring(e)) return 1 end
  io.stdout:write(("%s: schema at version %d\n"):format(
    opts.engine == "postgresql" and "postgresql" or opts.path, store.SCHEMA_VERSION))
  return 0
end

-- segue user add NAME [--admin] [CONFIG] | list [CONFIG] | remove NAME [CONFIG] ----
-- Users of the client API (docs/api.md), in CONFIG's store (data_dir/segue.db,
-- or the PostgreSQL database every instance shares); a running segue sees
-- the change at its next request.
local USER_USAGE = "usage: segue user add NAME [--admin] [CONFIG] | segue user list [CONFIG] | segue user remove NAME [CONFIG]\n"

-- Runs fn(db) on CONFIG's store inside segue.await (the store may answer
-- later: PostgreSQL); returns fn's results, or nil after printing why.
local function with_user_store(path, what, fn)
  local cfg = M.config_or_fail(path)
  if not cfg then return nil end
  local opts = config.store_options(cfg)
  if opts.engine == "sqlite" then
    local ok, merr = require("segue.fs").mkdir_p(cfg.data_dir, tonumber("700", 8))
    if not ok then err("%s: %s", what, merr) return nil end
  end
  local ok, a, b, c = pcall(require("segue").await, function()
    local db, serr = require("segue.store").open(opts)
    if not db then return nil, serr end
    local x, y, z = fn(db)
    db:close()
    return true, { x, y, z }
  end, 60000)
  if not ok then a, b = nil, tostring(a) end
  if not a then err("%s: %s", what, tostring(b)) return nil end
  return table.unpack(b, 1, 3)
end

local user_commands = {}

function user_commands.add(...)
  local name, admin, path
  for _, a in ipairs { ... } do
    if a == "--admin" then admin = true
    elseif not name then name = a
    elseif not path then path = a
    else return nil end
  end
  if not name or name:match("^%-") then return nil end
  local token, e, code = with_user_store(path, "user add " .. name, function(db)
    return require("segue.api").user_add(db, name, admin)
  end)
  if not token then
    if e then err("user add %s: %s", name, code == "EEXIST" and "a user of that name exists" or e) end
    return 1
  end
  io.stdout:write("user ", name, admin and " (admin)" or "", " added; the token is shown only now:\n")
  io.stdout:write("token ", token, "\n")
  return 0
end

function user_commands.list(path, extra)
  if extra then return nil end
  local users, e = with_user_store(path, "user list", function(db) return db:users() end)
  if not users then
    if e then err("user list: %s", e) end
    return 1
  end
  for _, u in ipairs(users) do
    io.stdout:write(("%s%s tokens=%d created=%s\n"):format(u.name, u.admin and " admin" or "", u.tokens,
      os.date("!%Y-%m-%dT%H:%M:%SZ", u.created // 1000)))
  end
  return 0
end

function user_commands.remove(name, path, extra)
  if not name or extra then return nil end
  local removed, e = with_user_store(path, "user remove " .. name, function(db)
    local r, rerr = db:user_remove(name)
    return r, rerr
  end)
  if removed == nil then
    if e then err("user remove %s: %s", name, e) end
    return 1
  end
  if not removed then err("user remove: no user %s", name) return 1 end
  io.stdout:write("user ", name, " removed; its tokens no longer work\n")
  return 0
end

function commands.user(verb, ...)
  local fn = user_commands[verb or ""]
  local code = fn and fn(...)
  if code == nil then
    io.stderr:write(USER_USAGE)
    return 2
  end
  return code
end

-- segue config --default --------------------------------------------------------
commands.config = function(flag)
  if flag ~= "--default" then
    io.stderr:write("usage: segue config --default\n")
    return 2
  end
  io.stdout:write(core.embedded_source("segue.default_config"))
  return 0
end

--- run(name, args...): the exit code of command `name`.
function M.run(name, ...)
  local fn = commands[name]
  if not fn then return nil end
  return fn(...)
end

return M
