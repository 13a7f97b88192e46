"""A real PostgreSQL 15 (Debian's postgresql package) for tests: initdb in a
temporary directory, the server on a Unix socket in that directory only (no
TCP), run as an unprivileged user. As root (CI), the directory is given to
`nobody` and every PostgreSQL program runs through setpriv as that user
(PostgreSQL refuses to run as root). Everything is removed by cleanup(),
which also runs at exit and on SIGTERM (a test or bench killed at its
deadline): the server runs in a session of its own (pg_ctl), so nothing
else would stop it, and it would keep its directory in /tmp."""
import atexit
import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import unittest

from harness import tmpdir

BIN = os.environ.get("SEGUE_PG_BIN") or (sorted(glob.glob("/usr/lib/postgresql/*/bin")) or ["/usr/lib/postgresql/15/bin"])[-1]


def available():
    return all(os.access(os.path.join(BIN, p), os.X_OK) for p in ("initdb", "pg_ctl", "postgres"))


MISSING = "PostgreSQL server binaries not found in %s (./build.sh deps installs the postgresql package)" % BIN


_live = []


def _cleanup_all():
    while _live:
        _live[-1].cleanup()


def _on_sigterm(signum, frame):
    sys.exit(128 + signum)  # atexit (and finally blocks) run: the servers stop


atexit.register(_cleanup_all)


class PgServer:
    def __init__(self):
        if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            try:
                signal.signal(signal.SIGTERM, _on_sigterm)
            except ValueError:
                pass  # not the main thread: at exit only
        self.dir = tempfile.mkdtemp(prefix="segue-pg-")
        self.data = os.path.join(self.dir, "data")
        self.log = os.path.join(self.dir, "log")
        _live.append(self)
        os.chmod(self.dir, 0o755)
        self.as_user = []
        if os.geteuid() == 0:
            import pwd
            pw = pwd.getpwnam("nobody")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            self.as_user = ["setpriv", "--reuid=%d" % pw.pw_uid, "--regid=%d" % pw.pw_gid,
                            "--clear-groups", "--"]
        self._run(["initdb", "-D", self.data, "-A", "trust", "-U", "segue", "--no-sync",
                   "-E", "UTF8", "--locale=C"])
        self.dsn = "host=%s user=segue dbname=postgres" % self.dir

    def _run(self, argv, check=True):
        cmd = self.as_user + [os.path.join(BIN, argv[0])] + argv[1:]
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120,
                           cwd=self.dir)
        if check and r.returncode != 0:
            raise RuntimeError("%s failed: %s" % (argv[0], r.stdout.decode(errors="replace")))
        return r

    def ctl_args(self, verb):
        """pg_ctl's command line for `verb` (start, stop, restart), as the user."""
        opts = "-k %s -c listen_addresses='' -c fsync=off -c max_connections=60" % self.dir
        return self.as_user + [os.path.join(BIN, "pg_ctl"), verb, "-D", self.data, "-l",
                               self.log, "-w", "-t", "60", "-m", "fast", "-o", opts]

    def start(self):
        subprocess.run(self.ctl_args("start"), check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=90, cwd=self.dir)

    def stop(self):
        subprocess.run(self.ctl_args("stop"), stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=90, cwd=self.dir)

    def restart(self):
        subprocess.run(self.ctl_args("restart"), check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=90, cwd=self.dir)

    def psql(self, sql):
        """Runs sql with psql (Debian's postgresql-client, a dependency of the
        server package); returns its output, unaligned, tuples only."""
        r = subprocess.run(["psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d",
                            self.dsn, "-c", sql], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, timeout=60)
        if r.returncode != 0:
            raise RuntimeError("psql: " + r.stdout.decode(errors="replace"))
        return r.stdout.decode().strip()

    def cleanup(self):
        if self not in _live:
            return  # cleaned up already
        _live.remove(self)
        try:
            if os.path.exists(os.path.join(self.data, "postmaster.pid")):
                self.stop()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


@unittest.skipUnless(available(), MISSING)
class SegueDbTest(unittest.TestCase):
    """A test with a PostgreSQL server of its own, the database `segue` on
    it (self.dsn) and a scratch directory (self.dir), all removed after."""
    # sql() fails the test when psql does (some tests poll tables that a
    # segue has not created yet: they set this False and read the output).
    sql_check = True

    def setUp(self):
        self.pg = PgServer()
        self.addCleanup(self.pg.cleanup)
        self.pg.start()
        self.pg.psql("CREATE DATABASE segue")
        self.dsn = self.pg.dsn.replace("dbname=postgres", "dbname=segue")
        self.dir = tmpdir()
        self.addCleanup(shutil.rmtree, self.dir, True)

    def sql(self, query):
        """Runs query on the segue database; its output, unaligned, tuples only."""
        r = subprocess.run(["psql", "-X", "-q", "-A", "-t", "-d", self.dsn, "-c", query],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
        if self.sql_check:
            self.assertEqual(r.returncode, 0, r.stdout)
        return r.stdout.decode(errors="replace").strip()
