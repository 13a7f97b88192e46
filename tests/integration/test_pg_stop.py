"""A clean stop keeps the store writes made before it (docs/scaling.md, "A
clean stop"), against a real PostgreSQL 15 started here (pg_server.py):
- `segue exec` whose script makes hundreds of writes without waiting for
  them and returns: every one is in the database after segue exits;
- `segue run` stopped by SIGTERM, whose script makes writes as it stops,
  some with callbacks and some in coroutines that write again each time one
  is answered: every one is in the database;
- the same `segue exec` on SQLite keeps them all too;
- with the PostgreSQL server down, SIGTERM still ends segue: it waits for
  the unanswered writes for a bounded time, then logs how many it drops."""
import json
import os
import re
import signal
import sqlite3
import subprocess
import unittest

import pg_server
from harness import SEGUE, LogTail, run, wait_for, write

N_CB = 300          # writes with a callback, made at once
N_CO, N_SEQ = 20, 5  # coroutines, each writing N_SEQ times in a row

EXEC_SCRIPT = """
local store = require "segue.store"
local dsn, path, prefix, n = ...
local db = assert(store.open(dsn ~= "" and { engine = "postgresql", dsn = dsn } or path))
for i = 1, tonumber(n) do
  assert(db:kv_set(prefix .. i, tostring(i), function(ok, err) if not ok then print(err) end end))
end
print("issued " .. n)
"""

# A script of `segue run`: its own store, written to as segue stops.
STOP_SCRIPT = """
local segue = require "segue"
local db = assert(require("segue.store").open { engine = "postgresql", dsn = %s })
segue.on("stopping", function()
  for i = 1, %d do
    db:kv_set("stop.cb." .. i, tostring(i), function() end)
  end
  for c = 1, %d do
    segue.spawn(function()
      for j = 1, %d do db:kv_set(("stop.co.%%d.%%d"):format(c, j), "x") end
    end)
  end
  segue.log.info("stop writes issued")
end)
"""


class CleanStop(pg_server.SegueDbTest):
    def setUp(self):
        super().setUp()
        write(os.path.join(self.dir, "writes.lua"), EXEC_SCRIPT)

    def count(self, like):
        return int(self.sql("SELECT count(*) FROM kv WHERE key LIKE '%s'" % like))

    def start(self, script_body):
        script = write(os.path.join(self.dir, "stop.lua"), script_body)
        cfg = write(os.path.join(self.dir, "c.lua"), """
data_dir = %s
instance = "one"
store = { engine = "postgresql", dsn = %s }
scripts = { %s }
""" % (json.dumps(os.path.join(self.dir, "data")), json.dumps(self.dsn), json.dumps(script)))
        p = subprocess.Popen([SEGUE, "run", cfg], cwd=self.dir, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
        tail = LogTail(p)

        def stop():
            if p.poll() is None:
                p.kill()
                p.wait()
            tail.thread.join(5)
            p.stderr.close()
        self.addCleanup(stop)
        # Running, and the store migrated (the instance beat is in it).
        self.assertTrue(wait_for(lambda: p.poll() is None and self.sql(
            "SELECT count(*) FROM pg_tables WHERE tablename = 'instances'") == "1" and self.sql(
            "SELECT count(*) FROM instances") == "1", 60), tail.text())
        return p, tail

    def test_exec_writes_made_just_before_it_ends_are_kept(self):
        r = run(["exec", "writes.lua", self.dsn, "", "exec.", "500"], cwd=self.dir, timeout=120)
        self.assertEqual(r.code, 0, r.stdout + r.stderr)
        self.assertIn("issued 500", r.stdout)
        self.assertNotIn("dropped", r.stderr)
        self.assertEqual(self.count("exec.%"), 500, r.stderr)

    def test_exec_on_sqlite_keeps_them_too(self):
        path = os.path.join(self.dir, "s.db")
        r = run(["exec", "writes.lua", "", path, "sq.", "500"], cwd=self.dir, timeout=120)
        self.assertEqual(r.code, 0, r.stdout + r.stderr)
        with sqlite3.connect(path) as db:
            n = db.execute("SELECT count(*) FROM kv WHERE key LIKE 'sq.%'").fetchone()[0]
        self.assertEqual(n, 500)

    def test_sigterm_keeps_the_writes_made_as_segue_stops(self):
        p, tail = self.start(STOP_SCRIPT % (json.dumps(self.dsn), N_CB, N_CO, N_SEQ))
        p.send_signal(signal.SIGTERM)
        self.assertEqual(p.wait(60), 0, tail.text())
        tail.thread.join(5)
        log = tail.text()
        self.assertIn("stop writes issued", log)
        self.assertNotIn("dropped", log)
        self.assertEqual(self.count("stop.cb.%"), N_CB, log)
        # Each coroutine's later writes were made while segue was stopping,
        # after the earlier ones were answered.
        self.assertEqual(self.count("stop.co.%"), N_CO * N_SEQ, log)

    def test_sigterm_with_postgresql_down_ends_within_the_bound(self):
        p, tail = self.start(STOP_SCRIPT % (json.dumps(self.dsn), N_CB, 0, 0))
        self.pg.stop()
        p.send_signal(signal.SIGTERM)
        # The wait is bounded (5 s); without a bound, the writes would wait
        # for the server for minutes (the engine gives up after ~120 tries).
        try:
            code = p.wait(40)
        except subprocess.TimeoutExpired:
            self.fail("segue did not stop with PostgreSQL down:\n" + tail.text())
        tail.thread.join(5)
        log = tail.text()
        self.assertEqual(code, 0, log)
        self.assertIn("stop writes issued", log)
        m = re.search(r"closing: (\d+) store operation\(s\) still not answered after 5 s", log)
        self.assertIsNotNone(m, log)
        self.assertGreaterEqual(int(m.group(1)), N_CB, log)
        m = re.search(r"store=postgresql msg=\"closed with (\d+) operation\(s\) not answered: they are dropped", log)
        self.assertIsNotNone(m, log)
        self.assertGreaterEqual(int(m.group(1)), N_CB, log)


if __name__ == "__main__":
    unittest.main()
