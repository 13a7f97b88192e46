"""A store write the PostgreSQL engine runs again after a lost connection
applies once (docs/scaling.md, "Writes run again"), against a real
PostgreSQL 15 started here (pg_server.py).

segue reaches the server through a proxy on a Unix socket (CutProxy). Armed
with a piece of SQL, the proxy forwards the next statement containing it,
holds the server's answer until its ReadyForQuery (sent after the commit),
drops it and closes the connection: the statement committed, the client
never heard. That is the window where the engine must run the statement
again (it cannot know it committed) and where a plain INSERT applied twice:
- `segue user add` whose insert is cut: the command succeeds with its
  token, and the user has exactly that one token (before: "a user of that
  name exists", though the user was made); also when the connection breaks
  while the insert is still running on the server, so that the second run
  waits for the first (before: "exists" again);
- the client API's event log while messages stream in, cut three times on
  an event append: every message is in the log exactly once (before: the
  cut events twice);
- the postbox's appends (outbox, inbox, a Push's inbox row), each cut once
  in a stream of 20: every event queued exactly once;
- a failed delivery's attempt count, cut once: counted once (before: twice,
  so the event went to dead_letters one attempt early)."""
import hashlib
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import unittest

import pg_server
from harness import SEGUE, LogTail, inject_lua, run, say, wait_for, write

READY_FOR_QUERY = b"Z\x00\x00\x00\x05"  # the protocol's ReadyForQuery: 'Z', length 5

# The postbox on the store, its peers down: `mode` out appends to the
# outbox (pb:push), in to the inbox (pb:receive), push one event at a time
# (pb:receive_push, a Push's path); one event a loop turn or so, so they are
# several statements. Prints how many were acknowledged. Every delivery
# fails (once: the next attempt is 10 minutes away); mode fail receives its
# events and waits for the first failure to be written: a store call made
# after it is answered after it (the engine answers in call order, a
# statement sent again included).
POSTBOX_SCRIPT = """
local segue = require "segue"
local core = require "segue.postbox_core"
local dsn, mode, n = ...
n = tonumber(n)
local db = assert(require("segue.store").open { engine = "postgresql", dsn = dsn })
local acked, failed = 0, 0
local pb = assert(core.new(db, { push_tries = 1, push_backoff_ms = 600000, deliver_tries = 1000,
  deliver_backoff_ms = 600000 }, {
  push = function(_, _, done) done("down") end,
  deliver = function() failed = failed + 1; return nil, "not now" end }))
local function ack(ok) if ok then acked = acked + 1 end end
segue.await(function()
  for i = 1, n do
    local ev = mode .. " " .. i
    if mode == "out" then
      local r = assert(pb:push("out.example", ev, ack))
      if r == "queued" then acked = acked + 1 end
    elseif mode == "in" or mode == "fail" then
      assert(pb:receive("in.example", { ev }, ack))
    else
      local r = assert(pb:receive_push("in.example", ev, function(ok) ack(ok) end))
      if r == "held" then acked = acked + 1 end
    end
    segue.sleep(3)
  end
  for _ = 1, 3000 do
    if acked == n then break end
    segue.sleep(10)
  end
  if mode == "fail" then
    for _ = 1, 3000 do
      if failed > 0 then break end
      segue.sleep(10)
    end
    assert(failed > 0, "no delivery was attempted")
    db:kv_get("after the failure")
  end
end, 60000)
print("acknowledged " .. acked)
pb:close()
"""


