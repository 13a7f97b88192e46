"""The PostgreSQL that tests and bench/store_pg.py start (pg_server.py) runs
in a session of its own: a process killed at its deadline (ctest's timeout,
bench/run's SIGTERM) must still stop it and remove its directory, not
leave a server and its files in /tmp."""
import os
import shutil
import signal
import subprocess
import sys
import unittest

import pg_server
from harness import live_processes, wait_for

HERE = os.path.dirname(os.path.abspath(__file__))

OWNER = """
import sys, time
sys.path.insert(0, %r)
import pg_server
pg = pg_server.PgServer()
pg.start()
print(pg.dir, flush=True)
time.sleep(300)
""" % HERE


def postgres_running(directory):
    """A postgres process whose command line names `directory`."""
    return live_processes("postgres", directory) > 0


@unittest.skipUnless(pg_server.available(), pg_server.MISSING)
class PgServerCleanup(unittest.TestCase):
    def test_sigterm_stops_the_server_and_removes_its_directory(self):
        p = subprocess.Popen([sys.executable, "-c", OWNER], stdout=subprocess.PIPE)
        d = ""
        try:
            d = p.stdout.readline().decode().strip()
            self.assertTrue(d and os.path.isdir(d), d)
            self.assertTrue(postgres_running(d), "the server did not start")
            p.send_signal(signal.SIGTERM)
            self.assertEqual(p.wait(timeout=90), 128 + signal.SIGTERM)
            self.assertFalse(os.path.exists(d), "left in /tmp: " + d)
            self.assertTrue(wait_for(lambda: not postgres_running(d), 30), "the server still runs")
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
            leftover(d)


def leftover(d):
    """What a failed run left: the server (by its pid file) and the directory."""
    if not d or not os.path.isdir(d):
        return
    try:
        with open(os.path.join(d, "data", "postmaster.pid")) as f:
            os.kill(int(f.readline()), signal.SIGTERM)
        wait_for(lambda: not postgres_running(d), 30)
    except (OSError, ValueError):
        pass
    shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    unittest.main()
