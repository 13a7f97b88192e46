-- /etc/segue/segue.lua: the configuration of the segue service
-- (segue.lua(5); docs/backends.md for every backend's options).
-- Check it with `segue check /etc/segue/segue.lua`, apply it with
-- `systemctl reload segue`. The service runs as the user segue, which can
-- write only /var/lib/segue.

data_dir = "/var/lib/segue"
log_level = "info"

backends = {
  -- A chat service kept in memory, to try the service out.
  memory = { script = "memory", options = { user = "segue" } },

  -- An IRC network over TLS (IRCv3 features are used where the server
  -- offers them):
  --   libera = { script = "irc", options = { host = "irc.libera.chat", port = 6697,
  --     tls = true, nick = "my-bridge", sasl_user = "my-bridge",
  --     sasl_password = os.getenv("IRC_PASSWORD") } },
  -- A program speaking the backend protocol; secrets in an env_file only
  -- root and segue can read:
  --   chat = { cmd = "/usr/local/bin/my-backend", env_file = "/etc/segue/chat.env" },
}

-- Which message goes where (docs/routing.md), reloaded on `systemctl reload segue`:
-- rules = "/etc/segue/rules.lua"
