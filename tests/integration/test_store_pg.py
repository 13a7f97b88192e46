"""The store's PostgreSQL engine against a real PostgreSQL 15 started here
(pg_server.py): every asynchronous operation, three stores migrating one
fresh database at once (once, under the advisory lock), and a stream of
writes with the server restarted in the middle: all acknowledged, all read
back (tests/pg/pg_store_check.c)."""
import os
import subprocess
import unittest

import pg_server

BINARY_DIR = os.environ.get("SEGUE_BINARY_DIR", "")


@unittest.skipUnless(pg_server.available(), pg_server.MISSING)
class StorePg(unittest.TestCase):
    def setUp(self):
        self.pg = pg_server.PgServer()
        self.addCleanup(self.pg.cleanup)
        self.pg.start()
        self.pg.psql("CREATE DATABASE segue")
        self.pg.psql("CREATE DATABASE fresh")

    def test_operations_migrations_and_a_restart_under_load(self):
        dsn = self.pg.dsn.replace("dbname=postgres", "dbname=segue")
        fresh = self.pg.dsn.replace("dbname=postgres", "dbname=fresh")
        check = os.path.join(BINARY_DIR, "tests", "pg_store_check")
        r = subprocess.run([check, dsn, fresh] + self.pg.ctl_args("restart"),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=240)
        out = r.stdout.decode(errors="replace")
        self.assertEqual(r.returncode, 0, out)
        self.assertIn("writes: 3000 acknowledged, 0 failed; restart exit 0", out)
        self.assertIn(", 0 failed", out.splitlines()[-1])
        # Migrated once: one version row, the latest; every table there.
        fresh_dsn = fresh
        out = subprocess.run(["psql", "-X", "-A", "-t", "-d", fresh_dsn, "-c",
                              "SELECT count(*), max(version) FROM segue_schema"],
                             stdout=subprocess.PIPE, timeout=60).stdout.decode().strip()
        self.assertEqual(out, "1|5")  # schema 5: appends carry a write key (docs/scaling.md)
        self.assertEqual(self.pg.psql("SELECT count(*) FROM pg_database WHERE datname = 'segue'"), "1")
        n = subprocess.run(["psql", "-X", "-A", "-t", "-d", dsn, "-c",
                            "SELECT count(*) FROM kv WHERE key LIKE 'load.%'"],
                           stdout=subprocess.PIPE, timeout=60).stdout.decode().strip()
        self.assertEqual(n, "3000")


if __name__ == "__main__":
    unittest.main()
