"""segue under systemd, without systemd: the notification protocol spoken to
a socket the test listens on (READY=1, RELOADING=1 on SIGHUP, STOPPING=1,
WATCHDOG=1), journald logging without time=, and `systemd-analyze verify`
on the unit in examples/systemd/ (which the Debian package installs)."""
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import unittest

from harness import SEGUE, tmpdir, write

SOURCE = os.environ.get("SEGUE_SOURCE_DIR") or os.path.join(os.path.dirname(__file__), "..", "..")
UNIT = os.path.join(SOURCE, "examples", "systemd", "segue.service")
ANALYZE = shutil.which("systemd-analyze")

CONFIG = """
data_dir = "data"
backends = { memory = { script = "memory" } }
scripts = { "probe.lua" }
"""
# What a backend started by segue would inherit.
PROBE = """
io.stdout:write("inherited NOTIFY_SOCKET=", tostring(os.getenv("NOTIFY_SOCKET")),
  " WATCHDOG_USEC=", tostring(os.getenv("WATCHDOG_USEC")), "\\n")
io.stdout:flush()
"""


class Notify(unittest.TestCase):
    def listen(self, address):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        s.bind(address)
        s.settimeout(0.2)
        self.addCleanup(s.close)
        return s

    def run_segue(self, notify_socket, watchdog_usec=None):
        d = tmpdir()
        self.addCleanup(shutil.rmtree, d, True)
        write(os.path.join(d, "probe.lua"), PROBE)
        cfg = write(os.path.join(d, "segue.lua"), CONFIG)
        env = dict(os.environ, NOTIFY_SOCKET=notify_socket)
        if watchdog_usec:
            env["WATCHDOG_USEC"] = str(watchdog_usec)
        p = subprocess.Popen([SEGUE, "run", cfg], cwd=d, env=env, stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.addCleanup(lambda: p.poll() is None and (p.kill(), p.wait()))
        return p

    @staticmethod
    def receive(sock, want, timeout=20):
        """Datagrams until one contains the line `want`; all of them."""
        got, deadline = [], time.time() + timeout
        while time.time() < deadline:
            try:
                data = sock.recv(4096).decode()
            except socket.timeout:
                continue
            got.append(data)
            if want in data.split("\n"):
                return got
        raise AssertionError("no %r in %d s; got %r" % (want, timeout, got))

    def test_ready_reloading_stopping_and_the_watchdog_reach_the_notify_socket(self):
        d = tempfile.mkdtemp(prefix="segue-notify-")
        self.addCleanup(shutil.rmtree, d, True)
        sock = self.listen(os.path.join(d, "notify"))
        p = self.run_segue(os.path.join(d, "notify"), watchdog_usec=400000)
        ready = self.receive(sock, "READY=1")
        self.assertNotIn("STOPPING=1", "".join(ready))
        # the watchdog every 200 ms
        self.assertGreaterEqual(sum("WATCHDOG=1" in g for g in self.receive(sock, "WATCHDOG=1")), 1)
        p.send_signal(signal.SIGHUP)
        reloading = self.receive(sock, "RELOADING=1")
        fields = dict(l.split("=", 1) for l in reloading[-1].split("\n"))
        self.assertGreater(int(fields["MONOTONIC_USEC"]), 0)
        after = self.receive(sock, "READY=1")
        self.assertTrue(any("STATUS=running" in g for g in after), after)
        p.send_signal(signal.SIGTERM)
        self.receive(sock, "STOPPING=1")
        out, err = p.communicate(timeout=30)
        self.assertEqual(p.returncode, 0, err.decode())
        # backends and scripts do not inherit systemd's variables
        self.assertIn(b"inherited NOTIFY_SOCKET=nil WATCHDOG_USEC=nil", out)

    def test_an_abstract_socket_name_works_too(self):
        name = "@segue-test-%d" % os.getpid()
        sock = self.listen("\0" + name[1:])
        p = self.run_segue(name)
        self.receive(sock, "READY=1")
        p.send_signal(signal.SIGTERM)
        self.receive(sock, "STOPPING=1")
        p.communicate(timeout=30)
        self.assertEqual(p.returncode, 0)


class Journal(unittest.TestCase):
    def check_log(self, journal_stream):
        """The line `segue exec` logs with $JOURNAL_STREAM = journal_stream(stat
        of its stderr file), or unset when that gives None."""
        d = tmpdir()
        self.addCleanup(shutil.rmtree, d, True)
        script = write(os.path.join(d, "log.lua"), 'require("segue").log.warn("hello journal")')
        env = dict(os.environ)
        env.pop("JOURNAL_STREAM", None)
        with open(os.path.join(d, "stderr"), "w+b") as err:
            value = journal_stream(os.fstat(err.fileno()))
            if value:
                env["JOURNAL_STREAM"] = value
            subprocess.run([SEGUE, "exec", script], cwd=d, env=env, stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=err, timeout=60)
            err.seek(0)
            lines = [l for l in err.read().decode().splitlines() if "hello journal" in l]
        self.assertEqual(len(lines), 1, lines)
        return lines[0]

    def test_logs_to_the_journal_carry_no_time(self):
        line = self.check_log(lambda st: "%d:%d" % (st.st_dev, st.st_ino))
        self.assertTrue(line.startswith("level=warn "), line)
        self.assertNotIn("time=", line)

    def test_logs_elsewhere_keep_their_time(self):
        self.assertTrue(self.check_log(lambda st: "%d:%d" % (st.st_dev, st.st_ino + 1)).startswith("time="))
        self.assertTrue(self.check_log(lambda st: None).startswith("time="))


@unittest.skipUnless(ANALYZE, "systemd-analyze is not installed (build.sh installs systemd)")
class Unit(unittest.TestCase):
    def test_the_unit_passes_systemd_analyze_verify(self):
        d = tmpdir()
        self.addCleanup(shutil.rmtree, d, True)
        with open(UNIT) as f:
            text = f.read()
        for directive in ("Type=notify", "ExecReload=/bin/kill -HUP $MAINPID", "ProtectSystem=strict",
                          "NoNewPrivileges=true", "PrivateTmp=true", "SystemCallFilter=@system-service",
                          "StateDirectory=segue", "WatchdogSec="):
            self.assertIn(directive, text)
        # verify checks that the programs exist: the one under test stands in
        unit = write(os.path.join(d, "segue.service"), text.replace("/usr/bin/segue", os.path.abspath(SEGUE)))
        r = subprocess.run([ANALYZE, "verify", "--man=no", unit], capture_output=True, text=True, timeout=60)
        problems = [l for l in (r.stdout + r.stderr).splitlines() if "segue.service" in l]
        self.assertEqual((r.returncode, problems), (0, []), r.stdout + r.stderr)

    def test_the_package_installs_the_same_unit(self):
        self.assertEqual(os.path.realpath(os.path.join(SOURCE, "debian", "segue.service")), os.path.realpath(UNIT))


if __name__ == "__main__":
    unittest.main()
