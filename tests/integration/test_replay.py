"""One segue on SQLite, killed with -9 mid-stream and started again
(docs/routing.md, "After a crash: replays are not bridged twice"): the chat
services replay their history to the new run (a's messages; b's copies
with their ids and `extra`), b answers each copy 40 ms after posting it, so
copies whose ids the killed run never recorded exist: every message is
bridged, once, in order. After a clean stop the next run holds nothing."""
import json
import os
import shutil
import signal
import subprocess
import threading
import time
import unittest

from harness import SEGUE, PYTHON, tmpdir, write, wait_for
from stream_backend import bridged, out_lines, user_says, users_say_until

STREAM = os.path.join(os.path.dirname(os.path.abspath(__file__)), "stream_backend.py")


class Replay(unittest.TestCase):
    def setUp(self):
        self.dir = tmpdir()
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.a_in = os.path.join(self.dir, "a.in")
        self.b_out = os.path.join(self.dir, "b.out")
        rules = write(os.path.join(self.dir, "rules.lua"), 'return {\n  bridge { "a:#s", "b:#s" },\n}\n')
        self.cfg = write(os.path.join(self.dir, "segue.lua"), """
data_dir = %s
rules = %s
replay_window_ms = 3000
backends = {
  a = { cmd = %s, args = { %s, "--in=%s" } },
  b = { cmd = %s, args = { %s, "--out=%s", "--reply-ms=40" } },
}
""" % (json.dumps(os.path.join(self.dir, "data")), json.dumps(rules), json.dumps(PYTHON), json.dumps(STREAM),
       self.a_in, json.dumps(PYTHON), json.dumps(STREAM), self.b_out))
        self.proc = None
        self.logs = []
        self.addCleanup(self.stop)

    def start(self):
        n = len(self.logs)
        self.logs.append(os.path.join(self.dir, "run%d.log" % n))
        self.logf = open(self.logs[-1], "wb")
        self.proc = subprocess.Popen([SEGUE, "run", self.cfg], stdout=self.logf, stderr=subprocess.STDOUT)

    def stop(self, sig=signal.SIGTERM):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc:
            self.logf.close()
        self.proc = None

    def log(self, i=-1):
        with open(self.logs[i], errors="replace") as f:
            return f.read()

    def test_killed_mid_stream_and_started_again_bridges_each_message_once_in_order(self):
        self.start()
        ids, killed = [], threading.Event()
        writer = threading.Thread(target=users_say_until, args=(self.a_in, ids, killed))
        writer.start()
        self.assertTrue(wait_for(lambda: len(bridged(self.b_out)) >= 40, 60), self.log())
        self.stop(signal.SIGKILL)
        killed.set()
        before = bridged(self.b_out)
        writer.join()
        # b (the killed run's child) sees its stdin close and exits; its
        # answers not sent by then never will be.
        time.sleep(0.5)
        lines = out_lines(self.b_out)
        answered = {c["answered"] for c in lines if "answered" in c}
        inflight = [c["origin"]["id"] for c in lines if "origin" in c and c["id"] not in answered]
        self.assertTrue(inflight, "no copy was in flight at the kill")
        self.start()
        self.assertTrue(wait_for(lambda: set(bridged(self.b_out)) >= set(ids), 60),
                        "missing %r\n%s" % (sorted(set(ids) - set(bridged(self.b_out)))[:10], self.log()))
        self.assertTrue(wait_for(lambda: "replay window of b closed" in self.log(), 30), self.log())
        time.sleep(1)  # a copy sent twice would show by now
        got = bridged(self.b_out)
        self.assertIn("the previous run did not stop cleanly", self.log())
        self.assertIn("wait for their replay (up to 3000 ms each)", self.log())  # replay_window_ms
        self.assertEqual(got[:len(before)], before)
        twice = sorted({x for x in got if got.count(x) > 1})
        self.assertEqual(twice, [], "bridged twice (%r were in flight at the kill)\n%s" % (inflight, self.log()))
        self.assertEqual(got, ids)  # each once, in the order said

        # A clean stop: the next run holds nothing and sends nothing again.
        self.stop()
        self.start()
        self.assertTrue(wait_for(lambda: "running with" in self.log(), 30), self.log())
        user_says(self.a_in, "n1")
        self.assertTrue(wait_for(lambda: "n1" in bridged(self.b_out), 30), self.log())
        self.assertNotIn("did not stop cleanly", self.log())
        self.assertEqual(bridged(self.b_out), ids + ["n1"])

    def test_replay_window_ms_0_opens_no_windows(self):
        with open(self.cfg) as f:
            text = f.read()
        write(self.cfg, text.replace("replay_window_ms = 3000", "replay_window_ms = 0"))
        self.start()
        self.assertTrue(wait_for(lambda: "running with" in self.log(), 30), self.log())
        user_says(self.a_in, "k1")
        self.assertTrue(wait_for(lambda: "k1" in bridged(self.b_out), 30), self.log())
        self.stop(signal.SIGKILL)
        time.sleep(0.5)  # b, the killed run's child, sees its stdin close and exits
        self.start()
        self.assertTrue(wait_for(lambda: "no replay windows (replay_window_ms = 0)" in self.log(), 30), self.log())
        user_says(self.a_in, "k2")
        self.assertTrue(wait_for(lambda: "k2" in bridged(self.b_out), 30), self.log())
        self.assertNotIn("wait for their replay", self.log())
        self.assertNotIn("replay window of", self.log())


if __name__ == "__main__":
    unittest.main()