class CutProxy:
    """PostgreSQL's protocol passed through between a Unix socket in its own
    directory (a libpq host=) and the server's socket."""

    def __init__(self, target):
        self.dir = tempfile.mkdtemp(prefix="segue-pgcut-")
        os.chmod(self.dir, 0o755)
        self.target = target
        self.lock = threading.Lock()
        self.armed = None
        self.at_once = False
        self.cuts = 0
        self.socks = set()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(os.path.join(self.dir, ".s.PGSQL.5432"))
        self.listener.listen(64)
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def arm(self, sql, at_once=False):
        """The next statement containing `sql` (bytes) commits unheard; with
        at_once, its connection is closed as soon as it has passed, while
        the server may still be running it."""
        with self.lock:
            self.armed = sql
            self.at_once = at_once

    def fired(self):
        with self.lock:
            return self.cuts

    def _accept(self):
        while True:
            try:
                c, _ = self.listener.accept()
            except OSError:
                return
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(self.target)
            except OSError:
                c.close()
                continue
            state = {"doomed": False, "tail": b""}
            with self.lock:
                self.socks.update((c, s))
            threading.Thread(target=self._up, args=(c, s, state), daemon=True).start()
            threading.Thread(target=self._down, args=(s, c, state), daemon=True).start()

    def _close(self, *socks):
        for x in socks:
            try:
                x.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            x.close()
            with self.lock:
                self.socks.discard(x)

    def _up(self, c, s, state):
        """Client to server; marks the connection when the armed SQL passes."""
        while True:
            try:
                data = c.recv(65536)
            except OSError:
                data = b""
            if not data:
                return self._close(c, s)
            with self.lock:
                seen = state["tail"] + data
                at_once = False
                if self.armed and self.armed in seen:
                    state["doomed"] = True
                    at_once = self.at_once
                    self.armed = None
                state["tail"] = seen[-256:]
            try:
                s.sendall(data)
            except OSError:
                return self._close(c, s)
            if at_once:
                with self.lock:
                    self.cuts += 1
                return self._close(c, s)

    def _down(self, s, c, state):
        """Server to client; a marked connection's answer is held, then
        dropped with the connection once the server is ready again."""
        held = b""
        while True:
            try:
                data = s.recv(65536)
            except OSError:
                data = b""
            if not data:
                return self._close(c, s)
            with self.lock:
                doomed = state["doomed"]
            if doomed:
                held += data
                if READY_FOR_QUERY in held:
                    with self.lock:
                        self.cuts += 1
                    return self._close(c, s)
                continue
            try:
                c.sendall(data)
            except OSError:
                return self._close(c, s)

    def close(self):
        self.listener.close()
        with self.lock:
            socks = list(self.socks)
        self._close(*socks)
        self.thread.join(5)
        shutil.rmtree(self.dir, ignore_errors=True)


