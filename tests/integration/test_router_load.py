"""The router under a flood between two subprocess backends through the
real `segue run` with its SQLite store: every message arrives, once and in
order, while flow control pauses the flooding backend (the copies in flight
to the other one stay bounded); and nothing is lost."""
import json
import os
import shutil
import subprocess
import unittest

from harness import SEGUE, PYTHON, HERE, tmpdir, write, wait_for

FLOOD = os.path.join(HERE, "flood_backend.py")

# Lowers the flow-control threshold so the test sees it work, starts the
# flood once the rooms are resolved, and reports the router's counters.
SCRIPT = r"""
local segue = require "segue"
local router = require "segue.router"
router.PAUSE_AT = 50
local started = false
segue.every(20, function()
  if not started and router.ready() then
    started = true
    segue.backend("src"):request({ type = "RoomJoin", value = "#go" }, function() end)
  end
  local s = router.status
  local f = io.open("counters.tmp", "w")
  f:write(segue.json.encode { bridged = s.bridged, lost = s.lost, pauses = s.pauses,
    compiled = s.compiled }) f:close()
  os.rename("counters.tmp", "counters.json")
end)
"""

N = 10000


class FloodTest(unittest.TestCase):
    def test_a_flood_arrives_complete_and_in_order_with_the_source_paused(self):
        d = tmpdir()
        self.addCleanup(shutil.rmtree, d, True)
        got = os.path.join(d, "got.txt")
        write(os.path.join(d, "rules.lua"), 'return { bridge { "src:#load", "dst:#load", format = "" } }\n')
        write(os.path.join(d, "go.lua"), SCRIPT)
        write(os.path.join(d, "cfg.lua"), """
backends = {
  src = { cmd = %s, args = { %s, "src", "%d" } },
  dst = { cmd = %s, args = { %s, "dst", %s } },
}
rules = "rules.lua"
scripts = { "go.lua" }
""" % (json.dumps(PYTHON), json.dumps(FLOOD), N, json.dumps(PYTHON), json.dumps(FLOOD), json.dumps(got)))
        p = subprocess.Popen([SEGUE, "-q", "run", "cfg.lua"], cwd=d, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
        self.addCleanup(lambda: p.poll() is None and p.kill())

        def count():
            try:
                with open(got) as f:
                    return sum(1 for _ in f)
            except FileNotFoundError:
                return 0

        self.assertTrue(wait_for(lambda: count() >= N, 120), "only %d of %d arrived" % (count(), N))

        def counters():
            try:
                with open(os.path.join(d, "counters.json")) as f:
                    return json.load(f)
            except (FileNotFoundError, ValueError):
                return {}

        self.assertTrue(wait_for(lambda: counters().get("bridged") == N, 10), counters())
        p.terminate()
        _, err = p.communicate(timeout=30)
        self.assertEqual(p.returncode, 0, err)
        with open(got) as f:
            lines = f.read().split("\n")[:-1]
        self.assertEqual(len(lines), N)
        bad = [(i, x) for i, x in enumerate(lines, 1) if x != str(i)]
        self.assertEqual(bad[:5], [], "copies out of order")
        c = counters()
        self.assertEqual(c["lost"], 0)
        self.assertGreater(c["pauses"], 0, "the flooding backend was never paused")
        # a plain bridge and no other update handler: C carried the flood
        # (flow control, bounds and order included), not Lua
        self.assertEqual(c["compiled"], N)


if __name__ == "__main__":
    unittest.main()
