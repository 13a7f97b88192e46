"""Helpers for the postbox tests: a sender script driven through a command
file, and reading a node's store with Python's sqlite3."""
import json
import os
import sqlite3

from fed_util import Node, HANDLER, LUA_U64
from harness import whole_lines, write, wait_for

# A's script: every line appended to $POSTBOX_CMDS ({"to": id, "id": n}) is
# pushed as UserAddedToGuild{user_id = n}; each outcome is appended to
# $POSTBOX_ACKS ({"id": n, "how": "pushed"|"queued"} or {"id": n, "err": ...}).
SENDER = """
local segue = require "segue"
local json = require "segue.json"
local cmds, acks = assert(os.getenv("POSTBOX_CMDS")), assert(os.getenv("POSTBOX_ACKS"))
local done = 0
local function ack(t)
  local f = assert(io.open(acks, "a"))
  f:write(json.encode(t), "\\n")
  f:close()
end
segue.every(20, function()
  local f = io.open(cmds)
  if not f then return end
  local n = 0
  -- Only whole lines: the test may be writing the last one right now.
  for line in f:lines("L") do
    if line:sub(-1) ~= "\\n" then break end
    n = n + 1
    if n > done then
      done = n
      local c = json.decode(line)
      local ok, err = segue.postbox.push(c.to, { user_added_to_guild = { user_id = c.id, guild_id = 1 } },
        function(how, e) ack { id = c.id, how = how, err = e } end)
      if not ok then ack { id = c.id, err = err } end
    end
  end
  f:close()
end)
"""


class PostboxNode(Node):
    def __init__(self, server_id, federation=None, sender=False, port=None, script=None):
        scripts = []
        super().__init__(server_id, federation=federation, scripts=scripts, port=port)
        self.cmds = os.path.join(self.dir, "cmds.jsonl")
        self.acks = os.path.join(self.dir, "acks.jsonl")
        handler = write(os.path.join(self.dir, "handler.lua"), HANDLER)
        scripts.append(handler)
        if sender:
            scripts.append(write(os.path.join(self.dir, "sender.lua"), SENDER))
        if script:  # one more script of the test's
            scripts.append(write(os.path.join(self.dir, "extra.lua"), script))
        # The config was written by Node.__init__ without the scripts' paths.
        with open(self.config) as f:
            text = f.read()
        text = text.replace("scripts = {}", "scripts = {%s}" % ", ".join(json.dumps(s) for s in scripts))
        write(self.config, text)
        self.env.update(POSTBOX_CMDS=self.cmds, POSTBOX_ACKS=self.acks)

    def push(self, to, ids):
        with open(self.cmds, "a") as f:
            for i in ids:
                f.write(json.dumps({"to": to, "id": i}) + "\n")

    def read_acks(self):  # whole lines only: the node may be writing one
        return [json.loads(line) for line in whole_lines(self.acks) if line.strip()]

    def received_ids(self):
        return [int(e["event"]["user_added_to_guild"]["user_id"]) for e in self.read_events()
                if "user_added_to_guild" in e["event"]]

    def db(self, sql, args=()):
        path = os.path.join(self.dir, "data", "segue.db")
        con = sqlite3.connect(path, timeout=10)
        try:
            return con.execute(sql, args).fetchall()
        finally:
            con.close()

    def queued(self, peer):
        return self.db("SELECT count(*) FROM outbox WHERE peer = ?", (peer,))[0][0]

    def wait_acks(self, n, timeout=30):
        return wait_for(lambda: len(self.read_acks()) >= n, timeout)
