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
comes back. Ctrl-C stops.
To bridge an IRC channel into this terminal, run `segue config --default > segue.lua`,
add an irc backend to its backends:
  irc = { script = "irc", options = { host = "irc.libera.chat", port = 6697,
          tls = true, nick = "my-bridge" } },
and a rule: the line  rules = "rules.lua"  in segue.lua, and a file rules.lua:
  return { bridge { "irc:#my-channel", "memory:#console" } }
then `segue run segue.lua`; `segue watch segue.lua` in another terminal shows
each message pass. Step by step: docs/first-bridge.md; options: docs/backends.md.]],
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

-- Which message goes where: bridges between rooms of the backends above
-- (docs/routing.md), e.g. a file rules.lua beside this one containing
--   return { bridge { "irc:#my-channel", "memory:#console" } }
-- rules = "rules.lua"
