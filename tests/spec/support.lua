-- What the specs share (tests/spec is on package.path: run_busted.lua).
local segue = require "segue"

local M = {}

--- wait_until(what, cond [, ms]): runs the loop until cond() is true, and
--- fails naming `what` when ms (default 10 s) pass first. Specs wait for
--- what they expect, never for a fixed time: a loaded machine is slow.
function M.wait_until(what, cond, ms)
  ms = ms or 10000
  local deadline = segue.now() + ms
  segue.await(function()
    while not cond() and segue.now() < deadline do segue.sleep(5) end
  end, ms + 5000)
  if not cond() then error(("timed out after %d ms waiting for %s"):format(ms, what), 2) end
end

--- scratch(): a new empty directory (inside the run's scratch directory,
--- which run_busted.lua removes however the run ends) and a function
--- file(name, text) that writes a file there and returns its path.
function M.scratch()
  local dir = os.tmpname()
  os.remove(dir)
  assert(os.execute("mkdir -p " .. dir))
  return dir, function(name, text)
    local path = dir .. "/" .. name
    local f = assert(io.open(path, "w"))
    f:write(text)
    f:close()
    return path
  end
end

return M
