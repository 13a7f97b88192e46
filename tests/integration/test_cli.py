"""The segue command line: version, help, the default config, check, run and
its signals, through the real binary."""
import json
import os
import signal
import subprocess
import time
import unittest

from harness import SEGUE, PYTHON, FAKE, run, tmpdir, write, wait_for, LogTail


def read(path):
    with open(path) as f:
        return f.read()


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is gone for our purposes
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


class Basics(unittest.TestCase):
    def test_version_and_help(self):
        r = run(["--version"])
        self.assertEqual(r.code, 0)
        self.assertRegex(r.stdout, r"^segue \d+\.\d+\.\d+\n$")
        r = run(["--help"])
        self.assertEqual(r.code, 0)
        for word in ("run [CONFIG]", "check CONFIG", "backend FILE.lua", "config --default"):
            self.assertIn(word, r.stdout)

    def test_an_unknown_command_is_an_error_with_usage(self):
        r = run(["frobnicate"])
        self.assertEqual(r.code, 2)
        self.assertIn("unknown command frobnicate", r.stderr)

    def test_the_default_config_prints_and_passes_check(self):
        r = run(["config", "--default"])
        self.assertEqual(r.code, 0)
        self.assertIn("data_dir", r.stdout)
        d = tmpdir()
        path = write(os.path.join(d, "default.lua"), r.stdout)
        c = run(["check", path], cwd=d)
        self.assertEqual(c.code, 0, c.stderr)
        self.assertIn("ok", c.stdout)


class Check(unittest.TestCase):
    def test_every_problem_is_reported_with_file_and_line(self):
        d = tmpdir()
        path = write(os.path.join(d, "bad.lua"), "\n".join([
            'data_dir = "data"',
            'log_level = "loud"',
            'colour = "blue"',
            'backends = {',
            '  irc = {',
            '    cmd = "no-such-program-anywhere",',
            '    args = { "a", 2 },',
            '    env_file = "missing.env",',
            '  },',
            '  notes = { script = "missing.lua", options = 3 },',
            '  both = { cmd = "sh", script = "memory" },',
            '}',
            'scripts = { "nope.lua" }',
            'replay_window_ms = -1',
        ]) + "\n")
        r = run(["check", path], cwd=d)
        self.assertEqual(r.code, 1)
        err = r.stderr
        expect = [
            'bad.lua:2: log_level: expected error, warn, info or debug, found string "loud"',
            'bad.lua:3: colour: unknown key',
            'bad.lua:6: backends.irc.cmd: program "no-such-program-anywhere" not found in PATH',
            'bad.lua:7: backends.irc.args.[2]: expected a string, found number 2',
            'bad.lua:8: backends.irc.env_file: cannot read env file',
            'bad.lua:10: backends.notes.options: expected a table, found number 3',
            'bad.lua:10: backends.notes.script: cannot read',
            'bad.lua:11: backends.both: has both cmd and script',
            'bad.lua:13: scripts.[1]:',
            'bad.lua:14: replay_window_ms: expected an integer from 0 to 3600000 (milliseconds), found number -1',
        ]
        for e in expect:
            self.assertIn(e, err)

    def test_a_syntax_error_names_file_and_line(self):
        d = tmpdir()
        path = write(os.path.join(d, "syntax.lua"), 'data_dir = "x"\nbackends = {\n  a = { cmd = }\n}\n')
        r = run(["check", path])
        self.assertEqual(r.code, 1)
        self.assertRegex(r.stderr, r"syntax\.lua:3: unexpected symbol")

    def test_the_sandbox_has_no_io(self):
        d = tmpdir()
        path = write(os.path.join(d, "evil.lua"), 'io.open("/tmp/x", "w")\n')
        r = run(["check", path])
        self.assertEqual(r.code, 1)
        self.assertIn("evil.lua:1: attempt to index a nil value (global 'io')", r.stderr)

    def test_a_config_that_never_ends_is_stopped(self):
        d = tmpdir()
        path = write(os.path.join(d, "loop.lua"), 'data_dir = "x"\nwhile true do end\n')
        r = run(["check", path], timeout=60)
        self.assertEqual(r.code, 1)
        self.assertIn("loop.lua:2: the config stopped after 1000000 instructions", r.stderr)

    def test_a_config_cannot_change_the_string_library_of_scripts(self):
        d = tmpdir()
        write(os.path.join(d, "s.lua"), 'io.stdout:write(("abc"):upper(), string.upper("x"), "\\n")\n')
        cfg = write(os.path.join(d, "cfg.lua"),
                    'string.upper = function() return "config was here" end\nscripts = { "s.lua" }\n')
        p = subprocess.Popen([SEGUE, "run", cfg], cwd=d, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.addCleanup(lambda: p.poll() is None and p.kill())
        self.assertTrue(wait_for(lambda: os.path.isdir(os.path.join(d, "segue-data"))))
        time.sleep(0.3)
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=15)
        self.assertEqual(out, "ABCX\n", err)

    def test_a_good_config_with_a_returned_table_passes(self):
        d = tmpdir()
        write(os.path.join(d, "my.env"), "A=1\n")
        path = write(os.path.join(d, "good.lua"), """
            return {
              data_dir = "data",
              limits = { request_timeout_ms = 1000 },
              backends = {
                fake = { cmd = %s, args = { %s }, env_file = "my.env", max_line_bytes = 4096 },
                mem = { script = "memory" },
              },
            }
        """ % (json.dumps(PYTHON), json.dumps(FAKE)))
        r = run(["check", path])
        self.assertEqual(r.code, 0, r.stderr)
        self.assertIn("ok (2 backend(s))", r.stdout)


