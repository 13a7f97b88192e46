"""Issue 12 (security and overload), the host's half: every attack here is
reproduced against the real segue binary and must leave it running.
docs/hardening.md has the table: attack, defence, what each test measures."""
import json
import os
import shutil
import signal
import stat
import subprocess
import unittest

from harness import run, run_lua, tmpdir, write, LogTail, PYTHON, HERE, SEGUE

DEEP = os.path.join(HERE, "deep_backend.py")


def deep(depth, extra="max_depth = 300, restart_backoff_ms = 50"):
    return """
        local depths = {}
        segue.on("update", function(name, u)
          local d, x = 0, u.value.extra
          while type(x) == "table" do d, x = d + 1, x.x end
          depths[#depths + 1] = d + 1
        end)
        assert(segue.add_backend("deep", { cmd = %s, args = { %s, "%d" }, %s }))
        out(lookup("deep", "#deep"))
        out(lookup("deep", "#ok"))
        segue.wait(300)
        out({ depths = depths, info = segue.backend("deep"):info() })
    """ % (json.dumps(PYTHON), json.dumps(DEEP), depth, extra)


class DeepValues(unittest.TestCase):
    """Item 1: a backend setting (max_depth = 300) and an Update nested 200
    deep used to abort segue (a raise outside any protected call)."""

    def test_an_update_deeper_than_lua_follows_is_a_violation_not_an_abort(self):
        r = run_lua(deep(200), timeout=60)
        self.assertEqual(r.code, 0, r.stderr)
        self.assertNotIn("PANIC", r.stderr)
        self.assertIn("max_depth 300 capped to 128", r.stderr)
        self.assertIn("nests deeper than 128 levels", r.stderr)
        deep_, lookup, state = r.values()
        self.assertEqual(deep_["code"], "EPROTO", r.stderr)
        self.assertEqual(lookup["body"], {"type": "RoomID", "value": "!ok"}, r.stderr)
        self.assertEqual(state["depths"], [])
        self.assertGreaterEqual(state["info"]["restarts"], 1)

    def test_an_update_as_deep_as_the_cap_arrives_whole(self):
        r = run_lua(deep(120), timeout=60)
        self.assertEqual(r.code, 0, r.stderr)
        deep_, lookup, state = r.values()
        self.assertEqual(deep_["body"]["value"], "!ok", r.stderr)
        self.assertEqual(lookup["body"]["value"], "!ok")
        self.assertEqual(state["depths"], [120])
        self.assertEqual(state["info"]["restarts"], 0)

    def test_json_decode_reports_too_deep_instead_of_raising(self):
        r = run_lua("""
            local v, err = json.decode(("["):rep(200) .. ("]"):rep(200))
            out({ v = v == nil, err = err })
        """)
        self.assertEqual(r.code, 0, r.stderr)
        self.assertEqual(r.values()[0], {"v": True, "err": "JSON nested deeper than 128 levels"})


class Segue:
    """`segue run CONFIG` in its own temporary directory, stopped at exit."""

    def __init__(self, test, d, config="cfg.lua"):
        self.d = d
        self.proc = subprocess.Popen([SEGUE, "run", config], cwd=d, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.log = LogTail(self.proc)
        test.addCleanup(self.stop)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stderr.close()


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


class Files(unittest.TestCase):
    """Item 10: `segue reload` signalled whatever pid a stale pid file held;
    a pre-existing data directory kept mode 0777; database files were 0644."""

    def setUp(self):
        self.d = tmpdir()
        self.addCleanup(shutil.rmtree, self.d, True)
        self.data = os.path.join(self.d, "data")
        write(os.path.join(self.d, "cfg.lua"), 'data_dir = "data"\n')

    def test_the_data_directory_is_made_0700_and_files_are_0600(self):
        os.mkdir(self.data)
        os.chmod(self.data, 0o777)
        s = Segue(self, self.d)
        self.assertTrue(s.log.wait_for("running with"), s.log.text())
        self.assertEqual(mode(self.data), 0o700)
        self.assertIn("had mode 777; made it 0700", s.log.text())
        for name in ("segue.db", "segue.pid"):
            self.assertEqual(mode(os.path.join(self.data, name)), 0o600, name)
        with open(os.path.join(self.data, "segue.pid")) as f:
            self.assertEqual(int(f.read()), s.proc.pid)

    def test_reload_refuses_a_stale_pid_file_and_signals_no_one(self):
        s = Segue(self, self.d)
        self.assertTrue(s.log.wait_for("running with"), s.log.text())
        s.proc.kill()  # kill -9: the pid file stays behind
        s.proc.wait(timeout=20)
        victim = subprocess.Popen([PYTHON, "-c", "import time; time.sleep(60)"])
        self.addCleanup(victim.wait)
        self.addCleanup(victim.kill)
        write(os.path.join(self.data, "segue.pid"), "%d\n" % victim.pid)
        r = run(["reload", "cfg.lua"], cwd=self.d, timeout=30)
        self.assertEqual(r.code, 1, r.stdout + r.stderr)
        self.assertIn("is stale: no process holds its lock", r.stderr)
        self.assertIsNone(victim.poll(), "the process named by the stale pid file got a signal")

    def test_reload_signals_the_running_segue_and_a_second_one_refuses_to_start(self):
        s = Segue(self, self.d)
        self.assertTrue(s.log.wait_for("running with"), s.log.text())
        second = run(["run", "cfg.lua"], cwd=self.d, timeout=30)
        self.assertEqual(second.code, 1)
        self.assertIn("is locked by process %d: another segue runs with this data directory"
                      % s.proc.pid, second.stderr)
        r = run(["reload", "cfg.lua"], cwd=self.d, timeout=30)
        self.assertEqual(r.code, 0, r.stderr)
        self.assertIn("asked segue (pid %d) to reload" % s.proc.pid, r.stdout)
        self.assertTrue(s.log.wait_for("reloaded cfg.lua"), s.log.text())
        self.assertIsNone(s.proc.poll())


if __name__ == "__main__":
    unittest.main()
