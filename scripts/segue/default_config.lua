-- segue's embedded default config (`segue run` with no CONFIG): an
-- interactive demo. Type a line in the terminal: the console backend sends
-- it to the memory backend, whose echo of the stored message is printed.
-- Print this file with `segue config --default`, copy it, and edit.

data_dir = "./segue-data"
log_level = "info"

backends = {
  -- A chat service kept in memory: rooms, members and messages.
  memory = { script = "memory", options = { user = "segue" } },

  -- The terminal as a chat service. `bridge` wires it to the memory
  -- backend for this demo (the router's `rules` will do that for any pair).
  console = { script = "console", options = {
    room = "#console",
    bridge = "memory",
    banner = [[
segue demo: type a line and press Enter; it goes to the memory backend and
comes back. Ctrl-C stops. To bridge IRC, run `segue config --default > segue.lua`,
add this to its backends and run `segue run segue.lua`:
  irc = { script = "irc", options = { host = "irc.libera.chat", port = 6697,
          tls = true, nick = "my-bridge" } },
(docs/backends.md describes the IRC, notes and console options.)]],
  } },

  -- More backends: IRC (TLS, verified certificates, SASL)
  --   irc = { script = "irc", options = { host = "irc.libera.chat", port = 6697, tls = true,
  --           nick = "my-bridge", sasl_user = "my-bridge", sasl_password = "..." } },
  -- notes to self, one file per room:
  --   notes = { script = "notes", options = { dir = "segue-data/notes" } },
  -- or a program speaking the backend protocol on stdin/stdout:
  --   chat = { cmd = "python3", args = { "my_backend.py" }, env_file = "chat.env" },
}

-- Lua files run at start-up with the `segue` API.
scripts = {}