class Run(unittest.TestCase):
    def start(self, args, cwd):
        p = subprocess.Popen([SEGUE] + args, cwd=cwd, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        self.addCleanup(lambda: p.poll() is None and p.kill())
        return p

    def test_sigterm_stops_an_exec_script_waiting_in_the_loop(self):
        # The script runs the loop itself (segue.await): the host must not
        # close the Lua state under it (it did: a use-after-free in
        # segue.loop.run); the script unwinds and the process exits.
        d = tmpdir()
        write(os.path.join(d, "wait.lua"), """
            local segue = require "segue"
            assert(segue.add_backend("m", { script = "memory" }))
            io.stderr:write("waiting\\n")
            segue.await(function() segue.sleep(60000) end, 120000)
            io.stderr:write("not reached\\n")
        """)
        p = self.start(["exec", "wait.lua"], d)
        err = LogTail(p)
        self.assertTrue(err.wait_for("waiting", 30), err.text())
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=30)
        err.thread.join(10)
        self.assertEqual(p.returncode, 1, err.text())  # the script did not finish
        self.assertIn("the host is closing", err.text())
        self.assertNotIn("not reached", err.text())

    def test_the_default_runs_writes_its_data_dir_and_stops_on_sigint(self):
        d = tmpdir()
        p = self.start(["run"], d)
        self.assertTrue(wait_for(lambda: os.path.isdir(os.path.join(d, "segue-data"))))
        time.sleep(0.3)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=15)
        self.assertEqual(p.returncode, 0, err)
        self.assertIn("backend=memory msg=\"started: memory", err)
        self.assertIn("stopping (signal 2)", err)

    def test_sigterm_stops_subprocess_backends_gracefully(self):
        d = tmpdir()
        pidfile = os.path.join(d, "pids")
        write(os.path.join(d, "pids.lua"), """
            local segue = require "segue"
            segue.spawn(function()
              local f = io.open(%s, "w")
              for _, name in ipairs { "a", "b" } do
                local r = segue.backend(name):request { type = "RoomLookup", value = "#pid" }
                f:write(r.value, "\\n")
              end
              f:close()
            end)
        """ % json.dumps(pidfile))
        cfg = write(os.path.join(d, "cfg.lua"), """
            backends = {
              a = { cmd = %s, args = { %s } },
              b = { cmd = %s, args = { %s } },
              m = { script = "memory" },
            }
            scripts = { "pids.lua" }
        """ % (json.dumps(PYTHON), json.dumps(FAKE), json.dumps(PYTHON), json.dumps(FAKE)))
        p = self.start(["run", cfg], d)
        self.assertTrue(wait_for(lambda: os.path.exists(pidfile) and
                                 len(read(pidfile).split()) == 2))
        pids = [int(x) for x in read(pidfile).split()]
        self.assertTrue(all(pid_alive(x) for x in pids))
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=20)
        self.assertEqual(p.returncode, 0, err)
        self.assertFalse(any(pid_alive(x) for x in pids))
        self.assertIn("backend=a msg=\"stopped: exited with status 0\"", err)

    def test_sighup_reloads_the_config_and_keeps_the_old_one_on_errors(self):
        d = tmpdir()
        cfg = os.path.join(d, "cfg.lua")
        write(cfg, 'backends = { m = { script = "memory" } }\n')
        p = self.start(["run", cfg], d)
        log = LogTail(p)
        self.assertTrue(log.wait_for("running with 1 backend(s)"))
        write(cfg, 'backends = { m = { script = "memory" }, n = { script = "memory" } }\n')
        p.send_signal(signal.SIGHUP)
        self.assertTrue(log.wait_for('backend=n msg="started: memory'))
        write(cfg, 'backends = { m = { script = "memory" }, n = { bogus = 1 } }\n')
        p.send_signal(signal.SIGHUP)
        self.assertTrue(log.wait_for("reload failed; the previous config keeps running"))
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=15)
        log.thread.join(5)
        err = log.text()
        self.assertEqual(p.returncode, 0, err)
        self.assertIn("cfg.lua:1: backends.n.bogus: unknown key", err)
        # n kept running after the failed reload: it is stopped only at the end
        self.assertEqual(err.count('backend=n msg="stopped'), 1)

    def test_log_level_flags(self):
        d = tmpdir()
        r = run(["-q", "exec", write(os.path.join(d, "s.lua"),
                 'local s = require "segue" s.log.info("quiet info") s.log.warn("loud warn")')])
        self.assertEqual(r.code, 0, r.stderr)
        self.assertNotIn("quiet info", r.stderr)
        self.assertRegex(r.stderr, r'level=warn src=\S+s\.lua:1 msg="loud warn"')
        r = run(["-v", "exec", write(os.path.join(d, "d.lua"), 'require("segue").log.debug("dbg")')])
        self.assertIn('level=debug', r.stderr)

    def test_a_failing_config_exits_non_zero(self):
        d = tmpdir()
        cfg = write(os.path.join(d, "cfg.lua"), 'backends = { x = {} }\n')
        r = run(["run", cfg], cwd=d)
        self.assertEqual(r.code, 1)
        self.assertIn("cfg.lua:1: backends.x: needs cmd (a program) or script (a Lua backend)", r.stderr)


if __name__ == "__main__":
    unittest.main()
