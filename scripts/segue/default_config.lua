-- segue's embedded default config (`segue run` with no CONFIG).
-- Print it with `segue config --default`, copy it, and edit.

data_dir = "./segue-data"
log_level = "info"

backends = {
  -- A chat service kept in memory: rooms, members and messages.
  memory = { script = "memory", options = { user = "segue" } },

  -- A backend is either a Lua script run in-process:
  --   notes = { script = "backends/notes.lua", options = { dir = "notes" } },
  -- or a program speaking the backend protocol on stdin/stdout:
  --   chat = { cmd = "python3", args = { "my_backend.py" }, env_file = "chat.env" },
}

-- Lua files run at start-up with the `segue` API.
scripts = {}
