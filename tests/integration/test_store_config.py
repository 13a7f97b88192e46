"""The store's config keys (docs/scaling.md): `segue check` names each
mistake in store, instance and lease_ms by line and path; a good PostgreSQL
config checks without a server; `segue migrate` on SQLite creates the file
at the current schema."""
import os
import shutil
import sqlite3
import unittest

from harness import run, tmpdir, write


class StoreConfig(unittest.TestCase):
    def setUp(self):
        self.dir = tmpdir()
        self.addCleanup(shutil.rmtree, self.dir, True)

    def test_mistakes_are_named_by_line_and_path(self):
        cfg = write(os.path.join(self.dir, "bad.lua"), """data_dir = "d"
store = { engine = "mysql", pool = 0, colour = "blue" }
instance = "has space"
lease_ms = 5
""")
        r = run(["check", cfg])
        self.assertEqual(r.code, 1)
        self.assertIn('bad.lua:2: store.engine: expected "sqlite" or "postgresql", found string "mysql"', r.stderr)
        self.assertIn("bad.lua:2: store.pool: expected an integer from 1 to 64", r.stderr)
        self.assertIn("bad.lua:2: store.colour: unknown key", r.stderr)
        self.assertIn("bad.lua:3: instance: expected a name", r.stderr)
        self.assertIn("bad.lua:4: lease_ms: expected an integer of at least 100", r.stderr)
        cfg = write(os.path.join(self.dir, "nodsn.lua"), 'store = { engine = "postgresql" }\n')
        r = run(["check", cfg])
        self.assertEqual(r.code, 1)
        self.assertIn("store.dsn: engine postgresql needs a dsn", r.stderr)

    def test_a_good_postgresql_config_checks_without_a_server(self):
        cfg = write(os.path.join(self.dir, "pg.lua"), """data_dir = "d"
store = { engine = "postgresql", dsn = "host=/nonexistent dbname=segue", pool = 2 }
instance = "bridge-1"
lease_ms = 3000
""")
        r = run(["check", cfg])
        self.assertEqual(r.code, 0, r.stderr)

    def test_migrate_on_sqlite_and_a_clear_failure_on_an_unreachable_postgresql(self):
        d = os.path.join(self.dir, "data")
        os.mkdir(d)
        cfg = write(os.path.join(self.dir, "s.lua"), 'data_dir = "%s"\n' % d)
        r = run(["migrate", cfg])
        self.assertEqual(r.code, 0, r.stderr)
        self.assertIn("segue.db: schema at version", r.stdout)
        version = int(r.stdout.strip().rsplit(" ", 1)[1])
        db = sqlite3.connect(os.path.join(d, "segue.db"))
        self.assertEqual(db.execute("PRAGMA user_version").fetchone()[0], version)
        db.close()
        cfg = write(os.path.join(self.dir, "p.lua"),
                    'data_dir = "%s"\nstore = { engine = "postgresql", dsn = "host=%s/nope dbname=x" }\n'
                    % (d, self.dir))
        r = run(["migrate", cfg], timeout=60)
        self.assertEqual(r.code, 1)
        self.assertIn("migrate: ESTORE: postgresql:", r.stderr)


if __name__ == "__main__":
    unittest.main()
