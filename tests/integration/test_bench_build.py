"""bench/postbox.row and bench/store_pg.py build the postbox's queue bench
from the runtime's sources (bench/build_postbox_queue.sh): built and run
here for a moment, so that a source the postbox comes to need breaks the
suite, not only a later bench run (it did once: idmap.c)."""
import os
import subprocess
import tempfile
import unittest

SOURCE = os.environ.get("SEGUE_SOURCE_DIR", os.path.join(os.path.dirname(__file__), "..", ".."))


class BenchBuild(unittest.TestCase):
    def test_the_queue_bench_builds_from_the_runtime_sources_and_runs(self):
        with tempfile.TemporaryDirectory(prefix="segue-benchbuild-") as d:
            build = subprocess.run(["sh", os.path.join(SOURCE, "bench", "build_postbox_queue.sh"), d],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
            self.assertEqual(build.returncode, 0, build.stdout.decode(errors="replace"))
            run = subprocess.run([os.path.join(d, "postbox_queue"), d, "0.2"],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
            self.assertEqual(run.returncode, 0, run.stdout.decode(errors="replace"))
            rates = [float(x) for x in run.stdout.split()]
            self.assertEqual(len(rates), 2, run.stdout)
            self.assertTrue(all(r > 0 for r in rates), rates)


if __name__ == "__main__":
    unittest.main()
