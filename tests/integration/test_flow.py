"""Seeing messages flow (issue 19): `segue watch` prints each message in and
each copy out (or dropped, or failed) of a running segue; `segue status`
counts them per backend and per bridge; the log says when a bridge first
carries a message and on every failure; `segue exec` warns of a request to
a backend that does not exist; `segue key` says what to set without a
server_id; a line written by hand into a note is bridged."""
import json
import os
import signal
import subprocess
import threading
import time
import unittest

from harness import SEGUE, LogTail, run, run_lua, tmpdir, wait_for, write
from test_router import Bridge

# A service that finds every room but refuses every message.
REFUSE = r"""
local backend = ...
return {
  RoomLookup = function(name) return name end,
  RoomJoin = function() return true end,
  MessageSend = function() return nil, "refused by the service" end,
}
"""

RULES = r"""
return {
  bridge { "a:#x", "b:#x", filter = function(msg, ctx) return not ctx.text:find("secret") end },
  bridge { name = "broken", "a:#y", "bad:#y" },
}
"""


class Watcher:
    """`segue watch CONFIG` with its stdout lines and stderr collected."""

    def __init__(self, test, cwd, config="cfg.lua"):
        self.p = subprocess.Popen([SEGUE, "watch", config], cwd=cwd, stdin=subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        test.addCleanup(self.stop)
        self.lines = []
        self.err = LogTail(self.p)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.p.stdout:
            self.lines.append(line.rstrip("\n"))

    def has(self, *parts):
        return any(all(p in line for p in parts) for line in list(self.lines))

    def stop(self):
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(5)
        self.p.stdout.close()
        self.p.stderr.close()


def status(d):
    r = run(["status", "cfg.lua"], cwd=d)
    assert r.code == 0, r.stderr
    return json.loads(r.stdout)


class Flow(unittest.TestCase):
    def test_watch_status_counters_and_the_log_show_each_message_and_copy(self):
        d = tmpdir()
        write(os.path.join(d, "refuse.lua"), REFUSE)
        b = Bridge(self, RULES, backends="""
            a = { script = "memory" }, b = { script = "memory" }, bad = { script = "refuse.lua" },
        """, d=d)
        w = Watcher(self, d)
        self.assertTrue(w.err.wait_for("watching segue (pid %d" % b.p.pid, 20), w.err.text())
        b.say("a", "#x", "alice", "hello")
        b.say("a", "#x", "alice", "a secret")
        b.say("a", "#y", "alice", "doomed")
        b.say("a", "#x", "alice", "again")
        self.assertTrue(wait_for(lambda: w.has("sent", "again"), 20), w.lines)
        self.assertTrue(w.has("in      a:#x  <alice> hello"), w.lines)
        self.assertTrue(w.has("sent    b:#x  <alice@a> hello  bridge=bridge1 from=a  ok"), w.lines)
        self.assertTrue(w.has("dropped a:#x  <alice> a secret  bridge=bridge1  filtered"), w.lines)
        self.assertTrue(w.has("failed  bad:#y  <alice@a> doomed  bridge=broken from=a", "refused by the service"),
                        w.lines)
        self.assertFalse(w.has("sent", "a secret"), w.lines)
        # the copies b announces are not new messages
        self.assertFalse(w.has("in      b:"), w.lines)

        want = {"bridge1": {"in": 3, "sent": 2, "failed": 0, "dropped": 1, "degraded": 0},
                "broken": {"in": 1, "sent": 0, "failed": 1, "dropped": 0, "degraded": 0}}
        self.assertTrue(wait_for(lambda: status(d).get("counters", {}).get("bridges") == want, 10),
                        status(d).get("counters"))
        backends = status(d)["counters"]["backends"]
        self.assertEqual(backends["a"]["in"], 4)
        self.assertEqual(backends["a"]["dropped"], 1)
        self.assertEqual(backends["b"]["sent"], 2)
        self.assertEqual(backends["bad"]["failed"], 1)

        err = b.stop()
        self.assertEqual(err.count("bridge bridge1 carried its first message: a -> b:#x"), 1, err)
        self.assertNotIn("bridge broken carried", err)
        self.assertIn("bad:#y failed", err)
        self.assertIn("refused by the service", err)

    def test_watch_says_when_no_segue_runs(self):
        d = tmpdir()
        write(os.path.join(d, "cfg.lua"), 'data_dir = "data"\nbackends = { a = { script = "memory" } }\n')
        w = Watcher(self, d)
        self.assertTrue(w.err.wait_for("no segue is running with data in", 15), w.err.text())
        self.assertEqual(w.lines, [])

    def test_a_line_written_into_a_note_is_bridged(self):
        d = tmpdir()
        b = Bridge(self, 'return { bridge { "notes:log", "a:#x" } }', backends="""
            a = { script = "memory" }, notes = { script = "notes", options = { dir = "notes" } },
        """, d=d)
        with open(os.path.join(d, "notes", "log.jsonl"), "a") as f:
            f.write("buy milk\n")
        self.assertTrue(wait_for(lambda: "<me@notes> buy milk" in b.texts("a"), 15), b.seen())
        m = {"id": "x", "sender": "bob", "recipient": "log", "attachments": [], "create_time": 1,
             "edit_time": 1, "content": {"type": "Text", "value": "as JSON"}}
        with open(os.path.join(d, "notes", "log.jsonl"), "a") as f:
            f.write(json.dumps(m) + "\n")
        self.assertTrue(wait_for(lambda: "<bob@notes> as JSON" in b.texts("a"), 15), b.seen())
        # what the bridge wrote into the note is not picked up again
        b.say("a", "#x", "carol", "into the note")
        self.assertTrue(wait_for(lambda: any("into the note" in t for t in b.texts("notes")), 15))
        time.sleep(0.5)
        self.assertEqual(sum("into the note" in t for t in b.texts("a")), 1, b.texts("a"))
        b.stop()


class Hints(unittest.TestCase):
    def test_exec_warns_of_a_request_to_a_backend_that_does_not_exist(self):
        r = run_lua("""
            assert(segue.add_backend("memory", { script = "memory" }))
            local body, err, code = segue.await(function()
              return segue.backend("nope"):request { type = "RoomLookup", value = "#a" }
            end, 5000)
            out { err = err, code = code }
        """)
        self.assertEqual(r.code, 0, r.stderr)
        self.assertEqual(r.values()[-1]["code"], "ENOBACKEND")
        self.assertIn('level=warn', r.stderr)
        self.assertIn('request to backend \\"nope\\": there is no backend of that name (backends: memory)',
                      r.stderr)

    def test_key_without_server_id_says_what_to_set(self):
        d = tmpdir()
        write(os.path.join(d, "cfg.lua"), 'data_dir = "data"\n')
        r = run(["key", "cfg.lua"], cwd=d)
        self.assertEqual(r.code, 0, r.stderr)
        self.assertIn("server_id (not set)", r.stdout)
        self.assertIn("the config sets no server_id", r.stderr)
        self.assertIn('server_id = "chat.example.org:2289"', r.stderr)
        write(os.path.join(d, "cfg.lua"), 'data_dir = "data"\nserver_id = "a.example:2289"\n')
        r = run(["key", "cfg.lua"], cwd=d)
        self.assertEqual(r.code, 0, r.stderr)
        self.assertIn("server_id a.example:2289", r.stdout)
        self.assertNotIn("server_id", r.stderr)

    def test_the_demo_banner_shows_a_backend_and_a_rule(self):
        r = run(["config", "--default"])
        self.assertIn('irc = { script = "irc"', r.stdout)
        self.assertIn('return { bridge { "irc:#my-channel", "memory:#console" } }', r.stdout)
        self.assertIn("segue watch", r.stdout)


if __name__ == "__main__":
    unittest.main()
