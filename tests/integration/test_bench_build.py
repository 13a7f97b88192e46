"""The benchmarks' programs are built outside CMake, by the scripts that
use them: built and run here for a moment, so that a source or a tool that
stops building breaks the suite, not a later bench run (one did: the queue
bench once needed idmap.c).
- bench/build_postbox_queue.sh: the postbox's queue bench, from the
  runtime's own sources (bench/postbox.row, bench/store_pg.py);
- bench/build_tools.sh: the standalone tools of bench/run and
  bench/push.sh, each run once the way its row runs it."""
import os
import socket
import subprocess
import tempfile
import time
import unittest

SOURCE = os.environ.get("SEGUE_SOURCE_DIR", os.path.join(os.path.dirname(__file__), "..", ".."))


def numbers(out):
    return [float(x) for x in out.split()]


class BenchBuild(unittest.TestCase):
    def run_ok(self, argv, timeout=60):
        r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
        self.assertEqual(r.returncode, 0, "%s: %s" % (argv, r.stdout.decode(errors="replace")))
        return r.stdout.decode()

    def test_the_queue_bench_builds_from_the_runtime_sources_and_runs(self):
        with tempfile.TemporaryDirectory(prefix="segue-benchbuild-") as d:
            self.run_ok(["sh", os.path.join(SOURCE, "bench", "build_postbox_queue.sh"), d], 120)
            rates = numbers(self.run_ok([os.path.join(d, "postbox_queue"), d, "0.2"]))
            self.assertEqual(len(rates), 2, rates)
            self.assertTrue(all(r > 0 for r in rates), rates)

    def test_the_bench_tools_build_and_run(self):
        with tempfile.TemporaryDirectory(prefix="segue-benchtools-") as d:
            out = self.run_ok(["sh", os.path.join(SOURCE, "bench", "build_tools.sh"), d], 120)
            self.assertEqual(out.strip(), "", "warnings building the bench tools")
            tool = lambda name: os.path.join(d, name)
            # the verify rate, on one thread and on two
            for argv in ([tool("push_verify"), "0.05"], [tool("push_verify"), "0.05", "2"]):
                (rate,) = numbers(self.run_ok(argv))
                self.assertGreater(rate, 0, argv)
            # the machine's speed in slices: slowest tenth <= median <= fastest tenth
            p10, p50, p90 = numbers(self.run_ok([tool("cpu_slices"), "0.2", "10"]))
            self.assertTrue(0 < p10 <= p50 <= p90, (p10, p50, p90))
            # the line relay through the bench backend's relay mode
            (rate,) = numbers(self.run_ok([tool("relay_baseline"), tool("bench_backend"), "0.1"]))
            self.assertGreater(rate, 0)
            # distinct signed tokens: 3 lines of base64, all different
            key = os.path.join(d, "key")
            with open(key, "wb") as f:
                f.write(os.urandom(64))
            toks = self.run_ok([tool("push_tokens"), key, "a.example", "b.example", "1700000000", "3"]).split()
            self.assertEqual(len(toks), 3, toks)
            self.assertEqual(len(set(toks)), 3, toks)
            # the load generator against the trivial responder: every answer a 200
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            s.close()
            srv = subprocess.Popen([tool("uv_http_baseline"), str(port)])
            try:
                deadline = time.monotonic() + 10
                while True:
                    try:
                        socket.create_connection(("127.0.0.1", port), timeout=1).close()
                        break
                    except OSError:
                        self.assertLess(time.monotonic(), deadline, "the responder never listened")
                        time.sleep(0.05)
                (rate,) = numbers(self.run_ok([tool("push_load"), str(port), "0.2", "2", "/p", "-", "0a00"]))
                self.assertGreater(rate, 0)
            finally:
                srv.kill()
                srv.wait(timeout=10)


if __name__ == "__main__":
    unittest.main()