class Retry(pg_server.SegueDbTest):
    sql_check = False

    def setUp(self):
        super().setUp()  # self.dsn: straight to the server, for the checks
        self.proxy = CutProxy(os.path.join(self.pg.dir, ".s.PGSQL.5432"))
        self.addCleanup(self.proxy.close)

    def config(self, body=""):
        # Through the proxy: libpq's host= is the directory of the socket.
        dsn = "host=%s user=segue dbname=segue" % self.proxy.dir
        return write(os.path.join(self.dir, "segue.lua"), """
data_dir = %s
instance = "one"
store = { engine = "postgresql", dsn = %s }
%s
""" % (json.dumps(os.path.join(self.dir, "data")), json.dumps(dsn), body))

    def test_user_add_whose_answer_is_lost(self):
        self.config()
        self.proxy.arm(b"INSERT INTO api_users")
        r = run(["user", "add", "alice", "segue.lua"], cwd=self.dir, timeout=90)
        self.assertEqual(self.proxy.fired(), 1, (r.stdout, r.stderr))
        self.assertEqual(r.code, 0, r.stderr)
        token = re.search(r"^token (\S+)$", r.stdout, re.M).group(1)
        # One user, and the one token is the one printed.
        self.assertEqual(self.sql("SELECT count(*) FROM api_users WHERE name = 'alice'"), "1")
        self.assertEqual(self.sql("SELECT hash FROM api_tokens WHERE user_name = 'alice'"),
                         hashlib.blake2b(token.encode(), digest_size=32).hexdigest())
        # Another add of the name (another token) is still refused.
        r = run(["user", "add", "alice", "segue.lua"], cwd=self.dir, timeout=90)
        self.assertEqual(r.code, 1, r.stdout)
        self.assertIn("a user of that name exists", r.stderr)
        self.assertEqual(self.sql("SELECT count(*) FROM api_tokens WHERE user_name = 'alice'"), "1")

    def test_user_add_sent_again_while_its_first_run_waits(self):
        """The connection breaks while the first run is still executing (it
        waits for a lock the test holds); the second run waits for the
        first, whose user it then cannot see in the snapshot it began with."""
        self.config()
        r = run(["user", "add", "alice", "segue.lua"], cwd=self.dir, timeout=90)  # the schema
        self.assertEqual(r.code, 0, r.stderr)
        holder = subprocess.Popen(["psql", "-X", "-q", "-A", "-t", "-d", self.dsn],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)

        def release():
            if holder.poll() is None:
                holder.communicate("COMMIT;\n", timeout=30)
        self.addCleanup(release)
        holder.stdin.write("BEGIN;\nLOCK TABLE api_tokens IN SHARE MODE;\nSELECT 'locked';\n")
        holder.stdin.flush()
        self.assertTrue(select.select([holder.stdout], [], [], 30)[0], "psql took no lock in 30 s")
        self.assertEqual(holder.stdout.readline().strip(), "locked")
        self.proxy.arm(b"INSERT INTO api_users", at_once=True)
        add = subprocess.Popen([SEGUE, "user", "add", "bob", "segue.lua"], cwd=self.dir,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.addCleanup(lambda: add.poll() is None and (add.kill(), add.wait()))
        # Both runs wait: the first for the lock, the second for the first.
        waiting = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'" \
                  " AND query LIKE '%INSERT INTO api_users%'"
        self.assertTrue(wait_for(lambda: self.sql(waiting) == "2", 60), self.sql(waiting))
        self.assertEqual(self.proxy.fired(), 1)
        release()
        out, err = add.communicate(timeout=90)
        self.assertEqual(add.returncode, 0, err)
        token = re.search(r"^token (\S+)$", out, re.M).group(1)
        self.assertEqual(self.sql("SELECT hash FROM api_tokens WHERE user_name = 'bob'"),
                         hashlib.blake2b(token.encode(), digest_size=32).hexdigest())

    def test_postbox_appends_through_lost_answers(self):
        write(os.path.join(self.dir, "postbox.lua"), POSTBOX_SCRIPT)
        dsn = "host=%s user=segue dbname=segue" % self.proxy.dir
        cuts = 0
        for mode, table, sql in (("out", "outbox", b"INSERT INTO outbox"),
                                 ("in", "inbox", b"INSERT INTO inbox"),
                                 ("push", "inbox", b"INSERT INTO inbox")):
            self.proxy.arm(sql)
            r = run(["exec", "postbox.lua", dsn, mode, "20"], cwd=self.dir, timeout=120)
            cuts += 1
            self.assertEqual(self.proxy.fired(), cuts, (mode, r.stdout, r.stderr))
            self.assertEqual(r.code, 0, r.stderr)
            self.assertIn("acknowledged 20", r.stdout)
            rows = self.sql("SELECT convert_from(event, 'UTF8') FROM %s WHERE"
                            " convert_from(event, 'UTF8') LIKE '%s %%'" % (table, mode)).split("\n")
            # Each event once: none lost, none twice.
            self.assertEqual(sorted(rows), sorted("%s %d" % (mode, i) for i in range(1, 21)),
                             (mode, r.stdout, r.stderr))

    def test_failed_delivery_counted_once_through_a_lost_answer(self):
        write(os.path.join(self.dir, "postbox.lua"), POSTBOX_SCRIPT)
        dsn = "host=%s user=segue dbname=segue" % self.proxy.dir
        self.proxy.arm(b"UPDATE inbox SET attempts")
        r = run(["exec", "postbox.lua", dsn, "fail", "1"], cwd=self.dir, timeout=120)
        self.assertEqual(self.proxy.fired(), 1, (r.stdout, r.stderr))
        self.assertEqual(r.code, 0, r.stderr)
        self.assertIn("acknowledged 1", r.stdout)
        self.assertEqual(self.sql("SELECT attempts || ' ' || last_error FROM inbox"
                                  " WHERE convert_from(event, 'UTF8') = 'fail 1'"), "1 not now")

    def test_event_log_through_lost_answers(self):
        write(os.path.join(self.dir, "inject.lua"), inject_lua(only_running=True))
        write(os.path.join(self.dir, "rules.lua"), "return {}\n")
        self.config('backends = { a = { script = "memory" } }\nrules = "rules.lua"\n'
                    'scripts = { "inject.lua" }\nhttp = { listen = "127.0.0.1:0" }\n')
        p = subprocess.Popen([SEGUE, "run", "segue.lua"], cwd=self.dir, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
        tail = LogTail(p)

        def stop():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            tail.thread.join(5)
            p.stderr.close()
        self.addCleanup(stop)
        self.assertTrue(tail.wait_for("running with", 60), tail.text())

        def logged():
            """How many times each message is in the API's event log."""
            rows = self.sql("SELECT value_json FROM api_events WHERE type = 'MessageUpsert'")
            n = {}
            for m in re.findall(r"msg (\d+)", rows):
                n[int(m)] = n.get(int(m), 0) + 1
            return n

        said = 0
        for cut in range(4):
            for _ in range(10):
                say(self.dir, "a", "#general", "ann", "msg %d" % said)
                said += 1
            self.assertTrue(wait_for(lambda: len(logged()) == said, 60), (logged(), tail.text()))
            if cut < 3:  # the next batch streams in while one append is cut
                self.proxy.arm(b"INSERT INTO api_events")
        self.assertEqual(self.proxy.fired(), 3, tail.text())
        counts = logged()
        self.assertEqual(sorted(counts), list(range(said)))  # nothing lost
        self.assertEqual({k: v for k, v in counts.items() if v != 1}, {}, tail.text())  # none twice
        # The log's rows, by the same message: one each too.
        self.assertEqual(self.sql("SELECT count(*) FROM messages WHERE backend = 'a'"), str(said))


if __name__ == "__main__":
    unittest.main()
